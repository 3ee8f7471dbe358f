// Splitting many tensors of very different sizes into similar work items for OpenMP.
#pragma once

#include <stdexcept>
#include <string>
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

// The index map of a shard (docs/backends.md): local flat element i of the tensor is element
// g(i) = offset + (i / local_span) * global_span + i % local_span of the unsharded tensor, the
// index the noise contract uses. A run is local_span consecutive local elements, contiguous in g.
struct IndexMap {
    uint64_t offset = 0;
    uint64_t local_span = 1;   // elements per run
    uint64_t global_span = 1;  // distance in g between the starts of consecutive runs
    bool mapped = false;       // false: g(i) = i, the tensor takes the unmapped kernels

    uint64_t global_of(uint64_t i) const {
        return offset + (i / local_span) * global_span + i % local_span;
    }
};

// Per-tensor maps from _C's three lists (all empty: no tensor mapped). Identity entries are
// normalized to mapped = false and a map that is a pure shift (one run, or local_span ==
// global_span) to a single run. Returns an empty vector when no tensor is mapped, so that the
// caller runs exactly its unmapped kernels. Throws std::invalid_argument, naming `op`, for lists
// of the wrong length and for maps that would divide by zero or overflow the index.
inline std::vector<IndexMap> index_maps_from(const char* op, const std::vector<uint64_t>& numels,
                                             const std::vector<uint64_t>& offsets,
                                             const std::vector<uint64_t>& local_spans,
                                             const std::vector<uint64_t>& global_spans) {
    const std::string name(op);
    if (offsets.empty() && local_spans.empty() && global_spans.empty()) return {};
    if (offsets.size() != numels.size() || local_spans.size() != numels.size() ||
        global_spans.size() != numels.size())
        throw std::invalid_argument(name + ": index_offsets, index_local_spans and index_global_"
                                    "spans must be empty or have one value per tensor");
    constexpr uint64_t kMaxIndex = (uint64_t{1} << 63) - 1;
    std::vector<IndexMap> maps(numels.size());
    bool any_mapped = false;
    for (size_t j = 0; j < numels.size(); ++j) {
        const uint64_t numel = numels[j], offset = offsets[j];
        uint64_t local_span = local_spans[j], global_span = global_spans[j];
        const std::string which = " of tensor " + std::to_string(j);
        if (local_span == 0 || local_span > global_span)
            throw std::invalid_argument(name + ": index_local_spans" + which +
                                        " must be in [1, index_global_spans]");
        if (numel == 0) continue;
        if (numel % local_span != 0)
            throw std::invalid_argument(name + ": index_local_spans" + which +
                                        " must divide the tensor's numel");
        if (local_span == global_span || local_span == numel)
            local_span = global_span = numel;  // contiguous in g: one run
        // g(numel - 1) = offset + (runs - 1) * global_span + local_span - 1 < 2^63.
        const uint64_t runs = numel / local_span;
        if (offset > kMaxIndex || local_span - 1 > kMaxIndex - offset ||
            runs - 1 > (kMaxIndex - offset - (local_span - 1)) / global_span)
            throw std::invalid_argument(name + ": index map" + which +
                                        " reaches an element index >= 2^63");
        maps[j] = {offset, local_span, global_span, offset != 0 || local_span != numel};
        any_mapped = any_mapped || maps[j].mapped;
    }
    if (!any_mapped) maps.clear();
    return maps;
}

// split_work with the items of mapped tensors cut where a tile of the contract index would
// otherwise be generated twice: short runs (local_span < granule) are grouped whole, as many as
// fit in a granule; long runs are cut at multiples of `granule` of g (granule: a multiple of
// every tile). maps: empty (split_work's items) or one per tensor.
inline std::vector<WorkItem> split_work(const std::vector<uint64_t>& numels,
                                        const std::vector<IndexMap>& maps, uint64_t granule) {
    if (maps.empty()) return split_work(numels, granule);
    std::vector<WorkItem> items;
    for (size_t j = 0; j < numels.size(); ++j) {
        const IndexMap& map = maps[j];
        const uint64_t numel = numels[j];
        if (!map.mapped) {
            for (uint64_t b = 0; b < numel; b += granule)
                items.push_back({j, b, min_of(b + granule, numel)});
        } else if (map.local_span < granule) {
            const uint64_t step = (granule / map.local_span) * map.local_span;
            for (uint64_t b = 0; b < numel; b += step)
                items.push_back({j, b, min_of(b + step, numel)});
        } else {
            for (uint64_t run = 0; run < numel; run += map.local_span) {
                const uint64_t g = map.global_of(run);
                uint64_t b = run;
                uint64_t e = min_of(run + map.local_span, b + (granule - g % granule));
                while (b < run + map.local_span) {
                    items.push_back({j, b, e});
                    b = e;
                    e = min_of(run + map.local_span, b + granule);
                }
            }
        }
    }
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
