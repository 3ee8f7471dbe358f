"""Virtual dense probes (zokernels.dense_probe) and writes: an out-of-range embedding id on the
device path fails as F.embedding does; a write of a parameter during the forward (directly,
through `.data = `, or through an alias of the perturbed copy the probe handed out: `w.data`,
`w.detach()`, a view, a slice, a `_foreach_*_` list, out=, inplace=True) is seen by the first
probe's check, which then falls back to in-place probes having written nothing, and is refused
(RuntimeError, weights unchanged) when it first happens after the check."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import zokernels.dense_probe as dense_probe
from zokernels.held import MovedParameters, SeededNoise
from zokernels.optim import LeZO, MeZO

from helpers import assert_bits_equal, assert_same, snapshot


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(8, 16)
        self.l2 = torch.nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x))).mean()


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))

# writes of l1.weight (w), each one changes values (|w| reaches about 0.35)
WRITES = {
    "direct": lambda w: w.clamp_(-0.05, 0.05),
    "data": lambda w: w.data.clamp_(-0.05, 0.05),
    "detach": lambda w: w.detach().clamp_(-0.05, 0.05),
    "view": lambda w: w.view(-1).clamp_(-0.05, 0.05),
    "slice": lambda w: w[:, :4].clamp_(-0.05, 0.05),
    "transposed_slice": lambda w: w.detach().t()[:2].mul_(0.5),
    "setitem_alias": lambda w: w.data.__setitem__((0, slice(None)), 0.0),
    "iadd_alias": lambda w: w.data[1].__iadd__(1.0),
    "foreach": lambda w: torch._foreach_clamp_max_([w], 0.05),
    "foreach_alias": lambda w: torch._foreach_mul_([w.data], 0.5),
    "out": lambda w: torch.clamp(w, -0.05, 0.05, out=w),
    "copy": lambda w: w.copy_(w.clamp(-0.05, 0.05)),
    "inplace_kwarg": lambda w: F.relu(w, inplace=True),
    "inplace_positional": lambda w: F.relu(w.detach(), True),
}


def run(probe: str, write, steps: int = 3, lr: float = 1e-2, when=lambda call: True):
    """(losses, weights, status, warning messages) of `steps` MeZO steps of Net whose forward
    calls write(l1.weight) under no_grad on the calls (numbered from 1) where `when` holds."""
    net = Net()
    calls = [0]

    def closure():
        calls[0] += 1
        if when(calls[0]):
            with torch.no_grad():
                write(net.l1.weight)
        return net(X)

    opt = MeZO(net.named_parameters(), lr=lr, eps=1e-3, backend="cpu", probe=probe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [opt.step(closure) for _ in range(steps)]
    return losses, snapshot(net), opt, [str(w.message) for w in caught]


@pytest.mark.parametrize("how", list(WRITES))
def test_a_write_in_the_checked_forward_falls_back_and_equals_in_place(how):
    """The check sees the write (whatever alias it goes through), falls back with a warning
    naming it, and every step equals probe='inplace' bit for bit."""
    losses_in, weights_in, _, _ = run("inplace", WRITES[how])
    losses_v, weights_v, opt, messages = run("virtual", WRITES[how])
    assert opt.dense_probe_status.startswith(
        "in place (a parameter is written during the forward"), opt.dense_probe_status
    assert "l1.weight" in opt.dense_probe_status
    assert any("falls back to in-place probes: a parameter is written" in m for m in messages)
    assert opt._probes is None
    for k, (a, b) in enumerate(zip(losses_v, losses_in)):
        assert_bits_equal(a, b, f"loss of step {k}")
    assert_same(weights_v, weights_in, "weights")


@pytest.mark.parametrize("how", ["copy", "direct", "data", "foreach"])
def test_the_checks_virtual_trial_writes_nothing(how):
    """lr=0 and a write that changes nothing at theta (a clip at 10): in place the weights stay
    bit-identical; the check's virtual trial must not leave the perturbed values behind."""
    clip = {"copy": lambda w: w.copy_(w.clamp(-10, 10)),
            "direct": lambda w: w.clamp_(-10, 10),
            "data": lambda w: w.data.clamp_(-10, 10),
            "foreach": lambda w: torch._foreach_clamp_max_([w], 10.0)}[how]
    before = snapshot(Net())
    _, weights_in, _, _ = run("inplace", clip, steps=2, lr=0.0)
    _, weights_v, opt, _ = run("virtual", clip, steps=2, lr=0.0)
    assert opt.dense_probe_status.startswith("in place (a parameter is written")
    assert_same(weights_in, before, "in-place weights after lr=0 steps")
    assert_same(weights_v, before, "virtual weights after lr=0 steps")


def test_setdata_in_the_checks_trial_falls_back_and_leaves_the_parameter_its_memory():
    """`w.data = ...` in the check's virtual trial (the closure's 2nd call) is a write: the check
    falls back, and the trial assigned nothing to the real parameter."""
    net = Net()
    memory = net.l1.weight.data_ptr()
    before = snapshot(net)

    def closure():
        calls.append(1)
        if len(calls) == 2:
            net.l1.weight.data = torch.full((16, 8), 0.5)
        return net(X)

    calls: list[int] = []
    opt = MeZO(net.named_parameters(), lr=0.0, eps=1e-3, backend="cpu", probe="virtual")
    with pytest.warns(RuntimeWarning, match="a parameter is written during the forward "
                                            r"\(Tensor.data.__set__ of 'l1.weight'\)"):
        opt.step(closure)
    assert opt.dense_probe_status.startswith("in place (a parameter is written")
    assert net.l1.weight.data_ptr() == memory
    assert_same(snapshot(net), before, "weights after an lr=0 step")


def test_setdata_after_the_check_is_kept_and_refused_as_in_place():
    """After the check, `w.data = t` in the closure reaches the real parameter (not a perturbed
    copy): kept as assigned, and the step raises MovedParameters, as probe='inplace' does."""
    results = {}
    for probe in ("inplace", "virtual"):
        net = Net()
        opt = MeZO(net.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe=probe)
        opt.step(lambda: net(X))
        assigned = torch.full((16, 8), 0.5)

        def closure():
            net.l1.weight.data = assigned
            return net(X)

        with pytest.raises(MovedParameters, match="l1.weight"):
            opt.step(closure)
        assert net.l1.weight.data_ptr() == assigned.data_ptr()
        results[probe] = snapshot(net)
    assert opt.dense_probe_status.startswith("virtual")
    assert torch.equal(results["virtual"]["l1.weight"], torch.full((16, 8), 0.5))
    assert_same(results["virtual"], results["inplace"], "weights")


@pytest.mark.parametrize("how", ["direct", "data", "detach", "slice", "foreach", "copy",
                                 "out", "inplace_kwarg"])
def test_a_write_first_made_after_the_check_raises_and_writes_nothing(how):
    """The check passed (no write then); a later forward that writes l1.weight (or an alias of
    its perturbed copy) fails with a RuntimeError naming it, the weights as before the step;
    the optimizer goes on afterwards."""
    net = Net()
    opt = MeZO(net.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe="virtual")
    opt.step(lambda: net(X))
    assert opt.dense_probe_status.startswith("virtual")
    before = snapshot(net)

    def closure():
        with torch.no_grad():
            WRITES[how](net.l1.weight)
        return net(X)

    with pytest.raises(RuntimeError, match="writes parameter 'l1.weight'.*probe='inplace'"):
        opt.step(closure)
    assert_same(snapshot(net), before, "weights after the refused step")
    reference = Net()
    ref_opt = MeZO(reference.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu",
                   probe="inplace")
    ref_opt.step(lambda: reference(X))
    for _ in range(2):
        assert_bits_equal(opt.step(lambda: net(X)), ref_opt.step(lambda: reference(X)), "loss")
    assert_same(snapshot(net), snapshot(reference), "weights of the steps after it")


def test_reading_through_aliases_and_writing_fresh_tensors_stays_virtual():
    """Aliases only read (w.data, w.detach(), w.t(), a slice) and in-place writes of fresh
    tensors computed from them are no parameter writes: the virtual path is kept and equals
    in place bit for bit."""
    def forward(net: Net) -> torch.Tensor:
        w = net.l1.weight
        extra = w.detach().t()[:2].sum() + w.data[:, :3].mean()
        fresh = w.detach() * 2.0
        fresh.add_(1.0)
        clone = w[:, :4].clone()
        clone.clamp_(-0.05, 0.05)
        buffer = torch.empty(16, 8)
        torch.mul(w, 0.5, out=buffer)
        return net(X) + 1e-3 * (extra + fresh.mean() + clone.sum() + buffer.sum())

    results = {}
    for probe in ("inplace", "virtual"):
        net = Net()
        opt = MeZO(net.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe=probe)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            losses = [opt.step(lambda: forward(net)) for _ in range(3)]
        results[probe] = losses, snapshot(net)
    assert opt.dense_probe_status.startswith("virtual"), opt.dense_probe_status
    for a, b in zip(results["virtual"][0], results["inplace"][0]):
        assert_bits_equal(a, b, "loss")
    assert_same(results["virtual"][1], results["inplace"][1], "weights")


def test_lezo_writes_a_layer_its_probe_does_not_perturb_as_in_place():
    """LeZO after the check: a write of a parameter its probe does not perturb this step goes
    to the real parameter, as in place (bit for bit, until the first refusal); one the probe
    perturbs raises, the weights unchanged."""
    nets, opts = {}, {}
    for probe in ("inplace", "virtual"):
        nets[probe] = net = Net()
        opts[probe] = opt = LeZO(net.named_parameters(), [net.l1, net.l2], lr=1e-2, eps=1e-3,
                                 backend="cpu", probe=probe, n_active=1)
        opt.step(lambda: net(X))
    assert opts["virtual"].dense_probe_status.startswith("virtual")

    def closure_for(net):
        def closure():
            with torch.no_grad():
                net.l2.bias.add_(1e-3)
            return net(X)
        return closure

    kinds, compared = [], True
    for _ in range(8):
        before = snapshot(nets["virtual"])
        try:
            loss = opts["virtual"].step(closure_for(nets["virtual"]))
        except RuntimeError as exc:
            assert "writes parameter 'l2.bias'" in str(exc)
            assert_same(snapshot(nets["virtual"]), before, "weights after a refused step")
            kinds.append("refused")
            compared = False
            continue
        kinds.append("ok")
        # written by both probes' forwards (l2 neither perturbed nor updated this step)
        assert_bits_equal(nets["virtual"].l2.bias, before["l2.bias"] + 1e-3 + 1e-3,
                          "written bias")
        if compared:
            assert_bits_equal(loss, opts["inplace"].step(closure_for(nets["inplace"])), "loss")
            assert_same(snapshot(nets["virtual"]), snapshot(nets["inplace"]), "weights")
    assert "ok" in kinds and "refused" in kinds, kinds  # both cases reached


def _embedding_draw():
    """A virtual target over a 300-row embedding holding a perturbation, and its _Draw."""
    torch.manual_seed(0)
    embed = torch.nn.Embedding(300, 24)
    head = torch.nn.Linear(24, 1)
    model = torch.nn.ModuleDict({"embed": embed, "head": head})
    ids = torch.tensor([[0, 5, 299], [256, 255, 1]])
    opt = MeZO(model.named_parameters(), eps=1e-3, backend="cpu")
    opt.step(lambda: head(embed(ids)).mean())
    target = opt._probes.targets[0]
    j = target.space.names.index("embed.weight")
    target.hold(SeededNoise((7,), (1e-3,)))
    opt._probes.scratch_elements = 1  # chunks of ROW_ALIGN = 256 rows: 256 + 44
    return target, dense_probe._Draw(opt._probes, target), j, ids


@pytest.mark.parametrize("bad", [300, 301, 10_000, -1, -300])
def test_the_device_embedding_path_refuses_out_of_range_ids(bad):
    """_Draw._embedding_by_chunks (the non-CPU lookup, run on CPU tensors here) fails on an id
    outside [0, rows) as F.embedding does, instead of reading a clamped row."""
    target, draw, j, ids = _embedding_draw()
    try:
        assert_bits_equal(draw._embedding_by_chunks(ids, j), draw.embedding(ids, j), "lookup")
        with pytest.raises(IndexError):
            F.embedding(torch.tensor([1, bad, 3]), target.space.tensors[j])
        with pytest.raises(RuntimeError, match="index out of range"):
            draw._embedding_by_chunks(torch.tensor([[1, bad, 3]]), j)
    finally:
        target.hold(None)


def test_the_device_embedding_path_in_a_step_refuses_out_of_range_ids(monkeypatch):
    """A step through the device lookup with an out-of-range id fails, weights unchanged."""
    monkeypatch.setattr(dense_probe._Draw, "embedding", dense_probe._Draw._embedding_by_chunks)
    torch.manual_seed(0)
    embed, head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 1)
    model = torch.nn.ModuleDict({"embed": embed, "head": head})
    opt = MeZO(model.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe="virtual")
    opt.step(lambda: head(embed(torch.tensor([1, 2, 3]))).mean())
    assert opt.dense_probe_status.startswith("virtual")
    before = snapshot(model)
    for bad in (10, -1):
        with pytest.raises(RuntimeError, match="index out of range"):
            opt.step(lambda: head(embed(torch.tensor([1, bad, 3]))).mean())
        assert_same(snapshot(model), before, "weights after a failed step")


def test_an_empty_embedding_on_the_device_path():
    """No ids: an empty lookup (nothing to check)."""
    target, draw, j, _ = _embedding_draw()
    try:
        ids = torch.empty(2, 0, dtype=torch.long)
        assert draw._embedding_by_chunks(ids, j).shape == (2, 0, 24)
    finally:
        target.hold(None)


@pytest.mark.parametrize("call", [
    lambda w: F.dropout(w, 0.1, training=False, inplace=True),
    lambda w: F.dropout(w, 0.0, True, True),
    lambda w: F.alpha_dropout(w, p=0.5, training=False, inplace=True),
])
def test_a_dropout_that_writes_nothing_is_no_write(call):
    """inplace=True on a dropout in eval mode or with p = 0 writes nothing: the probes stay
    virtual (they fell back to in place)."""
    net = Net()

    def closure():
        call(net.l1.weight)
        return net(X)

    opt = MeZO(net.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)
    assert opt.dense_probe_status.startswith("virtual"), opt.dense_probe_status
