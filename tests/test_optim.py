"""Optimizers (zokernels.optim): convergence, exactness, resume, trajectories, validation.

Small models built here; the CPU backend (auto) runs them. Fixed seeds throughout.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from zokernels import Trajectory, noise, perturb_
from zokernels.integrations import find_transformer_layers
from zokernels.optim import LeZO, MeZO, PseuZO, TeZO

from helpers import assert_bits_equal

IN, HIDDEN, OUT = 12, 24, 4


class TinyNet(torch.nn.Module):
    """Two residual blocks (a ModuleList, like a transformer's stack) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(IN, HIDDEN)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(HIDDEN), torch.nn.Linear(HIDDEN, HIDDEN),
                                torch.nn.Tanh()) for _ in range(3))
        self.head = torch.nn.Linear(HIDDEN, OUT)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _task(shift: float, seed: int, n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    w = torch.randn(IN, OUT, generator=torch.Generator().manual_seed(7))
    return x, torch.tanh(x @ w) + shift * (1.0 + 0.3 * x[:, :OUT])


_PRETRAINED: dict[str, torch.Tensor] = {}


def pretrained(dtype: torch.dtype = torch.float32) -> TinyNet:
    """A TinyNet trained with Adam on task A (cached), then cast to dtype."""
    if not _PRETRAINED:
        torch.manual_seed(0)
        net = TinyNet()
        x, y = _task(0.0, seed=1)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        _PRETRAINED.update({k: v.detach().clone() for k, v in net.state_dict().items()})
    net = TinyNet()
    net.load_state_dict(_PRETRAINED)
    return net.to(dtype)


def finetune_loss(net: TinyNet):
    x, y = _task(0.5, seed=2)  # the related, shifted task
    dtype = next(net.parameters()).dtype
    return lambda: torch.nn.functional.mse_loss(net(x.to(dtype)).float(), y)


def make(name: str, net: TinyNet, **kw):
    common = dict(lr=kw.pop("lr", 5e-3), eps=kw.pop("eps", 1e-3), seed=kw.pop("seed", 0))
    if name == "mezo":
        return MeZO(net.named_parameters(), **common, **kw)
    if name == "lezo":
        return LeZO(net.named_parameters(), layers=list(net.blocks), n_active=1, **common, **kw)
    if name == "tezo":
        return TeZO(net.named_parameters(), rank=4, **common, **kw)
    if name == "pseuzo":
        return PseuZO([(n, p) for n, p in net.named_parameters() if not n.startswith("head")],
                      **common, **kw)
    raise AssertionError(name)


def run_steps(name: str, opt, net: TinyNet, steps: int, closure=None):
    loss = closure or finetune_loss(net)
    if name == "pseuzo":
        x, y = _task(0.5, seed=2)
        dtype = next(net.parameters()).dtype
        for _ in range(steps):
            opt.step(lambda: net.features(x.to(dtype)),
                     lambda h: torch.nn.functional.mse_loss(net.head(h).float(), y))
    else:
        for _ in range(steps):
            opt.step(loss)


def snapshot(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def assert_same_weights(net: torch.nn.Module, expected: list[torch.Tensor], what: str) -> None:
    for (name, p), e in zip(net.named_parameters(), expected):
        assert_bits_equal(p.detach(), e, what=f"{what}: {name}")


ALL = ["mezo", "lezo", "tezo", "pseuzo"]


# -- convergence --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,steps,lr,margin", [
    ("mezo", 150, 5e-3, 0.5), ("lezo", 150, 5e-3, 0.5), ("tezo", 150, 2e-3, 0.3),
    ("pseuzo", 150, 5e-3, 0.5)])
def test_finetune_reduces_loss(name, steps, lr, margin):
    net = pretrained()
    loss = finetune_loss(net)
    before = loss().item()
    opt = make(name, net, lr=lr, seed=1)
    run_steps(name, opt, net, steps)
    after = loss().item()
    assert after < (1 - margin) * before, f"{name}: {before:.4f} -> {after:.4f}"


def _mezo_loop(net: TinyNet, steps: int, lr: float, eps: float, seed: int) -> float:
    """The reference: MeZO's per-tensor loop with torch.normal (MeZO's trainer, restated)."""
    loss = finetune_loss(net)
    params = [p for p in net.parameters()]
    gen = torch.Generator().manual_seed(seed)

    def perturb(s: int, scale: float) -> None:
        g = torch.Generator().manual_seed(s)
        for p in params:
            z = torch.normal(0, 1, size=p.shape, generator=g)
            p.data = p.data + scale * z * eps

    with torch.no_grad():
        for _ in range(steps):
            s = int(torch.randint(0, 2**31, (1,), generator=gen))
            perturb(s, 1)
            lp = loss().item()
            perturb(s, -2)
            lm = loss().item()
            perturb(s, 1)
            g_proj = (lp - lm) / (2 * eps)
            z_gen = torch.Generator().manual_seed(s)
            for p in params:
                z = torch.normal(0, 1, size=p.shape, generator=z_gen)
                p.data = p.data - lr * g_proj * z
    return loss().item()


def test_mezo_matches_the_plain_loop_on_average():
    """Same hyperparameters, different noise streams: the mean final loss over 4 seeds agrees
    within 15% (the seed-to-seed spread of either is about 5-10% here)."""
    steps, lr, eps = 120, 5e-3, 1e-3
    ours, loop = [], []
    for seed in range(4):
        net = pretrained()
        opt = MeZO(net.named_parameters(), lr=lr, eps=eps, seed=seed)
        run_steps("mezo", opt, net, steps)
        ours.append(finetune_loss(net)().item())
        loop.append(_mezo_loop(pretrained(), steps, lr, eps, seed))
    start = finetune_loss(pretrained())().item()
    mean_ours, mean_loop = sum(ours) / 4, sum(loop) / 4
    assert mean_loop < 0.85 * start and mean_ours < 0.85 * start
    assert abs(mean_ours - mean_loop) <= 0.15 * mean_loop, (ours, loop)


# -- exactness ---------------------------------------------------------------------------------

class Boom(Exception):
    pass


def _failing_closure(net, fail_at: int, exc=Boom):
    loss = finetune_loss(net)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise exc("closure failed")
        return loss()
    return closure


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["mezo", "lezo"])
@pytest.mark.parametrize("fail_at", [1, 2])
def test_closure_raising_restores_exact_bits(name, dtype, fail_at):
    net = pretrained(dtype)
    opt = make(name, net)
    run_steps(name, opt, net, 3)  # mid-run, logs sized
    before = snapshot(net)
    exc = KeyboardInterrupt if fail_at == 2 else Boom
    with pytest.raises(exc):
        opt.step(_failing_closure(net, fail_at, exc))
    assert_same_weights(net, before, f"{name} after a failure at call {fail_at}")
    run_steps(name, opt, net, 1)  # still usable


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fail_in", ["forward1", "forward2", "loss_fn"])
def test_pseuzo_failure_restores_exact_bits(dtype, fail_in):
    net = pretrained(dtype)
    opt = make("pseuzo", net)
    run_steps("pseuzo", opt, net, 2)
    before = snapshot(net)
    x, y = _task(0.5, seed=2)
    calls = {"n": 0}

    def forward():
        calls["n"] += 1
        if (fail_in, calls["n"]) in (("forward1", 1), ("forward2", 2)):
            raise Boom("forward failed")
        return net.features(x.to(dtype))

    def loss_fn(h):
        if fail_in == "loss_fn":
            raise Boom("loss failed")
        return torch.nn.functional.mse_loss(net.head(h).float(), y)

    with pytest.raises(Boom):
        opt.step(forward, loss_fn)
    assert_same_weights(net, before, f"pseuzo after a failure in {fail_in}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fail_at", [1, 2])
def test_tezo_failure_restores_every_bit(dtype, fail_at):
    """The 2-D weights too: low-rank recovery plus their own undo logs (docs/undo-log.md)."""
    net = pretrained(dtype)
    opt = make("tezo", net, probe="inplace")  # the in-place probes' logs (virtual probes:
    # test_tezo_virtual.py)
    run_steps("tezo", opt, net, 2)
    before = snapshot(net)
    exc = KeyboardInterrupt if fail_at == 2 else Boom
    with pytest.raises(exc):
        opt.step(_failing_closure(net, fail_at, exc))
    for (name, p), b in zip(net.named_parameters(), before):
        assert_bits_equal(p.detach(), b, what=f"{name} after a failure at call {fail_at}")
    lowrank_bytes = sum(log.nbytes for pair in opt._lowrank_logs for log in pair)
    assert 0 < lowrank_bytes < opt.undo_log_bytes
    run_steps("tezo", opt, net, 1)  # still usable


def test_tezo_without_logs_restores_by_recovery_only():
    """exact_restore=False: no log memory; recovery alone gives back nearly every bit."""
    net = pretrained(torch.bfloat16)
    opt = make("tezo", net, exact_restore=False, probe="inplace")
    run_steps("tezo", opt, net, 2)
    before = snapshot(net)
    with pytest.raises(Boom):
        opt.step(_failing_closure(net, 2))
    assert opt.undo_log_bytes == 0
    moved = total = 0
    for p, b in zip(net.parameters(), before):
        if p.dim() == 2:
            moved += int((p.detach().view(torch.int16) != b.view(torch.int16)).sum())
            total += p.numel()
    assert 0 < moved <= 0.1 * total  # what the logs of the exact mode are for


@pytest.mark.parametrize("name", ALL)
def test_nonfinite_loss_skips_restores_warns_counts(name):
    net = pretrained(torch.bfloat16)
    opt = make(name, net)
    run_steps(name, opt, net, 2)
    before = snapshot(net)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        if name == "pseuzo":
            opt.step(lambda: net.features(torch.randn(4, IN).bfloat16()),
                     lambda h: h.float().sum() * float("nan"))
        else:
            opt.step(lambda: torch.tensor(float("inf")))
    assert opt.zo_state["skipped_steps"] == 1
    assert_same_weights(net, before, f"{name} after a skipped step")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lr_zero_step_restores_every_bit(dtype):
    """The MeZO loop leaves ~47% of bf16 weights off by an ulp after a step with lr = 0; with the
    undo logs no element moves; without them (recovery only) at most 10%."""
    torch.manual_seed(3)
    weights = (torch.randn(64, 512) * 0.02).to(dtype)
    exact = weights.clone()
    opt = MeZO([("w", weights)], lr=0.0, eps=1e-3, seed=5)
    for _ in range(3):
        opt.step(lambda: weights.float().sum())
    assert_bits_equal(weights, exact, what="after 3 lr=0 steps")

    recovery_only = exact.clone()
    opt = MeZO([("w", recovery_only)], lr=0.0, eps=1e-3, seed=5, exact_restore=False)
    opt.step(lambda: recovery_only.float().sum())
    moved = (recovery_only.view(torch.int16 if dtype != torch.float32 else torch.int32)
             != exact.view(torch.int16 if dtype != torch.float32 else torch.int32))
    # recovery alone: 8.3% in bf16 / fp16, 11.2% in fp32 (docs/noise-contract.md)
    assert moved.float().mean().item() <= (0.10 if dtype != torch.float32 else 0.125)


def test_update_equals_an_update_of_the_unperturbed_weights():
    """With the logs, a step's result is round(decay * theta + c * z): bit for bit."""
    torch.manual_seed(4)
    w = (torch.randn(1000) * 0.02).to(torch.bfloat16)
    reference = w.clone()
    opt = MeZO([("w", w)], lr=0.1, eps=1e-2, seed=9, weight_decay=0.5)
    opt.step(lambda: (w.float() ** 2).sum())
    (_, seeds, coefs, decays, _), = opt.trajectory.records()
    perturb_(reference, seeds, coefs[0], decay=decays[0], keys=opt.spaces[0].keys)
    assert_bits_equal(w, reference, what="fused exact update")


def test_lezo_leaves_unselected_layers_untouched():
    net = pretrained(torch.bfloat16)
    opt = make("lezo", net)
    loss = finetune_loss(net)
    blocks = list(net.blocks)
    chosen_counts = [0] * len(blocks)
    for _ in range(6):
        before = [snapshot(b) for b in blocks]
        opt.step(loss)
        (_, _, _, _, chosen), = list(opt.trajectory.records())[-1:]
        assert len(chosen) == 1
        for i, block in enumerate(blocks):
            if i in chosen:
                chosen_counts[i] += 1
                assert any(not torch.equal(p, b) for p, b in zip(block.parameters(), before[i]))
            else:
                assert_same_weights(block, before[i], f"unselected block {i}")
    assert sum(chosen_counts) == 6 and max(chosen_counts) < 6


def test_pseuzo_fused_window_update_equals_sequential_reference():
    torch.manual_seed(5)
    w = torch.randn(300) * 0.02
    theta0 = w.clone()
    opt = PseuZO([("w", w)], lr=0.05, eps=1e-3, seed=2, window=3, beta=0.7)
    for _ in range(4):
        opt.step(lambda: torch.stack([w[:10].sum(), (w[10:20] ** 2).sum()]),
                 lambda o: (o ** 2).sum())
    # sequential: each recorded update as its own float32 sum of noise vectors, in seed order
    key = opt.spaces[0].keys[0]
    expected = theta0.clone()
    for _, seeds, coefs, decays, _ in opt.trajectory.records():
        assert len(seeds) <= 3
        total = torch.zeros(300)
        for seed, c in zip(seeds, coefs[0]):
            total = total + torch.tensor(c, dtype=torch.float32) * noise(300, seed, key)
        expected = expected * decays[0] + total
    assert_bits_equal(w, expected, what="PseuZO fused K-seed update")
    assert opt.window_bytes == 3 * 2 * 4


def test_pseuzo_beta_zero_is_plain_zo_sgd():
    torch.manual_seed(6)
    w = torch.randn(200) * 0.02
    opt = PseuZO([("w", w)], lr=0.05, eps=1e-3, seed=2, beta=0.0)
    for _ in range(3):
        opt.step(lambda: w[:5] * 1.0, lambda o: (o ** 2).sum())
    records = list(opt.trajectory.records())
    assert len(records) == 3
    for _, seeds, coefs, _, _ in records:
        assert len(seeds) == 1 and len(coefs[0]) == 1  # only the current seed acts
        assert coefs[0][0] != 0.0


def test_tezo_state_is_low_rank():
    """Two r-vectors (the moments) per matrix: U and V are drawn per pass, not kept."""
    net = pretrained()
    opt = TeZO(net.named_parameters(), rank=4, variant="adam", lr=1e-3)
    expected = 0
    for p in net.parameters():
        if p.dim() == 2:
            expected += 2 * min(4, *p.shape)
    assert opt.state_numel == expected
    assert opt.state_numel < sum(p.numel() for p in net.parameters() if p.dim() == 2) / 2


@pytest.mark.parametrize("variant", ["sgd", "momentum", "adam"])
def test_tezo_variants_reduce_loss(variant):
    net = pretrained()
    loss = finetune_loss(net)
    before = loss().item()
    opt = TeZO(net.named_parameters(), rank=4, variant=variant, seed=1,
               lr=5e-3 if variant != "adam" else 3e-3, eps=1e-3)
    for _ in range(100):
        opt.step(loss)
    assert loss().item() < 0.7 * before


# -- state, resume, trajectory -------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_resume_is_bit_identical(name):
    net = pretrained(torch.bfloat16)
    opt = make(name, net, weight_decay=0.1, **({"variant": "momentum"} if name == "tezo" else {}))
    run_steps(name, opt, net, 4)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    run_steps(name, opt, net, 4)
    uninterrupted = snapshot(net)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = pretrained(torch.bfloat16)
    resumed.load_state_dict(saved["model"])
    opt2 = make(name, resumed, weight_decay=0.1,
                **({"variant": "momentum"} if name == "tezo" else {}))
    opt2.load_state_dict(saved["opt"])
    run_steps(name, opt2, resumed, 4)
    assert_same_weights(resumed, uninterrupted, f"{name} resumed")


@pytest.mark.parametrize("name", ["mezo", "lezo", "tezo", "pseuzo"])
def test_trajectory_replays_bit_for_bit(name, tmp_path):
    net = pretrained(torch.bfloat16)
    opt = make(name, net, weight_decay=0.05)
    run_steps(name, opt, net, 6)
    opt.trajectory.save(tmp_path / "run.pt")
    fresh = pretrained(torch.bfloat16)
    Trajectory.load(tmp_path / "run.pt").replay(fresh)
    assert_same_weights(fresh, snapshot(net), f"{name} replay")


def test_trajectory_replays_on_another_backend_within_tolerance(tmp_path):
    net = pretrained()
    opt = make("mezo", net)
    run_steps("mezo", opt, net, 5)
    opt.trajectory.save(tmp_path / "run.pt")
    fresh = pretrained()
    Trajectory.load(tmp_path / "run.pt").replay(fresh, backend="torch")
    for p, q in zip(fresh.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_tezo_trajectory_replays_within_tolerance(tmp_path):
    net = pretrained()
    opt = make("tezo", net, variant="adam", lr=2e-4)
    run_steps("tezo", opt, net, 5)
    opt.trajectory.save(tmp_path / "run.pt")
    fresh = pretrained()
    Trajectory.load(tmp_path / "run.pt").replay(fresh)
    for p, q in zip(fresh.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def test_20k_step_mezo_trajectory_is_under_a_megabyte(tmp_path):
    from zokernels.optim._seeds import step_seed

    trajectory = Trajectory("mezo", {"base_seed": 3, "dist": "gaussian", "groups": [
        {"param_names": ["w"], "numel": [1], "keys": [0]}]})
    for step in range(20_000):
        trajectory.record(step, [step_seed(3, step)], [[-1e-6 * math.sin(step)]], [1.0])
    trajectory.save(tmp_path / "t.pt")
    size = (tmp_path / "t.pt").stat().st_size
    assert size < 1_000_000, size
    assert Trajectory.load(tmp_path / "t.pt").state_dict()["seeds"] is None  # derived, not stored


# -- conventions -----------------------------------------------------------------------------------

def test_global_rng_untouched_and_keys_survive_wrapper_prefixes():
    a, b = pretrained(), pretrained()
    state = torch.random.get_rng_state()
    opt_a = MeZO(a.named_parameters(), lr=1e-3, seed=4)
    opt_b = MeZO([("module." + n, p) for n, p in b.named_parameters()], lr=1e-3, seed=4)
    run_steps("mezo", opt_a, a, 2)
    run_steps("mezo", opt_b, b, 2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert_same_weights(b, snapshot(a), "module.-prefixed names")


def test_param_groups_and_scheduler():
    net = pretrained()
    groups = [{"params": list(net.embed.named_parameters()), "lr": 0.0},
              {"params": [(n, p) for n, p in net.named_parameters()
                          if not n.startswith("embed")]}]
    opt = MeZO(groups, lr=1e-3, seed=1)
    embed_before = snapshot(net.embed)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loss = finetune_loss(net)
    for _ in range(2):
        opt.step(loss)
        scheduler.step()
    assert_same_weights(net.embed, embed_before, "lr=0 group")
    assert opt.param_groups[1]["lr"] == pytest.approx(2.5e-4)
    assert [rec[2][0] for rec in opt.trajectory.records()][0] == [0.0]


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1.0}, "lr"), ({"eps": 0.0}, "eps"), ({"weight_decay": float("nan")}, "weight_decay"),
    ({"dist": "cauchy"}, "dist"), ({"seed": -1}, "seed"), ({"n_spsa": 0}, "n_spsa"),
    ({"rounding": "up"}, "rounding")])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MeZO(pretrained().named_parameters(), **kwargs)


def test_bad_arguments_of_each_optimizer():
    net = pretrained()
    with pytest.raises(ValueError, match="n_active"):
        LeZO(net.named_parameters(), layers=list(net.blocks), n_active=5)
    with pytest.raises(ValueError, match="exactly one"):
        LeZO(net.named_parameters(), layers=list(net.blocks))
    with pytest.raises(ValueError, match="variant"):
        TeZO(net.named_parameters(), variant="lion")
    with pytest.raises(ValueError, match="rank"):
        TeZO(net.named_parameters(), rank=0)
    with pytest.raises(ValueError, match="beta"):
        PseuZO(net.named_parameters(), beta=1.5)
    with pytest.raises(ValueError, match="window"):
        PseuZO(net.named_parameters(), window=0)
    with pytest.raises(ValueError, match="closure"):
        MeZO(net.named_parameters()).step()
    with pytest.raises(TypeError, match="named_parameters"):
        MeZO(net)


def test_closure_must_return_a_scalar_and_nothing_moves():
    net = pretrained()
    opt = MeZO(net.named_parameters(), lr=1e-3)
    before = snapshot(net)
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: torch.ones(3))
    assert_same_weights(net, before, "after a bad closure")


def test_find_transformer_layers():
    net = TinyNet()
    assert find_transformer_layers(net) == list(net.blocks)
    with pytest.raises(ValueError, match="no repeated block"):
        find_transformer_layers(torch.nn.Linear(3, 3))


def test_frozen_parameters_are_skipped():
    net = pretrained()
    net.embed.weight.requires_grad_(False)
    frozen = net.embed.weight.detach().clone()
    opt = MeZO(net.named_parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_steps("mezo", opt, net, 2)
    assert_bits_equal(net.embed.weight.detach(), frozen, what="frozen weight")
