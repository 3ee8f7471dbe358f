// Loading a tile of a tensor into float32 and storing it back rounded once (nearest or
// stochastic), shared by perturb_ and lowrank_perturb_.
#pragma once

#include <type_traits>

#include "compact.h"
#include "noise_tiles.h"
#include "rounding.h"

namespace zk {

// acc[i] = decay * float32(x[i]) for i < n.
template <class Format>
inline void load_decayed(const typename Format::storage* ZK_RESTRICT x, int n, float decay,
                         float* ZK_RESTRICT acc) {
    for (int i = 0; i < n; ++i) acc[i] = decay * Format::to_float(x[i]);
}

// theta[i] = recover_unperturbed(float32(x[i]), d1[i]) for i < n, bit for bit, in two stages:
// recovery's first candidate r = round(x - d1) is its answer whenever round(r + d1) == x (or r
// is not finite), which holds for all but a few percent of the elements; only the others are
// gathered and run through the full test of the three candidates. One stage ran all three
// candidates for every element (4 roundings each): a recovering bf16 pass cost 1.8x a plain one.
template <class Philox, class Format>
inline void recover_tile(const typename Format::storage* ZK_RESTRICT x, const float* ZK_RESTRICT d1,
                         int n, float* ZK_RESTRICT theta) {
    using G = Grid<Format>;
    if constexpr (std::is_same<Format, Float32Format>::value) {
        // float32 has no rounding to a coarser grid: the three candidates are cheap, and the
        // two stages measured slower (rademacher pass 2.8 -> 4.8 ms on 4M elements).
        for (int i = 0; i < n; ++i) theta[i] = recover_unperturbed<Format>(x[i], d1[i]);
        return;
    }
    alignas(64) uint8_t retry[kTile];
    for (int i = 0; i < n; ++i) theta[i] = G::value(G::round_bits(Format::to_float(x[i]) - d1[i]));
    // Integer compares (equal patterns imply recovery's float test passes; a NaN r is not finite
    // and kept either way): with float compares GCC did not vectorize this loop.
    for (int i = 0; i < n; ++i) {
        const float r = theta[i];
        const uint32_t x_bits = bits_as<uint32_t>(Format::to_float(x[i]));
        const uint32_t back_bits = bits_as<uint32_t>(G::value(G::round_bits(r + d1[i])));
        const bool r_finite = (bits_as<uint32_t>(r) & 0x7FFFFFFFu) < 0x7F800000u;
        retry[i] = (back_bits != x_bits) & r_finite;
    }
    alignas(64) int32_t at[kTile + kCompactSlack];
    const int n_retry = IsaOf<Philox>::Compact::flags(retry, n, at);
    alignas(64) float x_s[kTile], d1_s[kTile];
    for (int q = 0; q < n_retry; ++q) {
        x_s[q] = Format::to_float(x[at[q]]);
        d1_s[q] = d1[at[q]];
    }
    for (int q = 0; q < n_retry; ++q) x_s[q] = recover_unperturbed<Format>(x_s[q], d1_s[q]);
    for (int q = 0; q < n_retry; ++q) theta[at[q]] = x_s[q];
}

// x[i] = round(value(i)) for i < n, where element i has contract index first + i, with
// (first % 8) + n <= kTile + 8 (a tile, or a run of a sharded tensor inside one). Stochastic
// rounding (kRoundStochastic): the uniform of word (first + i) % 4 of stream-1 counter
// (first + i) / 4; kRoundStochasticInteger (contract 3): the 16 bits of half (first + i) % 2 of
// word ((first + i) % 8) / 2 of stream-1 counter (first + i) / 8. value(i) may read x[i]
// (perturb_ reads the weight here, in place): each element is read before it is written.
template <class Philox, class Format, class Value>
inline void round_store_at(const Value& value, int n, typename Format::storage* x, int rounding,
                           const PhiloxKeys& rounding_keys, uint32_t key, uint64_t first) {
    if constexpr (std::is_same<Format, Float32Format>::value) {
        (void)rounding, (void)rounding_keys, (void)key, (void)first;
        for (int i = 0; i < n; ++i) x[i] = value(i);  // float32 is already exact
    } else if (rounding == kRoundNearest) {
        for (int i = 0; i < n; ++i) x[i] = static_cast<uint16_t>(Format::bits_from_float(value(i)));
    } else if (rounding == kRoundStochastic) {
        alignas(64) float u[kTile + 4];
        const int lead = static_cast<int>(first % 4);
        uniform_blocks<Philox>(rounding_keys, key, kStreamRounding, first / 4, (lead + n + 3) / 4,
                               u);
        const float* u_at = u + lead;
        for (int i = 0; i < n; ++i)
            x[i] = static_cast<uint16_t>(stochastic_round_bits<Format>(value(i), u_at[i]));
    } else {
        constexpr int kPerCounter = 8;
        alignas(64) uint32_t w0[kTile / kPerCounter + 1], w1[kTile / kPerCounter + 1],
            w2[kTile / kPerCounter + 1], w3[kTile / kPerCounter + 1];
        alignas(64) uint32_t random16[kTile + kPerCounter];
        const int lead = static_cast<int>(first % kPerCounter);
        const int n_blocks = (lead + n + kPerCounter - 1) / kPerCounter;
        Philox::blocks(rounding_keys, first / kPerCounter, key, kStreamRounding, n_blocks, w0, w1,
                       w2, w3);
        for (int q = 0; q < n_blocks; ++q) {
            uint32_t* r = random16 + kPerCounter * q;
            r[0] = w0[q] & 0xFFFFu, r[1] = w0[q] >> 16, r[2] = w1[q] & 0xFFFFu, r[3] = w1[q] >> 16;
            r[4] = w2[q] & 0xFFFFu, r[5] = w2[q] >> 16, r[6] = w3[q] & 0xFFFFu, r[7] = w3[q] >> 16;
        }
        const uint32_t* r_at = random16 + lead;
        for (int i = 0; i < n; ++i)
            x[i] = static_cast<uint16_t>(integer_stochastic_round_bits<Format>(value(i), r_at[i]));
    }
}

// round_store_at for a tile whose first element index tile_first is a multiple of 8.
template <class Philox, class Format, class Value>
inline void round_store(const Value& value, int n, typename Format::storage* x, int rounding,
                        const PhiloxKeys& rounding_keys, uint32_t key, uint64_t tile_first) {
    round_store_at<Philox, Format>(value, n, x, rounding, rounding_keys, key, tile_first);
}

// x[i] = round(acc[i]) for i < n (lowrank_perturb_).
template <class Philox, class Format>
inline void store_rounded(const float* ZK_RESTRICT acc, int n, typename Format::storage* ZK_RESTRICT x,
                          int rounding, const PhiloxKeys& rounding_keys, uint32_t key,
                          uint64_t tile_first) {
    round_store<Philox, Format>([acc](int i) { return acc[i]; }, n, x, rounding, rounding_keys,
                                key, tile_first);
}

}  // namespace zk
