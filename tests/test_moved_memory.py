"""Parameters given other memory after an optimizer (or a log) was built: `param.data = ...`,
`model.to(...)`, a storage resized below its tensor at the same address, a view of other
strides at the same address. Every pass and every log read checks the memory it writes or
describes: a clear exception before anything is written, never a write past a storage's end
or a log read for memory it does not describe; a step whose closure moves a parameter restores
every other parameter exactly."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import zokernels
from zokernels import ParameterSpace
from zokernels.held import MovedParameters
from zokernels.ops.undo import LoggedMemoryMoved, SelectorLog, UndoLog
from zokernels.optim import LeZO, MeZO, PseuZO, TeZO

from helpers import assert_bits_equal

BACKENDS = [b for b in ("cpu", "torch", "triton") if b in zokernels.available_backends()]


def _named(n: int = 4096) -> list[tuple[str, nn.Parameter]]:
    g = torch.Generator().manual_seed(0)
    return [("w", nn.Parameter(torch.randn(n, generator=g) * 0.02)),
            ("v", nn.Parameter(torch.randn(64, 64, generator=g) * 0.02)),
            ("b", nn.Parameter(torch.randn(64, generator=g) * 0.02))]


def _optimizer(name: str, named, backend: str = "cpu", **kw):
    kw = {"lr": 0.0, "eps": 1e-3, "backend": backend, "seed": 1, **kw}
    if name == "mezo":
        return MeZO(named, **kw)
    if name == "lezo":
        return LeZO(named, layers=[["w"], ["v", "b"]], n_active=2, **kw)
    if name == "tezo":
        return TeZO(named, rank=2, **kw)
    return PseuZO(named, window=3, **kw)


def _step(name: str, opt, named, closure_hook=None) -> None:
    x = torch.linspace(-1, 1, 64)
    params = dict(named)
    calls = [0]

    def loss():
        calls[0] += 1
        if closure_hook is not None:
            closure_hook(calls[0])
        w, v, b = params["w"], params["v"], params["b"]
        return (w.float() ** 2).sum() + (v.float() @ x).pow(2).sum() + b.float().sum()

    if name == "pseuzo":
        opt.step(lambda: loss().reshape(1), lambda out: out.sum())
    else:
        opt.step(loss)


def _snapshot(named) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in named}


# -- between steps ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mezo", "lezo", "tezo", "pseuzo"])
@pytest.mark.parametrize("view", ["expand", "as_strided"])
def test_a_view_of_other_strides_at_the_same_address_is_refused_before_writing(name, view):
    """The address, size and dtype are the registered ones, the strides are not: the space
    checks the tensor again (an expanded view used to be written through a copy whose copy-back
    failed after the other parameters were written; TeZO updated its 1-D parameters before
    its low-rank pass refused the weight)."""
    named = _named()
    opt = _optimizer(name, named, lr=1e-2)
    _step(name, opt, named)
    v = dict(named)["v"]
    address = v.data_ptr()
    v.data = v.data[:1].expand(64, 64) if view == "expand" else v.data.as_strided((64, 64),
                                                                                  (1, 1))
    assert v.data_ptr() == address
    before, step = _snapshot(named), opt.zo_state["step"]
    with pytest.raises(ValueError, match=r"params\[1\] \(v\) has internal memory overlap"):
        _step(name, opt, named)
    for k, p in named:
        assert_bits_equal(p.detach(), before[k], what=f"{k} after the refused step")
    assert opt.zo_state["step"] == step


# Run in a fresh interpreter: there glibc hands a freed block of these sizes back at once
# (a storage shrunk to half comes back at its address), after a test suite's allocations it
# rarely does.
SHRUNK_AT_ITS_ADDRESS = """
import sys, torch
from zokernels.optim import MeZO
backend = sys.argv[1]
for attempt in range(60):
    numel = (1 << 12, 1 << 14, 1 << 16)[attempt % 3]
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(numel, generator=g))
    v = torch.nn.Parameter(torch.randn(64, generator=g))
    opt = MeZO([("w", w), ("v", v)], lr=1e-2, seed=1, backend=backend, probe="inplace")
    address, storage = w.data_ptr(), w.untyped_storage()
    storage.resize_(0)
    storage.resize_(2 * numel)  # bytes: half of what w addresses
    if w.data_ptr() == address:
        break
else:
    print("never at its address")
    sys.exit(0)
before = v.detach().clone()
try:
    opt.step(lambda: (w.float() ** 2).sum() + v.float().sum())
    print("stepped")
except ValueError as exc:
    print(exc)
print("v kept" if torch.equal(v.detach(), before) else "v changed")
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_storage_shrunk_at_its_address_is_refused_before_any_write(backend, tmp_path):
    """A storage resized below its tensor that comes back at the same address used to keep the
    registered signature (address, size, dtype), so the kernels wrote the whole tensor's extent
    past the storage's end (heap corruption, an abort). The storage's size is part of what a
    pass checks."""
    # run from elsewhere: from the source tree, `-c` would import its zokernels (no built
    # extension there when the project was installed with `pip install .`)
    child = subprocess.run([sys.executable, "-c", SHRUNK_AT_ITS_ADDRESS, backend],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path,
                           env={**os.environ, "TRITON_INTERPRET": "1"})
    assert child.returncode == 0, child.stderr
    if child.stdout.startswith("never at its address"):
        pytest.skip("the allocator never gave the shrunk storage its address back")
    assert re.match(r"params\[0\] addresses (\d+) bytes of its storage, which holds only "
                    r"(\d+)", child.stdout), child.stdout
    assert child.stdout.rstrip().endswith("v kept"), child.stdout


def test_tezo_refuses_parameters_aliased_after_it_was_built():
    """TeZO writes its dense and low-rank parts in separate passes; its update checks every
    parameter of the group first (it used to write a bias that aliased a row of a weight)."""
    named = _named()
    opt = _optimizer("tezo", named, lr=1e-2, probe="inplace")
    params = dict(named)
    params["b"].data = params["v"].data[3]
    before, step = _snapshot(named), opt.zo_state["step"]
    with pytest.raises(ValueError, match=r"\(v\) and .*\(b\) share memory"):
        _step("tezo", opt, named)
    for k, p in named:
        assert_bits_equal(p.detach(), before[k], what=f"{k} after the refused step")
    assert opt.zo_state["step"] == step


@pytest.mark.parametrize("name", ["mezo", "lezo", "pseuzo"])
def test_virtual_probes_refuse_an_unsupported_dtype_by_name(name):
    """model.double() after the optimizer was built: the virtual probes check the parameters
    as a pass does (a KeyError from the kernel table before)."""
    named = _named()
    opt = _optimizer(name, named, lr=1e-2)
    for _, p in named:
        p.data = p.data.double()
    before = _snapshot(named)
    with pytest.raises(TypeError, match=r"params\[0\] has dtype torch.float64"):
        _step(name, opt, named)
    for k, p in named:
        assert_bits_equal(p.detach(), before[k], what=f"{k} after the refused step")


# -- inside a step ----------------------------------------------------------------------------

MOVES = {
    "theta in new memory": lambda w, v, theta: theta.clone(),
    "shrunk": lambda w, v, theta: torch.full((100,), 0.5),
    "grown": lambda w, v, theta: torch.full((4096 * 16,), 0.5),
    "half": lambda w, v, theta: w.data.half(),
    # what a pass would refuse to write: restored around without checking the moved one again
    "double": lambda w, v, theta: w.data.double(),
    "expanded at its address": lambda w, v, theta: w.data[:1].expand(4096),
    "another parameter's memory": lambda w, v, theta: v.data.view(-1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("move", list(MOVES))
def test_a_parameter_moved_inside_the_closure_keeps_it_and_the_others_are_restored(backend, move):
    """`param.data = ...` in the closure, after the +eps pass: the next pass refuses the log of
    the old memory before writing, and the failed step's restore recovers every other parameter
    exactly in place (the moved one's old memory stands in for it), then names it. Before, the
    log was read for the new memory: other parameters got values of 1e36, the moved one
    garbage or its -eps value, or (a new dtype) the others stayed perturbed."""
    named = _named()
    opt = _optimizer("mezo", named, backend, lr=1e-2, probe="inplace")
    theta = _snapshot(named)
    w, v = dict(named)["w"], dict(named)["v"]
    assigned = []

    def hook(call):
        if call == 1:
            w.data = MOVES[move](w, v, theta["w"])
            assigned.append(w.detach().clone())

    with pytest.raises(MovedParameters, match="w: given other memory while the weights held a "
                                              "perturbation") as caught:
        _step("mezo", opt, named, hook)
    assert isinstance(caught.value.__cause__, LoggedMemoryMoved)
    assert caught.value.names == ["w"]
    if move == "another parameter's memory":
        assert w.data_ptr() == v.data_ptr()  # as assigned: v's memory, v restored
    else:
        assert_bits_equal(w.detach(), assigned[0], what="the moved parameter")
    for k, p in named[1:]:
        assert_bits_equal(p.detach(), theta[k], what=f"{k} after the failed step")
    assert not opt.held.active and opt.zo_state["step"] == 0


def test_a_parameter_moved_in_the_last_closure_call_is_named_in_the_update_note():
    """Moved in the -eps probe's closure: the update refuses the log, the restore recovers the
    others; the note says which parameter kept what was assigned."""
    named = _named()
    opt = _optimizer("mezo", named, lr=1e-2, probe="inplace")
    theta = _snapshot(named)
    w = dict(named)["w"]

    def hook(call):
        if call == 2:
            w.data = torch.full((100,), 0.5)

    with pytest.raises(LoggedMemoryMoved) as caught:
        _step("mezo", opt, named, hook)
    assert any("w: given other memory" in note for note in caught.value.__notes__)
    for k, p in named[1:]:
        assert_bits_equal(p.detach(), theta[k], what=f"{k} after the failed step")


@pytest.mark.parametrize("name", ["lezo", "tezo", "pseuzo"])
def test_every_optimizer_restores_the_parameters_a_closure_did_not_move(name):
    named = _named()
    opt = _optimizer(name, named, lr=1e-2, probe="inplace")
    theta = _snapshot(named)
    w = dict(named)["w"]
    at = 2 if name == "pseuzo" else 1  # PseuZO's first forward is at theta

    def hook(call):
        if call == at:
            w.data = torch.full((4096 * 16,), 0.5)

    with pytest.raises((RuntimeError, ValueError), match="given other memory"):
        _step(name, opt, named, hook)
    assert torch.equal(w.detach(), torch.full((4096 * 16,), 0.5))
    for k, p in named[1:]:
        assert_bits_equal(p.detach(), theta[k], what=f"{k} after the failed step")


@pytest.mark.parametrize("change", ["transposed", "grown", "half"])
def test_tezo_lowrank_weight_moved_inside_the_closure_is_refused(change):
    """TeZO's in-place low-rank pass: the log of the +eps pass is refused for a weight given
    other memory (a transposed view too: same address and size, another element order), which
    keeps what was assigned; the error names it (and the group's other weights, which keep
    their perturbation: low-rank passes have no stand-in recovery)."""
    named = _named()
    opt = _optimizer("tezo", named, lr=0.0, probe="inplace")
    v = dict(named)["v"]
    assigned = []

    def hook(call):
        if call == 1:
            v.data = {"transposed": lambda: v.data.t(),
                      "grown": lambda: torch.full((128, 64), 0.5),
                      "half": lambda: v.data.half()}[change]()
            assigned.append(v.detach().clone())

    with pytest.raises(LoggedMemoryMoved, match=r"v: given other memory while the weights "
                                                r"held a low-rank perturbation"):
        _step("tezo", opt, named, hook)
    assert_bits_equal(v.detach(), assigned[0], what="the moved weight")


# -- the logs themselves ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_a_selector_log_is_refused_for_tensors_given_other_memory(backend):
    """ParameterSpace.apply(held_log=...) after `p.data = ...` on a logged tensor: the log's rows
    describe the old memory (the native kernels would read them past their end for a larger
    tensor)."""
    p = nn.Parameter(torch.zeros(16, dtype=torch.bfloat16))
    q = nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    space = ParameterSpace([("p", p), ("q", q)], backend=backend)
    log = SelectorLog()
    space.apply(1, 1e-3, log=log)
    p.data = torch.zeros(4096, dtype=torch.bfloat16)
    q_before = q.detach().clone()
    with pytest.raises(LoggedMemoryMoved, match="held_log: a tensor of the logged pass"):
        space.apply(1, 0.0, applied=1e-3, held_log=log)
    assert torch.equal(p.detach(), torch.zeros(4096, dtype=torch.bfloat16))
    assert_bits_equal(q.detach(), q_before, what="q")


def test_an_undo_log_is_not_scattered_into_tensors_given_other_memory():
    p = nn.Parameter(torch.randn(4096) * 0.02)
    space = ParameterSpace([("p", p)], backend="torch")
    log = UndoLog()
    space.apply(1, 1e-3, log=log)
    p.data = p.data.half()
    before = p.detach().clone()
    with pytest.raises(LoggedMemoryMoved, match="log: a tensor of the logged pass"):
        space.apply_logged(log)
    assert_bits_equal(p.detach(), before, what="p")
