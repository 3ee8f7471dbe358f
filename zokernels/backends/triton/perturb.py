"""Fused multi-tensor perturbation, in place, ONE launch for the whole tensor list:

    D = sum_k scales[k] * z(seeds[k], keys[j], i)      # from 0.0, in seed order
    t_j[i] = round(decays[j] * t_j[i] + D)

with float32 accumulation in the contract's order and a single rounding (nearest-even, or
stochastic with stream 1 of ``rounding_seed``). With ``applied`` (the coefficients of the
perturbation the tensors hold now), each z is generated once and feeds both D and
D1 = sum_k applied[k] * z; t_j[i] is first recovered from round(theta + D1)
(``recover_unperturbed``, docs/noise-contract.md "Recovery"). Bytes moved per element: one read
and one write of the tensor's dtype (4 or 2 bytes each); the K noise terms are generated in
registers.

Launch table: a static int64 tensor (depends only on the tensors' addresses, numels, keys, maps
and BLOCK) and the per-call seeds (a second int64 tensor, K + 1 values), both enqueued without a
host synchronization. With ``table_cache`` (a dict kept by the caller per persistent tensor
group) the static tensor is built once and reused while its key matches (``cached_table``); without
it both live in one tensor built per call (``build_table``: one copy, ``seeds`` a view of it).

    static:
    [0, P)                starts[j]: first program of tensor j (exclusive prefix sum of
                          cdiv(numel_j, BLOCK)); padded to P = next_pow2(T) with INT64_MAX
    [P + ROW*j + 0..3]    offset_j (elements from the base pointer), numel_j, key_j,
                          first_j (group-flat index of t_j[0]: numels of the tensors before j)
    [P + ROW*j + 4..7]    MAPPED only: map_offset_j, local_span_j, global_span_j, grain_j
                          (ROW = 8 with maps, 4 without; padded to an even length)
    seeds:
    [0, K)                seeds (uint64 bit patterns)
    [K]                   rounding seed
    schedule (same device tensor, after the seeds padded to an even length: 16-byte aligned):
    [10 k, 10 k + 10)     seed k's Philox-10 key schedule, value r = round r's key words (low,
                          high) (``_common.key_schedule``): the seed loop loads it (5 x 16 bytes)
                          instead of computing 18 additions per seed in every thread
    [10 K, 10 K + 10)     the rounding seed's (contract 3's rounding bits of gaussian tiles)

Program ``pid`` finds its tensor j by a LOG2_P-step binary search over ``starts`` and handles
the BLOCK elements ``(pid - starts[j]) * BLOCK + [0, BLOCK)`` of tensor j; the element index of
the noise is the flat index inside tensor j, or with an index map its contract index
``g(i) = map_offset + (i // local_span) * global_span + i % local_span`` (a shard of an unsharded
tensor: the noise and the stochastic-rounding uniforms of element i are those of element g(i) of
the whole tensor; docs/backends.md). Tensors are addressed as ``base_ptr + offset_j``
(all are itemsize-aligned, so the element offsets are exact). K is a runtime loop bound:
no recompilation per number of seeds, per seed value or per list; only (dtype, dist, rounding,
LOG2_P, alignment, recovery or not, log mode, mapped or not) select a compiled variant; without
``applied`` the recovery code is not compiled at all, without ``log`` neither is the undo log's,
and without maps (``index_maps`` None or all identity) neither is the map code: the unmapped
kernel does exactly the work it did before maps existed.

Shifted shards (SHIFTED): a tensor whose map is None or a shift g(i) = offset + i by a
multiple of the pass's Philox call (``shift_grain``: 4 elements gaussian, 8 with contract 3's
rounding bits, 128 rademacher; FSDP2's dim-0 shards, 2-D and 1-D, a virtual probe's row
pieces) takes the plain kernel and its table; its block b draws the noise and rounding bits of
elements ``shifts[j] + b * BLOCK + [0, BLOCK)`` of the whole tensor, the plain tiles at other
counters (``shard_shifts``; an int64 [T] kept in ``table_cache``), instead of the mapped
kernel's per-group counters (sm_90: 44 instead of 64 instructions per element, bf16 v2
gaussian; rademacher 10 instead of 46). A call with other maps beside such tensors is split
into a plain and a mapped launch when the plain part is large enough (``SPLIT_MIN_ELEMENTS``);
each tensor keeps its group-flat index (``first_j``, the undo log's) and selector rows of the
whole call.

Index maps (MAPPED): the host normalizes each map (``normalize_map``): identity -> None (a row
of (0, SHIFT_SPAN, SHIFT_SPAN, 128) in a mapped call, g(i) = i), a shift (local rows contiguous
in the global order, or one local row) -> spans SHIFT_SPAN, and ``grain`` = the largest of 1, 4,
128 dividing the offset and both spans. A grain that is a multiple of the distribution's Philox
group (4 gaussian and rounding uniforms, 128 rademacher) maps every aligned local group onto one
aligned global group, so each Philox call still feeds 4 (128) elements, at per-group counters
``(b mod 2^32, b >> 32)`` with b = g(first element) // group (not consecutive: computed per group,
64-bit); otherwise one Philox call per element (the scatter's ``noise_at`` /
``rounding_uniform_at``). The choice is per tensor (a runtime value of the table, not a
constexpr): a call mixing aligned shards with one uneven split (C = 7 split 4 / 3) keeps the
grouped path for all the others, where a per-launch switch would make the whole call pay 4x
(gaussian) or 128x (rademacher) the Philox work; the branch is uniform inside a program (one
tensor per program), and costs one load and compare per program. g is computed per group (or
element) with one 64-bit division per program (``map_index``); mapped launches use at most
MAPPED_BLOCK elements per program (registers: both paths live in one kernel). The undo log
records LOCAL group-flat indices (first_j + i), as without maps.

Out of place (``sources``, the plain pass only: no recovery, log or selector): tensor j is
written ``round(decays[j] * s_j[i] + D)`` from source s_j, addressed as ``src_base_ptr +
src_offsets[j]`` (an int64 tensor built per call); the weights' loads read s_j instead of t_j,
nothing else changes, and without sources (HAS_SOURCE False) no code does.

Undo log (docs/undo-log.md): with ``log`` (UndoBuffers), every element whose old value theta_in
(after its own recovery with ``applied``) the recovery of a later ``applied=scales`` pass would
not give back bit for bit (or that is NaN or -0.0) is counted in ``log.count`` and, while slots
remain, appended as (first_j + i, theta_in). A program reserves its slots with one atomic add of
its number of lost elements and places them by a prefix sum, so the entries' order depends on the
schedule. ``count_only``: only the count is added; neither the tensors nor the log are written.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..._contract import DEFAULT_CONTRACT, integer_rounding, normals_version
from ._common import (DIST_CODES, add_noise, cached_table, count_launch, find_entry, flat,
                      load_key_schedule, load_seed, map_index, noise_at,
                      noise_words, noise_words_at_blocks, recover_unperturbed,
                      recovery_loses,
                      philox, quads, round_nearest, round_stochastic, round_stochastic_integer,
                      _rounding_bits, rounding_bits_at, rounding_bits_tile, rounding_tile,
                      rounding_tile_at_blocks, _rounding_quads,
                      rounding_uniform_at, tile_lanes, to_float32, SOFT_BF16, int64_table,
                      normalize_map, SHIFT_SPAN, base_and_offsets, cached_int64, block_starts)
from .. import check_selector_rows, check_sources
from .selector_log import (SELECTOR_BLOCK, element_tile, from_pattern, held_theta, log_stored,
                           stored_value)

# Elements per program. Registers on sm_90 are capped at MAXNREG (ptxas; counts in
# benchmarks/results/sass_budget_*.json, no spills). Plain passes: gaussian 4096 (16 elements per
# thread at 8 warps: 4 Philox calls per seed, independent work to hide memory latency),
# rademacher 8192 (32 per thread: one word of one Philox call per seed; every element also
# amortizes the per-program table search and loads).
BLOCK = {"gaussian": 4096, "rademacher": 8192}
# The plain rademacher pass (nearest rounding; no recovery, log, map or selector) in the vector
# tile (``tile_lanes`` 3 / 4), by itemsize: 16-bit 16384 (64 elements per thread, 2 words of one
# Philox call: the call costs ~1 instruction per element and seed instead of ~2, each extra
# seed 3.92 instead of 5.0 at 8192 in the [32, 4, N] tile; 96 registers, no spills, with the
# weights loaded after the seed loop and the tail's masks computed on the tail's side only:
# ``_update_block``); fp32 8192 (at 16384 its 64 fp32 weights per thread spill 12 instructions;
# fp32 is memory-bound either way).
VEC_BLOCK = {2: 16384, 4: 8192}
# Out of place (sources=), the source's pointers are live too: the 16-bit vector tile at 16384
# spills 4 instructions under MAXNREG, at 8192 none (sass_budget, rademacher .../source rows).
SOURCE_VEC_BLOCK = 8192
# Stochastic rounding (16-bit) holds the rounding quads' words and the division's temporaries
# too: at the blocks above it spills under MAXNREG (32 spill instructions gaussian, 376
# rademacher); half the block does not.
STOCHASTIC_BLOCK = {"gaussian": 2048, "rademacher": 2048}
# With recovery, x, D1 and D are all live after the noise loop and the recovery adds three
# candidate tests per element: z does not depend on the block, so recovering passes with 4-byte
# weights and logging passes (the log's check is one more recovery) use smaller ones (at 4096
# they spill 2-78 instructions under MAXNREG; 16-bit recovery at 4096 does not).
RECOVER_BLOCK = 4096
LOG_BLOCK = 2048
# Contract 3's integer stochastic rounding keeps the plain blocks (no spills under MAXNREG); with
# recovery too, 16-bit gaussian v2 at 4096 spills 3 instructions, at 2048 none.
INTEGER_STOCHASTIC_RECOVER_BLOCK = 2048
# With index maps, both noise paths are compiled into one kernel (grouped and per-element Philox,
# chosen per tensor at run time) and the registers are those of the larger.
MAPPED_BLOCK = 2048
MAXNREG = 96
NUM_WARPS = 8

# Selector passes (one program per 1024-element block of the log): warps per program. 4 warps
# give a thread 8 elements, which halves the per-element cost of the block's scans and
# reductions (2-3 each per pass); rademacher's noise, moved into the selector's layout through
# shared memory, makes its 16-bit pass that reads one log and writes another spill under
# MAXNREG that way (4 instructions), so rademacher keeps NUM_WARPS (sass_budget), and so do
# mapped launches (both noise paths compiled: gaussian reading passes spill 10-18 at 4).
SELECTOR_WARPS = {"gaussian": 4, "rademacher": NUM_WARPS}


@triton.jit
def _mapped_noise_sums(seeds_ptr, schedule_ptr, scales_ptr, applied_ptr, K, key, i0, map_offset,
                       local_span, global_span, grain, d, d1, DIST: tl.constexpr,
                       BLOCK: tl.constexpr, HAS_APPLIED: tl.constexpr, NORMAL: tl.constexpr):
    """(D, D1) for the local elements i0 + [0, BLOCK) of a mapped tensor: z at g(i), in the tile
    shape of DIST (d, d1: zero tiles).

    ``grain`` (a per-tensor table value, so that one odd shard does not slow the whole call down):
    when it is a multiple of the distribution's Philox group (4 gaussian, 128 rademacher), every
    aligned local group is one aligned global group, and each Philox call still feeds 4 (128)
    elements, at the global group's counter; else one Philox call per element (``noise_at``).
    A program holds one tensor, so the branch never diverges inside a program. The counters are
    computed once, before the loop over the seeds."""
    GROUP: tl.constexpr = 128 if DIST == 1 else 4
    if grain % GROUP == 0:
        lanes = tl.arange(0, BLOCK // GROUP) * GROUP
        b = map_index(i0, lanes, map_offset, local_span, global_span, BLOCK) // GROUP
        zero = (i0 >> 62).to(tl.uint32)  # i0 < numel < 2^62: philox_scheduled
        for k in range(K):
            words = noise_words_at_blocks(None, key, b,
                                          load_key_schedule(schedule_ptr + 10 * k), zero)
            d = add_noise(d, tl.load(scales_ptr + k), words, DIST, NORMAL)
            if HAS_APPLIED:
                d1 = add_noise(d1, tl.load(applied_ptr + k), words, DIST, NORMAL)
    else:
        g = map_index(i0, tile_lanes(DIST, BLOCK), map_offset, local_span, global_span, BLOCK)
        for k in range(K):
            z = noise_at(load_seed(seeds_ptr + k), key, g, DIST, NORMAL)
            d = d + tl.load(scales_ptr + k) * z
            if HAS_APPLIED:
                d1 = d1 + tl.load(applied_ptr + k) * z
    return d, d1


@triton.jit
def _mapped_rounding_uniforms(seed, key, i0, map_offset, local_span, global_span, grain,
                              DIST: tl.constexpr, BLOCK: tl.constexpr):
    """Stochastic-rounding uniforms at g(i) for the local elements i0 + [0, BLOCK), tile shape:
    one Philox call per aligned quad when the map keeps quads aligned, else one per element."""
    if grain % 4 == 0:
        lanes = _rounding_quads(DIST, BLOCK) * 4
        b = map_index(i0, lanes, map_offset, local_span, global_span, BLOCK) // 4
        u = rounding_tile_at_blocks(seed, key, b, DIST)
    else:
        g = map_index(i0, tile_lanes(DIST, BLOCK), map_offset, local_span, global_span, BLOCK)
        u = rounding_uniform_at(seed, key, g)
    return u


@triton.jit
def _mapped_rounding_bits(seed, key, i0, map_offset, local_span, global_span, grain,
                          DIST: tl.constexpr, BLOCK: tl.constexpr):
    """Contract 3's random bits at g(i) for the local elements i0 + [0, BLOCK), tile shape. When
    the map keeps the tile's Philox groups aligned (quads for gaussian, words of 128 for
    rademacher), g is computed per group and each group's elements take consecutive global
    indices; else per element, one Philox call each."""
    GROUP: tl.constexpr = 128 if DIST == 1 else 4
    if grain % GROUP == 0:
        gq = map_index(i0, tl.arange(0, BLOCK // GROUP) * GROUP, map_offset, local_span,
                       global_span, BLOCK)  # the groups' first global indices
        if DIST == 1:  # [s, m, j]: global element gq[j] + 32m + s
            s8 = tl.arange(0, 32)[:, None, None]
            b = (gq >> 3)[None, None, :] + (tl.arange(0, 4) * 4)[None, :, None] + (s8 >> 3)
            r = _rounding_bits(seed, key, (b & 0xFFFFFFFF).to(tl.uint32),
                               (b >> 32).to(tl.uint32), s8 & 7)
        else:  # quad j: half (gq[j] / 4) % 2 of call gq[j] // 8
            b = gq >> 3
            w0, w1, w2, w3 = philox(seed, (b & 0xFFFFFFFF).to(tl.uint32), (b >> 32).to(tl.uint32),
                                    key, 1)
            odd = (gq & 4) != 0
            a = tl.where(odd, w2, w0)
            c = tl.where(odd, w3, w1)
            r = quads(a & 0xFFFF, a >> 16, c & 0xFFFF, c >> 16)
    else:
        g = map_index(i0, tile_lanes(DIST, BLOCK), map_offset, local_span, global_span, BLOCK)
        r = rounding_bits_at(seed, key, g)
    return r


@triton.jit
def _tail_mask(lanes, rem, OCTETS: tl.constexpr, BLOCK: tl.constexpr):
    """lanes < min(rem, BLOCK): the tail block's mask. OCTETS (the octet tile, ``tile_lanes`` 5,
    without a log): the same mask as m < min(rem, BLOCK) - 8 j for element 8 j + m (no overflow:
    both sides < BLOCK + 8), one subtraction per column compared with constants, so that the
    lanes' 8 j + m are not materialized; ptxas computed them before the full / tail test, where
    the full block paid for them too (sm_90 SASS, bf16 SR contract 3: 14 instructions per thread,
    52.7 -> 51.6 per element). With a log the lanes are needed anyway (dearer there: not used)."""
    lim = tl.minimum(rem, BLOCK).to(tl.int32)
    if OCTETS:
        return tl.arange(0, 8)[:, None] < (lim - tl.arange(0, BLOCK // 8) * 8)[None, :]
    else:
        return lanes < lim


@triton.jit
def _update_block(ptrs, src_ptrs, full, lanes, rem, d, decay, BLOCK: tl.constexpr,
                  SOFT_BF16: tl.constexpr):
    """t = round_nearest(decay * s + d) on the block (s: the source, the weight itself in place):
    load, update and store inside each side of the full / tail test, so that the tail's masks are
    computed on the tail's side only."""
    if full:
        w = tl.load(src_ptrs)
        tl.store(ptrs, round_nearest(decay * to_float32(w, SOFT_BF16) + d,
                                     ptrs.dtype.element_ty, SOFT_BF16))
    else:
        mask = _tail_mask(lanes, rem, False, BLOCK)
        w = tl.load(src_ptrs, mask=mask, other=0.0)
        tl.store(ptrs, round_nearest(decay * to_float32(w, SOFT_BF16) + d,
                                     ptrs.dtype.element_ty, SOFT_BF16), mask=mask)


# K == 1 and capacity == 1 (or % 16 == 0) must not compile their own variants
@triton.jit(do_not_specialize=["K", "capacity"])
def _perturb_kernel(base_ptr, table_ptr, seeds_ptr, schedule_ptr, decays_ptr, scales_ptr,
                    applied_ptr, K,
                    index_ptr, values_ptr, count_ptr, capacity,
                    LOG2_P: tl.constexpr, BLOCK: tl.constexpr, DIST: tl.constexpr,
                    STOCHASTIC: tl.constexpr, ALIGN: tl.constexpr, HAS_APPLIED: tl.constexpr,
                    LOG_MODE: tl.constexpr, MAPPED: tl.constexpr, SOFT_BF16: tl.constexpr,
                    NORMAL: tl.constexpr, sel_rows_ptr, out_regions_ptr, out_words, out_pool_ptr,
                    out_capacity, out_count_ptr, in_regions_ptr, in_words, in_pool_ptr,
                    in_capacity, SEL_OUT: tl.constexpr, SEL_IN: tl.constexpr, src_base_ptr,
                    src_offsets_ptr, HAS_SOURCE: tl.constexpr, shifts_ptr,
                    SHIFTED: tl.constexpr):
    """STOCHASTIC: 0 round to nearest, 1 the uniform-based stochastic rounding (contracts 1, 2),
    2 the integer one (contract 3). LOG_MODE: 0 no log (index_ptr .. capacity are None), 1 log
    and write, 2 count only (index_ptr, values_ptr and capacity are None). MAPPED: the table rows
    carry index maps (the noise and the rounding bits at g(i)); without it no map code is
    compiled. NORMAL: the version of the gaussian normals (1 or 2). SEL_OUT: 0 no selector log,
    1 write the selector log ``out_*``, 2 count its pool words only (nothing else written);
    SEL_IN: recover exactly from the held selector log ``in_*`` (with HAS_APPLIED). With either,
    BLOCK is the log's block (selector_log.py) and the program's row is ``sel_rows[j] + blk``;
    unused selector arguments are None. HAS_SOURCE: out of place, the weights are read from
    ``src_base_ptr + src_offsets[j]`` (both None without). SHIFTED: tensor j is a shard whose
    element i is element ``shifts[j] + i`` of the whole tensor: the noise and rounding bits are
    drawn for the elements from ``shifts[j] + blk * BLOCK``, the plain kernel's tiles at
    other counters (None without; the host's ``shard_shifts``).

    The block is held as a tile in Philox layout (``tile_lanes``; the plain rademacher pass in
    the vector tile, codes 3 / 4): the noise of a Philox call is used in the registers that
    computed it; a selector pass holds it in the selector's layout
    (``TILE`` 0, columns of consecutive elements) and moves only the noise there. Index math is
    int32 inside the block (the block's first element is one int64 scalar), and masks exist
    only on the tail block."""
    P: tl.constexpr = 1 << LOG2_P
    ROW: tl.constexpr = 8 if MAPPED else 4
    pid = tl.program_id(0).to(tl.int64)  # compared with the int64 starts of the table
    j = find_entry(table_ptr, pid, LOG2_P)
    row_ptr = table_ptr + P + ROW * j
    offset = tl.load(row_ptr)
    numel = tl.load(row_ptr + 1)
    key = tl.load(row_ptr + 2).to(tl.uint32)
    blk = pid - tl.load(table_ptr + j)  # block index inside tensor j
    start = blk * BLOCK  # first element of the block: the only int64 index
    shift = None  # SHIFTED: the shard's first element in the whole tensor (noise, rounding bits)
    if SHIFTED:
        shift = tl.load(shifts_ptr + j)
    if ALIGN > 1:
        # host checked: every data_ptr % 16 == 0, so every element offset is a multiple of ALIGN
        offset = tl.multiple_of(offset, ALIGN)

    # a selector pass holds the block in the selector's layout (element_tile); only the noise,
    # generated in DIST's, is moved there. VEC: the plain rademacher pass (nearest rounding, no
    # recovery, log or map) holds it in the vector tile (``tile_lanes`` 3 / 4: a thread's
    # words as 16-byte vectors, so the weights' loads and stores need no shared-memory layout
    # conversion) at VEC_BLOCK elements per program (2 words per thread: one Philox call per
    # thread feeds 64 elements)
    VEC: tl.constexpr = (DIST == 1 and not HAS_APPLIED and LOG_MODE == 0 and STOCHASTIC == 0
                         and not MAPPED and SEL_OUT == 0 and not SEL_IN)
    VTILE: tl.constexpr = 4 if base_ptr.dtype.element_ty == tl.float32 else 3
    # OCT: gaussian passes with contract 3's stochastic rounding hold the block in the octet
    # tile (``tile_lanes`` 5: a thread's 8 consecutive elements take the rounding bits of one
    # Philox call it computes itself)
    OCT: tl.constexpr = (DIST == 0 and NORMAL == 2 and STOCHASTIC == 2 and not MAPPED
                         and SEL_OUT == 0 and not SEL_IN)
    NTILE: tl.constexpr = VTILE if VEC else (5 if OCT else DIST)  # the noise's tile
    TILE: tl.constexpr = 0 if SEL_OUT != 0 or SEL_IN else NTILE
    lanes = tile_lanes(TILE, BLOCK)  # int32
    OCT_MASK: tl.constexpr = TILE == 5 and LOG_MODE == 0  # the tail's masks: _tail_mask
    ptrs = base_ptr + (offset + start) + lanes
    if HAS_SOURCE:
        src_offset = tl.load(src_offsets_ptr + j)
        if ALIGN > 1:  # host checked the sources' alignment too
            src_offset = tl.multiple_of(src_offset, ALIGN)
        src_ptrs = src_base_ptr + (src_offset + start) + lanes
    else:
        src_ptrs = ptrs
    rem = numel - start
    full = rem >= BLOCK
    # the weights first: their loads overlap the noise arithmetic (VEC: after the seed loop, in
    # _update_block: its 64 accumulators per thread leave no registers for them)
    if not VEC:
        if full:  # interior blocks: no mask, vector loads
            w = tl.load(src_ptrs)
        else:
            w = tl.load(src_ptrs, mask=_tail_mask(lanes, rem, OCT_MASK, BLOCK), other=0.0)
    # OCT without recovery: the rounding bits are drawn before the seed loop (sm_90 SASS: bf16
    # 54.9 -> 54.0 instructions per element at K = 1, fp16 58.9 -> 58.0, each extra seed
    # unchanged or cheaper, 96 registers, no spills; with recovery before the loop costs more:
    # bf16 applied= 74.0 -> 75.9, so those passes draw them after it)
    EARLY_BITS: tl.constexpr = OCT and not HAS_APPLIED
    if EARLY_BITS:
        r_early = rounding_bits_tile(None, key, blk, TILE, BLOCK,
                                     load_key_schedule(schedule_ptr + 10 * K), shift)
    # the noise sum (from 0.0, seed order), added to the weight once (contract order)
    d = tl.zeros(tile_lanes(NTILE, BLOCK).shape, tl.float32)
    d1 = tl.zeros(d.shape, tl.float32)  # the perturbation held now (HAS_APPLIED only)
    if MAPPED:
        map_offset = tl.load(row_ptr + 4)
        local_span = tl.load(row_ptr + 5)
        global_span = tl.load(row_ptr + 6)
        grain = tl.load(row_ptr + 7)
        d, d1 = _mapped_noise_sums(seeds_ptr, schedule_ptr, scales_ptr, applied_ptr, K, key,
                                   start, map_offset, local_span, global_span, grain, d, d1, DIST,
                                   BLOCK, HAS_APPLIED, NORMAL)
    else:
        # each seed's Philox key schedule is loaded (host-computed, ``key_schedule``), not
        # computed: 5 loads instead of 18 additions per seed and thread. zero: numel < 2^62, a 0
        # the compiler cannot see (``philox_scheduled``). The two loop forms differ only in how
        # ptxas allocates registers (sass_budget): with recovery, pointers carried through the
        # loop keep it under MAXNREG without spills (indexed: 5 spill instructions; the form
        # without recovery: +0.9 to +5.2 at K = 1, or 3 spill instructions); without, the loop
        # runs over k10 = 10 k, the schedule indexed by it and the scale pointer carried (a
        # shorter trip-count and address update: every such variant 0.1 to 1.3 instructions per
        # element cheaper per seed than indexing both by k, none dearer). K >= 1
        # (perturb_triton checks): told to the recovering loop, LLVM drops the loop's K == 0
        # bypass, on both sides of which ptxas zeroed the D and D1 tiles (-1.2 per element at
        # K = 1); not with the undo log's appends, contract 1 / 2's stochastic rounding or
        # contract 3's with count_only (ptxas then allocates the seed loop worse: +0.2 to +1.0
        # per seed), nor in the plain loop (docs/gpu-performance.md)
        zero = (numel >> 62).to(tl.uint32)
        if HAS_APPLIED:
            ks_ptr = schedule_ptr
            sc_ptr = scales_ptr
            ap_ptr = applied_ptr
            if (LOG_MODE == 0 and STOCHASTIC != 1) or (LOG_MODE == 2 and STOCHASTIC == 0):
                tl.assume(K >= 1)
            for k in range(K):
                words = noise_words(None, key, blk, NTILE, BLOCK, load_key_schedule(ks_ptr),
                                    zero, shift)
                d = add_noise(d, tl.load(sc_ptr), words, NTILE, NORMAL)
                d1 = add_noise(d1, tl.load(ap_ptr), words, NTILE, NORMAL)
                ks_ptr += 10
                sc_ptr += 1
                ap_ptr += 1
        else:
            sc_ptr = scales_ptr
            for k10 in range(0, 10 * K, 10):  # k10 = 10 k
                words = noise_words(None, key, blk, NTILE, BLOCK,
                                    load_key_schedule(schedule_ptr + k10), zero, shift)
                d = add_noise(d, tl.load(sc_ptr), words, NTILE, NORMAL)
                sc_ptr += 1
    if VEC:
        _update_block(ptrs, src_ptrs, full, lanes, rem, d, tl.load(decays_ptr + j), BLOCK,
                      SOFT_BF16)
    else:
        x = to_float32(w, SOFT_BF16)
        if SEL_OUT != 0 or SEL_IN:
            sel_row = tl.load(sel_rows_ptr + j) + blk  # BLOCK is the log's block
            d = element_tile(d, DIST, BLOCK)
            if HAS_APPLIED:
                d1 = element_tile(d1, DIST, BLOCK)
        theta = w  # replaced by the held pattern with SEL_IN, the only case that reads it
        if SEL_IN:  # exact: theta's pattern from the held log
            theta = held_theta(w, d1, lanes < rem, in_regions_ptr, in_words, in_pool_ptr,
                               in_capacity, sel_row, base_ptr.dtype.element_ty, SOFT_BF16)
            x = to_float32(from_pattern(theta, base_ptr.dtype.element_ty), SOFT_BF16)
        elif HAS_APPLIED:
            x = recover_unperturbed(x, d1, base_ptr.dtype.element_ty, SOFT_BF16)
        acc = tl.load(decays_ptr + j) * x + d

        if STOCHASTIC == 2:  # contract 3: integer stochastic rounding
            if MAPPED:
                r = _mapped_rounding_bits(load_seed(seeds_ptr + K), key, start, map_offset,
                                          local_span, global_span, grain, TILE, BLOCK)
            elif EARLY_BITS:
                r = r_early
            elif TILE != 1:  # the rounding seed's key schedule loaded (rademacher: spills)
                r = rounding_bits_tile(load_seed(seeds_ptr + K), key, blk, TILE, BLOCK,
                                       load_key_schedule(schedule_ptr + 10 * K), shift)
            else:
                r = rounding_bits_tile(load_seed(seeds_ptr + K), key, blk, TILE, BLOCK,
                                       shift=shift)
            y = round_stochastic_integer(acc, r, base_ptr.dtype.element_ty, SOFT_BF16,
                                         not MAPPED)
        elif STOCHASTIC:
            if MAPPED:
                u = _mapped_rounding_uniforms(load_seed(seeds_ptr + K), key, start, map_offset,
                                              local_span, global_span, grain, TILE, BLOCK)
            else:
                u = rounding_tile(load_seed(seeds_ptr + K), key, blk, TILE, BLOCK, shift)
            y = round_stochastic(acc, u, base_ptr.dtype.element_ty, SOFT_BF16)
        else:
            y = round_nearest(acc, base_ptr.dtype.element_ty, SOFT_BF16)
        written = stored_value(y, theta, d, tl.load(decays_ptr + j), SEL_IN,
                               base_ptr.dtype.element_ty)
        if LOG_MODE != 2 and SEL_OUT != 2:
            if full:
                tl.store(ptrs, written)
            else:
                tl.store(ptrs, written, mask=_tail_mask(lanes, rem, OCT_MASK, BLOCK))

        if SEL_OUT != 0:
            log_stored(out_regions_ptr, out_words, out_pool_ptr, out_capacity, out_count_ptr,
                       sel_row, theta, w, x, written, d, lanes < rem, SEL_OUT == 2, SEL_IN,
                       HAS_APPLIED, BLOCK, base_ptr.dtype.element_ty, SOFT_BF16)

        if LOG_MODE != 0:
            # lost: a later pass with applied = these scales does not recover x
            lost = recovery_loses(x, y, d, base_ptr.dtype.element_ty, SOFT_BF16)
            lost = flat((lost & (lanes < rem)).to(tl.int32), TILE, BLOCK)  # block order
            n_lost = tl.sum(lost, axis=0)
            if n_lost > 0:  # all programs hit one counter: skip the atomic when there is nothing
                # one atomic per program reserves its slots; relaxed: only the counter matters
                first = tl.atomic_add(count_ptr, n_lost.to(tl.int64), sem="relaxed")
                if LOG_MODE == 1:
                    slot = first + tl.cumsum(lost, axis=0) - 1  # lost elements in block order
                    keep = (lost != 0) & (slot < capacity)  # past the capacity: counted only
                    tl.store(index_ptr + slot,
                             tl.load(row_ptr + 3) + start + flat(lanes, TILE, BLOCK), mask=keep)
                    tl.store(values_ptr + slot,
                             flat(round_nearest(x, base_ptr.dtype.element_ty, SOFT_BF16), TILE,
                                  BLOCK),
                             mask=keep)  # exact: x is a value of the tensor's dtype


def block_for(dist: str, stochastic: int, recover: bool, mapped: bool = False,
              normal: int = 2, itemsize: int = 2, log: bool = False,
              selector: bool = False, source: bool = False) -> int:
    """Elements per program of a pass. ``recover``: with ``applied`` or a log; ``log``: with a
    log; ``mapped``: a
    table with index maps; ``normal``: the contract version of the gaussian normals (v1's
    libdevice log / sin / cos hold more registers: half the block keeps it under MAXNREG
    without spills); ``itemsize``: the plain rademacher pass's vector tile (VEC_BLOCK); other
    rademacher passes' 32 fp32 weights per thread spill at 8192 (8 spill instructions), not at
    4096. ``selector``: a selector log is written or read: one
    program per block of the log (SELECTOR_BLOCK elements). ``source``: out of place
    (``sources``; the vector tile then at most SOURCE_VEC_BLOCK)."""
    if selector:
        return SELECTOR_BLOCK
    if dist == "rademacher" and stochastic == 0 and not recover and not mapped:
        block = VEC_BLOCK[itemsize]  # the vector tile (_perturb_kernel's VEC)
        return min(block, SOURCE_VEC_BLOCK) if source else block
    block = BLOCK[dist]
    if dist == "rademacher" and itemsize == 4:
        block = min(block, 4096)
    if stochastic == 1:  # True: the uniform-based rounding
        block = min(block, STOCHASTIC_BLOCK[dist])
    if stochastic == 2 and recover:
        block = min(block, INTEGER_STOCHASTIC_RECOVER_BLOCK)
    if recover:
        block = min(block, RECOVER_BLOCK if itemsize == 2 and not log else LOG_BLOCK)
    if mapped:
        block = min(block, MAPPED_BLOCK)
    if dist == "gaussian" and normal == 1:
        block = max(block // 2, 128)
    return block


def perturb_triton(tensors: list[torch.Tensor], keys: list[int], seeds: list[int],
                   scales: torch.Tensor, decays: torch.Tensor, dist: str, rounding: str,
                   rounding_seed: int, applied: torch.Tensor | None = None, log=None,
                   count_only: bool = False, index_maps=None,
                   table_cache: dict | None = None, contract: int = DEFAULT_CONTRACT,
                   selector_log=None, held_log=None, sources=None) -> None:
    """In place: t[i] = round(decays[j] * t[i] + D), D = sum_k scales[k] * z(seeds[k], keys[j], i)
    summed first, for every tensor j of the list, in one kernel launch. ``applied``: None, or
    float32 [K] on the device, the coefficients of the perturbation the tensors hold now; t[i] is
    then first recovered from round(theta + sum_k applied[k] * z). ``log``: None, or the
    UndoBuffers that receive the elements recovery cannot give back (docs/undo-log.md; the
    caller zeroes ``log.count``, the kernel adds to it); ``count_only`` (with ``log``): only add to
    the count, write nothing else. ``index_maps``: None or one entry per tensor, None (identity)
    or (offset, local_span, global_span): the noise and rounding of local element i are the
    contract's at g(i) (module docstring); the log keeps local indices; tensors whose map is None
    or a shift by whole Philox calls run in the plain kernel at shifted counters (SHIFTED,
    ``shard_shifts``), in a launch of their own when other maps need the mapped kernel and they
    hold at least SPLIT_MIN_ELEMENTS. ``table_cache``: None, or a dict the caller keeps per
    persistent tensor group: the static launch tables are reused while the tensors' addresses,
    numels, keys, maps and the block stay the same (``cached_table``), and so are the shifts
    (entry "shifts") and a split call's parts.
    ``contract``: 1, 2 or 3 (docs/noise-contract.md): the gaussian normals (1: v1, else v2)
    and the stochastic rounding (3: integer).
    ``selector_log`` / ``held_log`` (SelectorBuffers, docs/undo-log.md): the selector log this
    pass writes (nearest rounding, decays 1; with ``count_only`` only the pool words it needs are
    added to its count) / the one it reads, with ``applied``, to recover every weight exactly;
    bit-identical to the torch reference's (the pool's block order aside: one atomic add per
    spilled block). ``sources`` (None, or one contiguous tensor per tensor, same dtype and numel;
    without ``applied`` and the logs): out of place, t[i] = round(decays[j] * s[i] + D), s only
    read. No host synchronization."""
    check_sources(tensors, sources, applied, log, selector_log, held_log, "perturb_triton")
    check_selector_rows(selector_log, held_log, "perturb_triton")
    if len(seeds) == 0:  # the recovering kernel assumes K >= 1
        raise ValueError("perturb_triton: seeds must hold at least one seed")
    if selector_log is not None and log is not None:
        raise ValueError("perturb_triton: log and selector_log are exclusive")
    if held_log is not None and applied is None:
        raise ValueError("perturb_triton: held_log needs applied")
    if selector_log is not None and rounding != "nearest":
        raise ValueError("perturb_triton: selector_log needs rounding='nearest'")
    if count_only and log is None and selector_log is None:
        raise ValueError("perturb_triton: count_only needs a log or a selector_log")
    log_mode = 0 if log is None else (2 if count_only else 1)
    sel_out = 0 if selector_log is None else (2 if count_only else 1)
    selector = selector_log is not None or held_log is not None
    stochastic = 0
    if rounding == "stochastic" and tensors[0].dtype != torch.float32:
        stochastic = 2 if integer_rounding(contract) else 1
    normal = normals_version(contract)
    recover = applied is not None or log is not None or selector_log is not None
    itemsize = tensors[0].element_size()
    source = sources is not None
    block = block_for(dist, stochastic, recover, normal=normal, itemsize=itemsize,
                      log=log is not None, selector=selector, source=source)
    mapped_block = block_for(dist, stochastic, recover, True, normal, itemsize, log is not None,
                             selector, source)
    launch = functools.partial(
        _launch, seeds=seeds, scales=scales.contiguous(), applied=applied, log=log,
        log_mode=log_mode, selector_log=selector_log, sel_out=sel_out, held_log=held_log,
        selector=selector, dist=dist, stochastic=stochastic, normal=normal,
        rounding_seed=rounding_seed, table_cache=table_cache)
    decays = decays.contiguous()
    shifts = shard_shifts(index_maps, tensors, block, shift_grain(dist, stochastic))
    plain = [] if shifts is None else [j for j, shift in enumerate(shifts) if shift is not None]
    if shifts is None or len(plain) in (0, len(tensors)) or sum(
            tensors[j].numel() for j in plain) < SPLIT_MIN_ELEMENTS:
        # one launch: the plain kernel (shifted shards at shifted counters), or the mapped one
        whole = shifts is not None and len(plain) == len(tensors)
        mapped_call = shifts is not None and not whole  # some map the plain kernel cannot take
        # a mapped table's programs hold mapped_block elements whatever the plain block: keyed
        # on it alone, passes that differ only in the plain block share it in table_cache
        launch(tensors, keys, decays, sources, None if whole else index_maps,
               mapped_block if mapped_call else block, mapped_block,
               shifts=_shifts_table(table_cache, "shifts", shifts, tensors) if whole else None,
               firsts=None, sel_rows=_selector_rows(table_cache, tensors) if selector else None)
        return
    # the shifted shards in the plain kernel, the others in the mapped one: two launches over
    # parts of the group, each tensor at its group-flat index (undo log) and selector rows
    mapped = [j for j, shift in enumerate(shifts) if shift is None]
    numels = tuple(t.numel() for t in tensors)
    firsts = block_starts(list(numels), len(tensors))
    rows = _selector_row_values(tensors) if selector else None
    for name, part in (("shifted", plain), ("mapped", mapped)):
        sub = [tensors[j] for j in part]
        picked = cached_int64(table_cache, f"split/{name}", (numels, tuple(part)), lambda: part,
                              decays.device)
        sel_rows = None if rows is None else cached_int64(
            table_cache, f"selector_rows/{name}", (numels, tuple(part)),
            lambda: [rows[j] for j in part], tensors[0].device)
        shifted = name == "shifted"
        launch(sub, [keys[j] for j in part], decays.index_select(0, picked),
               None if sources is None else [sources[j] for j in part],
               None if shifted else [index_maps[j] for j in part],
               block if shifted else mapped_block, mapped_block,
               shifts=(_shifts_table(table_cache, "split/shifts", [shifts[j] for j in part], sub)
                       if shifted else None),
               firsts=[firsts[j] for j in part], sel_rows=sel_rows)


# Splitting a call costs a launch; the mapped kernel's extra instructions on the shifted shards
# (sm_90, bf16: 19 per element gaussian, 36 rademacher, more per extra seed; sass_budget) cost
# about that (a few us) at a few million elements on an H100 (~30 T instructions/s). Smaller
# calls keep one launch.
SPLIT_MIN_ELEMENTS = 1 << 22


def _launch(tensors, keys, decays, sources, index_maps, block, mapped_block, *, shifts, firsts,
            sel_rows, seeds, scales, applied, log, log_mode, selector_log, sel_out, held_log,
            selector, dist, stochastic, normal, rounding_seed, table_cache) -> None:
    """One launch of _perturb_kernel over `tensors` (all of a call, or one part of a split one:
    then `firsts` and `sel_rows` are the whole group's)."""
    launch = cached_table(table_cache, tensors, keys, seeds, rounding_seed, block, index_maps,
                          mapped_block=mapped_block, schedule=True, firsts=firsts)
    base = launch.base
    align = launch.align
    src_base = src_offsets = None
    if sources is not None:  # the sources addressed as the tensors are: a base and offsets
        first, offsets, src_align = base_and_offsets(sources)
        src_base, src_offsets = sources[first], int64_table(offsets, tensors[0].device)
        align = min(align, src_align)
    out, held = selector_log, held_log
    _perturb_kernel[(launch.n_programs,)](
        base, launch.table, launch.seeds, launch.schedule, decays, scales,
        scales if applied is None else applied.contiguous(),  # never read without applied
        len(seeds),
        # unused log arguments are None: constexpr, not even kernel parameters
        log.index if log_mode == 1 else None, log.values if log_mode == 1 else None,
        log.count if log_mode != 0 else None, log.capacity if log_mode == 1 else None,
        LOG2_P=launch.log2_p, BLOCK=launch.block, DIST=DIST_CODES[dist],
        STOCHASTIC=stochastic, ALIGN=align,
        HAS_APPLIED=applied is not None, LOG_MODE=log_mode, MAPPED=launch.mapped,
        SOFT_BF16=SOFT_BF16, NORMAL=normal,
        sel_rows_ptr=sel_rows,
        out_regions_ptr=None if out is None else out.regions,
        out_words=None if out is None else out.regions.shape[1],
        out_pool_ptr=None if sel_out != 1 else out.pool,
        out_capacity=None if sel_out != 1 else out.pool.numel(),
        out_count_ptr=None if out is None else out.count,
        in_regions_ptr=None if held is None else held.regions,
        in_words=None if held is None else held.regions.shape[1],
        in_pool_ptr=None if held is None else held.pool,
        in_capacity=None if held is None else held.pool.numel(),
        SEL_OUT=sel_out, SEL_IN=held is not None,
        src_base_ptr=src_base, src_offsets_ptr=src_offsets, HAS_SOURCE=sources is not None,
        shifts_ptr=shifts, SHIFTED=shifts is not None,
        num_warps=SELECTOR_WARPS[dist] if selector and not launch.mapped else NUM_WARPS,
        maxnreg=MAXNREG)
    count_launch()


def shift_grain(dist: str, stochastic: int) -> int:
    """Elements of one Philox call of a pass's noise and rounding bits: a shard shifted by a
    multiple of it draws whole calls of the whole tensor, in the plain kernel's tiles (gaussian
    noise and contract 1 / 2's rounding uniforms 4, contract 3's rounding bits 8, rademacher
    128)."""
    if dist == "rademacher":
        return 128
    return 8 if stochastic == 2 else 4


# A shifted tile adds its calls' indices to the low counter word only (``first_call``): the
# calls of a shard's elements must lie in one 2^32-call segment, 2^34 elements at 4 per call
# (the segments of 8 and 128 per call are unions of those)
_SEGMENT_BITS = 34


def shard_shifts(index_maps, tensors: list[torch.Tensor], block: int,
                 grain: int) -> list[int | None] | None:
    """Per tensor, the shift s of its map when the plain kernel can draw its block b at element
    ``s + b * block`` of the whole tensor (SHIFTED): 0 for an identity, s for a shift
    g(i) = s + i by a multiple of ``grain`` (``shift_grain``: FSDP2's dim-0 shards, whole rows
    or 1-D chunks of a multiple of grain; a virtual probe's row pieces); None for a map the
    mapped kernel must take. A shift that is not a whole block also needs the shard's elements
    in one counter segment (``_SEGMENT_BITS``: any shard of a tensor under 2^34 elements).
    None without maps."""
    if index_maps is None:
        return None
    shifts: list[int | None] = []
    for index_map, tensor in zip(index_maps, tensors):
        normal = normalize_map(index_map, tensor.numel())
        if normal is None:
            shifts.append(0)
            continue
        offset, local_span, _, _ = normal
        # a carry past the last element is harmless: those lanes are masked
        end = offset + tensor.numel() - 1
        if local_span != SHIFT_SPAN or offset % grain or (
                offset % block and offset >> _SEGMENT_BITS != end >> _SEGMENT_BITS):
            shifts.append(None)
        else:
            shifts.append(offset)
    return shifts


def _shifts_table(table_cache: dict | None, name: str, shifts: list[int],
                  tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """int64 [T] on the device (kept in ``table_cache[name]``), or None when every shift is 0
    (the plain kernel's own counters)."""
    if not any(shifts):
        return None
    return cached_int64(table_cache, name, tuple(shifts), lambda: shifts, tensors[0].device)


def _selector_row_values(tensors: list[torch.Tensor]) -> list[int]:
    """Each tensor's first row in a selector log: its blocks of SELECTOR_BLOCK elements follow
    those of the tensors before it."""
    return block_starts([-(-t.numel() // SELECTOR_BLOCK) for t in tensors], len(tensors))


def _selector_rows(table_cache: dict | None, tensors: list[torch.Tensor]) -> torch.Tensor:
    """``_selector_row_values`` as int64 [T] on the device, kept in ``table_cache``."""
    return cached_int64(table_cache, "selector_rows", tuple(t.numel() for t in tensors),
                        lambda: _selector_row_values(tensors), tensors[0].device)
