"""TeZO's virtual probes (probe="virtual") and deferred updates (update="deferred"):
the probe losses against a float64 evaluation of theta + eps Z, the updates bit for bit against
the in-place path, the first step's check of who reads each weight (tied head, a head read as
weight.t(), a subclass with its own forward, an unread weight), exceptions at every closure call,
merges (explicit, model state_dict / load_state_dict / forward, optimizer state), replay and
resume. Small models built here; the CPU backend (auto) runs them."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from torch.nn.modules import module as nn_module

from zokernels import Trajectory, noise
from zokernels.optim import TeZO
from zokernels.optim.tezo import factor_seed, tau_seed
from zokernels.space import key_from_name

from helpers import assert_bits_equal, assert_same, snapshot, ulp

VOCAB, DIM, HIDDEN = 13, 8, 12


class LM(torch.nn.Module):
    """Embedding, a residual MLP block, and a head tied to the embedding (read by an nn.Linear)."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.fc = torch.nn.Linear(DIM, HIDDEN)
        self.norm = torch.nn.LayerNorm(HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, DIM, bias=False)
        self.head = torch.nn.Linear(DIM, VOCAB, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return h + self.out(torch.tanh(self.norm(self.fc(h))))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(ids))


class TransposedHead(LM):
    """MobileBERT-style: the head's weight is read as weight.t() outside its module."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hidden(ids) @ self.head.weight.t()


class OffsetEmbedding(torch.nn.Embedding):
    """OPT-style learned positions: a subclass whose forward takes another argument."""

    def forward(self, ids: torch.Tensor, offset: int = 2) -> torch.Tensor:  # type: ignore[override]
        return super().forward(ids + offset)


class WithSpare(LM):
    def __init__(self) -> None:
        super().__init__()
        self.spare = torch.nn.Linear(DIM, DIM)  # never called: its weight is read by nobody


class WithPositions(LM):
    def __init__(self) -> None:
        super().__init__()
        self.pos = OffsetEmbedding(8, DIM)
        self.spare = torch.nn.Linear(DIM, DIM)  # never called: its weight is read by nobody

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        return self.head(self.hidden(ids) + self.pos(positions, offset=0))


def make_model(kind=LM, dtype: torch.dtype = torch.float32, **kw) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = kind(**kw)
    return model.to(dtype)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, VOCAB, (4, 6), generator=g),
            torch.randint(0, VOCAB, (4, 6), generator=g))


def lm_loss(model: torch.nn.Module, log: list | None = None):
    ids, targets = batch()

    def closure():
        logits = model(ids).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        if log is not None:
            log.append(loss.item())
        return loss
    return closure


def alternating(model: torch.nn.Module, steps: int):
    """Runs the model (its reads are tracked) but returns 1, 0, 1, 0, ...: the same projected
    gradient whatever the probes computed."""
    values = iter([1.0, 0.0] * steps)
    forward = lm_loss(model)

    def closure():
        forward()
        return next(values)
    return closure


def hooks_left(model: torch.nn.Module) -> list[str]:
    left = [name for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._state_dict_pre_hooks
            or m._load_state_dict_pre_hooks]
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        left.append("<global>")
    return left


def virtual_names(opt: TeZO) -> set[str]:
    return {n for names in opt._virtual_names() for n in names}


def spec_z(name: str, shape: tuple[int, int], rank: int, seed: int, step: int) -> torch.Tensor:
    """Z = U diag(tau) V^T / sqrt(r) of a weight, float64, from the documented draws."""
    m, n = shape
    r = min(rank, m, n)
    key = key_from_name(name)
    u = noise(m * r, factor_seed(seed), key).view(m, r).double()
    v = noise(n * r, factor_seed(seed), key, offset=m * r).view(n, r).double()
    tau = noise(r, tau_seed(seed, step), key).double()
    return u @ torch.diag(tau) @ v.T / math.sqrt(r)


def float64_loss(model: torch.nn.Module, held: dict[str, torch.Tensor], scale: float,
                 rank: int, seed: int, step: int) -> float:
    """The loss at theta + scale Z in float64: 2-D weights theta plus scale Z exactly, 1-D
    parameters as held (their dense probe)."""
    twin = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, p in twin.named_parameters():
            value = held[name].double()
            if p.dim() == 2:
                value = value + scale * spec_z(name, tuple(p.shape), rank, seed, step)
            p.copy_(value)
    return lm_loss(twin)().item()


# -- the probes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [LM, TransposedHead, WithPositions])
def test_probe_losses_are_theta_plus_eps_z(kind):
    """fp32: both probe losses equal the float64 loss at theta +- eps Z to 2e-6 relative (the
    float32 forward's own rounding); the perturbation moves the loss by > 100x that. Weights read
    outside their module (tied head read as weight.t(), a subclass, an unread weight) are on the
    in-place path; a read elsewhere costs one more closure call in the first step."""
    eps, rank, seed = 1e-2, 3, 4
    model = make_model(kind)
    opt = TeZO(model.named_parameters(), lr=0.0, eps=eps, seed=seed, rank=rank)
    seen, held = [], []
    theta = snapshot(model)

    def closure():  # the 1-D parameters hold their dense probe (reading them is not tracked)
        held.append({**theta, **{n: p.detach().clone() for n, p in model.named_parameters()
                                 if p.dim() == 1}})
        return lm_loss(model, seen)()

    opt.step(closure)
    expected_virtual = {LM: {"embed.weight", "fc.weight", "out.weight"},
                        TransposedHead: {"fc.weight", "out.weight"},
                        WithPositions: {"embed.weight", "fc.weight", "out.weight"}}[kind]
    assert virtual_names(opt) == expected_virtual
    calls = 2 if kind is LM else 3  # a read elsewhere: the +eps forward ran again
    assert len(seen) == calls
    base = lm_loss(model)()
    for loss, state, sign in zip(seen[-2:], held[-2:], (1.0, -1.0)):
        reference = float64_loss(model, state, sign * eps, rank, seed, 0)
        assert abs(loss - reference) <= 2e-6 * abs(reference), (loss, reference)
        assert abs(reference - base.item()) > 2e-4 * abs(reference)
    # later steps: no tracking, no extra call, the same agreement
    seen.clear()
    held.clear()
    opt.step(closure)
    assert len(seen) == 2
    reference = float64_loss(model, held[0], eps, rank, seed, 1)
    assert abs(seen[0] - reference) <= 2e-6 * abs(reference)


def test_bf16_probe_losses_agree_with_the_inplace_probes():
    """bf16: the virtual probes round theta + eps Z only through the forward's bf16 arithmetic,
    the in-place probes round it into the weights first; both are within bf16 forward error of
    the float64 loss (measured differences ~1e-3 relative, docs/tezo.md)."""
    eps, rank, seed = 1e-2, 3, 4
    losses = {}
    for probe in ("virtual", "inplace"):
        model = make_model(dtype=torch.bfloat16)
        seen = []
        opt = TeZO(model.named_parameters(), lr=0.0, eps=eps, seed=seed, rank=rank, probe=probe)
        opt.step(lm_loss(model, seen))
        losses[probe] = seen
    for plus_minus in range(2):
        v, i = losses["virtual"][plus_minus], losses["inplace"][plus_minus]
        assert abs(v - i) <= 1e-2 * abs(i), (v, i)
    assert losses["virtual"][0] != losses["virtual"][1]


@pytest.mark.parametrize("variant", ["sgd", "adam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_updates_equal_the_inplace_path_bit_for_bit(variant, dtype):
    """Same projected gradients (alternating losses): the virtual-probe run writes the in-place
    run's weights, every bit, weight decay and stochastic rounding included."""
    models, opts = [], []
    for probe in ("virtual", "inplace"):
        model = make_model(WithSpare, dtype)
        rounding = "stochastic" if dtype == torch.bfloat16 else "nearest"
        opts.append(TeZO(model.named_parameters(), lr=1e-2, eps=1e-3, seed=2, rank=3,
                         variant=variant, weight_decay=0.1, rounding=rounding, probe=probe))
        models.append(model)
    for opt, model in zip(opts, models):
        for _ in range(3):
            opt.step(alternating(model, 1))
    assert virtual_names(opts[0]) == {"embed.weight", "fc.weight", "out.weight"}
    assert_same(snapshot(models[0]), snapshot(models[1]), "virtual vs in-place probes")
    assert not torch.equal(models[0].fc.weight, make_model(WithSpare, dtype).fc.weight)


# -- exceptions --------------------------------------------------------------------------------

@pytest.mark.parametrize("update", ["inplace", "deferred"])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("fail_at", [1, 2])
@pytest.mark.parametrize("steps_before", [0, 2])
def test_a_failing_closure_leaves_weights_and_modules_as_they_were(update, exc, fail_at,
                                                                   steps_before):
    """At each closure call (halfway through a forward), in the tracked first step and in a later
    one: every weight bit-identical, no hook left on any module (nor a global one), pending
    deferred updates unchanged; training then continues exactly as a twin that never failed."""
    model, twin = make_model(dtype=torch.bfloat16), make_model(dtype=torch.bfloat16)
    opt, twin_opt = [TeZO(m.named_parameters(), lr=1e-2, eps=1e-3, seed=3, rank=3,
                          variant="momentum", weight_decay=0.1, update=update)
                     for m in (model, twin)]
    for _ in range(steps_before):
        opt.step(lm_loss(model))
        twin_opt.step(lm_loss(twin))
    before = snapshot(model)
    watched = hooks_left(model)  # deferred: the merge-on-observe hooks of pending updates
    calls = []
    good = lm_loss(model)
    ids, _ = batch()

    def failing():  # raises halfway through the forward: the probe hook has already run
        calls.append(1)
        if len(calls) == fail_at:
            model.fc(model.embed(ids))
            raise exc("boom")
        return good()

    with pytest.raises(exc):
        opt.step(failing)
    assert_same(snapshot(model), before, f"after a failure at call {fail_at}")
    assert hooks_left(model) == watched
    assert not opt._step_in_progress()
    for _ in range(2):
        opt.step(lm_loss(model))
        twin_opt.step(lm_loss(twin))
    opt.merge()
    twin_opt.merge()
    assert_same(snapshot(model), snapshot(twin), "after the failure, against the twin")
    assert hooks_left(model) == []


# -- deferred updates ------------------------------------------------------------------------------

def test_deferred_update_is_one_rounding_of_the_exact_sum():
    """Four sgd steps with weight decay, merged once: each virtual weight is the float64
    D W + sum_t (prod_{s>t} d) (-lr g_t Z_t) rounded once (within half an ulp, plus float32
    accumulation); the parameters are not written before the merge."""
    lr, wd, rank, seed, steps = 5e-3, 0.5, 3, 6, 4
    model = make_model(dtype=torch.bfloat16)
    initial = snapshot(model)
    opt = TeZO(model.named_parameters(), lr=lr, eps=1e-3, seed=seed, rank=rank,
               weight_decay=wd, update="deferred")
    for _ in range(steps):
        opt.step(alternating(model, 1))
    for name in ("embed.weight", "fc.weight", "out.weight"):
        assert_bits_equal(dict(model.named_parameters())[name].detach(), initial[name],
                          what=f"{name} before the merge")
    opt.merge()
    d = 1.0 - lr * wd
    grads = opt.trajectory.extra["grad0"]
    for name in ("embed.weight", "fc.weight", "out.weight"):
        exact = initial[name].double() * d ** steps
        for t in range(steps):
            exact -= d ** (steps - 1 - t) * lr * grads[t] * spec_z(
                name, tuple(exact.shape), rank, seed, t)
        got = dict(model.named_parameters())[name].detach()
        err = (got.double() - exact).abs()
        bound = 0.5 * ulp(exact, torch.bfloat16) + 1e-6 * exact.abs() + 1e-9
        assert bool((err <= bound).all()), f"{name}: max err {err.max().item()}"
    changed = dict(model.named_parameters())["fc.weight"].detach()
    assert not torch.equal(changed, initial["fc.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_merge_between_steps_costs_at_most_one_rounding(dtype):
    """Same gradients; merging after step 3 of 6 as well differs from merging once at the end by
    the first merge's rounding (half an ulp of the weights then, times the decay) and the final
    one (half an ulp), plus the float32 evaluation of the low-rank sum (a few float32 ulps of the
    tensor's scale)."""
    results, middle = [], {}
    for merge_at in (None, 3):
        model = make_model(dtype=dtype)
        opt = TeZO(model.named_parameters(), lr=2e-2, eps=1e-3, seed=1, rank=3,
                   variant="adam", weight_decay=0.1, update="deferred")
        for step in range(6):
            if step == merge_at:
                opt.merge()
                middle = snapshot(model)
            opt.step(alternating(model, 1))
        opt.merge()
        results.append(snapshot(model))
    once, twice = results
    for name in ("embed.weight", "fc.weight", "out.weight"):
        diff = (twice[name].double() - once[name].double()).abs()
        bound = (ulp(middle[name], dtype) + ulp(once[name], dtype)
                 + 2.0 ** -21 * once[name].double().abs().max())
        assert bool((diff <= bound).all()), f"{name}: {(diff / bound).max().item()}"
        assert not torch.equal(once[name], middle[name])
    for name in ("fc.bias", "norm.weight", "norm.bias"):  # in-place: unaffected by merges
        assert_bits_equal(twice[name], once[name], what=name)


def test_the_model_merges_before_it_can_be_observed():
    """model.state_dict(), a forward outside a step, model.load_state_dict() and the optimizer's
    state_dict() merge first; afterwards no hook stays on the model."""
    def trained():
        model = make_model(dtype=torch.bfloat16)
        opt = TeZO(model.named_parameters(), lr=1e-2, eps=1e-3, seed=5, rank=3,
                   update="deferred")
        for _ in range(2):
            opt.step(lm_loss(model))
        return model, opt

    reference, ref_opt = trained()
    assert hooks_left(reference)  # pending: watched
    ref_opt.merge()
    merged = snapshot(reference)
    assert hooks_left(reference) == []

    model, _ = trained()
    saved = model.state_dict()
    assert_same({n: saved[n] for n in merged}, merged, "model.state_dict()")
    assert_same(snapshot(model), merged, "after model.state_dict()")

    model, _ = trained()
    lm_loss(model)()
    assert_same(snapshot(model), merged, "after a forward")

    model, opt = trained()
    opt.state_dict()
    assert_same(snapshot(model), merged, "after opt.state_dict()")

    model, _ = trained()
    model.load_state_dict({n: t.clone() for n, t in saved.items()})
    assert_same(snapshot(model), merged, "after model.load_state_dict()")
    assert hooks_left(model) == []


def test_deferred_trajectory_replays_and_resumes_bit_for_bit(tmp_path):
    """Merges in the middle (model.state_dict(), a checkpoint) are recorded: the replay on the
    initial weights gives the run's weights, and a resume from the checkpoint continues it bit
    for bit."""
    model = make_model(WithPositions, torch.bfloat16)
    initial = snapshot(model)
    kw = dict(lr=1e-2, eps=1e-3, rank=3, variant="momentum", weight_decay=0.1,
              update="deferred")
    opt = TeZO(model.named_parameters(), seed=3, **kw)
    for _ in range(2):
        opt.step(lm_loss(model))
    model.state_dict()
    opt.step(lm_loss(model))
    checkpoint = {"model": copy.deepcopy(model.state_dict()),
                  "opt": copy.deepcopy(opt.state_dict())}
    for _ in range(3):
        opt.step(lm_loss(model))
    opt.merge()
    final = snapshot(model)
    assert opt.trajectory.extra["merge"] == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]

    opt.trajectory.save(tmp_path / "run.pt")
    replayed = make_model(WithPositions, torch.bfloat16)
    assert_same(snapshot(replayed), initial, "initial weights")
    Trajectory.load(tmp_path / "run.pt").replay(replayed)
    assert_same(snapshot(replayed), final, "replay")

    resumed = make_model(WithPositions, torch.bfloat16)
    resumed.load_state_dict(checkpoint["model"])
    opt2 = TeZO(resumed.named_parameters(), seed=9, **kw)
    opt2.load_state_dict(checkpoint["opt"])
    for _ in range(3):
        opt2.step(lm_loss(resumed))
    opt2.merge()
    assert_same(snapshot(resumed), final, "resumed")
    assert opt2.trajectory.extra["merge"] == opt.trajectory.extra["merge"]


def test_options_and_memory():
    model = make_model()
    with pytest.raises(ValueError, match="probe"):
        TeZO(model.named_parameters(), probe="lazy")
    with pytest.raises(ValueError, match="update"):
        TeZO(model.named_parameters(), update="later")
    with pytest.raises(ValueError, match="needs probe='virtual'"):
        TeZO(model.named_parameters(), probe="inplace", update="deferred")
    sizes = {}
    for probe, update in (("inplace", "inplace"), ("virtual", "inplace"),
                          ("virtual", "deferred")):
        model = make_model(dtype=torch.bfloat16)
        opt = TeZO(model.named_parameters(), lr=1e-2, rank=3, probe=probe, update=update)
        for _ in range(2):
            opt.step(lm_loss(model))
        sizes[(probe, update)] = opt.extra_memory_bytes
        assert opt.trajectory.meta["tezo_probe"] == probe
        assert opt.trajectory.meta["tezo_update"] == update
        if probe == "virtual":
            lowrank_logs = sum(log.nbytes for pair in opt._lowrank_logs for log in pair)
            assert lowrank_logs == 0
    assert sizes[("virtual", "inplace")] < sizes[("inplace", "inplace")]


def _cached_factor_bytes(opt: TeZO) -> int:
    """Bytes of every virtual weight's U, V once, in the weight's dtype (a tied head shares its
    embedding's)."""
    return sum((w.shape[0] + w.shape[1]) * part.ranks[j] * w.element_size()
               for part in opt._virtual.parts for j, w in enumerate(part.weights))


@pytest.mark.parametrize("update", ["inplace", "deferred"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_factor_cache_changes_memory_never_a_result(dtype, update):
    """The virtual probes' factors kept across probes and steps (cast to the forward's dtype)
    give the losses, weights, moments and trajectory of drawing them in every hook call, bit for
    bit; the cache holds each virtual weight's factors once and extra_memory_bytes counts
    exactly its bytes."""
    runs = {}
    for cache in (0.0, 1.0):
        model = make_model(dtype=dtype)
        seen: list[float] = []
        opt = TeZO(model.named_parameters(), lr=1e-2, eps=1e-3, seed=3, rank=3, variant="adam",
                   weight_decay=0.5, update=update, factor_cache=cache)
        for _ in range(4):
            opt.step(lm_loss(model, seen))
        extra = opt.extra_memory_bytes
        opt.merge()
        runs[cache] = seen, snapshot(model), opt, extra
    (losses0, weights0, opt0, extra0), (losses1, weights1, opt1, extra1) = runs[0.0], runs[1.0]
    assert losses1 == losses0
    assert_same(weights1, weights0, "cached factors")
    for a, b in zip(opt0.lowrank, opt1.lowrank):
        assert_bits_equal(b.second, a.second, "second moments")
    assert opt1.trajectory.extra == opt0.trajectory.extra
    assert opt0._virtual.cache.nbytes == 0
    assert virtual_names(opt1) == {"embed.weight", "fc.weight", "out.weight"}  # head: tied
    assert opt1._virtual.cache.nbytes == _cached_factor_bytes(opt1) > 0
    assert extra1 - extra0 == opt1._virtual.cache.nbytes


def test_the_factor_cache_keeps_to_its_budget():
    """factor_cache is a fraction of the parameters' bytes: the cache never holds more, keeps
    what fits (the rest is drawn per hook call, with the same result), and refuses bad values
    by name."""
    model = make_model()
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    full = None
    for fraction in (1.0, 0.3, 0.0):  # 0.3: one of the three pairs of factors fits
        model, twin = make_model(), make_model()
        opt = TeZO(model.named_parameters(), lr=1e-2, rank=3, factor_cache=fraction)
        ref = TeZO(twin.named_parameters(), lr=1e-2, rank=3, factor_cache=0.0)
        for _ in range(2):
            opt.step(lm_loss(model))
            ref.step(lm_loss(twin))
        assert_same(snapshot(model), snapshot(twin), f"factor_cache={fraction}")
        cache = opt._virtual.cache
        assert cache.budget == int(fraction * param_bytes)
        assert cache.nbytes <= cache.budget
        full = cache.nbytes if full is None else full
        if fraction == 0.3:
            assert 0 < cache.nbytes < full
    for bad in (-0.1, 1.5, float("nan"), "all"):
        with pytest.raises(ValueError, match="factor_cache"):
            TeZO(make_model().named_parameters(), factor_cache=bad)


@pytest.mark.parametrize("changed", ["seed", "contract"])
def test_a_resume_redraws_the_factors_of_the_saved_run(changed):
    """An optimizer built with another seed (or contract: 1's normals against the default 3's)
    fills its cache, then loads a saved state, adopting its seed and contract: its next steps
    draw the saved run's factors, bit for bit that run's."""
    saved_kw = {"seed": 0, "contract": 1 if changed == "contract" else 3}
    built_kw = {"seed": 7 if changed == "seed" else 0, "contract": 3}
    model = make_model()
    opt = TeZO(model.named_parameters(), lr=1e-2, rank=3, variant="adam", factor_cache=1.0,
               **saved_kw)
    for _ in range(2):
        opt.step(lm_loss(model))
    saved, weights = copy.deepcopy(opt.state_dict()), snapshot(model)
    for _ in range(2):
        opt.step(lm_loss(model))
    expected = snapshot(model)
    other = make_model()
    resumed = TeZO(other.named_parameters(), lr=1e-2, rank=3, variant="adam", factor_cache=1.0,
                   **built_kw)
    resumed.step(lm_loss(other))  # its cache now holds the other seed's / contract's factors
    assert resumed._virtual.cache.nbytes > 0
    with torch.no_grad():
        for name, p in other.named_parameters():
            p.copy_(weights[name])
    resumed.load_state_dict(saved)
    for _ in range(2):
        resumed.step(lm_loss(other))
    assert_same(snapshot(other), expected, "resumed")
    assert resumed._virtual.cache.nbytes == _cached_factor_bytes(resumed)


@pytest.mark.parametrize("layout", ["two groups", "autocast"])
def test_the_factor_cache_with_groups_and_autocast(layout):
    """Two param groups (two parts: entries keyed by part and position), and a CPU bf16
    autocast forward of an fp32 model (the tied embedding's output fp32, the head's bf16: two
    entries for one weight): the same losses and weights as drawing per call."""
    runs = {}
    for cache in (0.0, 1.0):
        model = make_model()
        seen: list[float] = []
        if layout == "two groups":
            named = list(model.named_parameters())
            params = [{"params": named[:2]}, {"params": named[2:]}]
            closure = lm_loss(model, seen)
        else:
            params = model.named_parameters()
            plain = lm_loss(model, seen)

            def closure(plain=plain):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return plain()
        opt = TeZO(params, lr=1e-2, eps=1e-3, rank=3, variant="adam", factor_cache=cache)
        for _ in range(3):
            opt.step(closure)
        runs[cache] = seen, snapshot(model), opt
    (losses0, weights0, _), (losses1, weights1, opt1) = runs[0.0], runs[1.0]
    assert losses1 == losses0
    assert_same(weights1, weights0, layout)
    entries = opt1._virtual.cache._entries
    if layout == "two groups":
        assert len(opt1._virtual.parts) == 2 and {p for p, _ in entries} == {0, 1}
    else:
        dtypes = [set(kept) for _, kept in entries.values()]
        assert {torch.float32, torch.bfloat16} in dtypes, dtypes  # the tied embedding / head


def test_the_factor_cache_drops_the_entries_its_forwards_stopped_using():
    """A budget that holds every virtual weight's float32 factors once. Three steps under CPU
    bf16 autocast fill it with bf16 entries (and the embedding's fp32 one); with autocast off
    the forwards need float32 factors that no longer fit, so the entries unused in the last two
    probes make room: after one more step the cache holds exactly the float32 factors of every
    virtual weight. Losses and weights stay those of drawing per call."""
    runs = {}
    for with_cache in (False, True):
        model = make_model()
        seen: list[float] = []
        plain = lm_loss(model, seen)

        def autocast(plain=plain):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return plain()
        full = sum((w.shape[0] + w.shape[1]) * 3 * 4
                   for w in (model.embed.weight, model.fc.weight, model.out.weight))
        param_bytes = sum(p.numel() * 4 for p in model.parameters())
        opt = TeZO(model.named_parameters(), lr=1e-2, eps=1e-3, rank=3,
                   factor_cache=(full + 0.5) / param_bytes if with_cache else 0.0)
        for _ in range(3):
            opt.step(autocast)
        cache = opt._virtual.cache
        if with_cache:
            assert cache.budget == full
            assert any(torch.bfloat16 in kept for _, kept in cache._entries.values())
        for _ in range(3):
            opt.step(plain)
        runs[with_cache] = seen, snapshot(model), opt
    (losses0, weights0, _), (losses1, weights1, opt1) = runs[False], runs[True]
    assert losses1 == losses0
    assert_same(weights1, weights0, "cache across an autocast change")
    cache = opt1._virtual.cache
    assert virtual_names(opt1) == {"embed.weight", "fc.weight", "out.weight"}
    assert [set(kept) for _, kept in cache._entries.values()] == [{torch.float32}] * 3
    assert cache.nbytes == _cached_factor_bytes(opt1) == cache.budget


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("update", ["inplace", "deferred"])
def test_the_update_and_merges_use_the_kept_float32_factors(monkeypatch, update, backend):
    """In an fp32 model the hooks keep the float32 draws themselves: a step's update (and a
    deferred run's merge) takes them instead of drawing again. Factor draws per step after the
    cache is filled: none with the cache; without it one per hook call (4 per probe: the tied
    embedding is read twice) and, on the torch backend, one per virtual weight in the write;
    bf16 forwards keep bf16 casts, so that write draws. The cpu backend's write draws what it is
    not given inside the kernel."""
    from zokernels.lowrank_space import LowRankSpace

    draws = []
    original = LowRankSpace.factors
    monkeypatch.setattr(LowRankSpace, "factors",
                        lambda self, j: draws.append(j) or original(self, j))
    counted = {}
    for dtype, cache in ((torch.float32, 1.0), (torch.float32, 0.0), (torch.bfloat16, 1.0)):
        model = make_model(dtype=dtype)
        opt = TeZO(model.named_parameters(), lr=1e-2, rank=3, update=update, factor_cache=cache,
                   backend=backend)
        for _ in range(2):
            opt.step(lm_loss(model))
        draws.clear()
        opt.step(lm_loss(model))
        opt.merge()
        counted[(dtype, cache)] = len(draws)
    written = 3 if backend == "torch" else 0  # the update's or the merge's float32 draws
    assert counted[(torch.float32, 1.0)] == 0
    assert counted[(torch.float32, 0.0)] == 2 * 4 + written  # two probes, the write
    assert counted[(torch.bfloat16, 1.0)] == written


@pytest.mark.parametrize("update", ["inplace", "deferred"])
def test_kept_factors_drawn_under_inference_mode_serve_later_passes(update):
    """A closure whose forward runs under torch.inference_mode(): the hooks' float32 draws,
    kept by the cache, are inference tensors. The update and the merges, outside that mode,
    only read them: the run proceeds, bit for bit that of drawing the factors per call."""
    runs = {}
    for cache in (0.0, 1.0):
        model = make_model()
        plain = lm_loss(model)

        def closure(plain=plain):
            with torch.inference_mode():
                return plain()
        opt = TeZO(model.named_parameters(), lr=1e-2, rank=3, update=update, factor_cache=cache)
        for _ in range(3):
            opt.step(closure)
        opt.merge()
        runs[cache] = snapshot(model), opt
    assert runs[1.0][1]._virtual.cache.nbytes > 0
    assert_same(runs[1.0][0], runs[0.0][0], f"inference-mode forwards, update={update}")


def test_the_factor_cache_budget_follows_the_parameters_bytes():
    """The budget is factor_cache x the parameters' bytes when each probe starts: a model cast
    from fp32 to bf16 mid-run halves it, the fp32 entries (now unused) make way, and the cache
    ends within the new budget holding bf16 factors."""
    model = make_model()
    opt = TeZO(model.named_parameters(), lr=1e-2, rank=3, factor_cache=0.3)
    for _ in range(2):
        opt.step(lm_loss(model))
    cache = opt._virtual.cache
    assert cache.budget == int(0.3 * sum(p.numel() * 4 for p in model.parameters()))
    assert 0 < cache.nbytes <= cache.budget
    model.to(torch.bfloat16)
    for _ in range(3):
        opt.step(lm_loss(model))
    assert cache.budget == int(0.3 * sum(p.numel() * 2 for p in model.parameters()))
    assert 0 < cache.nbytes <= cache.budget
    assert {dtype for _, kept in cache._entries.values() for dtype in kept} == {torch.bfloat16}


def test_the_factor_cache_benchmark_measures_both_modes():
    """benchmarks/tezo_factor_cache.py on `small` (2 rounds): its two optimizers agree (it
    asserts their losses), all 38 2-D weights are virtual, and the cache stays within its 4%."""
    import time

    from helpers import load_benchmark

    row = load_benchmark("tezo_factor_cache").measure("small", "bfloat16", batch=1, seq=8,
                                                      rank=8, repeats=2, warmup=0,
                                                      clock=time.perf_counter)
    assert row["virtual_weights"] == 38
    assert 0 < row["cache_pct_of_params"] <= row["budget_pct_of_params"] <= 4.0
    assert row["cache_pct_of_params"] < row["full_need_pct_of_params"]  # 4.2%: 36 of 38 kept
    assert set(row["hook_ms_per_probe"]) == {"cache", "no cache"}
    assert set(row["update_pass_ms"]) == {"cache", "no cache"}
    assert all(ms > 0 for ms in row["update_pass_ms"].values())
    from zokernels.lowrank_space import LowRankSpace
    assert LowRankSpace.apply.__name__ == "apply"  # the timing wrapper was removed


def test_probes_see_the_pending_deferred_update():
    """With updates pending (weight decay: D != 1, biases in the Linear's output), the probe
    losses equal those of a twin that merged first, to float32 rounding of the weights (the
    twin's merge rounds W_eff once); probing the parameters as written (without the pending
    part) gives a clearly different loss."""
    losses, written = {}, None
    for merge_first in (False, True):
        model = make_model()
        opt = TeZO(model.named_parameters(), lr=5e-2, eps=1e-3, seed=2, rank=3,
                   variant="adam", weight_decay=1.0, update="deferred")
        for _ in range(3):
            opt.step(alternating(model, 1))
        if merge_first:
            opt.merge()
        else:  # the parameters as written (named_parameters does not merge)
            written = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen = []
        opt.step(lm_loss(model, seen))
        losses[merge_first] = seen
    pending, merged = losses[False], losses[True]
    for p, m in zip(pending, merged):
        assert abs(p - m) <= 2e-6 * abs(m), (p, m)
    stale_model = make_model()
    with torch.no_grad():
        for name, p in stale_model.named_parameters():
            p.copy_(written[name])
    stale = []
    TeZO(stale_model.named_parameters(), lr=0.0, eps=1e-3, seed=2, rank=3).step(
        lm_loss(stale_model, stale))
    assert abs(stale[0] - merged[0]) > 1e-3 * abs(merged[0])


# -- transformers models, finetune ---------------------------------------------------------------

def _tiny_config_model(kind: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "opt":
        config = transformers.OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                        ffn_dim=64, num_attention_heads=4,
                                        word_embed_proj_dim=32, max_position_embeddings=64)
        return transformers.OPTForCausalLM(config).eval()
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def _lm_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_transformers_models_keep_every_linear_virtual(kind):
    """OPT: the tied lm_head (nn.Linear) and embed_tokens are both read through exact modules,
    so the shared weight stays virtual; the learned positions (an nn.Embedding subclass with its
    own forward) move to the in-place path (one more closure call in the first step). LLaMA:
    every 2-D weight is virtual. The probe losses match the in-place ones to float32
    rounding."""
    data = _lm_batch()
    losses = {}
    for probe in ("virtual", "inplace"):
        model = _tiny_config_model(kind)
        opt = TeZO(model.named_parameters(), lr=0.0, eps=1e-3, seed=1, rank=4, probe=probe)
        seen = []

        def closure(model=model, seen=seen):
            loss = model(**data).loss
            seen.append(loss.item())
            return loss
        for _ in range(2):
            opt.step(closure)
        losses[probe] = seen
        if probe == "virtual":
            two_d = {n for n, p in model.named_parameters() if p.dim() == 2}
            inplace = two_d - virtual_names(opt)
            assert inplace == ({"model.decoder.embed_positions.weight"} if kind == "opt"
                               else set())
    assert len(losses["virtual"]) == len(losses["inplace"]) + (1 if kind == "opt" else 0)
    for v, i in zip(losses["virtual"][-4:], losses["inplace"][-4:]):
        assert abs(v - i) <= 2e-6 * abs(i), (v, i)


def test_finetune_merges_the_deferred_updates_and_leaves_no_hook():
    from zokernels.integrations import finetune

    model = _tiny_config_model("llama")
    initial = snapshot(model)
    opt, losses = finetune(model, [_lm_batch()] * 3, optimizer="tezo", lr=1e-3, rank=4,
                           update="deferred", progress=False)
    assert len(losses) == 3 and not opt._virtual.pending
    assert hooks_left(model) == []
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight,
                           initial["model.layers.0.mlp.up_proj.weight"])


def test_a_failed_merge_does_not_hide_the_error_that_ended_finetune(monkeypatch):
    """finetune merges the deferred updates when its loop raises; if that merge fails too, the
    loop's error still propagates, with the merge's failure as a note, and the updates stay
    pending for a later merge()."""
    from zokernels.integrations import finetune

    model = _tiny_config_model("llama")
    opt = TeZO(model.named_parameters(), lr=1e-3, rank=4, update="deferred")

    def batches():
        yield _lm_batch()
        yield _lm_batch()
        raise KeyError("the data ran dry")

    def failing_merge():
        raise RuntimeError("no memory for the factors")
    monkeypatch.setattr(opt, "merge", failing_merge)
    with pytest.raises(KeyError, match="the data ran dry") as caught:
        finetune(model, batches(), optimizer=opt, progress=False)
    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert "TeZO.merge() after this error failed too" in notes and "no memory" in notes
    assert opt._virtual.pending
    monkeypatch.undo()
    opt.merge()
    assert not opt._virtual.pending and hooks_left(model) == []


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_adapters(use_dora):
    """PEFT LoRA on q/v projections and the embedding: lora_A / lora_B are exact nn.Linear
    modules (DoRA reads their product through their forwards too, on an identity), so they are
    virtual; the embedding adapters are a ParameterDict passed to F.embedding, so they stay
    in-place (the first step runs once more). Losses match the in-place probes to float32
    rounding."""
    peft = pytest.importorskip("peft")
    data = _lm_batch()
    losses = {}
    for probe in ("virtual", "inplace"):
        model = peft.get_peft_model(
            _tiny_config_model("llama"),
            peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"],
                            use_dora=use_dora, lora_dropout=0.0, init_lora_weights=False)).eval()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = TeZO(named, lr=0.0, eps=1e-3, seed=2, rank=2, probe=probe)
        seen = []

        def closure(model=model, seen=seen):
            loss = model(**data).loss
            seen.append(loss.item())
            return loss
        for _ in range(2):
            opt.step(closure)
        losses[probe] = seen
        if probe == "virtual":
            inplace = {n for n, p in named if p.dim() == 2} - virtual_names(opt)
            assert inplace == {n for n, _ in named if "lora_embedding" in n} and len(inplace) == 2
            assert len(virtual_names(opt)) == 8
    assert len(losses["virtual"]) == len(losses["inplace"]) + 1
    for v, i in zip(losses["virtual"][-4:], losses["inplace"][-4:]):
        assert abs(v - i) <= 2e-6 * abs(i), (v, i)


def test_use_tracker_allows_metadata_reads_only():
    from zokernels.lowrank_probe import UseTracker

    linear = torch.nn.Linear(3, 4)
    x = torch.randn(2, 3)
    tracker = UseTracker([linear.weight])
    with torch.no_grad(), tracker:
        _ = (linear.weight.dtype, linear.weight.shape, linear.weight.numel())
        linear(x)
    assert tracker.owners == [[linear]] and not tracker.foreign
    assert tracker.readers_only_through_owners(0)
    tracker = UseTracker([linear.weight])
    with torch.no_grad(), tracker:
        linear(x)
        linear.weight.sum()
    assert tracker.foreign == {0: "TensorBase.sum"}
    assert not tracker.readers_only_through_owners(0)
    assert hooks_left(linear) == []


def test_a_refused_load_state_dict_writes_nothing():
    """Validation comes before the merge: a bad state raises ValueError with the weights
    bit-identical and the deferred updates still pending."""
    model = make_model(dtype=torch.bfloat16)
    opt = TeZO(model.named_parameters(), lr=1e-2, eps=1e-3, seed=5, rank=3, variant="momentum",
               update="deferred")
    saved = opt.state_dict()
    for _ in range(2):
        opt.step(lm_loss(model))
    before = snapshot(model)
    bad = copy.deepcopy(saved)
    bad["extra"]["rank"] = 4
    with pytest.raises(ValueError, match="rank"):
        opt.load_state_dict(bad)
    assert_same(snapshot(model), before, "after a refused load")
    assert opt._virtual.pending and hooks_left(model)
    opt.load_state_dict(saved)  # a valid one merges first
    assert not opt._virtual.pending and hooks_left(model) == []
    assert not torch.equal(model.fc.weight, before["fc.weight"])


class _HooksOnlyFirst(torch.nn.Module):
    """Calls its layers through __call__ (module hooks run) in its first `hooked` forwards only,
    then through .forward (no hooks): what a torch.compile'd model does with global module
    hooks added after it compiled (torch does not guard on them). foreign: the output also
    reads a.weight directly (the first step's tracker moves it to the in-place path)."""

    def __init__(self, hooked: int = 1, foreign: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 8, bias=False)
        self.b = torch.nn.Linear(8, 4, bias=False)
        self.calls, self.hooked, self.foreign = 0, hooked, foreign

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        hooks = self.calls <= self.hooked
        call = (lambda m, t: m(t)) if hooks else (lambda m, t: m.forward(t))
        out = call(self.b, torch.tanh(call(self.a, x)))
        return out + (x @ self.a.weight.t()).sum() * 1e-3 if self.foreign else out


@pytest.mark.parametrize("update", ["inplace", "deferred"])
def test_probes_whose_hooks_did_not_run_fall_back_to_in_place(update):
    """The first step saw the weights read through their modules; later forwards skipped the
    hooks, so the probes missed the perturbation (l+ == l-: silently no training). The probe
    that misses a hook now moves every weight to the in-place path and runs the step again;
    the run's coefficients are those of a model whose hooks run, and a deferred run's
    trajectory (merged before the fallback) replays bit for bit."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    runs = {}
    for name in ("hooks", "skipped"):
        model = _HooksOnlyFirst()
        if name == "hooks":
            model.calls = -10 ** 9  # never 1: always through __call__ ... except via forward
            model.forward = lambda t, m=model: m.b(torch.tanh(m.a(t)))
        start = snapshot(model)
        opt = TeZO(model.named_parameters(), lr=1e-1, rank=2, seed=3, update=update)
        if name == "skipped":  # the first step's second probe already skips them
            with pytest.warns(RuntimeWarning, match="no virtual-probe hook for 2 weight"):
                opt.step(lambda: model(x).pow(2).mean())
            assert opt._virtual is None
        else:
            opt.step(lambda: model(x).pow(2).mean())
        for _ in range(3):
            opt.step(lambda: model(x).pow(2).mean())
        runs[name] = [r[2][0][0] for r in opt.trajectory.records()]
        if name == "skipped":
            fresh = _HooksOnlyFirst()
            fresh.load_state_dict(start, strict=False)
            opt.merge()
            opt.trajectory.replay(fresh)
            assert_same(snapshot(fresh), snapshot(model), "replay after the fallback")
    assert all(c != 0.0 for c in runs["skipped"]), runs
    assert runs["skipped"] == pytest.approx(runs["hooks"], rel=1e-3, abs=1e-7)


def test_a_fallback_after_deferred_steps_replays_bit_for_bit():
    """Hooks that stop running after three steps: the pending deferred updates are merged
    before the fallback, and the trajectory marks that merge (it did not: the replay wrote the
    deferred updates after the later ones, other bits)."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    model = _HooksOnlyFirst(hooked=7)  # two forwards a step: the fourth step falls back
    start = snapshot(model)
    opt = TeZO(model.named_parameters(), lr=1e-1, rank=2, seed=3, update="deferred",
               weight_decay=0.1)
    with pytest.warns(RuntimeWarning, match="no virtual-probe hook"):
        for _ in range(6):
            opt.step(lambda: model(x).pow(2).mean())
    assert opt._virtual is None
    extra = opt.trajectory.extra
    assert list(extra["deferred"])[:3] == [1.0] * 3 and 1.0 in list(extra["merge"])
    fresh = _HooksOnlyFirst()
    fresh.load_state_dict(start, strict=False)
    opt.trajectory.replay(fresh)
    assert_same(snapshot(fresh), snapshot(model), "replay after a later fallback")


def test_a_retracked_first_step_that_falls_back_completes():
    """A weight read outside its module (retrack) and hooks that stop after the first forward:
    the first step's retry fell back too, and its second _Retrack escaped step()."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    model = _HooksOnlyFirst(hooked=1, foreign=True)
    opt = TeZO(model.named_parameters(), lr=1e-1, rank=2, seed=3)
    with pytest.warns(RuntimeWarning, match="no virtual-probe hook"):
        loss = opt.step(lambda: model(x).pow(2).mean())
    assert math.isfinite(float(loss)) and opt.zo_state["step"] == 1 and opt._virtual is None


def test_a_compiled_model_warm_before_the_optimizer_falls_back():
    """torch.compile reuses a graph compiled before TeZO's global hooks existed."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    results = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Tanh(),
                                    torch.nn.Linear(8, 4, bias=False))
        run = model if name == "eager" else torch.compile(model, backend="eager")
        with torch.no_grad():
            run(x)  # a forward (an evaluation) before the optimizer exists
        opt = TeZO(run.named_parameters(), lr=1e-1, rank=2, seed=3)
        with pytest.warns() if name == "compiled" else contextlib.nullcontext():
            for _ in range(3):
                opt.step(lambda: run(x).pow(2).mean())
        results[name] = [r[2][0][0] for r in opt.trajectory.records()]
    assert results["compiled"] == pytest.approx(results["eager"], rel=1e-3, abs=1e-7)


def test_steps_leave_no_global_hook_state():
    """torch's RemovableHandle of a with_kwargs global forward hook leaves its flag in
    _global_forward_hooks_with_kwargs: two entries leaked per step (a million steps, two
    million entries), and torch.compile warned of global hooks from then on."""
    x = torch.randn(5, 8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    opt = TeZO(model.named_parameters(), lr=1e-2, rank=2, seed=0)
    before = len(getattr(nn_module, "_global_forward_hooks_with_kwargs", {}))
    for _ in range(5):
        opt.step(lambda: model(x).pow(2).mean())
    assert len(getattr(nn_module, "_global_forward_hooks_with_kwargs", {})) == before
    assert not nn_module._global_forward_hooks and not nn_module._global_forward_pre_hooks
