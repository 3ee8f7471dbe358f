"""Constants of the noise contract (docs/noise-contract.md), shared by every backend."""

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

# Counter word c3 separates independent streams of one seed.
STREAM_NOISE = 0
STREAM_ROUNDING = 1

# Elements fed by one Philox call.
GAUSSIAN_GROUP = 4
RADEMACHER_GROUP = 128

SEED_LIMIT = 1 << 64
KEY_LIMIT = 1 << 32

NOISE_DISTS = ("gaussian", "rademacher", "uniform")
PERTURB_DISTS = ("gaussian", "rademacher")
ROUNDINGS = ("nearest", "stochastic")
