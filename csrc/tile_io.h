// Loading a tile of a tensor into float32 and storing it back rounded once (nearest or
// stochastic), shared by perturb_ and lowrank_perturb_.
#pragma once

#include <type_traits>

#include "noise_tiles.h"
#include "rounding.h"

namespace zk {

// acc[i] = decay * float32(x[i]) for i < n.
template <class Format>
inline void load_decayed(const typename Format::storage* ZK_RESTRICT x, int n, float decay,
                         float* ZK_RESTRICT acc) {
    for (int i = 0; i < n; ++i) acc[i] = decay * Format::to_float(x[i]);
}

// x[i] = round(value(i)) for i < n, where element i has contract index 4 * first_block + lead
// + i (lead < 4, lead + n <= kTile): the stochastic uniform of element i is word (lead + i) % 4
// of stream-1 counter first_block + (lead + i) / 4. value(i) may read x[i] (perturb_ reads the
// weight here, in place): each element is read before it is written.
template <class Philox, class Format, class Value>
inline void round_store_blocks(const Value& value, int n, typename Format::storage* x,
                               bool stochastic, const PhiloxKeys& rounding_keys, uint32_t key,
                               uint64_t first_block, int lead) {
    if constexpr (std::is_same<Format, Float32Format>::value) {
        (void)stochastic, (void)rounding_keys, (void)key, (void)first_block, (void)lead;
        for (int i = 0; i < n; ++i) x[i] = value(i);  // float32 is already exact
    } else {
        if (!stochastic) {
            for (int i = 0; i < n; ++i) x[i] = static_cast<uint16_t>(Format::bits_from_float(value(i)));
            return;
        }
        alignas(64) float u[kTile];
        uniform_blocks<Philox>(rounding_keys, key, kStreamRounding, first_block, (lead + n + 3) / 4,
                               u);
        const float* u_at = u + lead;
        for (int i = 0; i < n; ++i)
            x[i] = static_cast<uint16_t>(stochastic_round_bits<Format>(value(i), u_at[i]));
    }
}

// x[i] = round(value(i)) for i < n, where element i has flat index tile_first + i (a multiple of
// 4, so the stream-1 counters of stochastic rounding start at tile_first / 4).
template <class Philox, class Format, class Value>
inline void round_store(const Value& value, int n, typename Format::storage* x, bool stochastic,
                        const PhiloxKeys& rounding_keys, uint32_t key, uint64_t tile_first) {
    round_store_blocks<Philox, Format>(value, n, x, stochastic, rounding_keys, key, tile_first / 4,
                                       0);
}

// round_store for elements whose contract indices first .. first + n - 1 start anywhere (a run of
// a sharded tensor, docs/backends.md "index maps"); (first % 4) + n <= kTile.
template <class Philox, class Format, class Value>
inline void round_store_at(const Value& value, int n, typename Format::storage* x, bool stochastic,
                           const PhiloxKeys& rounding_keys, uint32_t key, uint64_t first) {
    round_store_blocks<Philox, Format>(value, n, x, stochastic, rounding_keys, key, first / 4,
                                       static_cast<int>(first % 4));
}

// x[i] = round(acc[i]) for i < n (lowrank_perturb_).
template <class Philox, class Format>
inline void store_rounded(const float* ZK_RESTRICT acc, int n, typename Format::storage* ZK_RESTRICT x,
                          bool stochastic, const PhiloxKeys& rounding_keys, uint32_t key,
                          uint64_t tile_first) {
    round_store<Philox, Format>([acc](int i) { return acc[i]; }, n, x, stochastic, rounding_keys,
                                key, tile_first);
}

}  // namespace zk
