"""Fused low-rank perturbation, in place, ONE launch for the whole weight list:

    W_j <- round(decays[j] * W_j + scale * U_j diag(tau_j) V_j^T)

tile by tile: a program owns one BM x BN tile of one weight, accumulates
``U_tile @ (V_tile * tau)^T`` over the rank in RK-wide chunks with ``tl.dot`` (float32
accumulator), and rounds once (nearest-even, or stochastic with stream 1 of ``rounding_seed`` at
``i = row * n + col`` under the weight's key). The m x n product never exists in memory.
Bytes moved per weight element: one read and one write of W's dtype; U / V / tau (float32, r
values per row / column) are re-read once per tile row / column, mostly from L2.

Launch table (one int64 tensor, built per call, copied without a host synchronization):

    [0, P)            starts[j]: first program of weight j (prefix sum of tiles), padded to
                      P = next_pow2(T) with INT64_MAX; binary search as in perturb
    [P + 8j + 0..7]   w_off (elements of W's dtype from w_base), m, n, r,
                      u_off, v_off, tau_off (float32 elements from f_base), key
    [9P]              rounding seed
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (ITEMSIZE, as_int64_bits, block_starts, count_launch, find_entry,
                      int64_table, load_seed, next_pow2, round_nearest, round_stochastic,
                      to_float32, SOFT_BF16)

# 64 x 64 tiles at 8 warps: 16 elements per thread, ~128 registers on sm_90 (two CTAs per SM);
# 64 x 128 needs ~220-250 registers (one CTA per SM), too little parallelism for a streaming op.
BM = 64    # rows per tile
BN = 64    # columns per tile (contiguous in W)
NUM_WARPS = 8
RK_MAX = 64  # rank chunk: bounds the U / V tiles in registers whatever r is


@triton.jit
def _sr_uniforms_tile(seed, key, rows, col0, cols, n, BN: tl.constexpr, ROW4: tl.constexpr):
    """Stream-1 uniforms for the tile elements i = row * n + col, [BM, BN].

    ROW4 (every n % 4 == 0): the 4 elements of a Philox block lie in one row of the tile, so one
    Philox call per 4 elements, interleaved along the row. Otherwise one call per element, keeping
    word i mod 4."""
    if ROW4:
        b = ((rows * n + col0) >> 2)[:, None] + tl.arange(0, BN // 4)[None, :]
        bu = b.to(tl.uint64, bitcast=True)
        w0, w1, w2, w3 = tl.philox(seed, (bu & 0xFFFFFFFF).to(tl.uint32),
                                   (bu >> 32).to(tl.uint32), key, 1)
        u0 = tl.uint_to_uniform_float(w0)
        u1 = tl.uint_to_uniform_float(w1)
        u2 = tl.uint_to_uniform_float(w2)
        u3 = tl.uint_to_uniform_float(w3)
        u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), [rows.shape[0], BN])
    else:
        i = rows[:, None] * n + cols[None, :]
        b = (i >> 2).to(tl.uint64, bitcast=True)
        w0, w1, w2, w3 = tl.philox(seed, (b & 0xFFFFFFFF).to(tl.uint32),
                                   (b >> 32).to(tl.uint32), key, 1)
        m4 = i & 3
        w = tl.where(m4 == 0, w0, tl.where(m4 == 1, w1, tl.where(m4 == 2, w2, w3)))
        u = tl.uint_to_uniform_float(w)
    return u


@triton.jit
def _lowrank_kernel(w_base_ptr, f_base_ptr, table_ptr, decays_ptr, scale_ptr,
                    LOG2_P: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    RK: tl.constexpr, STOCHASTIC: tl.constexpr, ROW4: tl.constexpr,
                    VEC: tl.constexpr, PRECISION: tl.constexpr,
                    SOFT_BF16: tl.constexpr):
    P: tl.constexpr = 1 << LOG2_P
    pid = tl.program_id(0).to(tl.int64)
    j = find_entry(table_ptr, pid, LOG2_P)
    row_ptr = table_ptr + P + 8 * j
    w_off = tl.load(row_ptr)
    m = tl.load(row_ptr + 1)
    n = tl.load(row_ptr + 2)
    r = tl.load(row_ptr + 3)
    u_off = tl.load(row_ptr + 4)
    v_off = tl.load(row_ptr + 5)
    tau_off = tl.load(row_ptr + 6)
    key = tl.load(row_ptr + 7).to(tl.uint32)
    if VEC > 1:
        # host checked: W pointers 16-byte aligned and every n % VEC == 0 -> 16-byte row vectors
        w_off = tl.multiple_of(w_off, VEC)
        n = tl.multiple_of(n, VEC)

    t = pid - tl.load(table_ptr + j)
    tiles_n = (n + BN - 1) // BN
    tm = t // tiles_n
    tn = t - tm * tiles_n
    rows = tm * BM + tl.arange(0, BM)  # int64
    col0 = tn * BN
    cols = col0 + tl.arange(0, BN)
    rmask = rows < m
    cmask = cols < n

    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, r, RK):
        ks = k0 + tl.arange(0, RK)
        kmask = ks < r
        tau = tl.load(f_base_ptr + tau_off + ks, mask=kmask, other=0.0)
        ut = tl.load(f_base_ptr + u_off + rows[:, None] * r + ks[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        vt = tl.load(f_base_ptr + v_off + cols[None, :] * r + ks[:, None],
                     mask=kmask[:, None] & cmask[None, :], other=0.0)  # V^T chunk [RK, BN]
        # tau scales V, as in the reference: U @ (V diag(tau))^T
        acc = tl.dot(ut, vt * tau[:, None], acc, input_precision=PRECISION)

    w_ptrs = w_base_ptr + w_off + rows[:, None] * n + cols[None, :]
    full = (tm * BM + BM <= m) & (col0 + BN <= n)
    if full:  # unmasked interior tiles keep 16-byte vector accesses
        w = tl.load(w_ptrs)
    else:
        w = tl.load(w_ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)
    acc = tl.load(decays_ptr + j) * to_float32(w, SOFT_BF16) + tl.load(scale_ptr) * acc

    if STOCHASTIC:
        u = _sr_uniforms_tile(load_seed(table_ptr + 9 * P), key, rows, col0, cols, n, BN, ROW4)
        y = round_stochastic(acc, u, w_base_ptr.dtype.element_ty, SOFT_BF16)
    else:
        y = round_nearest(acc, w_base_ptr.dtype.element_ty, SOFT_BF16)
    if full:
        tl.store(w_ptrs, y)
    else:
        tl.store(w_ptrs, y, mask=rmask[:, None] & cmask[None, :])


def lowrank_perturb_triton(weights: list[torch.Tensor], us: list[torch.Tensor],
                           vs: list[torch.Tensor], taus: list[torch.Tensor], scale: torch.Tensor,
                           decays: torch.Tensor, keys: list[int], rounding: str,
                           rounding_seed: int) -> None:
    """In place: W_j = round(decays[j] * W_j + scale * U_j diag(tau_j) V_j^T) for every weight,
    float32 accumulation, one kernel launch, no host synchronization."""
    dtype = weights[0].dtype
    itemsize = ITEMSIZE[dtype]
    w_ptrs = [w.data_ptr() for w in weights]
    w_i = min(range(len(weights)), key=w_ptrs.__getitem__)
    f_tensors = list(us) + list(vs) + list(taus)
    f_ptrs = [f.data_ptr() for f in f_tensors]
    f_i = min(range(len(f_tensors)), key=f_ptrs.__getitem__)
    w_base, f_base = w_ptrs[w_i], f_ptrs[f_i]

    p = next_pow2(len(weights))
    counts, rows, max_r = [], [], 1
    vec = 16 // itemsize
    row4, aligned = True, True
    for j, w in enumerate(weights):
        m, n = w.shape
        r = us[j].shape[1]
        max_r = max(max_r, r)
        counts.append(triton.cdiv(m, BM) * triton.cdiv(n, BN))
        rows += [(w_ptrs[j] - w_base) // itemsize, m, n, r,
                 (us[j].data_ptr() - f_base) // 4, (vs[j].data_ptr() - f_base) // 4,
                 (taus[j].data_ptr() - f_base) // 4, keys[j]]
        row4 &= n % 4 == 0
        aligned &= w_ptrs[j] % 16 == 0 and n % vec == 0
    rows += [0] * (8 * (p - len(weights)))
    table = int64_table(block_starts(counts, p) + rows + [as_int64_bits(rounding_seed)],
                        weights[0].device)

    rk = min(max(16, next_pow2(max_r)), RK_MAX)  # tl.dot needs K >= 16
    _lowrank_kernel[(sum(counts),)](
        weights[w_i], f_tensors[f_i], table, decays.contiguous(), scale.contiguous(),
        LOG2_P=p.bit_length() - 1, BM=BM, BN=BN, RK=rk,
        STOCHASTIC=(rounding == "stochastic" and dtype != torch.float32), ROW4=row4,
        VEC=vec if aligned else 1,
        # fp32 weights need fp32-accurate products (3xTF32); 16-bit weights round far coarser
        # than TF32's 2^-11, so a single TF32 pass suffices
        PRECISION="tf32x3" if dtype == torch.float32 else "tf32",
        SOFT_BF16=SOFT_BF16, num_warps=NUM_WARPS)
    count_launch()
