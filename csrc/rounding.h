// float32 <-> bfloat16 / float16 conversions (round to nearest even, subnormals, inf, NaN), the
// contract's stochastic rounding, and the recovery of a perturbed weight (applied=). Everything
// is branch-free 32-bit integer/float code, so loops over it vectorize; results match torch's
// (c10) conversions bit for bit.
#pragma once

#include <type_traits>

#include "common.h"

namespace zk {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct Float32Format {
    using storage = float;
    static ZK_INLINE float to_float(float v) { return v; }
    static ZK_INLINE float from_float(float v) { return v; }
};

struct BFloat16Format {
    using storage = uint16_t;
    static ZK_INLINE float to_float(uint32_t h) { return bits_as<float>(h << 16); }
    // As c10::round_to_nearest_even: NaN -> 0x7FC0; overflow rounds to inf naturally.
    static ZK_INLINE uint32_t bits_from_float(float f) {
        const uint32_t b = bits_as<uint32_t>(f);
        const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
        const bool is_nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
        return is_nan ? 0x7FC0u : rounded;
    }
};

struct Float16Format {
    using storage = uint16_t;
    // fp16 -> fp32 as c10::detail::fp16_ieee_to_fp32_value (exact, incl. subnormals/inf/NaN).
    static ZK_INLINE float to_float(uint32_t h) {
        const uint32_t w = h << 16;
        const uint32_t sign = w & 0x80000000u;
        const uint32_t two_w = w + w;
        const float normalized = bits_as<float>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
        const float denormalized = bits_as<float>((two_w >> 17) | (126u << 23)) - 0.5f;
        const uint32_t magnitude = two_w < (1u << 27) ? bits_as<uint32_t>(denormalized)
                                                      : bits_as<uint32_t>(normalized);
        return bits_as<float>(sign | magnitude);
    }
    // fp32 -> fp16 as c10::detail::fp16_ieee_from_fp32_value: the float additions do the round
    // to nearest even (also into subnormals and to inf); NaN -> 0x7E00 with the sign kept.
    static ZK_INLINE uint32_t bits_from_float(float f) {
        const uint32_t w = bits_as<uint32_t>(f);
        const float magnitude = bits_as<float>(w & 0x7FFFFFFFu);
        float base = (magnitude * 0x1.0p+112f) * 0x1.0p-110f;
        const uint32_t shl1_w = w + w;
        const uint32_t sign = w & 0x80000000u;
        uint32_t bias = shl1_w & 0xFF000000u;
        bias = bias < 0x71000000u ? 0x71000000u : bias;
        base = bits_as<float>((bias >> 1) + 0x07800000u) + base;
        const uint32_t bits = bits_as<uint32_t>(base);
        const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
        const uint32_t mantissa_bits = bits & 0x00000FFFu;
        const uint32_t nonsign = exp_bits + mantissa_bits;
        return (sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign);
    }
};

ZK_INLINE float abs_of(float v) { return bits_as<float>(bits_as<uint32_t>(v) & 0x7FFFFFFFu); }

// Stochastic rounding of acc to a 16-bit format with the uniform u (contract, "Stochastic
// rounding"): y = round_nearest(acc); if y != acc and y is finite, take the neighbour y' on acc's
// side with probability p = (|acc| - |y|) / (|y'| - |y|). Sign-magnitude encoding makes y' the
// bit pattern +-1 for both signs. Returns the 16-bit pattern.
template <class Format>
ZK_INLINE uint32_t stochastic_round_bits(float acc, float u) {
    const uint32_t y = Format::bits_from_float(acc);
    const float y_value = Format::to_float(y);
    const float acc_abs = abs_of(acc);
    const float y_abs = abs_of(y_value);
    const uint32_t y_next = acc_abs > y_abs ? y + 1u : y - 1u;
    const float y_next_abs = abs_of(Format::to_float(y_next & 0xFFFFu));
    const float p = (acc_abs - y_abs) / (y_next_abs - y_abs);  // 0 when y' is infinite
    // Chained selects rather than && / ||, which would keep the loop from vectorizing.
    uint32_t result = u < p ? y_next : y;
    result = y_value == acc ? y : result;
    result = y_abs <= 3.4028234663852886e38f ? result : y;  // y inf or NaN: keep y
    return result & 0xFFFFu;
}

// Rounding codes of the _C API: nearest, the contract-1/2 stochastic rounding above, and contract
// 3's integer stochastic rounding below.
enum Rounding : int { kRoundNearest = 0, kRoundStochastic = 1, kRoundStochasticInteger = 2 };

// Contract 3 stochastic rounding of acc to a 16-bit format with 16 random bits (docs/
// noise-contract.md): m = the float32 pattern of |acc| (bf16) or of |acc| * 2^-112 (fp16: exact
// power-of-two scaling onto fp32's subnormal boundary, after which the pattern shifted right by
// 13 is fp16's magnitude pattern, subnormals included); the random bits are added below the kDrop
// bits the format drops, then truncated: away from zero with probability (m mod 2^kDrop) / 2^kDrop.
// |acc| at or above the largest finite value, inf and NaN round to nearest. No division and no
// float compare of neighbours (the uniform-based version's cost on GPUs). Returns the pattern.
template <class Format>
ZK_INLINE uint32_t integer_stochastic_round_bits(float acc, uint32_t random16) {
    constexpr bool kHalf = std::is_same<Format, Float16Format>::value;
    constexpr int kDrop = kHalf ? 13 : 16;
    constexpr float kLimit = kHalf ? 65504.0f : 0x1.FEp127f;  // largest finite value
    const float magnitude = kHalf ? abs_of(acc) * 0x1p-112f : abs_of(acc);
    const uint32_t kept = (bits_as<uint32_t>(magnitude) + (random16 >> (16 - kDrop))) >> kDrop;
    const uint32_t sign = (bits_as<uint32_t>(acc) >> 16) & 0x8000u;
    const uint32_t nearest = Format::bits_from_float(acc);
    return abs_of(acc) < kLimit ? (kept | sign) : nearest;  // false for NaN
}

// The dtype's grid as bit patterns, to step to neighbours: round_bits(v) is float32 v rounded to
// nearest in the dtype, value(b) the float32 of pattern b, kSign the sign bit of a pattern.
template <class Format>
struct Grid;

template <>
struct Grid<Float32Format> {
    static constexpr uint32_t kSign = 0x80000000u;
    static ZK_INLINE uint32_t round_bits(float v) { return bits_as<uint32_t>(v); }
    static ZK_INLINE float value(uint32_t b) { return bits_as<float>(b); }
};

template <>
struct Grid<BFloat16Format> {
    static constexpr uint32_t kSign = 0x8000u;
    static ZK_INLINE uint32_t round_bits(float v) { return BFloat16Format::bits_from_float(v); }
    static ZK_INLINE float value(uint32_t b) { return BFloat16Format::to_float(b); }
};

template <>
struct Grid<Float16Format> {
    static constexpr uint32_t kSign = 0x8000u;
    static ZK_INLINE uint32_t round_bits(float v) { return Float16Format::bits_from_float(v); }
    static ZK_INLINE float value(uint32_t b) { return Float16Format::to_float(b); }
};

// Neighbours of a finite pattern toward +inf / -inf: one step of the sign-magnitude pattern; both
// zeros step to the smallest subnormal of that direction's sign. Meaningless for inf / NaN (masked by
// the caller; a 16-bit pattern that steps past 0xFFFF only has its low 16 bits read by value()).
template <class Format>
ZK_INLINE uint32_t grid_next_up(uint32_t b) {
    const uint32_t sign = Grid<Format>::kSign;
    const uint32_t step = (b & sign) != 0 ? b - 1u : b + 1u;
    return (b & (sign - 1u)) == 0 ? 1u : step;
}

template <class Format>
ZK_INLINE uint32_t grid_next_down(uint32_t b) {
    const uint32_t sign = Grid<Format>::kSign;
    const uint32_t step = (b & sign) != 0 ? b + 1u : b - 1u;
    return (b & (sign - 1u)) == 0 ? (sign | 1u) : step;
}

// Recovery of a perturbed weight (contract, "Recovery of a perturbed tensor"): x holds
// round_nearest(theta + d1); returns the first c of r = round_nearest(x - d1), next_down(r),
// next_up(r) with round_nearest(c + d1) == x (else r; r itself when not finite), as float32.
// Why: just adding -d1 to the rounded value misses theta by one ulp whenever the perturbation's
// rounding error pushes x - d1 across a rounding boundary; for bf16 weights a MeZO step
// (+eps, -2eps, +eps) then leaves ~47% of elements one ulp off, and testing r's neighbours brings
// that down to a few percent (weights that collide under the perturbation). Branch-free selects
// so that the tile loop vectorizes.
template <class Format>
ZK_INLINE float recover_unperturbed(float x, float d1) {
    using G = Grid<Format>;
    const uint32_t r = G::round_bits(x - d1);
    const float r_value = G::value(r);
    const float down_value = G::value(grid_next_down<Format>(r));
    const float up_value = G::value(grid_next_up<Format>(r));
    const bool r_ok = G::value(G::round_bits(r_value + d1)) == x;
    const bool down_ok = G::value(G::round_bits(down_value + d1)) == x;
    const bool up_ok = G::value(G::round_bits(up_value + d1)) == x;
    float c = up_ok ? up_value : r_value;
    c = down_ok ? down_value : c;
    c = r_ok ? r_value : c;
    return abs_of(r_value) <= 3.4028234663852886e38f ? c : r_value;  // inf / NaN r: kept
}

}  // namespace zk
