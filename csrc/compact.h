// Compaction of per-element flags into the list of their positions: how the CPU kernels find
// the few elements of a tile that need more work (recovery's fallback candidates, the undo log)
// without a branch per element.
#pragma once

#include <cstring>

#include "common.h"

#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#endif
#if ZK_HAVE_AVX2_PATH
#include <immintrin.h>
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

// Entries past the count that CompactAvx2 may overwrite: its `at` needs n + kCompactSlack.
constexpr int kCompactSlack = 8;

// For each 8-bit mask: the positions of its set bits, one per byte from the lowest, and their
// number.
struct CompactTable {
    uint64_t positions[256];
    uint8_t count[256];
    constexpr CompactTable() : positions(), count() {
        for (int m = 0; m < 256; ++m) {
            int c = 0;
            for (int b = 0; b < 8; ++b)
                if (m >> b & 1) positions[m] |= static_cast<uint64_t>(b) << (8 * c++);
            count[m] = static_cast<uint8_t>(c);
        }
    }
};
inline constexpr CompactTable kCompactTable{};

// The ISA clones' compaction (selected by IsaOf<Philox>::Compact, noise_tiles.h): compact_flags'
// result into `at`, whose room must be n + kCompactSlack entries.
struct CompactGeneric {
    static ZK_INLINE int flags(const uint8_t* flags, int n, int32_t* at) {
        return compact_flags(flags, n, at);
    }
};

#if ZK_HAVE_AVX2_PATH
// Without a branch per element or per word: 32 flags to a mask (one movemask), then per 8 flags
// the table's positions widened to int32, offset and stored whole (up to 7 past the count, hence
// the slack), the count advanced by the table's. The walk of compact_flags mispredicts its loop
// exit about once per 64 flags: 40% of a selector block's classification (perf, bfloat16).
struct CompactAvx2 {
    ZK_TARGET_AVX2 static inline int flags(const uint8_t* flags, int n, int32_t* at) {
        int count = 0;
        int i = 0;
        for (; i + 32 <= n; i += 32) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(flags + i));
            const uint32_t mask =
                static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_slli_epi16(v, 7)));
            for (int k = 0; k < 4; ++k) {
                const uint32_t m = mask >> (8 * k) & 0xFFu;
                const __m128i packed = _mm_loadl_epi64(
                    reinterpret_cast<const __m128i*>(&kCompactTable.positions[m]));
                const __m256i positions =
                    _mm256_add_epi32(_mm256_cvtepu8_epi32(packed), _mm256_set1_epi32(i + 8 * k));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(at + count), positions);
                count += kCompactTable.count[m];
            }
        }
        for (; i < n; ++i) {
            at[count] = i;
            count += flags[i];
        }
        return count;
    }
};
#endif

}  // namespace zk
