// perturb_: t = round(decay * t + sum_k scale_k * z(seed_k, key, i)) over many tensors, in one pass
// over memory. Each tile of 1024 elements is loaded once into a float32 accumulator that stays
// in L1 while the K seeds' noise is added, then rounded once and stored.
#include <stdexcept>

#include "ops.h"
#include "tile_io.h"
#include "work_items.h"

namespace zk {
namespace {

struct PerturbJob {
    const std::vector<uintptr_t>& ptrs;
    const std::vector<uint32_t>& keys;
    const std::vector<float>& decays;
    std::vector<PhiloxKeys> seed_keys;
    const std::vector<float>& scales;
    Dist dist;
    bool stochastic;
    PhiloxKeys rounding_keys;
    int dtype;
};

template <class Philox, class Format>
inline void perturb_range(const PerturbJob& job, const WorkItem& item) {
    auto* x = reinterpret_cast<typename Format::storage*>(job.ptrs[item.tensor]);
    const uint32_t key = job.keys[item.tensor];
    const float decay = job.decays[item.tensor];
    const size_t n_seeds = job.seed_keys.size();
    alignas(64) float acc[kTile];
    for (uint64_t t = item.begin; t < item.end; t += kTile) {
        const int n = static_cast<int>(min_of<uint64_t>(kTile, item.end - t));
        load_decayed<Format>(x + t, n, decay, acc);
        for (int i = n; i < kTile; ++i) acc[i] = 0.0f;  // defined values past a short last tile
        for (size_t k = 0; k < n_seeds; ++k) {
            const float scale = job.scales[k];
            if (job.dist == kGaussian) {
                gaussian_accumulate<Philox>(job.seed_keys[k], key, t / 4, (n + 3) / 4, scale, acc);
            } else {
                rademacher_accumulate<Philox>(job.seed_keys[k], key, t / 128, (n + 127) / 128,
                                              scale, acc);
            }
        }
        store_rounded<Philox, Format>(acc, n, x + t, job.stochastic, job.rounding_keys, key, t);
    }
}

template <class Philox>
inline void perturb_item(const PerturbJob& job, const WorkItem& item) {
    switch (job.dtype) {
        case kFloat32: perturb_range<Philox, Float32Format>(job, item); break;
        case kBFloat16: perturb_range<Philox, BFloat16Format>(job, item); break;
        default: perturb_range<Philox, Float16Format>(job, item); break;
    }
}

ZK_FLATTEN void perturb_item_generic(const PerturbJob& job, const WorkItem& item) {
    perturb_item<PhiloxGeneric>(job, item);
}

#if ZK_HAVE_AVX2_PATH
ZK_TARGET_AVX2 ZK_FLATTEN void perturb_item_avx2(const PerturbJob& job, const WorkItem& item) {
    perturb_item<PhiloxAvx2>(job, item);
}
#endif

}  // namespace

void perturb(const std::vector<uintptr_t>& ptrs, const std::vector<uint64_t>& numels,
             const std::vector<uint32_t>& keys, const std::vector<float>& decays, int dtype,
             const std::vector<uint64_t>& seeds, const std::vector<float>& scales, int dist,
             int rounding, uint64_t rounding_seed, int num_threads) {
    if (numels.size() != ptrs.size() || keys.size() != ptrs.size() || decays.size() != ptrs.size())
        throw std::invalid_argument("perturb: ptrs, numels, keys and decays must have equal lengths");
    if (seeds.size() != scales.size())
        throw std::invalid_argument("perturb: seeds and scales must have equal lengths");
    if (dtype < kFloat32 || dtype > kFloat16) throw std::invalid_argument("perturb: bad dtype code");
    if (dist != kGaussian && dist != kRademacher) throw std::invalid_argument("perturb: bad dist code");
    if (rounding != 0 && rounding != 1) throw std::invalid_argument("perturb: bad rounding code");

    PerturbJob job{ptrs, keys, decays, {}, scales, static_cast<Dist>(dist), rounding == 1,
                   PhiloxKeys(rounding_seed), dtype};
    for (uint64_t seed : seeds) job.seed_keys.emplace_back(seed);

    const std::vector<WorkItem> items = split_work(numels, kItemElements);
    uint64_t total = 0;
    for (uint64_t n : numels) total += n;
    auto* run_item = &perturb_item_generic;
#if ZK_HAVE_AVX2_PATH
    if (use_avx2()) run_item = &perturb_item_avx2;
#endif
    parallel_for_items(items.size(), total * (seeds.size() > 0 ? seeds.size() : 1), num_threads,
                       [&](size_t i) { run_item(job, items[i]); });
}

}  // namespace zk
