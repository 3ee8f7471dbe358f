"""Index maps (sharded tensors) in the C++ CPU backend, bit for bit.

A rank holding a box of a global tensor passes index_maps=[(offset, local_span, global_span)]:
local element i is element g(i) = offset + (i // local_span) * global_span + i % local_span of the
unsharded tensor, and must get exactly its noise and stochastic-rounding uniform. So the op on
G[box].contiguous() with the map must leave exactly what the op on the whole G leaves in the box
(perturb_cpu, recovery, the undo log with local indices, scatter_perturb_cpu), and the noise must
be the torch reference's for the unsharded tensor.
"""

import math

import pytest
import torch

from helpers import assert_bits_equal, assert_close, assert_same_in_both_simd_modes

pytest.importorskip("zokernels._C")

from zokernels.backends.cpu import (  # noqa: E402
    load_cpu_extension,
    perturb_cpu,
    scatter_perturb_cpu,
)
from zokernels.backends.torch import perturb_torch  # noqa: E402
from zokernels.backends.undo_buffers import UndoBuffers  # noqa: E402

KEY = 7
GAUSSIAN_ATOL = 1e-5  # per unit of |scale|, as tests/test_perturb.py: libm differences in z


def shard(shape, dim, start, stop):
    """(box, index map) of the rows [start, stop) of dimension `dim`, the others whole."""
    inner = math.prod(shape[dim + 1:])
    box = tuple(slice(None) for _ in range(dim)) + (slice(start, stop),)
    return box, (start * inner, (stop - start) * inner, shape[dim] * inner)


def block(shape, rows, cols):
    """(box, index map) of rows [r0, r1) x cols [c0, c1) of a matrix."""
    (r0, r1), (c0, c1) = rows, cols
    return (slice(r0, r1), slice(c0, c1)), (r0 * shape[1] + c0, c1 - c0, shape[1])


# Global shape -> its shards: row and column shards with uneven splits (nothing aligned to 4 or
# 128), a block, a one-row shard, a single column, a column of width 3 (a tiny local_span), and
# runs longer than a work item (3 x 70001).
SHARDS = {
    (5, 7): [shard((5, 7), 0, 0, 3), shard((5, 7), 0, 3, 5), shard((5, 7), 1, 0, 4),
             shard((5, 7), 1, 4, 7), block((5, 7), (1, 4), (2, 6)), shard((5, 7), 0, 2, 3),
             shard((5, 7), 1, 6, 7)],
    (33, 1031): [shard((33, 1031), 0, 0, 17), shard((33, 1031), 0, 17, 33),
                 shard((33, 1031), 1, 0, 516), shard((33, 1031), 1, 516, 1031),
                 block((33, 1031), (1, 4), (2, 6)), shard((33, 1031), 0, 32, 33),
                 shard((33, 1031), 1, 1030, 1031), shard((33, 1031), 1, 5, 8)],
    (3, 4, 5): [shard((3, 4, 5), 0, 1, 3), shard((3, 4, 5), 1, 1, 3), shard((3, 4, 5), 2, 2, 5),
                shard((3, 4, 5), 2, 4, 5)],
    (4097,): [shard((4097,), 0, 0, 2049), shard((4097,), 0, 2049, 4097),
              shard((4097,), 0, 1000, 1001)],
    (3, 70_001): [shard((3, 70_001), 1, 5, 70_000), shard((3, 70_001), 0, 1, 3)],
}

# (dtype, rounding): stochastic rounding only where it rounds (16-bit formats).
FORMATS = [(torch.float32, "nearest"), (torch.bfloat16, "nearest"), (torch.bfloat16, "stochastic"),
           (torch.float16, "nearest"), (torch.float16, "stochastic")]
FORMAT_IDS = [f"{str(d).split('.')[-1]}-{r}" for d, r in FORMATS]
DISTS = ["gaussian", "rademacher"]


def _weights(shape, dtype, seed, std=0.5):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * std).to(dtype)


def _seeds(k):
    seeds = [11, 2 ** 40 + 5, 2 ** 64 - 3][:k]
    return seeds, torch.tensor([1e-2, -3e-3, 0.25][:k])


def _local_of_global(shape, box):
    """int64 [numel(shape)]: the local flat index of each global element in the box, else -1."""
    numel = math.prod(shape)
    local = torch.full((numel,), -1, dtype=torch.int64)
    inside = torch.arange(numel).view(shape)[box].reshape(-1)
    local[inside] = torch.arange(inside.numel())
    return local


def _buffers(capacity, dtype):
    return UndoBuffers(torch.full((capacity,), -7, dtype=torch.int64),
                       torch.full((capacity,), 12.5, dtype=dtype),
                       torch.zeros(1, dtype=torch.int64))


def _entries(log):
    """The stored (index, values) of a log, sorted by index."""
    used = min(int(log.count.item()), log.capacity)
    index, values = log.index[:used], log.values[:used]
    order = torch.argsort(index)
    return index[order], values[order]


@pytest.mark.parametrize("dtype,rounding", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("k", [1, 3])
def test_shard_equals_box_of_global(dtype, rounding, dist, k):
    seeds, scales = _seeds(k)
    decays = torch.tensor([0.875])
    for shape, shards in SHARDS.items():
        start = _weights(shape, dtype, seed=len(shape))
        whole = start.clone()
        perturb_cpu([whole.view(-1)], [KEY], seeds, scales, decays, dist, rounding, 123)
        for box, index_map in shards:
            local = start[box].clone()
            perturb_cpu([local.view(-1)], [KEY], seeds, scales, decays, dist, rounding, 123,
                        index_maps=[index_map])
            assert_bits_equal(local, whole[box].contiguous(),
                              f"{dtype} {rounding} {dist} K={k} {shape} map {index_map}")


def test_identity_entries_equal_no_map():
    """None, (0, n, n) and the other spellings of g(i) = i all give the unmapped result."""
    start = _weights((33, 1031), torch.bfloat16, seed=3)
    seeds, scales = _seeds(3)
    n = start.numel()
    results = []
    for index_maps in (None, [None], [(0, n, n)], [(0, 1031, 1031)], [(0, n, 2 * n)]):
        t = start.clone()
        perturb_cpu([t.view(-1)], [KEY], seeds, scales, torch.ones(1), "gaussian", "stochastic", 5,
                    index_maps=index_maps)
        results.append((index_maps, t))
    for index_maps, t in results[1:]:
        assert_bits_equal(t, results[0][1], f"index_maps={index_maps}")
    assert not torch.equal(results[0][1], start)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dist", DISTS)
def test_recovery_on_a_shard(dtype, dist):
    """applied=: the held perturbation is undone with the global element's noise."""
    seeds, held = _seeds(3)
    scales = torch.tensor([-2e-2, 1e-3, 0.5])
    for shape in ((33, 1031), (3, 70_001)):
        held_whole = _weights(shape, dtype, seed=1, std=0.02)
        perturb_cpu([held_whole.view(-1)], [KEY], seeds, held, torch.ones(1), dist, "nearest", 0)
        whole = held_whole.clone()
        perturb_cpu([whole.view(-1)], [KEY], seeds, scales, torch.tensor([0.5]), dist, "nearest",
                    0, applied=held)
        for box, index_map in SHARDS[shape]:
            local = held_whole[box].clone()
            perturb_cpu([local.view(-1)], [KEY], seeds, scales, torch.tensor([0.5]), dist,
                        "nearest", 0, applied=held, index_maps=[index_map])
            assert_bits_equal(local, whole[box].contiguous(), f"{dtype} {dist} {shape} {index_map}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("applied", [False, True], ids=["plain", "applied"])
@pytest.mark.parametrize("k", [1, 3])
def test_logging_pass_records_local_indices(dtype, dist, applied, k):
    """The shard's log holds exactly the global log's entries in the box, at local group-flat
    indices (after an unmapped tensor of 37 elements, so start_j = 37)."""
    seeds, _ = _seeds(k)
    scales = torch.tensor([-1e-3, 3e-3, 1e-2][:k])
    held = torch.tensor([1e-3, -2e-3, 5e-4][:k]) if applied else None
    first = _weights((37,), dtype, seed=9, std=0.02)
    for shape in ((33, 1031), (3, 70_001), (4097,)):
        start = _weights(shape, dtype, seed=2, std=0.02)
        start.view(-1)[::97] = 0.0  # exact zeros: recoverable now, often lost later
        if held is not None:
            perturb_cpu([start.view(-1)], [KEY], seeds, held, torch.ones(1), dist, "nearest", 0)
        capacity = 37 + start.numel()
        whole, whole_log = [first.clone(), start.clone().view(-1)], _buffers(capacity, dtype)
        perturb_cpu(whole, [3, KEY], seeds, scales, torch.ones(2), dist, "nearest", 0,
                    applied=held, log=whole_log)
        whole_index, whole_values = _entries(whole_log)
        first_entries = whole_index < 37
        for box, index_map in SHARDS[shape]:
            what = f"{dtype} {dist} K={k} applied={applied} {shape} map {index_map}"
            local_of = _local_of_global(shape, box)
            in_box = ~first_entries & (local_of[(whole_index - 37).clamp_min(0)] >= 0)
            expected_index = torch.where(first_entries, whole_index,
                                         37 + local_of[(whole_index - 37).clamp_min(0)])
            keep = first_entries | in_box
            expected_index, expected_values = expected_index[keep], whole_values[keep]
            order = torch.argsort(expected_index)
            expected_index, expected_values = expected_index[order], expected_values[order]

            local = [first.clone(), start[box].clone().reshape(-1)]
            log = _buffers(capacity, dtype)
            perturb_cpu(local, [3, KEY], seeds, scales, torch.ones(2), dist, "nearest", 0,
                        applied=held, log=log, index_maps=[None, index_map])
            assert_bits_equal(local[1], whole[1].view(shape)[box].reshape(-1), what)
            assert log.count.item() == expected_index.numel(), what
            index, values = _entries(log)
            assert torch.equal(index, expected_index), what
            assert_bits_equal(values, expected_values, f"{what}: values")
            # Count-only: the same count, nothing written.
            probe = _buffers(capacity, dtype)
            probed = [first.clone(), start[box].clone().reshape(-1)]
            perturb_cpu(probed, [3, KEY], seeds, scales, torch.ones(2), dist, "nearest", 0,
                        applied=held, log=probe, count_only=True, index_maps=[None, index_map])
            assert probe.count.item() == expected_index.numel(), what
            assert_bits_equal(probed[1], start[box].reshape(-1), f"{what}: count-only wrote")
        if shape != (4097,):
            assert 0 < whole_log.count.item() < 0.5 * capacity, f"{dtype} {dist}: few losses"


@pytest.mark.parametrize("dtype,rounding", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("k", [0, 1, 3])
def test_scatter_on_a_shard(dtype, rounding, dist, k):
    """Entries of a global log that fall in the box, at local indices, leave the shard as the
    global scatter leaves the box; an entry ends as a dense mapped pass from its value would."""
    seeds, scales = _seeds(k)
    decays = torch.tensor([1.0, 0.75])
    first = _weights((37,), dtype, seed=4)
    for shape in ((33, 1031), (3, 70_001), (3, 4, 5)):
        numel = math.prod(shape)
        start = _weights(shape, dtype, seed=5)
        generator = torch.Generator().manual_seed(numel)
        element = torch.randperm(numel, generator=generator)[:numel // 3]
        values = _weights((element.numel(),), dtype, seed=6)
        whole = [first.clone(), start.clone().view(-1)]
        log = UndoBuffers(37 + element, values, torch.tensor([element.numel()]))
        scatter_perturb_cpu(whole, [3, KEY], log.index, log.values, log.count, seeds, scales,
                            decays, dist, rounding, 77)
        for box, index_map in SHARDS[shape]:
            what = f"{dtype} {rounding} {dist} K={k} {shape} map {index_map}"
            local_of = _local_of_global(shape, box)
            mine = local_of[element] >= 0
            local_index, local_values = local_of[element[mine]], values[mine]
            local = [first.clone(), start[box].clone().reshape(-1)]
            local_log = UndoBuffers(37 + local_index, local_values, torch.tensor([int(mine.sum())]))
            scatter_perturb_cpu(local, [3, KEY], local_log.index, local_log.values, local_log.count,
                                seeds, scales, decays, dist, rounding, 77,
                                index_maps=[None, index_map])
            assert_bits_equal(local[1], whole[1].view(shape)[box].reshape(-1), what)
            if k > 0 and local_index.numel() > 0:
                dense = start[box].clone().reshape(-1)
                dense[local_index] = local_values
                perturb_cpu([dense], [KEY], seeds, scales, decays[1:], dist, rounding, 77,
                            index_maps=[index_map])
                assert_bits_equal(local[1][local_index], dense[local_index], f"{what}: dense")


def test_mixed_mapped_and_unmapped_tensors_in_one_call():
    """Each tensor of a mixed list ends as it would alone (mapped ones as their box)."""
    dtype, seeds, scales = torch.bfloat16, *_seeds(3)
    plain_a, plain_b = _weights((1000,), dtype, seed=1), _weights((4097,), dtype, seed=2)
    global_c, global_d = _weights((33, 1031), dtype, seed=3), _weights((3, 70_001), dtype, seed=4)
    (box_c, map_c), (box_d, map_d) = SHARDS[(33, 1031)][2], SHARDS[(3, 70_001)][0]
    keys, decays = [1, 2, 3, 4], torch.tensor([1.0, 0.5, 0.875, 0.75])
    mixed = [plain_a.clone(), global_c[box_c].clone().view(-1), plain_b.clone(),
             global_d[box_d].clone().view(-1)]
    perturb_cpu(mixed, keys, seeds, scales, decays, "gaussian", "stochastic", 9,
                index_maps=[None, map_c, (0, 4097, 4097), map_d])
    alone = [plain_a.clone(), global_c.clone().view(-1), plain_b.clone(), global_d.clone().view(-1)]
    for j, t in enumerate(alone):
        perturb_cpu([t], keys[j:j + 1], seeds, scales, decays[j:j + 1], "gaussian", "stochastic", 9)
    assert_bits_equal(mixed[0], alone[0], "unmapped a")
    assert_bits_equal(mixed[1], alone[1].view(33, 1031)[box_c].reshape(-1), "mapped c")
    assert_bits_equal(mixed[2], alone[2], "unmapped b")
    assert_bits_equal(mixed[3], alone[3].view(3, 70_001)[box_d].reshape(-1), "mapped d")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dist", DISTS)
def test_shard_matches_torch_reference_of_the_whole_tensor(dtype, dist):
    """The torch backend on the unsharded tensor is the contract: the shard agrees with its box
    to the tolerance of tests/test_perturb.py (bit for bit for rademacher)."""
    seeds, scales = _seeds(3)
    for shape in ((33, 1031), (3, 4, 5), (3, 70_001)):
        start = _weights(shape, dtype, seed=8)
        reference = start.clone()
        perturb_torch([reference.view(-1)], [KEY], seeds, scales.tolist(), torch.tensor([0.875]),
                      dist, "nearest", 0)
        for box, index_map in SHARDS[shape]:
            what = f"{dtype} {dist} {shape} map {index_map}"
            local = start[box].clone()
            perturb_cpu([local.view(-1)], [KEY], seeds, scales, torch.tensor([0.875]), dist,
                        "nearest", 0, index_maps=[index_map])
            expected = reference[box].contiguous()
            atol = GAUSSIAN_ATOL * scales.abs().sum().item() if dist == "gaussian" else 0.0
            assert_close(local, expected, atol=atol, ulps=1.0, dtype=dtype, what=what)
            if dist == "rademacher":
                assert_bits_equal(local, expected, what)


def test_generic_path_matches_simd_path_with_maps(tmp_path):
    """The mapped kernels are instantiations of their own: same bits on both SIMD paths."""
    script = (
        "import sys, torch\n"
        "from zokernels.backends.cpu import build_info, perturb_cpu, scatter_perturb_cpu\n"
        "out = {'simd': build_info()['simd']}\n"
        "seeds, scales = [3, 2 ** 40 + 1], torch.tensor([0.1, -0.02])\n"
        "for dist in ('gaussian', 'rademacher'):\n"
        "    for dtype in (torch.float32, torch.bfloat16):\n"
        "        t = torch.linspace(-3, 3, 3 * 1027).to(dtype)\n"
        "        perturb_cpu([t], [1], seeds, scales, torch.ones(1), dist, 'stochastic', 4,\n"
        "                    applied=torch.tensor([0.01, 0.0]), index_maps=[(5, 1027, 2048)])\n"
        "        out[f'{dist} {dtype}'] = t\n"
        "        s = torch.linspace(-1, 1, 999).to(dtype)\n"
        "        index = torch.arange(0, 999, 7)\n"
        "        count = torch.tensor([index.numel()])\n"
        "        scatter_perturb_cpu([s], [1], index, s[index].clone(), count,\n"
        "                            seeds, scales, torch.ones(1), dist, 'stochastic', 4,\n"
        "                            index_maps=[(1, 3, 2049)])\n"
        "        out[f'scatter {dist} {dtype}'] = s\n"
        "torch.save(out, sys.argv[1])\n"
    )
    assert_same_in_both_simd_modes(script, tmp_path)


def test_bad_maps_raise_before_anything_is_written():
    """_C checks what would divide by zero, overflow or read past its lists, before writing."""
    ext = load_cpu_extension()
    t = torch.zeros(12)
    log_index, log_values = torch.zeros(4, dtype=torch.int64), torch.zeros(4)
    log_count = torch.ones(1, dtype=torch.int64)
    bad_maps = [
        (([0, 0], [12, 12], [12, 12]), "one value per tensor"),
        (([0], [12], []), "one value per tensor"),
        (([0], [0], [12]), "index_local_spans of tensor 0"),
        (([0], [5], [4]), "index_local_spans of tensor 0"),
        (([0], [5], [10]), "divide"),
        (([2 ** 63 - 5], [3], [3]), "2\\^63"),
        (([0], [3], [2 ** 62]), "2\\^63"),
    ]
    for (offsets, local_spans, global_spans), message in bad_maps:
        maps = dict(index_offsets=offsets, index_local_spans=local_spans,
                    index_global_spans=global_spans)
        with pytest.raises(ValueError, match=message):
            ext.perturb([t.data_ptr()], [12], [1], [1.0], 0, [5], [1.0], [], 0, 0, 0, 1, **maps)
        with pytest.raises(ValueError, match=message):
            ext.scatter_perturb([t.data_ptr()], [12], [1], [1.0], 0, log_index.data_ptr(),
                                log_values.data_ptr(), 4, log_count.data_ptr(), [5], [1.0], 0, 0,
                                0, 1, **maps)
        assert (t == 0).all(), message
    # The largest allowed index: g(numel - 1) = 2^63 - 1.
    ext.perturb([t.data_ptr()], [12], [1], [1.0], 0, [5], [1.0], [], 0, 0, 0, 1,
                index_offsets=[2 ** 63 - 12], index_local_spans=[12], index_global_spans=[12])
    assert (t != 0).all()
