"""Virtual probes and deferred updates, found by review: writes between deferred steps, signed
zeros under a zero update, the first step's re-run from the same random state, torch.func
wrappers in the Linear term, aliasing made after the virtual / in-place split, a loss that
aliases a parameter."""

import warnings

import pytest
import torch
from torch import nn

from zokernels.optim import MeZO, TeZO

G = torch.Generator().manual_seed(1)
IDS = torch.randint(0, 50, (4, 5), generator=G)
TARGETS = torch.randint(0, 50, (4, 5), generator=G)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.l1 = nn.Linear(16, 24)
        self.l2 = nn.Linear(24, 50)

    def forward(self, ids):
        return self.l2(torch.tanh(self.l1(self.emb(ids))))


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _closure(model):
    return lambda: nn.functional.cross_entropy(model(IDS).reshape(-1, 50), TARGETS.reshape(-1))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().view(torch.int32)


def _deferred(steps: int = 3) -> tuple[Net, TeZO]:
    model = _net()
    opt = TeZO(model.parameters(), lr=1e-2, rank=4, update="deferred")
    for _ in range(steps):
        opt.step(_closure(model))
    return model, opt


@pytest.mark.parametrize("write", ["copy_", "zeros_", "load_state_dict"])
def test_deferred_update_dropped_when_the_weight_is_written(write):
    """A write between deferred steps sets the weight: the pending update is not merged on top
    of it (it was: round(D X + U a V^T) instead of X)."""
    model, opt = _deferred()
    value = torch.randn(24, 16)
    with pytest.warns(RuntimeWarning, match="deferred updates were pending"):
        if write == "copy_":
            with torch.no_grad():
                model.l1.weight.copy_(value)
            state = model.state_dict()
        elif write == "zeros_":
            nn.init.zeros_(model.l1.weight)
            value = torch.zeros(24, 16)
            state = model.state_dict()
        else:  # a module without merge hooks loads first (l1's own pre-hook merges before)
            with torch.no_grad():
                model.l1.weight.copy_(value)
            opt.merge()
            state = model.state_dict()
    assert torch.equal(state["l1.weight"], value)
    opt.step(_closure(model))  # the optimizer continues from the written weight
    opt.merge()


def test_deferred_update_kept_when_the_weight_is_moved():
    """model.to(...) / param.data = ... (other memory, same shape) keeps the pending update:
    merged into the new memory as into the old."""
    model, opt = _deferred()
    reference, reference_opt = _deferred()
    reference_opt.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.l1.weight.data = model.l1.weight.data.clone()
        opt.merge()
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_deferred_resized_weight_is_not_written():
    model, opt = _deferred()
    model.l2.weight.data = torch.zeros(60, 24)
    with pytest.warns(RuntimeWarning, match="written or resized"):
        opt.merge()
    assert not model.l2.weight.any()


@pytest.mark.parametrize("probe,update", [("inplace", "inplace"), ("virtual", "inplace"),
                                          ("virtual", "deferred")])
def test_tezo_lr0_keeps_signed_zeros(probe, update):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50))
    with torch.no_grad():
        for p in model.parameters():
            p.view(-1)[:5] = -0.0
    before = {k: _bits(v) for k, v in model.state_dict().items()}
    opt = TeZO(model.parameters(), lr=0.0, probe=probe, update=update)
    for _ in range(2):
        opt.step(lambda: nn.functional.cross_entropy(model(IDS).reshape(-1, 50),
                                                     TARGETS.reshape(-1)))
    opt.merge()
    for k, v in model.state_dict().items():
        assert torch.equal(_bits(v), before[k]), k


@pytest.mark.parametrize("probe", ["inplace", "virtual"])
def test_mezo_zero_gradient_keeps_signed_zeros(probe):
    """A loss that does not depend on the weights: l+ == l-, every coefficient 0; the virtual
    update skipped its pass only for lr == 0 and turned -0.0 into +0.0."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    with torch.no_grad():
        layer.weight[0] = -0.0
    before = _bits(layer.weight)
    x = torch.randn(3, 6)
    opt = MeZO(layer.parameters(), lr=1e-3, probe=probe)
    for _ in range(2):
        opt.step(lambda: (layer(x) * 0).sum() + 1.0)
    assert torch.equal(_bits(layer.weight), before)


class _Dropped(nn.Module):
    """Dropout, and the embedding read outside its module (a tied head through matmul): the
    virtual first step runs again, in place for that weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.mid = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.3)

    def forward(self, ids):
        return self.drop(torch.tanh(self.mid(self.emb(ids)))) @ self.emb.weight.t()


def test_tezo_rerun_starts_from_the_same_random_state():
    results = {}
    for probe in ("inplace", "virtual"):
        torch.manual_seed(0)
        model = _Dropped()
        opt = TeZO(model.parameters(), lr=1e-3, probe=probe)
        torch.manual_seed(123)
        losses = [float(opt.step(_closure(model))) for _ in range(3)]
        results[probe] = losses, model.mid.weight.detach().clone()
    assert results["virtual"][0] == pytest.approx(results["inplace"][0], rel=1e-5)
    assert torch.allclose(results["virtual"][1], results["inplace"][1], atol=1e-5)


def test_tezo_virtual_probe_under_vmap():
    """torch.func wrappers are plain torch.Tensors by type, without memory: the Linear term
    takes the torch reference for them (the native kernel raised on their data pointer)."""
    losses = {}
    for probe in ("inplace", "virtual"):
        model = _net()
        opt = TeZO(model.parameters(), lr=1e-3, probe=probe)

        def per_sample(ids, target):
            out = model(ids.unsqueeze(0))
            return nn.functional.cross_entropy(out.reshape(-1, 50), target.reshape(-1))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # functorch's batching-rule notes
            losses[probe] = float(opt.step(
                lambda: torch.func.vmap(per_sample)(IDS, TARGETS).mean()))
    assert losses["virtual"] == pytest.approx(losses["inplace"], rel=1e-5)


def test_mezo_refuses_aliasing_made_after_the_split():
    """A parameter left in place by the check (not read), later tied to a virtual one through
    .data: refused before anything is written, as without the split."""
    torch.manual_seed(0)
    body, aux = nn.Linear(6, 4), nn.Linear(6, 4)
    x = torch.randn(3, 6)
    opt = MeZO([("body.weight", body.weight), ("aux.weight", aux.weight)], lr=1e-2)
    opt.step(lambda: body(x).pow(2).mean())
    aux.weight.data = body.weight.data
    before = body.weight.detach().clone()
    with pytest.raises(ValueError, match="share memory"):
        opt.step(lambda: body(x).pow(2).mean())
    assert torch.equal(body.weight, before)


@pytest.mark.parametrize("probe", ["inplace", "virtual"])
def test_loss_aliasing_a_parameter_is_read_at_its_probe(probe):
    """The closure returns a view of a parameter: l+ must be the value at the +eps probe, not
    the memory re-read after the -eps one (the gradient was 0)."""
    p = nn.Parameter(torch.tensor(3.0))
    opt = MeZO([("p", p)], lr=0.1, probe=probe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(lambda: p.view(()))
    assert p.item() != 3.0


def test_copies_of_the_model_carry_inert_hooks_not_the_optimizer():
    """torch.save(model) / deepcopy with updates pending pickled the optimizer into the model
    (its merge hooks were bound methods)."""
    import copy
    import io
    import pickle

    model, opt = _deferred()
    plain = io.BytesIO()
    torch.save(_net(), plain)
    saved = io.BytesIO()
    torch.save(model, saved)
    assert b"TeZO" not in saved.getvalue() and b"VirtualLowRank" not in saved.getvalue()
    assert saved.tell() < plain.tell() + 1024
    copied = copy.deepcopy(model)
    copied(IDS)  # an inert hook: nothing merged, nothing raised
    pickle.loads(pickle.dumps(model))(IDS)
    before = model.l1.weight.detach().clone()
    model(IDS)  # the original's hook merges
    assert not torch.equal(model.l1.weight, before)
    assert torch.equal(copied.l1.weight, before)


def test_a_decay_that_is_1_in_float32_counts_as_1():
    """weight_decay 1e-9: decay 1 - 1e-11 is 1 in float32 (the kernels', a saved file's); a
    zero update then skips the virtual pass, and an in-memory replay equals the run."""
    results = {}
    for probe in ("inplace", "virtual"):
        torch.manual_seed(0)
        layer = nn.Linear(8, 4)
        with torch.no_grad():
            layer.weight[0] = -0.0
        initial = [p.detach().clone() for p in layer.parameters()]
        x = torch.randn(3, 8)
        opt = MeZO(layer.named_parameters(), lr=1e-2, weight_decay=1e-9, probe=probe)
        for _ in range(2):
            opt.step(lambda: torch.relu(layer(x) - 100.0).sum())
        results[probe] = _bits(layer.weight)
        replayed = nn.Linear(8, 4)
        with torch.no_grad():
            for p, value in zip(replayed.parameters(), initial):
                p.copy_(value)
        opt.trajectory.replay(replayed)
        assert torch.equal(_bits(replayed.weight), results[probe])
    assert torch.equal(results["virtual"], results["inplace"])
    assert torch.signbit(results["virtual"].view(torch.float32)[0]).all()


def test_deferred_update_kept_through_swapped_conversions():
    """model.to(...) under torch.__future__'s swap gives the weight another tensor's version
    counter, maybe at the stamped address: a move, not a write."""
    weights = {}
    for swap in (False, True):
        model, opt = _deferred()
        previous = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(swap)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                for _ in range(3):
                    model.half()
                    model.float()
                opt.merge()
        finally:
            torch.__future__.set_swap_module_params_on_conversion(previous)
        weights[swap] = {k: v.clone() for k, v in model.state_dict().items()}
    for name, value in weights[False].items():
        assert torch.equal(value, weights[True][name]), name
