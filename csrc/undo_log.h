// Undo-log helpers shared by the dense (perturb.cpp) and low-rank (lowrank.cpp) logging passes:
// slot reservation, the "will recovery give theta back" test, and the exact storage of a
// recovered weight (docs/undo-log.md).
#pragma once

#include <type_traits>

#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#endif

#include "compact.h"
#include "noise_tiles.h"
#include "rounding.h"

namespace zk {

// *p += v, returning the old value: reserves v consecutive log slots for one work item.
inline int64_t fetch_add(int64_t* p, int64_t v) {
#if defined(_MSC_VER) && !defined(__clang__)
    return _InterlockedExchangeAdd64(reinterpret_cast<volatile long long*>(p), v);
#else
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);  // the parallel region's barrier orders it
#endif
}

// Will recovery with d1 = d give theta back from y = round(theta + d)? A later applied= pass
// must compute its d1 bit for bit as this d (perturb: scale * z added to +0.0 in seed order,
// unfused; low-rank: applied_scale * P(applied_tau) with the same scratch and sums). NaN and
// -0.0 are always logged: a later pass may change their bits even when recovery returns them.
template <class Format>
ZK_INLINE bool lost_by_recovery(float theta, float y, float d) {
    const uint32_t theta_bits = bits_as<uint32_t>(theta);
    const uint32_t back_bits = bits_as<uint32_t>(recover_unperturbed<Format>(y, d));
    const bool is_nan = (theta_bits & 0x7FFFFFFFu) > 0x7F800000u;
    return (back_bits != theta_bits) | is_nan | (theta_bits == 0x80000000u);
}

// The tile positions i < n (ascending, into at) whose weight theta(i) recovery from
// y_i = rounded[i] with d[i] would not give back (lost_by_recovery); returns their number.
// Needs y_i = round_nearest(theta(i) + d[i]) (decay 1, nearest: what a logging pass writes).
// Stage 1, every element, cheap: if r = round(y - d) has theta's bits (theta neither NaN nor
// -0.0), recovery's first candidate r maps back to y (round(theta + d) is y), so recovery returns
// theta. That clears all but about the lost fraction itself (4.6% of N(0, 0.02) bf16 weights at
// eps = 1e-3, 7.5% fp32). Stage 2, the full check (three candidates), runs on the rest only.
template <class Format, class Theta>
ZK_INLINE int lost_positions(const Theta& theta, const typename Format::storage* rounded,
                             const float* d, int n, int32_t* at) {
    using G = Grid<Format>;
    alignas(64) uint8_t suspect[kTile];
    for (int i = 0; i < n; ++i) {
        const uint32_t theta_bits = bits_as<uint32_t>(theta(i));
        const float r = G::value(G::round_bits(Format::to_float(rounded[i]) - d[i]));
        const bool special = ((theta_bits & 0x7FFFFFFFu) > 0x7F800000u) | (theta_bits == 0x80000000u);
        suspect[i] = (bits_as<uint32_t>(r) != theta_bits) | special;
    }
    const int n_suspect = compact_flags(suspect, n, at);
    // Stage 2 on the suspects gathered into contiguous buffers, so that it vectorizes too.
    alignas(64) float theta_s[kTile], y_s[kTile], d_s[kTile];
    for (int q = 0; q < n_suspect; ++q) {
        const int i = at[q];
        theta_s[q] = theta(i);
        y_s[q] = Format::to_float(rounded[i]);
        d_s[q] = d[i];
    }
    alignas(64) uint8_t lost[kTile];
    for (int q = 0; q < n_suspect; ++q)
        lost[q] = lost_by_recovery<Format>(theta_s[q], y_s[q], d_s[q]);
    alignas(64) int32_t lost_at[kTile];
    const int n_lost = compact_flags(lost, n_suspect, lost_at);
    for (int q = 0; q < n_lost; ++q) at[q] = at[lost_at[q]];  // ascending: lost_at ascends
    return n_lost;
}

// The storage pattern of a value of the dtype's grid (a recovered weight): exact.
template <class Format>
ZK_INLINE typename Format::storage storage_of(float theta) {
    if constexpr (std::is_same<Format, Float32Format>::value)
        return theta;
    else
        return static_cast<uint16_t>(Grid<Format>::round_bits(theta));
}

}  // namespace zk
