// The low-rank product P[row, col] = sum_k U[row, k] * (V[col, k] * tau[k]), written once for
// the dense pass (lowrank.cpp) and the undo log's scatter (lowrank_scatter.cpp): both (and the
// torch reference) form V[col, k] * tau[k] in float32 first, then sum in k order starting from
// the k = 0 product (not from +0.0), one rounding per multiply and per add (-ffp-contract=off),
// so a scattered element gets exactly the dense pass's bits.
#pragma once

#include <vector>

#include "common.h"

#if ZK_HAVE_AVX2_PATH
#include <immintrin.h>
#endif

namespace zk {

// (V diag(tau))^T as r x n: out[k * n + col] = V[col, k] * tau[k] (V row-major n x r).
inline void scaled_factor_t(const float* v, const float* tau, uint64_t n, uint64_t r,
                            std::vector<float>& out) {
    out.resize(r * n);
    for (uint64_t col = 0; col < n; ++col)
        for (uint64_t k = 0; k < r; ++k) out[k * n + col] = v[col * r + k] * tau[k];
}

// prod[c] = P[row, col + c] for c < count, from the scratch above (vectorizes over c).
ZK_INLINE void lowrank_row_segment(const float* ZK_RESTRICT u_row, const float* ZK_RESTRICT vt_tau,
                                   uint64_t n, uint64_t r, uint64_t col, int count,
                                   float* ZK_RESTRICT prod) {
    const float* v0 = vt_tau + col;
    const float u0 = u_row[0];
    for (int c = 0; c < count; ++c) prod[c] = u0 * v0[c];
    for (uint64_t k = 1; k < r; ++k) {
        const float uk = u_row[k];
        const float* vk = vt_tau + k * n + col;
        for (int c = 0; c < count; ++c) prod[c] = prod[c] + uk * vk[c];
    }
}

#if ZK_HAVE_AVX2_PATH
// lowrank_row_segment for the AVX2 kernels, the same operations in the same order (so the same
// bits): 64 columns at a time keep their partial sums in registers across the r products, where
// the loop above stores and reloads prod for every k (GCC spilled a plain-C++ block of sums to
// the stack). 8 independent sums cover the latency of the additions.
ZK_TARGET_AVX2 inline void lowrank_row_segment_avx2(const float* ZK_RESTRICT u_row,
                                                  const float* ZK_RESTRICT vt_tau, uint64_t n,
                                                  uint64_t r, uint64_t col, int count,
                                                  float* ZK_RESTRICT prod) {
    constexpr int kVectors = 8, kWidth = 8 * kVectors;
    const __m256 u0 = _mm256_set1_ps(u_row[0]);
    int c0 = 0;
    for (; c0 + kWidth <= count; c0 += kWidth) {
        const float* v0 = vt_tau + col + c0;
        __m256 sum[kVectors];
#pragma GCC unroll 8
        for (int q = 0; q < kVectors; ++q) sum[q] = _mm256_mul_ps(u0, _mm256_loadu_ps(v0 + 8 * q));
        for (uint64_t k = 1; k < r; ++k) {
            const __m256 uk = _mm256_set1_ps(u_row[k]);
            const float* vk = vt_tau + k * n + col + c0;
#pragma GCC unroll 8
            for (int q = 0; q < kVectors; ++q)
                sum[q] = _mm256_add_ps(sum[q], _mm256_mul_ps(uk, _mm256_loadu_ps(vk + 8 * q)));
        }
#pragma GCC unroll 8
        for (int q = 0; q < kVectors; ++q) _mm256_storeu_ps(prod + c0 + 8 * q, sum[q]);
    }
    for (; c0 + 8 <= count; c0 += 8) {
        __m256 sum = _mm256_mul_ps(u0, _mm256_loadu_ps(vt_tau + col + c0));
        for (uint64_t k = 1; k < r; ++k)
            sum = _mm256_add_ps(sum, _mm256_mul_ps(_mm256_set1_ps(u_row[k]),
                                                   _mm256_loadu_ps(vt_tau + k * n + col + c0)));
        _mm256_storeu_ps(prod + c0, sum);
    }
    if (c0 < count)
        lowrank_row_segment(u_row, vt_tau, n, r, col + c0, count - c0, prod + c0);
}
#endif

// P[row, col] of one element straight from V's row (no scratch): the same float32 values.
ZK_INLINE float lowrank_element(const float* ZK_RESTRICT u_row, const float* ZK_RESTRICT v_row,
                                const float* ZK_RESTRICT tau, uint64_t r) {
    float p = u_row[0] * (v_row[0] * tau[0]);
    for (uint64_t k = 1; k < r; ++k) p = p + u_row[k] * (v_row[k] * tau[k]);
    return p;
}

}  // namespace zk
