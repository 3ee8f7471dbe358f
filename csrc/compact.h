// Compaction of per-element flags into the list of their positions: how the CPU kernels find
// the few elements of a tile that need more work (recovery's fallback candidates, the undo log)
// without a branch per element.
#pragma once

#include <cstring>

#include "common.h"

#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#endif

namespace zk {

// Index of the lowest set bit of a non-zero mask.
inline int count_trailing_zeros(uint64_t mask) {
#if defined(_MSC_VER) && !defined(__clang__)
    unsigned long at;
    _BitScanForward64(&at, mask);
    return static_cast<int>(at);
#else
    return __builtin_ctzll(mask);
#endif
}

// The positions i < n (ascending) of the set flags (each 0 or 1) into at; returns their
// number. Eight flags are packed into a byte mask by one multiply (byte j's low bit lands on
// bit 56 + j, the cross terms below bit 56 or past bit 63), the set bits then walked: the
// branch-free one-at-a-time compaction (at[count] = i; count += flag) carried its store address
// from one element to the next and took 30% of a logging pass (perf, float32 rademacher).
ZK_INLINE int compact_flags(const uint8_t* flags, int n, int32_t* at) {
    int count = 0;
    int i = 0;
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    for (; i + 64 <= n; i += 64) {
        uint64_t mask = 0;
        for (int b = 0; b < 8; ++b) {
            uint64_t word;
            std::memcpy(&word, flags + i + 8 * b, 8);
            mask |= ((word * 0x0102040810204080ull) >> 56) << (8 * b);
        }
        while (mask != 0) {
            at[count++] = i + count_trailing_zeros(mask);
            mask &= mask - 1;
        }
    }
#endif
    for (; i < n; ++i) {
        at[count] = i;
        count += flags[i];
    }
    return count;
}

}  // namespace zk
