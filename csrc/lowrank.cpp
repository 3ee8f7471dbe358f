// lowrank_perturb_: W <- round(decay * W + scale * U diag(tau) V^T), W (m x n) row-major, U (m x r),
// V (n x r), float32 accumulation, never materializing the m x n product: (V diag(tau))^T is
// transposed once into an r x n scratch so that a row of the product is r vectorized axpys over
// contiguous memory. W is walked in flat tiles of its row-major index i = row * n + col, which
// is also the index stochastic rounding uses (stream 1, the weight's key).
#include <stdexcept>

#include "ops.h"
#include "tile_io.h"
#include "work_items.h"

namespace zk {
namespace {

struct LowRankWeight {
    uintptr_t w;
    uint64_t m, n, r;
    const float* u;       // m x r
    const float* vt_tau;  // r x n scratch: vt_tau[k * n + col] = V[col, k] * tau[k]
    float decay;
    uint32_t key;
};

struct LowRankJob {
    const std::vector<LowRankWeight>& weights;
    float scale;
    bool stochastic;
    PhiloxKeys rounding_keys;
    int dtype;
};

// prod[c] = sum_k U[row, k] * vt_tau[k, col + c] for c < count (k in order, float32).
inline void lowrank_row_segment(const LowRankWeight& lw, uint64_t row, uint64_t col, int count,
                                float* ZK_RESTRICT prod) {
    const float* u_row = lw.u + row * lw.r;
    const float* v0 = lw.vt_tau + col;
    const float u0 = u_row[0];
    for (int c = 0; c < count; ++c) prod[c] = u0 * v0[c];
    for (uint64_t k = 1; k < lw.r; ++k) {
        const float uk = u_row[k];
        const float* vk = lw.vt_tau + k * lw.n + col;
        for (int c = 0; c < count; ++c) prod[c] = prod[c] + uk * vk[c];
    }
}

template <class Philox, class Format>
inline void lowrank_range(const LowRankJob& job, const WorkItem& item) {
    const LowRankWeight& lw = job.weights[item.tensor];
    auto* w = reinterpret_cast<typename Format::storage*>(lw.w);
    alignas(64) float acc[kTile];
    alignas(64) float prod[kTile];
    for (uint64_t t = item.begin; t < item.end; t += kTile) {
        const int n = static_cast<int>(min_of<uint64_t>(kTile, item.end - t));
        // The tile may span several (short) rows: one segment per row.
        for (int done = 0; done < n;) {
            const uint64_t i = t + done;
            const uint64_t row = i / lw.n, col = i % lw.n;
            const int count = static_cast<int>(min_of<uint64_t>(lw.n - col, n - done));
            lowrank_row_segment(lw, row, col, count, prod + done);
            done += count;
        }
        load_decayed<Format>(w + t, n, lw.decay, acc);
        for (int c = 0; c < n; ++c) acc[c] = acc[c] + job.scale * prod[c];
        store_rounded<Philox, Format>(acc, n, w + t, job.stochastic, job.rounding_keys, lw.key, t);
    }
}

template <class Philox>
inline void lowrank_item(const LowRankJob& job, const WorkItem& item) {
    switch (job.dtype) {
        case kFloat32: lowrank_range<Philox, Float32Format>(job, item); break;
        case kBFloat16: lowrank_range<Philox, BFloat16Format>(job, item); break;
        default: lowrank_range<Philox, Float16Format>(job, item); break;
    }
}

ZK_FLATTEN void lowrank_item_generic(const LowRankJob& job, const WorkItem& item) {
    lowrank_item<PhiloxGeneric>(job, item);
}

#if ZK_HAVE_AVX2_PATH
ZK_TARGET_AVX2 ZK_FLATTEN void lowrank_item_avx2(const LowRankJob& job, const WorkItem& item) {
    lowrank_item<PhiloxAvx2>(job, item);
}
#endif

}  // namespace

void lowrank_perturb(const std::vector<uintptr_t>& w_ptrs, const std::vector<uint64_t>& ms,
                     const std::vector<uint64_t>& ns, const std::vector<uint64_t>& ranks,
                     const std::vector<uintptr_t>& u_ptrs, const std::vector<uintptr_t>& v_ptrs,
                     const std::vector<uintptr_t>& tau_ptrs, const std::vector<float>& decays,
                     float scale, const std::vector<uint32_t>& keys, int dtype, int rounding,
                     uint64_t rounding_seed, int num_threads) {
    const size_t count = w_ptrs.size();
    for (size_t len : {ms.size(), ns.size(), ranks.size(), u_ptrs.size(), v_ptrs.size(),
                       tau_ptrs.size(), decays.size(), keys.size()})
        if (len != count)
            throw std::invalid_argument("lowrank_perturb: all per-weight lists must have equal lengths");
    if (dtype < kFloat32 || dtype > kFloat16)
        throw std::invalid_argument("lowrank_perturb: bad dtype code");
    if (rounding != 0 && rounding != 1)
        throw std::invalid_argument("lowrank_perturb: bad rounding code");
    for (size_t j = 0; j < count; ++j)
        if (ranks[j] == 0) throw std::invalid_argument("lowrank_perturb: rank must be >= 1");

    // Scratch (V diag(tau))^T for every weight: r x n floats each, small next to W.
    std::vector<std::vector<float>> scratch(count);
    std::vector<LowRankWeight> weights(count);
    std::vector<uint64_t> numels(count);
    for (size_t j = 0; j < count; ++j) {
        const uint64_t n = ns[j], r = ranks[j];
        const auto* v = reinterpret_cast<const float*>(v_ptrs[j]);
        const auto* tau = reinterpret_cast<const float*>(tau_ptrs[j]);
        scratch[j].resize(r * n);
        for (uint64_t col = 0; col < n; ++col)
            for (uint64_t k = 0; k < r; ++k) scratch[j][k * n + col] = v[col * r + k] * tau[k];
        weights[j] = {w_ptrs[j], ms[j], n, r, reinterpret_cast<const float*>(u_ptrs[j]),
                      scratch[j].data(), decays[j], keys[j]};
        numels[j] = ms[j] * n;
    }

    const LowRankJob job{weights, scale, rounding == 1, PhiloxKeys(rounding_seed), dtype};
    const std::vector<WorkItem> items = split_work(numels, kItemElements);
    uint64_t work = 0;
    for (size_t j = 0; j < count; ++j) work += numels[j] * (ranks[j] + 1);
    auto* run_item = &lowrank_item_generic;
#if ZK_HAVE_AVX2_PATH
    if (use_avx2()) run_item = &lowrank_item_avx2;
#endif
    parallel_for_items(items.size(), work, num_threads, [&](size_t i) { run_item(job, items[i]); });
}

}  // namespace zk
