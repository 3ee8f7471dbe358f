// scatter_perturb: rewrites the elements of an undo log (docs/undo-log.md). Entry e names the
// group-flat element index[e]; with no seeds it gets values[e] back bit for bit, else
// round(decay * values[e] + D) with perturb_'s D and rounding of that element, so that it ends
// exactly as a dense pass starting from values[e] would leave it.
//
// Entries are scattered, so every entry needs Philox counters of its own. They are processed in
// batches whose loops run across the batch's entries (structure of arrays), so that the
// compiler vectorizes Philox, Box-Muller and the rounding over entries as it does over a tile's
// counters: one entry at a time was latency bound (~60 ns per entry and seed). The scalar
// helpers are the tiles' (no fma, same operation order), so the values are bit-identical to
// perturb_'s, on the AVX2 and on the generic path.
//
// With index maps (sharded tensors, docs/backends.md) the log's indices stay local (what the
// logging pass recorded); each entry draws its noise and rounding uniform at g(i), in
// instantiations of their own (template flag), so the unmapped scatter is unchanged.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops.h"
#include "tile_io.h"
#include "work_items.h"

namespace zk {
namespace {

constexpr int kBatch = 256;

struct ScatterJob {
    const std::vector<uintptr_t>& ptrs;
    const std::vector<uint32_t>& keys;
    const std::vector<float>& decays;
    std::vector<uint64_t> starts;  // starts[j]: group-flat index of tensor j's element 0, and
    uint64_t total;                // starts[T] = total, the elements of all tensors
    const int64_t* index;
    uintptr_t values;              // storage of the tensors' dtype
    std::vector<PhiloxKeys> seed_keys;
    const std::vector<float>& scales;
    Dist dist;
    Contract contract;
    int rounding;  // Rounding (rounding.h)
    PhiloxKeys rounding_keys;
    std::vector<IndexMap> maps;    // empty: no tensor mapped; else one per tensor
};

// Words of the counters (block[b] lo, block[b] hi, key[b], stream) for b < n.
inline void philox_at(const PhiloxKeys& keys, const uint64_t* ZK_RESTRICT block,
                      const uint32_t* ZK_RESTRICT key, uint32_t stream, int n,
                      uint32_t* ZK_RESTRICT w0, uint32_t* ZK_RESTRICT w1, uint32_t* ZK_RESTRICT w2,
                      uint32_t* ZK_RESTRICT w3) {
    for (int b = 0; b < n; ++b) {
        uint32_t c0 = static_cast<uint32_t>(block[b]);
        uint32_t c1 = static_cast<uint32_t>(block[b] >> 32);
        uint32_t c2 = key[b], c3 = stream;
        philox_rounds(keys, c0, c1, c2, c3);
        w0[b] = c0;
        w1[b] = c1;
        w2[b] = c2;
        w3[b] = c3;
    }
}

// Word m (0..3) of a counter, by selects rather than indexing, so that loops vectorize.
ZK_INLINE uint32_t word_of(uint32_t m, uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3) {
    const uint32_t low = (m & 1u) != 0 ? w1 : w0;
    const uint32_t high = (m & 1u) != 0 ? w3 : w2;
    return (m & 2u) != 0 ? high : low;
}

// Entries [first, first + n), n <= kBatch; returns how many had an index outside the tensors
// (skipped).
template <class Format, bool kMapped, class Fma>
inline int64_t scatter_batch(const ScatterJob& job, int64_t first, int n) {
    using Storage = typename Format::storage;
    const int64_t* index = job.index + first;
    const Storage* values = reinterpret_cast<const Storage*>(job.values) + first;
    alignas(64) Storage* target[kBatch];  // &t_j[i], null for a bad index
    alignas(64) uint64_t elem[kBatch];    // i
    alignas(64) uint64_t mapped_elem[kMapped ? kBatch : 1];  // g(i)
    alignas(64) uint32_t key[kBatch];
    alignas(64) float decay[kBatch];
    int64_t bad = 0;
    size_t j = 0;
    for (int b = 0; b < n; ++b) {
        const int64_t g = index[b];
        if (g < 0 || static_cast<uint64_t>(g) >= job.total) {
            target[b] = nullptr;
            elem[b] = 0;
            if constexpr (kMapped) mapped_elem[b] = 0;
            key[b] = 0;
            decay[b] = 0.0f;
            ++bad;
            continue;
        }
        // A perturb_ work item logs a run of one tensor, so the previous entry's tensor is the
        // usual answer; else the last tensor starting at or before g (empty ones share a start).
        const uint64_t flat = static_cast<uint64_t>(g);
        if (flat < job.starts[j] || flat >= job.starts[j + 1])
            j = static_cast<size_t>(
                std::upper_bound(job.starts.begin(), job.starts.end(), flat) - job.starts.begin() - 1);
        elem[b] = flat - job.starts[j];
        target[b] = reinterpret_cast<Storage*>(job.ptrs[j]) + elem[b];
        key[b] = job.keys[j];
        decay[b] = job.decays[j];
        if constexpr (kMapped)
            mapped_elem[b] = job.maps[j].mapped ? job.maps[j].global_of(elem[b]) : elem[b];
    }
    if (job.seed_keys.empty()) {  // restore: the bits themselves
        for (int b = 0; b < n; ++b)
            if (target[b] != nullptr) *target[b] = values[b];
        return bad;
    }
    // The contract index of each entry's element: where its noise and rounding are drawn.
    const uint64_t* at = kMapped ? mapped_elem : elem;

    // D from +0.0 in seed order, as perturb_'s noise_sum.
    alignas(64) float d[kBatch];
    alignas(64) uint64_t block[kBatch];
    alignas(64) uint32_t w0[kBatch], w1[kBatch], w2[kBatch], w3[kBatch];
    const bool gaussian = job.dist == kGaussian;
    const int block_shift = gaussian ? 2 : 7;  // 4 or 128 elements per counter
    for (int b = 0; b < n; ++b) {
        d[b] = 0.0f;
        block[b] = at[b] >> block_shift;
    }
    for (size_t k = 0; k < job.seed_keys.size(); ++k) {
        philox_at(job.seed_keys[k], block, key, kStreamNoise, n, w0, w1, w2, w3);
        const float scale = job.scales[k];
        if (gaussian) {
            // gaussian_blocks: n0, n1 from words 0, 1 and n2, n3 from words 2, 3.
            for (int b = 0; b < n; ++b) {
                const uint32_t m = static_cast<uint32_t>(at[b] & 3u);
                const bool pair_23 = (m & 2u) != 0;
                float n_cos, n_sin;
                const uint32_t w_radius = pair_23 ? w2[b] : w0[b];
                const uint32_t w_angle = pair_23 ? w3[b] : w1[b];
                if (job.contract == kContractV2)
                    box_muller_v2<Fma>(w_radius, w_angle, n_cos, n_sin);
                else
                    box_muller(w_radius, w_angle, n_cos, n_sin);
                d[b] = d[b] + scale * ((m & 1u) != 0 ? n_sin : n_cos);
            }
        } else {
            // rademacher_accumulate: +-scale by the sign bit; bit i % 32 of word (i % 128) / 32,
            // set for +1.
            const uint32_t scale_bits = bits_as<uint32_t>(scale);
            for (int b = 0; b < n; ++b) {
                const uint32_t lane = static_cast<uint32_t>(at[b] & 127u);
                const uint32_t word = word_of(lane >> 5, w0[b], w1[b], w2[b], w3[b]);
                const uint32_t sign = ((~word >> (lane & 31u)) & 1u) << 31;
                d[b] = d[b] + bits_as<float>(scale_bits ^ sign);
            }
        }
    }

    // perturb_'s value(i) and round_store, for element i = elem[b] (drawn at at[b]).
    alignas(64) Storage out[kBatch];
    if constexpr (std::is_same<Format, Float32Format>::value) {
        for (int b = 0; b < n; ++b) out[b] = decay[b] * Format::to_float(values[b]) + d[b];
    } else if (job.rounding == kRoundNearest) {
        for (int b = 0; b < n; ++b)
            out[b] = static_cast<uint16_t>(
                Format::bits_from_float(decay[b] * Format::to_float(values[b]) + d[b]));
    } else if (job.rounding == kRoundStochasticInteger) {
        // Contract 3: the 16 bits of half i % 2 of word (i % 8) / 2 of counter i / 8.
        for (int b = 0; b < n; ++b) block[b] = at[b] >> 3;
        philox_at(job.rounding_keys, block, key, kStreamRounding, n, w0, w1, w2, w3);
        for (int b = 0; b < n; ++b) {
            const uint32_t m = static_cast<uint32_t>((at[b] >> 1) & 3u);
            const uint32_t half = static_cast<uint32_t>(at[b] & 1u) * 16u;
            const uint32_t random16 = (word_of(m, w0[b], w1[b], w2[b], w3[b]) >> half) & 0xFFFFu;
            const float acc = decay[b] * Format::to_float(values[b]) + d[b];
            out[b] = static_cast<uint16_t>(integer_stochastic_round_bits<Format>(acc, random16));
        }
    } else {
        // The uniform of word i % 4 of counter i / 4 in the rounding stream.
        for (int b = 0; b < n; ++b) block[b] = at[b] >> 2;
        philox_at(job.rounding_keys, block, key, kStreamRounding, n, w0, w1, w2, w3);
        for (int b = 0; b < n; ++b) {
            const uint32_t m = static_cast<uint32_t>(at[b] & 3u);
            const float u = word_to_uniform(word_of(m, w0[b], w1[b], w2[b], w3[b]));
            const float acc = decay[b] * Format::to_float(values[b]) + d[b];
            out[b] = static_cast<uint16_t>(stochastic_round_bits<Format>(acc, u));
        }
    }
    for (int b = 0; b < n; ++b)
        if (target[b] != nullptr) *target[b] = out[b];
    return bad;
}

// One flattened entry point per ISA, as the other kernels (common.h, ZK_FLATTEN).
template <class Format, bool kMapped>
ZK_FLATTEN int64_t scatter_batch_generic(const ScatterJob& job, int64_t first, int n) {
    return scatter_batch<Format, kMapped, FmaPortable>(job, first, n);
}

#if ZK_HAVE_AVX2_PATH
template <class Format, bool kMapped>
ZK_TARGET_AVX2 ZK_FLATTEN int64_t scatter_batch_avx2(const ScatterJob& job, int64_t first, int n) {
    return scatter_batch<Format, kMapped, FmaHardware>(job, first, n);
}
#endif

// Entries [0, used); returns how many had an index outside the tensors.
template <class Format, bool kMapped>
int64_t scatter_entries(const ScatterJob& job, int64_t used, int num_threads) {
    auto* run_batch = &scatter_batch_generic<Format, kMapped>;
#if ZK_HAVE_AVX2_PATH
    if (use_avx2()) run_batch = &scatter_batch_avx2<Format, kMapped>;
#endif
    const long long n_batches = static_cast<long long>((used + kBatch - 1) / kBatch);
    auto body = [&](long long batch) {
        const int64_t first = static_cast<int64_t>(batch) * kBatch;
        return run_batch(job, first, static_cast<int>(min_of<int64_t>(kBatch, used - first)));
    };
    int64_t bad = 0;
#ifdef _OPENMP
    // Waking threads costs microseconds: short logs (and restores, a plain copy) stay serial.
    const int64_t min_entries = job.seed_keys.empty() ? 256 * 1024 : 8192;
    if (num_threads > 1 && used >= min_entries) {
#pragma omp parallel for schedule(static) num_threads(num_threads) reduction(+ : bad)
        for (long long batch = 0; batch < n_batches; ++batch) bad += body(batch);
        return bad;
    }
#else
    (void)num_threads;
#endif
    for (long long batch = 0; batch < n_batches; ++batch) bad += body(batch);
    return bad;
}

}  // namespace

void scatter_perturb(const std::vector<uintptr_t>& ptrs, const std::vector<uint64_t>& numels,
                     const std::vector<uint32_t>& keys, const std::vector<float>& decays, int dtype,
                     uintptr_t index_ptr, uintptr_t values_ptr, uint64_t capacity,
                     uintptr_t count_ptr, const std::vector<uint64_t>& seeds,
                     const std::vector<float>& scales, int dist, int rounding,
                     uint64_t rounding_seed, int num_threads,
                     const std::vector<uint64_t>& index_offsets,
                     const std::vector<uint64_t>& index_local_spans,
                     const std::vector<uint64_t>& index_global_spans, int contract) {
    if (numels.size() != ptrs.size() || keys.size() != ptrs.size() || decays.size() != ptrs.size())
        throw std::invalid_argument(
            "scatter_perturb: ptrs, numels, keys and decays must have equal lengths");
    if (seeds.size() != scales.size())
        throw std::invalid_argument("scatter_perturb: seeds and scales must have equal lengths");
    if (dtype < kFloat32 || dtype > kFloat16)
        throw std::invalid_argument("scatter_perturb: bad dtype code");
    if (dist != kGaussian && dist != kRademacher)
        throw std::invalid_argument("scatter_perturb: bad dist code");
    if (contract != kContractV1 && contract != kContractV2)
        throw std::invalid_argument("scatter_perturb: contract must be 1 or 2");
    if (rounding != kRoundNearest && rounding != kRoundStochastic &&
        rounding != kRoundStochasticInteger)
        throw std::invalid_argument("scatter_perturb: bad rounding code");
    if (count_ptr == 0) throw std::invalid_argument("scatter_perturb: count_ptr is null");
    std::vector<IndexMap> maps = index_maps_from("scatter_perturb", numels, index_offsets,
                                                 index_local_spans, index_global_spans);

    // count may exceed the capacity (an overflowed log): only the stored entries exist.
    const int64_t count = *reinterpret_cast<const int64_t*>(count_ptr);
    const int64_t used = count <= 0 ? 0 : static_cast<int64_t>(min_of<uint64_t>(count, capacity));
    if (used == 0) return;
    if (index_ptr == 0 || values_ptr == 0)
        throw std::invalid_argument("scatter_perturb: entries need index and values");

    ScatterJob job{ptrs, keys, decays, {}, 0, reinterpret_cast<const int64_t*>(index_ptr),
                   values_ptr, {}, scales, static_cast<Dist>(dist), static_cast<Contract>(contract),
                   rounding,
                   PhiloxKeys(rounding_seed), std::move(maps)};
    for (uint64_t n : numels) {
        job.starts.push_back(job.total);
        job.total += n;
    }
    job.starts.push_back(job.total);
    for (uint64_t seed : seeds) job.seed_keys.emplace_back(seed);

    // A restore (no seeds) copies bits and never looks at the maps.
    const bool mapped = !job.maps.empty() && !job.seed_keys.empty();
    int64_t bad = 0;
    switch (dtype) {
        case kFloat32:
            bad = mapped ? scatter_entries<Float32Format, true>(job, used, num_threads)
                         : scatter_entries<Float32Format, false>(job, used, num_threads);
            break;
        case kBFloat16:
            bad = mapped ? scatter_entries<BFloat16Format, true>(job, used, num_threads)
                         : scatter_entries<BFloat16Format, false>(job, used, num_threads);
            break;
        default:
            bad = mapped ? scatter_entries<Float16Format, true>(job, used, num_threads)
                         : scatter_entries<Float16Format, false>(job, used, num_threads);
            break;
    }
    if (bad > 0)
        throw std::invalid_argument("scatter_perturb: " + std::to_string(bad) +
                                    " log indices outside the tensors were skipped");
}

}  // namespace zk
