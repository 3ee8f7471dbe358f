"""Virtual dense probes (probe="virtual", zokernels.dense_probe): the forward's reads see
theta +- eps z, nothing is written, and every step equals the exact in-place step bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import zokernels.dense_probe as dense_probe
from zokernels.optim import LeZO, MeZO, PseuZO

from helpers import assert_bits_equal, assert_same, snapshot


class LM(torch.nn.Module):
    """Embedding tied to the head, linears with and without bias, a norm, a raw parameter read
    by a plain torch function (not a module) and, optionally, dropout."""

    def __init__(self, vocab: int = 300, width: int = 24, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.norm = torch.nn.LayerNorm(width)
        self.blocks = torch.nn.ModuleList(
            [torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                 torch.nn.Linear(2 * width, width, bias=False))
             for _ in range(3)])
        self.gate = torch.nn.Parameter(torch.full((width,), 0.5))
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = h + self.drop(block(self.norm(h))) * torch.sigmoid(self.gate)
        return self.head(h)


def make(dtype: torch.dtype = torch.float32, seed: int = 0, **kw) -> LM:
    torch.manual_seed(seed)
    model = LM(**kw)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.to(dtype)


def batch(vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 11), generator=torch.Generator().manual_seed(1))


def closure_for(model: torch.nn.Module, ids: torch.Tensor):
    def closure():
        logits = model(ids[:, :-1]).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return closure


def run(opt_factory, model: torch.nn.Module, steps: int, ids: torch.Tensor) -> list:
    opt = opt_factory(model)
    losses = [opt.step(closure_for(model, ids)) for _ in range(steps)]
    return opt, losses


def assert_steps_equal(factory, dtype: torch.dtype, steps: int = 3, **model_kw) -> MeZO:
    ids = batch()
    inplace, virtual = make(dtype, **model_kw), make(dtype, **model_kw)
    opt_in, losses_in = run(lambda m: factory(m, "inplace"), inplace, steps, ids)
    opt_v, losses_v = run(lambda m: factory(m, "virtual"), virtual, steps, ids)
    for k, (a, b) in enumerate(zip(losses_v, losses_in)):
        assert_bits_equal(a, b, f"loss of step {k}")
    assert_same(snapshot(virtual), snapshot(inplace), "weights after the steps")
    assert opt_v.dense_probe_status.startswith("virtual"), opt_v.dense_probe_status
    assert_same_state(opt_v.trajectory.state_dict(), opt_in.trajectory.state_dict())
    return opt_v


def assert_same_state(a, b, where: str = "trajectory") -> None:
    if isinstance(a, torch.Tensor):
        assert_bits_equal(a, b, where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{k}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mezo_steps_equal_the_exact_inplace_steps(dtype):
    opt = assert_steps_equal(
        lambda m, probe: MeZO(m.named_parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1,
                              backend="cpu", probe=probe), dtype)
    assert opt.undo_log_bytes == 0  # every parameter is read through the forward: no logs
    assert 0 < opt.extra_memory_bytes <= opt._probes.scratch_elements * dtype.itemsize


@pytest.mark.parametrize("dist,rounding", [("rademacher", "nearest"), ("gaussian", "stochastic")])
def test_n_spsa_dists_and_stochastic_rounding(dist, rounding):
    assert_steps_equal(
        lambda m, probe: MeZO(m.named_parameters(), lr=1e-2, eps=1e-3, n_spsa=3, dist=dist,
                              rounding=rounding, backend="cpu", probe=probe), torch.bfloat16)


def test_lezo_perturbs_only_the_selected_layers():
    assert_steps_equal(
        lambda m, probe: LeZO(m.named_parameters(), layers=list(m.blocks), n_active=1, lr=1e-2,
                              eps=1e-3, backend="cpu", probe=probe), torch.bfloat16, steps=4)


def test_torch_backend_too():
    assert_steps_equal(
        lambda m, probe: MeZO(m.named_parameters(), lr=1e-2, eps=1e-3, backend="torch",
                              probe=probe), torch.bfloat16, steps=2)


def test_chunked_reads_equal_the_whole_weight(monkeypatch):
    """A scratch bound below the tied 300 x 24 head: F.linear runs over row chunks of
    ROW_ALIGN rows (192 + 108, dense_probe._row_chunks) and the steps still equal the
    in-place ones bit for bit; the reported scratch is one chunk."""
    monkeypatch.setattr(dense_probe, "MIN_SCRATCH_ELEMENTS", 2048)  # the largest weight: 1152
    monkeypatch.setattr(dense_probe, "SCRATCH_FRACTION", 0.0)
    monkeypatch.setattr(dense_probe, "LIMIT_FRACTION", 1.0)
    drawn = []
    original = dense_probe._Draw.row_block

    def row_block(self, j, start, stop, reuse=False):
        drawn.append((self.space.names[j], start, stop))
        return original(self, j, start, stop, reuse)

    monkeypatch.setattr(dense_probe._Draw, "row_block", row_block)
    opt = assert_steps_equal(
        lambda m, probe: MeZO(m.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu",
                              probe=probe), torch.float32, steps=2)
    # 300 = 192 + 108 rows: a last chunk of 44 rows would take other GEMM kernels in fp32
    assert ("embed.weight", 0, 192) in drawn and ("embed.weight", 192, 300) in drawn
    assert opt.extra_memory_bytes == 192 * 24 * 4


def test_embedding_draws_only_the_selected_rows():
    model = make()
    ids = torch.tensor([[3, 7, 3, 299]])
    opt = MeZO(model.named_parameters(), eps=1e-3, backend="cpu", probe="virtual")
    opt.step(closure_for(model, batch()))
    seen = {}
    expected = model.embed.weight.detach().clone()
    probe_seed = opt.seed_for(opt.zo_state["step"])
    from zokernels import perturb_

    perturb_(expected, probe_seed, 1e-3, keys=[opt._probes.targets[0].space.keys[
        opt._probes.targets[0].space.names.index("embed.weight")]], backend="cpu")
    from zokernels.held import SeededNoise

    target = opt._probes.targets[0]
    target.hold(SeededNoise((probe_seed,), (1e-3,)))
    try:
        with opt._probes.probing():
            seen["rows"] = F.embedding(ids, model.embed.weight)
    finally:
        target.hold(None)
    assert_bits_equal(seen["rows"], F.embedding(ids, expected), "perturbed rows")


def test_dropout_draws_alike_in_the_check():
    """The check resets torch's random state between its two evaluations, so a model in train
    mode with dropout keeps the virtual path, and steps equal the in-place ones when both runs
    start from the same random state."""
    ids = batch()
    results = []
    for probe in ("inplace", "virtual"):
        model = make(torch.float32, dropout=0.2)
        model.train()
        opt = MeZO(model.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe=probe)
        torch.manual_seed(123)
        losses = [opt.step(closure_for(model, ids)) for _ in range(3)]
        results.append((losses, snapshot(model), opt))
    for a, b in zip(results[1][0], results[0][0]):
        assert_bits_equal(a, b, "loss")
    assert_same(results[1][1], results[0][1], "weights")
    assert results[1][2].dense_probe_status.startswith("virtual")


class Unread(LM):
    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Linear(24, 24)


def test_parameters_not_read_stay_in_place():
    ids = batch()
    models = []
    for probe in ("inplace", "virtual"):
        torch.manual_seed(0)
        model = Unread()
        opt = MeZO(model.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe=probe)
        for _ in range(2):
            opt.step(closure_for(model, ids))
        models.append((model, opt))
    assert_same(snapshot(models[1][0]), snapshot(models[0][0]), "weights")
    opt = models[1][1]
    assert "the others in place" in opt.dense_probe_status
    assert opt.held.targets[opt._dense_targets[0]].space.names == ["unused.weight",
                                                                    "unused.bias"]
    assert len(opt.spaces[0]) == len(list(models[1][0].parameters()))  # the whole group


def pseuzo_steps(model: torch.nn.Module, probe: str, steps: int, ids: torch.Tensor,
                 **kw) -> tuple[PseuZO, list[torch.Tensor]]:
    """PseuZO on `model`: its output is the logits, loss_fn the cross entropy."""
    opt = PseuZO(model.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe=probe, **kw)

    def loss_fn(logits):
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                               ids[:, 1:].reshape(-1))
    return opt, [opt.step(lambda: model(ids[:, :-1]), loss_fn) for _ in range(steps)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pseuzo_steps_equal_the_exact_inplace_steps(dtype):
    """Its one probe (theta + eps z, the output) virtual: losses, every stored output
    difference, weights and trajectory bit for bit those of the in-place steps, through a
    window that fills and rolls and a schedule with MeZO steps (beta = 0) between them."""
    ids = batch()
    kw = dict(window=3, weight_decay=0.1, beta=lambda epoch: 0.0 if epoch % 4 == 2 else 0.9,
              beta_zero="mezo")
    inplace, virtual = make(dtype), make(dtype)
    opt_in, losses_in = pseuzo_steps(inplace, "inplace", 7, ids, **kw)
    opt_v, losses_v = pseuzo_steps(virtual, "virtual", 7, ids, **kw)
    for k, (a, b) in enumerate(zip(losses_v, losses_in)):
        assert_bits_equal(a, b, f"loss of step {k}")
    assert_same(snapshot(virtual), snapshot(inplace), "weights after the steps")
    assert opt_v.window_length == opt_in.window_length == 3
    for (k, s, d), (k2, s2, d2) in zip(opt_v._window, opt_in._window):
        assert (k, s) == (k2, s2)
        assert_bits_equal(d, d2, f"window entry of step {k}")
    assert_same_state(opt_v.trajectory.state_dict(), opt_in.trajectory.state_dict())
    assert opt_v.dense_probe_status.startswith("virtual"), opt_v.dense_probe_status
    assert opt_in.undo_log_bytes > 0 and opt_v.undo_log_bytes == 0
    assert opt_v.extra_memory_bytes == opt_v.window_bytes + opt_v._probes.peak_scratch_bytes


def test_pseuzo_output_that_differs_falls_back_with_a_warning():
    """The check compares the whole output tensor: a forward whose output changes between the
    two evaluations keeps PseuZO in place; lr = 0 steps still leave the weights as they were."""
    model = make(torch.bfloat16)
    ids = batch()
    calls = []

    def forward():
        calls.append(1)
        return model(ids[:, :-1]) + (1e-2 if len(calls) == 3 else 0.0)  # the check's virtual one

    opt = PseuZO(model.named_parameters(), lr=0.0, eps=1e-3, backend="cpu")
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match="the virtual \\+eps output differs"):
        opt.step(forward, lambda out: out.float().square().mean())
    assert opt.dense_probe_status.startswith("in place (the virtual +eps output differs")
    opt.step(forward, lambda out: out.float().square().mean())
    assert_same(snapshot(model), before, "weights after lr=0 steps")


class Writer(LM):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.gate.mul_(1.0)  # writes a parameter during the forward
        return super().forward(ids)


def test_a_forward_that_writes_a_parameter_falls_back_with_a_warning():
    torch.manual_seed(0)
    model = Writer()
    opt = MeZO(model.named_parameters(), lr=0.0, eps=1e-3, backend="cpu", probe="virtual")
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match="falls back to in-place probes: a parameter is "
                                            "written"):
        opt.step(closure_for(model, batch()))
    assert opt.dense_probe_status.startswith("in place (a parameter is written")
    assert opt._probes is None
    opt.step(closure_for(model, batch()))
    assert_same(snapshot(model), before, "weights after lr=0 steps")


def test_a_closure_that_changes_its_data_falls_back_with_a_warning():
    torch.manual_seed(0)
    model = make()
    calls = []

    def closure():  # another batch every call: the two evaluations of the check differ
        calls.append(1)
        ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(len(calls)))
        return closure_for(model, ids)()

    opt = MeZO(model.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe="virtual")
    with pytest.warns(RuntimeWarning, match="differs from the in-place one"):
        opt.step(closure)
    assert len(calls) == 3  # +eps in place, +eps virtual, -eps
    assert opt.dense_probe_status.startswith("in place (the virtual +eps loss")
    opt.step(closure)
    assert len(calls) == 5


@pytest.mark.parametrize("exc,at", [(RuntimeError("boom"), 3), (KeyboardInterrupt(), 2),
                                    (KeyboardInterrupt(), 3), (RuntimeError("boom"), 5)])
def test_lr_zero_and_failing_closures_leave_the_weights_bit_identical(exc, at):
    """The closure fails at its `at`-th call: 1-3 are the first step's in-place +eps, the
    check's virtual +eps and -eps (virtual once the check passed), 4-5 the next step's."""
    torch.manual_seed(0)
    model = make(torch.bfloat16)
    before = snapshot(model)
    opt = MeZO(model.named_parameters(), lr=0.0, eps=1e-3, backend="cpu", probe="virtual")
    good = closure_for(model, batch())
    count = [0]

    def failing():
        count[0] += 1
        if count[0] == at:
            raise exc
        return good()

    with pytest.raises(type(exc)):
        for _ in range(3):
            opt.step(failing)
    assert_same(snapshot(model), before, f"weights after {type(exc).__name__}")
    assert not opt._step_in_progress()
    # an interrupt inside the check leaves it to the next probe; after it, the path is kept
    assert opt._probe_check == (at == 2)
    for _ in range(2):
        opt.step(good)
    assert opt.dense_probe_status.startswith("virtual")
    assert_same(snapshot(model), before, "weights after lr=0 steps")


def test_a_virtual_probe_that_raises_falls_back():
    """An exception only the virtual evaluation raises (Exception, not an interrupt) is a
    reason to stay in place, not a failed step."""
    torch.manual_seed(0)
    model = make()
    good = closure_for(model, batch())
    count = [0]

    def closure():
        count[0] += 1
        if count[0] == 2:
            raise RuntimeError("not under the probe")
        return good()

    opt = MeZO(model.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe="virtual")
    with pytest.warns(RuntimeWarning, match="the virtual probe raised RuntimeError: not under"):
        opt.step(closure)
    assert opt.dense_probe_status.startswith("in place (the virtual probe raised")


def test_a_non_finite_first_loss_defers_the_check():
    torch.manual_seed(0)
    model = make()
    opt = MeZO(model.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe="virtual")
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(lambda: torch.tensor(float("nan")))
    assert opt._probe_check and opt._probes is None
    assert_same(snapshot(model), before, "weights after a skipped step")
    opt.step(closure_for(model, batch()))
    assert opt.dense_probe_status.startswith("virtual")


def test_resume_continues_bit_for_bit():
    ids = batch()
    model_a = make(torch.bfloat16)
    opt_a = MeZO(model_a.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe="virtual")
    for _ in range(2):
        opt_a.step(closure_for(model_a, ids))
    state, weights = opt_a.state_dict(), snapshot(model_a)
    for _ in range(2):
        opt_a.step(closure_for(model_a, ids))
    model_b = make(torch.bfloat16)
    with torch.no_grad():
        for name, p in model_b.named_parameters():
            p.copy_(weights[name])
    opt_b = MeZO(model_b.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe="virtual")
    opt_b.load_state_dict(state)
    for _ in range(2):
        opt_b.step(closure_for(model_b, ids))
    assert_same(snapshot(model_b), snapshot(model_a), "resumed weights")


def test_probe_is_validated():
    with pytest.raises(ValueError, match="probe must be one of"):
        MeZO([torch.nn.Parameter(torch.zeros(3))], probe="lazy")


def test_reads_outside_modules_and_views_see_the_perturbation():
    """A parameter read by any torch function (a transpose kept for later, an elementwise
    product, torch.equal) gets the perturbed values inside a probe, and the real ones outside."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 4))
    x = torch.randn(4)
    seen = {}

    def closure():
        t = w.t()  # a view kept across calls
        seen.setdefault("values", []).append(t.t().clone())
        return (t.t() @ x).square().sum() + (w * 2).sum()

    opt = MeZO([("w", w)], lr=0.0, eps=1e-2, backend="cpu", probe="virtual")
    theta = w.detach().clone()
    opt.step(closure)
    assert opt.dense_probe_status.startswith("virtual")
    values = seen["values"]  # +eps in place, +eps virtual, -eps virtual
    assert_bits_equal(values[1], values[0], "virtual +eps read")
    assert not torch.equal(values[2], theta) and not torch.equal(values[1], theta)
    assert_bits_equal(w.detach(), theta, "weights")


def test_a_draw_above_the_limit_stays_in_place(monkeypatch):
    """The limit: a weight whose smallest chunk (ROW_ALIGN rows) or whole copy would exceed
    LIMIT_FRACTION of the parameters stays in place (with its selector logs)."""
    monkeypatch.setattr(dense_probe, "LIMIT_FRACTION", 0.0)
    monkeypatch.setattr(dense_probe, "MIN_SCRATCH_ELEMENTS", 1200)  # 48 x 24 weights fit
    ids = batch()
    inplace, virtual = make(), make()
    opt_in = MeZO(inplace.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe="inplace")
    opt_v = MeZO(virtual.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu")
    for _ in range(2):
        assert_bits_equal(opt_v.step(closure_for(virtual, ids)),
                          opt_in.step(closure_for(inplace, ids)), "loss")
    assert_same(snapshot(virtual), snapshot(inplace), "weights")
    assert opt_v.held.targets[opt_v._dense_targets[0]].space.names == ["embed.weight"]
    assert opt_v.undo_log_bytes > 0 and opt_v._probes.peak_scratch_bytes <= 1200 * 4


def test_exact_restore_false_is_exact_with_virtual_probes():
    """Virtual probes write nothing, so exact_restore=False loses nothing: the steps equal the
    exact in-place ones (the check's in-place probe logs once, to compare at the exact theta)
    and no log is kept."""
    ids = batch()
    inplace, virtual = make(torch.bfloat16), make(torch.bfloat16)
    opt_in = MeZO(inplace.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe="inplace")
    opt_v = MeZO(virtual.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu",
                 exact_restore=False)
    for _ in range(3):
        assert_bits_equal(opt_v.step(closure_for(virtual, ids)),
                          opt_in.step(closure_for(inplace, ids)), "loss")
    assert_same(snapshot(virtual), snapshot(inplace), "weights")
    assert opt_v.dense_probe_status.startswith("virtual") and opt_v.undo_log_bytes == 0


def test_extra_memory_of_a_transformer_is_a_few_percent():
    """The bench's OPT-like `small` decoder (7.0M parameters, tied head), bf16, default
    settings: every parameter virtual, extra memory (the largest draw) <= 5% of the
    parameters' bytes (measured 3.76%: one 256 x 1024 weight drawn whole)."""
    from zokernels.bench.models import build_model, synthetic_batch

    model = build_model("small", torch.bfloat16, "cpu")
    ids = synthetic_batch(model, 2, 16, "cpu")
    opt = MeZO(model.module.named_parameters(), lr=1e-6, eps=1e-3, backend="cpu")
    for _ in range(2):
        opt.step(lambda: model.loss(ids))
    params = sum(p.numel() * p.element_size() for p in model.module.parameters())
    assert opt.dense_probe_status == "virtual (100 of 100 parameters)"
    assert 0 < opt.extra_memory_bytes <= 0.05 * params
    assert opt.undo_log_bytes == 0


def test_the_device_embedding_path_equals_the_row_path():
    """Off the CPU the embedding is looked up chunk by chunk (no host synchronization); run on
    CPU tensors here, it gives the selected-rows path's values bit for bit."""
    model = make()
    opt = MeZO(model.named_parameters(), eps=1e-3, backend="cpu")
    opt.step(closure_for(model, batch()))
    from zokernels.held import SeededNoise

    target = opt._probes.targets[0]
    j = target.space.names.index("embed.weight")
    target.hold(SeededNoise((7,), (1e-3,)))
    try:
        opt._probes.scratch_elements = 1  # chunks of ROW_ALIGN = 256 rows: 256 + 44
        draw = dense_probe._Draw(opt._probes, target)
        ids = torch.tensor([[0, 5, 299, 5], [256, 255, 1, 0]])
        assert opt._probes.rows_per_chunk(24) == 256
        assert_bits_equal(draw._embedding_by_chunks(ids, j), draw.embedding(ids, j),
                          "chunked lookup")
    finally:
        target.hold(None)


def test_triton_backend_under_the_interpreter():
    """The virtual draws call the triton backend's perturb kernel (interpreted on CPU tensors
    here): a small model's steps equal the in-place ones bit for bit."""
    pytest.importorskip("triton")

    def factory(model, probe):
        return MeZO(model.named_parameters(), lr=1e-2, eps=1e-3, backend="triton", probe=probe)

    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(3))
    inplace, virtual = make(torch.bfloat16, vocab=40, width=8), make(torch.bfloat16, vocab=40,
                                                                   width=8)
    opt_in, opt_v = factory(inplace, "inplace"), factory(virtual, "virtual")
    for _ in range(2):
        assert_bits_equal(opt_v.step(closure_for(virtual, ids)),
                          opt_in.step(closure_for(inplace, ids)), "loss")
    assert_same(snapshot(virtual), snapshot(inplace), "weights")
    assert opt_v.dense_probe_status.startswith("virtual")
