// Splitting many tensors of very different sizes into similar work items for OpenMP.
#pragma once

#include <vector>

#include "common.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace zk {

// Elements per work item: a multiple of every tile so that item boundaries never move a counter;
// 32K elements (128 KiB of fp32) amortize scheduling and keep ~4000 items for OPT-125m, enough
// for dynamic scheduling to balance a few huge tensors against many small ones.
constexpr uint64_t kItemElements = 32 * 1024;

struct WorkItem {
    size_t tensor;
    uint64_t begin;  // element range [begin, end) of the tensor
    uint64_t end;
};

inline std::vector<WorkItem> split_work(const std::vector<uint64_t>& numels, uint64_t granule) {
    std::vector<WorkItem> items;
    for (size_t j = 0; j < numels.size(); ++j)
        for (uint64_t b = 0; b < numels[j]; b += granule)
            items.push_back({j, b, min_of(b + granule, numels[j])});
    return items;
}

// Runs body(item_index) for every item, in parallel when it pays off.
template <class Body>
inline void parallel_for_items(size_t n_items, uint64_t total_elements, int num_threads,
                               const Body& body) {
#ifdef _OPENMP
    // Waking threads costs microseconds: small calls (tests, tiny tensors) stay serial.
    const bool parallel = num_threads > 1 && n_items > 1 && total_elements >= 64 * 1024;
    if (parallel) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
        for (long long i = 0; i < static_cast<long long>(n_items); ++i)
            body(static_cast<size_t>(i));
        return;
    }
#else
    (void)num_threads, (void)total_elements;
#endif
    for (size_t i = 0; i < n_items; ++i) body(i);
}

}  // namespace zk
