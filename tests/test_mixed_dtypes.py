"""Parameters of several dtypes in ONE parameter group (a bf16 model with fp32 norms or adapters).

ParameterSpace once keyed its kernel calls on (backend, device) alone, so fp32 and bf16 weights
went to one call that read them all at one element size: the cpu backend wrote far out of bounds
(non-finite losses, then a segfault) and Triton left the fp32 weights unperturbed. These tests
hold every layer to the op's grouping, which was always right."""

from __future__ import annotations

import pytest
import torch

from helpers import (ALL_BACKEND_CASES, MixedDtypeNet, assert_bits_equal, assert_close,
                     assert_same, snapshot)
from zokernels import perturb_
from zokernels._dispatch import implementation
from zokernels.optim import LeZO, MeZO, PseuZO, TeZO
from zokernels.space import ParameterSpace
from zokernels.ops.undo import SelectorLog


MixedNet = MixedDtypeNet
X = torch.linspace(-1, 1, 18).reshape(3, 6)


def loss_of(net: MixedNet):
    return lambda: net(X).pow(2).mean()


@pytest.mark.parametrize("backend,device", ALL_BACKEND_CASES)
def test_space_writes_each_dtype_as_the_op_does(backend, device):
    net = MixedNet().to(device)
    params = list(net.parameters())
    space = ParameterSpace(net.named_parameters(), backend=backend,
                           layers=[net.first, net.second, net.norm])
    assert len(space._full_plan[0]) == 3  # one call per dtype
    expected = [p.detach().clone() for p in params]
    perturb_(expected, [11, 12], [1e-3, -2e-3], keys=space.keys, backend=backend)
    space.apply([11, 12], [1e-3, -2e-3])
    for j, (p, e) in enumerate(zip(params, expected)):
        assert_bits_equal(p.detach(), e, f"{space.names[j]} ({p.dtype})")
    # a selection of layers (LeZO's plans) groups the same way
    chosen = [p.detach().clone() for p in params]
    picked = [j for j in space.indices([1, 2])]
    perturb_([chosen[j] for j in picked], 13, 1e-3, keys=[space.keys[j] for j in picked],
             backend=backend)
    space.apply(13, 1e-3, layers=[1, 2])
    for j, (p, e) in enumerate(zip(params, chosen)):
        assert_bits_equal(p.detach(), e, f"layers 1, 2: {space.names[j]}")


@pytest.mark.parametrize("backend,device", ALL_BACKEND_CASES)
def test_space_selector_log_restores_every_dtype(backend, device):
    net = MixedNet().to(device)
    before = snapshot(net)
    space = ParameterSpace(net.named_parameters(), backend=backend)
    log = SelectorLog()
    space.apply(21, 1e-3, log=log)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in net.named_parameters())
    space.apply(21, 0.0, applied=1e-3, held_log=log)  # recover theta exactly
    assert_same(snapshot(net), before, f"{backend}: restored")


def make(name: str, net: MixedNet, backend: str, **kwargs):
    common = dict(lr=1e-2, eps=1e-3, seed=3, backend=backend, **kwargs)
    if name == "mezo":
        return MeZO(net.named_parameters(), **common)
    if name == "mezo-inplace":
        return MeZO(net.named_parameters(), probe="inplace", **common)
    if name == "lezo":
        return LeZO(net.named_parameters(), layers=[net.first, net.second, net.norm],
                    n_active=2, **common)
    if name == "tezo":
        return TeZO(net.named_parameters(), rank=2, **common)
    if name == "tezo-inplace":
        return TeZO(net.named_parameters(), rank=2, probe="inplace", **common)
    return PseuZO(net.named_parameters(), window=3, **common)


def take_step(name: str, opt, net: MixedNet):
    if name == "pseuzo":
        return opt.step(lambda: net(X), lambda out: out.pow(2).mean())
    return opt.step(loss_of(net))


NAMES = ["mezo", "mezo-inplace", "lezo", "tezo", "tezo-inplace", "pseuzo"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend,device", ALL_BACKEND_CASES)
def test_steps_on_mixed_dtypes_match_the_torch_reference(name, backend, device):
    """Three steps on each backend against the torch backend: rademacher noise is bit-identical
    on every backend (MeZO, LeZO, PseuZO, TeZO's 1-D parameters), so those weights must match
    bit for bit; TeZO's gaussian factors agree to a few float32 ulps, one rounding of the
    weight's dtype at most apart."""
    nets = {b: MixedNet().to(device) for b in ("torch", backend)}
    opts = {b: make(name, nets[b], b, dist="rademacher") for b in nets}
    for _ in range(3):
        losses = {b: take_step(name, opts[b], nets[b]) for b in nets}
        assert torch.isfinite(losses[backend]).all()
    for (n, p), q in zip(nets[backend].named_parameters(), nets["torch"].parameters()):
        if name.startswith("tezo") and p.dim() == 2:
            assert_close(p.detach(), q.detach(), atol=0.0, ulps=1, what=f"{name} {n}")
        else:
            assert_bits_equal(p.detach(), q.detach(), f"{name} {n} ({p.dtype})")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend,device", ALL_BACKEND_CASES)
def test_zero_lr_steps_leave_mixed_dtypes_bit_identical(name, backend, device):
    net = MixedNet().to(device)
    opt = make(name, net, backend)
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = snapshot(net)
    for _ in range(2):
        take_step(name, opt, net)
    assert_same(snapshot(net), before, f"{name} with lr = 0")


FAST_BACKENDS = [case for case in ALL_BACKEND_CASES if case[0] != "torch"]


def _native_call(op: str, tensors, device, cached: bool):
    """Arguments of one native call of `op` over `tensors` (2-D, one float32, one bfloat16):
    a valid call but for the mixed dtypes."""
    one = torch.ones(1, device=device)
    decays = torch.ones(len(tensors), device=device)
    if op == "perturb":
        return (tensors, [1, 2], [5], one * 1e-3, decays, "gaussian", "nearest", 5), \
            {"table_cache": {} if cached else None}
    empty_log = (torch.zeros(4, dtype=torch.int64, device=device),
                 torch.zeros(4, device=device), torch.ones(1, dtype=torch.int64, device=device))
    if op == "scatter_perturb":
        return (tensors, [1, 2], *empty_log, [5], one * 1e-3, decays, "gaussian", "nearest",
                5), {}
    us = [torch.randn(t.shape[0], 2, device=device) for t in tensors]
    vs = [torch.randn(t.shape[1], 2, device=device) for t in tensors]
    taus = [torch.randn(2, device=device) for _ in tensors]
    if op == "lowrank_perturb":
        return (tensors, us, vs, taus, one * 1e-3, decays, [1, 2], "nearest", 5), {}
    return (tensors, us, vs, taus, *empty_log, one * 1e-3, decays, [1, 2], "nearest", 5), {}


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
@pytest.mark.parametrize("op,cached", [("perturb", False), ("perturb", True),
                                       ("scatter_perturb", False), ("lowrank_perturb", False),
                                       ("lowrank_scatter", False)])
def test_native_backends_refuse_one_call_of_several_dtypes(backend, device, op, cached):
    """Whatever a caller's grouping, a native call given two dtypes raises before writing (it
    would address the bf16 tensor at float32's element size)."""
    tensors = [torch.randn(8, 8, device=device), torch.randn(8, 8, device=device).bfloat16()]
    before = [t.clone() for t in tensors]
    args, kwargs = _native_call(op, tensors, device, cached)
    with pytest.raises(ValueError, match="share one dtype"):
        implementation(backend, op)(*args, **kwargs)
    for t, b in zip(tensors, before):
        assert_bits_equal(t, b, "refused call")
