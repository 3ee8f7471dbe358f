"""Index maps (sharded parameters) in the Triton backend.

A shard perturbed with its map g(i) = offset + (i // local_span) * global_span + i % local_span
must end bit for bit as the same elements of the unsharded tensor perturbed without one: the
noise, the stochastic-rounding uniforms, the recovery, the undo log (local indices) and its
scatter all at the contract index g(i). The reference is the backend's own unmapped run on the
whole tensor (bit for bit), and the torch backend's unmapped run for the noise (to the tolerance
of test_perturb.py). The interpreter is slow: small tensors, a few odd shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

import zokernels
from helpers import assert_bits_equal, assert_close, record_perturb_launches

pytestmark = pytest.mark.skipif("triton" not in zokernels.available_backends(),
                                reason="triton backend not available")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GAUSSIAN_ATOL = 1e-5  # per unit of |scale|: libm differences in z (as test_perturb.py)
BITS = {4: torch.int32, 2: torch.int16}
SEED_SETS = {"K1": ([2 ** 64 - 3], [0.25]),
             "K3": ([5, 2 ** 63 + 11, 2 ** 40 + 1], [0.5, -0.25, 0.125])}
ROUNDED = [(torch.float32, "nearest"), (torch.bfloat16, "nearest"),
           (torch.bfloat16, "stochastic")]
ROUNDED_IDS = ["fp32", "bf16-nearest", "bf16-stochastic"]
ROUNDING_SEED = 2 ** 64 - 77


def _triton():
    import zokernels.backends.triton as backend

    return backend


class Box(NamedTuple):
    """Rows [r0, r1) x columns [c0, c1) of the global tensor seen as an R x C matrix (a box on
    one dimension of an N-d tensor is one on the matrix of the dimensions before / from it)."""

    rows: int
    cols: int
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def index_map(self) -> tuple[int, int, int]:
        return (self.r0 * self.cols + self.c0, self.c1 - self.c0, self.cols)

    def take(self, g: torch.Tensor) -> torch.Tensor:
        """The shard: a new contiguous tensor (never a view of g)."""
        return g.reshape(self.rows, self.cols)[self.r0:self.r1, self.c0:self.c1].clone()

    def local(self, flat_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(in the box, local flat index) of global flat indices."""
        r, c = flat_index // self.cols, flat_index % self.cols
        inside = (r >= self.r0) & (r < self.r1) & (c >= self.c0) & (c < self.c1)
        return inside, (r - self.r0) * (self.c1 - self.c0) + (c - self.c0)


def _cases_5x7():
    return (5, 7), [Box(5, 7, 2, 5, 0, 7),   # row shard
                    Box(5, 7, 0, 5, 0, 4),   # column shard, uneven split 4 / 3
                    Box(5, 7, 0, 5, 4, 7),
                    Box(5, 7, 1, 4, 2, 6),   # a block
                    Box(5, 7, 3, 4, 0, 7),   # one row
                    Box(5, 7, 0, 5, 6, 7)]   # one column


def _cases_3x4x5():
    return (3, 4, 5), [Box(3, 20, 1, 2, 0, 20),   # dim 0: [1, 2)
                       Box(3, 20, 0, 3, 5, 15),   # dim 1: [1, 3)
                       Box(12, 5, 0, 12, 1, 4)]   # dim 2: [1, 4)


def _cases_aligned():
    """Maps that keep Philox groups aligned: the fast paths (grain asserted below)."""
    return (6, 256), [Box(6, 256, 0, 6, 128, 256),  # grain 128
                      Box(6, 256, 0, 6, 4, 68),     # grain 4
                      Box(6, 256, 2, 5, 8, 136),    # grain 4, a block
                      Box(6, 256, 1, 3, 0, 256),    # row shard: a shift by 256, grain 128
                      Box(6, 256, 0, 6, 0, 130)]    # unaligned span: grain 1


def _cases_33x1031():
    return (33, 1031), [Box(33, 1031, 0, 17, 0, 1031), Box(33, 1031, 17, 33, 0, 1031),
                        Box(33, 1031, 0, 33, 0, 516), Box(33, 1031, 0, 33, 516, 1031),
                        Box(33, 1031, 1, 4, 2, 6), Box(33, 1031, 32, 33, 0, 1031),
                        Box(33, 1031, 0, 33, 1030, 1031)]


def _cases_4097():
    return (4097,), [Box(1, 4097, 0, 1, 0, 2049), Box(1, 4097, 0, 1, 2049, 4097),
                     Box(1, 4097, 0, 1, 1000, 1003)]


def _cases_long_rows():
    """Local rows longer than a mapped block (2048): blocks end inside rows (map_index's
    compare-only case) in every path."""
    return (3, 4736), [Box(3, 4736, 0, 3, 128, 2432),   # grain 128, span 2304
                       Box(3, 4736, 0, 3, 4, 2208),     # grain 4, span 2204
                       Box(3, 4736, 0, 3, 1, 2050)]     # grain 1, span 2049


SMALL = [_cases_5x7(), _cases_3x4x5(), _cases_aligned()]
LARGE = [_cases_33x1031(), _cases_4097(), _cases_long_rows()]


def _globals(cases, dtype, seed=0, tiny=False):
    """One global tensor per case. tiny: N(0, 0.02) with exact zeros, -0.0 and values far below
    the perturbation (lost to recovery: the undo log has entries everywhere)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for shape, _ in cases:
        w = torch.randn(shape, generator=generator) * (0.02 if tiny else 1.0)
        if tiny:
            flat = w.view(-1)
            flat[1::11] = 0.0
            flat[2::13] = -0.0
            flat[3::7] = 3e-7
        out.append(w.to(dtype).to(DEVICE))
    return out


def _keys(n):
    return [2 ** 32 - 1 - 37 * j for j in range(n)]


def _decays(n):
    return [0.875 if j % 2 == 0 else 1.0 for j in range(n)]


def _shards(cases, globals_):
    """(shards, their keys, maps, decays, (global index, box) per shard) in one flat list."""
    keys, decays = _keys(len(cases)), _decays(len(cases))
    shards, skeys, maps, sdecays, where = [], [], [], [], []
    for j, ((_, boxes), g) in enumerate(zip(cases, globals_)):
        for box in boxes:
            shards.append(box.take(g))
            skeys.append(keys[j])
            maps.append(box.index_map)
            sdecays.append(decays[j])
            where.append((j, box))
    return shards, skeys, maps, sdecays, where


def _perturb(tensors, keys, maps, seeds, scales, decays, dist, rounding="nearest",
             applied=None, log=None, backend="triton", table_cache=None, contract=None):
    if contract is not None:  # else the default contract
        extra = {"contract": contract}
    else:
        extra = {}
    if backend == "torch":
        from zokernels.backends.torch import perturb_torch as fn
    else:
        fn = _triton().perturb_triton
        extra.update(index_maps=maps, table_cache=table_cache)
    fn(tensors, keys, seeds, torch.tensor(scales, dtype=torch.float32, device=DEVICE),
       torch.tensor(decays, dtype=torch.float32, device=DEVICE), dist, rounding, ROUNDING_SEED,
       applied=None if applied is None else torch.tensor(applied, dtype=torch.float32,
                                                         device=DEVICE),
       log=log, **extra)


def _buffers(capacity, dtype):
    from zokernels.backends.undo_buffers import UndoBuffers

    return UndoBuffers(torch.full((capacity,), -7, dtype=torch.int64, device=DEVICE),
                       torch.zeros(capacity, dtype=dtype, device=DEVICE),
                       torch.zeros(1, dtype=torch.int64, device=DEVICE))


def _bits(t):
    return t.contiguous().view(BITS[t.element_size()])


def _entries(log):
    """{index: value bits} of a log (entries come in no order)."""
    n = min(int(log.count.item()), log.capacity)
    assert n == int(log.count.item()), "log overflowed: the test sized it too small"
    return dict(zip(log.index[:n].cpu().tolist(), _bits(log.values[:n].cpu()).tolist()))


def _global_entries_in_shards(global_logs, globals_, where, shards):
    """The global logs' entries that fall in each box, at the shard call's group-flat index."""
    starts = [sum(g.numel() for g in globals_[:j]) for j in range(len(globals_))]
    expected, first = {}, 0
    entries = _entries(global_logs)
    index = torch.tensor(sorted(entries), dtype=torch.int64)
    for (j, box), shard in zip(where, shards):
        mine = (index >= starts[j]) & (index < starts[j] + globals_[j].numel())
        inside, local = box.local(index[mine] - starts[j])
        for gi, li in zip(index[mine][inside].tolist(), local[inside].tolist()):
            expected[first + li] = entries[gi]
        first += shard.numel()
    return expected


def _logged_pass(globals_, shards, keys, maps, where, seeds, scales, held, dist, what):
    """One pass with an undo log (applied=held: recovering first) over the unsharded tensors
    and over their shards: the shards end as the global slices; returns (the global log's
    entries in the shards, at the shard call's group-flat indices; the shards' log's)."""
    dtype = globals_[0].dtype
    global_log = _buffers(sum(g.numel() for g in globals_), dtype)
    shard_log = _buffers(sum(s.numel() for s in shards), dtype)
    _perturb(globals_, _keys(len(globals_)), None, seeds, scales, [1.0] * len(globals_), dist,
             applied=held, log=global_log)
    _perturb(shards, keys, maps, seeds, scales, [1.0] * len(shards), dist, applied=held,
             log=shard_log)
    _assert_shards_equal_global(shards, where, globals_, what)
    return _global_entries_in_shards(global_log, globals_, where, shards), _entries(shard_log)


def _assert_shards_equal_global(shards, where, globals_, what):
    for s, (shard, (j, box)) in enumerate(zip(shards, where)):
        assert_bits_equal(shard.cpu(), box.take(globals_[j]).cpu(),
                          f"{what}: shard {s} {box} of global {j}")


# ---------------------------------------------------------------------------------------------
# Host side: the maps in the table
# ---------------------------------------------------------------------------------------------


def test_normalize_map():
    from zokernels.backends.triton._common import SHIFT_SPAN, normalize_map

    assert normalize_map(None, 35) is None
    assert normalize_map((0, 35, 35), 35) is None  # identity
    assert normalize_map((0, 5, 5), 35) is None  # rows contiguous from 0: identity
    assert normalize_map((14, 7, 7), 21) == (14, SHIFT_SPAN, SHIFT_SPAN, 1)  # row shard
    assert normalize_map((256, 512, 512), 512) == (256, SHIFT_SPAN, SHIFT_SPAN, 128)
    assert normalize_map((12, 7, 9), 7) == (12, SHIFT_SPAN, SHIFT_SPAN, 4)  # one local row
    assert normalize_map((0, 4, 7), 20) == (0, 4, 7, 1)  # C = 7 split 4 / 3
    assert normalize_map((4, 3, 7), 15) == (4, 3, 7, 1)
    assert normalize_map((4, 64, 256), 384) == (4, 64, 256, 4)
    assert normalize_map((128, 128, 256), 768) == (128, 128, 256, 128)
    assert normalize_map((2 ** 40, 256, 2 ** 41), 512) == (2 ** 40, 256, 2 ** 41, 128)


def test_fast_paths_are_exercised():
    """The aligned cases really take the grouped Philox paths (grains 128 and 4) and the others
    the per-element one."""
    from zokernels.backends.triton._common import normalize_map

    shape, boxes = _cases_aligned()
    numels = [(b.r1 - b.r0) * (b.c1 - b.c0) for b in boxes]
    grains = [normalize_map(b.index_map, n)[3] for b, n in zip(boxes, numels)]
    assert grains == [128, 4, 4, 128, 1]
    shape, boxes = _cases_5x7()
    assert all(normalize_map(b.index_map, (b.r1 - b.r0) * (b.c1 - b.c0))[3] == 1 for b in boxes)


@pytest.mark.parametrize("maps", [None, [None, None], [(0, 5, 5), None], [(0, 1, 1), (0, 7, 7)]],
                         ids=["none", "all-none", "identity-tuple", "identity-spans"])
def test_no_maps_launch_the_unmapped_kernel(monkeypatch, maps):
    """index_maps None or all identity: the unmapped variant (MAPPED=False, 4-value rows)."""
    from zokernels.backends.triton._common import build_table

    launched = record_perturb_launches(monkeypatch, "MAPPED")
    tensors = [torch.randn(5, device=DEVICE), torch.randn(7, device=DEVICE)]
    _perturb(tensors, [1, 2], maps, [3], [0.5], [1.0, 1.0], "gaussian")
    _perturb(tensors, [1, 2], [(0, 5, 5), (3, 7, 14)], [3], [0.5], [1.0, 1.0], "gaussian")
    assert launched == [False, True]
    table = build_table(tensors, [1, 2], [3], 3, 4096, maps)
    assert not table.mapped and table.table.numel() == 2 + 4 * 2


# ---------------------------------------------------------------------------------------------
# Dense pass: shard with map == slice of the global result
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed_set", sorted(SEED_SETS))
@pytest.mark.parametrize("dtype,rounding", ROUNDED, ids=ROUNDED_IDS)
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_shards_equal_global_slices(dist, dtype, rounding, seed_set):
    seeds, scales = SEED_SETS[seed_set]
    globals_ = _globals(SMALL, dtype)
    shards, skeys, maps, sdecays, where = _shards(SMALL, globals_)
    _perturb(globals_, _keys(len(SMALL)), None, seeds, scales, _decays(len(SMALL)), dist,
             rounding)
    _perturb(shards, skeys, maps, seeds, scales, sdecays, dist, rounding)
    _assert_shards_equal_global(shards, where, globals_, f"{dist} {dtype} {rounding} {seed_set}")


@pytest.mark.parametrize("dtype,rounding", [ROUNDED[0], ROUNDED[2]], ids=["fp32", "bf16-sr"])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_large_shards_each_in_its_own_call(dist, dtype, rounding):
    """33 x 1031 and 4097 elements; every shard alone (a one-tensor table)."""
    seeds, scales = SEED_SETS["K3"] if dtype == torch.float32 else SEED_SETS["K1"]
    globals_ = _globals(LARGE, dtype, seed=1)
    shards, skeys, maps, sdecays, where = _shards(LARGE, globals_)
    _perturb(globals_, _keys(len(LARGE)), None, seeds, scales, _decays(len(LARGE)), dist,
             rounding)
    for shard, key, index_map, decay in zip(shards, skeys, maps, sdecays):
        _perturb([shard], [key], [index_map], seeds, scales, [decay], dist, rounding)
    _assert_shards_equal_global(shards, where, globals_, f"{dist} {dtype} {rounding}")


@pytest.mark.parametrize("block", [128, 512])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_shards_independent_of_block_size(monkeypatch, dist, block):
    """Smaller mapped blocks: more programs per shard, blocks that end inside local rows."""
    from zokernels.backends.triton import perturb as perturb_module

    monkeypatch.setattr(perturb_module, "MAPPED_BLOCK", block)
    seeds, scales = SEED_SETS["K3"]
    dtype, rounding = ROUNDED[2]
    globals_ = _globals(SMALL, dtype, seed=8)
    shards, skeys, maps, sdecays, where = _shards(SMALL, globals_)
    _perturb(globals_, _keys(len(SMALL)), None, seeds, scales, _decays(len(SMALL)), dist,
             rounding)
    _perturb(shards, skeys, maps, seeds, scales, sdecays, dist, rounding)
    _assert_shards_equal_global(shards, where, globals_, f"{dist} MAPPED_BLOCK={block}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_shards_match_torch_reference(dist, dtype):
    """The torch backend (the contract) on the unsharded tensors, to test_perturb's tolerance."""
    seeds, scales = SEED_SETS["K3"]
    globals_ = _globals(SMALL, dtype, seed=2)
    shards, skeys, maps, sdecays, where = _shards(SMALL, globals_)
    _perturb(globals_, _keys(len(SMALL)), None, seeds, scales, _decays(len(SMALL)), dist,
             backend="torch")
    _perturb(shards, skeys, maps, seeds, scales, sdecays, dist)
    atol = GAUSSIAN_ATOL * sum(abs(s) for s in scales) if dist == "gaussian" else 0.0
    for s, (shard, (j, box)) in enumerate(zip(shards, where)):
        expected = box.take(globals_[j]).cpu()
        assert_close(shard.cpu(), expected, atol=atol, ulps=1.0, dtype=dtype,
                     what=f"{dist} {dtype} shard {s} {box} vs torch")
        if dist == "rademacher" and dtype == torch.bfloat16:
            # z exact; a 16-bit output absorbs fma contraction: the reference bit for bit
            assert_bits_equal(shard.cpu(), expected, f"{dist} {dtype} shard {s} vs torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_recovery_with_applied(dist, dtype):
    """A ZO-style second pass (applied = the first pass's scales) on shards of perturbed weights."""
    seeds, held = SEED_SETS["K3"]
    scales = [-2 * s for s in held]
    globals_ = _globals(SMALL, dtype, seed=3, tiny=True)
    ones = [1.0] * len(SMALL)
    _perturb(globals_, _keys(len(SMALL)), None, seeds, held, ones, dist)
    shards, skeys, maps, _, where = _shards(SMALL, globals_)
    _perturb(globals_, _keys(len(SMALL)), None, seeds, scales, ones, dist, applied=held)
    _perturb(shards, skeys, maps, seeds, scales, [1.0] * len(shards), dist, applied=held)
    _assert_shards_equal_global(shards, where, globals_, f"{dist} {dtype} applied")


# ---------------------------------------------------------------------------------------------
# Undo log: local indices, values of the global run's entries in the box
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("applied", [False, True], ids=["plain", "applied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_logging_pass(dist, dtype, applied):
    seeds, scales = SEED_SETS["K3"]
    held = [-s / 2 for s in scales] if applied else None
    globals_ = _globals(SMALL, dtype, seed=4, tiny=True)
    ones = [1.0] * len(SMALL)
    if applied:
        _perturb(globals_, _keys(len(SMALL)), None, seeds, held, ones, dist)
    shards, skeys, maps, _, where = _shards(SMALL, globals_)
    what = f"{dist} {dtype} applied={applied}"
    expected, got = _logged_pass(globals_, shards, skeys, maps, where, seeds, scales, held, dist,
                                 what)
    assert len(expected) > 10, what  # the tiny weights are lost: the comparison has content
    assert sorted(got) == sorted(expected), f"{what}: logged local indices differ"
    assert got == expected, f"{what}: logged values differ"


@pytest.mark.parametrize("seed_set", ["K0", "K3"])
@pytest.mark.parametrize("dtype,rounding", ROUNDED, ids=ROUNDED_IDS)
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_scatter(dist, dtype, rounding, seed_set):
    """A global log, and the same entries as shard logs (local indices): the scatter with maps
    leaves every shard as the unmapped scatter leaves its box."""
    seeds, scales = ([], []) if seed_set == "K0" else SEED_SETS["K3"]
    log_seeds, log_scales = SEED_SETS["K1"]
    globals_ = _globals(SMALL, dtype, seed=5, tiny=True)
    ones = [1.0] * len(SMALL)
    global_log = _buffers(sum(g.numel() for g in globals_), dtype)
    _perturb(globals_, _keys(len(SMALL)), None, log_seeds, log_scales, ones, dist,
             log=global_log)
    shards, skeys, maps, sdecays, where = _shards(SMALL, globals_)  # perturbed state
    expected = _global_entries_in_shards(global_log, globals_, where, shards)
    assert len(expected) > 10
    shard_log = _buffers(len(expected), dtype)
    shard_log.index.copy_(torch.tensor(list(expected), dtype=torch.int64))
    bits = torch.tensor(list(expected.values()), dtype=BITS[shards[0].element_size()])
    shard_log.values.copy_(bits.view(dtype))
    shard_log.count.fill_(len(expected))
    scatter = _triton().scatter_perturb_triton
    args = (seeds, torch.tensor(scales, dtype=torch.float32, device=DEVICE))
    scatter(globals_, _keys(len(SMALL)), global_log.index, global_log.values, global_log.count,
            *args, torch.tensor(_decays(len(SMALL)), device=DEVICE), dist, rounding,
            ROUNDING_SEED)
    scatter(shards, skeys, shard_log.index, shard_log.values, shard_log.count, *args,
            torch.tensor(sdecays, device=DEVICE), dist, rounding, ROUNDING_SEED, index_maps=maps)
    _assert_shards_equal_global(shards, where, globals_, f"scatter {dist} {dtype} {seed_set}")


# ---------------------------------------------------------------------------------------------
# Mixed lists, 64-bit counters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,rounding", [ROUNDED[0], ROUNDED[2]], ids=["fp32", "bf16-sr"])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_mapped_and_unmapped_tensors_in_one_call(dist, dtype, rounding):
    """Plain tensors beside shards in one call: each as if it were alone."""
    seeds, scales = SEED_SETS["K3"]
    generator = torch.Generator().manual_seed(6)
    plain = [(torch.randn(n, generator=generator) * 0.5).to(dtype).to(DEVICE)
             for n in (300, 5, 4097)]
    (shape, boxes), = [_cases_5x7()]
    g = (torch.randn(shape, generator=generator)).to(dtype).to(DEVICE)
    tensors = [plain[0].clone(), boxes[3].take(g), plain[1].clone(), boxes[1].take(g),
               plain[2].clone(), boxes[0].take(g)]
    keys = [10, 20, 11, 20, 12, 20]
    maps = [None, boxes[3].index_map, (0, 5, 5), boxes[1].index_map, None, boxes[0].index_map]
    decays = [0.75, 0.5, 1.0, 0.5, 0.875, 0.5]
    _perturb(tensors, keys, maps, seeds, scales, decays, dist, rounding)
    for t, key, decay in zip(plain, [10, 11, 12], [0.75, 1.0, 0.875]):
        _perturb([t], [key], None, seeds, scales, [decay], dist, rounding)
    _perturb([g], [20], None, seeds, scales, [0.5], dist, rounding)
    what = f"mixed {dist} {dtype}"
    for k, (got, expected) in enumerate(zip(tensors, [plain[0], boxes[3].take(g), plain[1],
                                                      boxes[1].take(g), plain[2],
                                                      boxes[0].take(g)])):
        assert_bits_equal(got.cpu(), expected.cpu(), f"{what} tensor {k}")


def _z_rows(index_map, rows, seed, key, dist):
    """z at g(i) for the local rows of a map, from zokernels.noise (the contract at any offset)."""
    offset, span, stride = index_map
    return torch.cat([zokernels.noise(span, seed, key, offset=offset + r * stride, dist=dist,
                                      device=DEVICE, backend="triton").cpu() for r in range(rows)])


# (map, rows): Philox blocks around b = 2^32 (the carry into the high counter word), rows far
# apart, up to the largest allowed contract index
BIG_MAPS = [((4 * 2 ** 32 - 8, 16, 2 ** 33 + 4), 2),          # grain 4
            ((128 * 2 ** 32 - 256, 512, 2 ** 40), 2),         # grain 128
            ((4 * 2 ** 32 - 3, 7, 2 ** 35 + 1), 3),           # grain 1
            ((2 ** 63 - 1000, 300, 300), 1)]                  # a shift up to g = 2^63 - 701


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_64_bit_counters(dist):
    seed, key = 2 ** 64 - 1, 2 ** 32 - 1
    tensors = [torch.zeros(m[1] * rows, device=DEVICE) for m, rows in BIG_MAPS]
    maps = [m for m, _ in BIG_MAPS]
    _perturb(tensors, [key] * len(tensors), maps, [seed], [1.0], [1.0] * len(tensors), dist)
    for t, (m, rows) in zip(tensors, BIG_MAPS):
        assert_bits_equal(t.cpu(), _z_rows(m, rows, seed, key, dist), f"perturb {dist} {m}")
    # the scatter, at every element: writes z(g(i)) over zeros
    tensors = [torch.zeros_like(t) for t in tensors]
    n = sum(t.numel() for t in tensors)
    scatter = _triton().scatter_perturb_triton
    scatter(tensors, [key] * len(tensors), torch.arange(n, device=DEVICE).flip(0),
            torch.zeros(n, device=DEVICE), torch.tensor([n], device=DEVICE), [seed],
            torch.ones(1, device=DEVICE), torch.ones(len(tensors), device=DEVICE), dist,
            "nearest", 0, index_maps=maps)
    for t, (m, rows) in zip(tensors, BIG_MAPS):
        assert_bits_equal(t.cpu(), _z_rows(m, rows, seed, key, dist), f"scatter {dist} {m}")


def test_stochastic_rounding_at_64_bit_indices():
    """bf16 stochastic rounding at g(i) >= 2^34: the torch reference's rounding with stream-1
    uniforms at the same contract indices (z from the Triton noise op: exact inputs)."""
    from zokernels._contract import STREAM_ROUNDING
    from zokernels.backends.torch.noise import contract_values
    from zokernels.backends.torch.rounding import round_stochastic

    seed, key, scale = 12345, 77, 1e-3
    generator = torch.Generator().manual_seed(7)
    start = [(torch.randn(m[1] * rows, generator=generator) * 0.02).to(torch.bfloat16)
             for m, rows in BIG_MAPS]
    tensors = [t.to(DEVICE).clone() for t in start]
    _perturb(tensors, [key] * len(tensors), [m for m, _ in BIG_MAPS], [seed], [scale],
             [1.0] * len(tensors), "gaussian", "stochastic", contract=2)  # contract 2's uniforms
    for t, x, (m, rows) in zip(tensors, start, BIG_MAPS):
        acc = x.float() + torch.tensor(scale, dtype=torch.float32) * _z_rows(m, rows, seed, key,
                                                                                "gaussian")
        uniforms = torch.cat([contract_values(ROUNDING_SEED, key, m[0] + r * m[2], m[1],
                                              "uniform", "cpu", stream=STREAM_ROUNDING)
                              for r in range(rows)])
        assert_bits_equal(t.cpu(), round_stochastic(acc, torch.bfloat16, uniforms),
                          f"stochastic rounding {m}")


# ---------------------------------------------------------------------------------------------
# Shifted shards: the plain kernel at shifted counters (SHIFTED)


@pytest.mark.parametrize("dtype,rounding", ROUNDED, ids=ROUNDED_IDS)
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_shifted_shards_take_the_plain_kernel(monkeypatch, dist, dtype, rounding):
    """Shards whose map is a shift by a multiple of the pass's Philox call (4 elements gaussian,
    8 with contract 3's rounding bits, 128 rademacher) run the plain kernel, its noise and
    rounding bits drawn from element shift + blk * BLOCK: bit for bit the global tensor's slices,
    whether the shift is a whole block (a tail block, a short shard) or not (FSDP2's 1-D chunks,
    rows of 384 crossing block boundaries), with and without `sources`, at 64-bit counters and
    next to a 2^32-call segment boundary; a shift by part of a call, or a shard whose blocks
    would cross a segment boundary (the low counter word would carry), keeps the mapped kernel."""
    from zokernels.backends.triton.perturb import shift_grain

    launched = record_perturb_launches(monkeypatch, "MAPPED", "SHIFTED")
    grain = shift_grain(dist, 2 if rounding == "stochastic" else 0)  # contract 3: the default
    n = 3 * 16384 + 1000
    whole = _globals([((n,), None)], dtype, seed=5)[0]
    expected = whole.clone()
    seeds, scales = SEED_SETS["K3"]
    _perturb([expected], [9], None, seeds, scales, [0.875], dist, rounding)
    calls = [[(16384, n - 16384), (2 * 16384, 700)],  # whole blocks: a tail, a short shard
             [(384, 1000), (16384 + 640, 5000)],  # whole calls of every pass, not blocks
             [(100, 1000)], [(104, 1000)],  # whole gaussian calls; 104: of the rounding bits
             [(102, 1000)]]  # part of a call: mapped
    for shards in calls:
        pieces = [whole[o:o + m].clone() for o, m in shards]
        _perturb(pieces, [9] * len(shards), [(o, m, m) for o, m in shards], seeds, scales,
                 [0.875] * len(shards), dist, rounding)
        for piece, (o, m) in zip(pieces, shards):
            assert_bits_equal(piece.cpu(), expected[o:o + m].cpu(), f"shard at {o}")
        shifted = all(o % grain == 0 for o, _ in shards)
        assert launched.pop() == (not shifted, shifted), shards
    if rounding == "nearest":  # out of place (a virtual probe's piece), inside a block
        out = torch.full((700,), float("nan"), dtype=dtype, device=DEVICE)
        _triton().perturb_triton([out], [9], seeds, torch.tensor(scales, device=DEVICE),
                                 torch.tensor([0.875], device=DEVICE), dist, rounding,
                                 ROUNDING_SEED, index_maps=[(16384 + 384, 700, 700)],
                                 sources=[whole[16384 + 384:16384 + 1084]])
        assert_bits_equal(out.cpu(), expected[16384 + 384:16384 + 1084].cpu(), "out of place")
        assert launched.pop() == (False, True)
    # fp32 zeros + z: block 2^28 of the whole tensor (counter >= 2^32); shards next to the
    # 2^32-call boundary at 2^34 elements: below it, above it, across it (mapped), and one that
    # crosses it only in its tail block's masked lanes (gaussian: 4092 is whole calls of 4)
    for offset, shifted in [(2 ** 40, True), (2 ** 34 - 12160, True), (2 ** 34 + 384, True),
                            (2 ** 34 - 384, False), (2 ** 34 - 4092, dist == "gaussian")]:
        big = torch.zeros(4000, device=DEVICE)
        _perturb([big], [3], [(offset, 4000, 4000)], [7], [1.0], [1.0], dist)
        assert_bits_equal(big.cpu(), _z_rows((offset, 4000, 4000), 1, 7, 3, dist), str(offset))
        assert launched.pop() == (not shifted, shifted), offset
    if rounding == "stochastic":  # rounding bits / uniforms at high shifted counters
        for contract in (3, 2):
            for offset in (2 ** 34 - 12160, 2 ** 40 + 384):
                pieces = {}
                for kernel in ("shifted", "mapped"):
                    if kernel == "mapped":  # the same call forced onto the mapped kernel
                        monkeypatch.setattr(_triton().perturb, "shard_shifts",
                                            lambda maps, tensors, *args: [None] * len(tensors))
                    pieces[kernel] = whole[:3000].clone()
                    _perturb([pieces[kernel]], [9], [(offset, 3000, 3000)], seeds, scales,
                             [0.875], dist, rounding, contract=contract)
                    assert launched.pop() == (kernel == "mapped", kernel == "shifted")
                monkeypatch.undo()
                launched = record_perturb_launches(monkeypatch, "MAPPED", "SHIFTED")
                assert_bits_equal(pieces["shifted"].cpu(), pieces["mapped"].cpu(),
                                  f"contract {contract} at {offset}")


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_a_call_with_shifted_and_mapped_shards_is_split(monkeypatch, dist):
    """Shards at whole Philox calls beside column shards (and a plain tensor) in one call, with
    SPLIT_MIN_ELEMENTS lowered so that these small tensors split: the plain kernel takes the
    shifted ones and the plain tensor, the mapped kernel the rest (rademacher: also the chunk at
    1400, not whole calls of 128), and every result equals the unsharded run's, bit for bit: a
    stochastic-rounding update, a recovering pass, and its undo log at the indices of the whole
    call (the parts are not contiguous in it). Without the lowered bound the call stays one
    mapped launch."""
    from zokernels.backends.triton import perturb as module

    seeds, scales = SEED_SETS["K3"]
    held = [-s / 2 for s in scales]
    cases = [((3000,), [Box(1, 3000, 0, 1, 384, 1384), Box(1, 3000, 0, 1, 1400, 2400)]),
             ((5, 7), [Box(5, 7, 0, 5, 0, 3)]), ((700,), [Box(1, 700, 0, 1, 0, 700)])]
    order = [0, 2, 1, 3]  # shifted, mapped, shifted (gaussian) or mapped, plain
    for dtype in (torch.float32, torch.bfloat16):
        globals_ = _globals(cases, dtype, seed=8, tiny=True)
        shards, skeys, maps, sdecays, where = _shards(cases, globals_)
        shards, skeys, maps, sdecays, where = ([x[k] for k in order]
                                               for x in (shards, skeys, maps, sdecays, where))
        launched = record_perturb_launches(monkeypatch, "MAPPED", "SHIFTED")
        _perturb([t.clone() for t in shards], skeys, maps, seeds, scales, sdecays,
                 dist)  # below the bound
        assert launched == [(True, False)]
        monkeypatch.setattr(module, "SPLIT_MIN_ELEMENTS", 0)
        launched.clear()
        rounding = "stochastic" if dtype == torch.bfloat16 else "nearest"
        _perturb(globals_, _keys(len(cases)), None, seeds, scales, _decays(len(cases)), dist,
                 rounding)
        _perturb(shards, skeys, maps, seeds, scales, sdecays, dist, rounding)
        _assert_shards_equal_global(shards, where, globals_, f"{dist} {dtype} update")
        what = f"{dist} {dtype} logging pass"
        want, got = _logged_pass(globals_, shards, skeys, maps, where, seeds, scales, held, dist,
                                 what)
        assert len(want) > 10 and got == want, what
        # per pass: the unsharded tensors, then the shards' two parts
        assert launched == [(False, False), (False, True), (True, False)] * 2, what
        monkeypatch.undo()


def _fsdp2_box(shape, rank, world):
    """FSDP2's dim-0 chunk of a tensor for a rank: ceil(rows / world) rows from rank * that."""
    chunk = -(-shape[0] // world)
    start = min(rank * chunk, shape[0])
    return start, min(chunk, shape[0] - start)


@pytest.mark.parametrize("split_at", [None, 0], ids=["one-launch", "split"])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_an_fsdp2_rank_group_takes_the_shifted_kernel(monkeypatch, dist, split_at):
    """One rank of a 4-way FSDP2 split of a small decoder layer (2-D weights, biases, norms: the
    1-D chunks at 24 and 48 elements) as marked shards in a ParameterSpace: the +eps pass and a
    decayed contract-3 stochastic-rounding update take the plain kernel at shifted counters for
    gaussian (every offset is whole calls of 4 and 8). For rademacher only q.weight's rows start
    at whole calls of 128 (row 24 of 64 columns): below SPLIT_MIN_ELEMENTS the group takes the
    mapped kernel, with the bound at 0 it is split (q.weight shifted, the rest mapped). Every
    shard ends as the unsharded space's slice, bit for bit."""
    from zokernels.backends.triton import perturb as module
    from zokernels.sharding import mark_shard
    from zokernels.space import ParameterSpace

    if split_at is not None:
        monkeypatch.setattr(module, "SPLIT_MIN_ELEMENTS", split_at)
    launched = record_perturb_launches(monkeypatch, "MAPPED", "SHIFTED")
    generator = torch.Generator().manual_seed(11)
    shapes = {"embed.weight": (50, 64), "q.weight": (32, 64), "q.bias": (32,),
              "norm.weight": (64,), "norm.bias": (64,)}
    fulls = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
             .to(DEVICE) for name, shape in shapes.items()}
    boxes = {name: _fsdp2_box(shape, 3, 4) for name, shape in shapes.items()}
    shards = {name: mark_shard(fulls[name][start:start + rows].clone(), shapes[name],
                               (start,) + (0,) * (len(shapes[name]) - 1))
              for name, (start, rows) in boxes.items()}
    whole = ParameterSpace(list(fulls.items()), backend="triton")
    part = ParameterSpace(list(shards.items()), backend="triton")
    for space in (whole, part):
        space.apply(31, 1e-3, dist=dist)
        space.apply(31, -0.02, applied=1e-3, weight_decay_factor=0.99, dist=dist,
                    rounding="stochastic", rounding_seed=5, contract=3)
    for name, (start, rows) in boxes.items():
        assert_bits_equal(shards[name].cpu(), fulls[name][start:start + rows].cpu(), name)
    if dist == "gaussian":
        assert launched == [(False, False)] * 2 + [(False, True)] * 2
    elif split_at is None:
        assert launched == [(False, False)] * 2 + [(True, False)] * 2
    else:
        assert launched == [(False, False)] * 2 + [(False, True), (True, False)] * 2



def test_the_benchmark_shard_cases_split_and_agree(monkeypatch):
    """The ops benchmark's shard cases (runner.Workload.shard_maps, in the GPU check): "split"
    runs the 2-D shards in the plain kernel and the 1-D ones in the mapped one (2 launches),
    "mapped" all in one mapped launch, with the same bits (tiny shapes; the split's size bound
    lowered)."""
    from zokernels.backends.triton import perturb as module
    from zokernels.backends.triton._common import launch_count, reset_launch_count
    from zokernels.bench.runner import Case, Group, Workload, get_shape_set

    monkeypatch.setattr(module, "SPLIT_MIN_ELEMENTS", 0)
    results, launches = {}, {}
    for shards in ("split", "mapped"):
        case = Case("perturb_", "triton", "rademacher", 2, "nearest", shards=shards)
        workload = Workload(Group(get_shape_set("tiny"), "bfloat16", DEVICE, [case]))
        before = [t.clone() for t in workload.tensors]
        reset_launch_count()
        workload.callable(case)()
        launches[shards] = launch_count()
        assert not all(torch.equal(a, b) for a, b in zip(before, workload.tensors))
        results[shards] = workload.tensors
    assert launches == {"split": 2, "mapped": 1}
    for j, (a, b) in enumerate(zip(results["split"], results["mapped"])):
        assert_bits_equal(a.cpu(), b.cpu(), f"tensor {j}")
    assert module.SPLIT_MIN_ELEMENTS == 0  # the "mapped" case restored the bound it lowered
