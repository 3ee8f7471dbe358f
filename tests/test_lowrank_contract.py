"""The low-rank op under each contract's stochastic rounding (docs/noise-contract.md):
lowrank_perturb_(contract=3) rounds with 16 random bits per element (one stream-1 Philox call per
8 elements) on every backend, bit for bit, in its tiled Triton pass (rows grouped by 8 or one
call per element) and its selector pass; contract 2 keeps the uniform-based rounding; TeZO's
contract reaches its low-rank passes."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bits_equal

import zokernels
from zokernels.backends.torch.lowrank import lowrank_perturb_torch
from zokernels.backends.triton.lowrank import lowrank_perturb_triton
from zokernels.lowrank_space import LowRankSpace
from test_lowrank_selector import _buffers, _s

BACKENDS = ["torch", "cpu", "triton"]
# Triton groups a tile row's rounding bits by Philox call when every n % 8 == 0 (the first list:
# 40 and a tile-crossing 72 columns), else draws one call per element (odd n, a single element)
GROUPED = [(19, 40, 4), (70, 72, 16)]
SHAPES = [(19, 40, 4), (33, 7, 3), (64, 72, 16), (1, 1, 1)]


def _problem(dtype: torch.dtype, seed: int, shapes=SHAPES):
    """N(0, 0.02) weights and dyadic factors (U, V in eighths of -4..4, tau in halves of -2..2):
    every product and k-sum is exact in float32 (and in TF32), so D is the same on every backend
    and in any summation order, and the roundings alone are compared."""
    g = torch.Generator().manual_seed(seed)
    weights, us, vs, taus = [], [], [], []
    for m, n, r in shapes:
        weights.append((torch.randn(m, n, generator=g) * 0.02).to(dtype))
        us.append(torch.randint(-4, 5, (m, r), generator=g).float() / 8)
        vs.append(torch.randint(-4, 5, (n, r), generator=g).float() / 8)
        taus.append(torch.randint(-2, 3, (r,), generator=g).float() / 2)
    keys = [7 * j + 3 for j in range(len(shapes))]
    return weights, us, vs, taus, keys


def _run(backend, dtype, contract, shapes, **kwargs):
    weights, us, vs, taus, keys = _problem(dtype, seed=1, shapes=shapes)
    zokernels.lowrank_perturb_(weights, us, vs, taus, scale=2.0 ** -9, keys=keys,
                               rounding="stochastic", rounding_seed=11, backend=backend,
                               contract=contract, **kwargs)
    return weights


@pytest.mark.parametrize("shapes", [SHAPES, GROUPED], ids=["per-element", "grouped"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("contract", [2, 3])
def test_backends_round_alike(dtype, contract, shapes):
    """cpu == torch == triton for a stochastic pass with decays, and contract 3 differs from 2
    (the contract is not ignored on any backend)."""
    decay = [0.9, 1.0, 0.5, 1.0][:len(shapes)]
    runs = {b: _run(b, dtype, contract, shapes, decay=decay) for b in BACKENDS}
    for b in ("cpu", "triton"):
        for j, (a, e) in enumerate(zip(runs[b], runs["torch"])):
            assert_bits_equal(a, e, f"{b} vs torch, contract {contract}, weight {j}")
    if contract == 3:
        other = {b: _run(b, dtype, 2, shapes, decay=decay) for b in BACKENDS}
        for b in BACKENDS:
            differ = sum(int((a != e).sum()) for a, e in zip(runs[b], other[b]))
            assert differ > 0, f"{b}: contract 3 rounded as contract 2"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_recovering_update_rounds_alike(dtype):
    """An update that first recovers the held perturbation (applied_*), contract 3."""
    weights0, us, vs, taus, keys = _problem(dtype, seed=2)
    runs = {}
    for b in BACKENDS:
        weights = [w.clone() for w in weights0]
        zokernels.lowrank_perturb_(weights, us, vs, taus, scale=2.0 ** -8, keys=keys,
                                   backend=b)
        zokernels.lowrank_perturb_(weights, us, vs, [0.5 * t for t in taus], scale=2.0 ** -10,
                                   keys=keys, applied_scale=2.0 ** -8, applied_taus=taus,
                                   rounding="stochastic", rounding_seed=5, decay=0.75,
                                   backend=b, contract=3)
        runs[b] = weights
    for b in ("cpu", "triton"):
        for j, (a, e) in enumerate(zip(runs[b], runs["torch"])):
            assert_bits_equal(a, e, f"{b} vs torch, weight {j}")


def test_selector_update_rounds_with_contract_3():
    """The Triton selector pass (an update reading a held log) under contract 3 writes the
    reference's update of theta, bit for bit (factors of any value: both sum P in k order)."""
    from test_lowrank_undo import _problem as _special_problem
    dtype = torch.bfloat16
    weights, us, vs, taus, keys = _special_problem([(33, 40, 3), (3, 5, 2)], dtype, "cpu",
                                                   seed=5)
    ones, decays = torch.ones(2), torch.tensor([0.9, 1.0])
    new_taus = [0.3 * t for t in taus]
    expected = [w.clone() for w in weights]
    lowrank_perturb_torch(expected, us, vs, new_taus, _s(0.25), decays, keys, "stochastic", 17,
                          contract=3)
    uniform = [w.clone() for w in weights]
    lowrank_perturb_torch(uniform, us, vs, new_taus, _s(0.25), decays, keys, "stochastic", 17,
                          contract=2)
    log = _buffers(weights)
    lowrank_perturb_triton(weights, us, vs, taus, _s(1e-3), ones, keys, "nearest", 0,
                           selector_log=log)
    lowrank_perturb_triton(weights, us, vs, new_taus, _s(0.25), decays, keys, "stochastic", 17,
                           applied_taus=taus, applied_scale=_s(1e-3), held_log=log, contract=3)
    for j, (a, e) in enumerate(zip(weights, expected)):
        assert_bits_equal(a, e, f"update of weight {j}")
    assert any(not torch.equal(a, u) for a, u in zip(expected, uniform))


def test_contract_is_checked_before_anything_is_written():
    weights, us, vs, taus, keys = _problem(torch.bfloat16, seed=3)
    before = [w.clone() for w in weights]
    for bad in (4, 0, True, "3"):
        with pytest.raises(ValueError, match="contract"):
            zokernels.lowrank_perturb_(weights, us, vs, taus, scale=0.01, keys=keys,
                                       backend="torch", contract=bad)
    for j, (a, b) in enumerate(zip(weights, before)):
        assert_bits_equal(a, b, f"weight {j}")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_space_passes_its_contract(backend):
    """LowRankSpace(contract=3).apply rounds as lowrank_perturb_(contract=3) (the scaled taus
    U diag(tau) V^T / sqrt(r) of the space's own factors)."""
    torch.manual_seed(0)
    weights = [(torch.randn(24, 40) * 0.02).to(torch.bfloat16)]
    copy = [w.clone() for w in weights]
    space = LowRankSpace(["w"], weights, [5], [False], rank=4, seed=9, backend=backend,
                         contract=3)
    taus = torch.randn(4)
    space.apply(taus, 1e-3, 1.0, backend, rounding="stochastic", rounding_seed=4)
    zokernels.lowrank_perturb_(copy, space.us, space.vs, [taus * space.rank_norm], scale=1e-3,
                               keys=[5], rounding="stochastic", rounding_seed=4, backend=backend,
                               contract=3)
    assert_bits_equal(weights[0], copy[0], "space vs op, contract 3")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_scatter_rounds_alike(dtype):
    """lowrank_scatter_<b> (an undo log's update) with contract 3: cpu == torch == triton for
    entries of every weight (grouped and odd columns), and not contract 2's bits."""
    from zokernels._dispatch import implementation
    weights0, us, vs, taus, keys = _problem(dtype, seed=4)
    numel = sum(w.numel() for w in weights0)
    g = torch.Generator().manual_seed(6)
    index = torch.randperm(numel, generator=g)[:600].to(torch.int64)
    values = (torch.randn(600, generator=g) * 0.02).to(dtype)
    count = torch.tensor([600], dtype=torch.int64)
    decays = torch.tensor([0.9, 1.0, 0.5, 1.0])
    runs = {}
    for b in BACKENDS:
        for contract in (2, 3):
            weights = [w.clone() for w in weights0]
            implementation(b, "lowrank_scatter")(weights, us, vs, taus, index, values, count,
                                                 _s(2.0 ** -9), decays, keys, "stochastic", 13,
                                                 contract=contract)
            runs[b, contract] = weights
    for contract in (2, 3):
        for b in ("cpu", "triton"):
            for j, (a, e) in enumerate(zip(runs[b, contract], runs["torch", contract])):
                assert_bits_equal(a, e, f"{b} vs torch, contract {contract}, weight {j}")
    assert any(not torch.equal(a, e) for a, e in zip(runs["torch", 3], runs["torch", 2]))


def test_tezo_contract_reaches_the_lowrank_update():
    """TeZO(contract=3, rounding="stochastic") on torch, cpu and triton: the same step bit for
    bit (P in k order on every in-place pass that reads a selector log, v2 normals, integer
    rounding), and its 2-D weights differ from a contract-2 step's (their update rounded by the
    contract's rule: the contract reaches the low-rank ops)."""
    from test_tezo_selector import _closure, _net
    from helpers import snapshot
    dtype = torch.bfloat16
    runs = {}
    for backend, contract in (("torch", 3), ("cpu", 3), ("triton", 3), ("torch", 2)):
        net = _net(dtype)
        opt = zokernels.optim.TeZO(net.named_parameters(), eps=1e-3, rank=4, probe="inplace",
                                   backend=backend, lr=1e-2, rounding="stochastic",
                                   contract=contract)
        opt.step(_closure(net, dtype))
        runs[backend, contract] = snapshot(net)
    names = [k for k, v in runs["torch", 3].items() if v.dim() == 2]
    assert names
    for backend in ("cpu", "triton"):
        for name, value in runs["torch", 3].items():
            assert_bits_equal(runs[backend, 3][name], value, f"{backend} {name}")
    assert any(not torch.equal(runs["torch", 3][n], runs["torch", 2][n]) for n in names)
