// perturb_: t = round(decay * t + D), D = sum_k scale_k * z(seed_k, key, i) summed from 0 in seed
// order, over many tensors in one pass over memory. Per tile of 1024 elements the K seeds' noise
// is summed into a float32 buffer that stays in L1, then each weight is read, added to it once,
// rounded once and stored in the same loop. With applied= (recovery), each seed's noise also feeds a second sum D1 (the
// perturbation the tensor holds now), which is undone before the weight enters (rounding.h,
// recover_unperturbed); without it the kernel has no recovery code at all (template flag).
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
    const std::vector<float>& applied;  // empty: no recovery
    Dist dist;
    bool stochastic;
    PhiloxKeys rounding_keys;
    int dtype;
};

template <class Philox, class Format, bool kRecover>
inline void perturb_range(const PerturbJob& job, const WorkItem& item) {
    auto* x = reinterpret_cast<typename Format::storage*>(job.ptrs[item.tensor]);
    const uint32_t key = job.keys[item.tensor];
    const float decay = job.decays[item.tensor];
    const size_t n_seeds = job.seed_keys.size();
    alignas(64) float noise_sum[kTile];                    // D
    alignas(64) float applied_sum[kRecover ? kTile : 1];  // D1, only when recovering
    for (uint64_t t = item.begin; t < item.end; t += kTile) {
        const int n = static_cast<int>(min_of<uint64_t>(kTile, item.end - t));
        // Whole tile zeroed: the accumulators write up to a full counter past a short last tile.
        for (int i = 0; i < kTile; ++i) noise_sum[i] = 0.0f;
        if constexpr (kRecover)
            for (int i = 0; i < kTile; ++i) applied_sum[i] = 0.0f;
        for (size_t k = 0; k < n_seeds; ++k) {
            const float scale = job.scales[k];
            if (job.dist == kGaussian) {
                if constexpr (kRecover)
                    gaussian_accumulate_pair<Philox>(job.seed_keys[k], key, t / 4, (n + 3) / 4,
                                                     job.applied[k], applied_sum, scale, noise_sum);
                else
                    gaussian_accumulate<Philox>(job.seed_keys[k], key, t / 4, (n + 3) / 4, scale,
                                                noise_sum);
            } else {
                if constexpr (kRecover)
                    rademacher_accumulate_pair<Philox>(job.seed_keys[k], key, t / 128,
                                                       (n + 127) / 128, job.applied[k],
                                                       applied_sum, scale, noise_sum);
                else
                    rademacher_accumulate<Philox>(job.seed_keys[k], key, t / 128, (n + 127) / 128,
                                                  scale, noise_sum);
            }
        }
        // The weight enters only now, read, added to D once and rounded in one loop.
        typename Format::storage* xt = x + t;
        if constexpr (kRecover) {
            round_store<Philox, Format>(
                [&](int i) {
                    const float theta = recover_unperturbed<Format>(Format::to_float(xt[i]),
                                                                    applied_sum[i]);
                    return decay * theta + noise_sum[i];
                },
                n, xt, job.stochastic, job.rounding_keys, key, t);
        } else {
            round_store<Philox, Format>(
                [&](int i) { return decay * Format::to_float(xt[i]) + noise_sum[i]; }, n, xt,
                job.stochastic, job.rounding_keys, key, t);
        }
    }
}

template <class Philox, class Format>
inline void perturb_format(const PerturbJob& job, const WorkItem& item) {
    if (job.applied.empty())
        perturb_range<Philox, Format, false>(job, item);
    else
        perturb_range<Philox, Format, true>(job, item);
}

template <class Philox>
inline void perturb_item(const PerturbJob& job, const WorkItem& item) {
    switch (job.dtype) {
        case kFloat32: perturb_format<Philox, Float32Format>(job, item); break;
        case kBFloat16: perturb_format<Philox, BFloat16Format>(job, item); break;
        default: perturb_format<Philox, Float16Format>(job, item); break;
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
             const std::vector<uint64_t>& seeds, const std::vector<float>& scales,
             const std::vector<float>& applied, int dist, int rounding, uint64_t rounding_seed,
             int num_threads) {
    if (numels.size() != ptrs.size() || keys.size() != ptrs.size() || decays.size() != ptrs.size())
        throw std::invalid_argument("perturb: ptrs, numels, keys and decays must have equal lengths");
    if (seeds.size() != scales.size())
        throw std::invalid_argument("perturb: seeds and scales must have equal lengths");
    if (!applied.empty() && applied.size() != seeds.size())
        throw std::invalid_argument("perturb: applied must be empty or have one value per seed");
    if (dtype < kFloat32 || dtype > kFloat16) throw std::invalid_argument("perturb: bad dtype code");
    if (dist != kGaussian && dist != kRademacher) throw std::invalid_argument("perturb: bad dist code");
    if (rounding != 0 && rounding != 1) throw std::invalid_argument("perturb: bad rounding code");

    PerturbJob job{ptrs, keys, decays, {}, scales, applied, static_cast<Dist>(dist),
                   rounding == 1, PhiloxKeys(rounding_seed), dtype};
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
