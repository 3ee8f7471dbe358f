// The selector log, stream v2 (docs/undo-log.md: storage, capacity, overflow). The spec, bit for
// bit, is the torch reference zokernels/backends/torch/selector_log.py (`flags`, `classes`,
// `block_fields`, `read_block`).
//
// A pass writes y = round(theta + d). Writer and reader both compute, from (y, d) alone, the
// recovery candidate r = round(y - d) and the same classes: `flagged` (y not finite, or r not
// proven the only weight mapping to y), and for flagged elements r's key neighbours' images:
// F = finite y and not (r maps and neither neighbour does), N = y not finite, side = +1 / -1 when
// r and only its upper / lower neighbour map. Unkept elements are exactly r. Per block of
// kSelectorBlock elements the stream (LSB first in int32 words; empty without F and N) is
//
//   n_F (11 bits) | moved: 1 bit per F element (delta = key(theta) - key(r) != 0)
//   | step per moved element: 1 bit far (|delta| >= 2) when side != 0, else 2 bits (delta < 0, far)
//   | W (6 bits, only with a far element: bit_length of the block's largest |delta| - 2)
//   | payloads in element order: |delta| - 2 in W bits per far element, theta's pattern per N one.
//
// Both sides handle a block whole (a sharded tensor's tiles of one block are gathered first), so
// the reader places every field from its own classes, as the reference does; n_F is written for
// readers that decode tile by tile. Storage: a row of `words` int32 per block (word 0, the
// header: >= 0 = the stream follows in the row and the header is the block's check's low 31
// bits; <= -2 = the stream is in the pool at offset -2 - header and word 1 is the check; -1 =
// lost; the check: block_check of the values stored) and a pool shared by the blocks that do not
// fit their row (one atomic add per such block). The kept elements of a lost block, or of one
// whose weights no longer match its check (written by someone else between the passes: the
// reader's classes, and so every field's position, would differ), are recovered as applied=
// alone recovers them.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "compact.h"
#include "noise_tiles.h"
#include "rounding.h"
#include "tile_io.h"
#include "undo_log.h"

namespace zk {

constexpr int kSelectorBlock = 1024;  // elements per block (== kTile: one tile is one block)
static_assert(kSelectorBlock == kTile, "the unmapped tiles are the log's blocks");
constexpr int kCountBits = 11;  // n_F: 0 .. kSelectorBlock
constexpr int kWidthBits = 6;   // W: 0 .. 32
// A block's longest stream: every element F with a 2-bit step and a 32-bit payload.
constexpr int kMaxStreamBits = kCountBits + 3 * kSelectorBlock + kWidthBits + 32 * kSelectorBlock;
constexpr int kMaxStreamWords = kMaxStreamBits / 32 + 4;  // + the words a 64-bit read may touch
// block_check's constants (the reference's CHECK_INDEX, CHECK_MIX)
constexpr uint32_t kCheckIndex = 0x9E3779B9u;
constexpr uint32_t kCheckMix = 0x85EBCA6Bu;

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

// A selector log's fields from _C's lists (perturb and lowrank_perturb alike): out = (regions,
// words, pool, capacity, count, count_only), in = (regions, words, pool, capacity); empty: none.
// `op` names the caller in the errors.
inline SelectorLogRef selector_log_ref(const std::vector<uint64_t>& v, bool out, const char* op) {
    SelectorLogRef ref;
    if (v.empty()) return ref;
    const std::string name(op);
    if (v.size() != (out ? 6u : 4u))
        throw std::invalid_argument(name + (out ? ": selector_out must hold 6 values"
                                                : ": selector_in must hold 4 values"));
    ref.regions = reinterpret_cast<int32_t*>(v[0]);
    ref.words = v[1];
    ref.pool = reinterpret_cast<int32_t*>(v[2]);
    ref.capacity = v[3];
    if (out) {
        ref.count = reinterpret_cast<int64_t*>(v[4]);
        ref.count_only = v[5] != 0;
        if (ref.count == nullptr) throw std::invalid_argument(name + ": selector_out needs a count");
    }
    if (ref.regions == nullptr || ref.words < 2 || (ref.capacity > 0 && ref.pool == nullptr))
        throw std::invalid_argument(name + ": a selector log needs regions of >= 2 words");
    return ref;
}

// A condition as a vector lane would hold it: all ones or zero.
ZK_INLINE uint32_t lane_mask(bool condition) { return 0u - static_cast<uint32_t>(condition); }

template <class Format>
struct Keys {
    static constexpr int kBits = std::is_same<Format, Float32Format>::value ? 32 : 16;
    static constexpr uint32_t kSign = Grid<Format>::kSign;

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
    // Keys: patterns in value order, -0.0 just below +0.0. Branch-free (mispredicted sign
    // branches cost more than the rest of the loop): a negative pattern's key is
    // (2 kSign - 1) - p == p ^ (2 kSign - 1), a positive one's p + kSign == p ^ kSign.
    static constexpr uint32_t kAll = kSign | (kSign - 1u);
    static ZK_INLINE uint32_t key(uint32_t p) {
        const uint32_t negative = 0u - (p >> (kBits - 1));
        return p ^ (kSign | (negative & (kSign - 1u)));
    }
    // The pattern of key k taken modulo 2^kBits (as the reference's from_key: a decoded key may
    // step past either end).
    static ZK_INLINE uint32_t from_key(uint32_t k) {
        k &= kAll;
        const uint32_t negative = (k >> (kBits - 1)) - 1u;  // all ones below kSign
        return (k ^ (kSign | (negative & (kSign - 1u)))) & kAll;
    }
    // round_nearest(v) as a pattern and a pattern's float32 value, for sums of finite weights
    // and finite d (finite or infinite; a NaN gives some pattern, which no caller compares
    // equal to a finite y): the formats' conversions without their NaN select, which kept GCC
    // from vectorizing the loops below.
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
    // (a 16-bit pattern's bits past 16 are shifted out by the conversions)
    static ZK_INLINE float value(uint32_t p) { return Grid<Format>::value(p); }
    // round_nearest(float32(c) + d) as float32 bits, c the weight of pattern p / of key k
    static ZK_INLINE uint32_t image_of(uint32_t p, float d) {
        return bits_as<uint32_t>(value(round_finite(value(p) + d)));
    }
    static ZK_INLINE uint32_t image(uint32_t k, float d) { return image_of(from_key(k), d); }

    // Fields of a pattern: mantissa bits (p - 1 for p significand bits), exponent mask.
    static constexpr int kMantissa = kBits == 32 ? 23
                                     : std::is_same<Format, BFloat16Format>::value ? 7 : 10;
    static constexpr uint32_t kMantissaMask = (1u << kMantissa) - 1u;
    static constexpr uint32_t kExponentMask = (kSign - 1u) & ~kMantissaMask;
    static constexpr uint32_t kUnit = 1u << kMantissa;  // exponent field 1

    // 1 when bit patterns alone prove that c is the only weight whose image is y, given that it
    // is one (16-bit formats: y = round(s), s = float32(c) + d computed as image() does; c, y
    // patterns). Cheap and conservative: a 0 flags the element. The proof: let y have a normal
    // exponent field of spacing u and a mantissa in [2, M - 2] (M = 2^(p-1)), and let both key
    // neighbours of c lie at least u from c (c's exponent field, less 1 when its mantissa is 0,
    // at least y's: c is not a zero). image() is monotone in the weight, so it suffices that the
    // values c -+ u (real numbers) do not map to y. Their exact sums with d lie within 1.5 u of
    // y, inside y's binade, where the float32 grid is uniform with u an even multiple of its
    // spacing: float32(c -+ u + d) = s -+ u. Rounding s -+ u to the format gives y -+ u unless s
    // is half-way between two values of the format (its bits below the format's mantissa are
    // exactly one half), where ties-to-even can send one of them to the even y as well.
    // (float32: single_by_residual.)
    //
    // Returned as a lane mask (all ones: single), and every field compared as a signed int32
    // (all are below 2^15): GCC vectorizes that without masking each compare to 0 / 1 or
    // emulating unsigned compares. kHalfWayMargin > 0 also fails an s within that many float32
    // steps of half-way (the writer's test, flag_written).
    template <int kHalfWayMargin = 0>
    static ZK_INLINE uint32_t single_candidate(uint32_t c, uint32_t y, float s) {
        static_assert(kBits == 16, "float32 uses single_by_residual");
        const int32_t e = static_cast<int32_t>(y & kExponentMask);
        const int32_t ym = static_cast<int32_t>(y & kMantissaMask);
        // c's exponent field, less 1 when its mantissa is 0, at least y's: as integers,
        // |c| - 1 >= e (e has no mantissa bits), i.e. |c| > e
        uint32_t ok = lane_mask(static_cast<int32_t>(c & (kSign - 1u)) > e);
        // y normal, not inf / NaN: kUnit <= e < kExponentMask
        ok &= lane_mask(e >= static_cast<int32_t>(kUnit)) &
              lane_mask(e < static_cast<int32_t>(kExponentMask));
        ok &= lane_mask(ym >= 2) & lane_mask(ym < static_cast<int32_t>(kMantissaMask));
        // s lies in y's normal binade: 16 (bfloat16) / 13 (float16) float32 bits below the mantissa
        constexpr int32_t kBelow = std::is_same<Format, BFloat16Format>::value ? 0xFFFF : 0x1FFF;
        const int32_t from_half =
            (static_cast<int32_t>(bits_as<uint32_t>(s)) & kBelow) - (kBelow + 1) / 2;
        if constexpr (kHalfWayMargin == 0)
            ok &= ~lane_mask(from_half == 0);
        else
            ok &= lane_mask(from_half > kHalfWayMargin) | lane_mask(from_half < -kHalfWayMargin);
        return ok;
    }

    // float32's cheap test, the same contract as single_candidate: 1 when c is proven the only
    // weight whose image is y (c, y patterns, s = float32(c) + d as image() computes it). Proof:
    // c maps (s == y as patterns: y must be normal), |c| >= |d|, so t = d - (s - c) is exact and
    // c + d = s + t (Fast2Sum); |t| < u/2 for y's spacing u, and both key neighbours of c lie at
    // least u from c (c's exponent field, less 1 when its mantissa is 0, at least y's). Then
    // (c -+ g) + d = y + t -+ g (g >= u) lies more than u/2 beyond y on either side, where y's
    // neighbours are at most u away: neither key neighbour maps.
    static ZK_INLINE uint32_t single_by_residual(uint32_t c, uint32_t y, float d, float s) {
        static_assert(kBits == 32, "the 16-bit formats use single_candidate");
        const int32_t e = static_cast<int32_t>(y & kExponentMask);
        const int32_t c_magnitude = static_cast<int32_t>(c & 0x7FFFFFFFu);
        const float residual = d - (s - bits_as<float>(c));
        // u/2 = 2^(E - 151) for y's exponent field E: a normal float32 when E >= 25
        const int32_t half_spacing = e - (24 << 23);
        return lane_mask(bits_as<uint32_t>(s) == y) &
               lane_mask(c_magnitude >= static_cast<int32_t>(bits_as<uint32_t>(d) & 0x7FFFFFFFu)) &
               lane_mask(c_magnitude > e) & lane_mask(e >= (25 << 23)) &
               lane_mask(e < static_cast<int32_t>(kExponentMask)) &
               lane_mask(static_cast<int32_t>(bits_as<uint32_t>(residual) & 0x7FFFFFFFu) <
                         half_spacing);
    }
};

// Float equality of two float32 patterns without a float compare (vectorizes), as a lane mask:
// equal patterns, or both zeros. (Not IEEE for NaN: a caller's y is finite wherever the answer
// matters.)
ZK_INLINE uint32_t same_value_mask(uint32_t a, uint32_t b) {
    return lane_mask(a == b) | lane_mask(((a | b) << 1) == 0);
}

// A float32 pattern that is not finite, as a lane mask (a signed compare: the magnitude < 2^31).
ZK_INLINE uint32_t not_finite_mask(uint32_t y_bits) {
    return lane_mask(static_cast<int32_t>(y_bits & 0x7FFFFFFFu) >= 0x7F800000);
}

// The 8 low bits of v as 8 bytes of 0 / 1, bit j in byte j (the inverse of the multiply that
// packs the moved bits): byte j keeps bit j of a broadcast, then + 0x7F carries it to bit 7.
ZK_INLINE uint64_t spread_bits(uint32_t v) {
    const uint64_t x = (static_cast<uint64_t>(v & 0xFFu) * 0x0101010101010101ull) & 0x8040201008040201ull;
    return ((x + 0x7F7F7F7F7F7F7F7Full) >> 7) & 0x0101010101010101ull;
}

ZK_INLINE int bit_length(uint32_t v) {
    return v == 0 ? 0 : 32 - __builtin_clz(v);  // a select: no loop, no mispredicted branch
}

// Loops over a gathered list of m elements run to whole_lanes(m) <= kSelectorBlock, the extra
// lanes repeating element 0 and their results unused: GCC leaves a loop's remainder scalar, and
// with ~100 flagged elements per block that remainder cost as much as the vector part (perf).
constexpr int kLanes = 32;
ZK_INLINE int whole_lanes(int m) { return (m + kLanes - 1) & ~(kLanes - 1); }
static_assert(kSelectorBlock % kLanes == 0, "whole lanes stay inside a block's arrays");

// Per flagged element, the classes (`classes` in the reference) as bits of one byte.
enum ClassBits : uint8_t { kKeep = 1, kIsN = 2, kSided = 4, kDown = 8 };

// The class byte of an element whose r = round(y - d) does (maps) / whose key neighbours do
// (below, above) map to y (as values); nf: y is not finite. All four are lane masks.
ZK_INLINE uint8_t class_byte(uint32_t maps, uint32_t below, uint32_t above, uint32_t nf) {
    const uint32_t keep = nf | ~(maps & ~below & ~above);
    return static_cast<uint8_t>((keep & kKeep) | (nf & kIsN) | (maps & (below ^ above) & kSided) |
                                (maps & below & ~above & kDown));
}

// Stage 1 on the reading side, every element (vectorizes; `flags` in the reference, which is
// exact for float32: this is a cheaper superset there): r[i] = round(y - d) and flagged[i] = y
// is not finite, or r is not proven the only weight mapping to y (Keys::single_candidate for
// the 16-bit formats, Keys::single_by_residual for float32; both fail for a y that is not
// normal). Stage 2 computes the flagged elements' classes.
template <class Format>
inline void flag_elements(const typename Format::storage* ZK_RESTRICT y, const float* ZK_RESTRICT d,
                          int n, typename Format::storage* ZK_RESTRICT r_out,
                          uint8_t* ZK_RESTRICT flagged) {
    using K = Keys<Format>;
    for (int i = 0; i < n; ++i) {
        const uint32_t y_pattern = K::pattern(y[i]);
        const float y_value = K::value(y_pattern);
        const uint32_t y_bits = bits_as<uint32_t>(y_value);
        const uint32_t r = K::round_finite(y_value - d[i]);
        const float s = K::value(r) + d[i];
        r_out[i] = K::storage(r);
        uint32_t single;
        if constexpr (K::kBits == 32)
            single = K::single_by_residual(r, y_bits, d[i], s);
        else  // patterns compared exactly: single_candidate fails unless y is normal
            single = lane_mask(K::round_finite(s) == y_pattern) &
                     K::single_candidate(r, y_pattern, s);
        flagged[i] = static_cast<uint8_t>(~single & 1u);
    }
}

// Stage 1 on the writing side, every element: flagged[i] = 0 only where element i is provably
// not kept, found from what the writer has: theta and the sum it rounded to y (decay 1), without
// flag_elements' r = round(y - d) and its image (about half the work). Every element this
// flags gets stage 2's full classes (r, whether r maps, its neighbours), which keep exactly the
// reader's elements.
//
// 16-bit formats: theta maps to y (round(s0) == y, s0 = float32(theta) + d) and
// single_candidate(theta, y, s0) holds with s0 more than kMargin float32 steps (of y's binade,
// spacing q = u / 2^16 bfloat16, u / 2^13 float16, u y's spacing) from half-way. Then the
// reader's r = round(float32(y - d)) is theta, so its s is s0 and its test is this one without
// the margin (which it passes: unflagged, and not kept). Why r is theta: with e = s0 - y
// (|e| <= u/2 - (kMargin + 1) q) and s0 = theta + d + a (|a| <= q/2), y - d = theta + a - e lies
// within u/2 - (kMargin + 1/2) q of theta. float32 rounds that by at most half its spacing g on
// that side of theta, where the format's spacing is 2^16 g (2^13 g) and at least u
// (single_candidate's exponent test), so g >= q: for g = q the result stays within
// u/2 - kMargin q of theta, for g >= 2q within u/2 + g/2 < (2^16 g)/2. Either way it rounds to
// theta (kMargin >= 1: no tie).
//
// float32: Keys::single_by_residual proves theta the only weight mapping to y; the reader's
// r = round(y - d) = round(theta - t) is then theta (|t| < u/2, theta's neighbours >= u away)
// and the reader runs the same test on it.
//
// tests/test_lowrank_selector.py checks the writer against the reference on every 16-bit
// pattern and every float32 exponent with sums at and next to ties
// (test_writer_test_matches_the_reader_at_near_half_way_sums).
constexpr int kWriterHalfWayMargin = 2;

template <class Format>
inline void flag_written(const typename Format::storage* ZK_RESTRICT theta,
                         const typename Format::storage* ZK_RESTRICT y,
                         const float* ZK_RESTRICT d, int n, uint8_t* ZK_RESTRICT flagged) {
    using K = Keys<Format>;
    for (int i = 0; i < n; ++i) {
        const uint32_t t = K::pattern(theta[i]), y_pattern = K::pattern(y[i]);
        uint32_t single;
        if constexpr (K::kBits == 32) {
            single = K::single_by_residual(t, y_pattern, d[i], K::value(t) + d[i]);
        } else {
            const float s0 = K::value(t) + d[i];
            single = lane_mask(K::round_finite(s0) == y_pattern) &
                     K::template single_candidate<kWriterHalfWayMargin>(t, y_pattern, s0);
        }
        flagged[i] = static_cast<uint8_t>(~single & 1u);
    }
}

// A block's kept elements (F and N, `classes` in the reference), in element order.
struct KeptElements {
    int count = 0;    // F and N elements
    int n_count = 0;  // N elements
    alignas(64) int32_t at[kSelectorBlock];     // positions in the block
    alignas(64) uint32_t kr[kSelectorBlock];    // key(r)
    alignas(64) uint8_t code[kSelectorBlock];   // ClassBits

    // Entries count .. whole_lanes(count) - 1 for the loops that run in whole lanes: position 0,
    // class N (neither moved nor far: they add nothing to a block's reductions).
    void pad() {
        for (int p = count; p < whole_lanes(count); ++p) {
            at[p] = 0;
            kr[p] = 0;
            code[p] = kKeep | kIsN;
        }
    }
};

// Stage 2 on both sides: stage 1, then for the flagged elements (~10% of N(0, 0.02) weights)
// r's classes; fills `kept`. The reader (theta == nullptr) runs flag_elements, which leaves r in
// r_out for every element; a writer (r_out == nullptr) runs flag_written and computes r here,
// for its flagged elements only. Then whether r maps and its key neighbours' images, for
// the flagged elements only. Their inputs are gathered first so that the tests run as a
// vectorized loop.
template <class Philox, class Format>
inline void classify_block(const typename Format::storage* ZK_RESTRICT y,
                           const float* ZK_RESTRICT d, int n,
                           const typename Format::storage* ZK_RESTRICT theta,
                           typename Format::storage* ZK_RESTRICT r_out, KeptElements& kept) {
    using K = Keys<Format>;
    using Compact = typename IsaOf<Philox>::Compact;
    const bool writer = theta != nullptr;
    alignas(64) uint8_t flagged[kSelectorBlock];
    if (writer)
        flag_written<Format>(theta, y, d, n, flagged);
    else
        flag_elements<Format>(y, d, n, r_out, flagged);
    alignas(64) int32_t at[kSelectorBlock + kCompactSlack];
    const int m = Compact::flags(flagged, n, at);
    int n_count = 0;
    alignas(64) uint32_t y_bits[kSelectorBlock], r[kSelectorBlock], kr[kSelectorBlock];
    alignas(64) float d_s[kSelectorBlock];
    alignas(64) uint8_t maps[kSelectorBlock], code[kSelectorBlock];
    const int lanes = whole_lanes(m);
    for (int q = m; q < lanes; ++q) at[q] = 0;
    for (int q = 0; q < lanes; ++q) {
        y_bits[q] = bits_as<uint32_t>(K::value(K::pattern(y[at[q]])));
        d_s[q] = d[at[q]];
    }
    if (writer) {  // r, which flag_elements computes for the reader
        for (int q = 0; q < lanes; ++q) r[q] = K::round_finite(bits_as<float>(y_bits[q]) - d_s[q]);
    } else {
        for (int q = 0; q < lanes; ++q) r[q] = K::pattern(r_out[at[q]]);
    }
    for (int q = 0; q < lanes; ++q)  // r maps to y (as values: a zero y is flagged)
        maps[q] = static_cast<uint8_t>(same_value_mask(K::image_of(r[q], d_s[q]), y_bits[q]) & 1u);
    alignas(64) uint8_t keep[kSelectorBlock];
    for (int q = 0; q < lanes; ++q) {
        const uint32_t k = K::key(r[q]);
        const uint32_t below = same_value_mask(K::image(k - 1u, d_s[q]), y_bits[q]);
        const uint32_t above = same_value_mask(K::image(k + 1u, d_s[q]), y_bits[q]);
        kr[q] = k;
        code[q] = class_byte(0u - maps[q], below, above, not_finite_mask(y_bits[q]));
        keep[q] = code[q] & kKeep;
    }
    alignas(64) int32_t which[kSelectorBlock + kCompactSlack];
    const int count = Compact::flags(keep, m, which);
    for (int p = 0; p < count; ++p) {
        const int q = which[p];
        kept.at[p] = at[q];
        kept.kr[p] = kr[q];
        kept.code[p] = code[q];
        n_count += code[q] >> 1 & 1;
    }
    kept.count = count;
    kept.n_count = n_count;
    kept.pad();
}

// Bits appended LSB first into words, without a branch per field (value < 2^width <= 2^32).
struct BitSink {
    uint32_t* out;
    uint64_t acc = 0;  // pending bits
    int pending = 0;   // their number (< 32 between appends)
    int n_full = 0;    // words completed

    explicit BitSink(uint32_t* words) : out(words) {}
    ZK_INLINE void append(int width, uint32_t value) {
        acc |= static_cast<uint64_t>(value) << pending;
        pending += width;
        out[n_full] = static_cast<uint32_t>(acc);  // stored unconditionally: no branch
        const int full = pending >> 5;
        acc >>= 32 * full;
        n_full += full;
        pending -= 32 * full;
    }
    int finish() {
        out[n_full] = static_cast<uint32_t>(acc);
        return n_full + (pending > 0 ? 1 : 0);
    }
};

// The check of a block's stored values (block_check in the reference): the sum of
// mix(pattern ^ i * kCheckIndex), mix(v) = u ^ (u >> 15) with u = v * kCheckMix. mix is a
// bijection, so a change of any one element always changes it (its low 31 bits, the header of
// a stream in the row, but for a 2^-31 chance).
template <class Format>
inline uint32_t block_check(const typename Format::storage* ZK_RESTRICT y, int n) {
    uint32_t sum = 0, weyl = 0;  // weyl = i * kCheckIndex: an add, not a vector multiply
    for (int i = 0; i < n; ++i) {  // vectorizes
        const uint32_t u = (Keys<Format>::pattern(y[i]) ^ weyl) * kCheckMix;
        sum += u ^ (u >> 15);
        weyl += kCheckIndex;
    }
    return sum;
}

// Stores one block's check and stream (n_words words) in its row or the pool (write_block in
// the reference); count-only: only counts the pool words it needs.
inline void store_stream(const SelectorLogRef& log, uint64_t block, const uint32_t* words,
                         int n_words, uint32_t check) {
    int32_t* row = log.regions + block * log.words;
    if (static_cast<uint64_t>(n_words) + 1 <= log.words) {
        if (!log.count_only) {
            row[0] = static_cast<int32_t>(check & 0x7FFFFFFFu);
            std::memcpy(row + 1, words, static_cast<size_t>(n_words) * 4);
        }
        return;
    }
    const int64_t first = fetch_add(log.count, static_cast<int64_t>(n_words));
    if (log.count_only) return;
    if (static_cast<uint64_t>(first) + static_cast<uint64_t>(n_words) <= log.capacity &&
        first < INT32_MAX - 1) {
        row[0] = static_cast<int32_t>(-2 - first);
        row[1] = static_cast<int32_t>(check);
        std::memcpy(log.pool + first, words, static_cast<size_t>(n_words) * 4);
    } else {
        row[0] = -1;  // lost: recovered as applied= alone recovers it
    }
}

// Writing side of one block: theta (storage patterns), y = round(theta + d) (storage), d.
template <class Philox, class Format>
inline void log_block(const SelectorLogRef& log, uint64_t block,
                      const typename Format::storage* ZK_RESTRICT theta,
                      const typename Format::storage* ZK_RESTRICT y, const float* ZK_RESTRICT d,
                      int n) {
    using K = Keys<Format>;
    using Compact = typename IsaOf<Philox>::Compact;
    KeptElements kept;
    classify_block<Philox, Format>(y, d, n, theta, nullptr, kept);
    alignas(64) uint32_t words[kMaxStreamWords];
    const uint32_t check = log.count_only ? 0u : block_check<Format>(y, n);
    if (kept.count == 0) {
        store_stream(log, block, words, 0, check);
        return;
    }
    const int count = kept.count, n_count = kept.n_count, n_f = count - n_count;
    alignas(64) uint32_t t[kSelectorBlock];
    const int lanes = whole_lanes(count);
    for (int p = 0; p < lanes; ++p) t[p] = K::pattern(theta[kept.at[p]]);
    // delta = key(theta) - key(r) as a sign and a magnitude (uint32: |delta| < 2^32)
    alignas(64) uint32_t payload[kSelectorBlock], far_value[kSelectorBlock];
    alignas(64) uint8_t moved[kSelectorBlock + 32], step[kSelectorBlock], far[kSelectorBlock],
        wide[kSelectorBlock];
    for (int p = 0; p < lanes; ++p) {  // vectorizes: masks, no branches, no reduction
        const uint32_t kt = K::key(t[p]), kr = kept.kr[p];
        const uint32_t negative = kt < kr ? 1u : 0u;
        const uint32_t sign = 0u - negative;
        const uint32_t magnitude = ((kt - kr) ^ sign) - sign;  // |kt - kr|
        const uint32_t is_n = kept.code[p] >> 1 & 1u;
        const uint32_t sided = kept.code[p] >> 2 & 1u;
        const uint32_t mv = (is_n ^ 1u) & (magnitude != 0 ? 1u : 0u);
        const uint32_t fr = mv & (magnitude >= 2 ? 1u : 0u);
        far_value[p] = (magnitude - 2u) & (0u - fr);
        moved[p] = static_cast<uint8_t>(mv);
        far[p] = static_cast<uint8_t>(fr);
        wide[p] = static_cast<uint8_t>(fr | is_n);
        step[p] = static_cast<uint8_t>(sided ? fr : negative | (fr << 1));
        payload[p] = (t[p] & (0u - is_n)) | far_value[p];
    }
    uint32_t largest = 0, any_far = 0;
    for (int p = 0; p < count; ++p) {
        largest = far_value[p] > largest ? far_value[p] : largest;
        any_far |= far[p];
    }
    BitSink sink(words);
    sink.append(kCountBits, static_cast<uint32_t>(n_f));
    // moved bits of the F elements (all kept ones unless some are N), eight per multiply
    alignas(64) uint8_t moved_f[kSelectorBlock + 32];
    const uint8_t* bits_of = moved;
    if (n_count > 0) {
        int j = 0;
        for (int p = 0; p < count; ++p) {
            moved_f[j] = moved[p];
            j += (kept.code[p] >> 1 & 1) ^ 1;
        }
        bits_of = moved_f;
    }
    const unsigned tail = static_cast<unsigned>(n_f) < kSelectorBlock ? n_f : kSelectorBlock;
    std::memset((n_count > 0 ? moved_f : moved) + tail, 0, 32);  // bits past n_F: 0
    for (int b = 0; b < n_f; b += 32) {
        uint32_t bits = 0;
        for (int k = 0; k < 4; ++k) {
            uint64_t eight;
            std::memcpy(&eight, bits_of + b + 8 * k, 8);
            bits |= static_cast<uint32_t>((eight * 0x0102040810204080ull) >> 56) << (8 * k);
        }
        sink.append(min_of(32, n_f - b), bits);
    }
    alignas(64) int32_t at[kSelectorBlock + kCompactSlack];
    const int n_moved = Compact::flags(moved, count, at);
    for (int q = 0; q < n_moved; ++q) {
        const int p = at[q];
        sink.append(kept.code[p] & kSided ? 1 : 2, step[p]);
    }
    if (any_far | (n_count > 0 ? 1u : 0u)) {
        const int w = bit_length(largest);
        if (any_far) sink.append(kWidthBits, static_cast<uint32_t>(w));
        const int n_wide = Compact::flags(wide, count, at);
        for (int q = 0; q < n_wide; ++q) {
            const int p = at[q];
            sink.append(kept.code[p] & kIsN ? K::kBits : w, payload[p]);
        }
    }
    store_stream(log, block, words, sink.finish(), check);
}

// A block's stream as the reader sees it (block_stream in the reference): the rest of its row,
// or the pool from its offset; copied on demand into a zero-padded buffer, so that any bit past
// the stream's end reads as 0 (a stream holding garbage reads inside its row / the pool).
struct StreamSource {
    const uint32_t* src = nullptr;
    uint64_t limit = 0;  // words readable at src
    int have = 0;        // words copied into `words`
    alignas(64) uint32_t words[kMaxStreamWords];

    // false: the block is lost (-1, or a header that points past the pool), or its check is
    // not `check`, the reader's (the weights are not what the logging pass stored)
    bool open(const SelectorLogRef& log, uint64_t block, uint32_t check) {
        const int32_t* row = log.regions + block * log.words;
        const int64_t header = row[0];
        have = 0;
        if (header >= 0) {
            if (static_cast<uint32_t>(header) != (check & 0x7FFFFFFFu)) return false;
            src = reinterpret_cast<const uint32_t*>(row + 1);
            limit = log.words - 1;
            return true;
        }
        const uint64_t offset = static_cast<uint64_t>(-2 - header);  // huge for -1
        if (header == -1 || offset >= log.capacity || static_cast<uint32_t>(row[1]) != check)
            return false;
        src = reinterpret_cast<const uint32_t*>(log.pool + offset);
        limit = log.capacity - offset;
        return true;
    }
    // Makes the bits below `bits` (plus a word for 64-bit reads) readable.
    void ensure(int bits) {
        const int need = min_of(bits / 32 + 2, kMaxStreamWords);
        if (need <= have) return;
        const int copied = static_cast<int>(min_of<uint64_t>(limit, static_cast<uint64_t>(need)));
        if (copied > have) std::memcpy(words + have, src + have, static_cast<size_t>(copied - have) * 4);
        const int from = copied > have ? copied : have;
        if (need > from) std::memset(words + from, 0, static_cast<size_t>(need - from) * 4);
        have = need;
    }
    // The `width` (0 .. 32) bits at bit `pos` (ensured).
    ZK_INLINE uint32_t field(uint32_t pos, int width) const {
        uint64_t pair;
        std::memcpy(&pair, words + (pos >> 5), 8);
        return static_cast<uint32_t>((pair >> (pos & 31u)) & ((uint64_t{1} << width) - 1u));
    }
};

// Reading side of one block: theta (storage patterns) of the weights holding y = x[i] =
// round(theta + d1): exact, unless the block is lost or x does not match its check (then
// recover_unperturbed).
template <class Philox, class Format>
inline void recover_block(const SelectorLogRef& log, uint64_t block,
                          const typename Format::storage* ZK_RESTRICT x,
                          const float* ZK_RESTRICT d1, int n,
                          typename Format::storage* ZK_RESTRICT theta) {
    using K = Keys<Format>;
    using Compact = typename IsaOf<Philox>::Compact;
    KeptElements kept;
    classify_block<Philox, Format>(x, d1, n, nullptr, theta, kept);  // theta = r
    const int count = kept.count;
    if (count == 0) return;
    StreamSource stream;
    if (!stream.open(log, block, block_check<Format>(x, n))) {
        for (int p = 0; p < count; ++p) {
            const int i = kept.at[p];
            theta[i] = K::storage(Grid<Format>::round_bits(
                recover_unperturbed<Format>(Format::to_float(x[i]), d1[i])));
        }
        return;
    }
    // Each field's position: the running sum of the widths before it (as the reference's
    // cumsums); only the moved elements have steps, only the far and N ones payloads.
    const int n_count = kept.n_count, n_f = count - n_count;
    stream.ensure(kCountBits + 3 * n_f + kWidthBits);
    alignas(64) uint8_t moved[kSelectorBlock], far[kSelectorBlock], wide[kSelectorBlock];
    alignas(64) uint32_t step[kSelectorBlock], payload[kSelectorBlock], out[kSelectorBlock];
    uint32_t pos = kCountBits;
    const int lanes = whole_lanes(count);
    if (n_count == 0) {  // the F elements are the kept ones: moved bit p at 11 + p, 8 at a time
        for (int p = 0; p < lanes; p += 8) {
            const uint64_t spread = spread_bits(stream.field(kCountBits + static_cast<uint32_t>(p), 8));
            std::memcpy(moved + p, &spread, 8);
        }
        for (int p = count; p < lanes; ++p) moved[p] = 0;
        pos += static_cast<uint32_t>(count);
    } else {
        for (int p = 0; p < count; ++p) {
            const uint32_t f = (kept.code[p] >> 1 & 1u) ^ 1u;
            moved[p] = static_cast<uint8_t>(stream.field(pos, 1) & f);
            pos += f;
        }
        for (int p = count; p < lanes; ++p) moved[p] = 0;
    }
    for (int p = 0; p < lanes; ++p) step[p] = 0;
    alignas(64) int32_t at[kSelectorBlock + kCompactSlack];
    const int n_moved = Compact::flags(moved, count, at);
    for (int q = 0; q < n_moved; ++q) {
        const int p = at[q];
        const int width = kept.code[p] & kSided ? 1 : 2;
        step[p] = stream.field(pos, width);
        pos += static_cast<uint32_t>(width);
    }
    uint32_t any_far = 0;
    for (int p = 0; p < lanes; ++p) {
        const uint32_t sided = kept.code[p] >> 2 & 1u;
        far[p] = static_cast<uint8_t>(moved[p] & (sided ? step[p] : step[p] >> 1));
        wide[p] = static_cast<uint8_t>(far[p] | (kept.code[p] >> 1 & 1u));
        payload[p] = 0;
    }
    for (int p = 0; p < count; ++p) any_far |= far[p];
    if (any_far | (n_count > 0 ? 1u : 0u)) {
        int w = 0;
        if (any_far) {
            w = static_cast<int>(min_of(stream.field(pos, kWidthBits), 32u));
            pos += kWidthBits;
        }
        stream.ensure(static_cast<int>(pos) + 32 * count);
        const int n_wide = Compact::flags(wide, count, at);
        for (int q = 0; q < n_wide; ++q) {
            const int p = at[q];
            const int width = kept.code[p] & kIsN ? K::kBits : w;
            payload[p] = stream.field(pos, width);
            pos += static_cast<uint32_t>(width);
        }
    }
    for (int p = 0; p < lanes; ++p) {  // vectorizes
        const uint32_t code = kept.code[p];
        const uint32_t negative = code & kSided ? code >> 3 & 1u : step[p] & 1u;
        const uint32_t magnitude = far[p] ? 2u + payload[p] : moved[p];
        const uint32_t k = negative ? kept.kr[p] - magnitude : kept.kr[p] + magnitude;
        out[p] = code & kIsN ? payload[p] : K::from_key(k);
    }
    for (int p = 0; p < count; ++p) theta[kept.at[p]] = K::storage(out[p]);
}

// One block of a pass with selector logs, perturb and lowrank_perturb alike: theta (exactly
// from the held log `in`, by recovery alone without one, or x itself without kRecover), the
// rounded result round(decay * theta + d) from `store(theta, y)`, the new stream into `out`,
// then x (unless counting only). x holds the block's n elements, d / d1 their sums.
template <class Philox, class Format, bool kRecover, class Store>
inline void selector_block(const SelectorLogRef& in, const SelectorLogRef& out, uint64_t block,
                           typename Format::storage* x, int n, float decay, const float* d,
                           const float* d1, const Store& store) {
    using Storage = typename Format::storage;
    alignas(64) Storage recovered[kRecover ? kSelectorBlock : 1];
    alignas(64) Storage y[kSelectorBlock];
    const Storage* theta = x;  // without recovery, read in place (x is written last)
    if constexpr (kRecover) {
        if (in.active()) {
            recover_block<Philox, Format>(in, block, x, d1, n, recovered);
        } else {
            alignas(64) float value[kSelectorBlock];
            recover_tile<Philox, Format>(x, d1, n, value);
            for (int i = 0; i < n; ++i) recovered[i] = storage_of<Format>(value[i]);
        }
        theta = recovered;
    }
    store(theta, y);
    if (in.active() && decay == 1.0f) {  // left at its value: theta's exact pattern
        using K = Keys<Format>;
        for (int i = 0; i < n; ++i) {  // a mask, not a select of loads: vectorizes
            const uint32_t keep = 0u - ((bits_as<uint32_t>(d[i]) << 1) == 0 ? 1u : 0u);
            y[i] = K::storage((K::pattern(theta[i]) & keep) | (K::pattern(y[i]) & ~keep));
        }
    }
    // The stream is of what is stored (a kept -0.0 is not round(-0.0 + 0) = +0.0): a reader
    // computes its classes from that.
    if (out.active()) log_block<Philox, Format>(out, block, theta, y, d, n);
    if (!out.count_only) std::memcpy(x, y, sizeof(Storage) * n);
}

}  // namespace zk
