// The selector log (docs/undo-log.md; reference: zokernels/backends/torch/selector_log.py): per
// element whose perturbed value y = round(theta + d) several weights round to, the few bits that
// single theta out of them; per block of kSelectorBlock elements a fixed row of words, plus a
// shared pool (one atomic add per block that does not fit its row).
//
// The weights c with round(float32(c) + d) == y form one interval of patterns in value order
// ("keys", -0.0 just below +0.0), because rounding is monotone. Both the writing pass (theta
// known) and a reading pass (only y known) find it exactly, so the log keeps key(theta) - lo in
// bit_length(hi - lo) bits, and a y that is not finite keeps theta's raw pattern.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "compact.h"
#include "noise_tiles.h"
#include "rounding.h"
#include "undo_log.h"

namespace zk {

constexpr int kSelectorBlock = 1024;  // elements per block (== kTile: one tile is one block)
static_assert(kSelectorBlock == kTile, "the unmapped tiles are the log's blocks");

// The log's buffers (regions: int32 [blocks, words]; pool: int32 [capacity]; count: int64).
struct SelectorLogRef {
    int32_t* regions = nullptr;
    uint64_t words = 0;
    int32_t* pool = nullptr;
    uint64_t capacity = 0;
    int64_t* count = nullptr;
    bool count_only = false;
    bool active() const { return regions != nullptr; }
};

template <class Format>
struct Keys {
    static constexpr int kBits = std::is_same<Format, Float32Format>::value ? 32 : 16;
    static constexpr uint32_t kSign = Grid<Format>::kSign;
    static constexpr uint32_t kMaxFinite = kBits == 32 ? 0x7F7FFFFFu
                                           : std::is_same<Format, BFloat16Format>::value ? 0x7F7Fu
                                                                                         : 0x7BFFu;
    static constexpr uint32_t kFirst = kSign - 1u - kMaxFinite;  // key of -max
    static constexpr uint32_t kLast = kSign + kMaxFinite;        // key of +max

    static ZK_INLINE uint32_t pattern(typename Format::storage s) {
        if constexpr (kBits == 32)
            return bits_as<uint32_t>(s);
        else
            return s;
    }
    static ZK_INLINE typename Format::storage storage(uint32_t p) {
        if constexpr (kBits == 32)
            return bits_as<float>(p);
        else
            return static_cast<uint16_t>(p);
    }
    // Branch-free (mispredicted sign branches cost more than the rest of the loop): a negative
    // pattern's key is (2 kSign - 1) - p == p ^ (2 kSign - 1), a positive one's p + kSign == p ^ kSign.
    static constexpr uint32_t kAll = kSign | (kSign - 1u);
    static ZK_INLINE uint32_t key(uint32_t p) {
        const uint32_t negative = 0u - (p >> (kBits - 1));
        return p ^ (kSign | (negative & (kSign - 1u)));
    }
    static ZK_INLINE uint32_t from_key(uint32_t k) {
        const uint32_t negative = (k >> (kBits - 1)) - 1u;  // all ones below kSign
        return (k ^ (kSign | (negative & (kSign - 1u)))) & kAll;
    }
    // round_nearest(v) as a pattern and a pattern's float32 value, for sums of finite weights
    // and finite d (finite or infinite, never NaN): the formats' conversions without their NaN
    // select, which kept GCC from vectorizing the loops below.
    static ZK_INLINE uint32_t round_finite(float v) {
        const uint32_t b = bits_as<uint32_t>(v);
        if constexpr (kBits == 32) {
            return b;
        } else if constexpr (std::is_same<Format, BFloat16Format>::value) {
            return (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
        } else {  // Float16Format::bits_from_float less its NaN branch
            const float magnitude = bits_as<float>(b & 0x7FFFFFFFu);
            float base = (magnitude * 0x1.0p+112f) * 0x1.0p-110f;
            const uint32_t shl1_w = b + b;
            uint32_t bias = shl1_w & 0xFF000000u;
            bias = bias < 0x71000000u ? 0x71000000u : bias;
            base = bits_as<float>((bias >> 1) + 0x07800000u) + base;
            const uint32_t bits = bits_as<uint32_t>(base);
            return ((b & 0x80000000u) >> 16) | (((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu));
        }
    }
    static ZK_INLINE float value(uint32_t p) { return Grid<Format>::value(p); }
    // Magnitude pattern of +inf: a pattern p is finite iff (p & ~kSign) < kInf.
    static constexpr uint32_t kInf = kBits == 32 ? 0x7F800000u
                                     : std::is_same<Format, BFloat16Format>::value ? 0x7F80u
                                                                                   : 0x7C00u;
    // round_nearest(c + d) as float32, c the weight of key k (finite d; the keys next to the
    // finite ones are the infinities, whose image is never a finite y)
    static ZK_INLINE float image(uint32_t k, float d) {
        return value(round_finite(value(from_key(k)) + d));
    }
};

// The last key from member m towards `end` (kLast upward, kFirst downward) whose image is y:
// gallop until a non-member (or `end`), then bisect. The members form one interval (rounding is
// monotone), so the boundary found does not depend on the probes.
template <class Format>
inline uint32_t interval_edge(int64_t m, int64_t end, float y, float d) {
    using K = Keys<Format>;
    const int64_t dir = end >= m ? 1 : -1;
    int64_t good = m, bad = end + dir, step = 1;
    while (good != end) {
        const int64_t c = dir > 0 ? std::min(good + step, end) : std::max(good - step, end);
        if (K::image(static_cast<uint32_t>(c), d) == y) {
            good = c;
            step *= 2;
        } else {
            bad = c;
            break;
        }
    }
    while ((bad - good) * dir > 1) {
        const int64_t mid = good + (bad - good) / 2;
        (K::image(static_cast<uint32_t>(mid), d) == y ? good : bad) = mid;
    }
    return static_cast<uint32_t>(good);
}

// The key interval [lo, hi] of the weights mapping to finite y, given a member m (image == y).
template <class Format>
inline void interval_from(uint32_t m, float y, float d, uint32_t* lo, uint32_t* hi) {
    using K = Keys<Format>;
    *hi = interval_edge<Format>(m, int64_t{K::kLast}, y, d);
    *lo = interval_edge<Format>(m, int64_t{K::kFirst}, y, d);
}

// The first key whose image is >= y (image is monotone in the key): a member when one exists.
template <class Format>
inline uint32_t lower_bound_key(float y, float d) {
    using K = Keys<Format>;
    uint64_t low = K::kFirst, high = uint64_t{K::kLast} + 1;
    while (low < high) {
        const uint64_t mid = low + (high - low) / 2;
        if (K::image(static_cast<uint32_t>(mid), d) >= y)
            high = mid;
        else
            low = mid + 1;
    }
    return static_cast<uint32_t>(low > K::kLast ? K::kLast : low);
}

// Float equality of two finite-or-not float32 patterns without a float compare (vectorizes): equal
// patterns, or both zeros. (Not IEEE for NaN, which the callers treat apart.)
ZK_INLINE uint32_t same_value(uint32_t a, uint32_t b) {
    return ((a == b) | (((a | b) << 1) == 0)) ? 1u : 0u;
}

ZK_INLINE int bit_length(uint32_t v) {
    return v == 0 ? 0 : 32 - __builtin_clz(v);  // a select: no loop, no mispredicted branch
}

// For gathered suspects q < m: bit j of mask[q] says whether key center[q] + j - 3 maps to y[q]
// (j = 0..6). Vectorizes; most intervals are 2 or 3 keys wide and are read off the mask.
template <class Format>
inline void window_masks(const uint32_t* ZK_RESTRICT center, const uint32_t* ZK_RESTRICT y_bits,
                         const float* ZK_RESTRICT d, int m, uint8_t* ZK_RESTRICT mask) {
    using K = Keys<Format>;
    for (int q = 0; q < m; ++q) {
        uint32_t bits = 0;
        for (int j = 0; j < 7; ++j)
            bits |= same_value(bits_as<uint32_t>(K::image(center[q] + j - 3u, d[q])), y_bits[q]) << j;
        mask[q] = static_cast<uint8_t>(bits);
    }
}

// The interval [lo, hi] of the keys mapping to finite y from a window mask around `center`
// (window_masks); false when no weight maps to y.
template <class Format>
inline bool resolve_interval(uint32_t center, uint32_t mask, float y, float d, uint32_t* lo,
                             uint32_t* hi) {
    using K = Keys<Format>;
    if (mask != 0 && (mask & 0x41u) == 0) {  // the run of members ends inside the window
        *lo = center - 3u + static_cast<uint32_t>(count_trailing_zeros(mask));
        *hi = center - 3u + static_cast<uint32_t>(31 - __builtin_clz(mask));
        return true;
    }
    const uint32_t m = mask != 0 ? center - 3u + static_cast<uint32_t>(count_trailing_zeros(mask))
                                 : lower_bound_key<Format>(y, d);
    if (K::image(m, d) != y) return false;
    interval_from<Format>(m, y, d, lo, hi);
    return true;
}

// Appends one block's selectors (LSB first) and stores them at the block's end. A 64-bit
// accumulator takes each selector without a branch; a full word is flushed every ~20 selectors.
struct SelectorWriter {
    const SelectorLogRef* log = nullptr;
    uint64_t block = 0;
    uint64_t acc = 0;    // pending bits
    int pending = 0;     // their number (< 32 between appends)
    uint64_t n_full = 0; // words stored in `words`
    uint32_t words[kSelectorBlock + 1];  // a block's worst case: 32 bits per element

    void start(const SelectorLogRef& ref, uint64_t b) {
        log = &ref;
        block = b;
        acc = 0;
        pending = 0;
        n_full = 0;
    }
    ZK_INLINE void append(int width, uint32_t sel) {
        acc |= static_cast<uint64_t>(sel) << pending;
        pending += width;
        if (pending >= 32) {
            words[n_full++] = static_cast<uint32_t>(acc);
            acc >>= 32;
            pending -= 32;
        }
    }
    void finish() {
        if (pending > 0) words[n_full] = static_cast<uint32_t>(acc);
        const uint64_t n_words = n_full + (pending > 0 ? 1 : 0);
        int32_t* row = log->regions + block * log->words;
        if (n_words + 1 <= log->words) {
            if (!log->count_only) {
                row[0] = 0;
                std::memcpy(row + 1, words, n_words * 4);
            }
            return;
        }
        const int64_t first = fetch_add(log->count, static_cast<int64_t>(n_words));
        if (log->count_only) return;
        if (static_cast<uint64_t>(first) + n_words <= log->capacity && first < INT32_MAX - 1) {
            row[0] = static_cast<int32_t>(first + 1);
            std::memcpy(log->pool + first, words, n_words * 4);
        } else {
            row[0] = -1;  // lost: recovered as applied= alone recovers it
        }
    }
};

// Reads one block's selectors back in element order, a word at a time (never past the last
// word the block's bits occupy).
struct SelectorReader {
    const uint32_t* src = nullptr;  // nullptr: the block is lost
    uint64_t buf = 0;               // bits read ahead
    int have = 0;                   // their number

    void start(const SelectorLogRef& ref, uint64_t block) {
        const int32_t* row = ref.regions + block * ref.words;
        const int32_t header = row[0];
        buf = 0;
        have = 0;
        if (header == 0)
            src = reinterpret_cast<const uint32_t*>(row + 1);
        else if (header > 0)
            src = reinterpret_cast<const uint32_t*>(ref.pool + (header - 1));
        else
            src = nullptr;
    }
    bool lost() const { return src == nullptr; }
    ZK_INLINE uint32_t take(int width) {
        if (have < width) {
            buf |= static_cast<uint64_t>(*src++) << have;
            have += 32;
        }
        const uint64_t v = buf & ((uint64_t{1} << width) - 1);
        buf >>= width;
        have -= width;
        return static_cast<uint32_t>(v);
    }
};

// Writing side of one tile: theta (storage patterns), y = round(theta + d) (storage), d.
template <class Format>
inline void log_selectors(const typename Format::storage* ZK_RESTRICT theta,
                          const typename Format::storage* ZK_RESTRICT y,
                          const float* ZK_RESTRICT d, int n, SelectorWriter& writer) {
    using K = Keys<Format>;
    // Stage 1, every element, integer compares only (so that GCC vectorizes it): theta is the
    // only candidate when neither key neighbour maps to y too (the candidates are an interval).
    alignas(64) uint8_t suspect[kTile];
    for (int i = 0; i < n; ++i) {
        const uint32_t y_bits = bits_as<uint32_t>(Format::to_float(y[i]));
        const uint32_t k = K::key(K::pattern(theta[i]));
        const uint32_t below = bits_as<uint32_t>(K::image(k - 1u, d[i]));
        const uint32_t above = bits_as<uint32_t>(K::image(k + 1u, d[i]));
        const uint32_t not_finite = (y_bits & 0x7FFFFFFFu) >= 0x7F800000u ? 1u : 0u;
        suspect[i] = static_cast<uint8_t>(same_value(below, y_bits) | same_value(above, y_bits) |
                                          not_finite);
    }
    alignas(64) int32_t at[kTile];
    const int n_suspect = compact_flags(suspect, n, at);
    alignas(64) uint32_t center[kTile], y_bits[kTile];
    alignas(64) float d_s[kTile];
    alignas(64) uint8_t mask[kTile];
    for (int q = 0; q < n_suspect; ++q) {
        center[q] = K::key(K::pattern(theta[at[q]]));
        y_bits[q] = bits_as<uint32_t>(Format::to_float(y[at[q]]));
        d_s[q] = d[at[q]];
    }
    window_masks<Format>(center, y_bits, d_s, n_suspect, mask);
    for (int q = 0; q < n_suspect; ++q) {
        const float yv = bits_as<float>(y_bits[q]);
        if (!((y_bits[q] & 0x7FFFFFFFu) < 0x7F800000u)) {
            writer.append(K::kBits, K::pattern(theta[at[q]]));
            continue;
        }
        uint32_t lo = center[q], hi = center[q];  // theta maps to y: always resolved
        resolve_interval<Format>(center[q], mask[q], yv, d_s[q], &lo, &hi);
        writer.append(bit_length(hi - lo), center[q] - lo);
    }
}

// Reading side of one tile: theta (storage patterns and float32) of the weights holding
// y = x[i] = round(theta + d1), exact unless the block is lost (then recover_unperturbed).
template <class Format>
inline void recover_selectors(const typename Format::storage* ZK_RESTRICT x,
                              const float* ZK_RESTRICT d1, int n, SelectorReader& reader,
                              typename Format::storage* ZK_RESTRICT theta_s,
                              float* ZK_RESTRICT theta) {
    using K = Keys<Format>;
    using G = Grid<Format>;
    // Stage 1, every element, integer compares only: r = round(y - d1) is theta when it maps
    // to y and neither key neighbour does.
    alignas(64) uint8_t suspect[kTile];
    for (int i = 0; i < n; ++i) {
        const uint32_t y_bits = bits_as<uint32_t>(Format::to_float(x[i]));
        const uint32_t r = K::round_finite(bits_as<float>(y_bits) - d1[i]);
        const uint32_t k = K::key(r);
        const uint32_t at_r = bits_as<uint32_t>(K::image(k, d1[i]));
        const uint32_t below = bits_as<uint32_t>(K::image(k - 1u, d1[i]));
        const uint32_t above = bits_as<uint32_t>(K::image(k + 1u, d1[i]));
        const uint32_t not_finite = ((y_bits & 0x7FFFFFFFu) >= 0x7F800000u ? 1u : 0u) |
                                    ((r & (K::kSign - 1u)) >= K::kInf ? 1u : 0u);
        theta_s[i] = K::storage(r);
        suspect[i] = static_cast<uint8_t>(not_finite | same_value(below, y_bits) |
                                          same_value(above, y_bits) |
                                          (same_value(at_r, y_bits) ^ 1u));
    }
    alignas(64) int32_t at[kTile];
    const int n_suspect = compact_flags(suspect, n, at);
    alignas(64) uint32_t center[kTile], y_bits[kTile];
    alignas(64) float d_s[kTile];
    alignas(64) uint8_t mask[kTile];
    for (int q = 0; q < n_suspect; ++q) {
        center[q] = K::key(K::pattern(theta_s[at[q]]));  // r
        y_bits[q] = bits_as<uint32_t>(Format::to_float(x[at[q]]));
        d_s[q] = d1[at[q]];
    }
    window_masks<Format>(center, y_bits, d_s, n_suspect, mask);
    for (int q = 0; q < n_suspect; ++q) {
        const float yv = bits_as<float>(y_bits[q]);
        const float d = d_s[q];
        uint32_t p;
        uint32_t lo, hi;
        if (!((y_bits[q] & 0x7FFFFFFFu) < 0x7F800000u))
            p = reader.lost() ? G::round_bits(recover_unperturbed<Format>(yv, d))
                              : reader.take(K::kBits);
        else if (!resolve_interval<Format>(center[q], mask[q], yv, d, &lo, &hi) || reader.lost())
            p = G::round_bits(recover_unperturbed<Format>(yv, d));  // lost block, or not logged
        else
            p = K::from_key(lo + reader.take(bit_length(hi - lo)));
        theta_s[at[q]] = K::storage(p);
    }
    for (int i = 0; i < n; ++i) theta[i] = Format::to_float(theta_s[i]);
}

}  // namespace zk
