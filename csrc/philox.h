// Philox4x32-10 (Random123 / triton.language.philox), see docs/noise-contract.md.
//
// Three forms: a scalar one (known-answer tests, odd remainders), a plain loop over consecutive
// counters that compilers vectorize for their baseline ISA, and an AVX2 version with explicit
// intrinsics, because compilers turn the 32x32->64 multiplies into slow widening sequences.
#pragma once

#include "common.h"

#if ZK_HAVE_AVX2_PATH
#include <immintrin.h>
#endif

namespace zk {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// Counter word 3 separates independent uses of one seed (contract, "Streams").
constexpr uint32_t kStreamNoise = 0;
constexpr uint32_t kStreamRounding = 1;

// The ten round keys of one seed, computed once per seed instead of once per counter.
struct PhiloxKeys {
    uint32_t k0[kPhiloxRounds];
    uint32_t k1[kPhiloxRounds];

    explicit PhiloxKeys(uint64_t seed = 0) {
        uint32_t a = static_cast<uint32_t>(seed);
        uint32_t b = static_cast<uint32_t>(seed >> 32);
        for (int r = 0; r < kPhiloxRounds; ++r) {
            k0[r] = a;
            k1[r] = b;
            a += kPhiloxW0;
            b += kPhiloxW1;
        }
    }
};

ZK_INLINE void philox_mulhilo(uint32_t m, uint32_t x, uint32_t& hi, uint32_t& lo) {
    const uint64_t product = static_cast<uint64_t>(m) * x;
    hi = static_cast<uint32_t>(product >> 32);
    lo = static_cast<uint32_t>(product);
}

// Ten rounds on one counter, in place.
ZK_INLINE void philox_rounds(const PhiloxKeys& keys, uint32_t& c0, uint32_t& c1, uint32_t& c2,
                             uint32_t& c3) {
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
    for (int r = 0; r < kPhiloxRounds; ++r) {
        uint32_t hi0, lo0, hi1, lo1;
        philox_mulhilo(kPhiloxM0, c0, hi0, lo0);
        philox_mulhilo(kPhiloxM1, c2, hi1, lo1);
        const uint32_t n0 = hi1 ^ c1 ^ keys.k0[r];
        const uint32_t n2 = hi0 ^ c3 ^ keys.k1[r];
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
}

// Scalar Philox4x32-10 of one counter.
inline void philox4x32_10(uint64_t seed, const uint32_t counter[4], uint32_t words[4]) {
    const PhiloxKeys keys(seed);
    uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
    philox_rounds(keys, c0, c1, c2, c3);
    words[0] = c0;
    words[1] = c1;
    words[2] = c2;
    words[3] = c3;
}

// Words of the counters (b mod 2^32, b >> 32, c2, c3) for b = first_block .. first_block + n - 1,
// stored as four arrays (structure of arrays, the layout SIMD lanes want).
struct PhiloxGeneric {
    static inline void blocks(const PhiloxKeys& keys, uint64_t first_block, uint32_t c2, uint32_t c3,
                              int n, uint32_t* ZK_RESTRICT w0, uint32_t* ZK_RESTRICT w1,
                              uint32_t* ZK_RESTRICT w2, uint32_t* ZK_RESTRICT w3) {
        const uint32_t lo = static_cast<uint32_t>(first_block);
        const uint32_t hi = static_cast<uint32_t>(first_block >> 32);
        for (int p = 0; p < n; ++p) {
            uint32_t x0 = lo + static_cast<uint32_t>(p);
            uint32_t x1 = hi + (x0 < lo ? 1u : 0u);  // carry when the low word wraps
            uint32_t x2 = c2, x3 = c3;
            philox_rounds(keys, x0, x1, x2, x3);
            w0[p] = x0;
            w1[p] = x1;
            w2[p] = x2;
            w3[p] = x3;
        }
    }
};

#if ZK_HAVE_AVX2_PATH
struct PhiloxAvx2 {
    // 8 lanes of (hi, lo) = 32x32->64 products: even lanes directly, odd lanes after a shuffle.
    ZK_TARGET_AVX2 static inline void mulhilo8(__m256i m, __m256i x, __m256i& hi, __m256i& lo) {
        const __m256i even = _mm256_mul_epu32(x, m);
        const __m256i odd = _mm256_mul_epu32(_mm256_shuffle_epi32(x, 0xF5), m);
        hi = _mm256_blend_epi32(_mm256_shuffle_epi32(even, 0xF5), odd, 0xAA);
        lo = _mm256_blend_epi32(even, _mm256_shuffle_epi32(odd, 0xA0), 0xAA);
    }

    // V independent 8-lane counters per iteration: one alone is latency bound; 4 keep the
    // multiply and shuffle ports busy (measured 3.1 -> 2.3 ns per counter on Zen 3).
    // Counters (lo + p, hi, c2, c3) for p < 8V.
    template <int V>
    ZK_TARGET_AVX2 static inline void rounds8xV(const PhiloxKeys& keys, uint32_t lo, uint32_t hi,
                                                uint32_t c2, uint32_t c3, uint32_t* w0,
                                                uint32_t* w1, uint32_t* w2, uint32_t* w3) {
        const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
        const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        // Only c0 differs between lanes, so in rounds 0 and 1 one of the two products is the same
        // for every lane: compute it once in scalar code (saves 2 of 20 vector multiplies).
        uint32_t s_hi, s_lo;
        philox_mulhilo(kPhiloxM1, c2, s_hi, s_lo);           // round 0, product of c2
        const uint32_t x0_after0 = s_hi ^ hi ^ keys.k0[0];    // uniform after round 0
        const uint32_t x1_after0 = s_lo;                      // uniform after round 0
        philox_mulhilo(kPhiloxM0, x0_after0, s_hi, s_lo);     // round 1, product of x0
        const __m256i c3_k1 = _mm256_set1_epi32(static_cast<int>(c3 ^ keys.k1[0]));
        const __m256i x1_k0 = _mm256_set1_epi32(static_cast<int>(x1_after0 ^ keys.k0[1]));
        const __m256i hi0_k1 = _mm256_set1_epi32(static_cast<int>(s_hi ^ keys.k1[1]));
        const __m256i lo0_round1 = _mm256_set1_epi32(static_cast<int>(s_lo));
        __m256i x0[V], x1[V], x2[V], x3[V];
        for (int v = 0; v < V; ++v) {
            const __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo + 8u * v)), lane);
            __m256i hi0, lo0, hi1, lo1;
            mulhilo8(m0, c0, hi0, lo0);                          // round 0
            const __m256i x3_after0 = lo0;
            const __m256i x2_after0 = _mm256_xor_si256(hi0, c3_k1);
            mulhilo8(m1, x2_after0, hi1, lo1);                   // round 1
            x0[v] = _mm256_xor_si256(hi1, x1_k0);
            x1[v] = lo1;
            x2[v] = _mm256_xor_si256(x3_after0, hi0_k1);
            x3[v] = lo0_round1;
        }
        for (int r = 2; r < kPhiloxRounds; ++r) {
            const __m256i k0 = _mm256_set1_epi32(static_cast<int>(keys.k0[r]));
            const __m256i k1 = _mm256_set1_epi32(static_cast<int>(keys.k1[r]));
            for (int v = 0; v < V; ++v) {
                __m256i hi0, lo0, hi1, lo1;
                mulhilo8(m0, x0[v], hi0, lo0);
                mulhilo8(m1, x2[v], hi1, lo1);
                x0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, x1[v]), k0);
                x2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, x3[v]), k1);
                x1[v] = lo1;
                x3[v] = lo0;
            }
        }
        for (int v = 0; v < V; ++v) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + 8 * v), x0[v]);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + 8 * v), x1[v]);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2 + 8 * v), x2[v]);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(w3 + 8 * v), x3[v]);
        }
    }

    ZK_TARGET_AVX2 static inline void blocks(const PhiloxKeys& keys, uint64_t first_block,
                                             uint32_t c2, uint32_t c3, int n, uint32_t* w0,
                                             uint32_t* w1, uint32_t* w2, uint32_t* w3) {
        const uint32_t lo = static_cast<uint32_t>(first_block);
        const uint32_t hi = static_cast<uint32_t>(first_block >> 32);
        int p = 0;
        // The vector path keeps the high counter word constant; the rare span that crosses a
        // multiple of 2^32 blocks goes to the generic loop, which carries per lane.
        if (static_cast<uint64_t>(lo) + static_cast<uint64_t>(n) <= 0x100000000ull) {
            for (; p + 32 <= n; p += 32)
                rounds8xV<4>(keys, lo + p, hi, c2, c3, w0 + p, w1 + p, w2 + p, w3 + p);
            for (; p + 8 <= n; p += 8)
                rounds8xV<1>(keys, lo + p, hi, c2, c3, w0 + p, w1 + p, w2 + p, w3 + p);
        }
        if (p < n)
            PhiloxGeneric::blocks(keys, first_block + p, c2, c3, n - p, w0 + p, w1 + p, w2 + p,
                                  w3 + p);
    }
};
#endif

}  // namespace zk
