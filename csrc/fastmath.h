// Box-Muller of the noise contract, v1 and v2 (docs/noise-contract.md).
//
// v1: branch-free float32 log / sin / cos for Box-Muller, written as scalar code that compilers
// vectorize inside loops (libm calls would block vectorization): -2 ln a through atanh with one
// division and a 2-term polynomial, sin / cos of the angle reduced by k pi/2 (k from the uniform's
// integer) with short minimax polynomials. z agrees with double precision to < 1e-6 absolute
// (checked over all 2^31 radius words and all 2^31 angle words at the largest radius), well
// inside the contract's 1e-5 against torch (docs/noise-contract.md, "gaussian"). Only plain
// float32 + - * / sqrt (no fma), so the AVX2 and generic clones give the same bits.
//
// v2 (box_muller_v2): every float32 operation fixed by the contract, fma where it says fma, so
// the result is bit-identical to the torch reference and Triton. The `Fma` parameter supplies a
// correctly rounded fma: the instruction in the AVX2 clone, and in the generic clone the
// instruction where the target has one, else an exact emulation in double.
#pragma once

#include <cmath>

#include "common.h"

namespace zk {

// Contract constants as exact float32 bit patterns (no decimal rounding questions).
constexpr uint32_t kUniformScaleBits = 0x2FFFFFFFu;  // float32(4.6566127342e-10)
constexpr uint32_t kTwoPiBits = 0x40C90FDBu;         // float32(6.283185307179586)
constexpr float kBoxMullerMinU = 1e-7f;

// Word -> the integer x in [0, 2^31) of the uniform below.
ZK_INLINE uint32_t word_to_uniform_int(uint32_t word) {
    const int32_t x = static_cast<int32_t>(word);
    return static_cast<uint32_t>(x ^ (x >> 31));  // ~x for negative x (arithmetic shift), x otherwise
}

// Word -> uniform in [0, 1), bit-identical to Triton's uint_to_uniform_float.
ZK_INLINE float word_to_uniform(uint32_t word) {
    return static_cast<float>(static_cast<int32_t>(word_to_uniform_int(word))) *
           bits_as<float>(kUniformScaleBits);
}

// -2 ln(x) for positive normal x (Box-Muller feeds [1e-7, 1)); no NaN/inf/zero handling.
ZK_INLINE float minus_two_log(float x) {
    // Range reduction in integer arithmetic, branch free: subtracting the bits of sqrt(1/2) moves
    // the exponent step to the mantissa sqrt(1/2), so x = m * 2^exponent with m in
    // [sqrt(1/2), sqrt(2)) and f = m - 1 exact. (A float compare + select here made GCC evaluate
    // the whole polynomial, and the sqrt after it, once per side of the select.)
    const int32_t shifted = static_cast<int32_t>(bits_as<uint32_t>(x) - 0x3F3504F3u);
    const int32_t exponent = shifted >> 23;  // arithmetic shift: floor
    const float m = bits_as<float>(static_cast<uint32_t>((shifted & 0x007FFFFF) + 0x3F3504F3));
    const float f = m - 1.0f;
    // ln(1 + f) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...) with s = f / (2 + f), |s| <= 0.1716:
    // one division buys a polynomial of 2 terms in t = s^2 instead of 9 in f. Minimax fit of
    // -2 ln(1 + f) = -4 s + s t (q0 + q1 t), relative error 1.5e-7 before rounding; the division
    // adds 1.2e-7 relative (2 + f rounds). The factor -2 sits in the coefficients (exact scaling).
    const float s = f / (2.0f + f);
    const float t = s * s;
    const float q = -1.3331124782562256f + -0.824039876461029f * t;
    const float y = (s * t) * q;
    const float e = static_cast<float>(exponent);
    // -2 ln 2 split in two (-1.38671875 has few bits, so e * -1.38671875 is exact).
    float r = y + e * 4.243888834025711e-4f;
    r = r + s * -4.0f;
    r = r + e * -1.38671875f;
    return r;
}

// Triton's pair_uniform_to_normal (contract) of the uniforms of two words: a = max(1e-7, u_radius),
// th = float32(2 pi) * u_angle, (sqrt(-2 ln a) cos th, sqrt(-2 ln a) sin th).
ZK_INLINE void box_muller(uint32_t w_radius, uint32_t w_angle, float& n_cos, float& n_sin) {
    const float u = word_to_uniform(w_radius);
    const float a = u > kBoxMullerMinU ? u : kBoxMullerMinU;
    const float r_abs = std::sqrt(minus_two_log(a));

    // sin and cos of th by the nearest multiple k of pi/2: k = round(4 u_angle), taken from the
    // uniform's integer (x + 2^28) >> 29 in 0..4; th - k pi/2 lies within pi/4 + 1e-6.
    const uint32_t xa = word_to_uniform_int(w_angle);
    const float th = bits_as<float>(kTwoPiBits) *
                     (static_cast<float>(static_cast<int32_t>(xa)) * bits_as<float>(kUniformScaleBits));
    const uint32_t k = (xa + 0x10000000u) >> 29;
    const float kf = static_cast<float>(static_cast<int32_t>(k));
    // pi/2 in two parts (Cody-Waite): the first has 22 bits, so kf * 1.5707960128784180 is exact
    // for k <= 4 and so is the subtraction (the operands are close); the second rounds once.
    const float x = (th - kf * 1.5707960128784180f) - kf * 3.1391647326017846e-7f;
    const float z = x * x;
    // Minimax fits on [-pi/4, pi/4]: sin x = x + x z S(z) (error 1.8e-9), cos x = 1 + z C(z) (5e-11;
    // one term fewer would give 3.2e-8, i.e. up to 1.8e-7 in z, for no measurable speed).
    float s = -0.00019495627202559263f;
    s = s * z + 0.00833197869360447f;
    s = s * z + -0.16666650772094727f;
    s = (s * z) * x + x;
    float c = 2.439043964841403e-05f;
    c = c * z + -0.0013886763481423259f;
    c = c * z + 0.04166662320494652f;
    c = c * z + -0.5f;
    c = c * z + 1.0f;
    // Quadrant k: (sin th, cos th) = (s, c), (c, -s), (-s, -c), (-c, s) for k mod 4 = 0, 1, 2, 3.
    // The common sign of k = 2, 3 goes on the radius; odd k swaps and negates.
    const bool odd = (k & 1u) != 0;
    const float sin_q = odd ? c : s;
    const float cos_q = odd ? -s : c;
    const float r = bits_as<float>(bits_as<uint32_t>(r_abs) ^ ((k << 30) & 0x80000000u));
    n_cos = r * cos_q;
    n_sin = r * sin_q;
}

// v2 constants (zokernels/_contract.py, NORMAL_V2_*), float32 bit patterns.
constexpr uint32_t kV2UScaleBits = 0x2F7FFFFFu;   // (1 - 2^-24) 2^-32
constexpr uint32_t kV2UOffsetBits = 0x2F000000u;  // 2^-33
constexpr uint32_t kV2MinusTwoLn2Bits = 0xBFB17218u;
constexpr uint32_t kV2Log[8] = {0xBFFFFFFFu, 0x3F80003Du, 0xBF2AACEEu, 0x3EFFB11Eu,
                                0xBECBC717u, 0x3EB0A604u, 0xBEA61E86u, 0x3E4EFD40u};
constexpr uint32_t kV2Sin[4] = {0x3F490FDBu, 0xBDA55DDDu, 0x3B232F49u, 0xB816C981u};
constexpr uint32_t kV2Cos[4] = {0x3F7FFFFFu, 0xBE9DE9C6u, 0x3C81D732u, 0xB9A71AEDu};

// fma as an instruction: std::fmaf inlined into a function compiled for FMA (the AVX2 clone).
struct FmaHardware {
    static ZK_INLINE float fma(float a, float b, float c) { return std::fmaf(a, b, c); }
};

// fma for the generic clone. Without an FMA instruction in the target (x86-64 baseline), std::fmaf
// is a libm call per operation; instead, in double: p = a * b is exact, s = p + c rounds once and
// TwoSum gives its error err exactly (s + err = p + c). float(s) is the correctly rounded result
// unless s is exactly halfway between two floats while err != 0 (a double rounding: any other
// halfway point between p + c and s would be a double nearer to p + c than s): then the result is
// the float on err's side. d = s - float(s) and float(s) + 2d are exact; s is halfway iff d != 0
// and float(s) + 2d is a float (the other neighbour). Only double compares and selects, so GCC
// vectorizes it with SSE2 (a round-to-odd version with 64-bit integer compares did not). Checked
// against the hardware fma on 2M constructed halfway cases (half of them needing the correction).
struct FmaPortable {
    static ZK_INLINE float fma(float a, float b, float c) {
#if defined(__FP_FAST_FMAF)
        return std::fmaf(a, b, c);
#else
        const double p = static_cast<double>(a) * static_cast<double>(b);
        const double cd = static_cast<double>(c);
        const double s = p + cd;
        const double v = s - p;
        const double err = (p - (s - v)) + (cd - v);
        const double r = static_cast<double>(static_cast<float>(s));
        const double d = s - r;
        const double other = r + 2.0 * d;
        // & rather than && and ?: keeps the loop free of branches (vectorizable)
        const bool halfway = (d != 0.0) & (static_cast<double>(static_cast<float>(other)) == other);
        const bool to_other = halfway & (((err > 0.0) & (d > 0.0)) | ((err < 0.0) & (d < 0.0)));
        return static_cast<float>(to_other ? other : r);
#endif
    }
};

// Contract v2 Box-Muller of two words: (r cos th, r sin th), the operations in the contract's order.
template <class Fma>
ZK_INLINE void box_muller_v2(uint32_t w_radius, uint32_t w_angle, float& n_cos, float& n_sin) {
    // radius: u = fma(float(w), U_SCALE, U_OFFSET) in [2^-33, 1 - 2^-24]; u = m 2^e with m in
    // [sqrt(1/2), sqrt(2)), f = m - 1 exact; -2 ln u = f P(f) + e (-2 ln 2).
    const float u = Fma::fma(static_cast<float>(w_radius), bits_as<float>(kV2UScaleBits),
                             bits_as<float>(kV2UOffsetBits));
    const int32_t ub = bits_as<int32_t>(u);
    const int32_t e = (ub - 0x3F3504F3) >> 23;  // arithmetic shift: floor
    const float f = bits_as<float>(ub - e * 8388608) - 1.0f;
    float p = Fma::fma(bits_as<float>(kV2Log[7]), f, bits_as<float>(kV2Log[6]));
    p = Fma::fma(p, f, bits_as<float>(kV2Log[5]));  // written out: a loop here stops GCC from
    p = Fma::fma(p, f, bits_as<float>(kV2Log[4]));  // vectorizing the caller's loop
    p = Fma::fma(p, f, bits_as<float>(kV2Log[3]));
    p = Fma::fma(p, f, bits_as<float>(kV2Log[2]));
    p = Fma::fma(p, f, bits_as<float>(kV2Log[1]));
    p = Fma::fma(p, f, bits_as<float>(kV2Log[0]));
    const float y = Fma::fma(p, f, static_cast<float>(e) * bits_as<float>(kV2MinusTwoLn2Bits));
    const float r_abs = std::sqrt(y);  // correctly rounded (IEEE)
    // angle: th = q pi/2 + pi/4 v, q = the top two bits, x = 1 + (2h + 1) 2^-23 from bits 1..22,
    // v = 2x - 3 (exact).
    const float x = bits_as<float>((w_angle & 0x007FFFFFu) | 0x3F800001u);
    const float v = x * 2.0f - 3.0f;
    const float v2 = v * v;
    float s = Fma::fma(bits_as<float>(kV2Sin[3]), v2, bits_as<float>(kV2Sin[2]));
    s = Fma::fma(s, v2, bits_as<float>(kV2Sin[1]));
    s = Fma::fma(s, v2, bits_as<float>(kV2Sin[0])) * v;
    float c = Fma::fma(bits_as<float>(kV2Cos[3]), v2, bits_as<float>(kV2Cos[2]));
    c = Fma::fma(c, v2, bits_as<float>(kV2Cos[1]));
    c = Fma::fma(c, v2, bits_as<float>(kV2Cos[0]));
    // odd q: (cos, sin) -> (-sin, cos); q >= 2 negates both, on r's sign bit.
    const bool odd = (w_angle & 0x40000000u) != 0;
    const float r = bits_as<float>(bits_as<uint32_t>(r_abs) ^ (w_angle & 0x80000000u));
    n_cos = r * (odd ? -s : c);
    n_sin = r * (odd ? c : s);
}

}  // namespace zk
