"""Shared pieces of the Triton backend: the noise contract as ``@triton.jit`` helpers, the
multi-tensor launch tables, seed handling and the dtype maps.

The contract (docs/noise-contract.md) in short: Philox4x32-10 with key = seed (lo, hi) and counter
``(b mod 2^32, b >> 32, key, stream)``. Gaussian / uniform: ``b = i // 4``, one Philox call feeds
four consecutive elements. Rademacher: ``b = i // 128``, one call feeds 128 elements (one bit each).
Stochastic rounding: word ``i mod 4`` of block ``i // 4`` on stream 1 with ``rounding_seed``
(contracts 1, 2); contract 3: 16 bits, half ``i mod 2`` of word ``(i mod 8) // 2`` of block
``i // 8`` on stream 1 (``rounding_bits_tile``, ``round_stochastic_integer``).

The block helpers work on one BLOCK of a tensor whose first element index is a multiple of BLOCK
(BLOCK a power of two >= 128), so the Philox blocks never straddle two programs and the low counter
word of the block is computed without a carry: ``z`` is independent of BLOCK, the grid and the
other tensors of a call. A block is held as a tile in Philox layout (``tile_lanes``: the call is
the last dimension, so each thread uses the noise it computed, with no shuffle). The ``*_at``
helpers give the same values at arbitrary element indices (one Philox call per element: the undo
log's scatter).

Index maps (sharded parameters, layout in perturb.py): a local element i of a shard takes the
noise and rounding uniforms of the contract index ``g(i) = offset + (i // local_span) *
global_span + i % local_span``. ``map_index`` computes g for the lanes of a block;
``noise_words_at_blocks`` / ``rounding_tile_at_blocks`` keep one Philox call per 4 (128) elements
at non-consecutive, 64-bit block indices when the map keeps those groups aligned; otherwise the
``*_at`` helpers run one call per element.

Launch tables: ``build_table`` builds the static rows and the seeds into one tensor per call;
``cached_table`` keeps the static tensor in a caller-owned dict (keyed by addresses, numels,
keys, maps, block, dtype, device) and copies only the K + 1 seeds per call (with
``schedule=True`` followed by each seed's Philox key schedule, ``key_schedule``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import one_dtype
from ._normal import normal_pair_v2

# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------

DIST_CODES = {"gaussian": 0, "rademacher": 1, "uniform": 2}
ROUNDING_CODES = {"nearest": 0, "stochastic": 1}
ITEMSIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}

_INT64_MAX = (1 << 63) - 1

# Triton's interpreter converts float32 -> bfloat16 by truncation (the compiled path rounds to
# nearest even, LLVM fptrunc -> cvt.rn). Under the interpreter, bf16 conversions go through the
# bit-exact integer RNE below instead; compiled kernels keep the hardware conversion. Triton
# decides interpreter vs compiler when the kernels are defined, so this is read once, at import.
SOFT_BF16 = os.environ.get("TRITON_INTERPRET", "0") == "1"
_launches = 0


def launch_count() -> int:
    """Total number of Triton kernel launches issued by this backend since import (or reset).

    Benchmarks read it before and after a call to report launches per call (perturb_triton and
    lowrank_perturb_triton: exactly one per call, whatever the number of tensors)."""
    return _launches


def reset_launch_count() -> None:
    global _launches
    _launches = 0


def count_launch() -> None:
    global _launches
    _launches += 1


def as_int64_bits(x: int) -> int:
    """The int64 whose two's-complement bit pattern is the uint64 ``x`` (seeds, indices)."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= (1 << 63) else x


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def int64_table(values: list[int], device: torch.device) -> torch.Tensor:
    """A small int64 tensor on ``device`` without a host synchronization.

    A plain ``torch.tensor(..., device="cuda")`` does a blocking copy, which waits for all queued
    kernels; a pinned staging buffer with ``non_blocking=True`` only enqueues the copy (the
    caching host allocator keeps the buffer alive until the copy has run)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def block_starts(counts: list[int], p: int) -> list[int]:
    """Exclusive prefix sums of ``counts`` (programs per tensor), padded to ``p`` entries with
    INT64_MAX so that the padded entries are never <= a program id."""
    starts, acc = [], 0
    for c in counts:
        starts.append(acc)
        acc += c
    return starts + [_INT64_MAX] * (p - len(starts))


# ---- index maps (sharded parameters) --------------------------------------------------------

# Philox granularity of the contract: 4 elements per call (gaussian, uniform, rounding uniforms),
# 128 per call (rademacher)
QUAD = 4
WORD = 128
# local_span = global_span of a map that is a pure shift g(i) = offset + i: i // SHIFT_SPAN == 0
# for every element (numel < 2^62), a multiple of WORD, and >= any BLOCK (map_index's cheap case)
SHIFT_SPAN = 1 << 62


def normalize_map(index_map, numel: int):
    """None for an identity map, else (offset, local_span, global_span, grain) for the table.

    ``g(i) = offset + (i // local_span) * global_span + i % local_span``. A map whose local rows are
    contiguous in the global order (local_span == global_span) or that has one local row
    (local_span == numel) is the shift g(i) = offset + i: its spans become SHIFT_SPAN so that its
    alignment depends on the offset alone, and with offset 0 it is the identity. ``grain``: the
    largest of 1, QUAD, WORD dividing offset and both spans: then every aligned local group of that
    many elements maps onto one aligned global group (same local row, consecutive global indices),
    so the kernel can keep one Philox call per group."""
    if index_map is None:
        return None
    offset, local_span, global_span = (int(v) for v in index_map)
    if local_span == global_span or local_span == numel:
        if offset == 0:
            return None
        local_span = global_span = SHIFT_SPAN
    grain = 1
    for g in (QUAD, WORD):
        if offset % g == 0 and local_span % g == 0 and global_span % g == 0:
            grain = g
    return offset, local_span, global_span, grain


# ---- launch tables ----------------------------------------------------------------------------

class LaunchTable(NamedTuple):
    """What a multi-tensor kernel is launched with (layout in perturb.py).

    table: the static part (int64, on the device): block starts and one row per tensor; depends
    only on the tensors' addresses, numels, keys, maps and the block size. seeds: the per-call
    part (int64 [K + 1]: seeds, rounding seed), separate so that a cached table serves any seeds.
    block: the elements per program the table was built for (``mapped_block`` with maps)."""

    base: torch.Tensor  # the tensor with the lowest address: rows hold offsets from it
    table: torch.Tensor
    seeds: torch.Tensor
    n_programs: int
    log2_p: int
    align: int  # 16 // itemsize when every data_ptr is 16-byte aligned, else 1
    mapped: bool  # rows carry the index maps (ROW = 8 values per tensor instead of 4)
    block: int
    # with schedule: int64 [10 (K + 1)], seed k's Philox key schedule at [10 k, 10 k + 10), the
    # rounding seed's at [10 K, 10 K + 10) (``key_schedule``), a 16-byte aligned view of the
    # seeds' device tensor; else None
    schedule: torch.Tensor | None = None


class _StaticTable(NamedTuple):
    base_index: int  # no tensor reference: a cache entry must not keep tensors alive
    table: torch.Tensor
    n_programs: int
    log2_p: int
    align: int
    mapped: bool
    block: int


# launch tables per table_cache dict: one group uses a few blocks (dense, recovery / log,
# scatter), each in two tables when its calls are split into a shifted and a mapped launch
# (perturb.py); addresses that change every call (temporary contiguous copies) must not grow it
TABLE_CACHE_ENTRIES = 8


def base_and_offsets(tensors: list[torch.Tensor]) -> tuple[int, list[int], int]:
    """(index of the tensor with the lowest address, every tensor's element offset from it, the
    ALIGN they allow: 16 // itemsize when every address is 16-byte aligned, else 1). Tensors of
    one dtype: the kernels address tensor j as ``base_ptr + offset_j``."""
    itemsize = ITEMSIZE[one_dtype(tensors, "the triton backend")]
    ptrs = [t.data_ptr() for t in tensors]
    base_i = min(range(len(tensors)), key=ptrs.__getitem__)
    align = 16 // itemsize if all(ptr % 16 == 0 for ptr in ptrs) else 1
    return base_i, [(ptr - ptrs[base_i]) // itemsize for ptr in ptrs], align


def cached_int64(table_cache: dict | None, name: str, key, values: Callable[[], list[int]],
                 device: torch.device) -> torch.Tensor:
    """``int64_table(values(), device)``, kept in ``table_cache[name]`` and reused while ``key``
    (everything the values depend on) and the device stay the same (values() is not called
    then)."""
    hit = None if table_cache is None else table_cache.get(name)
    if hit is not None and hit[0] == (key, device):
        return hit[1]
    table = int64_table(values(), device)
    if table_cache is not None:
        table_cache[name] = ((key, device), table)
    return table


def _static_values(tensors, keys, block, index_maps, mapped_block, firsts=None):
    """(host values of the static table, padded to an even length so that the seeds placed after
    them stay 16-byte aligned, base index, programs, LOG2_P, ALIGN, mapped, block). firsts:
    each tensor's group-flat index (default: the numels before it in this list; a launch over
    part of a group gives the whole group's)."""
    base_i, offsets, align = base_and_offsets(tensors)
    numels = [t.numel() for t in tensors]
    maps = None if index_maps is None else [normalize_map(m, n)
                                            for m, n in zip(index_maps, numels)]
    mapped = maps is not None and any(m is not None for m in maps)
    if mapped and mapped_block is not None:
        block = mapped_block
    counts = [(n + block - 1) // block for n in numels]
    p = next_pow2(len(tensors))
    if firsts is None:
        firsts = block_starts(numels, len(numels))
    rows = []
    for j, (offset, n, key, first) in enumerate(zip(offsets, numels, keys, firsts)):
        rows += [offset, n, key, first]
        if mapped:
            rows += (0, SHIFT_SPAN, SHIFT_SPAN, WORD) if maps[j] is None else maps[j]
    row = 8 if mapped else 4
    rows += [0] * (row * (p - len(tensors)))
    values = block_starts(counts, p) + rows
    values += [0] * (len(values) % 2)
    return values, base_i, sum(counts), p.bit_length() - 1, align, mapped, block


# Philox4x32's key increments (Weyl sequence): round r uses (k0 + r W0, k1 + r W1) mod 2^32
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_M32 = 0xFFFFFFFF


@functools.lru_cache(maxsize=4096)
def key_schedule(seed: int) -> tuple[int, ...]:
    """The Philox-10 key schedule of ``seed`` (uint64; key = (seed lo, seed hi)) as 10 int64
    values: value r holds round r's key words (k0 + r W0) mod 2^32 in its low and
    (k1 + r W1) mod 2^32 in its high half, i.e. 20 uint32 in the order the rounds use them
    (``load_key_schedule``). Precomputed once per seed on the host so that a kernel loads it
    (5 16-byte loads) instead of computing 18 additions per seed in every thread."""
    seed &= (1 << 64) - 1
    k0, k1 = seed & _M32, seed >> 32
    return tuple(as_int64_bits(((k0 + r * _PHILOX_W0) & _M32)
                               | (((k1 + r * _PHILOX_W1) & _M32) << 32)) for r in range(10))


def _seed_values(seeds: list[int], rounding_seed: int, schedule: bool = False) -> list[int]:
    """[seeds (K)] [rounding seed]; with ``schedule``, padded to an even length (16-byte
    alignment) and followed by the key schedules (``key_schedule``) of the K seeds and of the
    rounding seed."""
    values = [as_int64_bits(s) for s in seeds] + [as_int64_bits(rounding_seed)]
    if schedule:
        values += [0] * (len(values) % 2)
        for s in list(seeds) + [rounding_seed]:
            values += key_schedule(s)
    return values


def _split_seeds(tensor: torch.Tensor, k: int, schedule: bool):
    """(seeds view [K + 1], schedule view or None) of a device tensor from ``_seed_values``."""
    if not schedule:
        return tensor, None
    return tensor[:k + 1], tensor[(k + 2) // 2 * 2:]


def build_table(tensors: list[torch.Tensor], keys: list[int], seeds: list[int],
                rounding_seed: int, block: int, index_maps=None,
                mapped_block: int | None = None, schedule: bool = False,
                firsts: list[int] | None = None) -> LaunchTable:
    """The launch table of a multi-tensor op, built from scratch: static part and seeds in ONE
    host list and one copy to the device (``seeds`` is a view of the same tensor).

    ``block``: elements per program; with block = 1 the starts are the tensors' first group-flat
    element indices (scatter.py searches them per element). ``index_maps``: None or one entry per
    tensor, None or (offset, local_span, global_span); all-identity maps give the unmapped table.
    ``mapped_block``: None, or the elements per program of a table with maps (then
    ``LaunchTable.block``). ``schedule``: the seeds' Philox key schedules follow them in the
    same tensor (``LaunchTable.schedule``). ``firsts``: the tensors' group-flat indices
    (``_static_values``)."""
    values, base_i, n_programs, log2_p, align, mapped, block = _static_values(
        tensors, keys, block, index_maps, mapped_block, firsts)
    table = int64_table(values + _seed_values(seeds, rounding_seed, schedule),
                        tensors[0].device)
    n = len(values)
    seeds_t, schedule_t = _split_seeds(table[n:], len(seeds), schedule)
    return LaunchTable(tensors[base_i], table[:n], seeds_t, n_programs, log2_p, align, mapped,
                       block, schedule_t)


def table_cache_key(tensors: list[torch.Tensor], keys: list[int], block: int, index_maps=None,
                    mapped_block: int | None = None, firsts: list[int] | None = None):
    """Everything the static table depends on (addresses, numels, keys, maps, blocks, dtype,
    device); O(T) but no Python list per value and no device copy."""
    t0 = tensors[0]
    maps = None if index_maps is None else tuple(None if m is None else tuple(m)
                                                 for m in index_maps)
    return (block, None if maps is None else mapped_block, t0.dtype, t0.device,
            tuple(map(torch.Tensor.data_ptr, tensors)), tuple(map(torch.Tensor.numel, tensors)),
            tuple(keys), maps, None if firsts is None else tuple(firsts))


def cached_table(cache: dict | None, tensors: list[torch.Tensor], keys: list[int],
                 seeds: list[int], rounding_seed: int, block: int, index_maps=None,
                 mapped_block: int | None = None, schedule: bool = False,
                 firsts: list[int] | None = None) -> LaunchTable:
    """``build_table``, reusing the static device table stored in ``cache`` (one dict per
    persistent tensor group, kept by the caller) when its key matches; else it is built and
    stored, evicting the least recently used entry beyond TABLE_CACHE_ENTRIES. Only the seeds
    (K + 1 int64, and the key schedules with ``schedule``) are copied per call, still without a
    host synchronization. ``cache=None``: exactly ``build_table``."""
    if cache is None:
        return build_table(tensors, keys, seeds, rounding_seed, block, index_maps, mapped_block,
                           schedule, firsts)
    key = table_cache_key(tensors, keys, block, index_maps, mapped_block, firsts)
    # dict key: the tuple's hash, computed once (a tuple does not cache its hash and every dict
    # operation would rehash thousands of ints); the stored key settles collisions
    h = hash(key)
    entry = cache.pop(h, None)
    if entry is None or entry[0] != key:
        values, base_i, n_programs, log2_p, align, mapped, built_block = _static_values(
            tensors, keys, block, index_maps, mapped_block, firsts)
        entry = (key, _StaticTable(base_i, int64_table(values, tensors[0].device), n_programs,
                                   log2_p, align, mapped, built_block))
        # least recently used first (hits move to the end); the named entries of cached_int64
        # (str keys, a fixed few per group) are not tables and never evicted
        tables = [k for k in cache if not isinstance(k, str)]
        for old in tables[:max(0, len(tables) - TABLE_CACHE_ENTRIES + 1)]:
            del cache[old]
    cache[h] = entry
    static = entry[1]
    seeds_t, schedule_t = _split_seeds(
        int64_table(_seed_values(seeds, rounding_seed, schedule), tensors[0].device), len(seeds),
        schedule)
    return LaunchTable(tensors[static.base_index], static.table, seeds_t, static.n_programs,
                       static.log2_p, static.align, static.mapped, static.block, schedule_t)


# ---------------------------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------------------------


@triton.jit
def find_entry(starts_ptr, pid, LOG2_P: tl.constexpr):
    """Index j of the table entry with ``starts[j] <= pid < starts[j + 1]``.

    Binary search with a fixed number of steps over the ``2**LOG2_P`` sorted block starts
    (``starts[0] == 0``, padding is INT64_MAX). The table is a few hundred bytes, L1/L2 resident."""
    j = pid * 0  # int64 zero
    for s in tl.static_range(LOG2_P):
        cand = j + (1 << (LOG2_P - 1 - s))
        j = tl.where(tl.load(starts_ptr + cand) <= pid, cand, j)
    return j


@triton.jit
def load_seed(ptr):
    """A seed stored as the int64 bit pattern of a uint64 (bitcast, never sign-extended)."""
    return tl.load(ptr).to(tl.uint64, bitcast=True)


@triton.jit
def quads(a, b, c, d):
    """[N] x 4 -> [4, N] with out[m, j] = (a, b, c, d)[m][j]: a broadcast and selects on a
    dimension that Triton's default layout keeps inside a thread (threads go along the last
    dimension), so m is a constant per register, the selects fold away and the 4 values of a
    Philox call stay in the registers that computed them (tl.join + reshape costs a
    shared-memory shuffle per call instead)."""
    m = tl.arange(0, 4)[:, None]
    return tl.where(m < 2, tl.where(m == 0, a[None, :], b[None, :]),
                    tl.where(m == 2, c[None, :], d[None, :]))


@triton.jit
def octets(a, b, c, d, e, f, g, h):
    """[N] x 8 -> [8, N] with out[m, j] = (a, ..., h)[m][j]: ``quads`` 8 wide (the octet tile,
    code 5; the selects fold away, the values stay in the registers that computed them)."""
    m = tl.arange(0, 8)[:, None]
    lo = tl.where(m < 2, tl.where(m == 0, a[None, :], b[None, :]),
                  tl.where(m == 2, c[None, :], d[None, :]))
    hi = tl.where(m < 6, tl.where(m == 4, e[None, :], f[None, :]),
                  tl.where(m == 6, g[None, :], h[None, :]))
    return tl.where(m < 4, lo, hi)


@triton.jit
def _uniforms4(w0, w1, w2, w3):
    u0 = tl.uint_to_uniform_float(w0)
    u1 = tl.uint_to_uniform_float(w1)
    u2 = tl.uint_to_uniform_float(w2)
    u3 = tl.uint_to_uniform_float(w3)
    return u0, u1, u2, u3


# ---- tiles: a block's elements in Philox layout ------------------------------------------------
# A program's BLOCK elements are held as a tile whose LAST dimension is the Philox call (Triton's
# default layout spreads threads along the last dimension and keeps the others in registers):
# [4, BLOCK // 4] for gaussian / uniform / rounding uniforms (element 4j + m at [m, j]),
# [32, 4, BLOCK // 128] for rademacher (bit s of word m of call j: element 128j + 32m + s at
# [s, m, j]). Loads, stores, the noise and the sums all use the tile, so the noise is consumed
# where it is computed; ``flat`` gives the block order back (the undo log's prefix sums).
# Tile codes 3 and 4, the rademacher VECTOR tile of the plain pass (perturb's VEC): [V, 32 // V,
# 4, BLOCK // 128] with V = 8 (16-bit weights) or 4 (fp32), element 128j + 32m + Vv + t at
# [t, v, m, j]: a thread's word is 32 // V vectors of 16 bytes, and the coalesced layout that
# Triton gives its loads and stores (V elements per thread on the first dimension, threads on
# the last) holds the same elements in the same threads as the tile's own layout; with the
# [32, 4, N] tile it puts 4 threads on the first dimension, and every load and store went
# through a shared-memory layout conversion (5120 bytes; at 64 elements per thread 16 rounds,
# 32 barriers per block; sass_budget). ``flat`` and the rounding tiles do not take codes 3 and 4.
# Tile code 5, the gaussian OCTET tile of contract 3's stochastic rounding: [8, BLOCK // 8],
# element 8j + m at [m, j]: a thread holds 8 consecutive elements per column, i.e. both quads of
# one rounding call (contract 3: call i // 8) and the two gaussian calls 2j, 2j + 1, so the
# rounding bits need no exchange between threads (in the [4, N] tile quads 2j and 2j + 1 lie in
# different threads: the rounding words went through shared memory) and a column is one 16-byte
# load / store of 16-bit weights.


@triton.jit
def tile_lanes(DIST: tl.constexpr, BLOCK: tl.constexpr):
    """int32 element offsets inside the block, in the tile's shape."""
    if DIST == 3 or DIST == 4:
        V: tl.constexpr = 8 if DIST == 3 else 4
        lanes = (tl.arange(0, V)[:, None, None, None]
                 + (tl.arange(0, 32 // V) * V)[None, :, None, None]
                 + (tl.arange(0, 4) * 32)[None, None, :, None]
                 + (tl.arange(0, BLOCK // 128) * 128)[None, None, None, :])
    elif DIST == 1:
        lanes = (tl.arange(0, 32)[:, None, None] + (tl.arange(0, 4) * 32)[None, :, None]
                 + (tl.arange(0, BLOCK // 128) * 128)[None, None, :])
    else:
        Q: tl.constexpr = 8 if DIST == 5 else 4
        lanes = tl.arange(0, Q)[:, None] + (tl.arange(0, BLOCK // Q) * Q)[None, :]
    return lanes


@triton.jit
def flat(x, DIST: tl.constexpr, BLOCK: tl.constexpr):
    """A tile as [BLOCK] in element order."""
    if DIST == 1:
        x = tl.reshape(tl.permute(x, (2, 1, 0)), [BLOCK])
    else:
        x = tl.reshape(tl.trans(x), [BLOCK])
    return x


@triton.jit
def _mulhilo(a, M: tl.constexpr):
    """(hi, lo) 32-bit halves of the 64-bit product a * M (uint32 a): one IMAD.WIDE.U32 where
    umulhi and mul compile to two instructions."""
    p = a.to(tl.uint64) * M
    return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def _philox_round(c0, c1, c2, c3, k0, k1):
    """One Philox4x32 round under the round key (k0, k1)."""
    hi_b, lo_b = _mulhilo(c2, 0xCD9E8D57)
    hi_a, lo_a = _mulhilo(c0, 0xD2511F53)
    return hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a


@triton.jit
def philox(seed, c0, c1, c2, c3):
    """Philox4x32-10 (Random123), key (seed lo, seed hi): the same words as ``tl.philox``, the
    same rounds (tests compare the backends bit for bit), each round's two multiplies as 64-bit
    products (saves 20 of ~60 instructions per call, sm_90)."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = tl.to_tensor(c0).to(tl.uint32, bitcast=True)
    c1 = tl.to_tensor(c1).to(tl.uint32, bitcast=True)
    c2 = tl.to_tensor(c2).to(tl.uint32, bitcast=True)
    c3 = tl.to_tensor(c3).to(tl.uint32, bitcast=True)
    for _ in tl.static_range(10):
        hi_b, lo_b = _mulhilo(c2, 0xCD9E8D57)
        hi_a, lo_a = _mulhilo(c0, 0xD2511F53)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1 = lo_b
        c3 = lo_a
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _load4(p):
    """The 4 uint32 at p (16-byte aligned) as scalars, from one 16-byte load."""
    a, b = tl.split(tl.reshape(tl.load(p + tl.arange(0, 4)), [2, 2]))  # (w0, w2), (w1, w3)
    w0, w2 = tl.split(a)
    w1, w3 = tl.split(b)
    return w0, w1, w2, w3


@triton.jit
def load_key_schedule(ptr):
    """A seed's Philox-10 key schedule (host: ``key_schedule``; int64 ptr, 16-byte aligned) as a
    tuple of 20 uint32, (k0, k1) of round 0, of round 1, ...: five 16-byte loads per seed instead
    of 18 additions in every thread."""
    p = ptr.to(tl.pointer_type(tl.uint32), bitcast=True)
    a0, a1, a2, a3 = _load4(p)
    b0, b1, b2, b3 = _load4(p + 4)
    c0, c1, c2, c3 = _load4(p + 8)
    d0, d1, d2, d3 = _load4(p + 12)
    e0, e1, e2, e3 = _load4(p + 16)
    return (a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3, e0, e1, e2, e3)


@triton.jit
def philox_scheduled(ks, c0, c1, c2, c3, zero):
    """``philox`` with the key schedule given (``load_key_schedule``): the same words.

    ``zero``: a uint32 that is 0 at run time but not to the compiler (``numel >> 62``). XORed
    into round 0's high products, it keeps them 32-bit values when they are hoisted out of a
    seed loop (the counters do not depend on the seed): a hoisted ``trunc`` of the 64-bit
    product is sunk back into the loop by LLVM, which then widens round 0's key XOR and round
    1's multiply to 64 bits, and ptxas adds a zero high word per call (sm_90 SASS, sass_budget:
    -0.5 instructions per element and seed for the gaussian tile)."""
    c0 = tl.to_tensor(c0).to(tl.uint32, bitcast=True)
    c1 = tl.to_tensor(c1).to(tl.uint32, bitcast=True)
    c2 = tl.to_tensor(c2).to(tl.uint32, bitcast=True)
    c3 = tl.to_tensor(c3).to(tl.uint32, bitcast=True)
    hi_b, lo_b = _mulhilo(c2, 0xCD9E8D57)
    hi_a, lo_a = _mulhilo(c0, 0xD2511F53)
    c0, c1, c2, c3 = (hi_b ^ zero) ^ c1 ^ ks[0], lo_b, (hi_a ^ zero) ^ c3 ^ ks[1], lo_a
    for r in tl.static_range(1, 10):
        c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, ks[2 * r], ks[2 * r + 1])
    return c0, c1, c2, c3


@triton.jit
def _philox_keyed(seed, ks, c0, c1, c2, c3, zero):
    """``philox(seed, ...)`` when ``ks`` is None, else ``philox_scheduled(ks, ..., zero)`` with the
    seed's key schedule (``load_key_schedule``): the same words. Resolved at compile time."""
    if ks is None:
        return philox(seed, c0, c1, c2, c3)
    else:
        return philox_scheduled(ks, c0, c1, c2, c3, zero)


@triton.jit
def first_call(blk, N: tl.constexpr, GROUP: tl.constexpr, shift=None):
    """(low, high) uint32 words of the first of the N Philox calls (of GROUP elements each) of
    block ``blk``: ``blk * N``, plus ``shift // GROUP`` for a shifted shard (``shift``: the
    shard's first element in the whole tensor, a multiple of GROUP; perturb.py SHIFTED). A tile
    adds the call's index inside the block to the low word only. From ``blk * N``, a multiple of
    the power of two N <= 2^32, that never carries into the high word; from a shifted start it
    could at a 2^32-call boundary, so the host sends a shard only when its blocks' calls lie in
    one such segment (perturb.py ``shard_shifts``)."""
    g = blk.to(tl.uint64, bitcast=True) * N
    if shift is not None:
        g += shift.to(tl.uint64, bitcast=True) // GROUP
    return (g & 0xFFFFFFFF).to(tl.uint32), (g >> 32).to(tl.uint32)


@triton.jit
def _philox_calls(seed, key, blk, N: tl.constexpr, STREAM: tl.constexpr, ks=None, zero=0,
                  GROUP: tl.constexpr = 4, shift=None):
    """Words of the N consecutive Philox calls ``blk * N (+ shift // GROUP) + [0, N)`` (counter
    (b lo, b hi, key, STREAM); no carry: ``first_call``). ``ks``, ``zero``:
    ``_philox_keyed``."""
    c0, c1 = first_call(blk, N, GROUP, shift)
    return _philox_keyed(seed, ks, c0 + tl.arange(0, N).to(tl.uint32), c1, key, STREAM, zero)


@triton.jit
def _philox_at_blocks(seed, key, b, STREAM: tl.constexpr, ks=None, zero=0):
    """Philox words at contract block indices b (int64, any values): counter
    (b mod 2^32, b >> 32, key, STREAM). ``ks``, ``zero``: ``_philox_keyed``."""
    bu = b.to(tl.uint64, bitcast=True)
    return _philox_keyed(seed, ks, (bu & 0xFFFFFFFF).to(tl.uint32), (bu >> 32).to(tl.uint32),
                         key, STREAM, zero)


@triton.jit
def rademacher_signs(w0, w1, w2, w3):
    """[32, 4, N] uint32: 0 where the contract's z is +1 (bit s of word m set), 0x80000000 where
    it is -1, i.e. the float32 sign bit of z. ``sign ^ bits(1.0)`` is z itself, ``sign ^ bits(c)``
    is c * z exactly: a Rademacher term costs a shift, a logic op and an add per element."""
    nw = ~quads(w0, w1, w2, w3)  # bit clear -> -1: the inverted word's bit is the sign
    s = tl.arange(0, 32).to(tl.uint32)
    return (nw[None, :, :] << (31 - s)[:, None, None]) & 0x80000000


@triton.jit
def rademacher_signs_vec(w0, w1, w2, w3, V: tl.constexpr):
    """``rademacher_signs`` in the vector tile [V, 32 // V, 4, N] (tile codes 3, 4): bit V v + t
    of word m of call j at [t, v, m, j]."""
    nw = ~quads(w0, w1, w2, w3)
    s = tl.arange(0, V)[:, None] + (tl.arange(0, 32 // V) * V)[None, :]
    return (nw[None, None, :, :] << (31 - s).to(tl.uint32)[:, :, None, None]) & 0x80000000


@triton.jit
def signed(c, sign):
    """c * z for a Rademacher z given as its sign bit: c with the sign flipped (exact, as the
    product c * (+-1.0) is)."""
    return (c.to(tl.uint32, bitcast=True) ^ sign).to(tl.float32, bitcast=True)


@triton.jit
def _z4(w0, w1, w2, w3, DIST: tl.constexpr, NORMAL: tl.constexpr):
    """The 4 values of z (elements 4b .. 4b + 3) of Philox calls b from their words (DIST 0 or 5
    gaussian, 2 uniform). NORMAL: the contract version of the gaussian normals, 1 (Triton's
    pair_uniform_to_normal on the uniforms) or 2 (``normal_pair_v2`` on the words, bit-identical
    on every backend)."""
    if DIST != 2 and NORMAL == 2:
        n0, n1 = normal_pair_v2(w0, w1)
        n2, n3 = normal_pair_v2(w2, w3)
    else:
        n0, n1, n2, n3 = _uniforms4(w0, w1, w2, w3)
        if DIST != 2:
            n0, n1 = tl.pair_uniform_to_normal(n0, n1)
            n2, n3 = tl.pair_uniform_to_normal(n2, n3)
    return n0, n1, n2, n3


@triton.jit
def _tile_from_words(w0, w1, w2, w3, DIST: tl.constexpr, NORMAL: tl.constexpr):
    """z tile [4, N] from the words of the tile's Philox calls (DIST 0 gaussian, 2 uniform;
    rademacher goes through ``rademacher_signs``, the octet tile through ``add_noise``). NORMAL:
    ``_z4``."""
    n0, n1, n2, n3 = _z4(w0, w1, w2, w3, DIST, NORMAL)
    return quads(n0, n1, n2, n3)


@triton.jit
def noise_words(seed, key, blk, DIST: tl.constexpr, BLOCK: tl.constexpr, ks=None, zero=0,
                shift=None):
    """Words of the Philox calls of the block ``blk`` (stream 0), a tuple: the 4 words of
    BLOCK // 128 calls for rademacher, of BLOCK // 4 calls otherwise; for the octet tile (5)
    8 words, those of the even calls 2j then of the odd calls 2j + 1 (j < BLOCK // 8). With
    ``ks`` (the seed's key schedule, ``load_key_schedule``; ``seed`` is then unused) and
    ``zero``: see ``philox_scheduled``. ``shift``: None, or a shifted shard's first element in
    the whole tensor (a multiple of the call's elements, 8 for the octet tile: ``first_call``);
    the block is then elements ``shift + blk * BLOCK + [0, BLOCK)`` of the whole tensor."""
    tl.static_assert(BLOCK >= 128 and (BLOCK & (BLOCK - 1)) == 0, "BLOCK: a power of two >= 128")
    if DIST == 5:
        # calls 2j and 2j + 1 of the block's BLOCK // 4 (the first call's index is even)
        c0, c1 = first_call(blk, BLOCK // 4, 4, shift)
        c0 = c0 + tl.arange(0, BLOCK // 8).to(tl.uint32) * 2
        a0, a1, a2, a3 = _philox_keyed(seed, ks, c0, c1, key, 0, zero)
        b0, b1, b2, b3 = _philox_keyed(seed, ks, c0 + 1, c1, key, 0, zero)
        return a0, a1, a2, a3, b0, b1, b2, b3
    else:
        GROUP: tl.constexpr = 128 if DIST == 1 or DIST >= 3 else 4
        return _philox_calls(seed, key, blk, BLOCK // GROUP, 0, ks, zero, GROUP, shift)


@triton.jit
def add_noise(d, c, w, DIST: tl.constexpr, NORMAL: tl.constexpr):
    """d + c * z for the tile's z given by its Philox words ``w`` (``noise_words``' tuple; the
    contract's ``d + c * z``: for rademacher the product is exact, so adding the sign-flipped c
    is the same float32 value)."""
    if DIST == 5:
        n0, n1, n2, n3 = _z4(w[0], w[1], w[2], w[3], DIST, NORMAL)
        n4, n5, n6, n7 = _z4(w[4], w[5], w[6], w[7], DIST, NORMAL)
        d = d + c * octets(n0, n1, n2, n3, n4, n5, n6, n7)
    elif DIST == 3 or DIST == 4:
        d = d + signed(c, rademacher_signs_vec(w[0], w[1], w[2], w[3], 8 if DIST == 3 else 4))
    elif DIST == 1:
        d = d + signed(c, rademacher_signs(w[0], w[1], w[2], w[3]))
    else:
        d = d + c * _tile_from_words(w[0], w[1], w[2], w[3], DIST, NORMAL)
    return d


@triton.jit
def noise_tile(seed, key, blk, DIST: tl.constexpr, BLOCK: tl.constexpr, NORMAL: tl.constexpr):
    """z for the BLOCK elements ``blk * BLOCK + [0, BLOCK)`` (stream 0), float32, tile shape.

    DIST: 0 gaussian (Box-Muller on 2 pairs per Philox call), 1 rademacher (128 bits per Philox
    call), 2 uniform (the uniforms that feed Box-Muller v1). NORMAL: 1 or 2
    (``_tile_from_words``)."""
    w0, w1, w2, w3 = noise_words(seed, key, blk, DIST, BLOCK)
    if DIST == 1:
        z = signed(1.0 + tl.zeros([32, 4, BLOCK // 128], tl.float32),
                   rademacher_signs(w0, w1, w2, w3))
    else:
        z = _tile_from_words(w0, w1, w2, w3, DIST, NORMAL)
    return z


@triton.jit
def _rounding_from_words(w0, w1, w2, w3, DIST: tl.constexpr):
    """Rounding uniforms in the tile shape of DIST from the words of the tile's quads: quads
    [BLOCK // 4] for gaussian; for rademacher [8, 4, N] with quad (t, m, j) holding elements
    128j + 32m + 4t + r, which a register-local join and permute turn into the [32, 4, N] tile
    (s = 4t + r)."""
    u0, u1, u2, u3 = _uniforms4(w0, w1, w2, w3)
    if DIST == 1:
        u = tl.join(tl.join(u0, u2), tl.join(u1, u3))  # [8, 4, N, 2, 2]: r = 2 * dim3 + dim4
        u = tl.reshape(tl.permute(u, (0, 3, 4, 1, 2)), [32, 4, u0.shape[2]])
    else:
        u = quads(u0, u1, u2, u3)
    return u


@triton.jit
def _rounding_quads(DIST: tl.constexpr, BLOCK: tl.constexpr):
    """Quad indices inside the block, shaped as ``_rounding_from_words`` wants them."""
    if DIST == 1:
        q = (tl.arange(0, 8)[:, None, None] + (tl.arange(0, 4) * 8)[None, :, None]
             + (tl.arange(0, BLOCK // 128) * 32)[None, None, :])
    else:
        q = tl.arange(0, BLOCK // 4)
    return q


@triton.jit
def rounding_tile(seed, key, blk, DIST: tl.constexpr, BLOCK: tl.constexpr, shift=None):
    """Stochastic-rounding uniforms (stream 1, word i mod 4 of call i // 4) for elements
    ``blk * BLOCK + [0, BLOCK)`` (plus ``shift``: ``noise_words``), in the tile shape of DIST (a
    thread computes the quads of its own elements)."""
    c0, c1 = first_call(blk, BLOCK // 4, 4, shift)
    w0, w1, w2, w3 = philox(seed, c0 + _rounding_quads(DIST, BLOCK).to(tl.uint32), c1, key, 1)
    return _rounding_from_words(w0, w1, w2, w3, DIST)


@triton.jit
def map_index(i0, lane, map_offset, local_span, global_span, BLOCK: tl.constexpr):
    """g(i0 + lane) = map_offset + ((i0 + lane) // local_span) * global_span
    + (i0 + lane) % local_span, for a scalar int64 i0 and int32 lanes in [0, BLOCK).

    The 64-bit division is done once per program, on i0 (row r0, column c0 < local_span); per lane
    t = c0 + lane < local_span + BLOCK, so a row of at least BLOCK elements is crossed at most
    once (a compare) and a shorter one needs a 32-bit division only (t < 2 * BLOCK)."""
    r0 = i0 // local_span
    t = (i0 - r0 * local_span) + lane
    if local_span >= BLOCK:
        q = (t >= local_span).to(tl.int64)
    else:
        q = (t.to(tl.int32) // local_span.to(tl.int32)).to(tl.int64)
    return map_offset + (r0 + q) * global_span + (t - q * local_span)


@triton.jit
def noise_words_at_blocks(seed, key, b, ks=None, zero=0):
    """Words (stream 0) of the Philox calls with contract block indices b (int64, any values):
    the mapped fast path, where every aligned group of 4 (128) local elements is one aligned
    global group. Fed to ``add_noise`` as ``noise_words`` is: bit-identical. ``ks``, ``zero``:
    as ``noise_words``."""
    return _philox_at_blocks(seed, key, b, 0, ks, zero)


@triton.jit
def rounding_tile_at_blocks(seed, key, b, DIST: tl.constexpr):
    """Stochastic-rounding uniforms (stream 1) of a block made of whole quads with contract block
    indices b (int64, shaped by ``_rounding_quads``), in the tile shape of DIST."""
    w0, w1, w2, w3 = _philox_at_blocks(seed, key, b, 1)
    return _rounding_from_words(w0, w1, w2, w3, DIST)


@triton.jit
def _pick4(w0, w1, w2, w3, m):
    """Per lane, w_m for m in [0, 4)."""
    return tl.where(m < 2, tl.where(m == 0, w0, w1), tl.where(m == 2, w2, w3))


@triton.jit
def noise_at(seed, key, i, DIST: tl.constexpr, NORMAL: tl.constexpr = 1):
    """z(seed, key, i) (stream 0) at arbitrary element indices i (int64, any shape), bit-identical
    to ``noise_tile``: the same Philox counter and the same tl ops on the picked words. One
    Philox call per element (scattered elements share no blocks); gaussian transforms only the
    pair that holds element i (Box-Muller is elementwise, so the other pair cannot change it)."""
    ib = i.to(tl.uint64, bitcast=True)
    if DIST == 1:
        b = ib >> 7  # 128 elements per block: word (i % 128) // 32, bit i % 32
        w0, w1, w2, w3 = philox(seed, (b & 0xFFFFFFFF).to(tl.uint32), (b >> 32).to(tl.uint32),
                                   key, 0)
        w = _pick4(w0, w1, w2, w3, (i >> 5) & 3)
        bit = (w >> (i & 31).to(tl.uint32)) & 1
        z = bit.to(tl.float32) * 2.0 - 1.0
    else:
        b = ib >> 2
        w0, w1, w2, w3 = philox(seed, (b & 0xFFFFFFFF).to(tl.uint32), (b >> 32).to(tl.uint32),
                                   key, 0)
        m = i & 3
        if DIST == 0:
            first = m < 2  # (w0, w1) -> n0, n1; (w2, w3) -> n2, n3
            if NORMAL == 2:
                na, nb = normal_pair_v2(tl.where(first, w0, w2), tl.where(first, w1, w3))
            else:
                ua = tl.uint_to_uniform_float(tl.where(first, w0, w2))
                ub = tl.uint_to_uniform_float(tl.where(first, w1, w3))
                na, nb = tl.pair_uniform_to_normal(ua, ub)
            z = tl.where((m & 1) == 0, na, nb)
        else:
            z = tl.uint_to_uniform_float(_pick4(w0, w1, w2, w3, m))
    return z


@triton.jit
def rounding_uniform_at(seed, key, i):
    """The stochastic-rounding uniform (stream 1, word i mod 4 of block i // 4) of element i
    (int64, any shape); bit-identical to ``rounding_uniforms``."""
    b = i.to(tl.uint64, bitcast=True) >> 2
    w0, w1, w2, w3 = philox(seed, (b & 0xFFFFFFFF).to(tl.uint32), (b >> 32).to(tl.uint32),
                               key, 1)
    return tl.uint_to_uniform_float(_pick4(w0, w1, w2, w3, i & 3))


@triton.jit
def _rounding_bits(seed, key, b_lo, b_hi, sub, ks=None):
    """Contract 3's 16 random bits: half (sub & 1) (low half first) of word sub // 2 of the
    rounding stream's call (b_lo, b_hi, key, 1); sub = i mod 8 for element i of call b = i // 8.
    ``ks``: None, or the seed's key schedule (``load_key_schedule``)."""
    w0, w1, w2, w3 = _philox_keyed(seed, ks, b_lo, b_hi, key, 1, 0)
    w = _pick4(w0, w1, w2, w3, sub >> 1)
    return (w >> ((sub & 1) * 16).to(tl.uint32)) & 0xFFFF


@triton.jit
def rounding_bits_tile(seed, key, blk, DIST: tl.constexpr, BLOCK: tl.constexpr, ks=None,
                       shift=None):
    """Contract 3's random bits of the elements ``blk * BLOCK + [0, BLOCK)`` (plus ``shift``:
    ``noise_words``) in the tile shape of DIST: one Philox call per 8 consecutive elements. The
    octet tile (5) holds call j's 8 elements in column j, in one thread; the [4, N] gaussian tile
    computes call j once and moves its halves to quads 2j and 2j + 1 (two threads: shared
    memory); rademacher builds the counters per word (8 elements of the 32 of a word share a
    call), so that the copies of a call in one thread's registers are the same expression and
    compile to one call. The call index inside the block is added to the low word
    (``first_call``)."""
    c0, c1 = first_call(blk, BLOCK // 8, 8, shift)
    if DIST == 1:
        # element 128j + 32m + s at [s, m, j]: call 16j + 4m + s // 8, sub-index s % 8
        s8 = tl.arange(0, 32)[:, None, None]
        q = (tl.arange(0, 4) * 4)[None, :, None] + (tl.arange(0, BLOCK // 128) * 16)[None, None, :]
        r = _rounding_bits(seed, key, c0 + (q + (s8 >> 3)).to(tl.uint32), c1, s8 & 7, ks)
    else:
        w0, w1, w2, w3 = _philox_keyed(seed, ks, c0 + tl.arange(0, BLOCK // 8).to(tl.uint32), c1,
                                       key, 1, 0)
        if DIST == 5:
            # element 8j + m at [m, j]: half m % 2 of word m // 2 of call j, in one thread
            r = octets(w0 & 0xFFFF, w0 >> 16, w1 & 0xFFFF, w1 >> 16,
                       w2 & 0xFFFF, w2 >> 16, w3 & 0xFFFF, w3 >> 16)
        else:
            # quad j (elements 4j .. 4j + 3) is half j % 2 of call j // 2: words (0, 1) or
            # (2, 3), moved between threads (tl.join + reshape: shared memory)
            a = tl.reshape(tl.join(w0, w2), [BLOCK // 4])
            b = tl.reshape(tl.join(w1, w3), [BLOCK // 4])
            r = quads(a & 0xFFFF, a >> 16, b & 0xFFFF, b >> 16)
    return r


@triton.jit
def rounding_bits_at(seed, key, i):
    """Contract 3's random bits of element indices i (int64, any shape, any values);
    bit-identical to ``rounding_bits_tile``."""
    b = i.to(tl.uint64, bitcast=True) >> 3
    return _rounding_bits(seed, key, (b & 0xFFFFFFFF).to(tl.uint32), (b >> 32).to(tl.uint32),
                          (i & 7).to(tl.int32))


@triton.jit
def to_float32(x, SOFT_BF16: tl.constexpr):
    """Exact widening to float32 (bf16: the 16 bits become the high half of the float32)."""
    if SOFT_BF16 and x.dtype == tl.bfloat16:
        y = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def round_nearest(acc, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """float32 -> OUT_DTYPE, round to nearest even (NaN stays NaN, overflow gives inf)."""
    if SOFT_BF16 and OUT_DTYPE == tl.bfloat16:
        bits = acc.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, (bits >> 16) | 0x40, r)  # quiet NaN
        y = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = acc.to(OUT_DTYPE)
    return y


@triton.jit
def round_stochastic(acc, u, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Contract stochastic rounding of float32 ``acc`` to the 16-bit OUT_DTYPE given uniforms u.

    y = nearest; y' = the neighbour on acc's side through the 16-bit pattern (sign-magnitude, so
    +1 moves away from zero); p = (|acc| - |y|) / (|y'| - |y|) with a correctly rounded division
    (plain '/' is approximate on NVIDIA); choose y' if u < p. p is 0 when y' is infinite, NaN
    (never taken) when y is infinite or NaN, and 0 when y == acc, so those cases keep y."""
    y = round_nearest(acc, OUT_DTYPE, SOFT_BF16)
    yf = to_float32(y, SOFT_BF16)
    bits = y.to(tl.int16, bitcast=True).to(tl.int32)
    a_abs = tl.abs(acc)
    y_abs = tl.abs(yf)
    nb = (bits + tl.where(a_abs > y_abs, 1, -1)).to(tl.int16)
    y2 = nb.to(OUT_DTYPE, bitcast=True)
    p = tl.math.div_rn(a_abs - y_abs, tl.abs(to_float32(y2, SOFT_BF16)) - y_abs)
    take = (u < p) & (y_abs <= 3.4028234663852886e38)  # y finite
    return tl.where(take, y2, y)


@triton.jit
def round_stochastic_integer(acc, r, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr,
                             SELECT_F32: tl.constexpr = True):
    """Contract 3 stochastic rounding of float32 ``acc`` to the 16-bit OUT_DTYPE with 16 random
    bits r (uint32 < 2^16; ``rounding_bits_tile``): the bits are added below the ones the dtype
    keeps, then truncated (docs/noise-contract.md). bf16: on the signed float32 pattern, the same
    as on the magnitude (below the largest finite bf16 the carry never reaches the sign); fp16:
    on |acc| * 2^-112, whose fp32 pattern has fp16's layout shifted left by 13 (subnormals too).
    |acc| >= the largest finite value, inf and NaN: round to nearest. Why: no division and no
    neighbour arithmetic, and one Philox call per 8 elements (the uniform version: per 4).

    bf16 with SELECT_F32: the truncation is a mask on the float32 pattern (a finite bf16 value,
    which the round to nearest then converts exactly) and the guard selects between it and acc
    before the one conversion, so ptxas fuses mask and select into one predicated LOP3 and packs
    the results with the F2FP the store needs anyway: 2 instructions per element where a select
    of the two 16-bit results took 3 (sm_90 SASS, octet tile: SR pass 54.0 -> 52.7 per element).
    The mapped pass's quad tile keeps the 16-bit select (SELECT_F32=False: 151.4, against 152.1)."""
    if OUT_DTYPE == tl.bfloat16 and SELECT_F32:
        kept = (acc.to(tl.uint32, bitcast=True) + r) & 0xFFFF0000
        t = tl.where(tl.abs(acc) < 3.3895313892515355e38, kept.to(tl.float32, bitcast=True), acc)
        y = round_nearest(t, OUT_DTYPE, SOFT_BF16)
    else:
        nearest = round_nearest(acc, OUT_DTYPE, SOFT_BF16)
        if OUT_DTYPE == tl.bfloat16:
            kept = (acc.to(tl.uint32, bitcast=True) + r) >> 16
            LIMIT: tl.constexpr = 3.3895313892515355e38
        else:
            m = (tl.abs(acc) * 1.925929944387236e-34).to(tl.uint32, bitcast=True)  # 2^-112
            kept = ((m + (r >> 3)) >> 13) | ((acc.to(tl.uint32, bitcast=True) >> 16) & 0x8000)
            LIMIT: tl.constexpr = 65504.0
        y = tl.where(tl.abs(acc) < LIMIT, kept.to(tl.uint16).to(OUT_DTYPE, bitcast=True),
                     nearest)
    return y


@triton.jit
def _fits(c, d1, x, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """round_nearest(c + d1) == x, compared as values (float32 c, d1, x)."""
    return to_float32(round_nearest(c + d1, OUT_DTYPE, SOFT_BF16), SOFT_BF16) == x


@triton.jit
def _neighbour(r, rf, down, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """float32 value of the OUT_DTYPE neighbour of r (float32 value rf) toward -inf where
    ``down``, else toward +inf: one step of the 16- / 32-bit sign-magnitude pattern (away from
    zero when the direction and the sign agree), +-tiny (smallest subnormal) for +-0."""
    if OUT_DTYPE == tl.bfloat16:
        # a bf16 value's float32 pattern has 16 zero low bits: one bf16 step is 0x10000 there
        # (subnormals, binade carries and max -> inf included), no 16-bit pack / unpack. The
        # direction is taken from the sign BIT (-0 counts as negative), so +0 up gives +tiny and
        # -0 down -tiny, as the contract's step, and no zero case is tested: +0 down and -0 up
        # give NaN patterns, which ``recover_unperturbed`` never takes. There r = +0 means
        # x - d1 >= 0 exactly (float32 subtraction keeps the sign), so round(0 + d1) <= x and
        # the direction is up; r = -0 means x - d1 < 0 (or x = -0, d1 = +0), so round(d1) >= x
        # and up comes only with round(r + d1) == x, where r itself is kept.
        bits = rf.to(tl.uint32, bitcast=True)
        negative = rf.to(tl.int32, bitcast=True) < 0
        nb = tl.where(negative == down, bits + 0x10000, bits - 0x10000)
        return nb.to(tl.float32, bitcast=True)
    if OUT_DTYPE == tl.float32:
        bits = r.to(tl.uint32, bitcast=True)
        SIGN: tl.constexpr = 0x80000000
    else:
        bits = r.to(tl.uint16, bitcast=True).to(tl.uint32)
        SIGN: tl.constexpr = 0x8000
    nb = tl.where((rf < 0.0) == down, bits + 1, bits - 1)
    nb = tl.where(rf == 0.0, tl.where(down, SIGN | 1, 1), nb)
    if OUT_DTYPE == tl.float32:
        y = nb.to(tl.float32, bitcast=True)
    else:
        y = to_float32(nb.to(tl.uint16).to(OUT_DTYPE, bitcast=True), SOFT_BF16)
    return y


@triton.jit
def recover_unperturbed(x, d1, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """The weight theta (float32 value of an OUT_DTYPE number) with round(theta + d1) == x.

    Why: a tensor holds round(theta + D1); adding D2 - D1 to it drifts by an ulp for about half of
    the bf16 elements per step. r = round(x - d1) is theta or one of its two neighbours; the
    contract takes the first of (r, next_down(r), next_up(r)) that rounds forward to x, else r,
    and keeps a non-finite r (docs/noise-contract.md, "Recovery"). round(c + d1) is monotonic in
    c, so when r overshoots (round(r + d1) > x) next_up(r) cannot fit, and when it undershoots
    next_down(r) cannot: one neighbour test (the one on the side of x) gives the contract's
    result with two forward roundings instead of three."""
    r = round_nearest(x - d1, OUT_DTYPE, SOFT_BF16)
    rf = to_float32(r, SOFT_BF16)
    back = to_float32(round_nearest(rf + d1, OUT_DTYPE, SOFT_BF16), SOFT_BF16)
    c = _neighbour(r, rf, back > x, OUT_DTYPE, SOFT_BF16)
    take = ((back != x) & (tl.abs(rf) <= 3.4028234663852886e38)
            & _fits(c, d1, x, OUT_DTYPE, SOFT_BF16))
    return tl.where(take, c, rf)


@triton.jit
def recovery_loses(x, y, d, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """The undo log's lost elements: a later pass that recovers y with this very d (applied=; the
    same ``d + s * z`` shape as its d1, so FMA contraction treats both alike) does not get x back.
    NaN and -0.0 are always lost (a later pass canonicalizes NaN, adds +-0.0)."""
    x_bits = x.to(tl.uint32, bitcast=True)
    back = recover_unperturbed(to_float32(y, SOFT_BF16), d, OUT_DTYPE, SOFT_BF16)
    return ((back.to(tl.uint32, bitcast=True) != x_bits)
            | ((x_bits & 0x7FFFFFFF) > 0x7F800000) | (x_bits == 0x80000000))
