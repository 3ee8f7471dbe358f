"""Optimizer state: validated, atomic load_state_dict, resume with another seed, add_param_group,
LeZO layer matching, trajectories without host syncs and replay by canonical names, undo-log
overflow accounting. Small models built here; the CPU backend (auto) runs them."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from zokernels import Trajectory
from zokernels.ops.undo import SelectorLog, UndoLog
from zokernels.optim import LeZO, MeZO, PseuZO, TeZO

from helpers import assert_bits_equal, assert_same, assert_states_equal, snapshot


class Net(torch.nn.Module):
    """An input layer, three blocks (a ModuleList, like a transformer's stack) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(6, 8)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)) for _ in range(3))
        self.head = torch.nn.Linear(8, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Wrapper(torch.nn.Module):
    """What DDP / DataParallel look like to named_parameters(): every name gets `module.`."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def make_net(dtype: torch.dtype = torch.bfloat16) -> Net:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = Net()
    return net.to(dtype)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)


def make(name: str, params, **kw):
    options = dict(lr=kw.pop("lr", 1e-2), eps=1e-3, seed=kw.pop("seed", 0))
    options.update(kw)
    if name == "mezo":
        return MeZO(params, **options)
    if name == "lezo":
        return LeZO(params, n_active=1, **options)
    if name == "tezo":
        return TeZO(params, rank=3, variant=options.pop("variant", "momentum"), **options)
    if name == "pseuzo":
        return PseuZO(params, window=3, beta=0.5, **options)
    raise AssertionError(name)


def build(name: str, net: Net, **kw):
    if name == "lezo":
        kw.setdefault("layers", list(net.blocks))
    return make(name, net.named_parameters(), **kw)


def run(name: str, opt, net: Net, steps: int) -> None:
    x, y = _data()
    dtype = next(net.parameters()).dtype
    for _ in range(steps):
        if name == "pseuzo":
            opt.step(lambda: net.features(x.to(dtype)),
                     lambda h: torch.nn.functional.mse_loss(net.head(h).float(), y))
        else:
            opt.step(lambda: torch.nn.functional.mse_loss(net(x.to(dtype)).float(), y))


ALL = ["mezo", "lezo", "tezo", "pseuzo"]


# -- load_state_dict: validated as a whole, atomic ------------------------------------------------

def _set(*path, value):
    def corrupt(state: dict) -> None:
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return corrupt


def _delete(*path):
    def corrupt(state: dict) -> None:
        target = state
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return corrupt


def _rename_first_param(state: dict) -> None:
    state["param_groups"][0]["param_names"][0] = "renamed.weight"


def _trajectory_of_another_seed(state: dict) -> None:
    state["trajectory"]["meta"]["base_seed"] = 12345


CORRUPTIONS = [
    (_set("algorithm", value="adam"), "is for 'adam'"),
    (_delete("zo_state"), r"lacks \['zo_state'\]"),
    (_delete("undo_logs"), r"lacks \['undo_logs'\]"),
    (_set("base_seed", value=-1), "base_seed"),
    (_set("base_seed", value=1 << 64), "base_seed"),
    (_set("base_seed", value=2.0), "base_seed"),
    (_set("dist", value="cauchy"), "dist"),
    (_set("zo_state", "step", value=-1), r"zo_state\['step'\]"),
    (_set("zo_state", "skipped_steps", value=1.5), r"zo_state\['skipped_steps'\]"),
    (_delete("zo_state", "undo_overflows"), "zo_state must be a dict with keys"),
    (_set("zo_state", "undo_overflows", value=True), r"zo_state\['undo_overflows'\]"),
    (_set("param_groups", value=[]), "0 param groups"),
    (_rename_first_param, "param group 0: the saved parameter names differ"),
    (_set("param_groups", 0, "lr", value=-1.0), "param group 0 lr"),
    (_set("param_groups", 0, "eps", value=0.0), "param group 0 eps"),
    (_set("param_groups", 0, "weight_decay", value=math.nan), "param group 0 weight_decay"),
    (_delete("param_groups", 0, "lr"), "param group 0 lacks 'lr'"),
    (_set("undo_logs", value=[]), "undo_logs must hold one pair"),
    (_set("undo_logs", 0, value=[{}]), r"undo_logs\[0\] must be a pair"),
    (_set("undo_logs", 0, 1, "fraction", value={"cpu|torch.bfloat16": 2.0}),
     r"undo_logs\[0\]\[1\] fraction"),
    (_set("undo_logs", 0, 0, "fraction", value={"cpu|torch.int8": 0.1}),
     r"undo_logs\[0\]\[0\].*floating dtype"),
    (_set("undo_logs", 0, 0, "passes", value={"cpu|torch.float32": -2}),
     r"undo_logs\[0\]\[0\] passes"),
    (_set("undo_logs", 0, 0, "overflows", value="3"), r"undo_logs\[0\]\[0\] overflows"),
    (_set("extra", value=None), "extra must be a dict"),
    (_set("trajectory", "version", value=99), "trajectory is not a trajectory state"),
    (_trajectory_of_another_seed, "trajectory base_seed is 12345"),
    # the trajectory's meta as this optimizer records it: the resumed run appends to it
    (lambda s: s["trajectory"]["meta"]["groups"][0]["keys"].reverse(),
     r"trajectory meta groups\[0\]\['keys'\]\[0\] differs"),
    (_set("trajectory", "meta", "no_decay", value=[]), r"trajectory meta no_decay differs"),
    (lambda s: s["trajectory"]["meta"]["groups"][0]["numel"].__setitem__(0, 7),
     r"trajectory meta groups\[0\]\['numel'\]\[0\] differs"),
    (_set("trajectory", "meta", "groups", 0, "named", value=torch.tensor([])),
     r"trajectory meta groups\[0\] named must be a bool"),  # checked with the trajectory
]

TRAJECTORY_META_CORRUPTIONS = {
    "mezo": [(_set("trajectory", "meta", "n_spsa", value=2), "trajectory meta n_spsa differs")],
    "lezo": [(lambda s: s["trajectory"]["meta"]["groups"][0]["layers"].reverse(),
              r"trajectory meta groups\[0\]\['layers'\]\[0\]\[0\] differs")],
    "tezo": [(_set("trajectory", "meta", "betas", value=[0.5, 0.999]),
              r"trajectory meta betas\[0\] differs"),
             (_set("trajectory", "meta", "delta", value=1.0), "trajectory meta delta differs"),
             (_set("trajectory", "meta", "rank", value="3"), "trajectory meta rank differs"),
             (lambda s: s["trajectory"]["meta"]["lowrank"][0]["keys"].reverse(),
              r"trajectory meta lowrank\[0\]\['keys'\]\[0\] differs"),
             (_set("trajectory", "meta", "tezo_update", value="deferred"),
              "trajectory meta tezo_update differs")],
    "pseuzo": [],  # its window and schedule are settings, compared through extra["schedule"]
}


def _tezo_wrong_dtype(state: dict) -> None:
    state["extra"]["second"][0] = state["extra"]["second"][0].double()


TEZO_CORRUPTIONS = [
    (_set("extra", "rank", value=4), "rank"),
    (_delete("extra", "momentum"), "lacks 'momentum'"),
    (_tezo_wrong_dtype, r"second\[0\] must be a float32 vector"),
    (_set("extra", "momentum", value=[]), "momentum must hold one vector per param group"),
    (_set("extra", "betas", value=[0.9, 1.0]), r"betas\[1\]"),
    (_set("extra", "lowrank_undo_logs", 0, 1, value={"probes": -1}),
     r"lowrank_undo_logs\[0\]\[1\] probes"),
]


def _trained(name: str, seed: int = 0, lr: float = 1e-2, steps: int = 2):
    net = make_net()
    opt = build(name, net, seed=seed, lr=lr)
    run(name, opt, net, steps)
    return net, opt


@pytest.mark.parametrize("name", ALL)
def test_every_corrupted_field_is_refused_and_nothing_changes(name):
    """Each field corrupted in turn in a state that otherwise differs in seed, lr, step, logs
    and algorithm state: ValueError naming it; then the state_dict is the one from before, and
    steps stay bit-identical to those of an untouched twin."""
    _, other = _trained(name, seed=9, lr=5e-3, steps=3)
    net, opt = _trained(name)
    twin_net, twin = _trained(name)
    before = opt.state_dict()
    cases = (CORRUPTIONS + TRAJECTORY_META_CORRUPTIONS[name]
             + (TEZO_CORRUPTIONS if name == "tezo" else []))
    for corrupt, match in cases:
        bad = other.state_dict()
        corrupt(bad)
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
        assert_states_equal(opt.state_dict(), before, f"after refusing ({match})")
    assert opt.base_seed == 0 and opt.param_groups[0]["lr"] == 1e-2
    run(name, opt, net, 2)
    run(name, twin, twin_net, 2)
    assert_same(snapshot(net), snapshot(twin_net), "after the refused loads")
    assert_states_equal(opt.state_dict(), twin.state_dict(), "state after the refused loads")


def test_checkpoints_of_earlier_versions_resume_with_their_trajectory():
    """Trajectory meta written before a field existed reads as the replays read it: a TeZO
    run without "tezo_update" (updates were in place), a PseuZO run without its schedule
    fields (and a state without "schedule"); PseuZO's window is a setting a resume may change."""
    _, tezo = _trained("tezo")
    state = tezo.state_dict()
    del state["trajectory"]["meta"]["tezo_update"]
    build("tezo", make_net()).load_state_dict(state)
    _, pseuzo = _trained("pseuzo")
    state = pseuzo.state_dict()
    for field in ("beta", "beta_cycle", "beta_epoch_steps", "beta_zero", "decay_per_entry"):
        del state["trajectory"]["meta"][field]
    del state["extra"]["schedule"]
    build("pseuzo", make_net()).load_state_dict(state)
    wider = PseuZO(make_net().named_parameters(), window=6, beta=0.5, lr=1e-2, eps=1e-3)
    wider.load_state_dict(pseuzo.state_dict())
    assert len(wider.trajectory) == 2


def test_lezo_resumes_its_trajectory_with_another_number_of_active_blocks():
    """The records name their blocks, so n_active is a setting a resume may change; the
    trajectory then replays the whole run."""
    net, opt = _trained("lezo")
    resumed = LeZO(net.named_parameters(), layers=list(net.blocks), n_active=2, lr=1e-2,
                   eps=1e-3, seed=0)
    resumed.load_state_dict(opt.state_dict())
    run("lezo", resumed, net, 2)
    assert [len(record[4]) for record in resumed.trajectory.records()] == [1, 1, 2, 2]
    replayed = make_net()
    resumed.trajectory.replay(replayed)
    assert_same(snapshot(replayed), snapshot(net), "replay across the changed n_active")


@pytest.mark.parametrize("name", ALL)
def test_round_trip_and_loaded_values_adopted(name):
    _, other = _trained(name, seed=9, lr=5e-3, steps=3)
    _, opt = _trained(name)
    saved = other.state_dict()
    opt.load_state_dict(saved)
    assert opt.base_seed == 9 and opt.param_groups[0]["lr"] == 5e-3
    assert opt.zo_state == other.zo_state
    assert_states_equal(opt.state_dict(), saved)


def test_loaded_tensors_are_copied_and_state_dict_does_not_alias():
    net, opt = _trained("tezo", steps=3)
    saved = opt.state_dict()
    _, fresh = _trained("tezo", seed=5)
    fresh.load_state_dict(saved)
    expected = fresh.state_dict()
    for vector in saved["extra"]["momentum"] + saved["extra"]["second"]:
        vector.fill_(math.nan)  # the source dict mutated after the load
    assert_states_equal(fresh.state_dict(), expected, "after mutating the loaded dict")
    # a step mutates the moments in place: a state_dict taken before keeps its values
    kept = [m.clone() for m in expected["extra"]["momentum"]]
    run("tezo", fresh, net, 1)
    for m, k in zip(expected["extra"]["momentum"], kept):
        assert_bits_equal(m, k, what="momentum of an earlier state_dict")
    assert not torch.equal(fresh.state_dict()["extra"]["momentum"][0], kept[0])


def test_pseuzo_window_is_copied_on_load():
    net, opt = _trained("pseuzo", steps=3)
    saved = opt.state_dict()
    _, fresh = _trained("pseuzo")
    fresh.load_state_dict(saved)
    expected = fresh.state_dict()
    for entry in saved["extra"]["window"]:
        entry["delta"].fill_(math.nan)
    assert_states_equal(fresh.state_dict(), expected, "after mutating the loaded dict")


@pytest.mark.parametrize("name", ALL)
def test_resume_into_an_optimizer_built_with_another_seed_is_bit_identical(name, tmp_path):
    """Also without the saved trajectory: the new one starts at the checkpoint (TeZO: with the
    loaded momentum, variant "momentum") and replays on the checkpoint's weights."""
    options = dict(weight_decay=0.1)
    net = make_net()
    initial = snapshot(net)
    opt = build(name, net, seed=3, **options)
    run(name, opt, net, 3)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    checkpoint = snapshot(net)
    run(name, opt, net, 3)
    uninterrupted = snapshot(net)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_net()
    resumed.load_state_dict(saved["model"])
    opt2 = build(name, resumed, seed=11, **options)
    opt2.load_state_dict(saved["opt"])
    assert opt2.base_seed == 3 and opt2.trajectory.meta["base_seed"] == 3
    run(name, opt2, resumed, 3)
    assert_same(snapshot(resumed), uninterrupted, f"{name} resumed with another seed")
    opt2.trajectory.save(tmp_path / "run.pt")
    replayed = make_net()
    assert_same(snapshot(replayed), initial, "initial weights")
    Trajectory.load(tmp_path / "run.pt").replay(replayed)
    assert_same(snapshot(replayed), uninterrupted, f"{name} replay of the resumed run")

    # without a saved trajectory: recording restarts at the checkpoint, with the loaded seed
    no_trajectory = dict(saved["opt"], trajectory=None)
    again = make_net()
    again.load_state_dict(saved["model"])
    opt3 = build(name, again, seed=11, **options)
    opt3.load_state_dict(no_trajectory)
    assert opt3.trajectory.meta["base_seed"] == 3 and len(opt3.trajectory) == 0
    if name == "tezo":
        assert opt3.trajectory.meta["initial_moments"]["momentum"][0] == \
            saved["opt"]["extra"]["momentum"][0].tolist()
    run(name, opt3, again, 3)
    assert_same(snapshot(again), uninterrupted, f"{name} resumed without a trajectory")
    from_checkpoint = make_net()
    from_checkpoint.load_state_dict(saved["model"])
    assert_same(snapshot(from_checkpoint), checkpoint, "checkpoint weights")
    opt3.trajectory.replay(from_checkpoint)
    assert_same(snapshot(from_checkpoint), uninterrupted, f"{name} replay from the checkpoint")


@pytest.mark.parametrize("name", ["mezo", "tezo"])
def test_load_state_dict_during_a_step_is_refused(name):
    net, opt = _trained(name)
    saved = opt.state_dict()
    before = snapshot(net)
    x, y = _data()

    def closure():
        opt.load_state_dict(saved)
        return torch.nn.functional.mse_loss(net(x.to(torch.bfloat16)).float(), y)

    with pytest.raises(RuntimeError, match="during a step"):
        opt.step(closure)
    assert_same(snapshot(net), before, "after the refused load")
    after = opt.state_dict()
    for key in ("base_seed", "zo_state", "param_groups", "trajectory"):
        assert_states_equal(after[key], saved[key], key)
    assert not opt._step_in_progress()


# -- add_param_group ----------------------------------------------------------------------------

def _groups(net: Net) -> tuple[dict, dict]:
    body = [(n, p) for n, p in net.named_parameters() if not n.startswith("head")]
    head = list(net.head.named_parameters(prefix="head"))
    return {"params": body}, {"params": head, "lr": 5e-3, "weight_decay": 0.2}


@pytest.mark.parametrize("name", ["mezo", "lezo", "tezo"])
def test_add_param_group_before_the_first_step_equals_building_with_both(name, tmp_path):
    built_net, added_net = make_net(), make_net()
    initial = snapshot(added_net)

    def build_with(net, groups):
        kw = {"layers": list(net.blocks)} if name == "lezo" else {}
        return make(name, groups, weight_decay=0.1, **kw)

    built = build_with(built_net, list(_groups(built_net)))
    body, head = _groups(added_net)
    added = build_with(added_net, [body])
    added.add_param_group(head)
    assert added.param_groups[1]["eps"] == 1e-3 and added.param_groups[1]["lr"] == 5e-3
    run(name, built, built_net, 4)
    run(name, added, added_net, 4)
    assert_same(snapshot(added_net), snapshot(built_net), f"{name} with an added group")
    assert not torch.equal(added_net.head.weight, make_net().head.weight)
    assert_states_equal(added.state_dict(), built.state_dict(), "state with an added group")
    added.trajectory.save(tmp_path / "run.pt")
    replayed = make_net()
    assert_same(snapshot(replayed), initial, "initial weights")
    Trajectory.load(tmp_path / "run.pt").replay(replayed)
    assert_same(snapshot(replayed), snapshot(added_net), f"{name} replay with an added group")


def test_add_param_group_unnamed_and_frozen_tensors_are_normalized():
    net = make_net()
    net.head.bias.requires_grad_(False)
    body, _ = _groups(net)
    opt = MeZO([p for _, p in body["params"]], lr=1e-2)
    opt.add_param_group({"params": [net.head.weight, net.head.bias]})
    assert opt.param_groups[1]["param_names"] == ["1.0"]
    assert opt.trajectory.meta["groups"][1]["param_names"] == ["1.0"]
    frozen = net.head.bias.detach().clone()
    run("mezo", opt, net, 1)
    assert_bits_equal(net.head.bias.detach(), frozen, what="frozen bias")
    assert not torch.equal(net.head.weight, make_net().head.weight)


@pytest.mark.parametrize("name", ["mezo", "tezo"])
def test_add_param_group_refusals_change_nothing(name):
    net = make_net()
    body, head = _groups(net)
    opt = make(name, [body])
    before = opt.state_dict()
    spaces = list(opt.spaces)
    cases = [
        ({"params": [net.embed.weight]}, ValueError, "already in another param group"),
        ({"params": list(net.head.parameters()), "lr": -1.0}, ValueError, "param group 1 lr"),
        ({"params": list(net.head.parameters()), "eps": 0.0}, ValueError, "param group 1 eps"),
        ({"params": []}, ValueError, "param group 1 has no trainable tensor"),
        ({"lr": 1e-3}, ValueError, "param group 1 has no 'params'"),
        ([net.head.weight], TypeError, "must be a dict"),
    ]
    for group, error, match in cases:
        with pytest.raises(error, match=match):
            opt.add_param_group(group)
        assert len(opt.param_groups) == 1 and opt.spaces == spaces and len(opt._logs) == 1
        assert_states_equal(opt.state_dict(), before, f"after refusing ({match})")
    run(name, opt, net, 1)
    with pytest.raises(RuntimeError, match="after the first step"):
        opt.add_param_group(head)
    assert len(opt.param_groups) == 1


# -- LeZO layer matching ----------------------------------------------------------------------

def _lezo(params, layers, **kw):
    return LeZO(params, layers=layers, n_active=1, lr=1e-2, seed=2, **kw)


def test_lezo_layer_names_match_through_canonical_names():
    by_module, by_name = make_net(), make_net()
    names = [[f"module.{n}" for n, _ in block.named_parameters(prefix=f"blocks.{i}")]
             for i, block in enumerate(by_name.blocks)]
    opt_module = _lezo(by_module.named_parameters(), list(by_module.blocks))
    opt_name = _lezo(by_name.named_parameters(), names)
    run("lezo", opt_module, by_module, 3)
    run("lezo", opt_name, by_name, 3)
    assert_same(snapshot(by_name), snapshot(by_module), "layers given by module.-prefixed names")
    # and the other way round: a wrapped model's names, layers found on the wrapped model
    from zokernels.integrations import find_transformer_layers

    wrapped = Wrapper(make_net())
    opt_wrapped = _lezo(wrapped.named_parameters(), find_transformer_layers(wrapped))
    run("lezo", opt_wrapped, wrapped.module, 3)
    assert_same(snapshot(wrapped.module), snapshot(by_module), "a module.-wrapped model")


def test_lezo_layers_may_span_param_groups():
    one, two = make_net(), make_net()
    named = list(two.named_parameters())
    groups = [{"params": named[:4]}, {"params": named[4:]}]  # blocks.0 split across the groups
    opt_one = _lezo(one.named_parameters(), list(one.blocks))
    opt_two = _lezo(groups, list(two.blocks))
    run("lezo", opt_one, one, 3)
    run("lezo", opt_two, two, 3)
    assert_same(snapshot(two), snapshot(one), "layers spanning two param groups")


def test_lezo_frozen_parameters_of_a_block_module_are_skipped():
    net = make_net()
    net.blocks[0][0].weight.requires_grad_(False)
    frozen = net.blocks[0][0].weight.detach().clone()
    opt = _lezo(net.named_parameters(), list(net.blocks))
    run("lezo", opt, net, 6)
    assert any(0 in chosen for *_, chosen in opt.trajectory.records())  # block 0 was perturbed
    assert not torch.equal(net.blocks[0][1].weight, make_net().blocks[0][1].weight)
    assert_bits_equal(net.blocks[0][0].weight.detach(), frozen, what="frozen norm weight")


def test_lezo_bad_layer_specs_name_the_culprit():
    net = make_net()
    named = list(net.named_parameters())
    blocks = list(net.blocks)
    stranger = torch.nn.Parameter(torch.zeros(3))
    cases = [
        ([["blocks.0.1.weight", "blocks.0.nope"]], "'blocks.0.nope'.*not among"),
        ([[stranger]], r"layers\[0\] holds a tensor of shape \(3,\).*not among"),
        ([blocks[0], blocks[1], [net.blocks[0][1].weight]],
         r"'blocks.0.1.weight' is in layers\[0\] and layers\[2\]"),
        ([blocks[0], ["module.blocks.0.1.bias"]],
         r"'blocks.0.1.bias' is in layers\[0\] and layers\[1\]"),
        ([blocks[0], torch.nn.Linear(2, 2).requires_grad_(False)],
         r"layers\[1\] has no trainable parameter"),
        ([blocks[0], []], r"layers\[1\] has no trainable parameter"),
        ([blocks[0], "blocks.1.1.weight"], r"layers\[1\] must be a module or a list"),
        ([[3]], r"layers\[0\] holds a int"),
    ]
    for layers, match in cases:
        error = TypeError if "must be a module" in match or "holds a int" in match else ValueError
        with pytest.raises(error, match=match):
            _lezo(named, layers)
    # a trainable parameter of a block module that the optimizer was not given
    without_head_of_block = [(n, p) for n, p in named if n != "blocks.2.1.bias"]
    with pytest.raises(ValueError, match=r"layers\[2\] holds a tensor of shape \(8,\).*freeze it"):
        _lezo(without_head_of_block, blocks)
    # a name whose canonical form matches two parameters
    a, b = torch.zeros(4), torch.zeros(4)
    with pytest.raises(ValueError, match="'module.module.w', which matches"):
        _lezo([("module.w", a), ("w", b), ("x", torch.zeros(2))], [["module.module.w"]])


# -- trajectories: recording without host syncs ---------------------------------------------------

def _meta(groups: int = 2) -> dict:
    return {"base_seed": 3, "dist": "gaussian",
            "groups": [{"param_names": [f"w{g}"], "numel": [1], "keys": [g]}
                       for g in range(groups)]}


def _record_inputs(n: int):
    """n steps of 2 seeds, 2 groups: float32 coefficient tensors, decay tensors, a grad."""
    g = torch.Generator().manual_seed(4)
    for step in range(n):
        coefs = [torch.randn(2, generator=g) * 1e-3, torch.randn(2, generator=g) * 1e-3]
        decays = 1.0 - torch.rand(2, generator=g) * 1e-4
        yield step, [11 * step + 1, 11 * step + 2], coefs, decays, torch.randn((), generator=g)


def test_recording_tensors_gives_the_state_of_recording_floats():
    n = Trajectory.FLUSH_EVERY + 45  # across a batched flush
    with_tensors, with_floats = Trajectory("mezo", _meta()), Trajectory("mezo", _meta())
    for step, seeds, coefs, decays, grad in _record_inputs(n):
        layers = [step % 3] if step % 2 else None
        with_tensors.record(step, seeds, coefs, decays, layers, grad0=grad, lr0=0.5)
        with_floats.record(step, seeds, [c.tolist() for c in coefs], decays.tolist(), layers,
                           grad0=grad.item(), lr0=0.5)
        for c in coefs:
            c.fill_(math.nan)  # the caller reuses its tensors: the record keeps its own copy
    assert_states_equal(with_tensors.state_dict(), with_floats.state_dict())
    assert list(with_tensors.records()) == list(with_floats.records())
    assert with_tensors.extra == with_floats.extra
    _, _, coefs, decays, _ = next(iter(with_tensors.records()))
    assert all(type(c) is float for group in coefs for c in group)
    assert all(type(d) is float for d in decays)


def test_record_does_not_synchronize_and_flushes_in_batches(monkeypatch):
    trajectory = Trajectory("mezo", _meta())
    inputs = list(_record_inputs(2 * Trajectory.FLUSH_EVERY))
    transfers = []
    original_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        transfers.append(self.numel())
        return original_tolist(self)

    def refuse(self, *args, **kwargs):
        raise AssertionError("record() read a tensor on the host")

    with monkeypatch.context() as patch:
        for attr in ("item", "__float__", "__int__", "__bool__", "cpu", "numpy"):
            patch.setattr(torch.Tensor, attr, refuse)
        patch.setattr(torch.Tensor, "tolist", refuse)
        for step, seeds, coefs, decays, grad in inputs[:Trajectory.FLUSH_EVERY - 1]:
            trajectory.record(step, seeds, coefs, decays, grad0=grad)  # below the threshold
        patch.setattr(torch.Tensor, "tolist", counting_tolist)
        for step, seeds, coefs, decays, grad in inputs[Trajectory.FLUSH_EVERY - 1:]:
            trajectory.record(step, seeds, coefs, decays, grad0=grad)
    # one transfer per FLUSH_EVERY records, each of every pending value (2 x 2 + 2 + 1 a record)
    assert transfers == [7 * Trajectory.FLUSH_EVERY] * 2
    first = next(iter(trajectory.records()))
    assert first[2] == [inputs[0][2][0].tolist(), inputs[0][2][1].tolist()]
    assert first[3] == inputs[0][3].tolist()
    assert trajectory.extra["grad0"][0] == inputs[0][4].item()


def test_record_validates_shapes_before_recording():
    trajectory = Trajectory("mezo", _meta())
    with pytest.raises(ValueError, match=r"coefs\[1\] must be a 1-D tensor of 2"):
        trajectory.record(0, [1, 2], [torch.zeros(2), torch.zeros(3)], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"coefs\[0\] must hold 2"):
        trajectory.record(0, [1, 2], [[0.0], [0.0, 0.0]], [1.0, 1.0])
    with pytest.raises(ValueError, match="2 coefficient groups but 1 decays"):
        trajectory.record(0, [1, 2], [[0.0, 0.0], [0.0, 0.0]], [1.0])
    with pytest.raises(ValueError, match="grad0 must be a number or a one-element tensor"):
        trajectory.record(0, [1, 2], [[0.0, 0.0], [0.0, 0.0]], [1.0, 1.0], grad0=torch.zeros(2))
    assert len(trajectory) == 0 and trajectory.extra == {}


def test_tezo_records_device_tensors():
    net, opt = _trained("tezo", steps=0)
    seen = []
    original = opt.trajectory.record

    def spy(step, seeds, coefs, decays, layers=None, **extra):
        seen.append((coefs, extra))
        original(step, seeds, coefs, decays, layers, **extra)

    opt.trajectory.record = spy
    run("tezo", opt, net, 2)
    assert len(seen) == 2
    for coefs, extra in seen:
        assert all(isinstance(c, torch.Tensor) for c in coefs)
        assert isinstance(extra["grad0"], torch.Tensor)
    assert all(type(g) is float for g in opt.trajectory.extra["grad0"])


# -- replay by canonical names ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mezo", "lezo", "tezo"])
@pytest.mark.parametrize("recorded_wrapped", [True, False])
def test_replay_matches_names_through_wrappers(name, recorded_wrapped, tmp_path):
    net = make_net()
    trained = Wrapper(net) if recorded_wrapped else net
    kw = {"layers": list(net.blocks)} if name == "lezo" else {}
    opt = make(name, trained.named_parameters(), weight_decay=0.1, **kw)
    run(name, opt, net, 4)
    names = opt.trajectory.meta["groups"][0]["param_names"]
    assert all(n.startswith("module.") == recorded_wrapped for n in names)
    opt.trajectory.save(tmp_path / "run.pt")
    fresh = make_net()
    target = fresh if recorded_wrapped else Wrapper(fresh)
    Trajectory.load(tmp_path / "run.pt").replay(target)
    assert_same(snapshot(fresh), snapshot(net), f"{name} replayed across a wrapper")


def test_replay_refuses_an_ambiguous_canonical_name():
    a = torch.zeros(4)
    opt = MeZO([("w", a)], lr=1e-2)
    opt.step(lambda: float(a.sum()))
    twins = [("module.w", torch.zeros(4)), ("w", torch.zeros(4))]
    with pytest.raises(ValueError, match=r"'w' matches \['module.w', 'w'\]"):
        opt.trajectory.replay(twins)
    assert all(not t.any() for _, t in twins)
    with pytest.raises(ValueError, match="lack 1 recorded parameter"):
        opt.trajectory.replay([("v", torch.zeros(4))])


# -- undo logs: TeZO's low-rank logs, overflow accounting ---------------------------------------

def _all_logs(opt) -> list[UndoLog]:
    pairs = list(opt._logs) + list(getattr(opt, "_lowrank_logs", []))
    return [log for pair in pairs for log in pair]


def _small_weights_trained(name: str):
    """A net of N(0, 0.02)-sized bf16 weights (a few % of them lost to each perturbation's
    rounding), two steps into training, with in-place probes (they keep the logs)."""
    net = make_net()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.05)
    opt = build(name, net, probe="inplace")  # MeZO too: its logs are what is tested
    run(name, opt, net, 2)
    return net, opt


def _tiny_logs(opt) -> list[UndoLog]:
    """Replace every undo log by one sized for 1e-6 of the elements, without slack: its next
    pass overflows (bf16 weights lose a few % of their elements to rounding). The dense selector
    logs keep a fixed row of bits per block: they get rows of one word and the weights are
    scaled down 1e6 x first (every element then needs many selector bits), so that their
    blocks spill to the tiny pool."""
    with torch.no_grad():
        for group in opt.param_groups:
            for p in group["params"]:
                p.mul_(1e-6)
    tiny = {"fraction": {"cpu|torch.bfloat16": 1e-6}, "passes": {"cpu|torch.bfloat16": 2}}

    def log(kind) -> UndoLog:
        # the dense selector logs (rows of one word of bits, so that blocks spill to the pool)
        # or the low-rank undo logs
        made = kind(slack=0, words=2) if kind is SelectorLog else kind(slack=0)
        made.load_state_dict(dict(tiny, unit=kind.UNIT))  # sizes in the log's own unit
        return made

    opt._logs = [(log(type(a)), log(type(b))) for a, b in opt._logs]
    if hasattr(opt, "_lowrank_logs"):
        opt._lowrank_logs = [(log(type(a)), log(type(b))) for a, b in opt._lowrank_logs]
    return _all_logs(opt)


def test_tezo_undo_log_bytes_count_the_lowrank_logs():
    net = make_net()
    opt = build("tezo", net, probe="inplace")  # the in-place probes' logs
    run("tezo", opt, net, 3)
    dense = sum(log.nbytes for pair in opt._logs for log in pair)
    lowrank = sum(log.nbytes for pair in opt._lowrank_logs for log in pair)
    assert lowrank > 0 and opt.undo_log_bytes == dense + lowrank


@pytest.mark.parametrize("fail_at", [1, 2])
def test_tezo_failed_closure_leaves_no_live_log_entry(fail_at):
    net, opt = _trained("tezo", steps=2)
    before = snapshot(net)
    x, y = _data()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return torch.nn.functional.mse_loss(net(x.to(torch.bfloat16)).float(), y)

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert_same(snapshot(net), before, "after the failed step")
    for log in _all_logs(opt):
        assert log.plan is None and log.buffers is None
    assert opt.undo_log_bytes > 0  # the buffers stay allocated for the next steps
    assert not opt._step_in_progress()


@pytest.mark.parametrize("name", ["mezo", "tezo"])
def test_every_overflowing_log_is_counted_once_warned_and_grown(name):
    net, opt = _small_weights_trained(name)
    logs = _tiny_logs(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(name, opt, net, 1)
    overflow_warnings = [w for w in caught if "undo log overflowed" in str(w.message)]
    assert [log.overflows for log in logs] == [1] * len(logs)  # dense (and low-rank): all of them
    assert opt.zo_state["undo_overflows"] == len(logs) == len(overflow_warnings)
    assert all(w.category is RuntimeWarning for w in overflow_warnings)
    # the logs grew to the counts they saw: the next steps fit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(name, opt, net, 3)
    assert opt.zo_state["undo_overflows"] == len(logs)


def test_an_overflow_seen_first_by_a_restore_is_counted():
    net, opt = _small_weights_trained("tezo")
    logs = _tiny_logs(opt)
    plus_logs = [pair[0] for pair in list(opt._logs) + list(opt._lowrank_logs)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyboardInterrupt):
            opt.step(lambda: (_ for _ in ()).throw(KeyboardInterrupt))
    assert [log.overflows for log in plus_logs] == [1] * len(plus_logs)
    assert sum(log.overflows for log in logs) == len(plus_logs)  # the -eps pass never ran
    assert opt.zo_state["undo_overflows"] == len(plus_logs)
    assert len([w for w in caught if "undo log overflowed" in str(w.message)]) == len(plus_logs)


def test_log_sizes_load_only_in_their_own_unit():
    """A log's learned sizes count lost elements (UndoLog) or pool words of one stream format
    (SelectorLog): a state saved by the other kind, or by the selector logs' older stream
    (no unit recorded), loads its counters but not its sizes, so the log probes again instead of
    sizing a pool for another format."""
    group = {"cpu|torch.bfloat16": 0.01}
    for log_type, other in ((SelectorLog, UndoLog), (UndoLog, SelectorLog)):
        own = log_type().state_dict()
        own.update(fraction=dict(group), passes={"cpu|torch.bfloat16": 3}, overflows=2)
        loaded = log_type()
        loaded.load_state_dict(own)
        assert loaded.state_dict() == own
        foreign = dict(own, unit=other.UNIT)
        loaded = log_type()
        loaded.load_state_dict(foreign)
        assert loaded.state_dict()["fraction"] == {} and loaded.state_dict()["passes"] == {}
        assert loaded.overflows == 2
    legacy = {"fraction": dict(group), "passes": {}, "overflows": 0, "probes": 1}
    undo, selector = UndoLog(), SelectorLog()
    undo.load_state_dict(legacy)
    selector.load_state_dict(legacy)
    assert undo.state_dict()["fraction"] == group
    assert selector.state_dict()["fraction"] == {}
    with pytest.raises(ValueError, match="unit"):
        SelectorLog().load_state_dict(dict(legacy, unit=3))
