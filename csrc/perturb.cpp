// perturb_: t = round(decay * t + D), D = sum_k scale_k * z(seed_k, key, i) summed from 0 in seed
// order, over many tensors in one pass over memory. Per tile of 1024 elements the K seeds' noise
// is summed into a float32 buffer that stays in L1, then each weight is read, added to it once,
// rounded once and stored in the same loop. With applied= (recovery), each seed's noise also feeds a second sum D1 (the
// perturbation the tensor holds now), which is undone before the weight enters (rounding.h,
// recover_unperturbed); without it the kernel has no recovery code at all (template flag).
// With an undo log (docs/undo-log.md) each tile also checks which weights that recovery would not
// give back from the rounded result and appends them to the log; the logging code, too, exists
// only in the instantiations that log (template flag), so the plain pass is unchanged.
// A sharded tensor (index map, docs/backends.md) runs its own instantiations (template flag
// kMapped): its tiles follow its runs and are aligned on the contract index g(i), not on i, so
// the noise still comes from whole vectors of consecutive counters; unmapped tensors take the
// plain instantiations, and a call without maps only those.
// Out of place (source_ptrs): t = round(decay * s + D) reads a source tensor s and writes t, one
// read and one write per element (a virtual probe's perturbed copy of a weight without a clone
// first); only the plain pass (no recovery, no log), where the weight is read in the store loop.
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops.h"
#include "selector_log.h"
#include "undo_log.h"
#include "tile_io.h"
#include "work_items.h"

namespace zk {
namespace {

struct PerturbJob {
    const std::vector<uintptr_t>& ptrs;
    const std::vector<uintptr_t>& sources;  // empty: in place; else tensor j reads sources[j]
    const std::vector<uint32_t>& keys;
    const std::vector<float>& decays;
    std::vector<PhiloxKeys> seed_keys;
    const std::vector<float>& scales;
    const std::vector<float>& applied;  // empty: no recovery
    Dist dist;
    Contract contract;
    int rounding;  // Rounding (rounding.h)
    PhiloxKeys rounding_keys;
    int dtype;
    // Undo log (log_mode != kNoLog): starts[j] is the group-flat index of tensor j's element 0.
    std::vector<uint64_t> starts;
    bool log_count_only;
    int64_t* log_index;
    uintptr_t log_values;  // storage of the tensors' dtype
    uint64_t log_capacity;
    int64_t* log_count;
    std::vector<IndexMap> maps;  // empty: no tensor mapped; else one per tensor
    // Selector logs (selector_log.h): written by this pass / read to recover exactly (applied=).
    SelectorLogRef sel_out, sel_in;
    std::vector<uint64_t> first_blocks;  // per tensor, its first block row
};

enum LogMode : int { kNoLog = 0, kLogWrite = 1, kLogCountOnly = 2 };

// round_store of a tile whose contract indices start at g: a multiple of kTile unless kMapped.
template <class Philox, class Format, bool kMapped, class Value>
ZK_INLINE void store_tile(const Value& value, int n, typename Format::storage* x,
                          const PerturbJob& job, uint32_t key, uint64_t g) {
    if constexpr (kMapped)
        round_store_at<Philox, Format>(value, n, x, job.rounding, job.rounding_keys, key, g);
    else
        round_store<Philox, Format>(value, n, x, job.rounding, job.rounding_keys, key, g);
}

// The undo log's side of one work item: checks every tile, collects the item's lost elements
// (or only counts them) and reserves their slots with one atomic add at the end.
template <class Format>
struct ItemLog {
    using Storage = typename Format::storage;
    std::vector<int64_t> index;  // group-flat
    std::vector<Storage> values;
    int64_t count = 0;           // count-only mode

    // Rounds theta_in + D of one tile (theta_in: the weight, recovered with d1 when kRecover) into
    // a buffer, checks each element, and stores the buffer unless counting only. The tile holds
    // the local elements t .. t + n - 1 (logged as start + t + i), whose contract indices start at
    // g (g == t unless kMapped; stochastic rounding draws at g + i).
    template <class Philox, bool kRecover, bool kMapped>
    void tile(const PerturbJob& job, Storage* xt, int n, uint64_t t, uint64_t g, uint64_t start,
              uint32_t key, float decay, const float* noise_sum, const float* applied_sum) {
        alignas(64) float theta_in[kRecover ? kTile : 1];
        alignas(64) Storage rounded[kTile];
        // Without recovery the weight is read in place: copying the tile first made that copy
        // (for float32 a rep movs) the tile's first, slow touch of memory.
        auto theta = [&](int i) {
            if constexpr (kRecover)
                return theta_in[i];
            else
                return Format::to_float(xt[i]);
        };
        if constexpr (kRecover) recover_tile<Philox, Format>(xt, applied_sum, n, theta_in);
        store_tile<Philox, Format, kMapped>([&](int i) { return decay * theta(i) + noise_sum[i]; },
                                            n, rounded, job, key, g);
        alignas(64) int32_t at[kTile];
        const int n_lost = lost_positions<Format>(theta, rounded, noise_sum, n, at);
        if (job.log_count_only) {
            count += n_lost;
        } else {
            for (int q = 0; q < n_lost; ++q) {
                const int i = at[q];
                index.push_back(static_cast<int64_t>(start + t + i));
                // Without recovery the old pattern itself (keeps NaN payloads, which a conversion
                // through float32 would not), else the recovered grid value.
                if constexpr (kRecover)
                    values.push_back(storage_of<Format>(theta_in[i]));
                else
                    values.push_back(xt[i]);
            }
            std::memcpy(xt, rounded, sizeof(Storage) * n);
        }
    }

    void flush(const PerturbJob& job) {
        if (job.log_count_only) {
            if (count > 0) fetch_add(job.log_count, count);
        } else {
            const int64_t n = static_cast<int64_t>(index.size());
            if (n == 0) return;
            // Entries past the capacity are only counted: the caller sees count > capacity.
            const int64_t first = fetch_add(job.log_count, n);
            const int64_t capacity = static_cast<int64_t>(job.log_capacity);
            auto* out_values = reinterpret_cast<Storage*>(job.log_values);
            for (int64_t m = 0; m < n && first + m < capacity; ++m) {
                job.log_index[first + m] = index[m];
                out_values[first + m] = values[m];
            }
        }
    }
};

struct NoItemLog {};

// The selector logs' side of one work item (an item covers whole blocks): each block runs whole
// (selector_block: recovered exactly from the held log, rounded, its stream logged, stored). An
// unmapped tile is a block; a mapped tensor's block can span several tiles (runs, aligned tiles
// of g), whose sums are gathered here until the block's last tile, since the stream's fields are
// placed by the whole block's classes.
template <class Format>
struct ItemSelectors {
    using Storage = typename Format::storage;
    struct Segment {
        int at, n;   // block positions [at, at + n)
        uint64_t g;  // contract index of position at (stochastic rounding draws there)
    };
    alignas(64) float d[kSelectorBlock], d1[kSelectorBlock];
    Segment segments[kSelectorBlock];
    int n_segments = 0;

    // The tile's local elements [t, t + n) of an item ending at `end`, contract indices from g.
    template <class Philox, bool kRecover, bool kMapped>
    void tile(const PerturbJob& job, Storage* xt, int n, uint64_t t, uint64_t end, uint64_t g,
              size_t tensor, uint32_t key, float decay, const float* noise_sum,
              const float* applied_sum) {
        const uint64_t b = job.first_blocks[tensor] + t / kSelectorBlock;
        if constexpr (!kMapped) {
            selector_block<Philox, Format, kRecover>(
                job.sel_in, job.sel_out, b, xt, n, decay, noise_sum, applied_sum,
                [&](const Storage* theta, Storage* y) {
                    store_tile<Philox, Format, false>(
                        [&](int i) { return decay * Format::to_float(theta[i]) + noise_sum[i]; }, n,
                        y, job, key, g);
                });
        } else {
            const int at = static_cast<int>(t % kSelectorBlock);
            if (at == 0) n_segments = 0;
            std::memcpy(d + at, noise_sum, sizeof(float) * n);
            if constexpr (kRecover) std::memcpy(d1 + at, applied_sum, sizeof(float) * n);
            segments[n_segments++] = {at, n, g};
            const int length = static_cast<int>(min_of<uint64_t>(kSelectorBlock, end - (t - at)));
            if (at + n < length) return;  // the block goes on in the next tile
            selector_block<Philox, Format, kRecover>(
                job.sel_in, job.sel_out, b, xt - at, length, decay, d, d1,
                [&](const Storage* theta, Storage* y) {
                    for (int s = 0; s < n_segments; ++s) {
                        const Segment seg = segments[s];
                        store_tile<Philox, Format, true>(
                            [&](int i) {
                                return decay * Format::to_float(theta[seg.at + i]) + d[seg.at + i];
                            },
                            seg.n, y + seg.at, job, key, seg.g);
                    }
                });
        }
    }
};

// Mapped tiles: zeroes the sums over the counters that cover tile positions [skip, skip + n) of
// the kTile-aligned tile at tile_first (kPerCounter: 4 gaussian, 128 rademacher) and adds the K
// seeds' noise there: D into noise_sum and, when recovering, D1 into applied_sum.
template <class Philox, bool kRecover, int kPerCounter>
inline void accumulate_covering(const PerturbJob& job, uint32_t key, uint64_t tile_first, int skip,
                                int n, float* noise_sum, float* applied_sum) {
    const CoveringCounters c = covering_counters(tile_first, skip, n, kPerCounter);
    // Never more than a tile's counters (says so to the compiler, which sizes the buffers by it).
    const int n_blocks = min_of(c.n_blocks, kTile / kPerCounter);
    float* sum = noise_sum + c.at;
    float* sum_applied = applied_sum + (kRecover ? c.at : 0);
    for (int i = 0; i < n_blocks * kPerCounter; ++i) sum[i] = 0.0f;
    if constexpr (kRecover)
        for (int i = 0; i < n_blocks * kPerCounter; ++i) sum_applied[i] = 0.0f;
    for (size_t k = 0; k < job.seed_keys.size(); ++k) {
        const float scale = job.scales[k];
        if constexpr (kPerCounter == kGaussianPerCounter) {
            if constexpr (kRecover)
                gaussian_accumulate_pair<Philox>(job.seed_keys[k], key, c.first_block, n_blocks,
                                                 job.contract, job.applied[k], sum_applied, scale,
                                                 sum);
            else
                gaussian_accumulate<Philox>(job.seed_keys[k], key, c.first_block, n_blocks,
                                            job.contract, scale, sum);
        } else {
            if constexpr (kRecover)
                rademacher_accumulate_pair<Philox>(job.seed_keys[k], key, c.first_block, n_blocks,
                                                   job.applied[k], sum_applied, scale, sum);
            else
                rademacher_accumulate<Philox>(job.seed_keys[k], key, c.first_block, n_blocks,
                                              scale, sum);
        }
    }
}

template <class Philox, class Format, bool kRecover, bool kLog, bool kMapped, bool kSel>
inline void perturb_range(const PerturbJob& job, const WorkItem& item) {
    auto* x = reinterpret_cast<typename Format::storage*>(job.ptrs[item.tensor]);
    const uint32_t key = job.keys[item.tensor];
    const float decay = job.decays[item.tensor];
    alignas(64) float noise_sum[kTile];                    // D
    alignas(64) float applied_sum[kRecover ? kTile : 1];  // D1, only when recovering
    alignas(64) float recovered[kRecover && !kLog ? kTile : 1];  // theta, recovered from D1
    std::conditional_t<kLog, ItemLog<Format>, NoItemLog> log;
    std::conditional_t<kSel, ItemSelectors<Format>, NoItemLog> selectors;
    using Storage = typename Format::storage;
    const Storage* source = job.sources.empty()
                                ? nullptr
                                : reinterpret_cast<const Storage*>(job.sources[item.tensor]);
    for (uint64_t t = item.begin; t < item.end;) {
        // The tile: local elements [t, t + n), contract indices [g, g + n). Unmapped, g = t and
        // items start at multiples of kTile. Mapped, the tile stays inside one run and one
        // kTile-aligned tile of g, and the sums sit at their place in that aligned tile (skip):
        // the counters are those of an unsharded pass, and a run's unaligned head and tail only
        // cost the rest of their first and last counter.
        uint64_t g = t;
        int n = static_cast<int>(min_of<uint64_t>(kTile, item.end - t));
        int skip = 0;
        if constexpr (kMapped) {
            const IndexMap& map = job.maps[item.tensor];
            const uint64_t within = t % map.local_span;
            g = map.offset + (t / map.local_span) * map.global_span + within;
            skip = static_cast<int>(g % kTile);
            n = static_cast<int>(min_of<uint64_t>(kTile - skip,
                                                  min_of(map.local_span - within, item.end - t)));
            if constexpr (kSel)  // a tile stays inside one block of the selector log
                n = min_of(n, static_cast<int>(kSelectorBlock - t % kSelectorBlock));
            if (job.dist == kGaussian)
                accumulate_covering<Philox, kRecover, kGaussianPerCounter>(
                    job, key, g - skip, skip, n, noise_sum, applied_sum);
            else
                accumulate_covering<Philox, kRecover, kRademacherPerCounter>(
                    job, key, g - skip, skip, n, noise_sum, applied_sum);
        } else {
            // Whole tile zeroed: the accumulators write up to a full counter past a short last
            // tile.
            for (int i = 0; i < kTile; ++i) noise_sum[i] = 0.0f;
            if constexpr (kRecover)
                for (int i = 0; i < kTile; ++i) applied_sum[i] = 0.0f;
            for (size_t k = 0; k < job.seed_keys.size(); ++k) {
                const float scale = job.scales[k];
                if (job.dist == kGaussian) {
                    if constexpr (kRecover)
                        gaussian_accumulate_pair<Philox>(job.seed_keys[k], key, t / 4, (n + 3) / 4,
                                                         job.contract, job.applied[k], applied_sum,
                                                         scale, noise_sum);
                    else
                        gaussian_accumulate<Philox>(job.seed_keys[k], key, t / 4, (n + 3) / 4,
                                                    job.contract, scale, noise_sum);
                } else {
                    if constexpr (kRecover)
                        rademacher_accumulate_pair<Philox>(job.seed_keys[k], key, t / 128,
                                                           (n + 127) / 128, job.applied[k],
                                                           applied_sum, scale, noise_sum);
                    else
                        rademacher_accumulate<Philox>(job.seed_keys[k], key, t / 128,
                                                      (n + 127) / 128, scale, noise_sum);
                }
            }
        }
        const float* d = noise_sum + skip;
        const float* d1 = applied_sum + (kRecover ? skip : 0);
        // The weight enters only now, read, added to D once and rounded in one loop.
        typename Format::storage* xt = x + t;
        if constexpr (kSel) {
            selectors.template tile<Philox, kRecover, kMapped>(job, xt, n, t, item.end, g,
                                                               item.tensor, key, decay, d, d1);
        } else if constexpr (kLog) {
            log.template tile<Philox, kRecover, kMapped>(job, xt, n, t, g, job.starts[item.tensor],
                                                         key, decay, d, d1);
        } else if constexpr (kRecover) {
            recover_tile<Philox, Format>(xt, d1, n, recovered);
            store_tile<Philox, Format, kMapped>([&](int i) { return decay * recovered[i] + d[i]; },
                                                n, xt, job, key, g);
        } else if (source != nullptr) {  // out of place: the source's tile, only read
            const Storage* st = source + t;
            store_tile<Philox, Format, kMapped>(
                [&](int i) { return decay * Format::to_float(st[i]) + d[i]; }, n, xt, job, key, g);
        } else {
            store_tile<Philox, Format, kMapped>(
                [&](int i) { return decay * Format::to_float(xt[i]) + d[i]; }, n, xt, job, key, g);
        }
        t += n;
    }
    if constexpr (kLog) log.flush(job);
}

template <class Philox, bool kLog, bool kMapped, bool kSel>
inline void perturb_item(const PerturbJob& job, const WorkItem& item) {
    const bool recover = !job.applied.empty();
    switch (job.dtype) {
        case kFloat32:
            recover ? perturb_range<Philox, Float32Format, true, kLog, kMapped, kSel>(job, item)
                    : perturb_range<Philox, Float32Format, false, kLog, kMapped, kSel>(job, item);
            break;
        case kBFloat16:
            recover ? perturb_range<Philox, BFloat16Format, true, kLog, kMapped, kSel>(job, item)
                    : perturb_range<Philox, BFloat16Format, false, kLog, kMapped, kSel>(job, item);
            break;
        default:
            recover ? perturb_range<Philox, Float16Format, true, kLog, kMapped, kSel>(job, item)
                    : perturb_range<Philox, Float16Format, false, kLog, kMapped, kSel>(job, item);
            break;
    }
}

// One flattened entry point per ISA, logging or not (both log modes share one: a count-only
// pass differs in a branch per tile) and mapped or not, so the plain pass's code is what it was.
template <bool kLog, bool kMapped, bool kSel>
ZK_FLATTEN void perturb_item_generic(const PerturbJob& job, const WorkItem& item) {
    perturb_item<PhiloxGeneric, kLog, kMapped, kSel>(job, item);
}

#if ZK_HAVE_AVX2_PATH
template <bool kLog, bool kMapped, bool kSel>
ZK_TARGET_AVX2 ZK_FLATTEN void perturb_item_avx2(const PerturbJob& job, const WorkItem& item) {
    perturb_item<PhiloxAvx2, kLog, kMapped, kSel>(job, item);
}
#endif

using ItemKernel = void (*)(const PerturbJob&, const WorkItem&);

template <bool kLog, bool kMapped, bool kSel = false>
ItemKernel item_kernel() {
#if ZK_HAVE_AVX2_PATH
    if (use_avx2()) return &perturb_item_avx2<kLog, kMapped, kSel>;
#endif
    return &perturb_item_generic<kLog, kMapped, kSel>;
}

}  // namespace

void perturb(const std::vector<uintptr_t>& ptrs, const std::vector<uint64_t>& numels,
             const std::vector<uint32_t>& keys, const std::vector<float>& decays, int dtype,
             const std::vector<uint64_t>& seeds, const std::vector<float>& scales,
             const std::vector<float>& applied, int dist, int rounding, uint64_t rounding_seed,
             int num_threads, uintptr_t log_index_ptr, uintptr_t log_values_ptr,
             uint64_t log_capacity, uintptr_t log_count_ptr, int log_mode,
             const std::vector<uint64_t>& index_offsets,
             const std::vector<uint64_t>& index_local_spans,
             const std::vector<uint64_t>& index_global_spans, int contract,
             const std::vector<uint64_t>& selector_out, const std::vector<uint64_t>& selector_in,
             const std::vector<uintptr_t>& source_ptrs) {
    if (numels.size() != ptrs.size() || keys.size() != ptrs.size() || decays.size() != ptrs.size())
        throw std::invalid_argument("perturb: ptrs, numels, keys and decays must have equal lengths");
    if (!source_ptrs.empty() && source_ptrs.size() != ptrs.size())
        throw std::invalid_argument("perturb: source_ptrs must be empty or have one per tensor");
    if (!source_ptrs.empty() && (!applied.empty() || log_mode != 0 || !selector_out.empty() ||
                                 !selector_in.empty()))
        throw std::invalid_argument("perturb: source_ptrs excludes applied and the logs");
    if (seeds.size() != scales.size())
        throw std::invalid_argument("perturb: seeds and scales must have equal lengths");
    if (!applied.empty() && applied.size() != seeds.size())
        throw std::invalid_argument("perturb: applied must be empty or have one value per seed");
    if (dtype < kFloat32 || dtype > kFloat16) throw std::invalid_argument("perturb: bad dtype code");
    if (dist != kGaussian && dist != kRademacher) throw std::invalid_argument("perturb: bad dist code");
    if (contract != kContractV1 && contract != kContractV2)
        throw std::invalid_argument("perturb: contract must be 1 or 2");
    if (rounding != kRoundNearest && rounding != kRoundStochastic &&
        rounding != kRoundStochasticInteger)
        throw std::invalid_argument("perturb: bad rounding code");
    if (log_mode < kNoLog || log_mode > kLogCountOnly)
        throw std::invalid_argument("perturb: bad log_mode");
    if (log_mode != kNoLog && log_count_ptr == 0)
        throw std::invalid_argument("perturb: a log needs log_count_ptr");
    if (log_mode == kLogWrite && log_capacity > 0 && (log_index_ptr == 0 || log_values_ptr == 0))
        throw std::invalid_argument("perturb: a log with capacity needs index and values");
    // The log's check (undo_log.h, lost_positions) assumes what the pass wrote is
    // round_nearest(theta + D): no decay, no stochastic rounding.
    if (log_mode != kNoLog) {
        if (rounding != 0) throw std::invalid_argument("perturb: a log needs nearest rounding");
        for (float decay : decays)
            if (decay != 1.0f) throw std::invalid_argument("perturb: a log needs decays of 1");
    }

    std::vector<IndexMap> maps =
        index_maps_from("perturb", numels, index_offsets, index_local_spans, index_global_spans);
    const SelectorLogRef sel_out = selector_log_ref(selector_out, true, "perturb");
    const SelectorLogRef sel_in = selector_log_ref(selector_in, false, "perturb");
    const bool sel = sel_out.active() || sel_in.active();
    if (sel && log_mode != kNoLog)
        throw std::invalid_argument("perturb: an undo log and a selector log are exclusive");
    if (sel_in.active() && applied.empty())
        throw std::invalid_argument("perturb: selector_in needs applied");
    if (sel_out.active()) {
        if (rounding != 0) throw std::invalid_argument("perturb: a log needs nearest rounding");
        for (float decay : decays)
            if (decay != 1.0f) throw std::invalid_argument("perturb: a log needs decays of 1");
    }

    PerturbJob job{ptrs, source_ptrs, keys, decays, {}, scales, applied, static_cast<Dist>(dist),
                   static_cast<Contract>(contract), rounding, PhiloxKeys(rounding_seed), dtype, {}, log_mode == kLogCountOnly,
                   reinterpret_cast<int64_t*>(log_index_ptr), log_values_ptr, log_capacity,
                   reinterpret_cast<int64_t*>(log_count_ptr), std::move(maps), sel_out, sel_in,
                   {}};
    for (uint64_t seed : seeds) job.seed_keys.emplace_back(seed);
    uint64_t blocks = 0;
    for (uint64_t n : numels) {
        job.first_blocks.push_back(blocks);
        blocks += (n + kSelectorBlock - 1) / kSelectorBlock;
    }

    uint64_t total = 0;
    for (uint64_t n : numels) {
        job.starts.push_back(total);
        total += n;
    }
    const uint64_t work = total * (seeds.size() > 0 ? seeds.size() : 1);
    if (sel) {
        // Items of whole blocks (local multiples of kItemElements), mapped tensors included:
        // each block's bits are written or read by one thread, in element order.
        const std::vector<WorkItem> items = split_work(numels, kItemElements);
        const ItemKernel run_plain = item_kernel<false, false, true>();
        const ItemKernel run_mapped = item_kernel<false, true, true>();
        parallel_for_items(items.size(), work, num_threads, [&](size_t i) {
            const bool mapped = !job.maps.empty() && job.maps[items[i].tensor].mapped;
            (mapped ? run_mapped : run_plain)(job, items[i]);
        });
        return;
    }
    if (job.maps.empty()) {
        const std::vector<WorkItem> items = split_work(numels, kItemElements);
        const ItemKernel run_item =
            log_mode == kNoLog ? item_kernel<false, false>() : item_kernel<true, false>();
        parallel_for_items(items.size(), work, num_threads,
                           [&](size_t i) { run_item(job, items[i]); });
        return;
    }
    // Mapped tensors take the mapped kernel item by item; the others the plain one.
    const std::vector<WorkItem> items = split_work(numels, job.maps, kItemElements);
    const ItemKernel run_plain =
        log_mode == kNoLog ? item_kernel<false, false>() : item_kernel<true, false>();
    const ItemKernel run_mapped =
        log_mode == kNoLog ? item_kernel<false, true>() : item_kernel<true, true>();
    parallel_for_items(items.size(), work, num_threads, [&](size_t i) {
        (job.maps[items[i].tensor].mapped ? run_mapped : run_plain)(job, items[i]);
    });
}

}  // namespace zk
