"""Rewrite the elements of an undo log (docs/undo-log.md, "The scatter pass"), ONE launch:

    for e in [0, min(count, C)):   j, i = tensor and element of group-flat index[e]
        K == 0:  t_j[i] = values[e]                                   (bit copy: restore)
        else:    t_j[i] = round(decays[j] * v + D),  v = float32(values[e]),
                 D = sum_k scales[k] * z(seeds[k], key_j, i)          (from 0.0, seed order)

The noise sum, the ``decay * v + D`` expression and the rounding (nearest, or stochastic with
stream 1 of ``rounding_seed`` at (key_j, i)) are written exactly as in ``_perturb_kernel``, so a
compiled scatter leaves an entry bit-identical to what the dense pass would write starting from v.

Programs cover the C = capacity slots of the log, BLOCK entries each; ``count`` is read on the
device (no host synchronization) and programs past it return at once. Each lane finds its tensor
by a LOG2_P-step binary search over the tensors' first group-flat indices (launch table of
perturb.py built with block = 1, L1-resident) and generates its own Philox block (entries share
none). Bytes moved per entry: 8 (index) + 2 * itemsize (value, tensor element), gathered.

Index maps (MAPPED, table rows of 8 values as in perturb.py): the log holds LOCAL group-flat
indices; a lane maps its local element i to the contract index
``g(i) = map_offset + (i // local_span) * global_span + i % local_span`` (one 64-bit division per
lane: entries are scattered, no grouping applies) and takes z and the rounding uniform at g(i).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._contract import DEFAULT_CONTRACT, integer_rounding, normals_version
from ._common import (DIST_CODES, cached_table, count_launch, find_entry, load_seed, noise_at,
                      round_nearest, round_stochastic, round_stochastic_integer, rounding_bits_at,
                      rounding_uniform_at, to_float32, SOFT_BF16)

# 4 entries per thread at 4 warps: each lane runs its own Philox call and Box-Muller, so a lane
# costs ~4x the registers of a dense-kernel element; sm_90 (ptxas): 89 registers for gaussian,
# 69 rademacher, no spills; 1024 entries at 4 warps needs 128 registers and spills (gaussian).
# Programs past ``count`` (the log's headroom) return at once.
BLOCK = 512
NUM_WARPS = 4


@triton.jit(do_not_specialize=["K", "capacity"])
def _scatter_perturb_kernel(base_ptr, table_ptr, seeds_ptr, index_ptr, values_ptr, count_ptr,
                            capacity, decays_ptr, scales_ptr, K,
                            LOG2_P: tl.constexpr, BLOCK: tl.constexpr, DIST: tl.constexpr,
                            STOCHASTIC: tl.constexpr, COPY: tl.constexpr, MAPPED: tl.constexpr,
                            SOFT_BF16: tl.constexpr, NORMAL: tl.constexpr):
    P: tl.constexpr = 1 << LOG2_P
    ROW: tl.constexpr = 8 if MAPPED else 4
    pid = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.load(count_ptr), capacity)  # count may exceed the capacity (overflow)
    if pid * BLOCK >= n:
        return
    e = pid * BLOCK + tl.arange(0, BLOCK)
    live = e < n
    g = tl.load(index_ptr + e, mask=live, other=0)  # group-flat index
    j = find_entry(table_ptr, g, LOG2_P)  # per lane: first_j <= g < first_(j+1)
    row_ptr = table_ptr + P + ROW * j
    i = g - tl.load(row_ptr + 3)  # local element index
    # an index outside the group (a log of another tensor list) must not write out of bounds
    live = live & (i >= 0) & (i < tl.load(row_ptr + 1))
    ptrs = base_ptr + tl.load(row_ptr) + i
    v = tl.load(values_ptr + e, mask=live)
    if COPY:
        tl.store(ptrs, v, mask=live)
    else:
        key = tl.load(row_ptr + 2).to(tl.uint32)
        if MAPPED:  # the contract index g(i) of the local element (per lane: one division each)
            local_span = tl.load(row_ptr + 5)
            c = tl.load(row_ptr + 4) + (i // local_span) * tl.load(row_ptr + 6) + i % local_span
        else:
            c = i
        # the same expression shapes as _perturb_kernel: identical FMA contraction, identical bits
        d = tl.zeros([BLOCK], tl.float32)
        for k in range(K):
            z = noise_at(load_seed(seeds_ptr + k), key, c, DIST, NORMAL)
            d = d + tl.load(scales_ptr + k) * z
        acc = tl.load(decays_ptr + j) * to_float32(v, SOFT_BF16) + d
        if STOCHASTIC == 2:  # contract 3: integer stochastic rounding
            r = rounding_bits_at(load_seed(seeds_ptr + K), key, c)
            y = round_stochastic_integer(acc, r, base_ptr.dtype.element_ty, SOFT_BF16)
        elif STOCHASTIC:
            u = rounding_uniform_at(load_seed(seeds_ptr + K), key, c)
            y = round_stochastic(acc, u, base_ptr.dtype.element_ty, SOFT_BF16)
        else:
            y = round_nearest(acc, base_ptr.dtype.element_ty, SOFT_BF16)
        tl.store(ptrs, y, mask=live)


def scatter_perturb_triton(tensors: list[torch.Tensor], keys: list[int], index: torch.Tensor,
                           values: torch.Tensor, count: torch.Tensor, seeds: list[int],
                           scales: torch.Tensor, decays: torch.Tensor, dist: str, rounding: str,
                           rounding_seed: int, index_maps=None,
                           table_cache: dict | None = None,
                           contract: int = DEFAULT_CONTRACT) -> None:
    """In place, for the first min(count, C) entries of a log (index int64 [C], values [C] in the
    tensors' dtype, count int64 [1], all on the device; same tensor list and order as the pass
    that wrote it): K = 0 seeds copies values[e] into its element; K >= 1 writes
    round(decays[j] * values[e] + D) as perturb_ would. One launch, no host synchronization;
    nothing is launched for an empty log (C = 0). ``index_maps``: as in ``perturb_triton``; the
    log's indices are local, the noise and rounding of local element i are taken at g(i).
    ``table_cache``, ``contract``: as in ``perturb_triton``."""
    capacity = index.numel()
    if capacity == 0:
        return
    # a bit copy (K == 0) reads no map, but keeps them: its table is the same as the update's
    launch = cached_table(table_cache, tensors, keys, seeds, rounding_seed, 1, index_maps)
    base = launch.base
    stochastic = 0  # STOCHASTIC: as in _perturb_kernel (2: contract 3's integer rounding)
    if rounding == "stochastic" and base.dtype != torch.float32:
        stochastic = 2 if integer_rounding(contract) else 1
    _scatter_perturb_kernel[(triton.cdiv(capacity, BLOCK),)](
        base, launch.table, launch.seeds, index, values, count, capacity, decays.contiguous(),
        scales.contiguous(), len(seeds),
        LOG2_P=launch.log2_p, BLOCK=BLOCK, DIST=DIST_CODES[dist],
        STOCHASTIC=stochastic, COPY=len(seeds) == 0, MAPPED=launch.mapped, SOFT_BF16=SOFT_BF16,
        NORMAL=normals_version(contract),
        num_warps=NUM_WARPS)
    count_launch()
