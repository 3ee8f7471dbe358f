// Branch-free float32 log / sin / cos for Box-Muller, written as scalar code that compilers
// vectorize inside loops (libm calls would block vectorization). Polynomials are Cephes' logf,
// sinf and cosf (about 1 ulp); z then agrees with torch's float32 Box-Muller to ~1e-6 absolute,
// well inside the contract's 1e-5 (docs/noise-contract.md, "gaussian").
#pragma once

#include <cmath>

#include "common.h"

namespace zk {

// Contract constants as exact float32 bit patterns (no decimal rounding questions).
constexpr uint32_t kUniformScaleBits = 0x2FFFFFFFu;  // float32(4.6566127342e-10)
constexpr uint32_t kTwoPiBits = 0x40C90FDBu;         // float32(6.283185307179586)
constexpr float kBoxMullerMinU = 1e-7f;

// Word -> uniform in [0, 1), bit-identical to Triton's uint_to_uniform_float.
ZK_INLINE float word_to_uniform(uint32_t word) {
    int32_t x = static_cast<int32_t>(word);
    x = x ^ (x >> 31);  // ~x for negative x (arithmetic shift), x otherwise
    return static_cast<float>(x) * bits_as<float>(kUniformScaleBits);
}

// Natural log for positive normal x (Box-Muller feeds [1e-7, 1)); no NaN/inf/zero handling.
ZK_INLINE float log_positive_normal(float x) {
    const uint32_t bits = bits_as<uint32_t>(x);
    int32_t exponent = static_cast<int32_t>(bits >> 23) - 126;          // x = m * 2^exponent
    const float m = bits_as<float>((bits & 0x007FFFFFu) | 0x3F000000u);  // m in [0.5, 1)
    // Center the mantissa on 1: f in [sqrt(1/2) - 1, sqrt(2) - 1); both subtractions are exact.
    const bool below_sqrt_half = m < 0.707106781186547524f;
    exponent = below_sqrt_half ? exponent - 1 : exponent;
    const float f = below_sqrt_half ? (m + m) - 1.0f : m - 1.0f;
    // Cephes' degree-8 polynomial, evaluated with Estrin's scheme: a Horner chain of 8 dependent
    // multiply-adds is latency bound (measured 2x slower); the product with f^3 below damps the
    // slightly different rounding to far below 1 ulp of the result.
    const float f2 = f * f;
    const float f4 = f2 * f2;
    const float f8 = f4 * f4;
    const float q01 = 3.3333331174E-1f + -2.4999993993E-1f * f;
    const float q23 = 2.0000714765E-1f + -1.6668057665E-1f * f;
    const float q45 = 1.4249322787E-1f + -1.2420140846E-1f * f;
    const float q67 = 1.1676998740E-1f + -1.1514610310E-1f * f;
    const float r03 = q01 + q23 * f2;
    const float r47 = q45 + q67 * f2;
    const float p = (r03 + r47 * f4) + 7.0376836292E-2f * f8;
    const float e = static_cast<float>(exponent);
    // ln 2 split in two (0.693359375 has few bits, so e * 0.693359375 is exact).
    float y = p * f * f2;
    y = y + e * -2.12194440e-4f;
    y = y + -0.5f * f2;
    float r = f + y;
    r = r + e * 0.693359375f;
    return r;
}

// sin and cos of th in [0, 2*pi + a little]. Range reduction by the nearest multiple of pi/2
// with pi/4 split in three parts (Cody-Waite): the first two products are exact for the small
// multiples needed here, so the reduced argument is accurate to float32.
ZK_INLINE void sincos_0_to_2pi(float th, float& sin_out, float& cos_out) {
    int32_t octant = static_cast<int32_t>(th * 1.27323954473516f);  // th * 4/pi, th >= 0
    octant = (octant + 1) & ~1;                                       // even: multiple of pi/2
    const float y = static_cast<float>(octant);
    const float x = ((th - y * 0.78515625f) - y * 2.4187564849853515625e-4f) -
                    y * 3.77489497744594108e-8f;  // x in [-pi/4, pi/4]
    const float z = x * x;
    float s = -1.9515295891E-4f;
    s = s * z + 8.3321608736E-3f;
    s = s * z + -1.6666654611E-1f;
    s = s * z * x + x;
    float c = 2.443315711809948E-5f;
    c = c * z + -1.388731625493765E-3f;
    c = c * z + 4.166664568298827E-2f;
    c = c * z * z;
    c = c - 0.5f * z;
    c = c + 1.0f;
    // Quadrant q = octant / 2: swap for odd q, then fix the signs.
    const uint32_t quadrant = static_cast<uint32_t>(octant) >> 1;
    const bool swap = (quadrant & 1u) != 0;
    const float s_abs = swap ? c : s;
    const float c_abs = swap ? s : c;
    const uint32_t sin_sign = (quadrant & 2u) << 30;
    const uint32_t cos_sign = ((quadrant + 1u) & 2u) << 30;
    sin_out = bits_as<float>(bits_as<uint32_t>(s_abs) ^ sin_sign);
    cos_out = bits_as<float>(bits_as<uint32_t>(c_abs) ^ cos_sign);
}

// Triton's pair_uniform_to_normal (contract): (r cos th, r sin th).
ZK_INLINE void box_muller(float u_radius, float u_angle, float& n_cos, float& n_sin) {
    const float a = u_radius > kBoxMullerMinU ? u_radius : kBoxMullerMinU;
    const float th = bits_as<float>(kTwoPiBits) * u_angle;
    const float r = std::sqrt(-2.0f * log_positive_normal(a));
    float s, c;
    sincos_0_to_2pi(th, s, c);
    n_cos = r * c;
    n_sin = r * s;
}

}  // namespace zk
