"""Selector logs for the low-rank op (docs/undo-log.md, "Low-rank groups"): lowrank_perturb_<b>
(selector_log=, held_log=) on cpu and torch, in the dense pass's format (blocks of 1024 elements
of each weight's flat index, the weights' blocks in list order). The C++ kernel against the
torch reference bit for bit (weights and logs), exact restores and updates, count-only probes,
the overflow policy, and the public op's checks."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bits_equal, selector_pool_offset

import zokernels
from zokernels.backends.cpu.lowrank import lowrank_perturb_cpu
from zokernels.backends.torch.lowrank import lowrank_perturb_torch
from zokernels.backends.torch.selector_log import n_blocks
from zokernels.backends.undo_buffers import SelectorBuffers
from zokernels.ops.undo import SelectorLog, UndoLog
from test_lowrank_undo import _problem

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BACKENDS = {"torch": lowrank_perturb_torch, "cpu": lowrank_perturb_cpu}
EPS = 1e-3
# (m, n, r) per weight: rows that straddle blocks (1031, 77 columns), a block holding rows of
# several weights' neighbours (33 x 7), a weight of 70000 elements (three C++ work items: the
# threads share its blocks), and a single element.
SHAPES = [(1, 1, 1), (3, 1031, 5), (33, 7, 2), (40, 77, 8), (70, 1000, 4)]

pytestmark = pytest.mark.skipif("cpu" not in zokernels.available_backends(),
                                reason="no C++ backend")


def _buffers(weights, words: int = 6, capacity: int = 1 << 16) -> SelectorBuffers:
    rows = sum(n_blocks(w.numel()) for w in weights)
    return SelectorBuffers(torch.full((rows, words), 12345, dtype=torch.int32),
                           torch.zeros(capacity, dtype=torch.int32),
                           torch.zeros(1, dtype=torch.int64))


def _streams(log: SelectorBuffers) -> list[list]:
    """Each block's row, a spilled block's replaced by its pool words. The spilled blocks' runs
    are contiguous in the pool, in an order that depends on the threads: a run ends where the
    next one (by offset) starts, the last at count."""
    rows = log.regions.tolist()
    offsets = [selector_pool_offset(row[0]) for row in rows]
    starts = sorted(o for o in offsets if o is not None) + [int(log.count)]
    end = {a: b for a, b in zip(starts[:-1], starts[1:])}
    return [row if o is None else ["pool"] + log.pool[o:end[o]].tolist()
            for row, o in zip(rows, offsets)]


def _s(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32)


def _step_passes(fn, weights, us, vs, taus, keys, update=None):
    """+eps P logged into L1; -eps P from the exact theta (reading L1) logged into L2; then
    either a restore (scale 0) or `update` = (taus, scale, decays, rounding) reading L2.
    Returns the weights after the two perturbations and the logs."""
    ones = torch.ones(len(weights))
    l1, l2 = _buffers(weights), _buffers(weights)
    fn(weights, us, vs, taus, _s(EPS), ones, keys, "nearest", 0, selector_log=l1)
    plus = [w.clone() for w in weights]
    fn(weights, us, vs, taus, _s(-EPS), ones, keys, "nearest", 0, applied_taus=taus,
       applied_scale=_s(EPS), held_log=l1, selector_log=l2)
    minus = [w.clone() for w in weights]
    if update is None:
        fn(weights, us, vs, taus, _s(0.0), ones, keys, "nearest", 0, applied_taus=taus,
           applied_scale=_s(-EPS), held_log=l2)
    else:
        new_taus, scale, decays, rounding = update
        fn(weights, us, vs, new_taus, _s(scale), decays, keys, rounding, 17, applied_taus=taus,
           applied_scale=_s(-EPS), held_log=l2)
    return plus, minus, l1, l2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_equals_reference_weights_and_logs(dtype):
    """Both backends compute P in the same k order: every pass writes the same bits and the
    same selectors (rows, pool words, counts), and the -eps pass is round(theta - eps P)."""
    runs = {}
    for name, fn in BACKENDS.items():
        weights, us, vs, taus, keys = _problem(SHAPES, dtype, "cpu", seed=3)
        original = [w.clone() for w in weights]
        runs[name] = _step_passes(fn, weights, us, vs, taus, keys)
        for j, (a, b) in enumerate(zip(weights, original)):
            assert_bits_equal(a, b, f"{name} restore weight {j}")
        direct = [w.clone() for w in original]
        fn(direct, us, vs, taus, _s(-EPS), torch.ones(len(direct)), keys, "nearest", 0)
        for j, (a, b) in enumerate(zip(runs[name][1], direct)):
            assert_bits_equal(a, b, f"{name} -eps weight {j} vs a pass from theta")
    (p_ref, m_ref, l1_ref, l2_ref), (p_cpu, m_cpu, l1_cpu, l2_cpu) = runs["torch"], runs["cpu"]
    for j, (a, b) in enumerate(zip(p_cpu + m_cpu, p_ref + m_ref)):
        assert_bits_equal(a, b, f"cpu vs torch, weight {j % len(SHAPES)}")
    assert _streams(l1_cpu) == _streams(l1_ref)
    assert _streams(l2_cpu) == _streams(l2_ref)
    assert int(l1_cpu.count) == int(l1_ref.count) and int(l2_cpu.count) == int(l2_ref.count)
    assert int(l1_cpu.count) > 0  # the zeros and tiny values spilled to the pool


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restore_gives_back_every_pattern(backend, dtype):
    """Zeros, -0.0, subnormals, infinities and NaN payloads, after either pass."""
    fn = BACKENDS[backend]
    weights, us, vs, taus, keys = _problem(SHAPES, dtype, "cpu", seed=4, nan=True)
    original = [w.clone() for w in weights]
    _step_passes(fn, weights, us, vs, taus, keys)
    for j, (a, b) in enumerate(zip(weights, original)):
        assert_bits_equal(a, b, f"restore after pass 2, weight {j}")
    ones = torch.ones(len(weights))
    log = _buffers(weights)
    fn(weights, us, vs, taus, _s(EPS), ones, keys, "nearest", 0, selector_log=log)
    fn(weights, us, vs, taus, _s(0.0), ones, keys, "nearest", 0, applied_taus=taus,
       applied_scale=_s(EPS), held_log=log)
    for j, (a, b) in enumerate(zip(weights, original)):
        assert_bits_equal(a, b, f"restore after pass 1, weight {j}")


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_update_reading_the_log_is_the_update_of_theta(backend, dtype):
    """An update (decays, stochastic rounding in 16-bit) recovering from the -eps pass's log
    writes what the same update of the unperturbed weights writes, bit for bit."""
    fn = BACKENDS[backend]
    weights, us, vs, taus, keys = _problem(SHAPES, dtype, "cpu", seed=5)
    rounding = "nearest" if dtype == torch.float32 else "stochastic"
    decays = torch.tensor([0.9, 1.0, 0.5, 1.0, 0.99])
    new_taus = [0.3 * t for t in taus]
    expected = [w.clone() for w in weights]
    fn(expected, us, vs, new_taus, _s(0.25), decays, keys, rounding, 17)
    _step_passes(fn, weights, us, vs, taus, keys, update=(new_taus, 0.25, decays, rounding))
    for j, (a, b) in enumerate(zip(weights, expected)):
        assert_bits_equal(a, b, f"update of weight {j}")


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_count_only_writes_nothing_and_counts_the_pool_words(backend, dtype):
    fn = BACKENDS[backend]
    weights, us, vs, taus, keys = _problem(SHAPES, dtype, "cpu", seed=6)
    before = [w.clone() for w in weights]
    ones = torch.ones(len(weights))
    probe = _buffers(weights, capacity=0)
    fn(weights, us, vs, taus, _s(EPS), ones, keys, "nearest", 0, selector_log=probe,
       count_only=True)
    for j, (a, b) in enumerate(zip(weights, before)):
        assert_bits_equal(a, b, f"count-only pass, weight {j}")
    assert (probe.regions == 12345).all()
    real = _buffers(weights)
    fn(weights, us, vs, taus, _s(EPS), ones, keys, "nearest", 0, selector_log=real)
    assert int(probe.count) == int(real.count) > 0


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_overflow_loses_whole_blocks_to_recovery(backend):
    """A pool without room: spilled blocks are marked lost (header -1) and recovered as
    applied= alone recovers them; every other block is exact."""
    fn = BACKENDS[backend]
    dtype = torch.bfloat16
    weights, us, vs, taus, keys = _problem(SHAPES, dtype, "cpu", seed=7)
    original = [w.clone() for w in weights]
    ones = torch.ones(len(weights))
    log = _buffers(weights, words=2, capacity=0)
    fn(weights, us, vs, taus, _s(EPS), ones, keys, "nearest", 0, selector_log=log)
    recovered = [w.clone() for w in weights]
    fn(recovered, us, vs, taus, _s(0.0), ones, keys, "nearest", 0, applied_taus=taus,
       applied_scale=_s(EPS))
    fn(weights, us, vs, taus, _s(0.0), ones, keys, "nearest", 0, applied_taus=taus,
       applied_scale=_s(EPS), held_log=log)
    lost = log.regions[:, 0] == -1
    assert bool(lost.any()) and not bool(lost.all()) and int(log.count) > 0
    row = 0
    for j, (w, theta, rec) in enumerate(zip(weights, original, recovered)):
        flat, theta, rec = w.view(-1), theta.view(-1), rec.view(-1)
        for b in range(n_blocks(flat.numel())):
            part = slice(b * 1024, (b + 1) * 1024)
            was_lost = bool(lost[row])
            expected = rec[part] if was_lost else theta[part]
            assert_bits_equal(flat[part], expected, f"weight {j} block {b} (lost: {was_lost})")
            row += 1


def test_public_op_sizes_reads_and_checks_its_logs():
    """lowrank_perturb_(log=SelectorLog) probes the pool's size first; held_log= restores
    exactly; bad logs are refused naming the argument, before anything is written."""
    weights, us, vs, taus, keys = _problem([(40, 77, 8), (5, 3000, 3)], torch.bfloat16, "cpu",
                                           seed=8)
    original = [w.clone() for w in weights]
    log = SelectorLog()
    zokernels.lowrank_perturb_(weights, us, vs, taus, scale=EPS, keys=keys, log=log)
    assert log.probes == 1 and log.nbytes > 0
    perturbed = [w.clone() for w in weights]
    refusals = [
        (ValueError, "applied_scale and applied_taus",
         dict(scale=0.0, held_log=log)),
        (TypeError, "held_log must be a SelectorLog",
         dict(scale=0.0, applied_scale=EPS, applied_taus=taus, held_log=UndoLog())),
        (ValueError, "cannot overwrite the log it reads",
         dict(scale=0.0, applied_scale=EPS, applied_taus=taus, held_log=log, log=log)),
        (ValueError, "log needs rounding='nearest'",
         dict(scale=-EPS, applied_scale=EPS, applied_taus=taus, log=SelectorLog(),
              rounding="stochastic", rounding_seed=3)),
    ]
    for error, message, kwargs in refusals:
        with pytest.raises(error, match=message):
            zokernels.lowrank_perturb_(weights, us, vs, kwargs.pop("taus", taus), keys=keys,
                                       **kwargs)
    with pytest.raises(ValueError, match="not written by a pass over these weights"):
        zokernels.lowrank_perturb_(weights[:1], us[:1], vs[:1], taus[:1], scale=0.0,
                                   keys=keys[:1], applied_scale=EPS, applied_taus=taus[:1],
                                   held_log=log)
    for j, (a, b) in enumerate(zip(weights, perturbed)):
        assert_bits_equal(a, b, f"after the refused calls, weight {j}")
    zokernels.lowrank_perturb_(weights, us, vs, taus, scale=0.0, keys=keys, applied_scale=EPS,
                               applied_taus=taus, held_log=log)
    for j, (a, b) in enumerate(zip(weights, original)):
        assert_bits_equal(a, b, f"restored weight {j}")


def _sums_near_half_way(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta, d) with sums at, next to and between ties. 16-bit dtypes: every finite pattern,
    and for each j in {-1, 0, 1}, k in {-3 .. 3} the d (float32) for which float32(theta) + d is
    exact and lies j of theta's steps away, k float32 steps from half-way between two values of
    the dtype (j = -1 from a power of two lands in the binade below). float32: every exponent
    field with edge and random mantissas, d = (j + 1/2 + k / 1024) theta's spacings for j in
    {-2 .. 1}, k in {-2 .. 2}, so that theta + d is a tie of float32 for k = 0 (and overflows
    near the top)."""
    if dtype == torch.float32:
        g = torch.Generator().manual_seed(8)
        exponent = torch.arange(1, 255, dtype=torch.int64)
        mantissa = torch.cat([torch.tensor([0, 1, 2, 3, (1 << 23) - 2, (1 << 23) - 1]),
                              torch.randint(1 << 23, (4,), generator=g)])
        sign = torch.tensor([0, 1 << 31], dtype=torch.int64)
        bits = (sign[:, None, None] | exponent[None, :, None] << 23 | mantissa[None, None, :])
        base = bits.reshape(-1).to(torch.int32).view(torch.float32).to(torch.float64)
        spacing = torch.exp2(exponent.to(torch.float64) - 150).repeat_interleave(len(mantissa))
        spacing = spacing.repeat(2) * torch.sign(base)
        steps = torch.tensor([j + 0.5 + k / 1024 for j in range(-2, 2) for k in range(-2, 3)],
                             dtype=torch.float64)
        d = (spacing[:, None] * steps[None, :]).to(torch.float32)
        theta = base.to(torch.float32)[:, None].expand_as(d).reshape(-1, 1).contiguous()
        return theta, d.reshape(-1)
    below = 16 if dtype == torch.bfloat16 else 13  # float32 bits below the dtype's mantissa
    patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    theta = patterns[torch.isfinite(patterns.float())]
    t32 = theta.float().view(torch.int32).to(torch.int64)
    t32 = t32[(t32 & ((1 << below) - 1)) == 0]  # fp16 subnormals are not on that grid: skipped
    offsets = [j << below | ((1 << (below - 1)) + k) for j in (-1, 0, 1) for k in range(-3, 4)]
    step = torch.tensor(offsets, dtype=torch.int64)
    negative = (t32 >> 31) & 1
    magnitude = t32 & 0x7FFFFFFF
    # move away from zero for j > 0 on either sign: add to the magnitude
    target = (magnitude[:, None] + step[None, :]).clamp(0, 0x7F7FFFFF) | (negative[:, None] << 31)
    target = target.to(torch.int32).view(torch.float32).to(torch.float64)
    base = t32.to(torch.int32).view(torch.float32).to(torch.float64)
    d = (target - base[:, None]).to(torch.float32)
    theta = base.to(dtype)[:, None].expand_as(d).reshape(-1, 1).contiguous()
    return theta, d.reshape(-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_writer_test_matches_the_reader_at_near_half_way_sums(dtype):
    """The C++ writer proves most elements unkept from theta and its sum (selector_log.h,
    flag_written) instead of recomputing the reader's r = round(y - d) and its images. At sums
    at and next to ties (every finite 16-bit pattern; every float32 exponent), its stream must
    still be the reference's, and a restore must give theta back exactly."""
    theta, d = _sums_near_half_way(dtype)
    runs = {}
    for name, fn in BACKENDS.items():
        w = theta.clone()
        log = _buffers([w], words=8, capacity=1 << 20)
        us, vs, taus = [d[:, None].clone()], [torch.ones(1, 1)], [torch.ones(1)]
        fn([w], us, vs, taus, _s(1.0), torch.ones(1), [5], "nearest", 0, selector_log=log)
        assert_bits_equal(w, (theta.float() + d[:, None]).to(dtype), f"{name}: round(theta + d)")
        runs[name] = _streams(log), int(log.count)
    assert runs["cpu"] == runs["torch"]
    # the C++ reader of that log (the reference's is slow at this size; tested on its own above)
    fn([w], us, vs, taus, _s(0.0), torch.ones(1), [5], "nearest", 0, applied_taus=taus,
       applied_scale=_s(1.0), held_log=log)
    assert_bits_equal(w, theta, "cpu: restore")
