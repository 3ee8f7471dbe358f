"""Hostile input to the optimizers and trajectories (issue 18, items 6-15): overflowing projected
gradients, bad state dicts, nested steps, replays, work bounds, seed rules, clear errors."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import zokernels
from helpers import assert_same, assert_states_equal, snapshot, square_loss, two_layer_model
from zokernels import Trajectory, noise, perturb_
from zokernels.optim import LeZO, MeZO, PseuZO, TeZO
from zokernels.trajectory import MAX_SEEDS_PER_STEP

PACKAGE_PARENT = str(pathlib.Path(zokernels.__file__).resolve().parents[1])
BIG = 3.0e38  # finite in float32; BIG - (-BIG) is not


model, loss_of = two_layer_model, square_loss  # helpers.py


def make(name: str, net: torch.nn.Module, **kwargs):
    if name == "mezo":
        return MeZO(net.named_parameters(), lr=1e-2, seed=5, **kwargs)
    if name == "lezo":
        return LeZO(net.named_parameters(), layers=[net[0], net[1]], n_active=1, lr=1e-2,
                    seed=5, **kwargs)
    if name == "tezo":
        return TeZO(net.named_parameters(), lr=1e-2, seed=5, rank=2, variant="adam", **kwargs)
    return PseuZO(net.named_parameters(), lr=1e-2, seed=5, window=3, **kwargs)


def take_step(name: str, opt, net: torch.nn.Module):
    x = torch.linspace(-1, 1, 12).reshape(2, 6)
    if name == "pseuzo":
        return opt.step(lambda: net(x), lambda out: out.pow(2).mean())
    return opt.step(loss_of(net))


# -- item 6: finite losses whose difference overflows ---------------------------------------------

@pytest.mark.parametrize("name", ["mezo", "lezo", "tezo"])
def test_overflowing_projected_gradient_is_skipped_exactly(name):
    net = model()
    opt = make(name, net)
    take_step(name, opt, net)  # a normal step first: moments and logs in use
    before, state = snapshot(net), opt.state_dict()
    losses = iter([BIG, -BIG])
    x = torch.linspace(-1, 1, 12).reshape(2, 6)

    # the closure runs the model: a probe that runs none of TeZO's probe hooks is taken for a
    # compiled graph that skips them (the step falls back to in-place probes and runs again)
    with pytest.warns(RuntimeWarning, match="non-finite loss or projected gradient"):
        opt.step(lambda: net(x).sum() * 0.0 + next(losses))
    assert_same(snapshot(net), before, "weights")
    assert opt.zo_state["skipped_steps"] == 1 and opt.zo_state["step"] == 2
    after = opt.state_dict()
    for key in ("param_groups", "base_seed"):
        assert_states_equal(after[key], state[key])
    for key in ("momentum", "second", "window"):  # the moments / window did not move
        if key in state["extra"]:
            assert_states_equal(after["extra"][key], state["extra"][key])
    assert len(opt.trajectory) == 1  # the skipped step is not recorded
    take_step(name, opt, net)  # and the run goes on
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_pseuzo_overflowing_coefficients_are_skipped_exactly():
    """Finite projections whose update coefficients -(lr / eps) * projection overflow."""
    net = model()
    opt = PseuZO(net.named_parameters(), lr=1e30, eps=1e-3, seed=5, window=3)
    x = torch.linspace(-1, 1, 12).reshape(2, 6)
    before = snapshot(net)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(lambda: net(x) * 1e20, lambda out: out.sum())
    assert_same(snapshot(net), before, "weights")
    assert opt.zo_state["skipped_steps"] == 1 and opt.window_bytes == 0


# -- item 7: TeZO moments and PseuZO windows in load_state_dict -----------------------------------

@pytest.mark.parametrize("entry, value, match", [
    ("momentum", float("nan"), "finite"),
    ("momentum", float("inf"), "finite"),
    ("second", float("nan"), "finite"),
    ("second", -1.0, ">= 0"),
])
def test_tezo_moments_must_be_finite(entry, value, match):
    net = model()
    opt = make("tezo", net)
    take_step("tezo", opt, net)
    state = opt.state_dict()
    bad = opt.state_dict()
    bad["extra"][entry][0][0] = value
    with pytest.raises(ValueError, match=rf"{entry}\[0\].*{match}"):
        opt.load_state_dict(bad)
    assert_states_equal(opt.state_dict(), state)


def test_tezo_moments_on_meta_are_refused():
    net = model()
    opt = make("tezo", net)
    bad = opt.state_dict()
    bad["extra"]["momentum"][0] = bad["extra"]["momentum"][0].to("meta")
    with pytest.raises(ValueError, match=r"momentum\[0\]"):
        opt.load_state_dict(bad)
    take_step("tezo", opt, net)  # still works


@pytest.mark.parametrize("poison", ["nan", "inf", "meta"])
def test_pseuzo_window_deltas_must_be_finite_with_values(poison):
    net = model()
    opt = make("pseuzo", net)
    take_step("pseuzo", opt, net)
    take_step("pseuzo", opt, net)
    state = opt.state_dict()
    bad = opt.state_dict()
    delta = bad["extra"]["window"][0]["delta"].clone()
    if poison == "meta":
        delta = delta.to("meta")
    else:
        delta.view(-1)[0] = float(poison)
    bad["extra"]["window"][0]["delta"] = delta
    with pytest.raises(ValueError, match=r"\['window'\]\[0\]\['delta'\]"):
        opt.load_state_dict(bad)
    assert_states_equal(opt.state_dict(), state)
    take_step("pseuzo", opt, net)
    assert opt.zo_state["skipped_steps"] == 0


# -- items 8, 13: the embedded trajectory and the counters ----------------------------------------

def _mezo_state(n_spsa: int = 2):
    net = model()
    opt = MeZO(net.named_parameters(), lr=1e-2, seed=5, n_spsa=n_spsa)
    for _ in range(2):
        opt.step(loss_of(net))
    return net, opt


def _corrupt(state: dict, what: str) -> None:
    trajectory = state["trajectory"]
    if what == "coef row missing":
        trajectory["coefs"] = trajectory["coefs"][:-1]
    elif what == "n_seeds against n_spsa":
        trajectory["n_seeds"] = torch.tensor([1, 3], dtype=torch.int16)
    elif what == "nan decay":
        trajectory["decays"][1, 0] = float("nan")
    elif what == "nan coef":
        trajectory["coefs"][0, 0] = float("nan")
    elif what == "step counter 2^63":
        state["zo_state"]["step"] = 1 << 63
    elif what == "steps not increasing":
        trajectory["step"] = torch.tensor([1, 1])
    elif what == "record beyond the step counter":
        state["zo_state"]["step"] = 1
    elif what == "bad layer choice":
        trajectory["n_layers"] = torch.tensor([1, -1], dtype=torch.int16)
        trajectory["layers"] = torch.tensor([0], dtype=torch.int16)
    else:
        raise AssertionError(what)


@pytest.mark.parametrize("what", ["coef row missing", "n_seeds against n_spsa", "nan decay",
                                  "nan coef", "step counter 2^63", "steps not increasing",
                                  "record beyond the step counter", "bad layer choice"])
def test_inconsistent_state_is_refused_before_anything_changes(what):
    net, opt = _mezo_state()
    state = opt.state_dict()
    bad = opt.state_dict()
    _corrupt(bad, what)
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    assert_states_equal(opt.state_dict(), state)  # unchanged, and still checkpointable
    opt.step(loss_of(net))


def test_trajectory_declaring_huge_seed_counts_is_refused(tmp_path):
    """Item 13: a few KB declaring 32767 derived seeds per step (coefs a stride-0 view)."""
    steps = 40
    state = {"version": 1, "algorithm": "mezo",
             "meta": {"base_seed": 1, "dist": "gaussian",
                      "groups": [{"param_names": ["w"], "numel": [4], "keys": [0]}]},
             "step": torch.arange(steps), "n_seeds": torch.full((steps,), 32767, dtype=torch.int16),
             "seeds": None, "coefs": torch.zeros(1, 1).expand(steps * 32767, 1),
             "decays": torch.ones(steps, 1),
             "n_layers": torch.full((steps,), -1, dtype=torch.int16),
             "layers": torch.zeros(0, dtype=torch.int16), "extra": {}}
    torch.save(state, tmp_path / "t.pt")
    assert (tmp_path / "t.pt").stat().st_size < 10_000
    with pytest.raises(ValueError, match="n_seeds"):
        Trajectory.load(tmp_path / "t.pt")
    # within the per-step maximum, the declared values must still be in the file
    state["n_seeds"] = torch.full((steps,), MAX_SEEDS_PER_STEP, dtype=torch.int16)
    state["coefs"] = torch.zeros(1, 1).expand(steps * MAX_SEEDS_PER_STEP, 1)
    torch.save(state, tmp_path / "t.pt")
    with pytest.raises(ValueError, match="expanded view"):
        Trajectory.load(tmp_path / "t.pt")


def test_seed_counts_beyond_the_maximum_are_refused_by_the_optimizers():
    with pytest.raises(ValueError, match="n_spsa"):
        MeZO(model().parameters(), n_spsa=MAX_SEEDS_PER_STEP + 1)
    with pytest.raises(ValueError, match="window"):
        PseuZO(model().parameters(), window=MAX_SEEDS_PER_STEP + 1)


# -- item 9: re-entrant step ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mezo", "lezo", "tezo", "pseuzo"])
def test_nested_step_is_refused_and_weights_kept(name):
    net = model()
    opt = make(name, net)
    before = snapshot(net)
    x = torch.linspace(-1, 1, 12).reshape(2, 6)
    inner = []

    def reentrant():
        try:
            take_step(name, opt, net)
        except RuntimeError as exc:
            inner.append(exc)
            raise
        return loss_of(net)()

    with pytest.raises(RuntimeError, match="steps cannot nest"):
        if name == "pseuzo":
            opt.step(lambda: (reentrant(), net(x))[1], lambda out: out.pow(2).mean())
        else:
            opt.step(reentrant)
    assert len(inner) == 1
    assert_same(snapshot(net), before, "weights")
    assert opt.zo_state["step"] == 0 and len(opt.trajectory) == 0
    take_step(name, opt, net)  # the guard was released
    assert opt.zo_state["step"] == 1


# -- item 14: hooks and the seed rule -------------------------------------------------------------

@pytest.mark.parametrize("name", ["mezo", "tezo", "pseuzo"])
def test_integer_hyperparameters_beyond_int64_are_kept_as_floats(name):
    """2^64 is a finite number but no int64: kept as the int, it passed the checks and broke
    the step's tensor arithmetic (OverflowError). The constructor, add_param_group and
    load_state_dict all store the checked lr / eps / weight_decay as floats."""
    net = model()
    opt = make(name, net)
    state = opt.state_dict()
    state["param_groups"][0]["eps"] = 1 << 64
    opt.load_state_dict(state)
    assert type(opt.param_groups[0]["eps"]) is float
    built = MeZO([{"params": list(net.parameters()), "lr": 0, "eps": 1 << 64}], weight_decay=1)
    assert [type(built.param_groups[0][k]) for k in ("lr", "eps", "weight_decay")] == [float] * 3
    take_step(name, opt, net)  # no OverflowError
    take_step("mezo", built, net)


def test_state_dict_hooks_run_as_in_torch_optim():
    net, opt = _mezo_state()
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "note": 1} if calls.append("post")
                                      is None else None)
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: calls.append("load-pre") or {k: v for k, v in sd.items() if k != "note"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    state = opt.state_dict()
    assert state["note"] == 1 and calls == ["pre", "post"]
    opt.load_state_dict(state)  # the pre hook removes the entry the loader would refuse
    assert calls == ["pre", "post", "load-pre", "load-post"]


@pytest.mark.parametrize("seed", [0, 2 ** 64 - 1])
def test_any_constructor_seed_round_trips(seed):
    net = model()
    opt = MeZO(net.named_parameters(), seed=seed)
    opt.step(loss_of(net))
    opt.load_state_dict(opt.state_dict())


def test_seed_rule_is_the_ops_rule():
    t = torch.zeros(3)
    for bad, error in ((2 ** 64, ValueError), (-1, ValueError), ("1", TypeError),
                       (1.0, TypeError), (True, TypeError)):
        with pytest.raises(error):
            perturb_(t, bad, [1.0])
        with pytest.raises(error, match="seed"):
            MeZO(model().parameters(), seed=bad)


# -- items 10-12: replay --------------------------------------------------------------------------

_FRESH_REPLAY = textwrap.dedent(r"""
    import sys
    import torch
    import zokernels
    from zokernels import Trajectory

    trajectory = Trajectory.load(sys.argv[1])
    assert "zokernels.optim" not in sys.modules, "loading a trajectory imported zokernels.optim"
    weights = torch.load(sys.argv[2])
    trajectory.replay(list(weights.items()))
    torch.save(weights, sys.argv[3])
""")


def test_tezo_replays_in_a_fresh_interpreter_without_importing_optim_first(tmp_path):
    net = model()
    initial = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = make("tezo", net)
    for _ in range(3):
        take_step("tezo", opt, net)
    opt.trajectory.save(tmp_path / "t.pt")
    torch.save(initial, tmp_path / "w.pt")
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _FRESH_REPLAY, str(tmp_path / "t.pt"),
                           str(tmp_path / "w.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same(torch.load(tmp_path / "out.pt"), snapshot(net), "weights")


def test_unknown_algorithm_is_refused():
    net, opt = _mezo_state()
    state = opt.trajectory.state_dict()
    state["algorithm"] = "mystery"
    trajectory = Trajectory.from_state_dict(state)
    fresh = model()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="mystery"):
        trajectory.replay(fresh)
    assert_same(snapshot(fresh), before, "weights")


def test_replay_of_an_unnamed_run_takes_the_tensors_in_order():
    """Item 11: MeZO(model.parameters()) -> replay(list(model.parameters())); a module is
    refused with an explanation; frozen parameters are skipped as the optimizer skipped them."""
    net = model()
    net[0].bias.requires_grad_(False)
    fresh = model()
    fresh[0].bias.requires_grad_(False)
    opt = MeZO(net.parameters(), lr=1e-2, seed=5)
    for _ in range(2):
        opt.step(loss_of(net))
    trajectory = Trajectory.from_state_dict(opt.trajectory.state_dict())
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"list\(model.parameters\(\)\)"):
        trajectory.replay(fresh)
    assert_same(snapshot(fresh), before, "weights")
    with pytest.raises(ValueError, match="the run recorded 3"):
        trajectory.replay(list(fresh.parameters())[:3])
    trajectory.replay(fresh.parameters())
    assert_same(snapshot(fresh), snapshot(net), "weights")


def test_replay_of_a_named_run_takes_a_module_or_tensors_in_order():
    net = model()
    opt = MeZO(net.named_parameters(), lr=1e-2, seed=5)
    for _ in range(2):
        opt.step(loss_of(net))
    for params in (lambda m: m, lambda m: list(m.parameters())):
        fresh = model()
        opt.trajectory.replay(params(fresh))
        assert_same(snapshot(fresh), snapshot(net), "weights")


def test_replay_checks_every_record_before_applying_any():
    """Item 12: a bad third record used to leave the first two applied."""
    net, opt = _mezo_state(n_spsa=1)
    trajectory = opt.trajectory
    # a device tensor's values are not read by record() (no host sync): replay must catch them
    trajectory.record(2, [opt.seed_for(2)], [torch.tensor([float("nan")])], [1.0])
    fresh = model()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"record 2 .*coefs\[0\]"):
        trajectory.replay(fresh)
    assert_same(snapshot(fresh), before, "weights")


# -- item 15: clear errors ------------------------------------------------------------------------

@pytest.mark.parametrize("scales", [torch.tensor(1.0, device="meta"), torch.ones(1, device="meta")],
                         ids=["0-dim", "1-dim"])
def test_meta_scales_are_refused_by_name(scales):
    t = torch.zeros(5)
    with pytest.raises(ValueError, match="scales is a meta tensor"):
        perturb_(t, 1, scales)
    assert torch.equal(t, torch.zeros(5))


@pytest.mark.parametrize("device, match", [("bogus", "not a device"),
                                           ("cuda", "CUDA is not available")])
def test_noise_device_errors_name_the_argument(device, match):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match=rf"device='{device}'.*{match}"):
        noise(8, 1, device=device)


@pytest.mark.parametrize("field, value", [("betas", [1.0, 0.999]), ("variant", "lion"),
                                          ("delta", 0.0), ("rank", 0)])
def test_tezo_replay_refuses_a_hostile_meta_before_writing(field, value):
    net = model()
    opt = make("tezo", net)
    for _ in range(2):
        take_step("tezo", opt, net)
    state = opt.trajectory.state_dict()
    state["meta"][field] = value
    _refused_replay(Trajectory.from_state_dict(state), field)


def _refused_replay(trajectory: Trajectory, match: str) -> tuple[torch.nn.Module, dict]:
    """Replay `trajectory` onto a fresh model: ValueError matching `match`, weights untouched;
    returns the model and its weights."""
    fresh = model()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        trajectory.replay(fresh)
    assert_same(snapshot(fresh), before, "weights")
    return fresh, before


def _deferred_tezo_trajectory_state() -> dict:
    """A deferred TeZO run over two param groups (its meta names each group's virtual weights,
    its records carry the merge and deferred columns), as a trajectory state."""
    net = model()
    groups = [{"params": [(f"{i}.{n}", p) for n, p in net[i].named_parameters()]}
              for i in (0, 1)]
    opt = TeZO(groups, lr=1e-2, seed=5, rank=2, variant="adam", update="deferred")
    for _ in range(3):
        take_step("tezo", opt, net)
    return opt.trajectory.state_dict()


def _overflowing_gradient(state: dict) -> None:
    state["extra"]["grad0"][-1] = 3e38  # finite in float32, overflows the recursion


@pytest.mark.parametrize("corrupt, match", [
    (lambda s: s["meta"].__setitem__("tezo_virtual", s["meta"]["tezo_virtual"][:1]),
     "tezo_virtual must name"),
    (lambda s: s["meta"]["tezo_virtual"][1].append("0.weight"), "tezo_virtual must name"),
    (lambda s: s["extra"].pop("merge"), r"lacks the columns \['merge'\]"),
    (_overflowing_gradient, "record 2: the update of param group 0 is not finite"),
], ids=["a group short", "a weight of another group", "no merge column", "overflow"])
def test_deferred_tezo_replay_refuses_an_inconsistent_file_before_writing(corrupt, match):
    """Refused before any weight is written: the groups' virtual weights and the deferred
    columns the replay reads, and updates that overflow float32 in the tau-space recursion
    from finite recorded values (the run itself would have skipped such a step)."""
    state = _deferred_tezo_trajectory_state()
    corrupt(state)
    fresh, before = _refused_replay(Trajectory.from_state_dict(state), match)
    good = Trajectory.from_state_dict(_deferred_tezo_trajectory_state())
    good.replay(fresh)  # the same replay from an intact file goes through
    assert not torch.equal(snapshot(fresh)["0.weight"], before["0.weight"])


def test_tezo_replay_without_a_base_seed_is_refused_before_writing():
    """A trajectory built in memory (a file without one is refused on load) whose meta lost
    the base seed the factors and taus are drawn from: ValueError, not a KeyError mid-way."""
    trajectory = Trajectory.from_state_dict(_deferred_tezo_trajectory_state())
    del trajectory.meta["base_seed"]
    _refused_replay(trajectory, "base_seed")


def test_pseuzo_window_of_another_store_dtype_is_refused():
    net = model()
    opt = PseuZO(net.named_parameters(), lr=1e-2, seed=5, window=3, store_dtype=torch.float16)
    take_step("pseuzo", opt, net)
    bad = opt.state_dict()
    bad["extra"]["window"][0]["delta"] = bad["extra"]["window"][0]["delta"].float()
    with pytest.raises(ValueError, match="float16"):
        opt.load_state_dict(bad)


@pytest.mark.parametrize("name", ["mezo", "lezo", "tezo", "pseuzo"])
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_meta_parameters_are_refused_when_the_optimizer_is_built(name, which):
    """A parameter on the meta device holds no values and never will (torch replaces a meta
    model's parameters when it materializes it). Steps used to fail deep inside a pass with
    torch's "Tensor.item() cannot be called on meta tensors", or, for TeZO's virtual probes,
    after the 1-D parameters had been updated."""
    net = model()
    setattr(net[1], which, torch.nn.Parameter(torch.empty_like(getattr(net[1], which),
                                                               device="meta")))
    with pytest.raises(ValueError, match=r"\(1\.%s\) is on the meta device" % which):
        make(name, net, backend="torch")


def test_a_space_refuses_to_write_meta_parameters_before_writing():
    from zokernels.space import ParameterSpace

    real, meta = torch.zeros(5), torch.empty(3, device="meta")
    space = ParameterSpace([("real", real), ("meta", meta)], backend="torch")
    with pytest.raises(ValueError, match=r"params\[1\] \(meta\) is on the meta device"):
        space.apply(1, 0.5)
    assert torch.equal(real, torch.zeros(5))


@pytest.mark.parametrize("name", ["mezo", "tezo", "pseuzo"])
def test_a_skipped_step_warns_at_the_callers_line(name):
    """The warning names the user's `opt.step(...)` line, not a line inside zokernels (nor
    torch.optim's step wrapper), so `warnings.filterwarnings(module=...)` and the printed
    location point at the training loop."""
    net = model()
    opt = make(name, net)
    x = torch.linspace(-1, 1, 12).reshape(2, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if name == "pseuzo":
            opt.step(lambda: net(x), lambda out: out.sum() * float("nan"))
        else:
            opt.step(lambda: net(x).sum() * float("nan"))
    (warning,) = [w for w in caught if "non-finite" in str(w.message)]
    assert warning.filename == __file__, warning.filename


def test_a_warning_from_a_python_c_script_names_its_line():
    """`python -c` code has no source a loader can give (warnings.warn_explicit with the
    module's globals raised ImportError there): the warning is printed at <string>'s line."""
    code = textwrap.dedent("""\
        import torch
        from zokernels.optim import MeZO
        net = torch.nn.Linear(3, 1)
        opt = MeZO(net.parameters(), lr=1e-2)
        opt.step(lambda: net(torch.ones(2, 3)).sum() * float("nan"))
        """)
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert child.returncode == 0, child.stderr
    assert "<string>:5: RuntimeWarning: MeZO: non-finite loss" in child.stderr, child.stderr


def test_a_warning_names_the_line_of_a_module_being_imported(tmp_path, monkeypatch):
    """A step run by a module's top-level code while it is imported: the warning names that
    module's line (importlib's frames are above it; the warning is issued for the frame found,
    not by a stack level that the warnings module would count skipping importlib's frames), and
    the `default` action's registry of what was shown is that module's."""
    source = textwrap.dedent("""\
        import torch
        from zokernels.optim import MeZO
        net = torch.nn.Linear(3, 1)
        opt = MeZO(net.parameters(), lr=1e-2, seed=5)
        x = torch.ones(2, 3)
        for _ in range(2):
            opt.step(lambda: net(x).sum() * float("nan"))
        """)
    (tmp_path / "zk_user_module.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "zk_user_module", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        import importlib
        module = importlib.import_module("zk_user_module")
    found = [w for w in caught if "non-finite" in str(w.message)]
    assert len(found) == 2, [str(w.message) for w in caught]  # one per skipped step
    for warning in found:
        assert warning.filename == str(tmp_path / "zk_user_module.py"), warning.filename
        assert warning.lineno == 7
    assert module.__warningregistry__, "the registry is the importing module's"
