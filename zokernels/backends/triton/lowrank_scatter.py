"""Rewrite the elements of a low-rank pass's undo log (docs/undo-log.md), ONE launch:

    for e in [0, min(count, C)):   j, i = weight and element (i = row * n_j + col) of index[e]
        no taus:  W_j[i] = values[e]                                      (bit copy: restore)
        else:     W_j[i] = round(decays[j] * v + scale * P),  v = float32(values[e]),
                  P = U[row, 0] * (V[col, 0] * tau[0]) + U[row, 1] * (V[col, 1] * tau[1]) + ...

P is summed in k order, each product and sum rounded (the kernel is compiled with
``enable_fp_fusion=False``): the torch reference's and the C++ kernel's arithmetic, bit for bit.
The dense Triton pass computes P with ``tl.dot`` tiles instead, which no per-element code can
reproduce; a scattered update therefore matches the dense pass within the tolerance that
tests/test_lowrank.py allows the dense pass against the reference, while the restore (a bit copy)
is exact. Rounding: nearest, or stochastic with stream 1 of ``rounding_seed`` at (key_j, i)
(the uniform-based rule, or contract 3's 16 integer bits).

Programs cover the C = capacity slots of the log, BLOCK entries each; ``count`` is read on the
device (no host synchronization) and programs past it return at once. Each lane finds its weight
by a LOG2_P-step binary search over the weights' first group-flat indices.

Launch table (int64):

    [0, P)            first_j: group-flat index of W_j[0, 0], padded with INT64_MAX
    [P + 8j + 0..7]   w_off, m, n, r, u_off, v_off, tau_off (0 without taus), key
    [9P]              rounding seed
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._contract import DEFAULT_CONTRACT, integer_rounding
from .. import one_dtype
from ._common import (ITEMSIZE, as_int64_bits, count_launch, find_entry, int64_table, load_seed,
                      next_pow2, round_nearest, round_stochastic, round_stochastic_integer,
                      rounding_bits_at, rounding_uniform_at, to_float32, SOFT_BF16)

# One dot product of length r per lane from gathered U / V rows: 4 entries per thread at 4 warps,
# as the dense scatter (programs past ``count`` return at once).
BLOCK = 512
NUM_WARPS = 4
_INT64_MAX = (1 << 63) - 1


@triton.jit
def ordered_product(u_ptrs, v_ptrs, tau_ptrs, r, R_MAX, live, PER_LANE: tl.constexpr):
    """P = U[row, 0] * (V[col, 0] * tau[0]) + U[row, 1] * (V[col, 1] * tau[1]) + ... per lane
    (u_ptrs / v_ptrs: the lanes' U and V rows): k = 0 starts the sum (not +0.0, which would turn
    -0.0 into +0.0), then k in order, each product and sum rounded (callers compile with
    enable_fp_fusion=False): the torch reference's and the C++ kernel's P, bit for bit.
    PER_LANE (the scatter: lanes of different weights): tau_ptrs and the ranks r are per lane,
    at most R_MAX, loads masked by ``live``. Else (one weight per program): r and tau_ptrs are
    scalars, every lane's U / V pointers are in bounds (no masks), the loop runs r - 1 times."""
    if PER_LANE:
        p = tl.load(u_ptrs, mask=live, other=0.0) * (tl.load(v_ptrs, mask=live, other=0.0)
                                                     * tl.load(tau_ptrs, mask=live, other=0.0))
        for k in range(1, R_MAX):
            has_k = live & (k < r)
            term = tl.load(u_ptrs + k, mask=has_k, other=0.0) * (
                tl.load(v_ptrs + k, mask=has_k, other=0.0)
                * tl.load(tau_ptrs + k, mask=has_k, other=0.0))
            p = tl.where(has_k, p + term, p)
    else:
        p = tl.load(u_ptrs) * (tl.load(v_ptrs) * tl.load(tau_ptrs))
        for k in range(1, r):
            p = p + tl.load(u_ptrs + k) * (tl.load(v_ptrs + k) * tl.load(tau_ptrs + k))
    return p


@triton.jit(do_not_specialize=["capacity", "R_MAX"])
def _lowrank_scatter_kernel(w_base_ptr, f_base_ptr, table_ptr, index_ptr, values_ptr, count_ptr,
                            capacity, decays_ptr, scale_ptr, R_MAX,
                            LOG2_P: tl.constexpr, BLOCK: tl.constexpr, STOCHASTIC: tl.constexpr,
                            COPY: tl.constexpr, SOFT_BF16: tl.constexpr):
    P: tl.constexpr = 1 << LOG2_P
    pid = tl.program_id(0).to(tl.int64)
    used = tl.minimum(tl.load(count_ptr), capacity)  # count may exceed the capacity (overflow)
    if pid * BLOCK >= used:
        return
    e = pid * BLOCK + tl.arange(0, BLOCK)
    live = e < used
    g = tl.load(index_ptr + e, mask=live, other=0)  # group-flat index
    j = find_entry(table_ptr, g, LOG2_P)  # per lane: first_j <= g < first_(j+1)
    row_ptr = table_ptr + P + 8 * j
    m = tl.load(row_ptr + 1)
    n = tl.load(row_ptr + 2)
    i = g - tl.load(table_ptr + j)
    # an index outside the weights (a log of another list) must not write out of bounds
    live = live & (i >= 0) & (i < m * n)
    ptrs = w_base_ptr + tl.load(row_ptr) + i
    v = tl.load(values_ptr + e, mask=live)
    if COPY:
        tl.store(ptrs, v, mask=live)
    else:
        r = tl.load(row_ptr + 3)
        row = i // n
        col = i - row * n
        u_ptrs = f_base_ptr + tl.load(row_ptr + 4) + row * r
        v_ptrs = f_base_ptr + tl.load(row_ptr + 5) + col * r
        tau_ptrs = f_base_ptr + tl.load(row_ptr + 6)
        p = ordered_product(u_ptrs, v_ptrs, tau_ptrs, r, R_MAX, live, True)
        acc = tl.load(decays_ptr + j) * to_float32(v, SOFT_BF16) + tl.load(scale_ptr) * p
        key = tl.load(row_ptr + 7).to(tl.uint32)
        if STOCHASTIC == 2:  # contract 3: integer stochastic rounding
            rb = rounding_bits_at(load_seed(table_ptr + 9 * P), key, i)
            y = round_stochastic_integer(acc, rb, w_base_ptr.dtype.element_ty, SOFT_BF16)
        elif STOCHASTIC:
            u = rounding_uniform_at(load_seed(table_ptr + 9 * P), key, i)
            y = round_stochastic(acc, u, w_base_ptr.dtype.element_ty, SOFT_BF16)
        else:
            y = round_nearest(acc, w_base_ptr.dtype.element_ty, SOFT_BF16)
        tl.store(ptrs, y, mask=live)


def lowrank_scatter_triton(weights: list[torch.Tensor], us: list[torch.Tensor],
                           vs: list[torch.Tensor], taus: list[torch.Tensor] | None,
                           index: torch.Tensor, values: torch.Tensor, count: torch.Tensor,
                           scale: torch.Tensor, decays: torch.Tensor, keys: list[int],
                           rounding: str, rounding_seed: int,
                           contract: int = DEFAULT_CONTRACT) -> None:
    """In place, for the first min(count, C) entries of a low-rank log (index int64 [C], values
    [C] in the weights' dtype, count int64 [1], all on the device; same weight list and order as
    the pass that wrote it): taus None copies values[e] into its element; else writes
    round(decays[j] * values[e] + scale * P_j(tau_j)[row, col]) with the reference's k-ordered P
    (``contract`` 3: the integer stochastic rounding, else the uniform-based one).
    One launch, no host synchronization; nothing is launched for an empty log (C = 0)."""
    capacity = index.numel()
    if capacity == 0:
        return
    itemsize = ITEMSIZE[one_dtype(weights, "lowrank_scatter_triton")]
    w_ptrs = [w.data_ptr() for w in weights]
    w_i = min(range(len(weights)), key=w_ptrs.__getitem__)
    f_tensors = list(us) + list(vs) + list(taus or [])
    f_ptrs = [f.data_ptr() for f in f_tensors]
    f_i = min(range(len(f_tensors)), key=f_ptrs.__getitem__)
    w_base, f_base = w_ptrs[w_i], f_ptrs[f_i]

    p = next_pow2(len(weights))
    firsts, rows, first, max_r = [], [], 0, 1
    for j, w in enumerate(weights):
        m, n = w.shape
        r = us[j].shape[1]
        max_r = max(max_r, r)
        firsts.append(first)
        first += m * n
        rows += [(w_ptrs[j] - w_base) // itemsize, m, n, r, (us[j].data_ptr() - f_base) // 4,
                 (vs[j].data_ptr() - f_base) // 4,
                 0 if taus is None else (taus[j].data_ptr() - f_base) // 4, keys[j]]
    rows += [0] * (8 * (p - len(weights)))
    table = int64_table(firsts + [_INT64_MAX] * (p - len(weights)) + rows
                        + [as_int64_bits(rounding_seed)], weights[0].device)
    _lowrank_scatter_kernel[(triton.cdiv(capacity, BLOCK),)](
        weights[w_i], f_tensors[f_i], table, index, values, count, capacity,
        decays.contiguous(), scale.contiguous(), max_r,
        LOG2_P=p.bit_length() - 1, BLOCK=BLOCK,
        STOCHASTIC=(0 if rounding != "stochastic" or weights[0].dtype == torch.float32
                    else 2 if integer_rounding(contract) else 1),
        COPY=taus is None, SOFT_BF16=SOFT_BF16, num_warps=NUM_WARPS,
        enable_fp_fusion=False)  # P and the update stay the reference's roundings
    count_launch()
