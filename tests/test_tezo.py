"""TeZO: noise as a pure function of (seed, key), resume, stochastic rounding, empty matrices,
load_state_dict validation. Small models built here; the CPU backend (auto) runs them."""

from __future__ import annotations

import io
import math

import pytest
import torch

from zokernels import Trajectory, lowrank_perturb_, noise
from zokernels.optim import TeZO
from zokernels.optim._seeds import step_seed
from zokernels.optim.tezo import factor_seed, tau_seed
from zokernels.sharding import mark_shard
from zokernels.space import key_from_name

from helpers import assert_bits_equal, assert_same, assert_states_equal, snapshot, ulp


class Net(torch.nn.Module):
    """Two 2-D weights (a, then b), their biases and a norm in between."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(5, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.b = torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.norm(self.a(x))))


def make_net(dtype: torch.dtype = torch.float32) -> Net:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = Net()
    return net.to(dtype)


def _data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g), torch.randn(n, 4, generator=g)


def net_loss(net: Net):
    x, y = _data()
    dtype = next(net.parameters()).dtype
    return lambda: torch.nn.functional.mse_loss(net(x.to(dtype)).float(), y)


def head_loss(net: Net):
    """A loss of net.b only: a weight before it cannot change it, whatever its noise."""
    g = torch.Generator().manual_seed(2)
    h, y = torch.randn(32, 6, generator=g), torch.randn(32, 4, generator=g)
    return lambda: torch.nn.functional.mse_loss(net.b(h), y)


def alternating(steps: int):
    """Losses 1, 0, 1, 0, ...: g = 0.5 / eps every step, independent of the weights' rounding."""
    values = iter([1.0, 0.0] * steps)
    return lambda: next(values)


def spec_direction(grad: float, lr: float, tau: torch.Tensor) -> torch.Tensor:
    """TeZO's sgd update of one weight in tau space, scaled by 1/sqrt(r), in its float32 order."""
    r = tau.numel()
    return (-lr * (torch.tensor(grad, dtype=torch.float32) * tau)) * torch.full(
        (r,), 1.0 / math.sqrt(r), dtype=torch.float32)


def spec_factors(m: int, n: int, r: int, seed: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    fs = factor_seed(seed)
    return noise(m * r, fs, key).view(m, r), noise(n * r, fs, key, offset=m * r).view(n, r)


# -- the noise is a pure function of (seed, step, key) ------------------------------------------

def test_update_is_the_documented_function_of_seed_and_key():
    """W_{t+1} = W_t - lr g U diag(tau_t) V^T / sqrt(r) with U, V, tau drawn by `noise` from
    (factor_seed(seed) / tau_seed(seed, t), key of the name): bit for bit, two steps."""
    torch.manual_seed(3)
    w = torch.randn(9, 7) * 0.1
    expected = w.clone()
    seed, lr, rank, key = 5, 1e-3, 3, key_from_name("w")
    opt = TeZO([("w", w)], lr=lr, eps=1e-3, seed=seed, rank=rank)
    u, v = spec_factors(9, 7, rank, seed, key)
    for step in range(2):
        opt.step(alternating(1))
        grad = opt.trajectory.extra["grad0"][step]
        tau = noise(rank, tau_seed(seed, step), key)
        lowrank_perturb_(expected, [u], [v], [spec_direction(grad, lr, tau)], keys=[key])
        assert_bits_equal(w, expected, what=f"step {step}")


@pytest.mark.parametrize("variant", ["sgd", "adam"])
def test_freezing_an_earlier_weight_leaves_a_later_weights_updates_identical(variant):
    full, frozen = make_net(), make_net()
    frozen.a.weight.requires_grad_(False)
    opts = [TeZO(net.named_parameters(), rank=3, lr=1e-2, seed=4, variant=variant)
            for net in (full, frozen)]
    losses = [head_loss(full), head_loss(frozen)]
    for step in range(4):
        for opt, loss in zip(opts, losses):
            opt.step(loss)
        for name in ("weight", "bias"):
            assert_bits_equal(getattr(frozen.b, name).detach(), getattr(full.b, name).detach(),
                              what=f"b.{name} after step {step}")
    assert not torch.equal(full.b.weight, make_net().b.weight)  # it did train
    assert torch.equal(frozen.a.weight, make_net().a.weight)


def test_moving_a_weight_to_another_param_group_keeps_its_updates():
    one, two = make_net(), make_net()
    opt_one = TeZO(one.named_parameters(), rank=3, lr=1e-2, seed=4, variant="momentum")
    groups = [{"params": [(n, p) for n, p in two.named_parameters() if not n.startswith("b.")]},
              {"params": list(two.b.named_parameters(prefix="b"))}]
    opt_two = TeZO(groups, rank=3, lr=1e-2, seed=4, variant="momentum")
    for _ in range(3):
        opt_one.step(net_loss(one))
        opt_two.step(net_loss(two))
    assert_same(snapshot(two), snapshot(one), "regrouped")


def test_module_prefix_gives_identical_results():
    plain, wrapped = make_net(torch.bfloat16), make_net(torch.bfloat16)
    opt_plain = TeZO(plain.named_parameters(), rank=3, lr=1e-2, seed=6, variant="adam")
    opt_wrapped = TeZO([("module." + n, p) for n, p in wrapped.named_parameters()], rank=3,
                       lr=1e-2, seed=6, variant="adam")
    for _ in range(3):
        opt_plain.step(net_loss(plain))
        opt_wrapped.step(net_loss(wrapped))
    assert_same(snapshot(wrapped), snapshot(plain), "module.-prefixed names")
    assert not torch.equal(plain.a.weight, make_net(torch.bfloat16).a.weight)


# -- resume --------------------------------------------------------------------------------------

def test_resume_into_an_optimizer_built_with_another_seed_is_bit_identical(tmp_path):
    net = make_net(torch.bfloat16)
    initial = snapshot(net)
    opt = TeZO(net.named_parameters(), rank=3, lr=1e-2, seed=3, variant="momentum",
               weight_decay=0.1)
    for _ in range(3):
        opt.step(net_loss(net))
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    for _ in range(3):
        opt.step(net_loss(net))
    uninterrupted = snapshot(net)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_net(torch.bfloat16)
    resumed.load_state_dict(saved["model"])
    # another seed and betas: both come from the state_dict, as torch restores hyperparameters
    opt2 = TeZO(resumed.named_parameters(), rank=3, lr=1e-2, seed=11, variant="momentum",
                weight_decay=0.1, betas=(0.5, 0.9))
    opt2.load_state_dict(saved["opt"])
    assert opt2.base_seed == 3 and opt2.betas == (0.9, 0.999)
    for _ in range(3):
        opt2.step(net_loss(resumed))
    assert_same(snapshot(resumed), uninterrupted, "resumed with another seed")

    opt2.trajectory.save(tmp_path / "run.pt")
    replayed = make_net(torch.bfloat16)
    assert_same(snapshot(replayed), initial, "initial weights")
    Trajectory.load(tmp_path / "run.pt").replay(replayed)
    assert_same(snapshot(replayed), uninterrupted, "replay of the resumed run")


def test_trajectory_of_an_older_layout_is_refused():
    net = make_net()
    opt = TeZO(net.named_parameters(), rank=2, lr=1e-2)
    opt.step(net_loss(net))
    state = opt.trajectory.state_dict()
    del state["meta"]["noise_layout"]
    fresh = make_net()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="per tensor key"):
        Trajectory.from_state_dict(state).replay(fresh)
    assert_same(snapshot(fresh), before, "after a refused replay")


# -- stochastic rounding -------------------------------------------------------------------------

def _bf16_matrix() -> torch.Tensor:
    g = torch.Generator().manual_seed(8)
    return (1.0 + 0.5 * torch.rand(128, 512, generator=g)).to(torch.bfloat16)  # ulp 2^-7


def test_stochastic_rounding_applies_to_the_2d_update():
    """lr chosen so |update| ~ 0.1 ulp on average (0.4% of elements above half an ulp): nearest
    drops most of it, stochastic keeps it in expectation, each element at one of the two
    neighbours of the exact value."""
    theta = _bf16_matrix()
    seed, lr, eps, rank, key = 5, 1.5e-6, 1e-3, 4, key_from_name("w")
    results = {}
    for rounding in ("nearest", "stochastic"):
        w = theta.clone()
        opt = TeZO([("w", w)], lr=lr, eps=eps, seed=seed, rank=rank, rounding=rounding)
        opt.step(alternating(1))
        results[rounding] = w
    grad = opt.trajectory.extra["grad0"][0]
    u, v = spec_factors(*theta.shape, rank, seed, key)
    direction = spec_direction(grad, lr, noise(rank, tau_seed(seed, 0), key))
    exact = (u.double() @ torch.diag(direction.double()) @ v.double().T)  # the update, float64

    # the stochastic step equals the update of the unperturbed weights with the step's seed
    reference = theta.clone()
    lowrank_perturb_(reference, [u], [v], [direction], keys=[key], rounding="stochastic",
                     rounding_seed=step_seed(seed, 0))
    assert_bits_equal(results["stochastic"], reference, what="stochastic TeZO update")

    nearest, stochastic = results["nearest"], results["stochastic"]
    steps = (stochastic.view(torch.int16).int() - nearest.view(torch.int16).int())
    assert steps.abs().max().item() <= 1  # positive weights: adjacent bit patterns are 1 ulp apart
    # An element's stochastic result differs from its nearest one with probability (distance
    # from the exact value to the nearest neighbour) / ulp: the flips' fraction must be that
    # mean, within 6 standard deviations of the sum of independent Bernoulli draws.
    x = theta.double() + exact
    p_flip = ((nearest.double() - x).abs() / ulp(x, torch.bfloat16)).clamp(max=0.5).reshape(-1)
    expected = p_flip.mean().item()
    sigma = (p_flip * (1 - p_flip)).sum().sqrt().item() / p_flip.numel()
    assert expected > 0.02  # the update is large enough for the check to mean something
    assert abs((steps != 0).double().mean().item() - expected) <= 6 * sigma
    assert bool(((stochastic.double() - x).abs() < 2.0 ** -7).all())  # a neighbour of x

    # E[applied] = exact update: this projection ratio has std 0.013 here (sum of the elements'
    # rounding variances), so 0.1 is > 7 sigma; nearest keeps only the > half-ulp tail (0.11)
    def kept(w: torch.Tensor) -> float:
        applied = w.double() - theta.double()
        return float((applied * exact).sum() / (exact * exact).sum())
    assert abs(kept(stochastic) - 1.0) < 0.1, kept(stochastic)
    assert kept(nearest) < 0.3, kept(nearest)


def test_stochastic_rounding_trajectory_replays_bit_for_bit(tmp_path):
    """2-D and 1-D parameters both round stochastically, in the run and in its replay."""
    net = make_net(torch.bfloat16)
    opt = TeZO(net.named_parameters(), rank=3, lr=1e-3, seed=2, variant="adam",
               weight_decay=0.05, rounding="stochastic")
    for _ in range(4):
        opt.step(net_loss(net))
    opt.trajectory.save(tmp_path / "run.pt")
    replayed = make_net(torch.bfloat16)
    Trajectory.load(tmp_path / "run.pt").replay(replayed)
    assert_same(snapshot(replayed), snapshot(net), "stochastic replay")

    nearest = make_net(torch.bfloat16)
    opt_n = TeZO(nearest.named_parameters(), rank=3, lr=1e-3, seed=2, variant="adam",
                 weight_decay=0.05)
    for _ in range(4):
        opt_n.step(net_loss(nearest))
    for name in ("a.weight", "a.bias"):  # both kinds of parameters feel the rounding mode
        assert not torch.equal(dict(nearest.named_parameters())[name],
                               dict(net.named_parameters())[name]), name


def test_stochastic_rounding_is_refused_on_sharded_2d_weights(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        full = torch.randn(6, 4).bfloat16()
        shard = mark_shard(full[2:5].clone(), (6, 4), (2, 0))
        before = shard.clone()
        with pytest.raises(ValueError, match="rounding='stochastic'.*sharded"):
            TeZO([("w", shard)], rank=2, rounding="stochastic")
        assert_bits_equal(shard, before)
        TeZO([("w", shard)], rank=2)  # nearest is fine
    finally:
        dist.destroy_process_group()


# -- empty matrices --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_empty_matrices_are_skipped(shape, tmp_path):
    with_empty, without = make_net(), make_net()
    empty = torch.zeros(shape)
    params = [("empty", empty)] + list(with_empty.named_parameters())
    opt = TeZO(params, rank=3, lr=1e-2, seed=1, variant="adam")
    reference = TeZO(without.named_parameters(), rank=3, lr=1e-2, seed=1, variant="adam")
    for _ in range(3):
        opt.step(net_loss(with_empty))
        reference.step(net_loss(without))
    assert empty.shape == shape
    assert_same(snapshot(with_empty), snapshot(without), "next to an empty matrix")
    assert opt.state_numel == reference.state_numel

    opt.trajectory.save(tmp_path / "run.pt")
    replayed = make_net()
    Trajectory.load(tmp_path / "run.pt").replay([("empty", torch.zeros(shape))]
                                                + list(replayed.named_parameters()))
    assert_same(snapshot(replayed), snapshot(with_empty), "replay")

    resumed = TeZO([("empty", torch.zeros(shape))] + list(make_net().named_parameters()),
                   rank=3, lr=1e-2, seed=1, variant="adam")
    resumed.load_state_dict(opt.state_dict())  # round trip


# -- load_state_dict validation -----------------------------------------------------------------

def _trained(rank: int = 3, variant: str = "momentum", seed: int = 0, lr: float = 1e-2,
             steps: int = 2) -> tuple[Net, TeZO]:
    net = make_net(torch.bfloat16)
    opt = TeZO(net.named_parameters(), rank=rank, lr=lr, seed=seed, variant=variant)
    for _ in range(steps):
        opt.step(net_loss(net))
    return net, opt


def _wrong_size_moments(state: dict) -> None:
    state["extra"]["momentum"][0] = torch.zeros(3)


def _bad_undo_log(state: dict) -> None:
    state["extra"]["lowrank_undo_logs"][0][0] = {"fraction": {"cpu|nodtype": 0.1}}


@pytest.mark.parametrize("saved_from,corrupt,match", [
    (dict(rank=2), None, "rank"),
    (dict(variant="adam"), None, "variant"),
    (dict(), _wrong_size_moments, r"momentum\[0\]"),
    (dict(), _bad_undo_log, r"lowrank_undo_logs\[0\]\[0\]"),
])
def test_mismatched_state_is_refused_and_nothing_changes(saved_from, corrupt, match):
    """The saved state differs in seed, lr and step too: any partial load would show."""
    _, other = _trained(seed=9, lr=5e-3, steps=3, **saved_from)
    bad = other.state_dict()
    if corrupt is not None:
        corrupt(bad)
    net, opt = _trained()
    twin_net, twin = _trained()
    before = opt.state_dict()
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert_states_equal(opt.state_dict(), before)
    assert opt.base_seed == 0 and opt.param_groups[0]["lr"] == 1e-2
    for _ in range(2):  # and it trains on exactly as an untouched twin
        opt.step(net_loss(net))
        twin.step(net_loss(twin_net))
    assert_same(snapshot(net), snapshot(twin_net), "after a refused load")
