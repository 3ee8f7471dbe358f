"""What a checkpoint or a trajectory file can hold, found by review: values that passed the
checks but broke the adoption or the replay (uint64 / one-element tensor seeds), load pre-hooks
TeZO ran after its check, groups sharing memory in a replay, an eps that is 0 in float32,
hostile values that raised other exceptions than ValueError, tensor records that could not be
saved, layer fields that loaded but could not be saved."""

import io
import warnings

import pytest
import torch

from zokernels import Trajectory
from zokernels._seeds import step_seed
from zokernels.optim import LeZO, MeZO, PseuZO, TeZO

X = torch.linspace(-1, 1, 12).reshape(2, 6)


def _net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))


def _loss(net):
    return lambda: net(X).pow(2).mean()


def _through_file(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


BIG_SEED = 2 ** 63 + 5
# the uint64 value 2^63 + 5, as torch.load(weights_only=True) can hand it back
BIG_SEED_TENSOR = torch.tensor([-(2 ** 63) + 5]).view(torch.uint64)


def test_uint64_base_seed_loads_whole():
    """Checked by reading it (tolist), then adopted with int(): torch refuses int() of a uint64
    >= 2^63, and the load stopped half-way (lr adopted, seed not)."""
    net = _net()
    source = MeZO(net.named_parameters(), lr=0.5, seed=1, record_trajectory=False)
    source.step(_loss(net))
    state = source.state_dict()
    state["base_seed"] = BIG_SEED_TENSOR
    opt = MeZO(_net().named_parameters(), lr=1e-3, seed=7, record_trajectory=False)
    opt.load_state_dict(_through_file(state))
    assert opt.base_seed == BIG_SEED and type(opt.base_seed) is int
    assert opt.param_groups[0]["lr"] == 0.5 and opt.zo_state["step"] == 1


def test_uint64_window_seed_loads_whole():
    net = _net()
    source = PseuZO(net.named_parameters(), lr=0.5, seed=1, window=3, record_trajectory=False)
    for _ in range(2):
        source.step(lambda: net(X), lambda o: o.pow(2).mean())
    state = source.state_dict()
    state["extra"]["window"][0]["seed"] = BIG_SEED_TENSOR
    opt = PseuZO(_net().named_parameters(), lr=1e-3, seed=7, window=3, record_trajectory=False)
    opt.load_state_dict(state)
    assert opt.window_length == 2 and opt.zo_state["step"] == 2
    assert opt._window[0][1] == BIG_SEED


def test_tensor_base_seed_in_a_trajectory_replays_the_run():
    """A one-element tensor base_seed passed the load's check, then the derived seeds hashed
    its text ("tensor([5])"): replay applied other noise without an error."""
    net = torch.nn.Linear(6, 4)
    initial = [p.detach().clone() for p in net.parameters()]
    opt = MeZO(net.named_parameters(), lr=1e-2, seed=5)
    for _ in range(3):
        opt.step(lambda: net(X).pow(2).mean())
    state = opt.trajectory.state_dict()
    assert state["seeds"] is None  # derived from (base_seed, step, k)
    state["meta"]["base_seed"] = torch.tensor([5])
    loaded = Trajectory.from_state_dict(_through_file(state))
    assert [s for _, s, *_ in loaded.records()] == [s for _, s, *_ in opt.trajectory.records()]
    replayed = torch.nn.Linear(6, 4)
    with torch.no_grad():
        for p, value in zip(replayed.parameters(), initial):
            p.copy_(value)
    loaded.replay(replayed)
    for a, b in zip(replayed.parameters(), net.parameters()):
        assert torch.equal(a, b)
    resumed_state = opt.state_dict()
    resumed_state["trajectory"]["meta"]["base_seed"] = torch.tensor([5])
    resumed = MeZO(torch.nn.Linear(6, 4).named_parameters(), lr=1e-2, seed=5)
    resumed.load_state_dict(resumed_state)
    assert next(iter(resumed.trajectory.records()))[1] == next(iter(opt.trajectory.records()))[1]


def test_step_seed_refuses_what_is_not_an_int():
    assert step_seed(5, 0) == step_seed(5, 0, 0)
    for bad in (torch.tensor(5), torch.tensor([5]), 5.0, True):
        with pytest.raises(TypeError, match="base_seed must be an int"):
            step_seed(bad, 0)
    with pytest.raises(TypeError, match="step must be an int"):
        step_seed(5, torch.tensor(0))


def test_tezo_load_runs_the_pre_hooks_before_its_check_and_merge():
    net = _net()
    source = TeZO(net.named_parameters(), seed=5, rank=2, lr=1e-2, update="deferred")
    source.step(_loss(net))
    state = source.state_dict()
    # (a) a hook that migrates an old checkpoint (adds a missing key) lets it load
    migrated = dict(state)
    trajectory = migrated.pop("trajectory")
    target_net = _net()
    opt = TeZO(target_net.named_parameters(), seed=5, rank=2, lr=1e-2, update="deferred")
    opt.register_load_state_dict_pre_hook(
        lambda optimizer, sd: {**sd, "trajectory": trajectory})
    opt.load_state_dict(migrated)
    assert opt.zo_state["step"] == 1
    # (b) a hook that spoils the state: refused before the deferred updates are merged
    net_b = _net()
    opt_b = TeZO(net_b.named_parameters(), seed=5, rank=2, lr=1e-2, update="deferred")
    opt_b.step(_loss(net_b))
    weights = {n: p.detach().clone() for n, p in net_b.named_parameters()}
    opt_b.register_load_state_dict_pre_hook(lambda optimizer, sd: {**sd, "dist": "nonsense"})
    with pytest.raises(ValueError, match="dist"):
        opt_b.load_state_dict(state)
    for n, p in net_b.named_parameters():
        assert torch.equal(p, weights[n]), n


def test_replay_refuses_groups_sharing_memory():
    net = _net()
    opt = MeZO([{"params": [("0.weight", net[0].weight)]},
                {"params": [("1.weight", net[1].weight)]}], lr=1e-2, seed=5)
    opt.step(_loss(net))
    storage = torch.zeros(40)
    a, b = storage[:24].view(4, 6), storage[12:24].view(3, 4)
    with pytest.raises(ValueError, match="share memory"):
        opt.trajectory.replay([("0.weight", a), ("1.weight", b)])
    assert torch.equal(storage, torch.zeros(40))


@pytest.mark.parametrize("eps", [1e-300, 2.0 ** -150, 1e-46])
def test_eps_zero_in_float32_refused(eps):
    with pytest.raises(ValueError, match="eps must be > 0 in float32"):
        MeZO(_net().named_parameters(), lr=1e-2, eps=eps)
    net = _net()
    opt = MeZO(net.named_parameters(), lr=1e-2, seed=5)
    state = opt.state_dict()
    state["param_groups"][0]["eps"] = eps
    with pytest.raises(ValueError, match="eps must be > 0 in float32"):
        opt.load_state_dict(state)
    MeZO(_net().named_parameters(), lr=1e-2, eps=2.0 ** -149)  # the smallest float32: fine


def test_hostile_values_raise_value_errors():
    net = _net()
    opt = MeZO(net.named_parameters(), lr=1e-2, seed=5)
    opt.step(_loss(net))
    for version in (torch.tensor([1, 1]), torch.empty(2, device="meta"), True, "1"):
        state = opt.trajectory.state_dict()
        state["version"] = version
        with pytest.raises(ValueError, match="version"):
            Trajectory.from_state_dict(state)
    tezo = TeZO(_net().named_parameters(), seed=5, rank=2, lr=1e-2)
    state = tezo.state_dict()
    state["extra"]["rank"] = torch.tensor([2, 2])
    with pytest.raises(ValueError, match="rank"):
        tezo.load_state_dict(state)


def _tezo_trajectory():
    net = _net()
    opt = TeZO(net.named_parameters(), seed=5, rank=2, lr=1e-2)
    opt.step(_loss(net))
    return opt.trajectory.state_dict()


def test_tezo_replay_refuses_huge_moments_and_repeated_names():
    state = _tezo_trajectory()
    meta = state["meta"]
    lowrank = meta["lowrank"][0]
    meta["initial_moments"] = {
        "momentum": [[2 ** 2000] + [0.0] * (sum(min(2, *s) for s in lowrank["shapes"]) - 1)],
        "second": [[0.0] * sum(min(2, *s) for s in lowrank["shapes"])]}
    with pytest.raises(ValueError, match="initial_moments"):
        Trajectory.from_state_dict(state).replay(_net())
    state = _tezo_trajectory()
    lowrank = state["meta"]["lowrank"][0]
    lowrank["param_names"] = [lowrank["param_names"][0]] * 2
    lowrank["shapes"] = [lowrank["shapes"][0]] * 2
    with pytest.raises(ValueError, match="each once"):
        Trajectory.from_state_dict(state).replay(_net())


def test_record_refuses_tensors_it_could_not_save():
    trajectory = Trajectory("mezo", {"base_seed": 5})
    for bad in (torch.empty(1, device="meta"), torch.ones(1, dtype=torch.complex64),
                torch.ones(1, dtype=torch.bool)):
        with pytest.raises(ValueError, match="dense real tensor"):
            trajectory.record(0, [1], [bad], [1.0])
    assert len(trajectory) == 0
    trajectory.record(0, [1], [torch.tensor([float("nan")])], [1.0])
    with pytest.raises(ValueError, match=r"record 0 \(step 0\) coefs\[0\]\[0\] is nan"):
        trajectory.save(io.BytesIO())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trajectory = Trajectory("mezo", {"base_seed": 5})
        trajectory.record(0, [1], [torch.tensor([0.5])], torch.tensor([1.0]))
        trajectory.save(io.BytesIO())


def test_layers_a_save_cannot_write_are_refused_by_load_and_record():
    trajectory = Trajectory("lezo", {"base_seed": 5})
    with pytest.raises(ValueError, match="fewer than 2\\^15"):
        trajectory.record(0, [1], [[0.5]], [1.0], layers=list(range(1 << 15)))
    net = _net()
    opt = LeZO(net.named_parameters(), layers=[net[0], net[1]], n_active=1, seed=5, lr=1e-2)
    opt.step(_loss(net))
    trajectory = opt.trajectory
    state = trajectory.state_dict()
    state["layers"] = torch.tensor([1 << 15], dtype=torch.int32)
    with pytest.raises(ValueError, match="layer indices in \\[0, 2\\^15\\)"):
        Trajectory.from_state_dict(state)
    state = trajectory.state_dict()
    state["n_layers"] = torch.tensor([1 << 15], dtype=torch.int32)  # (a valid length)
    state["layers"] = torch.zeros(1 << 15, dtype=torch.int16)
    with pytest.raises(ValueError, match="n_layers"):
        Trajectory.from_state_dict(state)


def _saved_mezo_trajectory(steps: int = 2) -> bytes:
    net = _net()
    opt = MeZO(net.named_parameters(), lr=1e-2, seed=5)
    for _ in range(steps):
        opt.step(_loss(net))
    buffer = io.BytesIO()
    opt.trajectory.save(buffer)
    return buffer.getvalue()


def test_a_compressed_or_self_repeating_file_is_refused_before_its_size_grows():
    """Found by review: a 3.5 KB file whose members were rewritten deflated loaded 1 MB of
    values (262,144 derived seeds, 436 MB at peak; deflate reaches ~1000:1), and a 61 KB file
    whose meta lists one group object N times took 3 s (quadratic: every reference checked
    again). torch.save stores its members, and a parameter belongs to one group: both are
    refused."""
    import zipfile

    source = zipfile.ZipFile(io.BytesIO(_saved_mezo_trajectory()))
    deflated = io.BytesIO()
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for info in source.infolist():
            out.writestr(info.filename, source.read(info))
    with pytest.raises(ValueError, match="damaged: member .* is compressed"):
        Trajectory.load(io.BytesIO(deflated.getvalue()))
    state = Trajectory.load(io.BytesIO(_saved_mezo_trajectory())).state_dict()
    group = state["meta"]["groups"][0]
    state["meta"]["groups"] = [group] * 3
    with pytest.raises(ValueError, match=r"groups\[1\] param_names repeats '0.weight'"):
        Trajectory.from_state_dict(_through_file(state))
    state["meta"]["groups"] = [group]
    group["param_names"] = group["param_names"][:1] * len(group["param_names"])
    with pytest.raises(ValueError, match=r"groups\[0\] param_names repeats '0.weight'"):
        Trajectory.from_state_dict(state)


def test_record_refuses_what_would_not_save_or_load():
    """Found by review: 2-D decays were recorded (a save then wrote a file its load refused);
    extra columns that differ between records put values at other records' indices (a save
    raised IndexError); layers [1.7] and ["3"] were recorded as [1] and [3]; decays=1.0 and
    load(123) raised bare TypeError / AttributeError. Nothing is recorded on a refusal."""
    trajectory = Trajectory("mezo", {"base_seed": 5, "groups": [
        {"param_names": ["a"], "numel": [4], "keys": [1]}]})
    cases = [
        (dict(coefs=[[0.1], [0.2]], decays=torch.ones(2, 2)), ValueError, "1-D tensor"),
        (dict(coefs=[[0.1]], decays=torch.tensor(1.0)), ValueError, "1-D tensor"),
        (dict(coefs=[[0.1]], decays=1.0), ValueError, "decays must be a list or a 1-D tensor"),
        (dict(coefs=[[0.1]], decays=[1.0], layers=[1.7]), TypeError, "layers must be an integer"),
        (dict(coefs=[[0.1]], decays=[1.0], layers=["3"]), TypeError, "layers must be an integer"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            trajectory.record(0, [1], **kwargs)
        assert len(trajectory) == 0
    trajectory.record(0, [1], [[0.1]], [1.0], a=1.0)
    with pytest.raises(ValueError, match=r"extra columns \['b'\] differ .* \['a'\]"):
        trajectory.record(1, [2], [[0.1]], [1.0], b=5.0)
    with pytest.raises(ValueError, match=r"extra columns \[\] differ"):
        trajectory.record(1, [2], [[0.1]], [1.0])
    assert len(trajectory) == 1
    trajectory.record(1, [2], [[0.1]], [1.0], a=torch.tensor(2.0))
    buffer = io.BytesIO()
    trajectory.save(buffer)
    buffer.seek(0)
    assert Trajectory.load(buffer).extra == {"a": [1.0, 2.0]}
    for bad in (123, None):
        with pytest.raises(TypeError, match="path must be a path or a seekable binary file"):
            Trajectory.load(bad)


@pytest.mark.parametrize("loss", [torch.tensor(True), torch.tensor(1.0 + 2.0j)],
                         ids=["bool", "complex"])
def test_a_bool_or_complex_loss_tensor_is_refused(loss):
    """Found by review: a Python bool loss was refused but a bool tensor was trained on as
    0 / 1 (an update of lr * 500 * z), and a complex one lost its imaginary part with a
    warning. Refused (TypeError), the weights unchanged."""
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    opt = MeZO(net.named_parameters(), lr=1e-2, seed=5)
    with pytest.raises(TypeError, match="real scalar loss"):
        opt.step(lambda: loss)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
