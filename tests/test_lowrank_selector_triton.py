"""Selector logs of the Triton low-rank op (zokernels/backends/triton/lowrank.py,
``_lowrank_selector_kernel``) against the torch reference (backends/torch/lowrank.py): a selector
pass sums P in the reference's k order, so the weights it writes and its logs (rows, headers,
per-block bit strings, pool words, counts) are the reference's bit for bit; exact restores and
updates through held_log=, count-only probes, the public op and TeZO(probe="inplace") with lr=0
on backend="triton" (docs/undo-log.md, "Low-rank groups")."""

from __future__ import annotations

import pytest
import torch
from helpers import (assert_bits_equal, assert_interrupted_step_leaves_weights, assert_same,
                     snapshot)

import zokernels
from zokernels.backends.torch.lowrank import lowrank_perturb_torch
from zokernels.backends.triton.lowrank import lowrank_perturb_triton
from zokernels.ops.undo import SelectorLog, UndoLog
from zokernels.optim import TeZO
from test_lowrank_selector import _buffers, _s, _step_passes, _streams
from test_lowrank_undo import _problem

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
EPS = 1e-3
# (m, n, r): a tail block smaller than a row of the table (3 x 5), rows straddling blocks
# (33 x 40: 1320 elements, two blocks), exactly three blocks (64 x 48) and a single element.
SHAPES = [(3, 5, 2), (33, 40, 3), (64, 48, 4), (1, 1, 1)]
# binade edges of each dtype beside the zeros and subnormals of _problem's specials
EDGES = {torch.bfloat16: [2.0 ** -126, 2.0 ** -127, 0.0078125, -0.015625, 1.9921875],
         torch.float16: [2.0 ** -14, 2.0 ** -15, 2.0 ** -24, -0.0078125, 65504.0],
         torch.float32: [2.0 ** -126, 2.0 ** -149, 0.0078125, -0.015625, 1.99999988079071]}


def _weights(dtype: torch.dtype, seed: int, nan: bool = False):
    weights, us, vs, taus, keys = _problem(SHAPES, dtype, "cpu", seed=seed, nan=nan)
    edges = torch.tensor(EDGES[dtype]).to(dtype)
    for w in weights[1:3]:  # zeros, -0.0 and subnormals from _problem; binade edges here
        flat = w.view(-1)
        flat[-len(edges):] = edges
        flat[100:140] = 0.0  # a run of zeros: a block whose bits spill to the pool
    return weights, us, vs, taus, keys


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_equals_reference_weights_and_logs(dtype):
    """+eps logged, -eps recovering from the log and logged, restore reading the second log: the
    weights after every pass and both logs equal the reference's; the restore is exact."""
    runs = {}
    for name, fn in (("torch", lowrank_perturb_torch), ("triton", lowrank_perturb_triton)):
        weights, us, vs, taus, keys = _weights(dtype, seed=3)
        original = [w.clone() for w in weights]
        runs[name] = _step_passes(fn, weights, us, vs, taus, keys)
        for j, (a, b) in enumerate(zip(weights, original)):
            assert_bits_equal(a, b, f"{name} restore, weight {j}")
    (p_ref, m_ref, l1_ref, l2_ref), (p_tri, m_tri, l1_tri, l2_tri) = runs["torch"], runs["triton"]
    for j, (a, b) in enumerate(zip(p_tri + m_tri, p_ref + m_ref)):
        assert_bits_equal(a, b, f"triton vs torch, pass {1 + j // len(SHAPES)} weight "
                                f"{j % len(SHAPES)}")
    assert _streams(l1_tri) == _streams(l1_ref)
    assert _streams(l2_tri) == _streams(l2_ref)
    assert int(l1_tri.count) == int(l1_ref.count) and int(l2_tri.count) == int(l2_ref.count)
    assert int(l1_tri.count) > 0  # the pool was used


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_unused_pool_keeps_the_reference_layout(dtype):
    """With a pool nobody needs (a small eps on weights without zeros), the regions are the
    reference's word for word, headers included, and the pool is untouched."""
    runs = []
    for fn in (lowrank_perturb_torch, lowrank_perturb_triton):
        weights, us, vs, taus, keys = _problem(SHAPES[:3], dtype, "cpu", seed=9)
        weights = [torch.where(w == 0, 0.01, w).clamp(-1, 1).to(dtype) for w in weights]
        log = _buffers(weights, words=8)
        fn(weights, us, vs, taus, _s(1e-4), torch.ones(len(weights)), keys, "nearest", 0,
           selector_log=log)
        runs.append(log)
    ref, tri = runs
    assert int(ref.count) == 0 and int(tri.count) == 0
    assert torch.equal(tri.regions, ref.regions) and (tri.pool == 0).all()
    assert bool((ref.regions[:, 1:] != 0).any())  # some selectors were written


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restore_gives_back_every_pattern(dtype):
    """Zeros, -0.0, subnormals, binade edges, infinities and NaN payloads, after either pass."""
    weights, us, vs, taus, keys = _weights(dtype, seed=4, nan=True)
    original = [w.clone() for w in weights]
    _step_passes(lowrank_perturb_triton, weights, us, vs, taus, keys)
    for j, (a, b) in enumerate(zip(weights, original)):
        assert_bits_equal(a, b, f"restore after pass 2, weight {j}")
    ones = torch.ones(len(weights))
    log = _buffers(weights)
    lowrank_perturb_triton(weights, us, vs, taus, _s(EPS), ones, keys, "nearest", 0,
                           selector_log=log)
    assert any(not torch.equal(a, b) for a, b in zip(weights, original))
    lowrank_perturb_triton(weights, us, vs, taus, _s(0.0), ones, keys, "nearest", 0,
                           applied_taus=taus, applied_scale=_s(EPS), held_log=log)
    for j, (a, b) in enumerate(zip(weights, original)):
        assert_bits_equal(a, b, f"restore after pass 1, weight {j}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_update_reading_the_log_is_the_reference_update_of_theta(dtype):
    """An update (decays; stochastic rounding in 16-bit) recovering from the -eps pass's log
    writes what the reference's update of the unperturbed weights writes, bit for bit."""
    weights, us, vs, taus, keys = _weights(dtype, seed=5)
    rounding = "nearest" if dtype == torch.float32 else "stochastic"
    decays = torch.tensor([0.9, 1.0, 0.5, 1.0])
    new_taus = [0.3 * t for t in taus]
    expected = [w.clone() for w in weights]
    lowrank_perturb_torch(expected, us, vs, new_taus, _s(0.25), decays, keys, rounding, 17)
    _step_passes(lowrank_perturb_triton, weights, us, vs, taus, keys,
                 update=(new_taus, 0.25, decays, rounding))
    for j, (a, b) in enumerate(zip(weights, expected)):
        assert_bits_equal(a, b, f"update of weight {j}")


def test_count_only_writes_nothing_and_counts_the_pool_words():
    dtype = torch.bfloat16
    weights, us, vs, taus, keys = _weights(dtype, seed=6)
    before = [w.clone() for w in weights]
    ones = torch.ones(len(weights))
    probe = _buffers(weights, capacity=0)
    lowrank_perturb_triton(weights, us, vs, taus, _s(EPS), ones, keys, "nearest", 0,
                           selector_log=probe, count_only=True)
    for j, (a, b) in enumerate(zip(weights, before)):
        assert_bits_equal(a, b, f"count-only pass, weight {j}")
    assert (probe.regions == 12345).all()
    real = _buffers(weights)
    lowrank_perturb_triton(weights, us, vs, taus, _s(EPS), ones, keys, "nearest", 0,
                           selector_log=real)
    reference = _buffers(before)
    lowrank_perturb_torch(before, us, vs, taus, _s(EPS), ones, keys, "nearest", 0,
                          selector_log=reference, count_only=True)
    assert int(probe.count) == int(real.count) == int(reference.count) > 0


def test_public_op_logs_and_restores_on_triton():
    """lowrank_perturb_(log=SelectorLog, backend="triton") probes and writes the log; held_log=
    restores exactly; a selector pass refuses an undo log beside it, before writing anything."""
    weights, us, vs, taus, keys = _problem([(33, 40, 3), (5, 300, 2)], torch.bfloat16, "cpu",
                                           seed=8)
    original = [w.clone() for w in weights]
    log = SelectorLog()
    zokernels.lowrank_perturb_(weights, us, vs, taus, scale=EPS, keys=keys, log=log,
                               backend="triton")
    assert log.probes == 1 and log.nbytes > 0
    assert any(not torch.equal(a, b) for a, b in zip(weights, original))
    perturbed = [w.clone() for w in weights]
    with pytest.raises(ValueError, match="log: with held_log, the triton backend"):
        zokernels.lowrank_perturb_(weights, us, vs, taus, scale=-EPS, keys=keys,
                                   applied_scale=EPS, applied_taus=taus, held_log=log,
                                   log=UndoLog(), backend="triton")
    for j, (a, b) in enumerate(zip(weights, perturbed)):
        assert_bits_equal(a, b, f"after the refused call, weight {j}")
    zokernels.lowrank_perturb_(weights, us, vs, taus, scale=0.0, keys=keys, applied_scale=EPS,
                               applied_taus=taus, held_log=log, backend="triton")
    for j, (a, b) in enumerate(zip(weights, original)):
        assert_bits_equal(a, b, f"restored weight {j}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_tezo_lr_zero_step_leaves_every_weight_bit_identical(dtype):
    from test_tezo_selector import _closure, _net
    net = _net(dtype)
    opt = TeZO(net.named_parameters(), eps=EPS, rank=4, probe="inplace", backend="triton",
               lr=0.0, variant="adam")
    assert all(isinstance(log, SelectorLog) for pair in opt._lowrank_logs for log in pair)
    before = snapshot(net)
    opt.step(_closure(net, dtype))
    assert_same(snapshot(net), before, "TeZO triton lr=0")
    assert sum(log.nbytes for pair in opt._lowrank_logs for log in pair) > 0


@pytest.mark.parametrize("fail_at", [1, 2])
def test_tezo_failing_closure_leaves_every_weight_bit_identical(fail_at):
    """After an update (weights of any pattern), a closure failing at the +eps or the -eps
    evaluation: the restore reads the selector log of the pass that wrote the weights."""
    from test_tezo_selector import _closure, _net
    dtype = torch.bfloat16
    net = _net(dtype)
    opt = TeZO(net.named_parameters(), eps=EPS, rank=4, probe="inplace", backend="triton",
               lr=1e-3)
    closure = _closure(net, dtype)
    opt.step(closure)
    assert_interrupted_step_leaves_weights(opt.step, net, closure, fail_at, "TeZO triton")
