"""State review (2026-12): checkpoints and trajectories that loaded but broke a later step or
state_dict(), half-loads, counters at their end, overlapping param groups, unchecked records and
low-rank factors, cyclic / deep / sparse contents."""

from __future__ import annotations

import io
import math

import pytest
import torch

from helpers import assert_same, assert_states_equal, snapshot, square_loss, two_layer_model
from zokernels import Trajectory, lowrank_perturb_
from zokernels.optim import LeZO, MeZO, PseuZO, TeZO
from zokernels.trajectory import COUNTER_LIMIT

NAMES = ["mezo", "lezo", "tezo", "pseuzo"]
X = torch.linspace(-1, 1, 12).reshape(2, 6)


def make(name: str, params, net=None, **kwargs):
    kwargs.setdefault("lr", 1e-2)
    if name == "mezo":
        return MeZO(params, seed=5, **kwargs)
    if name == "lezo":
        return LeZO(params, layers=[net[0], net[1]], n_active=1, seed=5, **kwargs)
    if name == "tezo":
        return TeZO(params, seed=5, rank=2, variant="adam", **kwargs)
    return PseuZO(params, seed=5, window=3, **kwargs)


def take_step(name: str, opt, net):
    if name == "pseuzo":
        return opt.step(lambda: net(X), lambda out: out.pow(2).mean())
    return opt.step(square_loss(net))


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def trained(name: str, steps: int = 2, **kwargs):
    net = two_layer_model()
    opt = make(name, net.named_parameters(), net, **kwargs)
    for _ in range(steps):
        take_step(name, opt, net)
    return net, opt


def everything(opt, net):
    """What a refused load or step must leave as it was."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return (opt.state_dict(), groups, opt.base_seed, dict(opt.zo_state), snapshot(net))


def assert_unchanged(before, after):
    assert_states_equal(after[:4], before[:4])
    assert_same(after[4], before[4], "weights")


def assert_reloads(name: str, opt):
    """The optimizer's own state_dict loads into a fresh one (a resume works)."""
    net = two_layer_model()
    make(name, net.named_parameters(), net).load_state_dict(roundtrip(opt.state_dict()))


def refused_load(opt, net, state, match):
    before = everything(opt, net)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    assert_unchanged(before, everything(opt, net))


# -- 1: every param group key checked before anything is adopted --------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_a_bad_internal_group_key_is_refused_before_anything_changes(name):
    """_named = tensor used to raise RuntimeError after base_seed, zo_state and the groups were
    overwritten (a half-load)."""
    net, opt = trained(name)
    state = roundtrip(opt.state_dict())
    state["trajectory"], state["base_seed"] = None, 12345
    state["param_groups"][0]["_named"] = torch.tensor([1.0, 2.0])
    refused_load(opt, net, state, r"param group 0 '_named'")
    state["param_groups"][0]["_named"] = True  # what it is: accepted, not adopted
    opt.load_state_dict(state)
    assert opt.base_seed == 12345 and opt.param_groups[0]["_named"] is True


@pytest.mark.parametrize("name", NAMES)
def test_unknown_group_keys_are_refused(name):
    net, opt = trained(name)
    state = roundtrip(opt.state_dict())
    state["param_groups"][0]["junk"] = [1, 2]
    refused_load(opt, net, state, r"unknown key 'junk'")


def test_group_keys_given_at_construction_load_with_their_type():
    net = two_layer_model()
    opt = MeZO([{"params": list(net.parameters()), "tag": "encoder"}], lr=1e-2)
    state = opt.state_dict()
    state["param_groups"][0]["tag"] = 3
    refused_load(opt, net, state, r"'tag' is a int, this optimizer's is a str")
    state["param_groups"][0]["tag"] = "decoder"
    opt.load_state_dict(state)
    assert opt.param_groups[0]["tag"] == "decoder"


@pytest.mark.parametrize("name", NAMES)
def test_a_schedulers_keys_load_before_the_scheduler_is_built(name):
    """torch's schedulers keep initial_lr in the groups; a resume builds its scheduler with
    last_epoch after the load, which needs them there."""
    net, opt = trained(name)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5 ** epoch)
    scheduler.step()
    state = roundtrip(opt.state_dict())
    fresh_net = two_layer_model()
    fresh = make(name, fresh_net.named_parameters(), fresh_net)
    fresh.load_state_dict(state)
    torch.optim.lr_scheduler.LambdaLR(fresh, lambda epoch: 0.5 ** epoch, last_epoch=0)
    assert fresh.param_groups[0]["initial_lr"] == 1e-2
    take_step(name, fresh, fresh_net)
    state["param_groups"][0]["initial_lr"] = float("nan")
    refused_load(fresh, fresh_net, state, r"'initial_lr' must be a finite number")


# -- 2: the trajectory's extra columns are the ones this optimizer records -----------------------

@pytest.mark.parametrize("name", NAMES)
def test_an_extra_trajectory_column_is_refused(name):
    """An unknown column loaded, then fell behind the next record: every later state_dict()
    and replay failed."""
    net, opt = trained(name)
    state = roundtrip(opt.state_dict())
    state["trajectory"]["extra"]["foo"] = torch.zeros(2)
    refused_load(opt, net, state, r"extra columns .*'foo'")
    take_step(name, opt, net)
    assert_reloads(name, opt)


# -- 3: the step counter at its int64 end ---------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_a_step_at_the_counters_end_is_refused_before_anything_changes(name):
    net, opt = trained(name, steps=1)
    state = roundtrip(opt.state_dict())
    state["zo_state"]["step"], state["trajectory"] = COUNTER_LIMIT - 2, None
    opt.load_state_dict(state)
    take_step(name, opt, net)  # the last step the counter can record
    assert opt.zo_state["step"] == COUNTER_LIMIT - 1
    before = everything(opt, net)
    with pytest.raises(ValueError, match=r"step counter .* at its end"):
        take_step(name, opt, net)
    assert_unchanged(before, everything(opt, net))
    assert_reloads(name, opt)


def test_the_undo_overflow_counter_saturates():
    net, opt = trained("mezo", steps=1)
    state = roundtrip(opt.state_dict())
    state["zo_state"]["undo_overflows"] = COUNTER_LIMIT - 1
    opt.load_state_dict(state)
    opt._count_overflow()  # a log overflowing once more (what _check_logs counts)
    assert opt.zo_state["undo_overflows"] == COUNTER_LIMIT - 1
    assert_reloads("mezo", opt)


# -- 4, 5: PseuZO's window dtype and finiteness ---------------------------------------------------

def test_a_pseuzo_window_of_another_dtype_is_converted_at_the_next_step():
    """float16 deltas loaded into an optimizer with float32 outputs: the next step mixed the
    dtypes and the optimizer's own state_dict no longer loaded."""
    net, opt = trained("pseuzo")
    state = roundtrip(opt.state_dict())
    for entry in state["extra"]["window"]:
        entry["delta"] = entry["delta"].half()
    opt.load_state_dict(state)
    take_step("pseuzo", opt, net)
    assert {d.dtype for _, _, d in opt._window} == {torch.float32}
    assert_reloads("pseuzo", opt)


def test_pseuzo_window_deltas_must_be_finite_in_float32():
    """float64 deltas of 1e300 passed (finite in float64) and every later step was skipped."""
    net, opt = trained("pseuzo")
    state = roundtrip(opt.state_dict())
    for entry in state["extra"]["window"]:
        entry["delta"] = torch.full_like(entry["delta"], 1e300, dtype=torch.float64)
    refused_load(opt, net, state, r"\['delta'\] must hold values finite in float32")


# -- 6: param groups sharing memory ----------------------------------------------------------------

def overlapping_views():
    storage = torch.randn(40)
    return storage[:24].view(4, 6), storage[16:].view(4, 6)


@pytest.mark.parametrize("name", ["mezo", "tezo", "pseuzo"])
def test_param_groups_sharing_memory_are_refused(name):
    a, b = overlapping_views()
    with pytest.raises(ValueError, match=r"param group 0 .* and param group 1 .* share memory"):
        make(name, [{"params": [a]}, {"params": [b]}])


def test_add_param_group_refuses_memory_of_another_group():
    a, b = overlapping_views()
    opt = MeZO([a], lr=1e-2)
    with pytest.raises(ValueError, match=r"share memory"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1 and len(opt.spaces) == 1
    opt.add_param_group({"params": [torch.randn(3)]})  # distinct memory: fine
    assert len(opt.spaces) == 2


# -- 7: a decay factor the kernels refuse --------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_a_decay_factor_beyond_float32_is_refused_at_construction(name):
    net = two_layer_model()
    with pytest.raises(ValueError, match=r"weight_decay"):
        make(name, net.named_parameters(), net, weight_decay=1e308)
    with pytest.raises(ValueError, match=r"decay factor"):  # each finite, the product not
        make(name, net.named_parameters(), net, lr=1e20, weight_decay=1e20)
    with pytest.raises(ValueError, match=r"param group 0: .*decay factor"):
        make(name, [{"params": list(net.parameters()), "weight_decay": 1e20}], net, lr=1e20)


@pytest.mark.parametrize("name", NAMES)
def test_a_decay_factor_beyond_float32_is_refused_at_load_and_step(name):
    net, opt = trained(name)
    state = roundtrip(opt.state_dict())
    state["param_groups"][0]["weight_decay"] = 1e308
    refused_load(opt, net, state, r"weight_decay")
    opt.param_groups[0]["lr"] = 1e37  # a scheduler's doing: refused before the step moves
    opt.param_groups[0]["weight_decay"] = 1e3
    before = everything(opt, net)
    with pytest.raises(ValueError, match=r"param group 0: .*decay factor"):
        take_step(name, opt, net)
    assert_unchanged(before, everything(opt, net))


# -- 8: lowrank_perturb_'s factors ---------------------------------------------------------------

def _lowrank_args():
    torch.manual_seed(0)
    return torch.zeros(4, 3), torch.randn(4, 2), torch.randn(3, 2), torch.ones(2)


@pytest.mark.parametrize("bad", ["us", "vs", "taus", "applied_taus"])
def test_lowrank_perturb_refuses_non_finite_factors(bad):
    w, u, v, tau = _lowrank_args()
    args = {"us": [u], "vs": [v], "taus": tau, "applied_taus": tau.clone()}
    args[bad] = args[bad].clone() if bad != "us" and bad != "vs" else [args[bad][0].clone()]
    (args[bad][0] if isinstance(args[bad], list) else args[bad]).view(-1)[0] = math.nan
    with pytest.raises(ValueError, match=rf"{bad}\[0\] must be finite"):
        lowrank_perturb_(w, args["us"], args["vs"], args["taus"], applied_scale=1e-3,
                         applied_taus=args["applied_taus"], backend="cpu")
    assert torch.equal(w, torch.zeros(4, 3))


def test_lowrank_perturb_checks_a_single_taus_tensor_as_a_list():
    w, u, v, _ = _lowrank_args()
    taus = torch.tensor([1e300, 1.0], dtype=torch.float64)
    for given in (taus, [taus]):
        with pytest.raises(TypeError, match=r"taus(\[0\])? has dtype torch.float64"):
            lowrank_perturb_(w, [u], [v], given, backend="cpu")
    assert torch.equal(w, torch.zeros(4, 3))


# -- 9: Trajectory.record checks what a load checks ------------------------------------------------

@pytest.mark.parametrize("args, match", [
    (dict(step=1, seeds=[2 ** 70], coefs=[[0.1]], decays=[1.0]), r"seeds\[0\]"),
    (dict(step=1, seeds=[-1], coefs=[[0.1]], decays=[1.0]), r"seeds\[0\]"),
    (dict(step=1, seeds=[5], coefs=[[math.nan]], decays=[1.0]), r"coefs\[0\]\[0\]"),
    (dict(step=1, seeds=[5], coefs=[[1e39]], decays=[1.0]), r"coefs\[0\]\[0\]"),
    (dict(step=1, seeds=[5], coefs=[[0.1]], decays=[math.inf]), r"decays\[0\]"),
    (dict(step=1, seeds=[5], coefs=[[0.1]], decays=[1.0], grad0=math.nan), r"grad0"),
    (dict(step=-3, seeds=[5], coefs=[[0.1]], decays=[1.0]), r"step must be"),
    (dict(step=COUNTER_LIMIT, seeds=[5], coefs=[[0.1]], decays=[1.0]), r"step must be"),
    (dict(step=0, seeds=[5], coefs=[[0.1]], decays=[1.0]), r"not above the last"),
], ids=["seed-2^70", "seed-1", "coef-nan", "coef-1e39", "decay-inf", "extra-nan", "step-neg",
        "step-2^63", "step-repeated"])
def test_record_refuses_what_a_load_would(args, match):
    meta = {"base_seed": 0, "dist": "gaussian",
            "groups": [{"param_names": ["w"], "numel": [4], "keys": [1]}]}
    trajectory = Trajectory("mezo", meta)
    trajectory.record(0, [5], [[0.1]], [1.0])
    before = trajectory.state_dict()
    with pytest.raises(ValueError, match=match):
        trajectory.record(**args)
    assert_states_equal(trajectory.state_dict(), before)
    Trajectory.from_state_dict(roundtrip(trajectory.state_dict()))


# -- 10: cyclic, deep and sparse contents -----------------------------------------------------------

def _deep(depth: int) -> list:
    nested: list = []
    for _ in range(depth):
        nested = [nested]
    return nested


@pytest.mark.parametrize("content", ["cyclic", "deep", "deep-in-a-set"])
def test_cyclic_or_deep_checkpoints_are_refused_with_a_value_error(content):
    net, opt = trained("mezo")
    state = opt.state_dict()
    if content == "cyclic":
        loop: list = []
        loop.append(loop)
        state["extra"]["foo"] = loop
    elif content == "deep":
        state["extra"]["foo"] = _deep(5000)
    else:  # torch.load(weights_only=True) builds sets; deepcopy recursed into their tuples
        nested: tuple = ()
        for _ in range(5000):
            nested = (nested,)
        state["extra"]["foo"] = {nested}
    refused_load(opt, net, state, "cyclic container" if content == "cyclic" else "deep")


@pytest.mark.parametrize("content", ["cyclic", "deep"])
def test_cyclic_or_deep_trajectories_are_refused_with_a_value_error(content):
    _, opt = trained("mezo")
    state = opt.trajectory.state_dict()
    if content == "cyclic":
        loop: dict = {}
        loop["self"] = loop
        state["meta"]["foo"] = loop
    else:
        state["meta"]["foo"] = _deep(5000)
    with pytest.raises(ValueError, match="cyclic container" if content == "cyclic" else "deep"):
        Trajectory.from_state_dict(state)


def test_shared_containers_are_copied_once(monkeypatch):
    """A checkpoint whose containers share children (pickle keeps the sharing) declares 2^k
    paths in a few hundred bytes: the copy walks each container once."""
    import copy
    import types

    from zokernels.optim import base

    net, opt = trained("mezo")
    state = roundtrip(opt.state_dict())
    shared: tuple = ("leaf",)
    for _ in range(16):
        shared = (shared, shared)
    state["extra"]["foo"] = shared
    state = roundtrip(state)
    copies = []
    monkeypatch.setattr(base, "copy", types.SimpleNamespace(
        deepcopy=lambda obj: copies.append(obj) or copy.deepcopy(obj)))
    opt.load_state_dict(state)  # MeZO keeps no extra state: ignored
    assert copies.count("leaf") == 1  # not 2^16


def _sparse(n: int) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.tensor([1.0, 2.0]), (n,))


def test_sparse_tensors_in_a_checkpoint_are_refused_by_name():
    net, opt = trained("tezo")
    state = roundtrip(opt.state_dict())
    state["extra"]["momentum"][0] = _sparse(state["extra"]["momentum"][0].shape[0])
    refused_load(opt, net, state, r"state_dict\['extra'\]\['momentum'\]\[0\] is a "
                                  r"torch.sparse_coo tensor")


def test_sparse_tensors_in_a_trajectory_are_refused_by_name():
    _, opt = trained("mezo")
    state = opt.trajectory.state_dict()
    state["step"] = _sparse(2).long()
    with pytest.raises(ValueError, match=r"trajectory step must be a dense tensor"):
        Trajectory.from_state_dict(state)


def test_sparse_scales_are_refused_by_name():
    from zokernels import perturb_

    t = torch.zeros(4)
    with pytest.raises(TypeError, match=r"scales must be a dense \(strided\) tensor"):
        perturb_(t, 1, _sparse(1), backend="cpu")
    assert torch.equal(t, torch.zeros(4))


def test_pseuzo_checks_its_decay_per_window_entry():
    """decay_per_entry applies (1 - lr wd) once per entry: its power must be finite too."""
    net = two_layer_model()
    PseuZO(net.parameters(), lr=1.0, weight_decay=1e13, window=3)  # once per step: fine
    with pytest.raises(ValueError, match=r"\(1 - lr \* weight_decay\)\^3"):
        PseuZO(net.parameters(), lr=1.0, weight_decay=1e13, window=3, decay_per_entry=True)


# -- trajectory files (review 2026-12-07) --------------------------------------------------------

def _replayed(state, net=None):
    net = two_layer_model() if net is None else net
    Trajectory.from_state_dict(state).replay(net)
    return net


@pytest.mark.parametrize("name", NAMES)
def test_a_meta_without_dist_replays_as_gaussian(name):
    """The load read a missing dist as gaussian while TeZO's replay indexed it after writing its
    2-D weights (KeyError half-way); one reading now: gaussian, the run's noise."""
    net, opt = trained(name)
    state = opt.trajectory.state_dict()
    assert state["meta"]["dist"] == "gaussian"
    del state["meta"]["dist"]
    assert_same(snapshot(_replayed(state)), snapshot(net), "replay without dist")


def test_a_tezo_replay_refuses_weights_of_another_shape():
    """The factors depend on (m, n): a (5, 6) run replayed onto (6, 5) weights of the same names
    drew other noise and gave other weights, silently."""
    net, opt = trained("tezo")
    state = opt.trajectory.state_dict()
    assert state["meta"]["lowrank"][0]["shapes"] == [[5, 6], [3, 5]]
    fresh = two_layer_model()
    other = [(n, p.detach().reshape(p.shape[::-1]).clone() if p.dim() == 2 else p.detach().clone())
             for n, p in fresh.named_parameters()]
    before = [t.clone() for _, t in other]
    with pytest.raises(ValueError, match=r"lowrank\[0\] shapes .* not those of the parameters"):
        Trajectory.from_state_dict(state).replay(other)
    assert all(torch.equal(a, t) for a, (_, t) in zip(before, other))
    # a trajectory of an earlier version (no shapes) still replays, and resumes
    for group in state["meta"]["lowrank"]:
        del group["shapes"]
    assert_same(snapshot(_replayed(state)), snapshot(net), "replay without shapes")
    saved = opt.state_dict()
    for group in saved["trajectory"]["meta"]["lowrank"]:
        del group["shapes"]
    resumed = make("tezo", two_layer_model().named_parameters())
    resumed.load_state_dict(saved)
    # recorded shapes that are not this optimizer's: a resume is refused too
    saved = opt.state_dict()
    saved["trajectory"]["meta"]["lowrank"][0]["shapes"][0] = [6, 5]
    other = make("tezo", two_layer_model().named_parameters())
    with pytest.raises(ValueError, match="shapes"):
        other.load_state_dict(saved)


@pytest.mark.parametrize("field, value", [
    ("no_decay", "bias"), ("no_decay", 5), ("no_decay", None), ("no_decay", [1]),
    ("layers", 5), ("layers", [["0.weight"], "1.weight"]), ("named", "yes")])
def test_trajectory_meta_fields_are_checked_at_load(field, value):
    """no_decay="bias" was read letter by letter (any name with b, i, a or s exempt from
    decay: other weights, silently); the others failed in the replay without naming the
    field."""
    _, opt = trained("lezo", weight_decay=0.1)
    state = opt.trajectory.state_dict()
    if field == "no_decay":
        state["meta"][field] = value
    else:
        state["meta"]["groups"][0][field] = value
    with pytest.raises(ValueError, match=f"trajectory meta .*{field}"):
        Trajectory.from_state_dict(state)


def test_a_damaged_trajectory_file_is_refused(tmp_path):
    """torch.load does not test the CRC-32 of its zip members: one flipped bit in a
    coefficient loaded and replayed other weights."""
    net, opt = trained("mezo", steps=3)
    path = tmp_path / "run.pt"
    opt.trajectory.save(path)
    data = bytearray(path.read_bytes())
    coefs = opt.trajectory.state_dict()["coefs"]
    raw = coefs.numpy().tobytes()
    at = bytes(data).find(raw)
    assert at > 0
    data[at] ^= 0x01  # the lowest bit of the first coefficient
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged: Bad CRC-32"):
        Trajectory.load(path)
    with pytest.raises(ValueError, match="damaged: Bad CRC-32"):
        Trajectory.load(io.BytesIO(bytes(data)))
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(ValueError, match="trajectory file"):
        Trajectory.load(path)
    # an intact file, from a path (str, bytes) and from a file object not at offset 0
    opt.trajectory.save(path)
    assert_same(snapshot(_replayed(Trajectory.load(path).state_dict())), snapshot(net),
                "replay of the saved file")
    assert len(Trajectory.load(bytes(path))) == 3
    buffer = io.BytesIO(b"header" + path.read_bytes())
    buffer.seek(6)
    assert len(Trajectory.load(buffer)) == 3


def test_trajectory_files_torch_load_reads_are_loaded(tmp_path):
    """Files torch.load reads: one saved without CRCs (set_crc32_options(False): every member's
    CRC is 0), and a legacy (non-zip) one whose data holds a zip end-of-directory signature
    (zipfile.is_zipfile took it for a damaged zip)."""
    net = two_layer_model()
    opt = MeZO(net.named_parameters(), lr=1e-2, seed=0x06054B50)  # pickled: b"PK\x05\x06"
    for _ in range(2):
        take_step("mezo", opt, net)
    state = opt.trajectory.state_dict()
    without_crc = tmp_path / "nocrc.pt"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, without_crc)
    finally:
        torch.serialization.set_crc32_options(True)
    assert len(Trajectory.load(without_crc)) == 2
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert b"PK\x05\x06" in legacy.read_bytes()
    assert len(Trajectory.load(legacy)) == 2


@pytest.mark.parametrize("probe", ["inplace", "virtual"])
def test_a_tezo_weight_resized_between_steps_is_refused(probe):
    """A weight resized by param.data = ... kept the registered rank, moments and factor
    offsets (V drawn at U's offsets: a copy of U's last rows), silently; refused now, before
    anything is written."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8, bias=False)
    opt = TeZO(lin.named_parameters(), lr=1e-2, rank=4, probe=probe)
    x = torch.randn(5, 8)
    opt.step(lambda: lin(x).pow(2).mean())
    lin.weight.data = torch.randn(16, 8)
    before = lin.weight.detach().clone()
    with pytest.raises(ValueError, match=r"weight weight is \(16, 8\), it was \(8, 8\)"):
        opt.step(lambda: lin(x).pow(2).mean())
    assert torch.equal(lin.weight, before)


def test_parameter_space_arguments_are_read_once_and_checked():
    """no_decay="bias" was split into letters ("weight" exempt from decay, silently); layers
    and keys given as generators raised a TypeError naming nothing."""
    from zokernels.space import ParameterSpace
    lin = torch.nn.Linear(3, 3)
    with pytest.raises(TypeError, match="no_decay"):
        ParameterSpace(lin, no_decay="bias")
    with pytest.raises(TypeError, match="no_decay"):
        ParameterSpace(lin, no_decay=[1])
    space = ParameterSpace(lin, layers=(names for names in [["weight"], ["bias"]]),
                           keys=(k for k in [1, 2]), no_decay=(s for s in ["bias"]))
    assert space.num_layers == 2 and space.keys == [1, 2] and space.decayable == [True, False]
