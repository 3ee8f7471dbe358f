"""Contract v2 normals (docs/noise-contract.md, "v2 normals") as one ``@triton.jit`` function.

Box-Muller from two Philox words with every float32 operation fixed: an int->float conversion,
integer bit operations, explicit ``tl.fma`` for the polynomials (one rounding, whatever the
fp-fusion setting), multiplies whose results never feed an add (nothing to contract) and
a correctly rounded sqrt. No libdevice: the same bits as the torch reference
(``zokernels.backends.torch.noise.normal_pair_v2``) and the C++ backend (csrc/fastmath.h).
"""

import triton
import triton.language as tl

from ..._contract import (
    NORMAL_V2_COS,
    NORMAL_V2_LOG,
    NORMAL_V2_MINUS_TWO_LN2,
    NORMAL_V2_SIN,
    NORMAL_V2_U_OFFSET,
    NORMAL_V2_U_SCALE,
    float32_from_bits,
)

# The contract's float32 constants (exact: a Python float holding a float32 value).
_L0, _L1, _L2, _L3, _L4, _L5, _L6, _L7 = (tl.constexpr(float32_from_bits(b)) for b in NORMAL_V2_LOG)
_S0, _S1, _S2, _S3 = (tl.constexpr(float32_from_bits(b)) for b in NORMAL_V2_SIN)
_C0, _C1, _C2, _C3 = (tl.constexpr(float32_from_bits(b)) for b in NORMAL_V2_COS)
_MINUS_TWO_LN2 = tl.constexpr(float32_from_bits(NORMAL_V2_MINUS_TWO_LN2))
_U_SCALE = tl.constexpr(float32_from_bits(NORMAL_V2_U_SCALE))
_U_OFFSET = tl.constexpr(float32_from_bits(NORMAL_V2_U_OFFSET))


@triton.jit
def _sqrt_rn_positive(y):
    """sqrt(y) correctly rounded, for normal positive y (here y in [1.1e-7, 46]), without the
    special-case branch of ``tl.sqrt_rn``: these are exactly the instructions of sqrt.rn's fast path
    on NVIDIA GPUs (MUFU.RSQ, two multiplies, two FMAs; tests/test_normal_v2.py compares the sm_90
    SASS), which ptxas only leaves for zero, denormal, infinite or negative inputs. Under the
    interpreter rsqrt is 1 / sqrt(y) in float32, for which the sequence was checked exhaustively
    on every float32 in [1e-8, 64]. Saves 5 of the 10 instructions of ``tl.sqrt_rn``."""
    rs = tl.math.rsqrt(y)
    s = y * rs
    return tl.fma(tl.fma(-s, s, y), rs * 0.5, s)


@triton.jit
def normal_pair_v2(w_radius, w_angle):
    """(r cos th, r sin th), float32, from two uint32 Philox words (tensors of one shape).

    r = sqrt(-2 ln u), u = float32(w_radius) (1 - 2^-24) 2^-32 + 2^-33 rounded to float32, in
    [2^-33, 1 - 2^-24];
    th = q pi/2 + pi/4 v with the quadrant q from the word's top two bits and v in (-1, 1) from
    its bits 1..22 (no float range reduction)."""
    # radius. u = m 2^e with m in [sqrt(1/2), sqrt(2)); f = m - 1 and e from the bits, exactly.
    u = tl.fma(w_radius.to(tl.float32), _U_SCALE, _U_OFFSET)
    ub = u.to(tl.int32, bitcast=True)
    e = (ub - 0x3F3504F3) >> 23  # arithmetic shift: floor
    f = (ub - e * 8388608).to(tl.float32, bitcast=True) - 1.0
    p = tl.fma(_L7, f, _L6)
    p = tl.fma(p, f, _L5)
    p = tl.fma(p, f, _L4)
    p = tl.fma(p, f, _L3)
    p = tl.fma(p, f, _L2)
    p = tl.fma(p, f, _L1)
    p = tl.fma(p, f, _L0)
    r = _sqrt_rn_positive(tl.fma(p, f, e.to(tl.float32) * _MINUS_TWO_LN2))  # sqrt(-2 ln u)
    # angle th = q pi/2 + pi/4 v: quadrant q = the top two bits, v in (-1, 1) from bits 1..22:
    # x = 1 + (2h + 1) 2^-23 (the mantissa field in place, its last bit set: v is centred),
    # v = 2x - 3 exactly.
    x = ((w_angle & 0x7FFFFF) | 0x3F800001).to(tl.float32, bitcast=True)
    v = tl.fma(x, 2.0, -3.0)
    v2 = v * v
    s = tl.fma(_S3, v2, _S2)
    s = tl.fma(s, v2, _S1)
    s = tl.fma(s, v2, _S0) * v  # sin(pi/4 v)
    c = tl.fma(_C3, v2, _C2)
    c = tl.fma(c, v2, _C1)
    c = tl.fma(c, v2, _C0)  # cos(pi/4 v)
    # odd q turns (cos, sin) into (-sin, cos); q >= 2 negates both, done on r's sign bit.
    odd = (w_angle & 0x40000000) != 0
    r = (r.to(tl.uint32, bitcast=True) ^ (w_angle & 0x80000000)).to(tl.float32, bitcast=True)
    return r * tl.where(odd, -s, c), r * tl.where(odd, c, s)
