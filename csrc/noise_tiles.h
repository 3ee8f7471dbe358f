// Noise for a run of consecutive Philox counters, written into a small stack buffer: the building
// block shared by noise, perturb_ and lowrank_perturb_. `Philox` is PhiloxGeneric or PhiloxAvx2;
// the loops here are plain C++ that the compiler vectorizes for the ISA of the calling kernel.
#pragma once

#include "compact.h"
#include "fastmath.h"
#include "philox.h"

namespace zk {

// Elements per tile: a multiple of 128 (one rademacher counter) and of 4 (one gaussian counter);
// 1024 keeps the tile's buffers (noise sums, u, Philox words: 16-20 KiB) in L1.
constexpr int kTile = 1024;
constexpr int kGaussianPerCounter = 4;
constexpr int kRademacherPerCounter = 128;
constexpr int kMaxCountersPerTile = kTile / kGaussianPerCounter;

enum Dist : int { kGaussian = 0, kRademacher = 1, kUniform = 2 };

// Contract version of the gaussian normals (docs/noise-contract.md): v1 box_muller, v2
// box_muller_v2. Words, uniforms and rademacher values are the same in both.
enum Contract : int { kContractV1 = 1, kContractV2 = 2 };

// What differs between the ISA clones (named by their Philox): the fma (fastmath.h: the
// instruction in the AVX2 clone) and the flag compaction (compact.h).
template <class Philox>
struct IsaOf {
    using Fma = FmaPortable;
    using Compact = CompactGeneric;
};
#if ZK_HAVE_AVX2_PATH
template <>
struct IsaOf<PhiloxAvx2> {
    using Fma = FmaHardware;
    using Compact = CompactAvx2;
};
#endif

// z[4q + m] = n_m for the counters first_block + q, q < n_blocks <= kMaxCountersPerTile (n0, n1
// from words 0, 1 and n2, n3 from words 2, 3). Box-Muller runs on whole vectors of counters (the
// words come in structure-of-arrays form) and the store interleaves the four results.
template <class Philox>
inline void gaussian_blocks(const PhiloxKeys& keys, uint32_t key, uint64_t first_block, int n_blocks,
                            Contract contract, float* ZK_RESTRICT z) {
    alignas(64) uint32_t w0[kMaxCountersPerTile], w1[kMaxCountersPerTile],
        w2[kMaxCountersPerTile], w3[kMaxCountersPerTile];
    Philox::blocks(keys, first_block, key, kStreamNoise, n_blocks, w0, w1, w2, w3);
    if (contract == kContractV2) {
        using Fma = typename IsaOf<Philox>::Fma;
        for (int q = 0; q < n_blocks; ++q) {
            float n0, n1, n2, n3;
            box_muller_v2<Fma>(w0[q], w1[q], n0, n1);
            box_muller_v2<Fma>(w2[q], w3[q], n2, n3);
            z[4 * q + 0] = n0;
            z[4 * q + 1] = n1;
            z[4 * q + 2] = n2;
            z[4 * q + 3] = n3;
        }
        return;
    }
    for (int q = 0; q < n_blocks; ++q) {
        float n0, n1, n2, n3;
        box_muller(w0[q], w1[q], n0, n1);
        box_muller(w2[q], w3[q], n2, n3);
        z[4 * q + 0] = n0;
        z[4 * q + 1] = n1;
        z[4 * q + 2] = n2;
        z[4 * q + 3] = n3;
    }
}

// acc[i] += scale * z_i for the 4 * n_blocks elements of the counters (perturb_). The noise goes
// through an L1 buffer in element order: adding it to acc in the Box-Muller loop made the
// compiler de-interleave and re-interleave acc (about twice the shuffles of one store).
template <class Philox>
inline void gaussian_accumulate(const PhiloxKeys& keys, uint32_t key, uint64_t first_block,
                                int n_blocks, Contract contract, float scale,
                                float* ZK_RESTRICT acc) {
    alignas(64) float z[kTile];
    gaussian_blocks<Philox>(keys, key, first_block, n_blocks, contract, z);
    for (int i = 0; i < 4 * n_blocks; ++i) acc[i] = acc[i] + scale * z[i];
}

// sum_a[i] += scale_a * z_i and sum_b[i] += scale_b * z_i from one evaluation of the noise
// (perturb_ with applied=: the recovery sum D1 and the new sum D2 see the same z).
template <class Philox>
inline void gaussian_accumulate_pair(const PhiloxKeys& keys, uint32_t key, uint64_t first_block,
                                     int n_blocks, Contract contract, float scale_a,
                                     float* ZK_RESTRICT sum_a, float scale_b,
                                     float* ZK_RESTRICT sum_b) {
    alignas(64) float z[kTile];
    gaussian_blocks<Philox>(keys, key, first_block, n_blocks, contract, z);
    for (int i = 0; i < 4 * n_blocks; ++i) {
        sum_a[i] = sum_a[i] + scale_a * z[i];
        sum_b[i] = sum_b[i] + scale_b * z[i];
    }
}

// u[4q + m] = uniform of word m of counter (first_block + q) in `stream`.
template <class Philox>
inline void uniform_blocks(const PhiloxKeys& keys, uint32_t key, uint32_t stream,
                           uint64_t first_block, int n_blocks, float* ZK_RESTRICT u) {
    alignas(64) uint32_t w0[kMaxCountersPerTile], w1[kMaxCountersPerTile],
        w2[kMaxCountersPerTile], w3[kMaxCountersPerTile];
    Philox::blocks(keys, first_block, key, stream, n_blocks, w0, w1, w2, w3);
    for (int q = 0; q < n_blocks; ++q) {
        u[4 * q + 0] = word_to_uniform(w0[q]);
        u[4 * q + 1] = word_to_uniform(w1[q]);
        u[4 * q + 2] = word_to_uniform(w2[q]);
        u[4 * q + 3] = word_to_uniform(w3[q]);
    }
}

// Rademacher layout: element 32*m + b of a counter's 128 is +1 if bit b of word m is set, else
// -1. Calls visit(offset_of_32_elements, sign_bits_of_element(b)) with sign bits 0 or 0x80000000.
// n_blocks <= kTile / 128.
template <class Philox, class Visit>
inline void rademacher_sign_words(const PhiloxKeys& keys, uint32_t key, uint64_t first_block,
                                  int n_blocks, const Visit& visit) {
    constexpr int kMax = kTile / kRademacherPerCounter;
    alignas(64) uint32_t w[4][kMax];
    Philox::blocks(keys, first_block, key, kStreamNoise, n_blocks, w[0], w[1], w[2], w[3]);
    for (int q = 0; q < n_blocks; ++q)
        for (int m = 0; m < 4; ++m) visit(q * kRademacherPerCounter + 32 * m, ~w[m][q]);
}

// z = +-1 as floats (noise op).
template <class Philox>
inline void rademacher_blocks(const PhiloxKeys& keys, uint32_t key, uint64_t first_block,
                              int n_blocks, float* ZK_RESTRICT z) {
    rademacher_sign_words<Philox>(keys, key, first_block, n_blocks, [&](int at, uint32_t negated) {
        for (uint32_t b = 0; b < 32; ++b)
            z[at + b] = bits_as<float>((((negated >> b) & 1u) << 31) | 0x3F800000u);
    });
}

// acc[i] += scale * z_i (perturb_). scale * (+-1) is exactly +-scale, so the sign bit of scale is
// flipped instead of multiplying, fused with the accumulation: no z array round trip.
template <class Philox>
inline void rademacher_accumulate(const PhiloxKeys& keys, uint32_t key, uint64_t first_block,
                                  int n_blocks, float scale, float* ZK_RESTRICT acc) {
    const uint32_t scale_bits = bits_as<uint32_t>(scale);
    rademacher_sign_words<Philox>(keys, key, first_block, n_blocks, [&](int at, uint32_t negated) {
        float* out = acc + at;
        for (uint32_t b = 0; b < 32; ++b)
            out[b] = out[b] + bits_as<float>(scale_bits ^ (((negated >> b) & 1u) << 31));
    });
}

// sum_a[i] += scale_a * z_i and sum_b[i] += scale_b * z_i, one set of sign words for both.
template <class Philox>
inline void rademacher_accumulate_pair(const PhiloxKeys& keys, uint32_t key, uint64_t first_block,
                                       int n_blocks, float scale_a, float* ZK_RESTRICT sum_a,
                                       float scale_b, float* ZK_RESTRICT sum_b) {
    const uint32_t a_bits = bits_as<uint32_t>(scale_a);
    const uint32_t b_bits = bits_as<uint32_t>(scale_b);
    rademacher_sign_words<Philox>(keys, key, first_block, n_blocks, [&](int at, uint32_t negated) {
        float* out_a = sum_a + at;
        float* out_b = sum_b + at;
        for (uint32_t b = 0; b < 32; ++b) {
            const uint32_t sign = ((negated >> b) & 1u) << 31;
            out_a[b] = out_a[b] + bits_as<float>(a_bits ^ sign);
            out_b[b] = out_b[b] + bits_as<float>(b_bits ^ sign);
        }
    });
}

// A tile that starts anywhere in the contract index (a run of a sharded tensor, whose head and
// tail need not be aligned to a counter): the counters that feed positions [skip, skip + n) of the
// kTile-aligned tile at tile_first, per_counter = 4 (gaussian) or 128 (rademacher) elements each.
// Their elements fill tile positions [at, at + per_counter * n_blocks), inside the tile, so the
// accumulators above write there unchanged and only the head's and tail's partial counters cost
// extra elements.
struct CoveringCounters {
    uint64_t first_block;
    int n_blocks;
    int at;
};

inline CoveringCounters covering_counters(uint64_t tile_first, int skip, int n, int per_counter) {
    const int at = skip - skip % per_counter;
    const int end = (skip + n + per_counter - 1) / per_counter * per_counter;
    return {(tile_first + static_cast<uint64_t>(at)) / static_cast<uint64_t>(per_counter),
            (end - at) / per_counter, at};
}

// z(seed, key, tile_first + j) for j < kTile, any dist; tile_first is a multiple of 128.
template <class Philox>
inline void noise_tile(Dist dist, Contract contract, const PhiloxKeys& keys, uint32_t key,
                       uint64_t tile_first, float* ZK_RESTRICT z) {
    switch (dist) {
        case kGaussian:
            gaussian_blocks<Philox>(keys, key, tile_first / 4, kTile / 4, contract, z);
            break;
        case kRademacher:
            rademacher_blocks<Philox>(keys, key, tile_first / 128, kTile / 128, z);
            break;
        default:
            uniform_blocks<Philox>(keys, key, kStreamNoise, tile_first / 4, kTile / 4, z);
            break;
    }
}

}  // namespace zk
