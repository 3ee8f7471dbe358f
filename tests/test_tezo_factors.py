"""TeZO keeps no factors: U_j, V_j are drawn from (factor seed, key_j) when a pass, a probe hook
or a merge needs them. Their bits (sharded weights included), the persistent memory that is
left (logs, moments, deferred vectors), and the passes cut into runs by the factor budget: the
same weights bit for bit as one launch, each run's scratch within the budget."""

from __future__ import annotations

import pytest
import torch

import zokernels.lowrank_space as lowrank_space
from zokernels import noise
from zokernels.lowrank_space import LowRankSpace
from zokernels.optim import TeZO
from zokernels.optim.tezo import factor_seed
from zokernels.sharding import mark_shard
from zokernels.space import ParameterSpace

from helpers import assert_bits_equal, assert_same, snapshot
from test_tezo_virtual import lm_loss, make_model

MODES = [dict(probe="inplace"), dict(probe="inplace", exact_restore=False),
         dict(probe="virtual"), dict(probe="virtual", update="deferred", weight_decay=0.1)]


def _drawn(space: LowRankSpace, j: int, full_shape: tuple[int, int], box: tuple[slice, slice]):
    """U_j, V_j of the unsharded m x n weight from noise(), and their rows of the shard's box."""
    (m, n), r, key = full_shape, space.ranks[j], space.keys[j]
    u = noise(m * r, space.factor_seed, key, backend="torch").view(m, r)
    v = noise(n * r, space.factor_seed, key, offset=m * r, backend="torch").view(n, r)
    return u[box[0]], v[box[1]]


@pytest.mark.parametrize("box", [(slice(0, 6), slice(0, 4)), (slice(2, 5), slice(0, 4)),
                                 (slice(3, 6), slice(0, 4)), (slice(1, 4), slice(1, 3)),
                                 (slice(0, 6), slice(2, 4))],
                         ids=["whole", "rows", "last-rows", "box", "cols"])
def test_factors_are_the_noise_of_seed_and_key(box):
    """A weight's factors are noise(m r, seed, key) and noise(n r, seed, key, offset=m r); a
    shard draws the rows of its box. Drawn again, the same bits (nothing cached)."""
    full = torch.randn(6, 4)
    block = full[box].clone()
    shard = block if block.shape == full.shape else mark_shard(
        block, (6, 4), (box[0].start, box[1].start))
    space = ParameterSpace([("w", shard)], backend="cpu")
    state = LowRankSpace(space.names, space.params, space.keys, space.decayable, rank=2,
                         seed=factor_seed(3), backend="cpu", shards=space.shards)
    u, v = state.factors(0)
    expected_u, expected_v = _drawn(state, 0, (6, 4), box)
    assert u.dtype == v.dtype == torch.float32
    assert_bits_equal(u, expected_u, "U")
    assert_bits_equal(v, expected_v, "V")
    again_u, again_v = state.factors(0)
    assert again_u.data_ptr() != u.data_ptr()  # drawn again, not kept
    assert_bits_equal(again_u, u, "U drawn twice")
    assert_bits_equal(again_v, v, "V drawn twice")
    assert_bits_equal(state.us[0], u, "us")
    assert_bits_equal(state.vs[0], v, "vs")


def test_chunks_keep_the_order_and_the_budget(monkeypatch):
    """Runs in order, within min(factor_budget, FACTOR_FRACTION of the weights' bytes), a
    weight over the bound alone."""
    weights = [torch.zeros(8, 4), torch.zeros(16, 8), torch.zeros(4, 4), torch.zeros(2, 2)]
    state = LowRankSpace(["a", "b", "c", "d"], weights, [1, 2, 3, 4], [True] * 4, rank=2,
                         seed=1, backend="cpu")
    sizes = [state.factor_bytes(j) for j in range(4)]
    assert sizes == [4 * (8 + 4) * 2, 4 * (16 + 8) * 2, 4 * 8 * 2, 4 * 4 * 2]
    assert state.chunks([0, 1, 2, 3]) == [[0], [1], [2], [3]]  # 1% of 720 bytes: 7.2
    monkeypatch.setattr(lowrank_space, "FACTOR_FRACTION", 1.0)
    assert state.chunks([0, 1, 2, 3]) == [[0, 1, 2, 3]]
    state.factor_budget = sizes[0] + sizes[2]
    assert state.chunks([0, 1, 2, 3]) == [[0], [1], [2, 3]]  # b alone exceeds the budget
    assert state.chunks([0, 2, 3]) == [[0, 2], [3]]
    monkeypatch.setattr(lowrank_space, "FACTOR_FRACTION", (sizes[2] + sizes[3]) / 720)
    assert state.chunks([0, 1, 2, 3]) == [[0], [1], [2, 3]]
    state.factor_budget = 1
    assert state.chunks([3, 1]) == [[3], [1]]
    # a kernel drawing the factors keeps (V diag(tau))^T: 4 n r bytes per weight
    assert [state.drawn_scratch_bytes(j) for j in range(4)] == [4 * 4 * 2, 4 * 8 * 2, 4 * 4 * 2,
                                                                4 * 2 * 2]
    state.factor_budget = 4 * 4 * 2 + 4 * 8 * 2
    monkeypatch.setattr(lowrank_space, "FACTOR_FRACTION", 1.0)
    assert state.chunks([0, 1, 2, 3], drawn=True) == [[0, 1], [2, 3]]
    assert state.chunks([0, 1, 2, 3]) == [[0], [1], [2, 3]]


def _step_twins(pairs, steps: int) -> None:
    """Step each (optimizer, model) of `pairs` `steps` times, then merge each."""
    for _ in range(steps):
        for opt, model in pairs:
            opt.step(lm_loss(model))
    for opt, _ in pairs:
        opt.merge()


def _opt(model, mode, **kwargs):
    return TeZO(model.named_parameters(), lr=1e-2, eps=1e-3, rank=3, seed=4, variant="adam",
                **dict(mode, **kwargs))


def test_extra_memory_is_the_logs_moments_and_deferred_vectors():
    """extra_memory_bytes holds no factor: the logs, 8 bytes per rank entry of moments, and with
    deferred updates the deferred vectors and decay masks (8 bytes per virtual rank entry)."""
    for mode in MODES:
        model = make_model(dtype=torch.bfloat16)
        opt = _opt(model, mode)
        for _ in range(3):
            opt.step(lm_loss(model))
        ranks = sum(state.offsets[-1] for state in opt.lowrank)
        assert opt.state_numel == 2 * ranks
        deferred = 0 if opt._virtual is None else sum(
            8 * part.offsets[-1] for part in opt._virtual.parts)
        assert opt.extra_memory_bytes == opt.undo_log_bytes + 8 * ranks + deferred, mode
        if mode.get("exact_restore", True) and mode["probe"] == "inplace":
            assert opt.undo_log_bytes > 0


class _Launches:
    """Wraps lowrank_space.lowrank_perturb_: the factor bytes and weights of every launch."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[int, int]] = []
        original = lowrank_space.lowrank_perturb_

        def counted(weights, us, vs, *args, **kwargs):
            given = [] if us is None else [(u, v) for u, v in zip(us, vs) if u is not None]
            self.calls.append((len(weights), sum(4 * (u.numel() + v.numel()) for u, v in given)))
            return original(weights, us, vs, *args, **kwargs)

        monkeypatch.setattr(lowrank_space, "lowrank_perturb_", counted)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{v}" for v in m.values()))
def test_a_tiny_budget_gives_the_same_weights(monkeypatch, mode, rounding):
    """A budget of one byte (every pass without logs launched weight by weight: the virtual
    updates, merges, and every pass with exact_restore=False) against an unbounded one (one
    launch per pass): the same weights bit for bit after several steps, merges and (exact
    restore) a replay included. Passes with logs (in-place probes with exact restore, and the
    update recovering from them) are one launch over all weights either way. The torch backend:
    on the cpu one the kernel draws the factors, nothing to cut (next test)."""
    runs = {}
    logged = mode["probe"] == "inplace" and mode.get("exact_restore", True)
    for budget in (1 << 40, 1):
        monkeypatch.setattr(lowrank_space, "FACTOR_BUDGET", budget)
        monkeypatch.setattr(lowrank_space, "FACTOR_FRACTION", 1e9)
        launches = _Launches(monkeypatch)
        model = make_model(dtype=torch.bfloat16)
        opt = _opt(model, mode, rounding=rounding, backend="torch")
        loss = lm_loss(model)
        for step in range(5):
            opt.step(loss)
            if step == 2:
                opt.merge()
        opt.merge()
        runs[budget] = (snapshot(model), opt)
        matrices = len(opt.lowrank[0].weights)
        assert matrices == 3 and launches.calls
        one = matrices if logged or budget > 1 else 1  # weights per launch
        assert all(count == one for count, _ in launches.calls), launches.calls
        monkeypatch.undo()
    (chunked, opt), (whole, _) = runs[1], runs[1 << 40]
    assert_same(chunked, whole, f"budget 1 vs unbounded, {mode}")
    if not mode.get("exact_restore", True):
        return  # the run restored by recovery alone: its replay (from exact thetas) differs
    replayed = make_model(dtype=torch.bfloat16)
    with monkeypatch.context() as patch:
        patch.setattr(lowrank_space, "FACTOR_BUDGET", 1)
        opt.trajectory.replay(replayed)
    assert_same(snapshot(replayed), whole, "replay with budget 1")


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{v}" for v in m.values()))
def test_cpu_passes_draw_their_factors_in_the_kernel(monkeypatch, mode):
    """On the cpu backend the low-rank passes' kernel draws the factors it is not given
    (ops.lowrank.FactorDraw): no factor tensor is drawn for it (with an unbounded budget one
    launch per pass), and the weights after steps and merges are bit for bit those of the passes
    given their factors drawn in runs (LowRankSpace.factors, a one-byte budget)."""
    runs = {}
    for draws in (True, False):
        launches = _Launches(monkeypatch)
        monkeypatch.setattr(lowrank_space, "FACTOR_FRACTION", 1e9)
        if not draws:
            monkeypatch.setattr(LowRankSpace, "_draws_in_pass", lambda *args: False)
            monkeypatch.setattr(lowrank_space, "FACTOR_BUDGET", 1)
        model = make_model(dtype=torch.bfloat16)
        opt = _opt(model, mode, factor_cache=0.0)  # the hooks keep nothing: every pass draws
        for step in range(4):
            opt.step(lm_loss(model))
            if step == 1:
                opt.merge()
        opt.merge()
        runs[draws] = snapshot(model)
        drawn = [bytes_ for _, bytes_ in launches.calls]
        if draws:
            assert launches.calls and drawn == [0] * len(drawn)
            assert all(count == 3 for count, _ in launches.calls)
        else:
            assert all(bytes_ > 0 for bytes_ in drawn)
        monkeypatch.undo()
    assert_same(runs[True], runs[False], f"kernel draws vs drawn runs, {mode}")


def test_resume_draws_the_factors_of_the_loaded_seed():
    """An optimizer built with another seed, loaded from a state_dict, continues the saved run:
    its passes, hooks and merges draw the factors of the loaded seed."""
    for mode in MODES[1:]:
        model, twin = make_model(dtype=torch.bfloat16), make_model(dtype=torch.bfloat16)
        opt = _opt(model, mode)
        for _ in range(2):
            opt.step(lm_loss(model))
        state = opt.state_dict()
        twin.load_state_dict(model.state_dict())
        other = TeZO(twin.named_parameters(), lr=1e-2, eps=1e-3, rank=3, seed=99,
                     variant="adam", **mode)
        other.load_state_dict(state)
        assert all(s.factor_seed == factor_seed(4) for s in other.lowrank)
        _step_twins([(opt, model), (other, twin)], 2)
        assert_same(snapshot(twin), snapshot(model), f"resumed into seed 99, {mode}")


def test_a_virtual_probe_draws_its_layer_factors_per_call(monkeypatch):
    """The hooks keep nothing between calls: each owner forward draws its weight's factors
    (the tied embedding / head twice per forward)."""
    model = make_model(dtype=torch.float32)
    opt = _opt(model, dict(probe="virtual"))
    opt.step(lm_loss(model))
    drawn = []
    original = LowRankSpace.factors

    def counted(self, j):
        drawn.append(self.names[j])
        return original(self, j)

    monkeypatch.setattr(LowRankSpace, "factors", counted)
    opt.step(lm_loss(model))
    virtual = [n for part in opt._virtual.parts for n in (part.space.names[j]
                                                          for j in part.positions)]
    assert virtual and set(drawn) >= set(virtual)
    assert drawn.count("embed.weight") >= 2 * 2  # embedding and tied head, two probes


@pytest.mark.parametrize("mode", [m for m in MODES if m.get("exact_restore", True)],
                         ids=lambda m: "-".join(f"{v}" for v in m.values()))
def test_an_interrupt_while_drawing_factors_leaves_every_weight(monkeypatch, mode):
    """KeyboardInterrupt from the draw of a factor (in a hook or a pass) propagates; with exact
    restore the weights are those of before the step (merged deferred updates included), no
    hook is left behind, and the next steps equal an uninterrupted twin's. In-place probes on
    the torch backend (on the cpu one their passes draw inside the kernel: no Python draw)."""
    model, twin = make_model(dtype=torch.bfloat16), make_model(dtype=torch.bfloat16)
    backend = "torch" if mode["probe"] == "inplace" else "auto"
    opt, other = _opt(model, mode, backend=backend), _opt(twin, mode, backend=backend)
    for _ in range(2):
        opt.step(lm_loss(model))
        other.step(lm_loss(twin))
    original = LowRankSpace.factors
    for fail_at in (1, 2, 4):
        opt.merge()
        before = snapshot(model)
        calls = []

        def failing(self, j):
            calls.append(j)
            if len(calls) == fail_at:
                raise KeyboardInterrupt
            return original(self, j)

        monkeypatch.setattr(LowRankSpace, "factors", failing)
        with pytest.raises(KeyboardInterrupt):
            opt.step(lm_loss(model))
        monkeypatch.setattr(LowRankSpace, "factors", original)
        opt.merge()
        assert_same(snapshot(model), before, f"interrupted at draw {fail_at}, {mode}")
    ids = torch.zeros(2, 3, dtype=torch.long)
    model(ids)  # no probe hook left: a plain forward outside a step
    other.merge()
    _step_twins([(opt, model), (other, twin)], 2)
    assert_same(snapshot(model), snapshot(twin), f"after the interrupts, {mode}")
