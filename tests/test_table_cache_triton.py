"""Cached launch tables of the Triton backend (``table_cache=``): the static table (addresses,
numels, keys, maps, block) is reused while its key matches, the seeds are per call; results are
bit-identical to building the table every call (``table_cache=None``)."""

import gc
import weakref

import pytest
import torch

from zokernels._contract import DEFAULT_CONTRACT

import zokernels
from helpers import assert_bits_equal

pytestmark = pytest.mark.skipif("triton" not in zokernels.available_backends(),
                                reason="triton backend not available")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton():
    import zokernels.backends.triton as backend

    return backend


def _tensors(dtype=torch.float32, sizes=(5, 300, 4097, 1), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=generator) * 0.02).to(dtype).to(DEVICE) for n in sizes]


def _perturb(tensors, seeds, scales, cache, keys=None, maps=None, dist="gaussian",
             rounding="nearest", applied=None, log=None):
    keys = [3 * j + 1 for j in range(len(tensors))] if keys is None else keys
    _triton().perturb_triton(
        tensors, keys, seeds, torch.tensor(scales, dtype=torch.float32, device=DEVICE),
        torch.full((len(tensors),), 0.875, device=DEVICE), dist, rounding, seeds[-1],
        applied=None if applied is None else torch.tensor(applied, device=DEVICE), log=log,
        index_maps=maps, table_cache=cache,
        contract=2)  # contract 2: its stochastic rounding has a block of its own (counted below)


def _static_tables(cache):
    return [entry[1].table for entry in cache.values()]


@pytest.mark.parametrize("maps", [None, [None, (3, 100, 200), (8, 4097, 4097), (0, 1, 1)]],
                         ids=["unmapped", "mapped"])
def test_cached_calls_equal_uncached_calls(maps):
    """A sequence of calls with different seeds, K, applied, rounding and a log: the same bits
    with the cache as without, and one static table for all calls of one block size."""
    from zokernels.backends.undo_buffers import UndoBuffers

    cached, fresh = _tensors(torch.bfloat16), _tensors(torch.bfloat16)
    cache = {}
    calls = [dict(seeds=[1], scales=[1e-3]),
             dict(seeds=[2 ** 64 - 1, 7, 9], scales=[0.5, -0.25, 1e-2], rounding="stochastic"),
             dict(seeds=[4], scales=[-1e-3], dist="rademacher"),
             dict(seeds=[5], scales=[1e-3]),  # gaussian block again: no new table
             dict(seeds=[5], scales=[-1e-3], applied=[1e-3]),  # recovery block
             dict(seeds=[6, 8], scales=[1e-3, 2e-3], applied=[0.0, 0.0])]
    for n, call in enumerate(calls):
        _perturb(cached, cache=cache, maps=maps, **call)
        _perturb(fresh, cache=None, maps=maps, **call)
        for j, (c, f) in enumerate(zip(cached, fresh)):
            assert_bits_equal(c.cpu(), f.cpu(), f"call {n} tensor {j}")
    # unmapped: one table per block (gaussian, stochastic rounding, rademacher); mapped: one,
    # whose programs hold the mapped block whatever the pass's plain block
    tables = 3 if maps is None else 1
    assert len(cache) == tables
    logs = [UndoBuffers(torch.zeros(9000, dtype=torch.int64, device=DEVICE),
                        torch.zeros(9000, dtype=torch.bfloat16, device=DEVICE),
                        torch.zeros(1, dtype=torch.int64, device=DEVICE)) for _ in range(2)]
    _perturb(cached, [11], [1e-2], cache, maps=maps, log=logs[0])
    _perturb(fresh, [11], [1e-2], None, maps=maps, log=logs[1])
    assert len(cache) == tables  # the log uses the recovery block's table
    assert int(logs[0].count.item()) == int(logs[1].count.item()) > 0
    for name in ("index", "values"):
        assert torch.equal(getattr(logs[0], name).cpu(), getattr(logs[1], name).cpu()), name


def test_static_table_is_reused_and_seeds_are_per_call():
    tensors = _tensors()
    cache = {}
    _perturb(tensors, [1], [1e-3], cache)
    (table,) = _static_tables(cache)
    _perturb(tensors, [2, 3], [1e-3, 1e-3], cache)
    assert _static_tables(cache)[0] is table
    from zokernels.backends.triton._common import cached_table
    from zokernels.backends.triton.perturb import block_for

    block = block_for("gaussian", stochastic=False, recover=False, normal=DEFAULT_CONTRACT,
                      itemsize=tensors[0].element_size())
    launch = cached_table(cache, tensors, [1, 4, 7, 10], [2 ** 64 - 1, 5], 9, block)
    assert launch.table is table
    assert launch.seeds.cpu().tolist() == [-1, 5, 9]  # uint64 bit patterns, rounding seed last


@pytest.mark.parametrize("change", ["keys", "maps", "numel", "address", "dtype"])
def test_table_rebuilt_when_its_key_changes(change):
    tensors = _tensors()
    keys = [1, 4, 7, 10]
    cache = {}
    _perturb(tensors, [1], [1e-3], cache, keys=keys)
    (old,) = _static_tables(cache)
    maps = None
    if change == "keys":
        keys = [1, 4, 8, 10]
    elif change == "maps":
        maps = [None, (7, 100, 300), None, None]
    elif change == "numel":
        tensors[1] = tensors[1][:299]  # same address, fewer elements
    elif change == "address":
        tensors[2] = tensors[2].clone()
    else:
        tensors = [t.to(torch.bfloat16) for t in tensors]
    expected = [t.clone() for t in tensors]
    _perturb(tensors, [2], [1e-3], cache, keys=keys, maps=maps)
    _perturb(expected, [2], [1e-3], None, keys=keys, maps=maps)
    for j, (t, e) in enumerate(zip(tensors, expected)):
        assert_bits_equal(t.cpu(), e.cpu(), f"{change}: tensor {j}")
    assert len(cache) == 2 and _static_tables(cache)[0] is old


def test_cache_is_bounded_and_least_recently_used_goes():
    from zokernels.backends.triton._common import TABLE_CACHE_ENTRIES

    tensors = _tensors()
    cache = {}
    _perturb(tensors, [1], [1e-3], cache)
    (first,) = _static_tables(cache)
    temporaries = []  # kept alive: a new address every call
    for n in range(TABLE_CACHE_ENTRIES + 3):
        temporaries.append(tensors[1].clone())
        _perturb([tensors[0], temporaries[-1]], [1], [1e-3], cache)
        _perturb(tensors, [1], [1e-3], cache)  # used again: stays
        assert len(cache) <= TABLE_CACHE_ENTRIES
        assert any(t is first for t in _static_tables(cache)), n
    assert len(cache) == TABLE_CACHE_ENTRIES


def test_cache_keeps_no_tensor_alive():
    """An entry holds the device table, not the tensors (a temporary contiguous copy must be
    freed after its call)."""
    tensors = _tensors()
    cache = {}
    _perturb(tensors, [1], [1e-3], cache)
    ref = weakref.ref(tensors[0])
    del tensors
    gc.collect()
    assert ref() is None and len(cache) == 1


def test_scatter_uses_the_cache():
    from zokernels.backends.undo_buffers import UndoBuffers

    cached, fresh = _tensors(), _tensors()
    index = torch.tensor([4300, 2, 5, 304, 4401], device=DEVICE)
    values = torch.tensor([0.5, -1.0, 2.0, 0.25, 3.0], device=DEVICE)
    log = UndoBuffers(index, values, torch.tensor([5], device=DEVICE))
    maps = [None, (3, 100, 200), None, (9, 1, 1)]
    cache = {}
    scatter = _triton().scatter_perturb_triton
    for seeds in ([], [3, 4], [5]):
        scales = torch.full((len(seeds),), 0.5, device=DEVICE)
        decays = torch.full((4,), 0.75, device=DEVICE)
        keys = [1, 2, 3, 4]
        scatter(cached, keys, *log, seeds, scales, decays, "gaussian", "nearest", 0,
                index_maps=maps, table_cache=cache)
        scatter(fresh, keys, *log, seeds, scales, decays, "gaussian", "nearest", 0,
                index_maps=maps)
        for j, (c, f) in enumerate(zip(cached, fresh)):
            assert_bits_equal(c.cpu(), f.cpu(), f"seeds {seeds} tensor {j}")
    assert len(cache) == 1  # restore (K = 0) and update share the table


def test_uncached_table_is_one_device_copy():
    """table_cache=None: static part and seeds in one tensor (one copy per call, as before)."""
    from zokernels.backends.triton._common import build_table

    tensors = _tensors()
    launch = build_table(tensors, [1, 2, 3, 4], [7, 8], 9, 4096)
    assert launch.seeds.untyped_storage().data_ptr() == launch.table.untyped_storage().data_ptr()
    assert launch.seeds.cpu().tolist() == [7, 8, 9]
    assert launch.seeds.data_ptr() % 16 == 0  # the seeds pointer keeps the kernel's 16-byte hint
