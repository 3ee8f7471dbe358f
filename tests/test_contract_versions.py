"""Optimizers, checkpoints and trajectories carry the noise contract version (docs/noise-contract.md):
v3 (v2 normals, integer stochastic rounding) by default, v2 and v1 on request, and
a state or trajectory saved before versions existed (no "contract" field) resumes / replays with
the v1 normals it was made with."""

from __future__ import annotations

import pytest
import torch

from zokernels import Trajectory, noise
from zokernels.optim import LeZO, MeZO, PseuZO, TeZO
from zokernels.optim.tezo import factor_seed

from helpers import assert_same, assert_states_equal, snapshot


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)])
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


X = torch.linspace(-1, 1, 24).reshape(4, 6)


def build(name: str, net: Net, **kwargs):
    common = dict(lr=1e-2, eps=1e-3, seed=11, **kwargs)
    if name == "mezo":
        return MeZO(net.named_parameters(), **common)
    if name == "lezo":
        return LeZO(net.named_parameters(), layers=list(net.blocks), n_active=1, **common)
    if name == "tezo":
        return TeZO(net.named_parameters(), rank=2, probe="inplace", **common)
    return PseuZO(net.named_parameters(), window=3, beta=0.5, **common)


def take_steps(name: str, opt, net: Net, steps: int) -> None:
    for _ in range(steps):
        if name == "pseuzo":
            opt.step(lambda: net(X), lambda out: out.pow(2).mean())
        else:
            opt.step(lambda: net(X).pow(2).mean())


NAMES = ["mezo", "lezo", "tezo", "pseuzo"]


@pytest.mark.parametrize("name", NAMES)
def test_default_is_v3_and_v1_is_a_different_run(name):
    runs = {}
    for contract in (None, 3, 2, 1):
        net = Net()
        opt = build(name, net) if contract is None else build(name, net, contract=contract)
        take_steps(name, opt, net, 3)
        runs[contract] = (snapshot(net), opt)
    assert_same(runs[None][0], runs[3][0], "default vs contract=3")
    # round to nearest: v3 and v2 share the normals, so the same run
    assert_same(runs[3][0], runs[2][0], "contract=3 vs contract=2, nearest rounding")
    assert runs[None][1].contract == 3 and runs[2][1].contract == 2 and runs[1][1].contract == 1
    assert runs[None][1].state_dict()["contract"] == 3
    assert runs[2][1].trajectory.meta["contract"] == 2 and runs[1][1].trajectory.meta["contract"] == 1
    differs = any(not torch.equal(runs[1][0][n], runs[2][0][n]) for n in runs[2][0])
    assert differs, "v1 and v2 normals gave the same weights"


def test_default_stochastic_rounding_is_v3s():
    """bf16 weights with stochastic rounding: the default is contract 3's integer rounding (another
    run than contract 2's uniform-based one)."""
    runs = {}
    for contract in (None, 3, 2):
        net = Net().to(torch.bfloat16)
        kwargs = dict(rounding="stochastic") | ({} if contract is None else dict(contract=contract))
        opt = MeZO(net.named_parameters(), lr=1e-2, eps=1e-3, seed=11, **kwargs)
        for _ in range(3):
            opt.step(lambda: net(X.to(torch.bfloat16)).float().pow(2).mean())
        runs[contract] = snapshot(net)
    assert_same(runs[None], runs[3], "default vs contract=3, stochastic rounding")
    assert any(not torch.equal(runs[3][n], runs[2][n]) for n in runs[3]), \
        "contracts 3 and 2 rounded stochastically alike"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("contract", [1, 2, 3])
def test_trajectory_replays_with_its_recorded_normals(name, contract):
    net = Net()
    start = snapshot(net)
    opt = build(name, net, contract=contract)
    take_steps(name, opt, net, 3)
    fresh = Net()
    assert_same(snapshot(fresh), start, "initial weights")
    Trajectory.from_state_dict(opt.trajectory.state_dict()).replay(fresh, backend="torch"
                                                                   if name == "tezo" else "auto")
    for n, p in fresh.named_parameters():
        assert torch.allclose(p, dict(net.named_parameters())[n], atol=1e-6, rtol=0), n
    # bit for bit on the backend the run used (TeZO replays its recursions: within 1e-6 above)
    if name != "tezo":
        again = Net()
        opt.trajectory.replay(again)
        assert_same(snapshot(again), snapshot(net), "replay")


@pytest.mark.parametrize("name", NAMES)
def test_unversioned_state_and_trajectory_resume_as_v1(name):
    """A checkpoint from before contract versions (no "contract" in the state nor in its
    trajectory's meta) was made with v1 normals: a default (v3) optimizer adopts v1 from it and
    continues exactly as the uninterrupted v1 run."""
    whole_net = Net()
    whole = build(name, whole_net, contract=1)
    take_steps(name, whole, whole_net, 4)

    net = Net()
    first = build(name, net, contract=1)
    take_steps(name, first, net, 2)
    state = first.state_dict()
    del state["contract"]
    del state["trajectory"]["meta"]["contract"]
    resumed = build(name, net)  # default contract 3
    resumed.load_state_dict(state)
    assert resumed.contract == 1
    take_steps(name, resumed, net, 2)
    assert_same(snapshot(net), snapshot(whole_net), "resumed v1 run")
    saved, expected = resumed.state_dict(), whole.state_dict()
    del expected["contract"]  # absent in what was loaded; adopted as 1 and saved as 1
    assert saved.pop("contract") == 1
    saved["trajectory"]["meta"].pop("contract", None)
    expected["trajectory"]["meta"].pop("contract", None)
    assert_states_equal(saved, expected)


def test_tezo_factors_follow_the_contract_and_a_loaded_one():
    net = Net()
    v1 = build("tezo", net, contract=1)
    state = v1.lowrank[0]
    m, r = state.weights[0].shape[0], state.ranks[0]
    expected = noise(m * r, factor_seed(11), state.keys[0], contract=1).view(m, r)
    assert torch.equal(state.us[0], expected)
    v2 = build("tezo", Net())
    assert not torch.equal(v2.lowrank[0].us[0], expected)
    v2.load_state_dict(v1.state_dict())  # adopts contract 1: the factors are redrawn
    assert v2.contract == 1 and torch.equal(v2.lowrank[0].us[0], expected)


@pytest.mark.parametrize("bad", [0, 4, "2", 2.0, True, None])
def test_bad_contract_is_refused(bad):
    with pytest.raises(ValueError, match="contract"):
        MeZO(Net().named_parameters(), contract=bad)
    net = Net()
    opt = build("mezo", net)
    take_steps("mezo", opt, net, 1)
    state = opt.state_dict()
    before, saved = snapshot(net), opt.state_dict()
    state["contract"] = bad
    with pytest.raises(ValueError, match="contract"):
        opt.load_state_dict(state)
    assert_states_equal(opt.state_dict(), saved)
    assert_same(snapshot(net), before, "weights")
    meta_bad = opt.trajectory.state_dict()
    meta_bad["meta"]["contract"] = bad
    with pytest.raises(ValueError, match="contract"):
        Trajectory.from_state_dict(meta_bad)


def _bf16_run(contract: int, steps: int = 3):
    """MeZO on a bf16 net with stochastic rounding of the updates (the contracts' rounding
    differs there; fp32 updates are exact)."""
    net = Net().to(torch.bfloat16)
    start = snapshot(net)
    opt = MeZO(net.named_parameters(), lr=1e-2, eps=1e-3, seed=11, rounding="stochastic",
               contract=contract)
    for _ in range(steps):
        opt.step(lambda: net(X.to(torch.bfloat16)).float().pow(2).mean())
    return net, opt, start


def test_contract_3_records_and_replays_its_stochastic_rounding():
    net3, opt3, start = _bf16_run(3)
    net2, _, _ = _bf16_run(2)
    assert opt3.state_dict()["contract"] == 3 and opt3.trajectory.meta["contract"] == 3
    differs = any(not torch.equal(p, q) for p, q in zip(net3.parameters(), net2.parameters()))
    assert differs, "contracts 2 and 3 rounded the bf16 updates alike"
    fresh = Net().to(torch.bfloat16)
    assert_same(snapshot(fresh), start, "initial weights")
    Trajectory.from_state_dict(opt3.trajectory.state_dict()).replay(fresh)
    assert_same(snapshot(fresh), snapshot(net3), "contract 3 replay")
    # a checkpoint resumes with its contract: 3 + 2 steps == 5 steps
    whole, _, _ = _bf16_run(3, steps=5)
    resumed_net, resumed_opt, _ = _bf16_run(2, steps=0)  # built with another contract
    resumed_net.load_state_dict(net3.state_dict())
    resumed_opt.load_state_dict(opt3.state_dict())
    assert resumed_opt.contract == 3
    for _ in range(2):
        resumed_opt.step(lambda: resumed_net(X.to(torch.bfloat16)).float().pow(2).mean())
    assert_same(snapshot(resumed_net), snapshot(whole), "resumed contract 3 run")


def test_trajectory_contract_must_match_the_state():
    net = Net()
    opt = build("mezo", net, contract=1)
    take_steps("mezo", opt, net, 1)
    state = opt.state_dict()
    state["contract"] = 2
    with pytest.raises(ValueError, match="trajectory contract"):
        build("mezo", Net()).load_state_dict(state)
