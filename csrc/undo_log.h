// Undo-log helpers shared by the dense (perturb.cpp) and low-rank (lowrank.cpp) logging passes:
// slot reservation, the "will recovery give theta back" test, and the exact storage of a
// recovered weight (docs/undo-log.md).
#pragma once

#include <type_traits>

#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#endif

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

// The storage pattern of a value of the dtype's grid (a recovered weight): exact.
template <class Format>
ZK_INLINE typename Format::storage storage_of(float theta) {
    if constexpr (std::is_same<Format, Float32Format>::value)
        return theta;
    else
        return static_cast<uint16_t>(Grid<Format>::round_bits(theta));
}

}  // namespace zk
