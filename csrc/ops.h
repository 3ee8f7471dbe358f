// The kernels behind zokernels._C (see docs/backends.md). Pointers arrive as integers from
// tensor.data_ptr(); Python has validated shapes, dtypes and ranges, so these functions check only
// what would otherwise corrupt memory (list lengths) and throw std::invalid_argument.
#pragma once

#include <array>
#include <vector>

#include "common.h"

namespace zk {

std::array<uint32_t, 4> philox_words(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3);

// counters, out: int64 [n, 4] holding uint32 values.
void philox_fill(uint64_t seed, uintptr_t counters_ptr, uintptr_t out_ptr, uint64_t n, int num_threads);

// out: float32 [numel], out[j] = z(seed, key, offset + j).
void noise(uintptr_t out_ptr, uint64_t numel, uint64_t seed, uint32_t key, uint64_t offset, int dist,
           int num_threads);

// applied: empty, or one coefficient per seed: the perturbation the tensors hold now, undone first.
void perturb(const std::vector<uintptr_t>& ptrs, const std::vector<uint64_t>& numels,
             const std::vector<uint32_t>& keys, const std::vector<float>& decays, int dtype,
             const std::vector<uint64_t>& seeds, const std::vector<float>& scales,
             const std::vector<float>& applied, int dist, int rounding, uint64_t rounding_seed,
             int num_threads);

void lowrank_perturb(const std::vector<uintptr_t>& w_ptrs, const std::vector<uint64_t>& ms,
                     const std::vector<uint64_t>& ns, const std::vector<uint64_t>& ranks,
                     const std::vector<uintptr_t>& u_ptrs, const std::vector<uintptr_t>& v_ptrs,
                     const std::vector<uintptr_t>& tau_ptrs, const std::vector<float>& decays,
                     float scale, const std::vector<uint32_t>& keys, int dtype, int rounding,
                     uint64_t rounding_seed, int num_threads);

}  // namespace zk
