// The low-rank product P[row, col] = sum_k U[row, k] * (V[col, k] * tau[k]), written once for
// the dense pass (lowrank.cpp) and the undo log's scatter (lowrank_scatter.cpp): both (and the
// torch reference) form V[col, k] * tau[k] in float32 first, then sum in k order starting from
// the k = 0 product (not from +0.0), one rounding per multiply and per add (-ffp-contract=off),
// so a scattered element gets exactly the dense pass's bits.
#pragma once

#include <vector>

#include "common.h"

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

// P[row, col] of one element straight from V's row (no scratch): the same float32 values.
ZK_INLINE float lowrank_element(const float* ZK_RESTRICT u_row, const float* ZK_RESTRICT v_row,
                                const float* ZK_RESTRICT tau, uint64_t r) {
    float p = u_row[0] * (v_row[0] * tau[0]);
    for (uint64_t k = 1; k < r; ++k) p = p + u_row[k] * (v_row[k] * tau[k]);
    return p;
}

}  // namespace zk
