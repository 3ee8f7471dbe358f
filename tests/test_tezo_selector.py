"""TeZO's in-place 2-D weights on selector logs (cpu, torch; docs/undo-log.md, "Low-rank
groups"): lr = 0 and failing closures leave every weight bit-identical, the logs stay under 5%
of the parameters' bytes, and checkpoints from before the low-rank selector logs (UndoLog
state) still load."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_interrupted_step_leaves_weights, assert_same, snapshot

from zokernels.lowrank_space import LowRankSpace
from zokernels.ops.undo import SelectorLog, UndoLog
from zokernels.optim import TeZO

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
EPS = 1e-3


def _net(dtype: torch.dtype) -> torch.nn.Module:
    """N(0, 0.02) weights with the worst cases of a selector log: a 2-D weight with zeros, -0.0
    and tiny values (wide intervals), zero biases."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(40, 96), torch.nn.Tanh(), torch.nn.Linear(96, 24),
                              torch.nn.Linear(24, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.02)
        net[0].bias.zero_()
        net[2].weight[::5] = 0.0
        net[2].weight[1::7] = -0.0
        net[2].weight[2::9] = 1e-30
    return net.to(dtype)


def _closure(net: torch.nn.Module, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 40, generator=g).to(dtype), torch.randn(8, 3, generator=g)
    return lambda: torch.nn.functional.mse_loss(net(x).float(), y)


def _tezo(net: torch.nn.Module, backend: str, **kwargs) -> TeZO:
    opt = TeZO(net.named_parameters(), eps=EPS, rank=4, probe="inplace", backend=backend,
               **kwargs)
    assert all(isinstance(log, SelectorLog) for pair in opt._lowrank_logs for log in pair)
    return opt


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lr_zero_steps_leave_every_weight_bit_identical(backend, dtype):
    net = _net(dtype)
    opt = _tezo(net, backend, lr=0.0, variant="adam")
    before = snapshot(net)
    closure = _closure(net, dtype)
    for _ in range(2):
        opt.step(closure)
    assert_same(snapshot(net), before, f"TeZO {backend} lr=0")
    assert sum(log.nbytes for pair in opt._lowrank_logs for log in pair) > 0  # logs were used


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_failing_closure_leaves_every_weight_bit_identical(backend, dtype, fail_at):
    net = _net(dtype)
    opt = _tezo(net, backend, lr=1e-3)
    closure = _closure(net, dtype)
    opt.step(closure)  # weights of any pattern after an update (the zeros are now tiny)
    assert_interrupted_step_leaves_weights(opt.step, net, closure, fail_at, f"TeZO {backend}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_extra_memory_is_at_most_5_percent_of_the_parameters(dtype):
    """N(0, 0.02) weights, eps = 1e-3, probe="inplace": the two passes' selector logs (rows and
    pools) of the 2-D weights and of the biases, plus TeZO's moments (2r floats per matrix; U
    and V, 1.6% of these bf16 weights at the default rank 8, are drawn per pass), under 5%."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.02)
    net = net.to(dtype)
    opt = TeZO(net.parameters(), lr=1e-4, eps=EPS, probe="inplace", backend="cpu")
    x = torch.randn(4, 2048).to(dtype)
    for _ in range(3):
        opt.step(lambda: net(x).float().pow(2).mean())
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    lowrank_logs = sum(log.nbytes for pair in opt._lowrank_logs for log in pair)
    assert 0 < lowrank_logs <= opt.undo_log_bytes
    assert 0 < opt.extra_memory_bytes <= 0.05 * params, (opt.extra_memory_bytes, params)
    assert opt.zo_state["undo_overflows"] == 0


def _run(dtype, steps, state=None, undo_logs=False, monkeypatch=None):
    """A TeZO run on cpu (its low-rank logs UndoLogs with undo_logs, as before the low-rank
    selector logs), optionally resumed from `state`."""
    if undo_logs:
        monkeypatch.setattr(LowRankSpace, "make_log", lambda self: UndoLog())
    net = _net(dtype)
    opt = TeZO(net.named_parameters(), eps=EPS, lr=1e-3, rank=4, probe="inplace", backend="cpu",
               variant="momentum")
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    if undo_logs:
        monkeypatch.undo()
    closure = _closure(net, dtype)
    for _ in range(steps):
        opt.step(closure)
    return net, opt


def test_a_checkpoint_with_undo_log_state_loads(monkeypatch):
    """A checkpoint saved while TeZO's low-rank logs were UndoLogs (no "lowrank_log_kinds";
    sizes in lost elements per element) loads into selector logs: their sizes are probed again
    (not read as pool words), and the resumed steps are exact: a replay of the whole trajectory
    (the two steps before the checkpoint, the two after) from the initial weights gives the
    resumed weights bit for bit."""
    dtype = torch.bfloat16
    net, old = _run(dtype, 2, undo_logs=True, monkeypatch=monkeypatch)
    assert all(type(log) is UndoLog for pair in old._lowrank_logs for log in pair)
    saved = {"model": net.state_dict(), "opt": old.state_dict()}
    del saved["opt"]["extra"]["lowrank_log_kinds"]  # the older format had none
    fractions = [log["fraction"] for pair in saved["opt"]["extra"]["lowrank_undo_logs"]
                 for log in pair]
    assert all(fractions)
    resumed, opt = _run(dtype, 0, state=saved)
    logs = [log for pair in opt._lowrank_logs for log in pair]
    assert all(isinstance(log, SelectorLog) and log._fraction == {} and log.probes == 2
               for log in logs)  # the counters carried over, the sizes did not
    closure = _closure(resumed, dtype)
    for _ in range(2):
        opt.step(closure)
    assert all(log.probes == 4 for log in logs)  # probed again, twice
    assert opt.zo_state["undo_overflows"] == 0
    replayed = _net(dtype)
    opt.trajectory.replay(replayed)
    assert_same(snapshot(replayed), snapshot(resumed), "replay of the resumed run")


def test_selector_log_state_round_trips():
    """Saved with their kinds, the selector logs' sizes load as they were: no probe after."""
    dtype = torch.float32
    net, opt = _run(dtype, 2)
    state = opt.state_dict()
    assert state["extra"]["lowrank_log_kinds"] == [["selector", "selector"]]
    _, resumed = _run(dtype, 0, state={"model": net.state_dict(), "opt": state})
    logs = [log for pair in resumed._lowrank_logs for log in pair]
    assert [log._fraction for log in logs] == [log._fraction for pair in opt._lowrank_logs
                                               for log in pair]
    assert all(log._fraction for log in logs)
    bad = dict(state, extra=dict(state["extra"], lowrank_log_kinds=[["selector", "lost"]]))
    with pytest.raises(ValueError, match="lowrank_log_kinds"):
        resumed.load_state_dict(bad)
