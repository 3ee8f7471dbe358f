"""Exact restore for the low-rank op (docs/undo-log.md, "Low-rank groups"): recovery
(applied_taus / applied_scale), the undo log of lowrank_perturb_<b>(log=) and lowrank_scatter_<b>,
on every backend.

Bit for bit against the torch reference where the arithmetic is the same: the C++ dense pass and
every backend's scatter compute P = U diag(tau) V^T as the reference's k-ordered, unfused float32
sum. The Triton dense pass uses tl.dot tiles (tf32x3 / tf32 on GPUs, numpy's matmul under the
interpreter), so its D differs from the reference's by the float32 rounding of the product and its
logs lose different elements; Triton is checked against the log's definition with its own D (what
its own recovery misses), end to end (exact restore), and within the tolerance of
tests/test_lowrank.py where its dense D meets the reference's.
"""

import math

import pytest
import torch

import zokernels
from zokernels._dispatch import implementation
from zokernels.backends.undo_buffers import UndoBuffers
from zokernels.ops.lowrank import run_lowrank_scatter
from zokernels.ops.undo import UndoLog

from helpers import assert_bits_equal, assert_close, assert_same_in_both_simd_modes

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One call each: a single element, a wide short weight (rank above m), narrow ones of rank 1 and
# 5, and a mixed list (start offsets of the group-flat index). A few thousand elements at most:
# Triton runs interpreted on CPU.
SHAPE_LISTS = [[(1, 1, 1)], [(3, 1031, 5)], [(33, 7, 1), (33, 7, 5)],
               [(1, 1, 1), (3, 1031, 5), (33, 7, 5)]]
# Exact zeros, -0.0 (always logged), tiny weights (subnormal in some dtype), an infinity. NaN only
# where the reference is not compared (torch converts NaN to bf16 as 0xFFFF, the kernels 0x7FC0).
SPECIALS = [0.0, -0.0, 1e-40, -1e-30, 1e-6, -3e-5, float("inf")]
EPS = 1e-3


def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _problem(shapes, dtype, device, seed=0, nan=False):
    """N(0, 0.02) weights with the special values, TeZO-like factors: U, V ~ N(0, 1),
    tau ~ N(0, 1) / sqrt(r)."""
    generator = torch.Generator().manual_seed(seed)
    specials = SPECIALS + [float("nan")] * nan
    weights, us, vs, taus = [], [], [], []
    for m, n, r in shapes:
        w = torch.randn(m * n, generator=generator) * 0.02
        k = min(m * n, len(specials))
        if m * n > 1:
            w[torch.randperm(m * n, generator=generator)[:k]] = torch.tensor(specials[:k])
        weights.append(w.view(m, n).to(dtype).to(device))
        us.append(torch.randn(m, r, generator=generator).to(device))
        vs.append(torch.randn(n, r, generator=generator).to(device))
        taus.append((torch.randn(r, generator=generator) / r ** 0.5).to(device))
    keys = [11 * j + 4 for j in range(len(shapes))]
    return weights, us, vs, taus, keys


def _buffers(capacity, dtype, device, count=0):
    """A log with sentinel contents (to see what was written)."""
    return UndoBuffers(torch.full((capacity,), -7, dtype=torch.int64, device=device),
                       torch.full((capacity,), 12.5, dtype=dtype, device=device),
                       torch.full((1,), count, dtype=torch.int64, device=device))


def _entries(log, first=0):
    """The log's stored (index, values) from slot `first` on, on the CPU, sorted by index."""
    used = min(int(log.count.item()), log.capacity)
    index, values = log.index[first:used].cpu(), log.values[first:used].cpu()
    order = torch.argsort(index)
    return index[order], values[order]


def _flat(weights):
    return torch.cat([w.reshape(-1).cpu() for w in weights])


def _scalar(value, device):
    return torch.tensor([value], dtype=torch.float32, device=device)


class Backend:
    """One backend's two ops with the scalar arguments as device tensors."""

    def __init__(self, name, device):
        self.name, self.device = name, device
        self.dense = implementation(name, "lowrank_perturb")
        self.scatter_op = implementation(name, "lowrank_scatter")

    def perturb(self, weights, us, vs, taus, keys, scale, *, decays=None, applied=None,
                log=None, count_only=False, rounding="nearest", rounding_seed=0):
        decays = torch.ones(len(weights)) if decays is None else torch.tensor(decays)
        extra = {}
        if applied is not None:
            extra = dict(applied_taus=applied[0], applied_scale=_scalar(applied[1], self.device))
        if log is not None:
            extra.update(log=log, count_only=count_only)
        self.dense(weights, us, vs, taus, _scalar(scale, self.device),
                   decays.to(self.device), keys, rounding, rounding_seed, **extra)

    def scatter(self, weights, us, vs, taus, keys, log, scale=0.0, *, decays=None,
                rounding="nearest", rounding_seed=0):
        decays = torch.ones(len(weights)) if decays is None else torch.tensor(decays)
        self.scatter_op(weights, us, vs, taus, log.index, log.values, log.count,
                        _scalar(scale, self.device), decays.to(self.device), keys, rounding,
                        rounding_seed)


def _capacity(weights):
    return sum(w.numel() for w in weights) + 3


# -- the log's definition, on every backend -------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("applied", [False, True], ids=["plain", "applied"])
def test_log_holds_exactly_what_recovery_misses(any_case, dtype, applied):
    """A logging pass keeps every element whose old value the backend's own later recovery (with
    this pass's scale and taus) does not give back, and no other: the log is right only if that
    recovery computes D1 bit for bit as this pass computed D."""
    backend = Backend(*any_case)
    for s, shapes in enumerate(SHAPE_LISTS):
        weights, us, vs, taus, keys = _problem(shapes, dtype, backend.device, seed=s)
        held_taus = [t * 0.5 + 0.25 for t in taus]  # a different held perturbation
        if applied:
            backend.perturb(weights, us, vs, held_taus, keys, 2 * EPS)
        start = [w.clone() for w in weights]
        # theta_in: what the pass starts from (with recovery: the recovered weights)
        theta = [w.clone() for w in weights]
        if applied:
            backend.perturb(theta, us, vs, taus, keys, 0.0, applied=(held_taus, 2 * EPS))
        log = _buffers(_capacity(weights), dtype, backend.device)
        backend.perturb(weights, us, vs, taus, keys, -EPS, log=log,
                        applied=(held_taus, 2 * EPS) if applied else None)
        # the backend's own recovery of the written weights
        back = [w.clone() for w in weights]
        backend.perturb(back, us, vs, taus, keys, 0.0, applied=(taus, -EPS))

        theta_flat, back_flat = _flat(theta), _flat(back)
        wide = theta_flat.float()
        strict = ((_bits(back_flat) != _bits(theta_flat)) | wide.isnan()
                  | (_bits(wide.contiguous()) == torch.iinfo(torch.int32).min))
        # A zero whose sign the scale-0 pass may change (+-0.0 added) counts either way.
        loose = strict | ((back_flat.float() == 0) & (wide == 0))
        index, values = _entries(log)
        what = f"{any_case} {dtype} applied={applied} {shapes}"
        assert torch.equal(index, index.unique()), what
        in_log = torch.zeros_like(strict)
        in_log[index] = True
        assert not (strict & ~in_log).any(), f"{what}: missed elements not logged"
        assert not (in_log & ~loose).any(), f"{what}: recoverable elements logged"
        if applied:  # the recovered value, compared as a value (recovery may flip a zero's sign)
            assert torch.equal(values.float(), theta_flat[index].float()), what
        else:  # the old bits themselves
            assert_bits_equal(values, _flat(start)[index], f"{what}: logged values")
        if sum(m * n for m, n, _ in shapes) > 1000:
            assert 0 < index.numel() < 0.5 * theta_flat.numel(), what


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restore_after_either_pass_is_bit_exact(any_case, dtype):
    """TeZO's protocol: +eps (log L1); from there recovery to -eps (log L2); a failure after
    either pass is undone by a recovery with scale 0 and the logs copied back, latest first."""
    backend = Backend(*any_case)
    for s, shapes in enumerate(SHAPE_LISTS):
        # NaN bits survive the kernels; torch's own conversions may canonicalize a payload
        weights, us, vs, taus, keys = _problem(shapes, dtype, backend.device, seed=10 + s,
                                               nan=backend.name != "torch")
        exact = [w.clone() for w in weights]
        l1, l2 = (_buffers(_capacity(weights), dtype, backend.device) for _ in range(2))
        what = f"{any_case} {dtype} {shapes}"

        once = [w.clone() for w in weights]
        backend.perturb(once, us, vs, taus, keys, EPS, log=l1)
        backend.perturb(once, us, vs, taus, keys, 0.0, applied=(taus, EPS))
        backend.scatter(once, us, vs, None, keys, l1)
        for j, (w, e) in enumerate(zip(once, exact)):
            assert_bits_equal(w, e, f"{what}: weight {j} after a failure in pass 1")

        backend.perturb(weights, us, vs, taus, keys, EPS, log=l1)
        backend.perturb(weights, us, vs, taus, keys, -EPS, applied=(taus, EPS), log=l2)
        assert int(l1.count) <= l1.capacity and int(l2.count) <= l2.capacity
        backend.perturb(weights, us, vs, taus, keys, 0.0, applied=(taus, -EPS))
        backend.scatter(weights, us, vs, None, keys, l2)
        backend.scatter(weights, us, vs, None, keys, l1)
        for j, (w, e) in enumerate(zip(weights, exact)):
            assert_bits_equal(w, e, f"{what}: weight {j} after a failure in pass 2")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_update_from_perturbed_weights_equals_update_of_theta(any_case, dtype):
    """+eps (L1), -eps (L2), then the update recovering from -eps with scattered logs: the same
    as the update applied to the unperturbed weights. Bit for bit where the scattered D is the
    dense D (torch, cpu); on Triton the elements outside the logs are bit for bit and the logged
    ones (reference D) within tests/test_lowrank.py's tolerance of the dense pass (tl.dot D)."""
    backend = Backend(*any_case)
    for s, shapes in enumerate(SHAPE_LISTS):
        weights, us, vs, taus, keys = _problem(shapes, dtype, backend.device, seed=20 + s)
        update = [t * -0.3 for t in taus]
        decays = [0.9 if j % 2 == 0 else 1.0 for j in range(len(shapes))]
        expected = [w.clone() for w in weights]
        backend.perturb(expected, us, vs, update, keys, 0.5, decays=decays)

        l1, l2 = (_buffers(_capacity(weights), dtype, backend.device) for _ in range(2))
        backend.perturb(weights, us, vs, taus, keys, EPS, log=l1)
        backend.perturb(weights, us, vs, taus, keys, -EPS, applied=(taus, EPS), log=l2)
        backend.perturb(weights, us, vs, update, keys, 0.5, decays=decays, applied=(taus, -EPS))
        backend.scatter(weights, us, vs, update, keys, l2, 0.5, decays=decays)
        backend.scatter(weights, us, vs, update, keys, l1, 0.5, decays=decays)

        what = f"{any_case} {dtype} {shapes}"
        got, want = _flat(weights), _flat(expected)
        if backend.name != "triton":
            assert_bits_equal(got, want, what)
            continue
        logged = torch.zeros(got.numel(), dtype=torch.bool)
        for log in (l1, l2):
            logged[_entries(log)[0]] = True
        assert_bits_equal(got[~logged], want[~logged], f"{what}: elements outside the logs")
        atol = 4e-5 * max(r for _, _, r in shapes) ** 0.5
        assert_close(got[logged], want[logged], atol=atol, ulps=1.0, dtype=dtype,
                     what=f"{what}: logged elements")


# -- bit for bit against the reference ------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("applied", [False, True], ids=["plain", "applied"])
@pytest.mark.parametrize("mode", ["none", "log", "count_only"])
def test_cpu_pass_matches_reference_bit_for_bit(dtype, applied, mode):
    pytest.importorskip("zokernels._C")
    if "cpu" not in zokernels.available_backends():
        pytest.skip("no C++ backend")
    cpu, reference = Backend("cpu", "cpu"), Backend("torch", "cpu")
    for s, shapes in enumerate(SHAPE_LISTS + [[(70, 1500, 8), (5, 3, 2)]]):  # several work items
        weights, us, vs, taus, keys = _problem(shapes, dtype, "cpu", seed=30 + s)
        held_taus = [t * -0.7 for t in taus]
        if applied:
            reference.perturb(weights, us, vs, held_taus, keys, EPS)
        got, expected = [w.clone() for w in weights], [w.clone() for w in weights]
        logs = [_buffers(_capacity(weights), dtype, "cpu") for _ in range(2)]
        decays = None if mode != "none" else [0.75] * len(shapes)
        for backend, ws, log in ((cpu, got, logs[0]), (reference, expected, logs[1])):
            backend.perturb(ws, us, vs, taus, keys, 3 * EPS, decays=decays,
                            applied=(held_taus, EPS) if applied else None,
                            log=None if mode == "none" else log, count_only=mode == "count_only")
        what = f"{dtype} applied={applied} {mode} {shapes}"
        for j, (g, e) in enumerate(zip(got, expected)):
            assert_bits_equal(g, e, f"{what}: weight {j}")
        if mode == "none":
            continue
        assert int(logs[0].count) == int(logs[1].count), what
        if sum(m * n for m, n, _ in shapes) > 1000:
            assert int(logs[0].count) > 0, what
        if mode == "count_only":
            assert (logs[0].index == -7).all() and (logs[0].values == 12.5).all(), what
            for j, (g, w) in enumerate(zip(got, weights)):
                assert_bits_equal(g, w, f"{what}: weight {j} after count-only")
            continue
        got_index, got_values = _entries(logs[0])
        expected_index, expected_values = _entries(logs[1])
        assert torch.equal(got_index, expected_index), what
        assert_bits_equal(got_values, expected_values, f"{what}: values")
        assert (logs[0].index[int(logs[0].count):] == -7).all(), what  # the rest untouched


def test_cpu_stochastic_pass_with_recovery_matches_reference_bit_for_bit():
    if "cpu" not in zokernels.available_backends():
        pytest.skip("no C++ backend")
    cpu, reference = Backend("cpu", "cpu"), Backend("torch", "cpu")
    for dtype in (torch.bfloat16, torch.float16):
        weights, us, vs, taus, keys = _problem([(3, 1031, 5), (33, 7, 1)], dtype, "cpu", seed=4)
        reference.perturb(weights, us, vs, taus, keys, EPS)
        got, expected = [w.clone() for w in weights], [w.clone() for w in weights]
        for backend, ws in ((cpu, got), (reference, expected)):
            backend.perturb(ws, us, vs, [t * 0.1 for t in taus], keys, 1e-4, decays=[0.5, 0.9],
                            applied=(taus, EPS), rounding="stochastic", rounding_seed=2 ** 63 + 9)
        for j, (g, e) in enumerate(zip(got, expected)):
            assert_bits_equal(g, e, f"{dtype} stochastic weight {j}")


def _scatter_case(shapes, dtype, device, seed):
    """Weights, factors, and a log of distinct random indices with random values whose count
    leaves its last entries (up to 3) unused: they name real elements, so using them would show."""
    weights, us, vs, taus, keys = _problem(shapes, dtype, device, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    total = sum(m * n for m, n, _ in shapes)
    entries = min(total, max(4, total // 5))
    index = torch.randperm(total, generator=generator)[:entries]
    values = (torch.randn(entries, generator=generator) * 0.02).to(dtype)
    unused = min(3, entries // 2)
    log = UndoBuffers(index.to(device), values.to(device),
                      torch.tensor([entries - unused], dtype=torch.int64, device=device))
    return weights, us, vs, taus, keys, log


# stochastic rounding acts on 16-bit updates only: no float32 or bit-copy cases for it
SCATTER_CASES = [(dtype, rounding, with_taus) for dtype in DTYPES
                 for rounding in ("nearest", "stochastic") for with_taus in (False, True)
                 if rounding == "nearest" or (dtype != torch.float32 and with_taus)]


@pytest.mark.parametrize("dtype, rounding, with_taus", SCATTER_CASES,
                         ids=[f"{d}-{r}-{'update' if t else 'copy'}" for d, r, t in SCATTER_CASES])
def test_scatter_matches_reference_bit_for_bit(fast_case, dtype, rounding, with_taus):
    """Every backend's scatter computes the reference's k-ordered P: bit for bit, also Triton's."""
    backend, reference = Backend(*fast_case), Backend("torch", "cpu")
    for s, shapes in enumerate(SHAPE_LISTS):
        weights, us, vs, taus, keys, log = _scatter_case(shapes, dtype, backend.device, 40 + s)
        update = [t * 0.7 for t in taus] if with_taus else None
        decays = [1.0 - 0.1 * j for j in range(len(shapes))]
        expected = [w.cpu().clone() for w in weights]
        cpu_log = UndoBuffers(*(t.cpu() for t in log))
        backend.scatter(weights, us, vs, update, keys, log, 0.25, decays=decays,
                        rounding=rounding, rounding_seed=77)
        reference.scatter(expected, [u.cpu() for u in us], [v.cpu() for v in vs],
                          None if update is None else [t.cpu() for t in update], keys, cpu_log,
                          0.25, decays=decays, rounding=rounding, rounding_seed=77)
        what = f"{fast_case} {dtype} {rounding} taus={with_taus} {shapes}"
        assert_bits_equal(_flat(weights), _flat(expected), what)
        # the unused entries were not written
        unused = log.index[int(log.count):].cpu()
        before = _flat(_problem(shapes, dtype, "cpu", seed=40 + s)[0])
        assert_bits_equal(_flat(weights)[unused], before[unused], f"{what}: entries past count")


@pytest.mark.parametrize("dtype, rounding",
                         [(d, r) for d in DTYPES for r in ("nearest", "stochastic")
                          if r == "nearest" or d != torch.float32],  # float32 rounds exactly
                         ids=str)
def test_scatter_update_matches_dense_pass(any_case, dtype, rounding):
    """A scattered entry ends as the dense pass from its logged value would leave it: bit for bit
    on torch and cpu (the same P); on Triton within tests/test_lowrank.py's tolerance (the dense
    pass's tl.dot P), one ulp at most."""
    backend = Backend(*any_case)
    for s, shapes in enumerate(SHAPE_LISTS):
        weights, us, vs, taus, keys, log = _scatter_case(shapes, dtype, backend.device, 50 + s)
        # the log's values are the weights themselves: then the dense pass is the reference
        flat = torch.cat([w.reshape(-1) for w in weights])
        log.values.copy_(flat[log.index])
        decays = [0.8] * len(shapes)
        dense = [w.clone() for w in weights]
        backend.perturb(dense, us, vs, taus, keys, 2.0, decays=decays, rounding=rounding,
                        rounding_seed=5)
        backend.scatter(weights, us, vs, taus, keys, log, 2.0, decays=decays, rounding=rounding,
                        rounding_seed=5)
        used = log.index[:int(log.count)].cpu()
        got, want = _flat(weights)[used], _flat(dense)[used]
        what = f"{any_case} {dtype} {rounding} {shapes}"
        if backend.name != "triton":
            assert_bits_equal(got, want, what)
        else:
            atol = 4e-5 * max(r for _, _, r in shapes) ** 0.5 * 2.0
            assert_close(got, want, atol=atol, ulps=1.0, dtype=dtype, what=what)


def test_cpu_scatter_refuses_indices_outside_the_weights():
    if "cpu" not in zokernels.available_backends():
        pytest.skip("no C++ backend")
    weights, us, vs, _, keys = _problem([(3, 5, 2), (2, 2, 1)], torch.float32, "cpu", seed=8)
    log = UndoBuffers(torch.tensor([1, 19, -2, 17]), torch.tensor([7.0, 8.0, 9.0, 10.0]),
                      torch.tensor([4]))
    with pytest.raises(ValueError, match="2 log indices outside"):
        Backend("cpu", "cpu").scatter(weights, us, vs, None, keys, log)
    assert weights[0].view(-1)[1] == 7.0 and weights[1].view(-1)[2] == 10.0  # the others written


# -- count only, overflow, offsets ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("applied", [False, True], ids=["plain", "applied"])
def test_count_only_and_overflow(any_case, dtype, applied):
    backend = Backend(*any_case)
    shapes = [(3, 1031, 5), (33, 7, 1)]
    start, us, vs, taus, keys = _problem(shapes, dtype, backend.device, seed=60)
    held = (taus, EPS) if applied else None
    if applied:
        backend.perturb(start, us, vs, taus, keys, EPS)
    args = (us, vs, [t * 1.5 for t in taus], keys, -EPS)

    full, full_log = [w.clone() for w in start], _buffers(_capacity(start), dtype, backend.device)
    backend.perturb(full, *args, applied=held, log=full_log)
    count = int(full_log.count)
    full_index, full_values = _entries(full_log)
    assert count > 30 and torch.equal(full_index, full_index.unique())

    # Overflow: everything counted, `capacity` genuine entries stored, weights as before.
    capacity = count // 3
    small, small_log = [w.clone() for w in start], _buffers(capacity, dtype, backend.device)
    backend.perturb(small, *args, applied=held, log=small_log)
    assert int(small_log.count) == count
    index, values = _entries(small_log)
    assert index.numel() == capacity and torch.equal(index, index.unique())
    where = torch.searchsorted(full_index, index)
    assert torch.equal(full_index[where], index)
    assert_bits_equal(values, full_values[where], "overflowed entries")
    for j, (s, f) in enumerate(zip(small, full)):
        assert_bits_equal(s, f, f"weight {j} with an overflowing log")

    # The count is added to: slots before the old count are not touched.
    offset = 5
    added_log = _buffers(count + 10, dtype, backend.device, count=offset)
    backend.perturb([w.clone() for w in start], *args, applied=held, log=added_log)
    assert int(added_log.count) == count + offset
    assert (added_log.index[:offset] == -7).all()
    index, values = _entries(added_log, first=offset)
    assert torch.equal(index, full_index)
    assert_bits_equal(values, full_values, "entries after an offset")

    # Count only: nothing written but the count.
    probed, probe = [w.clone() for w in start], _buffers(16, dtype, backend.device)
    backend.perturb(probed, *args, applied=held, log=probe, count_only=True)
    assert int(probe.count) == count
    assert (probe.index == -7).all() and (probe.values == 12.5).all()
    for j, (p, s) in enumerate(zip(probed, start)):
        assert_bits_equal(p, s, f"weight {j} after count-only")


# -- the public op and its run functions ----------------------------------------------------------

def test_public_op_with_undo_log_restores_mixed_groups(any_case):
    """lowrank_perturb_(log=UndoLog) over weights of two dtypes (two groups, the factors picked by
    position) and run_lowrank_scatter: an exact restore; the log's probe and bytes."""
    backend, device = any_case
    shapes = [(3, 1031, 5), (33, 7, 1), (40, 20, 3)]
    weights, us, vs, taus, keys = _problem(shapes, torch.float32, device, seed=70)
    weights[1] = weights[1].to(torch.bfloat16)
    exact = [w.clone() for w in weights]
    ones = torch.ones(len(weights))
    logs = UndoLog(), UndoLog()
    common = dict(keys=keys, backend=backend)
    zokernels.lowrank_perturb_(weights, us, vs, taus, scale=EPS, log=logs[0], **common)
    assert logs[0].probes == 1 and sum(logs[0].counts()) > 0
    zokernels.lowrank_perturb_(weights, us, vs, taus, scale=-EPS, applied_scale=EPS,
                               applied_taus=taus, log=logs[1], **common)
    zokernels.lowrank_perturb_(weights, us, vs, taus, scale=0.0, applied_scale=-EPS,
                               applied_taus=taus, **common)
    for log in reversed(logs):
        run_lowrank_scatter(log, us, vs, None, torch.zeros(1), ones)
    for j, (w, e) in enumerate(zip(weights, exact)):
        assert_bits_equal(w, e, f"{any_case} weight {j}")
    assert logs[0].nbytes > 0 and not logs[0].check()


def _validation_problem():
    w = [torch.randn(6, 5), torch.randn(4, 5).to(torch.float16)]
    u = [torch.randn(6, 2), torch.randn(4, 3)]
    v = [torch.randn(5, 2), torch.randn(5, 3)]
    tau = [torch.randn(2), torch.randn(3)]
    return w, u, v, tau


BAD_CALLS = [
    ("scale without taus", dict(applied_scale=0.1), ValueError, "applied_scale and applied_taus"),
    ("taus without scale", dict(applied_taus="taus"), ValueError, "applied_scale and applied_taus"),
    ("applied tau shape", dict(applied_scale=0.1, applied_taus="short"), ValueError,
     "applied_taus[1]"),
    ("applied tau count", dict(applied_scale=0.1, applied_taus="one"), ValueError, "applied_taus"),
    ("nan applied scale", dict(applied_scale=float("nan"), applied_taus="taus"), ValueError,
     "applied_scale"),
    ("applied tau aliases weight", dict(applied_scale=0.1, applied_taus="alias"), ValueError,
     "shares memory"),
    ("log not an UndoLog", dict(log="log"), TypeError, "UndoLog"),
    ("log with decay", dict(log=UndoLog(), decay=0.5), ValueError, "decay=1.0"),
    ("log with stochastic rounding", dict(log=UndoLog(), rounding="stochastic", rounding_seed=1),
     ValueError, "rounding='nearest'"),
]


@pytest.mark.parametrize("bad", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_recovery_or_log_arguments_are_refused_before_writing(bad):
    _, kwargs, error, words = bad
    w, u, v, tau = _validation_problem()
    before = [_bits(x).clone() for x in w]
    choices = {"taus": tau, "short": [tau[0], tau[1][:2]], "one": tau[:1],
               "alias": [w[0].view(-1)[:2], tau[1]]}
    kwargs = {k: choices.get(x, x) if isinstance(x, str) and k != "log" else x
              for k, x in kwargs.items()}
    with pytest.raises(error) as info:
        zokernels.lowrank_perturb_(w, u, v, tau, **kwargs)
    assert words in str(info.value), str(info.value)
    for x, b in zip(w, before):
        assert torch.equal(_bits(x), b)


def test_cpu_log_and_scatter_same_in_both_simd_modes(tmp_path):
    if "cpu" not in zokernels.available_backends():
        pytest.skip("no C++ backend")
    script = """
import sys, torch
from zokernels.backends.cpu import build_info, lowrank_perturb_cpu, lowrank_scatter_cpu
from zokernels.backends.undo_buffers import UndoBuffers
g = torch.Generator().manual_seed(0)
out = {"simd": build_info()["simd"]}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    w = [(torch.randn(70, 1500, generator=g) * 0.02).to(dtype),
         torch.randn(5, 3, generator=g).to(dtype)]
    us = [torch.randn(70, 8, generator=g), torch.randn(5, 2, generator=g)]
    vs = [torch.randn(1500, 8, generator=g), torch.randn(3, 2, generator=g)]
    taus = [torch.randn(8, generator=g), torch.randn(2, generator=g)]
    ones, eps = torch.ones(2), torch.tensor([1e-3])
    log = UndoBuffers(torch.zeros(110000, dtype=torch.int64), torch.zeros(110000, dtype=dtype),
                      torch.zeros(1, dtype=torch.int64))
    lowrank_perturb_cpu(w, us, vs, taus, eps, ones, [1, 2], "nearest", 0, log=log)
    lowrank_perturb_cpu(w, us, vs, taus, -eps, ones, [1, 2], "nearest", 0, applied_taus=taus,
                        applied_scale=eps)
    order = torch.argsort(log.index[:int(log.count)])
    out[f"index {dtype}"] = log.index[:int(log.count)][order]
    out[f"values {dtype}"] = log.values[:int(log.count)][order]
    lowrank_scatter_cpu(w, us, vs, [t * 0.5 for t in taus], log.index, log.values, log.count,
                        torch.tensor([0.3]), torch.tensor([0.9, 1.0]), [1, 2], "stochastic", 3)
    out[f"weights {dtype}"] = torch.cat([x.reshape(-1) for x in w])
torch.save(out, sys.argv[1])
"""
    assert_same_in_both_simd_modes(script, tmp_path)


def test_log_sizes_for_tezo_like_weights():
    """The fraction of a low-rank pass's lost elements (what a log costs): N(0, 0.02) bf16 weights
    and a unit-variance low-rank Z (TeZO's scaling) at eps = 1e-3 lose a few percent, as
    perturb_'s gaussian z does (docs/undo-log.md)."""
    backend = Backend("cpu" if "cpu" in zokernels.available_backends() else "torch", "cpu")
    generator = torch.Generator().manual_seed(1)
    m, n, r = 256, 512, 8
    for dtype, low, high in ((torch.bfloat16, 0.01, 0.08), (torch.float32, 0.01, 0.12)):
        w = [(torch.randn(m, n, generator=generator) * 0.02).to(dtype)]
        us, vs = [torch.randn(m, r, generator=generator)], [torch.randn(n, r, generator=generator)]
        taus = [torch.randn(r, generator=generator) / math.sqrt(r)]
        log = _buffers(m * n, dtype, "cpu")
        backend.perturb(w, us, vs, taus, [0], EPS, log=log, count_only=True)
        fraction = int(log.count) / (m * n)
        assert low < fraction < high, (dtype, fraction)
