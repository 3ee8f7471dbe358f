"""Adversarial review of the hardened API (after issue 18): cases its tests did not cover.

Tensors whose Python class lies about their memory, negated views, hostile files whose tensors
share or expand one small storage, numbers too large for a float, PseuZO schedules, bench
arguments beyond the library's own limits. Crash probes run in a child process.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch

import zokernels
from helpers import (assert_bits_equal, assert_same, assert_states_equal, cli_runner, snapshot,
                     square_loss, two_layer_model)
from zokernels import ParameterSpace, Trajectory, lowrank_perturb_, perturb_
from zokernels.compat import patch_mezo_trainer
from zokernels.optim import MeZO, PseuZO

PACKAGE_PARENT = str(pathlib.Path(zokernels.__file__).resolve().parents[1])


model, loss_of = two_layer_model, square_loss  # helpers.py


# -- tensors whose class lies about their memory -------------------------------------------------

# A subclass is a real tensor with real storage, but its Python methods are the user's: a
# data_ptr / numel override used to reach the C++ kernel (SIGSEGV writing at address 16).
_LIAR_CHILD = textwrap.dedent(r"""
    import json, warnings
    import torch
    from zokernels import ParameterSpace, perturb_
    from zokernels.optim import MeZO

    warnings.simplefilter("ignore")

    class Liar(torch.Tensor):
        def data_ptr(self):
            return 16

        def numel(self):
            return 1 << 40

    class LiarParameter(torch.nn.Parameter):
        def data_ptr(self):
            return 16

    results = {}

    def run(name, make, call):
        plain = torch.linspace(-1, 1, 24)
        expected = plain.clone()
        call(expected)
        t = make(plain.clone())
        try:
            call(t)
            ok = torch.equal(torch.Tensor.detach(t).as_subclass(torch.Tensor), expected)
            results[name] = "same" if ok else "different"
        except Exception as exc:
            results[name] = type(exc).__name__ + ": " + str(exc)

    for backend in ("cpu", "torch"):
        run(f"perturb_ {backend}", lambda t: t.as_subclass(Liar),
            lambda t: perturb_(t, 7, [0.5], backend=backend))
        run(f"space {backend}", lambda t: LiarParameter(t),
            lambda t: ParameterSpace([("w", t)], backend=backend).apply(7, 0.5))
        run(f"scales {backend}", lambda t: t,
            lambda t: perturb_(t, 7, torch.tensor([0.5]).as_subclass(Liar), backend=backend))

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(net.state_dict())
    net.weight = LiarParameter(net.weight.detach().clone())
    x = torch.ones(2, 4)
    for m in (net, twin):
        opt = MeZO(m.parameters(), lr=1e-2, seed=3, backend="cpu")
        for _ in range(2):
            opt.step(lambda: m(x).pow(2).mean())
    results["MeZO cpu"] = "same" if torch.equal(net.weight.detach().as_subclass(torch.Tensor),
                                                twin.weight.detach()) else "different"
    w = torch.ones(8)  # scales aliasing the written tensor, their pointer hidden
    try:
        perturb_(w, 1, w[:1].as_subclass(Liar), backend="cpu")
        results["scales alias"] = "no error"
    except Exception as exc:
        results["scales alias"] = type(exc).__name__ + ": " + str(exc)
    results["scales alias"] += "" if torch.equal(w, torch.ones(8)) else " (written)"
    print("RESULTS " + json.dumps(results))
""")


def test_subclass_overrides_cannot_redirect_the_kernels(tmp_path):
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _LIAR_CHILD], capture_output=True, text=True,
                          env=env, cwd=tmp_path)  # not the checkout: the installed package
    assert proc.returncode == 0, f"the child died (rc {proc.returncode})\n{proc.stderr[-3000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    results = json.loads(line[len("RESULTS "):])
    alias = results.pop("scales alias")
    assert alias.startswith("ValueError: scales shares memory with tensors[0]"), alias
    assert not alias.endswith("(written)"), alias
    assert results and all(v == "same" for v in results.values()), results


class _DtypeLiar(torch.Tensor):
    """A float64 tensor whose __torch_function__ says it is float32 (and contiguous)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__self__", None) is torch.Tensor.dtype:  # the property's getter
            return torch.float32
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_torch_function_cannot_lie_about_the_dtype(backend):
    """Checks read torch's metadata, not what __torch_function__ answers: a float64 tensor that
    claims float32 used to get float32 values written over half its bytes."""
    raw = torch.linspace(-1, 1, 16, dtype=torch.float64)
    t = raw.clone().as_subclass(_DtypeLiar)
    assert t.dtype == torch.float32  # the lie
    with pytest.raises(TypeError, match=r"tensors\[0\] has dtype torch.float64"):
        perturb_(t, 1, [1.0], backend=backend)
    assert_bits_equal(torch.Tensor.as_subclass(t, torch.Tensor), raw, "the refused tensor")


def test_plain_subclasses_still_work_and_bump_versions():
    class Tagged(torch.Tensor):
        pass

    t = torch.zeros(8).as_subclass(Tagged)
    version = t._version
    perturb_(t, 3, [1.0], backend="cpu")
    expected = torch.zeros(8)
    perturb_(expected, 3, [1.0], backend="cpu")
    assert type(t) is Tagged and torch.equal(t.as_subclass(torch.Tensor), expected)
    assert t._version > version


@pytest.mark.parametrize("argument", ["seeds", "seed-0d", "keys", "rounding_seed", "scales[0]",
                                      "index_maps"])
def test_meta_integer_arguments_are_refused_by_name(argument):
    """Seeds, keys and other numbers given as meta tensors raised torch's NotImplementedError /
    RuntimeError ("Cannot copy out of meta tensor") instead of naming the argument."""
    meta = torch.tensor(3, device="meta")
    w = torch.zeros(8)
    kwargs = dict(tensors=w, seeds=1, scales=[1.0])
    name = argument
    if argument == "seeds":
        kwargs["seeds"] = torch.tensor([1, 2], device="meta")
        kwargs["scales"] = [1.0, 1.0]
    elif argument == "seed-0d":
        kwargs["seeds"], name = meta, "seeds"
    elif argument == "keys":
        kwargs["keys"] = torch.tensor([1], device="meta")
    elif argument == "rounding_seed":
        kwargs["rounding_seed"] = meta
    elif argument == "scales[0]":
        kwargs["scales"] = [torch.tensor(1.0, device="meta")]
    else:
        kwargs["index_maps"], name = [(meta, 8, 8)], "index_maps[0]"
    with pytest.raises(ValueError, match=re.escape(name) + " is a meta tensor"):
        perturb_(**kwargs)
    assert torch.equal(w, torch.zeros(8))
    with pytest.raises(ValueError, match="numel is a meta tensor"):
        zokernels.noise(meta, 1)


# -- negated views -------------------------------------------------------------------------------

def _neg_writes():
    yield "perturb_", lambda t: perturb_(t, 1, [1.0], backend="cpu")
    yield "lowrank_perturb_", lambda t: lowrank_perturb_(
        t.view(4, 2), [torch.ones(4, 1)], [torch.ones(2, 1)], torch.ones(1), backend="cpu")
    yield "ParameterSpace", lambda t: ParameterSpace([t], backend="cpu").perturb(1, 1.0)


@pytest.mark.parametrize("op", [name for name, _ in _neg_writes()])
def test_negated_views_are_refused(op):
    """A contiguous view with the negative bit (z.conj().imag, torch._neg_view) shares memory
    with its base but reads negated: the kernels wrote its raw memory, so t + eps z came out as
    t - eps z in the view (and the base moved the wrong way)."""
    call = dict(_neg_writes())[op]
    base = torch.linspace(-1, 1, 8)
    view = torch._neg_view(base)
    before = base.clone()
    with pytest.raises(ValueError, match="negat"):
        call(view)
    assert_bits_equal(base, before, "the base of the refused view")


def test_negated_read_tensors_keep_their_sign():
    """Scales and factors are read: a negated view of them must mean its (negative) values."""
    scales = torch._neg_view(torch.tensor([0.5, -0.25]))
    taus = torch._neg_view(torch.tensor([2.0]))
    for backend in ("cpu", "torch"):
        w, expected = torch.zeros(24), torch.zeros(24)
        perturb_(w, [3, 4], scales, backend=backend)
        perturb_(expected, [3, 4], [-0.5, 0.25], backend=backend)
        assert_bits_equal(w, expected, f"perturb_ {backend}")
        m, expected = torch.zeros(4, 3), torch.zeros(4, 3)
        u, v = torch.linspace(-1, 1, 4).reshape(4, 1), torch.linspace(0, 1, 3).reshape(3, 1)
        lowrank_perturb_(m, [u], [v], taus, backend=backend)
        lowrank_perturb_(expected, [u], [v], torch.tensor([-2.0]), backend=backend)
        assert_bits_equal(m, expected, f"lowrank_perturb_ {backend}")


# -- hostile files: storage shared or expanded ---------------------------------------------------

def _saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _run(opt, net, steps=3):
    for _ in range(steps):
        opt.step(loss_of(net))


def test_trajectory_columns_sharing_one_storage_are_refused():
    """Extra columns that all view one storage: each costs a few bytes of file but a full
    column of values on load (N columns x steps floats from one steps-sized storage)."""
    net = model()
    opt = MeZO(net.named_parameters(), lr=1e-2, seed=5)
    _run(opt, net)
    state = opt.trajectory.state_dict()
    shared = torch.zeros(len(opt.trajectory))
    state["extra"] = {f"c{j}": shared for j in range(200)}
    with pytest.raises(ValueError, match="shares its storage"):
        Trajectory.from_state_dict(torch.load(_saved(state), weights_only=True))
    # one column per storage still loads
    state["extra"] = {"c0": torch.zeros(len(opt.trajectory))}
    assert len(Trajectory.from_state_dict(torch.load(_saved(state), weights_only=True))) == 3
    # two fields viewing one storage
    state["extra"] = {}
    state["decays"] = state["coefs"]
    with pytest.raises(ValueError, match="shares its storage"):
        Trajectory.from_state_dict(torch.load(_saved(state), weights_only=True))


@pytest.mark.parametrize("where", ["extra", "trajectory"])
def test_expanded_tensors_in_a_checkpoint_are_refused_before_copying(where):
    """load_state_dict cloned every tensor before checking it: a stride-0 view in a few-KB file
    became a full-size allocation (and a clone of expanded trajectory coefficients then passed
    the trajectory's own expanded-view check)."""
    net = model()
    opt = MeZO(net.named_parameters(), lr=1e-2, seed=5)
    _run(opt, net)
    state = opt.state_dict()
    if where == "extra":
        state["extra"] = {"junk": torch.zeros(1).expand(1 << 24)}
        needle = r"\['extra'\]\['junk'\]"
    else:
        rows = state["trajectory"]["coefs"].shape[0]
        state["trajectory"]["coefs"] = torch.zeros(1, 1).expand(rows, 1)
        needle = r"\['trajectory'\]\['coefs'\]"
    loaded = torch.load(_saved(state), weights_only=True)
    before, weights = opt.state_dict(), snapshot(net)
    with pytest.raises(ValueError, match=needle + ".*expanded view"):
        opt.load_state_dict(loaded)
    assert_states_equal(opt.state_dict(), before)
    assert_same(snapshot(net), weights, "weights")


def test_saved_states_still_round_trip_through_a_file():
    for make in (lambda p: MeZO(p, lr=1e-2, seed=5),
                 lambda p: PseuZO(p, lr=1e-2, seed=5, window=3)):
        net = model()
        opt = make(net.named_parameters())
        x = torch.linspace(-1, 1, 12).reshape(2, 6)
        for _ in range(3):
            if isinstance(opt, PseuZO):
                opt.step(lambda: net(x), lambda out: out.pow(2).mean())
            else:
                opt.step(loss_of(net))
        state = opt.state_dict()
        opt.load_state_dict(torch.load(_saved(state), weights_only=True))
        assert_states_equal(opt.state_dict(), state)


# -- numbers too large for a float ---------------------------------------------------------------

HUGE = 10 ** 400  # an int: math.isfinite / float() raise OverflowError on it


def test_huge_integer_hyperparameters_raise_value_error():
    with pytest.raises(ValueError, match="lr"):
        MeZO(model().parameters(), lr=HUGE)
    with pytest.raises(ValueError, match="beta"):
        PseuZO(model().parameters(), beta=HUGE)
    net = model()
    opt = MeZO(net.named_parameters(), lr=1e-2, seed=5)
    _run(opt, net, 1)
    state = opt.state_dict()
    state["param_groups"][0]["eps"] = HUGE
    before = opt.state_dict()
    with pytest.raises(ValueError, match="eps"):
        opt.load_state_dict(state)
    assert_states_equal(opt.state_dict(), before)


def test_a_loss_beyond_float_range_is_skipped_exactly():
    net = model()
    opt = MeZO(net.named_parameters(), lr=1e-2, seed=5)
    weights = snapshot(net)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(lambda: HUGE)
    assert opt.zo_state["skipped_steps"] == 1 and opt.zo_state["step"] == 1
    assert any("non-finite" in str(w.message) for w in caught)
    assert_same(snapshot(net), weights, "weights after the skipped step")


class _Trainer:
    """The attributes and methods of MeZO's trainer the patch reads (no torch.normal loops)."""

    def __init__(self, net):
        self.model = net
        self.args = types.SimpleNamespace(zo_eps=1e-2, weight_decay=0.0)
        self.named_parameters_to_optim = list(net.named_parameters())
        self.zo_random_seed, self.projected_grad = 11, 0.5
        self.lr_scheduler = None

    def _get_learning_rate(self):
        return 1e-2

    def zo_perturb_parameters(self, random_seed=None, scaling_factor=1):
        pass

    def zo_update(self, model):
        pass


@pytest.mark.parametrize("value, error", [(HUGE, ValueError),
                                          (torch.tensor(1.0, device="meta"), TypeError)],
                         ids=["huge-int", "meta-tensor"])
def test_compat_bad_numbers_raise_naming_them(value, error):
    net = model()
    trainer = patch_mezo_trainer(_Trainer(net), check_protocol=False)
    weights = snapshot(net)
    trainer.projected_grad = value
    with pytest.raises(error, match="projected_grad"):
        trainer.zo_update(net)
    trainer.projected_grad = 0.5
    with pytest.raises(error, match="scaling_factor"):
        trainer.zo_perturb_parameters(random_seed=3, scaling_factor=value)
    assert_same(snapshot(net), weights, "weights")
    trainer.zo_update(net)  # still usable


# -- PseuZO beta schedules -----------------------------------------------------------------------

def _pseuzo_run(beta, steps=3, **kwargs):
    net = model()
    opt = PseuZO(net.named_parameters(), lr=1e-2, seed=5, window=3, beta=beta, **kwargs)
    x = torch.linspace(-1, 1, 12).reshape(2, 6)
    for _ in range(steps):
        opt.step(lambda: net(x), lambda out: out.pow(2).mean())
    return net, opt


def test_schedule_is_called_once_per_step():
    """The step and its window-reset decision read one beta: a schedule evaluated twice could
    answer differently (a stateful callable), and cost twice."""
    calls = []

    def flaky(epoch):
        calls.append(epoch)
        return 1.0 if len(calls) % 2 else 0.5

    _, opt = _pseuzo_run(flaky, steps=4)
    assert calls == [0, 1, 2, 3]
    # betas 1, 0.5, 1, 0.5: the window restarted at steps 0 and 2, each with the beta it used
    assert [k for k, _, _ in opt._window] == [2, 3]


@pytest.mark.parametrize("schedule", [
    lambda e: float("nan"), lambda e: True, lambda e: torch.tensor(0.5), lambda e: HUGE,
    lambda e: 1.5, lambda e: 1 / 0, lambda e: (_ for _ in ()).throw(KeyboardInterrupt()),
], ids=["nan", "bool", "tensor", "huge-int", "above-1", "raises", "interrupt"])
def test_bad_schedule_values_leave_the_weights_bit_identical(schedule):
    calls = {"n": 0}

    def beta(epoch):  # good for the first two steps, then hostile
        calls["n"] += 1
        return 0.9 if epoch < 2 else schedule(epoch)

    net, opt = _pseuzo_run(beta, steps=2)
    weights, state = snapshot(net), opt.state_dict()
    x = torch.linspace(-1, 1, 12).reshape(2, 6)
    with pytest.raises((ValueError, ZeroDivisionError, KeyboardInterrupt)):
        opt.step(lambda: net(x), lambda out: out.pow(2).mean())
    assert_same(snapshot(net), weights, "weights after the refused schedule value")
    assert_states_equal(opt.state_dict(), state)


# -- bench arguments beyond the library's limits --------------------------------------------------

@pytest.fixture
def bench(capsys, monkeypatch):
    """cli.main(argv) -> (status, stdout, stderr), with the benchmark itself forbidden."""
    return cli_runner(capsys, monkeypatch, forbid_work=True)


@pytest.mark.parametrize("argv, needle", [
    (["step", "--window", "5000"], "--window"),
    (["ops", "--shape-set", "tiny", "--k", "1025"], "--k"),
    (["ops", "--shape-set", "tiny", "--k", "100000000000"], "--k"),
    (["lora", "--overhead-numel", str(10 ** 14)], "--overhead-numel"),
    (["ops", "--shape-set", "tiny", "--json", "out\0.json"], "--json"),
], ids=["window", "k", "k-huge", "overhead-numel", "json-nul"])
def test_bench_arguments_beyond_limits_are_usage_errors(bench, argv, needle):
    status, out, err = bench(*argv)
    assert status == 2, (status, err)
    assert "Traceback" not in err and not out and len(err.strip().splitlines()) == 1, err
    assert needle in err, err
