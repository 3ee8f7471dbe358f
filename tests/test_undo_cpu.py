"""The undo log in the C++ CPU backend (docs/undo-log.md): perturb_cpu(log=...) and
scatter_perturb_cpu against the torch reference, bit for bit, and exact restores end to end.

The reference's gaussian z comes from libm and differs from the C++ Box-Muller by ~1e-6, which
moves roundings and so the set of lost elements. The comparisons therefore run the reference with
the C++ kernel's z (from noise_cpu, the same tile code as perturb_cpu); everything else (sums,
recovery, the lost test, rounding, the log's bookkeeping) is the reference's own. Rademacher z is
exact in both and runs unpatched.
"""

import pytest
import torch

from helpers import assert_bits_equal, assert_same_in_both_simd_modes

pytest.importorskip("zokernels._C")

from zokernels.backends.cpu import noise_cpu, perturb_cpu, scatter_perturb_cpu  # noqa: E402
from zokernels.backends.undo_buffers import UndoBuffers  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DISTS = ["gaussian", "rademacher"]
# Lists of tensor sizes (one call each): single elements, odd sizes around tiles and Philox
# counters, an empty tensor in the middle of a list (start offsets), several work items.
SIZE_LISTS = [[1], [2], [3], [4097], [127, 0, 4096, 5, 1025, 33], [70_003, 7]]
# Exact zeros, -0.0 (always logged), tiny weights (subnormal in some dtype) and an infinity. NaN
# only where the reference is not involved: torch's own float32 -> bf16 conversion turns NaN into
# 0xFFFF where the C++ kernels (like c10's scalar conversion) write 0x7FC0.
SPECIALS = [0.0, -0.0, 0.0, 1e-40, -1e-30, 1e-6, -3e-5, 2e-7, float("inf")]


def _keys(tensors):
    return [7 * j + 3 for j in range(len(tensors))]


def _weights(sizes, dtype, seed=0, nan=False):
    """N(0, 0.02) weights with the special values at random positions."""
    generator = torch.Generator().manual_seed(seed)
    specials = SPECIALS + [float("nan")] * nan
    out = []
    for n in sizes:
        w = torch.randn(n, generator=generator) * 0.02
        if n > 0:
            m = min(n, len(specials))
            w[torch.randperm(n, generator=generator)[:m]] = torch.tensor(specials[:m])
        out.append(w.to(dtype))
    return out


def _buffers(capacity, dtype, count=0):
    """A log with sentinel contents (to see what was written)."""
    return UndoBuffers(torch.full((capacity,), -7, dtype=torch.int64),
                       torch.full((capacity,), 12.5, dtype=dtype),
                       torch.full((1,), count, dtype=torch.int64))


def _entries(log, first=0):
    """The log's stored (index, values) from slot `first` on, sorted by index."""
    used = min(int(log.count.item()), log.capacity)
    index, values = log.index[first:used], log.values[first:used]
    order = torch.argsort(index)
    return index[order], values[order]


def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.fixture
def reference(monkeypatch):
    """(perturb_torch, scatter_perturb_torch) drawing gaussian z from the C++ kernels."""
    import zokernels.backends.torch.perturb as torch_perturb
    import zokernels.backends.torch.scatter as torch_scatter

    values, values_at = torch_perturb.contract_values, torch_scatter.contract_values_at

    def cpu_values(seed, key, start, count, dist, device, **kwargs):
        if dist != "gaussian" or kwargs:
            return values(seed, key, start, count, dist, device, **kwargs)
        return noise_cpu(count, seed, key, start, dist, device)

    def cpu_values_at(seed, keys, indices, dist, **kwargs):
        if dist != "gaussian" or kwargs:
            return values_at(seed, keys, indices, dist, **kwargs)
        out = torch.empty(indices.shape, dtype=torch.float32)
        for key in keys.unique().tolist():
            mine = keys == key
            z = noise_cpu(int(indices[mine].max()) + 1, seed, key, 0, dist, torch.device("cpu"))
            out[mine] = z[indices[mine]]
        return out

    monkeypatch.setattr(torch_perturb, "contract_values", cpu_values)
    monkeypatch.setattr(torch_scatter, "contract_values_at", cpu_values_at)
    return torch_perturb.perturb_torch, torch_scatter.scatter_perturb_torch


def _pass_args(tensors, k, applied):
    """(keys, seeds, scales, decays, applied) of a logging pass with K = k seeds."""
    seeds = [11, 2 ** 40 + 5, 99][:k]
    scales = torch.tensor([-1e-3, 3e-3, 1e-2][:k])
    held = torch.tensor([1e-3, -2e-3, 5e-4][:k]) if applied else None
    return _keys(tensors), seeds, scales, torch.ones(len(tensors)), held


def _held(tensors, keys, seeds, held, dist):
    """Put the perturbation `held` (if any) on the tensors, as a previous pass would."""
    if held is not None:
        perturb_cpu(tensors, keys, seeds, held, torch.ones(len(tensors)), dist, "nearest", 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("applied", [False, True], ids=["plain", "applied"])
@pytest.mark.parametrize("k", [1, 3])
def test_log_matches_reference(reference, dtype, dist, applied, k):
    perturb_torch, _ = reference
    for sizes in SIZE_LISTS:
        start = _weights(sizes, dtype, seed=len(sizes) + sum(sizes))
        keys, seeds, scales, decays, held = _pass_args(start, k, applied)
        _held(start, keys, seeds, held, dist)
        got, expected = [t.clone() for t in start], [t.clone() for t in start]
        capacity = sum(sizes) + 3
        got_log, expected_log = _buffers(capacity, dtype), _buffers(capacity, dtype)
        perturb_cpu(got, keys, seeds, scales, decays, dist, "nearest", 0, applied=held, log=got_log)
        perturb_torch(expected, keys, seeds, scales, decays, dist, "nearest", 0, applied=held,
                      log=expected_log)
        what = f"{dtype} {dist} K={k} applied={applied} sizes={sizes}"
        assert got_log.count.item() == expected_log.count.item(), what
        for j, (g, e) in enumerate(zip(got, expected)):
            assert_bits_equal(g, e, f"{what}: tensor {j}")
        got_index, got_values = _entries(got_log)
        expected_index, expected_values = _entries(expected_log)
        assert torch.equal(got_index, expected_index), what
        assert_bits_equal(got_values, expected_values, f"{what}: values")
        # The rest of the log is untouched.
        assert (got_log.index[got_log.count.item():] == -7).all(), what
        if sum(sizes) > 1000:
            assert 0 < got_log.count.item() < 0.5 * sum(sizes), what


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("applied", [False, True], ids=["plain", "applied"])
def test_overflow_and_count_only(dtype, dist, applied):
    sizes = [70_003, 129, 4097]
    start = _weights(sizes, dtype, seed=3)
    keys, seeds, scales, decays, held = _pass_args(start, 1, applied)
    _held(start, keys, seeds, held, dist)
    args = (keys, seeds, scales, decays, dist, "nearest", 0)

    full, full_log = [t.clone() for t in start], _buffers(sum(sizes), dtype)
    perturb_cpu(full, *args, applied=held, log=full_log)
    count = full_log.count.item()
    full_index, full_values = _entries(full_log)
    assert count > 100
    # Every lost element once.
    assert torch.equal(full_index, full_index.unique())

    # Overflow: everything is counted, `capacity` genuine entries are stored, tensors as before.
    capacity = count // 3
    small, small_log = [t.clone() for t in start], _buffers(capacity, dtype)
    perturb_cpu(small, *args, applied=held, log=small_log)
    assert small_log.count.item() == count
    index, values = _entries(small_log)
    assert index.numel() == capacity and torch.equal(index, index.unique())
    where = torch.searchsorted(full_index, index)
    assert torch.equal(full_index[where], index)
    assert_bits_equal(values, full_values[where], "overflowed entries")
    for j, (s, f) in enumerate(zip(small, full)):
        assert_bits_equal(s, f, f"tensor {j} with an overflowing log")

    # The count is added to: slots before the old count are not touched.
    offset, added_log = 5, _buffers(count + 10, dtype, count=5)
    perturb_cpu([t.clone() for t in start], *args, applied=held, log=added_log)
    assert added_log.count.item() == count + offset
    assert (added_log.index[:offset] == -7).all()
    index, values = _entries(added_log, first=offset)
    assert torch.equal(index, full_index)
    assert_bits_equal(values, full_values, "entries after an offset")

    # Count only: nothing written but the count.
    probed, probe = [t.clone() for t in start], _buffers(16, dtype)
    perturb_cpu(probed, *args, applied=held, log=probe, count_only=True)
    assert probe.count.item() == count
    assert (probe.index == -7).all() and (probe.values == 12.5).all()
    for j, (p, s) in enumerate(zip(probed, start)):
        assert_bits_equal(p, s, f"tensor {j} after count-only")
    with pytest.raises(ValueError, match="count_only"):
        perturb_cpu(probed, *args, count_only=True)


def _scatter_case(sizes, dtype, k, seed):
    """Tensors, a log of distinct random indices with random values, and the pass arguments."""
    generator = torch.Generator().manual_seed(seed)
    tensors = _weights(sizes, dtype, seed=seed)
    total = sum(sizes)
    m = max(1, total // 7)
    index = torch.randperm(total, generator=generator)[:m]
    values = _weights([m], dtype, seed=seed + 1)[0]
    seeds = [5, 2 ** 63 + 1, 17][:k]
    scales = torch.tensor([2e-3, -1e-2, 0.5][:k])
    decays = torch.tensor([1.0, 0.999, 0.5, 1.0, 0.75, 0.9][:len(sizes)])
    return tensors, index, values, seeds, scales, decays


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_scatter_matches_reference(reference, dtype, dist, k, rounding):
    _, scatter_torch = reference
    for sizes in SIZE_LISTS:
        tensors, index, values, seeds, scales, decays = _scatter_case(sizes, dtype, k, sum(sizes))
        keys = _keys(tensors)
        m = index.numel()
        # Slots past the count hold garbage that must not be read; count > capacity (an
        # overflowed log) uses the capacity's entries.
        for count, capacity in ((m - 1, m + 2), (m + 50, m)):
            log = _buffers(capacity, dtype, count=count)
            log.index[:m], log.values[:m] = index, values
            got, expected = [t.clone() for t in tensors], [t.clone() for t in tensors]
            args = (log.index, log.values, log.count, seeds, scales, decays, dist, rounding, 9)
            scatter_perturb_cpu(got, keys, *args)
            scatter_torch(expected, keys, *args)
            for j, (g, e) in enumerate(zip(got, expected)):
                assert_bits_equal(g, e, f"{dtype} {dist} K={k} {rounding} sizes={sizes} tensor {j}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_scatter_equals_dense_perturb(dtype, dist, rounding):
    """An entry ends exactly as perturb_cpu (the tile code) leaves that element from the value."""
    sizes = [70_003, 1, 4097, 130]
    for k in (1, 3):
        tensors, index, values, seeds, scales, decays = _scatter_case(sizes, dtype, k, 5 + k)
        keys = _keys(tensors)
        dense = torch.cat(tensors)
        dense[index] = values
        dense_parts = list(dense.split(sizes))
        perturb_cpu(dense_parts, keys, seeds, scales, decays, dist, rounding, 9)
        log = UndoBuffers(index, values, torch.tensor([index.numel()]))
        scatter_perturb_cpu(tensors, keys, log.index, log.values, log.count, seeds, scales,
                            decays, dist, rounding, 9)
        assert_bits_equal(torch.cat(tensors)[index], torch.cat(dense_parts)[index],
                          f"{dtype} {dist} {rounding} K={k}")


def test_scatter_rejects_indices_outside_the_tensors():
    tensors = _weights([10, 5], torch.float32)
    for bad in (15, -1):
        log = UndoBuffers(torch.tensor([3, bad]), torch.tensor([1.0, 2.0]), torch.tensor([2]))
        for seeds, scales in (([], torch.zeros(0)), ([1], torch.tensor([0.1]))):
            with pytest.raises(ValueError, match="outside the tensors"):
                scatter_perturb_cpu(tensors, [1, 2], log.index, log.values, log.count, seeds,
                                    scales, torch.ones(2), "gaussian", "nearest", 0)


def _log_pass(tensors, keys, seeds, scales, dist, applied=None):
    """A logging pass sized by a count-only probe, as the optimizer does."""
    decays = torch.ones(len(tensors))
    probe = _buffers(0, tensors[0].dtype)
    perturb_cpu(tensors, keys, seeds, scales, decays, dist, "nearest", 0, applied=applied,
                log=probe, count_only=True)
    log = _buffers(int(1.25 * probe.count.item()) + 1024, tensors[0].dtype)
    perturb_cpu(tensors, keys, seeds, scales, decays, dist, "nearest", 0, applied=applied,
                log=log)
    assert log.count.item() == probe.count.item() <= log.capacity
    return log


def _scatter(tensors, keys, log, seeds=(), scales=(), decays=None, dist="gaussian",
             rounding="nearest", rounding_seed=0):
    decays = torch.ones(len(tensors)) if decays is None else decays
    scatter_perturb_cpu(tensors, keys, log.index, log.values, log.count, list(seeds),
                        torch.tensor(list(scales), dtype=torch.float32), decays, dist, rounding,
                        rounding_seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps", [1e-3, 1e-2])
@pytest.mark.parametrize("dist", DISTS)
def test_exact_restore_and_update(dtype, eps, dist):
    """docs/undo-log.md, "How a ZO step uses it": every restore gives theta back bit for bit and
    the update equals an update of the unperturbed weights."""
    sizes = [50_000, 3, 4097, 1027]
    theta = _weights(sizes, dtype, seed=11, nan=True)
    keys, seed, plus, minus = _keys(theta), [4242], torch.tensor([eps]), torch.tensor([-eps])
    zero = torch.tensor([0.0])

    # Failure after pass 1: recover, then scatter L1.
    t = [w.clone() for w in theta]
    l1 = _log_pass(t, keys, seed, plus, dist)
    assert any(not torch.equal(_bits(a), _bits(b)) for a, b in zip(t, theta))
    perturb_cpu(t, keys, seed, zero, torch.ones(len(t)), dist, "nearest", 0, applied=plus)
    _scatter(t, keys, l1)
    for j, (a, b) in enumerate(zip(t, theta)):
        assert_bits_equal(a, b, f"tensor {j} restored after pass 1")

    # Failure after pass 2: recover, scatter L2, then L1.
    t = [w.clone() for w in theta]
    l1 = _log_pass(t, keys, seed, plus, dist)
    l2 = _log_pass(t, keys, seed, minus, dist, applied=plus)
    perturbed = [w.clone() for w in t]
    perturb_cpu(t, keys, seed, zero, torch.ones(len(t)), dist, "nearest", 0, applied=minus)
    _scatter(t, keys, l2)
    _scatter(t, keys, l1)
    for j, (a, b) in enumerate(zip(t, theta)):
        assert_bits_equal(a, b, f"tensor {j} restored after pass 2")

    # Success: the update from the perturbed state, then both logs with the update's noise.
    update_seeds, update_scales = [4242, 77], [-0.3 * eps, 1e-4]
    decays = torch.tensor([0.999, 1.0, 0.5, 0.9])
    for rounding in ("nearest", "stochastic"):
        t = [w.clone() for w in perturbed]
        perturb_cpu(t, keys, update_seeds, torch.tensor(update_scales), decays, dist, rounding, 5,
                    applied=torch.tensor([-eps, 0.0]))
        for log in (l2, l1):
            _scatter(t, keys, log, update_seeds, update_scales, decays, dist, rounding, 5)
        expected = [w.clone() for w in theta]
        perturb_cpu(expected, keys, update_seeds, torch.tensor(update_scales), decays, dist,
                    rounding, 5)
        for j, (a, b) in enumerate(zip(t, expected)):
            assert_bits_equal(a, b, f"tensor {j}: {rounding} update vs unperturbed update")


def test_nan_payloads_and_signs_survive():
    """Without applied= the log keeps the old bit pattern itself (a float32 round trip would
    canonicalize NaN payloads and drop a NaN's sign in bf16)."""
    for dtype, patterns in ((torch.bfloat16, [0xFFC0, 0x7F81, 0xFFFF, 0x8000]),
                            (torch.float16, [0xFE00, 0x7C01, 0xFFFF, 0x8000]),
                            (torch.float32, [0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x80000000])):
        theta = (torch.randn(300) * 0.02).to(dtype)
        bits = torch.tensor(patterns, dtype=torch.int64)
        bits = torch.where(bits >= 2 ** (8 * theta.element_size() - 1),
                           bits - 2 ** (8 * theta.element_size()), bits)
        _bits(theta)[[3, 100, 200, 299]] = bits.to(_bits(theta).dtype)
        t, keys = [theta.clone()], [1]
        log = _log_pass(t, keys, [3], torch.tensor([1e-3]), "gaussian")
        assert set([3, 100, 200, 299]) <= set(log.index[:log.count.item()].tolist())
        perturb_cpu(t, keys, [3], torch.tensor([0.0]), torch.ones(1), "gaussian", "nearest", 0,
                    applied=torch.tensor([1e-3]))
        _scatter(t, keys, log)
        assert_bits_equal(t[0], theta, f"{dtype} with NaN payloads and -0.0")


def test_generic_path_matches_simd_path(tmp_path):
    """ZOKERNELS_CPU_SIMD=generic: the same logs, counts and tensors as the dispatched path."""
    script = (
        "import sys, torch\n"
        "from zokernels.backends.cpu import build_info, perturb_cpu, scatter_perturb_cpu\n"
        "from zokernels.backends.undo_buffers import UndoBuffers\n"
        "out = {'simd': build_info()['simd']}\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    for dist in ('gaussian', 'rademacher'):\n"
        "        g = torch.Generator().manual_seed(1)\n"
        "        ts = [(torch.randn(n, generator=g) * 0.02).to(dtype) for n in (40_001, 4097, 3)]\n"
        "        keys, seeds, ones = [1, 2, 3], [5, 6], torch.ones(3)\n"
        "        perturb_cpu(ts, keys, seeds, torch.tensor([1e-3, -2e-3]), ones, dist, 'nearest', 0)\n"
        "        log = UndoBuffers(torch.zeros(50_000, dtype=torch.int64),\n"
        "                          torch.zeros(50_000, dtype=dtype), torch.zeros(1, dtype=torch.int64))\n"
        "        perturb_cpu(ts, keys, seeds, torch.tensor([-1e-3, 3e-3]), ones, dist, 'nearest', 0,\n"
        "                    applied=torch.tensor([1e-3, -2e-3]), log=log)\n"
        "        used = int(log.count.item())\n"
        "        order = torch.argsort(log.index[:used])\n"
        "        scatter_perturb_cpu(ts, keys, log.index, log.values, log.count, seeds,\n"
        "                            torch.tensor([0.1, -0.2]), torch.tensor([0.9, 1.0, 0.5]), dist,\n"
        "                            'stochastic', 4)\n"
        "        name = f'{dtype} {dist}'\n"
        "        out[name + ' index'] = log.index[:used][order]\n"
        "        out[name + ' values'] = log.values[:used][order]\n"
        "        out[name + ' tensors'] = torch.cat(ts)\n"
        "torch.save(out, sys.argv[1])\n"
    )
    assert_same_in_both_simd_modes(script, tmp_path)


def test_kernels_refuse_a_log_with_decay_or_stochastic_rounding():
    # The kernels' lost-element check assumes the pass wrote round_nearest(theta + D): they refuse
    # anything else themselves (the Python layer refuses it first), writing nothing.
    from zokernels.backends.cpu import lowrank_perturb_cpu

    w = _weights([300], torch.bfloat16)[0]
    before = w.clone()
    for decays, rounding in ((torch.tensor([0.5]), "nearest"), (torch.ones(1), "stochastic")):
        log = _buffers(400, torch.bfloat16)
        with pytest.raises(ValueError, match="a log needs"):
            perturb_cpu([w], [3], [9], torch.tensor([1e-3]), decays, "gaussian", rounding, 5,
                        log=log)
        m = w.view(20, 15)
        u, v, tau = torch.randn(20, 2), torch.randn(15, 2), torch.randn(2)
        with pytest.raises(ValueError, match="a log needs"):
            lowrank_perturb_cpu([m], [u], [v], [tau], torch.tensor([1e-3]), decays, [3], rounding,
                                5, log=log)
        assert_bits_equal(w, before, "refused pass")
        assert log.count.item() == 0
