// scatter_perturb: rewrites the elements of an undo log (docs/undo-log.md). Entry e names the
// group-flat element index[e]; with no seeds it gets values[e] back bit for bit, else
// round(decay * values[e] + D) with perturb_'s D and rounding of that element, so that it ends
// exactly as a dense pass starting from values[e] would leave it. Entries are few (a few percent
// of the elements) and scattered, so this is scalar code, one Philox counter per entry and seed,
// parallel over entries. Its noise is bit-identical to the tiles': the same scalar Box-Muller
// (fastmath.h) and the same unfused float32 sums, which is all the AVX2 tile code does too.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "tile_io.h"

namespace zk {
namespace {

struct ScatterJob {
    const std::vector<uintptr_t>& ptrs;
    const std::vector<uint32_t>& keys;
    const std::vector<float>& decays;
    std::vector<uint64_t> starts;  // starts[j]: group-flat index of tensor j's element 0
    uint64_t total;                // elements of all tensors
    const int64_t* index;
    uintptr_t values;              // storage of the tensors' dtype
    std::vector<PhiloxKeys> seed_keys;
    const std::vector<float>& scales;
    Dist dist;
    bool stochastic;
    PhiloxKeys rounding_keys;
};

// The four words of the counter (block lo, block hi, key, stream).
inline void counter_words(const PhiloxKeys& keys, uint64_t block, uint32_t key, uint32_t stream,
                          uint32_t w[4]) {
    w[0] = static_cast<uint32_t>(block);
    w[1] = static_cast<uint32_t>(block >> 32);
    w[2] = key;
    w[3] = stream;
    philox_rounds(keys, w[0], w[1], w[2], w[3]);
}

// scale * z(seed, key, i) exactly as the tiles add it: gaussian_blocks' n_(i % 4) of counter i / 4
// times scale; rademacher_accumulate's +-scale by the sign bit, from bit i % 32 of word
// (i % 128) / 32 of counter i / 128.
inline float noise_term(Dist dist, const PhiloxKeys& keys, uint32_t key, uint64_t i, float scale) {
    uint32_t w[4];
    if (dist == kGaussian) {
        counter_words(keys, i / kGaussianPerCounter, key, kStreamNoise, w);
        const unsigned m = static_cast<unsigned>(i % kGaussianPerCounter);
        float n_cos, n_sin;  // n0, n1 from words 0, 1; n2, n3 from words 2, 3
        box_muller(w[m & 2u], w[(m & 2u) + 1], n_cos, n_sin);
        return scale * ((m & 1u) != 0 ? n_sin : n_cos);
    }
    counter_words(keys, i / kRademacherPerCounter, key, kStreamNoise, w);
    const unsigned lane = static_cast<unsigned>(i % kRademacherPerCounter);
    const uint32_t sign = ((~w[lane / 32] >> (lane % 32)) & 1u) << 31;  // bit set: +1
    return bits_as<float>(bits_as<uint32_t>(scale) ^ sign);
}

// One entry: t_j[i] from the logged value v (storage pattern of the dtype).
template <class Format>
inline void scatter_entry(const ScatterJob& job, size_t j, uint64_t i,
                          typename Format::storage v) {
    auto* x = reinterpret_cast<typename Format::storage*>(job.ptrs[j]);
    if (job.seed_keys.empty()) {
        x[i] = v;  // restore: the bits themselves
        return;
    }
    const uint32_t key = job.keys[j];
    // D from +0.0 in seed order, then added once: perturb_'s noise_sum and value(i).
    float d = 0.0f;
    for (size_t k = 0; k < job.seed_keys.size(); ++k)
        d = d + noise_term(job.dist, job.seed_keys[k], key, i, job.scales[k]);
    const float acc = job.decays[j] * Format::to_float(v) + d;
    if constexpr (std::is_same<Format, Float32Format>::value) {
        x[i] = acc;
    } else if (!job.stochastic) {
        x[i] = static_cast<uint16_t>(Format::bits_from_float(acc));
    } else {
        // round_store's uniform: word i % 4 of counter i / 4 in the rounding stream.
        uint32_t w[4];
        counter_words(job.rounding_keys, i / 4, key, kStreamRounding, w);
        const float u = word_to_uniform(w[i % 4]);
        x[i] = static_cast<uint16_t>(stochastic_round_bits<Format>(acc, u));
    }
}

// Entries [0, used); returns how many had an index outside the tensors (skipped).
template <class Format>
int64_t scatter_entries(const ScatterJob& job, int64_t used, int num_threads) {
    const auto* values = reinterpret_cast<const typename Format::storage*>(job.values);
    int64_t bad = 0;
    auto body = [&](int64_t e) -> int64_t {
        const int64_t g = job.index[e];
        if (g < 0 || static_cast<uint64_t>(g) >= job.total) return 1;
        // The last tensor starting at or before g (empty tensors share a start with the next).
        const size_t j = static_cast<size_t>(
            std::upper_bound(job.starts.begin(), job.starts.end(), static_cast<uint64_t>(g)) -
            job.starts.begin() - 1);
        scatter_entry<Format>(job, j, static_cast<uint64_t>(g) - job.starts[j], values[e]);
        return 0;
    };
#ifdef _OPENMP
    // Waking threads costs microseconds: short logs (and restores, a plain copy) stay serial.
    const int64_t min_entries = job.seed_keys.empty() ? 256 * 1024 : 4096;
    if (num_threads > 1 && used >= min_entries) {
#pragma omp parallel for schedule(static) num_threads(num_threads) reduction(+ : bad)
        for (long long e = 0; e < static_cast<long long>(used); ++e) bad += body(e);
        return bad;
    }
#else
    (void)num_threads;
#endif
    for (int64_t e = 0; e < used; ++e) bad += body(e);
    return bad;
}

}  // namespace

void scatter_perturb(const std::vector<uintptr_t>& ptrs, const std::vector<uint64_t>& numels,
                     const std::vector<uint32_t>& keys, const std::vector<float>& decays, int dtype,
                     uintptr_t index_ptr, uintptr_t values_ptr, uint64_t capacity,
                     uintptr_t count_ptr, const std::vector<uint64_t>& seeds,
                     const std::vector<float>& scales, int dist, int rounding,
                     uint64_t rounding_seed, int num_threads) {
    if (numels.size() != ptrs.size() || keys.size() != ptrs.size() || decays.size() != ptrs.size())
        throw std::invalid_argument(
            "scatter_perturb: ptrs, numels, keys and decays must have equal lengths");
    if (seeds.size() != scales.size())
        throw std::invalid_argument("scatter_perturb: seeds and scales must have equal lengths");
    if (dtype < kFloat32 || dtype > kFloat16)
        throw std::invalid_argument("scatter_perturb: bad dtype code");
    if (dist != kGaussian && dist != kRademacher)
        throw std::invalid_argument("scatter_perturb: bad dist code");
    if (rounding != 0 && rounding != 1)
        throw std::invalid_argument("scatter_perturb: bad rounding code");
    if (count_ptr == 0) throw std::invalid_argument("scatter_perturb: count_ptr is null");

    // count may exceed the capacity (an overflowed log): only the stored entries exist.
    const int64_t count = *reinterpret_cast<const int64_t*>(count_ptr);
    const int64_t used = count <= 0 ? 0 : static_cast<int64_t>(min_of<uint64_t>(count, capacity));
    if (used == 0) return;
    if (index_ptr == 0 || values_ptr == 0)
        throw std::invalid_argument("scatter_perturb: entries need index and values");

    ScatterJob job{ptrs, keys, decays, {}, 0, reinterpret_cast<const int64_t*>(index_ptr),
                   values_ptr, {}, scales, static_cast<Dist>(dist), rounding == 1,
                   PhiloxKeys(rounding_seed)};
    for (uint64_t n : numels) {
        job.starts.push_back(job.total);
        job.total += n;
    }
    for (uint64_t seed : seeds) job.seed_keys.emplace_back(seed);

    int64_t bad = 0;
    switch (dtype) {
        case kFloat32: bad = scatter_entries<Float32Format>(job, used, num_threads); break;
        case kBFloat16: bad = scatter_entries<BFloat16Format>(job, used, num_threads); break;
        default: bad = scatter_entries<Float16Format>(job, used, num_threads); break;
    }
    if (bad > 0)
        throw std::invalid_argument("scatter_perturb: " + std::to_string(bad) +
                                    " log indices outside the tensors were skipped");
}

}  // namespace zk
