// Compaction of per-element flags into the list of their positions: how the CPU kernels find
// the few elements of a tile that need more work (recovery's fallback candidates, the undo log)
// without a branch per element.
#pragma once

#include <cstring>

#include "common.h"

namespace zk {

// For each byte of 8 flags (bit j = flag j): the positions of its set bits, and their number.
struct CompactTable {
    uint8_t position[256][8];
    uint8_t count[256];
    constexpr CompactTable() : position{}, count{} {
        for (int mask = 0; mask < 256; ++mask) {
            int k = 0;
            for (int j = 0; j < 8; ++j)
                if ((mask >> j) & 1) position[mask][k++] = static_cast<uint8_t>(j);
            count[mask] = static_cast<uint8_t>(k);
        }
    }
};
inline constexpr CompactTable kCompactTable{};

// The positions i < n (ascending) of the set flags (each 0 or 1) into at; returns their
// number. Eight flags are packed into a byte mask by one multiply (byte j's low bit lands on
// bit 56 + j, the cross terms below bit 56 or past bit 63), whose positions come from a table:
// eight stores per eight flags (at most up to at[i + 7], i < n: inside the caller's n entries),
// without a branch. Walking the set bits of 64 flags instead ended in a mispredicted branch
// every 64 flags; the branch-free one-at-a-time compaction (at[count] = i; count += flag)
// carried its store address from one element to the next.
ZK_INLINE int compact_flags(const uint8_t* flags, int n, int32_t* at) {
    int count = 0;
    int i = 0;
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    for (; i + 8 <= n; i += 8) {
        uint64_t word;
        std::memcpy(&word, flags + i, 8);
        const uint32_t mask = static_cast<uint32_t>((word * 0x0102040810204080ull) >> 56);
        const uint8_t* position = kCompactTable.position[mask];
        for (int k = 0; k < 8; ++k) at[count + k] = i + position[k];
        count += kCompactTable.count[mask];
    }
#endif
    for (; i < n; ++i) {
        at[count] = i;
        count += flags[i];
    }
    return count;
}

}  // namespace zk
