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

// out: float32 [numel], out[j] = z(seed, key, offset + j). contract (1 or 2): the version of the
// gaussian normals (docs/noise-contract.md), also in perturb and scatter_perturb.
void noise(uintptr_t out_ptr, uint64_t numel, uint64_t seed, uint32_t key, uint64_t offset, int dist,
           int num_threads, int contract = 2);

// out: float32 [n, 2], the contract v2 normals (n_cos, n_sin) of the words w_radius[q], w_angle[q]
// (uint32 [n] each): the Box-Muller alone, for tests on chosen words.
void normal_pairs_v2(uintptr_t w_radius_ptr, uintptr_t w_angle_ptr, uintptr_t out_ptr, uint64_t n);

// applied: empty, or one coefficient per seed: the perturbation the tensors hold now, undone first.
// Undo log (docs/undo-log.md), log_mode 0: none; 1: append the elements recovery could not give
// back (index: int64 [capacity], group-flat; values: [capacity] in the tensors' dtype) and write
// the tensors; 2: count only, nothing written but the count. *count (int64) is added to, also
// past the capacity; slots are taken in no particular order.
// Index maps (sharded tensors, docs/backends.md): index_offsets, index_local_spans and
// index_global_spans all empty (no tensor mapped), or one value each per tensor: local element i
// of tensor j draws its noise and rounding uniform at g(i) = offset_j + (i / local_span_j) *
// global_span_j + i % local_span_j; (0, n, n) is the identity. The log keeps local indices.
// Selector logs (selector_log.h, docs/undo-log.md): selector_out = (regions, words, pool,
// capacity, count, count_only) receives what a later pass needs to recover every weight exactly
// (nearest rounding, decays 1); selector_in = (regions, words, pool, capacity), with applied,
// is read to recover the weights exactly. Exclusive with log_mode != 0.
// source_ptrs (empty, or one per tensor, same dtype and numel): out of place, tensor j is written
// round(decay * s_j[i] + D) from source s_j, which is only read; excludes applied and every log.
void perturb(const std::vector<uintptr_t>& ptrs, const std::vector<uint64_t>& numels,
             const std::vector<uint32_t>& keys, const std::vector<float>& decays, int dtype,
             const std::vector<uint64_t>& seeds, const std::vector<float>& scales,
             const std::vector<float>& applied, int dist, int rounding, uint64_t rounding_seed,
             int num_threads, uintptr_t log_index_ptr = 0, uintptr_t log_values_ptr = 0,
             uint64_t log_capacity = 0, uintptr_t log_count_ptr = 0, int log_mode = 0,
             const std::vector<uint64_t>& index_offsets = {},
             const std::vector<uint64_t>& index_local_spans = {},
             const std::vector<uint64_t>& index_global_spans = {}, int contract = 2,
             const std::vector<uint64_t>& selector_out = {},
             const std::vector<uint64_t>& selector_in = {},
             const std::vector<uintptr_t>& source_ptrs = {});

// Rewrites the first min(*count, capacity) entries of an undo log over the same tensor list:
// with no seeds t[index[e]] = values[e] bit for bit, else t_j[i] = round(decay_j * values[e] + D)
// with perturb's D and rounding for element i, as a dense pass from values[e] would leave it.
// Index maps as in perturb: the log's indices are local, noise and rounding are drawn at g(i).
void scatter_perturb(const std::vector<uintptr_t>& ptrs, const std::vector<uint64_t>& numels,
                     const std::vector<uint32_t>& keys, const std::vector<float>& decays, int dtype,
                     uintptr_t index_ptr, uintptr_t values_ptr, uint64_t capacity,
                     uintptr_t count_ptr, const std::vector<uint64_t>& seeds,
                     const std::vector<float>& scales, int dist, int rounding,
                     uint64_t rounding_seed, int num_threads,
                     const std::vector<uint64_t>& index_offsets = {},
                     const std::vector<uint64_t>& index_local_spans = {},
                     const std::vector<uint64_t>& index_global_spans = {},
                     int contract = 2);

// W_j = round(decay_j * theta + scale * U_j diag(tau_j) V_j^T); theta = W_j, or with
// applied_tau_ptrs (one per weight) the weight recovered from round(theta + applied_scale *
// U_j diag(applied_tau_j) V_j^T). Undo log (log_mode 0 none, 1 log and write, 2 count only): as
// perturb's, over the group-flat index of the weights in list order (docs/undo-log.md).
// Selector logs (selector_out / selector_in, perturb's format; exclusive with log_mode != 0;
// selector_in needs applied_tau_ptrs): perturb's blocks of 1024 elements of each weight's flat
// index, the weights' blocks following each other in list order.
// Drawn factors: a weight whose u_ptr and v_ptr are both 0 has its factors drawn by the pass
// from the gaussian noise of (factor_seed, keys[j]) with normals version factor_contract:
// U_j[row, k] = z(u_offsets[j] + row * r + k), V_j[col, k] = z(v_offsets[j] + col * r + k), the
// values noise() gives; V_j once per weight, U_j's rows per work item (no m x r scratch).
void lowrank_perturb(const std::vector<uintptr_t>& w_ptrs, const std::vector<uint64_t>& ms,
                     const std::vector<uint64_t>& ns, const std::vector<uint64_t>& ranks,
                     const std::vector<uintptr_t>& u_ptrs, const std::vector<uintptr_t>& v_ptrs,
                     const std::vector<uintptr_t>& tau_ptrs, const std::vector<float>& decays,
                     float scale, const std::vector<uint32_t>& keys, int dtype, int rounding,
                     uint64_t rounding_seed, int num_threads,
                     const std::vector<uintptr_t>& applied_tau_ptrs = {},
                     float applied_scale = 0.0f,
                     uintptr_t log_index_ptr = 0, uintptr_t log_values_ptr = 0,
                     uint64_t log_capacity = 0, uintptr_t log_count_ptr = 0, int log_mode = 0,
                     const std::vector<uint64_t>& selector_out = {},
                     const std::vector<uint64_t>& selector_in = {},
                     uint64_t factor_seed = 0, const std::vector<uint64_t>& u_offsets = {},
                     const std::vector<uint64_t>& v_offsets = {}, int factor_contract = 0);

// out (rows x m, row stride out_row_stride) += ((x V) diag(coef)) U^T: x (rows x n, row stride
// x_row_stride), U (m x r) and V (n x r) contiguous, all of `dtype`; coef (r) float32. float32
// arithmetic, out rounded to nearest once (lowrank_term.cpp).
void lowrank_linear_term(uintptr_t out_ptr, int64_t out_row_stride, uintptr_t x_ptr,
                         int64_t x_row_stride, int64_t rows, int64_t n, int64_t m, int64_t r,
                         uintptr_t u_ptr, uintptr_t v_ptr, uintptr_t coef_ptr, int dtype,
                         int num_threads);

// Rewrites the first min(*count, capacity) entries of a low-rank pass's undo log over the same
// weight list: with no taus (tau_ptrs empty) W[index[e]] = values[e] bit for bit, else
// round(decay_j * values[e] + scale * P_j[row, col]) with lowrank_perturb's P and rounding.
void lowrank_scatter(const std::vector<uintptr_t>& w_ptrs, const std::vector<uint64_t>& ms,
                     const std::vector<uint64_t>& ns, const std::vector<uint64_t>& ranks,
                     const std::vector<uintptr_t>& u_ptrs, const std::vector<uintptr_t>& v_ptrs,
                     const std::vector<uintptr_t>& tau_ptrs, const std::vector<float>& decays,
                     float scale, const std::vector<uint32_t>& keys, int dtype,
                     uintptr_t index_ptr, uintptr_t values_ptr, uint64_t capacity,
                     uintptr_t count_ptr, int rounding, uint64_t rounding_seed, int num_threads);

}  // namespace zk
