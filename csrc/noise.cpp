// noise: out[j] = z(seed, key, offset + j). Tiles are aligned on the absolute index offset + j,
// so any offset (also >= 2^32 blocks) gives the same values as an aligned call.
#include <stdexcept>

#include "ops.h"
#include "work_items.h"

#include "noise_tiles.h"

namespace zk {
namespace {

struct NoiseJob {
    float* out;
    uint64_t offset;
    PhiloxKeys keys;
    uint32_t key;
    Dist dist;
    Contract contract;
};

// Fills out[j] for j in [item.begin, item.end).
template <class Philox>
inline void noise_range(const NoiseJob& job, const WorkItem& item) {
    alignas(64) float z[kTile];
    uint64_t j = item.begin;
    while (j < item.end) {
        const uint64_t i = job.offset + j;
        const uint64_t tile_first = i & ~static_cast<uint64_t>(kTile - 1);
        const uint64_t skip = i - tile_first;
        const uint64_t count = min_of<uint64_t>(kTile - skip, item.end - j);
        noise_tile<Philox>(job.dist, job.contract, job.keys, job.key, tile_first, z);
        for (uint64_t c = 0; c < count; ++c) job.out[j + c] = z[skip + c];
        j += count;
    }
}

ZK_FLATTEN void noise_item_generic(const NoiseJob& job, const WorkItem& item) {
    noise_range<PhiloxGeneric>(job, item);
}

#if ZK_HAVE_AVX2_PATH
ZK_TARGET_AVX2 ZK_FLATTEN void noise_item_avx2(const NoiseJob& job, const WorkItem& item) {
    noise_range<PhiloxAvx2>(job, item);
}
#endif

// Contract v2 Box-Muller of given words, one clone per ISA (normal_pairs_v2).
ZK_FLATTEN void normal_pairs_v2_generic(const uint32_t* w_radius, const uint32_t* w_angle,
                                        float* out, uint64_t n) {
    for (uint64_t q = 0; q < n; ++q)
        box_muller_v2<FmaPortable>(w_radius[q], w_angle[q], out[2 * q], out[2 * q + 1]);
}

#if ZK_HAVE_AVX2_PATH
ZK_TARGET_AVX2 ZK_FLATTEN void normal_pairs_v2_avx2(const uint32_t* w_radius,
                                                    const uint32_t* w_angle, float* out,
                                                    uint64_t n) {
    for (uint64_t q = 0; q < n; ++q)
        box_muller_v2<FmaHardware>(w_radius[q], w_angle[q], out[2 * q], out[2 * q + 1]);
}
#endif

}  // namespace

void normal_pairs_v2(uintptr_t w_radius_ptr, uintptr_t w_angle_ptr, uintptr_t out_ptr,
                     uint64_t n) {
    auto* run = &normal_pairs_v2_generic;
#if ZK_HAVE_AVX2_PATH
    if (use_avx2()) run = &normal_pairs_v2_avx2;
#endif
    run(reinterpret_cast<const uint32_t*>(w_radius_ptr), reinterpret_cast<const uint32_t*>(w_angle_ptr),
        reinterpret_cast<float*>(out_ptr), n);
}

void noise(uintptr_t out_ptr, uint64_t numel, uint64_t seed, uint32_t key, uint64_t offset, int dist,
           int num_threads, int contract) {
    if (dist < kGaussian || dist > kUniform) throw std::invalid_argument("noise: bad dist code");
    if (contract != kContractV1 && contract != kContractV2)
        throw std::invalid_argument("noise: contract must be 1 or 2");
    if (numel == 0) return;
    if (offset > UINT64_MAX - (numel - 1))
        throw std::invalid_argument("noise: offset + numel exceeds 2^64");
    const NoiseJob job{reinterpret_cast<float*>(out_ptr), offset, PhiloxKeys(seed), key,
                       static_cast<Dist>(dist), static_cast<Contract>(contract)};
    // Items split the output; interior item boundaries fall on multiples of kItemElements of
    // the absolute index, hence on tile boundaries, so no tile is generated twice.
    std::vector<WorkItem> items;
    const uint64_t lead = (kItemElements - offset % kItemElements) % kItemElements;
    uint64_t begin = 0;
    uint64_t end = min_of(numel, lead == 0 ? kItemElements : lead);
    while (begin < numel) {
        items.push_back({0, begin, end});
        begin = end;
        end = numel - begin > kItemElements ? begin + kItemElements : numel;
    }
    auto* run_item = &noise_item_generic;
#if ZK_HAVE_AVX2_PATH
    if (use_avx2()) run_item = &noise_item_avx2;
#endif
    parallel_for_items(items.size(), numel, num_threads, [&](size_t i) { run_item(job, items[i]); });
}

}  // namespace zk
