// lowrank_scatter: rewrites the elements of a low-rank pass's undo log (docs/undo-log.md). Entry e
// names the group-flat element index[e] = start_j + row * n_j + col; without taus it gets
// values[e] back bit for bit, else round(decay_j * values[e] + scale * P[row, col]) with the dense
// pass's P (lowrank.h: the same float32 products and k order) and rounding of that element, so it
// ends exactly as lowrank_perturb would leave it starting from values[e].
//
// Entries are scattered over the weights: each gets its own O(r) dot product (U's row and V's row
// are contiguous) and, with stochastic rounding, its own Philox counter. A log holds a few percent
// of the elements, so plain scalar code in an OpenMP loop is enough.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "fastmath.h"
#include "lowrank.h"
#include "ops.h"
#include "philox.h"
#include "rounding.h"

namespace zk {
namespace {

struct ScatterWeight {
    uintptr_t w;
    uint64_t n, r;
    const float* u;    // m x r
    const float* v;    // n x r
    const float* tau;  // r, or null (bit copy)
    float decay;
    uint32_t key;
};

struct ScatterJob {
    std::vector<ScatterWeight> weights;
    std::vector<uint64_t> starts;  // starts[j]: group-flat index of W_j[0, 0]; starts[T] = total
    const int64_t* index;
    uintptr_t values;              // storage of the weights' dtype
    float scale;
    bool copy;
    int rounding;  // Rounding (rounding.h)
    PhiloxKeys rounding_keys;
};

// The stochastic-rounding uniform of element i of the weight with `key`: word i % 4 of counter
// (i / 4 lo, i / 4 hi, key, stream 1), as uniform_blocks gives it to the dense pass.
inline float rounding_uniform_at(const PhiloxKeys& keys, uint32_t key, uint64_t i) {
    const uint64_t block = i >> 2;
    uint32_t w[4] = {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), key,
                     kStreamRounding};
    philox_rounds(keys, w[0], w[1], w[2], w[3]);
    return word_to_uniform(w[i & 3u]);
}

// Contract 3's 16 random bits of element i: half i % 2 of word (i % 8) / 2 of counter
// (i / 8 lo, i / 8 hi, key, stream 1), as round_store_at gives them to the dense pass.
inline uint32_t rounding_bits_at(const PhiloxKeys& keys, uint32_t key, uint64_t i) {
    const uint64_t block = i >> 3;
    uint32_t w[4] = {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), key,
                     kStreamRounding};
    philox_rounds(keys, w[0], w[1], w[2], w[3]);
    return (w[(i >> 1) & 3u] >> ((i & 1u) * 16u)) & 0xFFFFu;
}

// Entry e; returns false for an index outside the weights (skipped).
template <class Format>
inline bool scatter_entry(const ScatterJob& job, int64_t e) {
    using Storage = typename Format::storage;
    const int64_t g = job.index[e];
    if (g < 0 || static_cast<uint64_t>(g) >= job.starts.back()) return false;
    const uint64_t flat = static_cast<uint64_t>(g);
    // the last weight starting at or before g
    const size_t j = static_cast<size_t>(
        std::upper_bound(job.starts.begin(), job.starts.end(), flat) - job.starts.begin() - 1);
    const ScatterWeight& sw = job.weights[j];
    const uint64_t i = flat - job.starts[j];
    Storage* target = reinterpret_cast<Storage*>(sw.w) + i;
    const Storage value = reinterpret_cast<const Storage*>(job.values)[e];
    if (job.copy) {  // restore: the bits themselves
        *target = value;
        return true;
    }
    const uint64_t row = i / sw.n, col = i % sw.n;
    const float p = lowrank_element(sw.u + row * sw.r, sw.v + col * sw.r, sw.tau, sw.r);
    // The dense pass's decay * theta + D, D = scale * P: two products and a sum, unfused.
    const float acc = sw.decay * Format::to_float(value) + job.scale * p;
    if constexpr (std::is_same<Format, Float32Format>::value) {
        *target = acc;
    } else if (job.rounding == kRoundNearest) {
        *target = static_cast<uint16_t>(Format::bits_from_float(acc));
    } else if (job.rounding == kRoundStochasticInteger) {
        const uint32_t random16 = rounding_bits_at(job.rounding_keys, sw.key, i);
        *target = static_cast<uint16_t>(integer_stochastic_round_bits<Format>(acc, random16));
    } else {
        const float u = rounding_uniform_at(job.rounding_keys, sw.key, i);
        *target = static_cast<uint16_t>(stochastic_round_bits<Format>(acc, u));
    }
    return true;
}

// Entries [0, used); returns how many had an index outside the weights.
template <class Format>
int64_t scatter_entries(const ScatterJob& job, int64_t used, int num_threads) {
    int64_t bad = 0;
#ifdef _OPENMP
    // Waking threads costs microseconds: short logs (and restores, a plain copy) stay serial.
    const int64_t min_entries = job.copy ? 256 * 1024 : 8192;
    if (num_threads > 1 && used >= min_entries) {
#pragma omp parallel for schedule(static) num_threads(num_threads) reduction(+ : bad)
        for (long long e = 0; e < static_cast<long long>(used); ++e)
            bad += scatter_entry<Format>(job, e) ? 0 : 1;
        return bad;
    }
#else
    (void)num_threads;
#endif
    for (int64_t e = 0; e < used; ++e) bad += scatter_entry<Format>(job, e) ? 0 : 1;
    return bad;
}

}  // namespace

void lowrank_scatter(const std::vector<uintptr_t>& w_ptrs, const std::vector<uint64_t>& ms,
                     const std::vector<uint64_t>& ns, const std::vector<uint64_t>& ranks,
                     const std::vector<uintptr_t>& u_ptrs, const std::vector<uintptr_t>& v_ptrs,
                     const std::vector<uintptr_t>& tau_ptrs, const std::vector<float>& decays,
                     float scale, const std::vector<uint32_t>& keys, int dtype,
                     uintptr_t index_ptr, uintptr_t values_ptr, uint64_t capacity,
                     uintptr_t count_ptr, int rounding, uint64_t rounding_seed, int num_threads) {
    const size_t count = w_ptrs.size();
    for (size_t len : {ms.size(), ns.size(), ranks.size(), u_ptrs.size(), v_ptrs.size(),
                       decays.size(), keys.size()})
        if (len != count)
            throw std::invalid_argument("lowrank_scatter: all per-weight lists must have equal lengths");
    const bool copy = tau_ptrs.empty();
    if (!copy && tau_ptrs.size() != count)
        throw std::invalid_argument("lowrank_scatter: tau_ptrs must be empty or one per weight");
    if (dtype < kFloat32 || dtype > kFloat16)
        throw std::invalid_argument("lowrank_scatter: bad dtype code");
    if (rounding != kRoundNearest && rounding != kRoundStochastic &&
        rounding != kRoundStochasticInteger)
        throw std::invalid_argument("lowrank_scatter: bad rounding code");
    for (size_t j = 0; j < count; ++j)
        if (ranks[j] == 0) throw std::invalid_argument("lowrank_scatter: rank must be >= 1");
    if (count_ptr == 0) throw std::invalid_argument("lowrank_scatter: count_ptr is null");

    // count may exceed the capacity (an overflowed log): only the stored entries exist.
    const int64_t logged = *reinterpret_cast<const int64_t*>(count_ptr);
    const int64_t used = logged <= 0 ? 0 : static_cast<int64_t>(min_of<uint64_t>(logged, capacity));
    if (used == 0) return;
    if (index_ptr == 0 || values_ptr == 0)
        throw std::invalid_argument("lowrank_scatter: entries need index and values");

    ScatterJob job{{}, {}, reinterpret_cast<const int64_t*>(index_ptr), values_ptr, scale, copy,
                   rounding, PhiloxKeys(rounding_seed)};
    uint64_t total = 0;
    for (size_t j = 0; j < count; ++j) {
        job.weights.push_back({w_ptrs[j], ns[j], ranks[j],
                               reinterpret_cast<const float*>(u_ptrs[j]),
                               reinterpret_cast<const float*>(v_ptrs[j]),
                               copy ? nullptr : reinterpret_cast<const float*>(tau_ptrs[j]),
                               decays[j], keys[j]});
        job.starts.push_back(total);
        total += ms[j] * ns[j];
    }
    job.starts.push_back(total);

    int64_t bad = 0;
    switch (dtype) {
        case kFloat32: bad = scatter_entries<Float32Format>(job, used, num_threads); break;
        case kBFloat16: bad = scatter_entries<BFloat16Format>(job, used, num_threads); break;
        default: bad = scatter_entries<Float16Format>(job, used, num_threads); break;
    }
    if (bad > 0)
        throw std::invalid_argument("lowrank_scatter: " + std::to_string(bad) +
                                    " log indices outside the weights were skipped");
}

}  // namespace zk
