"""Constants of the noise contract (docs/noise-contract.md), shared by every backend."""

import numbers
import struct

# Philox4x32-10 (Random123).
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10

# Triton's uint_to_uniform_float scale for 32-bit words: the largest float32 with
# (2^31 - 1) * scale < 1 after rounding.
UNIFORM_SCALE = 4.6566127342e-10
# Box-Muller constants as in Triton's pair_uniform_to_normal.
BOX_MULLER_MIN_U = 1.0e-7
TWO_PI = 6.283185307179586

# Contract versions (docs/noise-contract.md): 1 = Triton's pair_uniform_to_normal for the
# gaussian normals (libdevice-dependent, agrees across backends within 1e-5) and stochastic
# rounding by a uniform against the rounding probability; 2 = the fixed float32 Box-Muller below,
# bit-identical on every backend, with v1's stochastic rounding; 3 = v2's normals with integer
# stochastic rounding (16 random bits added below the kept bits, then truncated: one Philox call
# per 8 elements, no division). Words, uniforms and rademacher values are the same in all three.
# The default for new work is 3 (it differs from 2 only where rounding is stochastic: cheaper and
# exactly unbiased); 1 and 2 replay what was recorded with them.
CONTRACTS = (1, 2, 3)
DEFAULT_CONTRACT = 3
# What a saved optimizer state or trajectory meta without a "contract" field was made with: every
# recording from before v2 used the v1 normals.
CONTRACT_OF_UNVERSIONED = 1

# v2 normals: constants as float32 bit patterns. -2 ln(1 + f) = f * P(f) for f in
# [sqrt(1/2) - 1, sqrt(2) - 1), P(f) = sum_j NORMAL_V2_LOG[j] f^j (minimax, relative error 1.7e-7);
# sin(pi/4 v) = v * sum_j NORMAL_V2_SIN[j] v^(2j) and cos(pi/4 v) = sum_j NORMAL_V2_COS[j] v^(2j)
# on [-1, 1] (relative error 3.2e-9 and 3.3e-8).
NORMAL_V2_LOG = (0xBFFFFFFF, 0x3F80003D, 0xBF2AACEE, 0x3EFFB11E, 0xBECBC717, 0x3EB0A604,
                 0xBEA61E86, 0x3E4EFD40)
NORMAL_V2_MINUS_TWO_LN2 = 0xBFB17218  # float32(-2 ln 2)
# u = fma(float32(word), U_SCALE, U_OFFSET) in [2^-33, 1 - 2^-24]: never 0, never 1
NORMAL_V2_U_SCALE = 0x2F7FFFFF  # (1 - 2^-24) 2^-32
NORMAL_V2_U_OFFSET = 0x2F000000  # 2^-33
NORMAL_V2_SIN = (0x3F490FDB, 0xBDA55DDD, 0x3B232F49, 0xB816C981)
NORMAL_V2_COS = (0x3F7FFFFF, 0xBE9DE9C6, 0x3C81D732, 0xB9A71AED)


def as_contract(value, name: str = "contract") -> int:
    """`value` checked as a contract version (1, 2 or 3; bool refused), else ValueError naming
    it."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or value not in CONTRACTS):
        raise ValueError(f"{name} must be one of {list(CONTRACTS)} (the version of the noise "
                         f"contract, docs/noise-contract.md), got {value!r}")
    return int(value)


def normals_version(contract: int) -> int:
    """The version of the gaussian normals a contract uses: 1 (libdevice Box-Muller) or 2 (the
    fixed float32 Box-Muller; contracts 2 and 3)."""
    return 1 if contract == 1 else 2


def integer_rounding(contract: int) -> bool:
    """Whether a contract's stochastic rounding is the integer one (contract 3) rather than the
    uniform-against-probability one (contracts 1 and 2)."""
    return contract >= 3


def saved_contract(saved) -> object:
    """The contract version recorded in a saved state / trajectory meta (a mapping), as saved
    (check it with as_contract); one saved before versions existed is v1."""
    return saved.get("contract", CONTRACT_OF_UNVERSIONED)


def float32_from_bits(bits: int) -> float:
    """The Python float equal to the float32 with this bit pattern (exact)."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]


# Counter word c3 separates independent streams of one seed.
STREAM_NOISE = 0
STREAM_ROUNDING = 1

# Contract 3 stochastic rounding: 16 random bits per element, word (i mod 8) // 2 of call i // 8
# of the rounding stream, low half for even i; the float32 magnitude pattern (bf16) or that of
# |acc| * 2^-112 (fp16: its fp32 pattern then has fp16's layout, subnormals included) keeps its
# top bits after the bits are added below the DROP bits that the dtype does not keep.
INTEGER_SR_GROUP = 8
INTEGER_SR_DROP = {"bfloat16": 16, "float16": 13}
INTEGER_SR_FP16_PRESCALE = 2.0 ** -112
# largest finite values: from there on (and for inf / NaN) the result is round-to-nearest
INTEGER_SR_LIMIT = {"bfloat16": 3.3895313892515355e38, "float16": 65504.0}

# Elements fed by one Philox call.
GAUSSIAN_GROUP = 4
RADEMACHER_GROUP = 128

SEED_LIMIT = 1 << 64
KEY_LIMIT = 1 << 32

NOISE_DISTS = ("gaussian", "rademacher", "uniform")
PERTURB_DISTS = ("gaussian", "rademacher")
ROUNDINGS = ("nearest", "stochastic")
