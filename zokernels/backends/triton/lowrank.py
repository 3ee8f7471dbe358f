"""Fused low-rank perturbation, in place, ONE launch for the whole weight list:

    D     = scale * P_j(tau_j),  P_j(tau) = U_j diag(tau) V_j^T          (float32 tiles)
    theta = W_j, or recover(W_j, applied_scale * P_j(applied_tau_j))   (HAS_APPLIED)
    W_j   <- round(decays[j] * theta + D)

tile by tile: a program owns one BM x BN tile of one weight, accumulates
``U_tile @ (V_tile * tau)^T`` over the rank in RK-wide chunks with ``tl.dot`` (float32
accumulator), and rounds once (nearest-even, or stochastic with stream 1 of ``rounding_seed`` at
``i = row * n + col`` under the weight's key). The m x n product never exists in memory.
Bytes moved per weight element: one read and one write of W's dtype; U / V / tau (float32, r
values per row / column) are re-read once per tile row / column, mostly from L2.

Recovery (``applied_taus``) runs a second ``tl.dot`` with the applied taus on the same U / V
tiles: the same instructions on the same tile shapes, so D1 equals, bit for bit, the D that a
pass with ``scale = applied_scale, taus = applied_taus`` over the same weight list wrote (RK, the
rank chunk, depends on the largest rank in the call: the later pass must cover the same weights).
The kernel is compiled with ``enable_fp_fusion=False``: ``scale * P`` is then a rounded float32
value in both passes, never contracted into the addition it feeds (an FMA there would make the
written value ``round(theta + scale * P)`` with an unrounded product, which the recovery, computing
with the rounded D1, could not invert reliably). ``tl.dot`` itself (tf32x3 for fp32 weights, tf32
otherwise; numpy's matmul under the interpreter) differs from the torch reference's k-ordered sum
by its own rounding (tests/test_lowrank.py states the tolerance).

Undo log (docs/undo-log.md, LOG_MODE 1 / 2): every element whose theta a later recovery with this
D would not give back (or NaN, -0.0) is counted and, while slots remain, appended as
(first_j + row * n + col, theta); a program reserves its slots with one atomic add and places
them row-major by prefix sums. LOG_MODE 2 only counts (writes neither W nor the log).

Selector logs (``selector_log`` / ``held_log``, docs/undo-log.md "Low-rank groups"): such a pass
runs ``_lowrank_selector_kernel`` instead, one program per 1024-element block of the log with P
summed in the reference's k order (the log needs D bit for bit), the dense selector helpers
(selector_log.py) on the block.

Stochastic rounding follows the contract (``contract``): 1 / 2 the uniform-based rule (one Philox
call per 4 elements of a row when every n % 4 == 0), 3 the integer one (16 bits per element, one
call per 8 elements of a row when every n % 8 == 0); else one call per element.

Launch table (one int64 tensor, built per call, copied without a host synchronization):

    [0, P)            starts[j]: first program of weight j (prefix sum of tiles), padded to
                      P = next_pow2(T) with INT64_MAX; binary search as in perturb
    [P + 10j + 0..9]  w_off (elements of W's dtype from w_base), m, n, r,
                      u_off, v_off, tau_off (float32 elements from f_base), key,
                      first (group-flat index of W_j[0, 0]), held_off (applied taus, or 0)
    [11P]             rounding seed
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._contract import DEFAULT_CONTRACT, integer_rounding
from .. import check_selector_rows, one_dtype
from ._common import (ITEMSIZE, as_int64_bits, block_starts, count_launch, find_entry,
                      int64_table, load_seed, next_pow2, philox, recover_unperturbed,
                      recovery_loses,
                      round_nearest, round_stochastic, round_stochastic_integer,
                      rounding_bits_at, rounding_bits_tile, rounding_tile, tile_lanes,
                      to_float32, SOFT_BF16)
from .lowrank_scatter import ordered_product
from .perturb import MAXNREG
from .selector_log import SELECTOR_BLOCK, from_pattern, held_theta, log_stored, stored_value

# 64 x 64 tiles at 8 warps: 16 elements per thread, ~128 registers on sm_90 (two CTAs per SM);
# 64 x 128 needs ~220-250 registers (one CTA per SM), too little parallelism for a streaming op.
BM = 64    # rows per tile
BN = 64    # columns per tile (contiguous in W)
NUM_WARPS = 8
# the rank loop runs once for r <= RK_MAX: software pipelining (num_stages > 1) would only
# allocate more shared memory (3 stages: 100 KB at r = 64, one CTA per SM)
NUM_STAGES = 1
RK_MAX = 64  # rank chunk: bounds the U / V tiles in registers whatever r is
ROW = 10     # int64 entries per weight in the launch table


@triton.jit
def _sr_uniforms_tile(seed, key, rows, col0, cols, n, BN: tl.constexpr, ROW4: tl.constexpr):
    """Stream-1 uniforms for the tile elements i = row * n + col, [BM, BN].

    ROW4 (every n % 4 == 0): the 4 elements of a Philox block lie in one row of the tile, so one
    Philox call per 4 elements, interleaved along the row. Otherwise one call per element, keeping
    word i mod 4."""
    if ROW4:
        b = ((rows * n + col0) >> 2)[:, None] + tl.arange(0, BN // 4)[None, :]
        bu = b.to(tl.uint64, bitcast=True)
        w0, w1, w2, w3 = philox(seed, (bu & 0xFFFFFFFF).to(tl.uint32),
                                   (bu >> 32).to(tl.uint32), key, 1)
        u0 = tl.uint_to_uniform_float(w0)
        u1 = tl.uint_to_uniform_float(w1)
        u2 = tl.uint_to_uniform_float(w2)
        u3 = tl.uint_to_uniform_float(w3)
        u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), [rows.shape[0], BN])
    else:
        i = rows[:, None] * n + cols[None, :]
        b = (i >> 2).to(tl.uint64, bitcast=True)
        w0, w1, w2, w3 = philox(seed, (b & 0xFFFFFFFF).to(tl.uint32),
                                   (b >> 32).to(tl.uint32), key, 1)
        m4 = i & 3
        w = tl.where(m4 == 0, w0, tl.where(m4 == 1, w1, tl.where(m4 == 2, w2, w3)))
        u = tl.uint_to_uniform_float(w)
    return u


@triton.jit
def _sr_bits_tile(seed, key, rows, col0, cols, n, BN: tl.constexpr, ROW8: tl.constexpr):
    """Contract 3's 16 random bits for the tile elements i = row * n + col, [BM, BN]: half i % 2
    of word (i % 8) // 2 of the stream-1 Philox call i // 8 (``rounding_bits_at``).

    ROW8 (every n % 8 == 0): the 8 elements of a call lie in one row of the tile, so one call per
    8 elements, its 8 halves interleaved along the row (the nested joins put bit 2 of i % 8 in the
    outermost position). Otherwise one call per element."""
    if ROW8:
        b = ((rows * n + col0) >> 3)[:, None] + tl.arange(0, BN // 8)[None, :]
        bu = b.to(tl.uint64, bitcast=True)
        w0, w1, w2, w3 = philox(seed, (bu & 0xFFFFFFFF).to(tl.uint32),
                                (bu >> 32).to(tl.uint32), key, 1)
        lo = tl.join(tl.join(w0 & 0xFFFF, w2 & 0xFFFF), tl.join(w1 & 0xFFFF, w3 & 0xFFFF))
        hi = tl.join(tl.join(w0 >> 16, w2 >> 16), tl.join(w1 >> 16, w3 >> 16))
        r = tl.reshape(tl.join(lo, hi), [rows.shape[0], BN])
    else:
        r = rounding_bits_at(seed, key, rows[:, None] * n + cols[None, :])
    return r


@triton.jit(do_not_specialize=["capacity"])
def _lowrank_kernel(w_base_ptr, f_base_ptr, table_ptr, decays_ptr, scale_ptr, applied_scale_ptr,
                    index_ptr, values_ptr, count_ptr, capacity,
                    LOG2_P: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    RK: tl.constexpr, STOCHASTIC: tl.constexpr, ROWG: tl.constexpr,
                    VEC: tl.constexpr, UV16: tl.constexpr, KFULL: tl.constexpr,
                    PRECISION: tl.constexpr, HAS_APPLIED: tl.constexpr,
                    LOG_MODE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """LOG_MODE: 0 no log (index_ptr .. capacity are None), 1 log and write, 2 count only.
    STOCHASTIC: 0 round to nearest, 1 the uniform-based stochastic rounding (contracts 1, 2), 2
    the integer one (contract 3); ROWG: every n is a multiple of its Philox group (4 uniforms,
    8 elements of integer bits), one call per group.
    UV16: U / V rows are 16-byte vectors (aligned, r % 4 == 0); KFULL: every r is a multiple of
    RK (interior tiles load U, V and tau without masks)."""
    P: tl.constexpr = 1 << LOG2_P
    pid = tl.program_id(0).to(tl.int64)
    j = find_entry(table_ptr, pid, LOG2_P)
    row_ptr = table_ptr + P + 10 * j
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
    if UV16:
        # host checked: U / V 16-byte aligned and every r % 4 == 0 -> 16-byte rows of U and V
        r = tl.multiple_of(r, 4)
        u_off = tl.multiple_of(u_off, 4)
        v_off = tl.multiple_of(v_off, 4)

    t = pid - tl.load(table_ptr + j)
    tiles_n = (n + BN - 1) // BN
    tm = t // tiles_n
    tn = t - tm * tiles_n
    rows = tm * BM + tl.arange(0, BM)  # int64 (rounding counters, log indices)
    col0 = tn * BN
    cols = col0 + tl.arange(0, BN)
    rmask = rows < m
    cmask = cols < n
    full = (tm * BM + BM <= m) & (col0 + BN <= n)
    # int32 offsets inside the tile from int64 scalar bases (r, n < 2^31 / BM)
    ri = tl.arange(0, BM)
    ci = tl.arange(0, BN)
    r32 = r.to(tl.int32)
    if UV16:
        r32 = tl.multiple_of(r32, 4)
    u_ptrs = f_base_ptr + (u_off + tm * BM * r) + ri[:, None] * r32  # U rows of the tile
    v_ptrs = f_base_ptr + (v_off + col0 * r) + ci[None, :] * r32  # V rows as columns of V^T

    acc = tl.zeros([BM, BN], dtype=tl.float32)   # P(tau)
    held = tl.zeros([BM, BN], dtype=tl.float32)  # P(applied tau), HAS_APPLIED only
    for k0 in range(0, r32, RK):
        ks = k0 + tl.arange(0, RK)
        if full and KFULL:  # no masks: 16-byte loads of U and V (UV16)
            tau = tl.load(f_base_ptr + tau_off + ks)
            ut = tl.load(u_ptrs + ks[None, :])
            vt = tl.load(v_ptrs + ks[:, None])  # V^T chunk [RK, BN]
        else:
            kmask = ks < r32
            tau = tl.load(f_base_ptr + tau_off + ks, mask=kmask, other=0.0)
            ut = tl.load(u_ptrs + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            vt = tl.load(v_ptrs + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        # tau scales V, as in the reference: U @ (V diag(tau))^T
        acc = tl.dot(ut, vt * tau[:, None], acc, input_precision=PRECISION)
        if HAS_APPLIED:
            tau1 = tl.load(f_base_ptr + tl.load(row_ptr + 9) + ks, mask=ks < r32, other=0.0)
            held = tl.dot(ut, vt * tau1[:, None], held, input_precision=PRECISION)

    w_ptrs = w_base_ptr + (w_off + tm * BM * n + col0) + (ri[:, None] * n.to(tl.int32)
                                                         + ci[None, :])
    if full:  # unmasked interior tiles keep 16-byte vector accesses
        w = tl.load(w_ptrs)
    else:
        w = tl.load(w_ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)
    x = to_float32(w, SOFT_BF16)
    if HAS_APPLIED:
        x = recover_unperturbed(x, tl.load(applied_scale_ptr) * held,
                                w_base_ptr.dtype.element_ty, SOFT_BF16)
    d = tl.load(scale_ptr) * acc  # D: a rounded float32 value (no fp fusion)
    acc = tl.load(decays_ptr + j) * x + d

    if STOCHASTIC == 2:  # contract 3: integer stochastic rounding
        rb = _sr_bits_tile(load_seed(table_ptr + 11 * P), key, rows, col0, cols, n, BN, ROWG)
        y = round_stochastic_integer(acc, rb, w_base_ptr.dtype.element_ty, SOFT_BF16)
    elif STOCHASTIC:
        u = _sr_uniforms_tile(load_seed(table_ptr + 11 * P), key, rows, col0, cols, n, BN, ROWG)
        y = round_stochastic(acc, u, w_base_ptr.dtype.element_ty, SOFT_BF16)
    else:
        y = round_nearest(acc, w_base_ptr.dtype.element_ty, SOFT_BF16)
    if LOG_MODE != 2:
        if full:
            tl.store(w_ptrs, y)
        else:
            tl.store(w_ptrs, y, mask=rmask[:, None] & cmask[None, :])

    if LOG_MODE != 0:
        # lost: a later pass with applied = (scale, tau) does not recover x
        lost = recovery_loses(x, y, d, w_base_ptr.dtype.element_ty, SOFT_BF16)
        lost = (lost & rmask[:, None] & cmask[None, :]).to(tl.int32)
        row_lost = tl.sum(lost, axis=1)
        n_lost = tl.sum(row_lost, axis=0)
        if n_lost > 0:  # all programs hit one counter: skip the atomic when there is nothing
            first = tl.atomic_add(count_ptr, n_lost.to(tl.int64), sem="relaxed")
            if LOG_MODE == 1:
                # row-major order inside the tile: rows before, then the lost ones in the row
                before = tl.cumsum(row_lost, axis=0) - row_lost
                slot = first + (before[:, None] + tl.cumsum(lost, axis=1) - 1)
                keep = (lost != 0) & (slot < capacity)  # past the capacity: counted only
                flat = tl.load(row_ptr + 8) + rows[:, None] * n + cols[None, :]
                tl.store(index_ptr + slot, flat, mask=keep)
                if HAS_APPLIED:  # exact: x is a value of the weight's dtype
                    old = round_nearest(x, w_base_ptr.dtype.element_ty, SOFT_BF16)
                else:  # the old bits themselves (NaN payloads too)
                    old = w
                tl.store(values_ptr + slot, old, mask=keep)


# Selector passes: one program per SELECTOR_BLOCK flat elements (the log's block), registers
# capped as the dense selector passes' (perturb.MAXNREG; sass_budget: no spills). Warps per
# program, by whether the pass reads a held log: 4 (8 elements per thread: the block's scans
# cost half as much per element) fit for a pass that only writes; one that reads holds each
# element's U / V row pointers for two products and keeps 8.
SELECTOR_WARPS = {"write": 4, "read": 8}


@triton.jit
def _lowrank_selector_kernel(w_base_ptr, f_base_ptr, table_ptr, decays_ptr, scale_ptr,
                             applied_scale_ptr, out_regions_ptr, out_words, out_pool_ptr,
                             out_capacity, out_count_ptr, in_regions_ptr, in_words, in_pool_ptr,
                             in_capacity, LOG2_P: tl.constexpr, BLOCK: tl.constexpr,
                             STOCHASTIC: tl.constexpr, HAS_APPLIED: tl.constexpr,
                             SEL_OUT: tl.constexpr, SEL_IN: tl.constexpr,
                             SOFT_BF16: tl.constexpr):
    """A pass that writes (SEL_OUT 1, or 2: count the pool words only, write nothing else) or
    reads (SEL_IN, with HAS_APPLIED) a selector log: program ``pid`` handles the flat elements
    ``blk * BLOCK + [0, BLOCK)`` of weight j, which is the log's row ``pid`` (the weights' blocks
    follow each other in list order, as the table's programs do). P is the reference's k-ordered
    sum (``ordered_product``), not ``tl.dot`` tiles: the log's classes depend on D bit for bit,
    and the reading pass must see the D the writing pass used, on any backend. The block is held
    in the gaussian tile layout (``tile_lanes``), so the dense selector helpers and the rounding
    tiles apply unchanged. Table: the tile kernel's, with blocks for tiles. STOCHASTIC: as the
    tile kernel's."""
    P: tl.constexpr = 1 << LOG2_P
    pid = tl.program_id(0).to(tl.int64)
    j = find_entry(table_ptr, pid, LOG2_P)
    row_ptr = table_ptr + P + 10 * j
    m = tl.load(row_ptr + 1)
    n = tl.load(row_ptr + 2)
    r = tl.load(row_ptr + 3)
    key = tl.load(row_ptr + 7).to(tl.uint32)
    blk = pid - tl.load(table_ptr + j)
    start = blk * BLOCK  # int64; offsets inside the block are int32
    lanes = tile_lanes(0, BLOCK)
    rem = m * n - start
    valid = lanes < rem
    ptrs = w_base_ptr + (tl.load(row_ptr) + start) + lanes
    w = tl.load(ptrs, mask=valid, other=0.0)
    # (row, col) of each element: one int32 division from the block's first column
    row0 = start // n
    c = (start - row0 * n).to(tl.int32) + lanes
    q = c // n.to(tl.int32)
    rows = tl.minimum(row0 + q, m - 1)  # the tail's lanes past the weight read its last row
    cols = (c - q * n.to(tl.int32)).to(tl.int64)
    u_ptrs = f_base_ptr + tl.load(row_ptr + 4) + rows * r
    v_ptrs = f_base_ptr + tl.load(row_ptr + 5) + cols * r
    d = tl.load(scale_ptr) * ordered_product(u_ptrs, v_ptrs, f_base_ptr + tl.load(row_ptr + 6),
                                             r, r, valid, False)
    x = to_float32(w, SOFT_BF16)
    if HAS_APPLIED:
        d1 = tl.load(applied_scale_ptr) * ordered_product(
            u_ptrs, v_ptrs, f_base_ptr + tl.load(row_ptr + 9), r, r, valid, False)
    theta = w  # replaced by the held pattern with SEL_IN, the only case that reads it
    if SEL_IN:  # exact: theta's pattern from the held log
        theta = held_theta(w, d1, valid, in_regions_ptr, in_words, in_pool_ptr, in_capacity, pid,
                           w_base_ptr.dtype.element_ty, SOFT_BF16)
        x = to_float32(from_pattern(theta, w_base_ptr.dtype.element_ty), SOFT_BF16)
    elif HAS_APPLIED:
        x = recover_unperturbed(x, d1, w_base_ptr.dtype.element_ty, SOFT_BF16)
    decay = tl.load(decays_ptr + j)
    acc = decay * x + d
    if STOCHASTIC == 2:  # contract 3: integer stochastic rounding
        rb = rounding_bits_tile(load_seed(table_ptr + 11 * P), key, blk, 0, BLOCK)
        y = round_stochastic_integer(acc, rb, w_base_ptr.dtype.element_ty, SOFT_BF16)
    elif STOCHASTIC:
        u = rounding_tile(load_seed(table_ptr + 11 * P), key, blk, 0, BLOCK)
        y = round_stochastic(acc, u, w_base_ptr.dtype.element_ty, SOFT_BF16)
    else:
        y = round_nearest(acc, w_base_ptr.dtype.element_ty, SOFT_BF16)
    written = stored_value(y, theta, d, decay, SEL_IN, w_base_ptr.dtype.element_ty)
    if SEL_OUT != 2:
        tl.store(ptrs, written, mask=valid)
    if SEL_OUT != 0:
        log_stored(out_regions_ptr, out_words, out_pool_ptr, out_capacity, out_count_ptr, pid,
                   theta, w, x, written, d, valid, SEL_OUT == 2, SEL_IN, HAS_APPLIED, BLOCK,
                   w_base_ptr.dtype.element_ty, SOFT_BF16)



def _bases(weights, us, vs, taus, applied_taus):
    """The weights' data pointers, and the weight / float32 factor at the lowest address: the
    kernels address every tensor as an element offset from these two bases."""
    w_ptrs = [w.data_ptr() for w in weights]
    factors = list(us) + list(vs) + list(taus) + list(applied_taus or [])
    return (w_ptrs, weights[min(range(len(weights)), key=w_ptrs.__getitem__)],
            min(factors, key=lambda f: f.data_ptr()))

def lowrank_perturb_triton(weights: list[torch.Tensor], us: list[torch.Tensor],
                           vs: list[torch.Tensor], taus: list[torch.Tensor], scale: torch.Tensor,
                           decays: torch.Tensor, keys: list[int], rounding: str,
                           rounding_seed: int, applied_taus: list[torch.Tensor] | None = None,
                           applied_scale: torch.Tensor | None = None, log=None,
                           count_only: bool = False, selector_log=None,
                           held_log=None, contract: int = DEFAULT_CONTRACT) -> None:
    """In place: W_j = round(decays[j] * theta + scale * U_j diag(tau_j) V_j^T) for every weight,
    theta = W_j or, with ``applied_taus`` (float32 [r_j] each) and ``applied_scale`` (float32 [1]),
    W_j recovered from round(theta + applied_scale * U_j diag(applied_tau_j) V_j^T). ``log``: None,
    or the UndoBuffers that receive the elements recovery cannot give back (the caller zeroes
    ``log.count``); ``count_only``: only add to the count. ``selector_log`` / ``held_log``
    (SelectorBuffers, docs/undo-log.md): the selector log this pass writes (nearest rounding,
    decays 1; with ``count_only`` only its pool words are counted) / the one it reads, with
    ``applied_taus``, to recover every weight exactly; bit-identical to the torch reference's
    (the pool's block order aside), P then summed in the reference's k order
    (``_lowrank_selector_kernel``). ``contract`` picks the stochastic rounding (3: the integer
    one). One kernel launch, no host synchronization."""
    stochastic = _stochastic_code(rounding, one_dtype(weights, "lowrank_perturb_triton"), contract)
    if selector_log is not None or held_log is not None:
        check_selector_rows(selector_log, held_log, "lowrank_perturb_triton")
        _lowrank_selector_pass(weights, us, vs, taus, scale, decays, keys, stochastic,
                               rounding_seed, applied_taus, applied_scale, log, count_only,
                               selector_log, held_log)
        return
    dtype = weights[0].dtype
    itemsize = ITEMSIZE[dtype]
    log_mode = 0 if log is None else (2 if count_only else 1)
    w_ptrs, w_base_tensor, f_base_tensor = _bases(weights, us, vs, taus, applied_taus)
    w_base, f_base = w_base_tensor.data_ptr(), f_base_tensor.data_ptr()

    p = next_pow2(len(weights))
    counts, rows, max_r, first = [], [], 1, 0
    vec = 16 // itemsize
    group = 8 if stochastic == 2 else 4  # elements per Philox call of the rounding bits
    row_grouped, aligned, uv16 = True, True, f_base % 16 == 0
    for j, w in enumerate(weights):
        m, n = w.shape
        r = us[j].shape[1]
        max_r = max(max_r, r)
        counts.append(triton.cdiv(m, BM) * triton.cdiv(n, BN))
        held_off = 0 if applied_taus is None else (applied_taus[j].data_ptr() - f_base) // 4
        rows += [(w_ptrs[j] - w_base) // itemsize, m, n, r,
                 (us[j].data_ptr() - f_base) // 4, (vs[j].data_ptr() - f_base) // 4,
                 (taus[j].data_ptr() - f_base) // 4, keys[j], first, held_off]
        first += m * n
        row_grouped &= n % group == 0
        aligned &= w_ptrs[j] % 16 == 0 and n % vec == 0
        uv16 &= r % 4 == 0 and all(f.data_ptr() % 16 == 0 for f in (us[j], vs[j]))
    rows += [0] * (ROW * (p - len(weights)))
    table = int64_table(block_starts(counts, p) + rows + [as_int64_bits(rounding_seed)],
                        weights[0].device)

    rk = min(max(16, next_pow2(max_r)), RK_MAX)  # tl.dot needs K >= 16
    kfull = all(u.shape[1] % rk == 0 for u in us)
    scale = scale.contiguous()
    _lowrank_kernel[(sum(counts),)](
        w_base_tensor, f_base_tensor, table, decays.contiguous(), scale,
        scale if applied_scale is None else applied_scale.contiguous(),  # unread without
        # unused log arguments are None: constexpr, not even kernel parameters
        log.index if log_mode == 1 else None, log.values if log_mode == 1 else None,
        log.count if log_mode != 0 else None, log.capacity if log_mode == 1 else None,
        LOG2_P=p.bit_length() - 1, BM=BM, BN=BN, RK=rk,
        STOCHASTIC=stochastic, ROWG=row_grouped,
        VEC=vec if aligned else 1, UV16=uv16, KFULL=kfull,
        # fp32 weights need fp32-accurate products (3xTF32); 16-bit weights round far coarser
        # than TF32's 2^-11, so a single TF32 pass suffices
        PRECISION="tf32x3" if dtype == torch.float32 else "tf32",
        HAS_APPLIED=applied_taus is not None, LOG_MODE=log_mode,
        SOFT_BF16=SOFT_BF16, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        enable_fp_fusion=False)  # D = scale * P stays a rounded value (module docstring)
    count_launch()


def _stochastic_code(rounding: str, dtype: torch.dtype, contract: int) -> int:
    """The kernels' STOCHASTIC: 0 nearest (float32 weights always), 1 uniform-based, 2 integer."""
    if rounding != "stochastic" or dtype == torch.float32:
        return 0
    return 2 if integer_rounding(contract) else 1


def _lowrank_selector_pass(weights, us, vs, taus, scale, decays, keys, stochastic: int,
                           rounding_seed, applied_taus, applied_scale, log, count_only,
                           selector_log, held_log) -> None:
    """``lowrank_perturb_triton`` with a selector log written or read: one launch of
    ``_lowrank_selector_kernel``, a program per log block (``stochastic``: _stochastic_code)."""
    if log is not None:
        raise ValueError("lowrank_perturb_triton: an undo log (log=) cannot be written by a pass "
                         "that writes or reads a selector log; use a selector log for both")
    if held_log is not None and applied_taus is None:
        raise ValueError("lowrank_perturb_triton: held_log needs applied_taus")
    if selector_log is not None and stochastic:
        raise ValueError("lowrank_perturb_triton: selector_log needs rounding='nearest'")
    if count_only and selector_log is None:
        raise ValueError("lowrank_perturb_triton: count_only needs a log or a selector_log")
    dtype = weights[0].dtype
    itemsize = ITEMSIZE[dtype]
    w_ptrs, w_base_tensor, f_base_tensor = _bases(weights, us, vs, taus, applied_taus)
    w_base, f_base = w_base_tensor.data_ptr(), f_base_tensor.data_ptr()
    p = next_pow2(len(weights))
    counts, rows, first = [], [], 0
    for j, w in enumerate(weights):
        m, n = w.shape
        r = us[j].shape[1]
        counts.append(triton.cdiv(m * n, SELECTOR_BLOCK))  # the log's rows, in list order
        held_off = 0 if applied_taus is None else (applied_taus[j].data_ptr() - f_base) // 4
        rows += [(w_ptrs[j] - w_base) // itemsize, m, n, r,
                 (us[j].data_ptr() - f_base) // 4, (vs[j].data_ptr() - f_base) // 4,
                 (taus[j].data_ptr() - f_base) // 4, keys[j], first, held_off]
        first += m * n
    rows += [0] * (ROW * (p - len(weights)))
    table = int64_table(block_starts(counts, p) + rows + [as_int64_bits(rounding_seed)],
                        weights[0].device)
    sel_out = 0 if selector_log is None else (2 if count_only else 1)
    out, held = selector_log, held_log
    scale = scale.contiguous()
    _lowrank_selector_kernel[(sum(counts),)](
        w_base_tensor, f_base_tensor, table, decays.contiguous(), scale,
        scale if applied_scale is None else applied_scale.contiguous(),
        # unused log arguments are None: constexpr, not even kernel parameters
        None if out is None else out.regions,
        None if out is None else out.regions.shape[1],
        None if sel_out != 1 else out.pool,
        None if sel_out != 1 else out.pool.numel(),
        None if out is None else out.count,
        None if held is None else held.regions,
        None if held is None else held.regions.shape[1],
        None if held is None else held.pool,
        None if held is None else held.pool.numel(),
        LOG2_P=p.bit_length() - 1, BLOCK=SELECTOR_BLOCK,
        STOCHASTIC=stochastic, HAS_APPLIED=applied_taus is not None, SEL_OUT=sel_out,
        SEL_IN=held is not None,
        SOFT_BF16=SOFT_BF16, num_warps=SELECTOR_WARPS["read" if held is not None else "write"],
        maxnreg=MAXNREG,
        enable_fp_fusion=False)  # P, D and the sum stay the reference's roundings
    count_launch()
