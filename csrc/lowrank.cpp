// lowrank_perturb_: W <- round(decay * theta + scale * P), P = U diag(tau) V^T, W (m x n)
// row-major, U (m x r), V (n x r), float32 arithmetic, never materializing the m x n product:
// (V diag(tau))^T is formed once into an r x n scratch so that a row of P is r vectorized axpys
// over contiguous memory (lowrank.h, shared with the scatter). W is walked in flat tiles of its
// row-major index i = row * n + col, which is also the index stochastic rounding uses (stream 1,
// the weight's key). The factors are given (float32 pointers) or drawn by the pass (u_ptr = v_ptr
// = 0): V once per weight, straight into that scratch, and U's rows per work item, with noise():
// the values a caller drawing them would pass, without their (m + n) r floats per weight.
//
// theta is W itself, or with applied taus (recovery) the weight recovered from
// W = round(theta + applied_scale * P(applied_tau)) (rounding.h, recover_unperturbed). With an undo
// log (docs/undo-log.md) each tile also checks which weights a later recovery with this pass's
// D = scale * P(tau) would not give back and appends them to the log. With selector logs
// (selector_log.h, the dense pass's format and blocks) a tile, which is one block of 1024 elements
// of the weight's flat index, recovers exactly from the log of the pass that wrote what it holds
// and logs what the next pass needs. Each exists only in the instantiations that need it
// (template flags): the plain pass's code is what it was.
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "lowrank.h"
#include "ops.h"
#include "selector_log.h"
#include "undo_log.h"
#include "tile_io.h"
#include "work_items.h"

namespace zk {
namespace {

struct LowRankWeight {
    uintptr_t w;
    uint64_t m, n, r;
    const float* u;        // m x r, or null: drawn from the factor stream (drawn_u_rows)
    const float* vt_tau;   // r x n scratch: vt_tau[k * n + col] = V[col, k] * tau[k]
    const float* vt_held;  // the same for the applied taus (recovery only)
    float decay;
    uint32_t key;
    uint64_t start;        // group-flat index of W[0, 0] (the undo log's index)
    uint64_t first_block;  // the selector logs' row of W's first block
    uint64_t u_offset;     // drawn U: the factor stream's index of U[0, 0]
};

enum LogMode : int { kNoLog = 0, kLogWrite = 1, kLogCountOnly = 2 };

struct LowRankJob {
    const std::vector<LowRankWeight>& weights;
    float scale;
    float applied_scale;
    int rounding;  // Rounding (rounding.h): nearest, uniform-based or integer stochastic
    PhiloxKeys rounding_keys;
    int dtype;
    bool log_count_only;
    int64_t* log_index;
    uintptr_t log_values;  // storage of the weights' dtype
    uint64_t log_capacity;
    int64_t* log_count;
    // Selector logs: written by this pass / read to recover exactly (with applied taus).
    SelectorLogRef sel_out, sel_in;
    uint64_t factor_seed;  // drawn factors: noise(factor_seed, key) with these normals
    int factor_contract;
};

// The rows [first, last] of a drawn U (u_offset, r), as noise() gives them, in `rows`.
inline const float* drawn_u_rows(const LowRankJob& job, const LowRankWeight& lw, uint64_t first,
                                 uint64_t last, std::vector<float>& rows) {
    rows.resize((last - first + 1) * lw.r);
    noise(reinterpret_cast<uintptr_t>(rows.data()), rows.size(), job.factor_seed, lw.key,
          lw.u_offset + first * lw.r, kGaussian, 1, job.factor_contract);
    return rows.data();
}

// The undo log's side of one work item: checks every tile, collects the item's lost elements
// (or only counts them) and reserves their slots with one atomic add at the end.
template <class Format>
struct ItemLog {
    using Storage = typename Format::storage;
    std::vector<int64_t> index;  // group-flat
    std::vector<Storage> values;
    int64_t count = 0;           // count-only mode

    // Rounds decay * theta + d of one tile into a buffer, checks each element against d, and
    // stores the buffer unless counting only.
    template <class Philox, bool kRecover>
    void tile(const LowRankJob& job, const LowRankWeight& lw, Storage* xt, int n, uint64_t t,
              const float* theta, const float* d) {
        alignas(64) Storage rounded[kTile];
        round_store<Philox, Format>([&](int i) { return lw.decay * theta[i] + d[i]; }, n, rounded,
                                    job.rounding, job.rounding_keys, lw.key, t);
        alignas(64) int32_t at[kTile];
        const int n_lost =
            lost_positions<Format>([theta](int i) { return theta[i]; }, rounded, d, n, at);
        if (job.log_count_only) {
            count += n_lost;
            return;
        }
        for (int q = 0; q < n_lost; ++q) {
            const int i = at[q];
            index.push_back(static_cast<int64_t>(lw.start + t + i));
            // Without recovery the old pattern itself (keeps NaN payloads), else the recovered
            // grid value.
            if constexpr (kRecover)
                values.push_back(storage_of<Format>(theta[i]));
            else
                values.push_back(xt[i]);
        }
        std::memcpy(xt, rounded, sizeof(Storage) * n);
    }

    void flush(const LowRankJob& job) {
        if (job.log_count_only) {
            if (count > 0) fetch_add(job.log_count, count);
            return;
        }
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
};

struct NoItemLog {};

// The selector logs' side of one tile (== one block: items start at multiples of kTile):
// selector_block. d1: the applied D1 (kRecover), d: this pass's D.
template <class Philox, class Format, bool kRecover>
inline void selector_tile(const LowRankJob& job, const LowRankWeight& lw,
                          typename Format::storage* xt, int n, uint64_t t, const float* d1,
                          const float* d) {
    using Storage = typename Format::storage;
    selector_block<Philox, Format, kRecover>(
        job.sel_in, job.sel_out, lw.first_block + t / kSelectorBlock, xt, n, lw.decay, d, d1,
        [&](const Storage* theta, Storage* y) {
            round_store<Philox, Format>(
                [&](int i) { return lw.decay * Format::to_float(theta[i]) + d[i]; }, n, y,
                job.rounding, job.rounding_keys, lw.key, t);
        });
}

// lowrank_row_segment in the instruction set of the kernel (Philox's type tells which).
template <class Philox>
ZK_INLINE void row_segment(const float* u_row, const float* vt_tau, uint64_t n, uint64_t r,
                           uint64_t col, int count, float* prod) {
#if ZK_HAVE_AVX2_PATH
    if constexpr (std::is_same<Philox, PhiloxAvx2>::value) {
        lowrank_row_segment_avx2(u_row, vt_tau, n, r, col, count, prod);
        return;
    }
#endif
    lowrank_row_segment(u_row, vt_tau, n, r, col, count, prod);
}

template <class Philox, class Format, bool kRecover, bool kLog, bool kSel>
inline void lowrank_range(const LowRankJob& job, const WorkItem& item) {
    using Storage = typename Format::storage;
    const LowRankWeight& lw = job.weights[item.tensor];
    auto* w = reinterpret_cast<Storage*>(lw.w);
    alignas(64) float prod[kTile];                 // P(tau), then D = scale * P(tau)
    alignas(64) float held[kRecover ? kTile : 1];  // P(applied tau), recovery only
    alignas(64) float acc[kTile];                  // plain pass: the result; else theta
    std::conditional_t<kLog, ItemLog<Format>, NoItemLog> log;
    // U's rows: lw.u, or those of this item drawn now (u_rows[row - first_row])
    const uint64_t first_row = item.begin / lw.n;
    std::vector<float> drawn;
    const float* u_rows = lw.u != nullptr ? lw.u + first_row * lw.r
                                          : drawn_u_rows(job, lw, first_row, (item.end - 1) / lw.n,
                                                         drawn);
    for (uint64_t t = item.begin; t < item.end; t += kTile) {
        const int n = static_cast<int>(min_of<uint64_t>(kTile, item.end - t));
        // The tile may span several (short) rows: one segment per row.
        for (int done = 0; done < n;) {
            const uint64_t i = t + done;
            const uint64_t row = i / lw.n, col = i % lw.n;
            const int count = static_cast<int>(min_of<uint64_t>(lw.n - col, n - done));
            const float* u_row = u_rows + (row - first_row) * lw.r;
            row_segment<Philox>(u_row, lw.vt_tau, lw.n, lw.r, col, count, prod + done);
            if constexpr (kRecover)
                row_segment<Philox>(u_row, lw.vt_held, lw.n, lw.r, col, count, held + done);
            done += count;
        }
        Storage* xt = w + t;
        if constexpr (kSel) {
            if constexpr (kRecover)
                for (int c = 0; c < n; ++c) held[c] = job.applied_scale * held[c];
            for (int c = 0; c < n; ++c) prod[c] = job.scale * prod[c];
            selector_tile<Philox, Format, kRecover>(job, lw, xt, n, t, held, prod);
        } else if constexpr (!kRecover && !kLog) {
            load_decayed<Format>(xt, n, lw.decay, acc);
            for (int c = 0; c < n; ++c) acc[c] = acc[c] + job.scale * prod[c];
            store_rounded<Philox, Format>(acc, n, xt, job.rounding, job.rounding_keys, lw.key, t);
        } else {
            float* theta = acc;
            if constexpr (kRecover) {
                for (int c = 0; c < n; ++c) held[c] = job.applied_scale * held[c];
                recover_tile<Philox, Format>(xt, held, n, theta);
            } else {
                for (int c = 0; c < n; ++c) theta[c] = Format::to_float(xt[c]);
            }
            for (int c = 0; c < n; ++c) prod[c] = job.scale * prod[c];
            if constexpr (kLog) {
                log.template tile<Philox, kRecover>(job, lw, xt, n, t, theta, prod);
            } else {
                round_store<Philox, Format>([&](int c) { return lw.decay * theta[c] + prod[c]; },
                                            n, xt, job.rounding, job.rounding_keys, lw.key, t);
            }
        }
    }
    if constexpr (kLog) log.flush(job);
}

template <class Philox, bool kLog, bool kSel>
inline void lowrank_item(const LowRankJob& job, const WorkItem& item) {
    const bool recover = job.weights[item.tensor].vt_held != nullptr;
    switch (job.dtype) {
        case kFloat32:
            recover ? lowrank_range<Philox, Float32Format, true, kLog, kSel>(job, item)
                    : lowrank_range<Philox, Float32Format, false, kLog, kSel>(job, item);
            break;
        case kBFloat16:
            recover ? lowrank_range<Philox, BFloat16Format, true, kLog, kSel>(job, item)
                    : lowrank_range<Philox, BFloat16Format, false, kLog, kSel>(job, item);
            break;
        default:
            recover ? lowrank_range<Philox, Float16Format, true, kLog, kSel>(job, item)
                    : lowrank_range<Philox, Float16Format, false, kLog, kSel>(job, item);
            break;
    }
}

// One flattened entry point per ISA and kind of log (none, undo, selector; common.h, ZK_FLATTEN).
template <bool kLog, bool kSel>
ZK_FLATTEN void lowrank_item_generic(const LowRankJob& job, const WorkItem& item) {
    lowrank_item<PhiloxGeneric, kLog, kSel>(job, item);
}

#if ZK_HAVE_AVX2_PATH
template <bool kLog, bool kSel>
ZK_TARGET_AVX2 ZK_FLATTEN void lowrank_item_avx2(const LowRankJob& job, const WorkItem& item) {
    lowrank_item<PhiloxAvx2, kLog, kSel>(job, item);
}
#endif

using ItemKernel = void (*)(const LowRankJob&, const WorkItem&);

template <bool kLog, bool kSel = false>
ItemKernel item_kernel() {
#if ZK_HAVE_AVX2_PATH
    if (use_avx2()) return &lowrank_item_avx2<kLog, kSel>;
#endif
    return &lowrank_item_generic<kLog, kSel>;
}

}  // namespace

void lowrank_perturb(const std::vector<uintptr_t>& w_ptrs, const std::vector<uint64_t>& ms,
                     const std::vector<uint64_t>& ns, const std::vector<uint64_t>& ranks,
                     const std::vector<uintptr_t>& u_ptrs, const std::vector<uintptr_t>& v_ptrs,
                     const std::vector<uintptr_t>& tau_ptrs, const std::vector<float>& decays,
                     float scale, const std::vector<uint32_t>& keys, int dtype, int rounding,
                     uint64_t rounding_seed, int num_threads,
                     const std::vector<uintptr_t>& applied_tau_ptrs, float applied_scale,
                     uintptr_t log_index_ptr, uintptr_t log_values_ptr, uint64_t log_capacity,
                     uintptr_t log_count_ptr, int log_mode,
                     const std::vector<uint64_t>& selector_out,
                     const std::vector<uint64_t>& selector_in, uint64_t factor_seed,
                     const std::vector<uint64_t>& u_offsets,
                     const std::vector<uint64_t>& v_offsets, int factor_contract) {
    const size_t count = w_ptrs.size();
    for (size_t len : {ms.size(), ns.size(), ranks.size(), u_ptrs.size(), v_ptrs.size(),
                       tau_ptrs.size(), decays.size(), keys.size()})
        if (len != count)
            throw std::invalid_argument("lowrank_perturb: all per-weight lists must have equal lengths");
    const bool recover = !applied_tau_ptrs.empty();
    if (recover && applied_tau_ptrs.size() != count)
        throw std::invalid_argument(
            "lowrank_perturb: applied_tau_ptrs must be empty or have one pointer per weight");
    if (dtype < kFloat32 || dtype > kFloat16)
        throw std::invalid_argument("lowrank_perturb: bad dtype code");
    if (rounding != kRoundNearest && rounding != kRoundStochastic &&
        rounding != kRoundStochasticInteger)
        throw std::invalid_argument("lowrank_perturb: bad rounding code");
    for (size_t j = 0; j < count; ++j)
        if (ranks[j] == 0) throw std::invalid_argument("lowrank_perturb: rank must be >= 1");
    bool any_drawn = false;
    for (size_t j = 0; j < count; ++j) {
        if ((u_ptrs[j] == 0) != (v_ptrs[j] == 0))
            throw std::invalid_argument(
                "lowrank_perturb: u_ptr and v_ptr are both given or both 0");
        any_drawn = any_drawn || u_ptrs[j] == 0;
    }
    if (any_drawn) {
        if (u_offsets.size() != count || v_offsets.size() != count)
            throw std::invalid_argument(
                "lowrank_perturb: drawn factors need one u_offset and v_offset per weight");
        if (factor_contract != kContractV1 && factor_contract != kContractV2)
            throw std::invalid_argument("lowrank_perturb: factor_contract must be 1 or 2");
        // the stream's indices must not wrap: offset + size - 1 <= 2^64 - 1
        const auto wraps = [](uint64_t size, uint64_t offset) {
            return size > 0 && size - 1 > UINT64_MAX - offset;
        };
        for (size_t j = 0; j < count; ++j)
            if (u_ptrs[j] == 0 && (wraps(ms[j] * ranks[j], u_offsets[j]) ||
                                   wraps(ns[j] * ranks[j], v_offsets[j])))
                throw std::invalid_argument("lowrank_perturb: a factor offset + size exceeds 2^64");
    }
    if (log_mode < kNoLog || log_mode > kLogCountOnly)
        throw std::invalid_argument("lowrank_perturb: bad log_mode");
    if (log_mode != kNoLog && log_count_ptr == 0)
        throw std::invalid_argument("lowrank_perturb: a log needs log_count_ptr");
    if (log_mode == kLogWrite && log_capacity > 0 && (log_index_ptr == 0 || log_values_ptr == 0))
        throw std::invalid_argument("lowrank_perturb: a log with capacity needs index and values");
    // The log's check (undo_log.h, lost_positions) assumes what the pass wrote is
    // round_nearest(theta + D): no decay, no stochastic rounding.
    if (log_mode != kNoLog) {
        if (rounding != 0) throw std::invalid_argument("lowrank_perturb: a log needs nearest rounding");
        for (float decay : decays)
            if (decay != 1.0f) throw std::invalid_argument("lowrank_perturb: a log needs decays of 1");
    }

    const SelectorLogRef sel_out = selector_log_ref(selector_out, true, "lowrank_perturb");
    const SelectorLogRef sel_in = selector_log_ref(selector_in, false, "lowrank_perturb");
    const bool sel = sel_out.active() || sel_in.active();
    if (sel && log_mode != kNoLog)
        throw std::invalid_argument("lowrank_perturb: an undo log and a selector log are exclusive");
    if (sel_in.active() && !recover)
        throw std::invalid_argument("lowrank_perturb: selector_in needs applied_tau_ptrs");
    if (sel_out.active()) {  // log_block assumes round_nearest(theta + D) was written
        if (rounding != 0) throw std::invalid_argument("lowrank_perturb: a log needs nearest rounding");
        for (float decay : decays)
            if (decay != 1.0f) throw std::invalid_argument("lowrank_perturb: a log needs decays of 1");
    }

    // Scratch (V diag(tau))^T (and of the applied taus) for every weight: r x n floats each,
    // small next to W.
    std::vector<std::vector<float>> scratch(count), scratch_held(count);
    std::vector<float> drawn_v;  // a drawn V, until it is scaled into the scratch
    std::vector<LowRankWeight> weights(count);
    std::vector<uint64_t> numels(count);
    uint64_t start = 0, blocks = 0;
    for (size_t j = 0; j < count; ++j) {
        const uint64_t n = ns[j], r = ranks[j];
        const float* v = reinterpret_cast<const float*>(v_ptrs[j]);
        if (v == nullptr) {
            drawn_v.resize(n * r);
            noise(reinterpret_cast<uintptr_t>(drawn_v.data()), n * r, factor_seed, keys[j],
                  v_offsets[j], kGaussian, num_threads, factor_contract);
            v = drawn_v.data();
        }
        scaled_factor_t(v, reinterpret_cast<const float*>(tau_ptrs[j]), n, r, scratch[j]);
        if (recover)
            scaled_factor_t(v, reinterpret_cast<const float*>(applied_tau_ptrs[j]), n, r,
                            scratch_held[j]);
        weights[j] = {w_ptrs[j], ms[j], n, r, reinterpret_cast<const float*>(u_ptrs[j]),
                      scratch[j].data(), recover ? scratch_held[j].data() : nullptr, decays[j],
                      keys[j], start, blocks, any_drawn ? u_offsets[j] : 0};
        numels[j] = ms[j] * n;
        start += numels[j];
        blocks += (numels[j] + kSelectorBlock - 1) / kSelectorBlock;
    }

    const LowRankJob job{weights, scale, applied_scale, rounding, PhiloxKeys(rounding_seed),
                         dtype, log_mode == kLogCountOnly,
                         reinterpret_cast<int64_t*>(log_index_ptr), log_values_ptr, log_capacity,
                         reinterpret_cast<int64_t*>(log_count_ptr), sel_out, sel_in,
                         factor_seed, factor_contract};
    const std::vector<WorkItem> items = split_work(numels, kItemElements);
    uint64_t work = 0;
    for (size_t j = 0; j < count; ++j) work += numels[j] * ((recover ? 2 : 1) * ranks[j] + 1);
    // Items of whole blocks (multiples of kTile == kSelectorBlock): each block's selectors are
    // written or read by one tile.
    const ItemKernel run_item = sel ? item_kernel<false, true>()
                                : log_mode == kNoLog ? item_kernel<false>() : item_kernel<true>();
    parallel_for_items(items.size(), work, num_threads, [&](size_t i) { run_item(job, items[i]); });
}

}  // namespace zk
