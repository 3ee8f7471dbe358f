"""Virtual dense probes (zokernels.dense_probe), their cost on the CPU:

- a chunked F.linear whose GEMMs write their columns of the output directly gives F.linear's
  bits on every input it takes (2-D / 3-D / 4-D, contiguous or not, odd strides, with or
  without bias, the three float dtypes), and copies its chunks where out= cannot follow
  F.linear (autocast, vmap, forward-mode AD);
- the probes' torch-function mode is left off inside modules whose tracked forward read no
  perturbed parameter (LeZO's unselected blocks, ModuleScope), checked on the first probe: the
  steps still equal the in-place ones bit for bit, reads of a perturbed parameter from inside
  another block or from a user's hook keep the mode on there, a user's own mode keeps seeing
  every call, and an exception or a KeyboardInterrupt anywhere leaves no hook, no mode on the
  stack and the weights as they were."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import zokernels.dense_probe as dense_probe
from zokernels.held import SeededNoise
from zokernels.optim import LeZO, MeZO

from helpers import assert_bits_equal, assert_interrupted_step_leaves_weights, assert_same, snapshot


def assert_mezo_runs_equal(make, loss, steps: int = 3, backend: str = "cpu",
                           context=lambda k: contextlib.nullcontext()) -> None:
    """MeZO with virtual probes on one model and in place on its twin (make() after the same
    seed), `steps` steps of loss(model), step k inside context(k): the virtual path is kept
    and the losses and weights equal bit for bit."""
    nets = {}
    for probe in ("inplace", "virtual"):
        torch.manual_seed(0)
        nets[probe] = make()
    opts = {p: MeZO(n.parameters(), lr=1e-2, eps=1e-3, backend=backend, probe=p)
            for p, n in nets.items()}
    for k in range(steps):
        with context(k):
            losses = {p: opts[p].step(lambda: loss(nets[p])) for p in nets}
        assert opts["virtual"].dense_probe_status.startswith("virtual"), \
            opts["virtual"].dense_probe_status
        assert_bits_equal(losses["virtual"], losses["inplace"], f"loss of step {k}")
    assert_same(snapshot(nets["virtual"]), snapshot(nets["inplace"]), "weights")


def squared(x: torch.Tensor):
    """The loss of a model's output on x: its mean square, in float32."""
    return lambda model: model(x).float().pow(2).mean()


def _linear_draw(dtype: torch.dtype, bias: bool):
    """A virtual target over a 600 x 24 linear weight holding a perturbation, its _Draw (chunks
    of ROW_ALIGN = 256 rows: 256 + 256 + 88) and the weight's position."""
    torch.manual_seed(0)
    model = torch.nn.Linear(24, 600, bias=bias).to(dtype)
    x = torch.randn(2, 24, dtype=dtype)
    opt = MeZO(model.named_parameters(), eps=1e-3, backend="cpu", probe="virtual")
    opt.step(lambda: model(x).float().mean())
    assert opt.dense_probe_status.startswith("virtual"), opt.dense_probe_status
    target = opt._probes.targets[0]
    target.hold(SeededNoise((7,), (1e-3,)))
    opt._probes.scratch_elements = 1
    names = target.space.names
    draw = dense_probe._Draw(opt._probes, target)
    return target, draw, names.index("weight"), names.index("bias") if bias else None


INPUTS = {
    "2d": lambda dt: torch.randn(5, 24, dtype=dt),
    "2d transposed": lambda dt: torch.randn(24, 5, dtype=dt).t(),
    "4d transposed": lambda dt: torch.randn(2, 3, 24, 5, dtype=dt).transpose(-1, -2),
    "expanded": lambda dt: torch.randn(1, 1, 24, dtype=dt).expand(3, 5, 24),
    "3d": lambda dt: torch.randn(3, 5, 24, dtype=dt),
    "4d": lambda dt: torch.randn(2, 3, 5, 24, dtype=dt),
    "transposed": lambda dt: torch.randn(3, 24, 5, dtype=dt).transpose(1, 2),
    "strided": lambda dt: torch.randn(3, 5, 48, dtype=dt)[..., ::2],
    "no rows": lambda dt: torch.randn(0, 5, 24, dtype=dt),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", list(INPUTS))
def test_chunked_linear_equals_f_linear_of_the_whole_perturbed_weight(dtype, bias, shape):
    target, draw, j, b = _linear_draw(dtype, bias)
    try:
        # what the in-place probe multiplies: the weight, a parameter (requires grad)
        whole = draw.row_block(j, 0, 600).requires_grad_()
        bias_value = None if b is None else draw.wholes([b])[0]
        torch.manual_seed(3)
        x = INPUTS[shape](dtype)
        with torch.no_grad():
            expected = F.linear(x, whole, bias_value)
            actual = draw.linear(x, j, bias_value)
        assert actual.shape == expected.shape and actual.is_contiguous()
        assert_bits_equal(actual, expected, f"{shape} input")
    finally:
        target.hold(None)


def test_the_direct_path_is_taken_where_it_applies():
    """_direct_gemm: the GEMMs write the output where F.linear's CPU path is one mm / addmm (the
    bias fused, or added after the product of a folded non-contiguous input), not elsewhere."""
    w = torch.nn.Parameter(torch.zeros(300, 24))
    b = torch.zeros(300)
    plan = dense_probe._direct_gemm
    flat, fused = plan(torch.zeros(3, 5, 24), w, b)
    assert flat.shape == (15, 24) and fused
    assert plan(torch.zeros(2, 3, 5, 24), w, None)[0].shape == (30, 24)
    assert plan(torch.zeros(2, 3, 5, 24), w, b)[1]
    x = torch.zeros(3, 24, 5).transpose(1, 2)
    flat, fused = plan(x, w, b)
    assert flat.shape == (15, 24) and flat.is_contiguous() and not fused
    row = torch.zeros(24, 1).t()  # 2-D: multiplied as it is
    assert plan(row, w, b)[0] is row
    assert plan(torch.zeros(24), w, b) is None
    assert plan(torch.zeros(3, 24, dtype=torch.float64), w, None) is None
    assert plan(torch.zeros(3, 24, requires_grad=True), w, None) is None
    assert plan(torch.zeros(3, 24), w.detach(), None) is None  # matmul folds by other rules
    with torch.no_grad():
        assert plan(torch.zeros(3, 24, requires_grad=True), w, None) is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert plan(torch.zeros(3, 24), w, None) is None


def _direct_draw(k: int, rows: int, dtype: torch.dtype, bias: bool):
    """A virtual target over a rows x k linear weight holding a perturbation, drawn in chunks
    of ROW_ALIGN = 256 rows (rows a multiple of 256: no tail chunk)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(k, rows, bias=bias).to(dtype)
    opt = MeZO(model.named_parameters(), eps=1e-3, backend="cpu", probe="inplace")
    target = dense_probe.VirtualDenseTarget(opt.spaces[0])
    probes = dense_probe.DenseProbes([target], scratch_elements=1)
    target.hold(SeededNoise((7,), (1e-3,)))
    names = target.space.names
    return (dense_probe._Draw(probes, target), names.index("weight"),
            names.index("bias") if bias else None)


CASES = {
    # a column vector transposed: (1, k) with strides (1, 1); F.linear hands it to mm as is
    "column.t() fp16": (torch.float16, 1000, False,
                        lambda k, dt: torch.randn(k, 1, dtype=dt).t()),
    "column.t() fp16 bias": (torch.float16, 1000, True,
                             lambda k, dt: torch.randn(k, 1, dtype=dt).t()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_direct_gemm_equals_f_linear_on_contiguous_inputs_with_odd_strides(case):
    dtype, k, bias, make = CASES[case]
    draw, j, b = _direct_draw(k, 768, dtype, bias)
    whole = draw.row_block(j, 0, 768).requires_grad_()
    bias_value = None if b is None else draw.wholes([b])[0]
    torch.manual_seed(5)
    x = make(k, dtype)
    assert x.is_contiguous()
    with torch.no_grad():
        expected = F.linear(x, whole, bias_value)
        actual = draw.linear(x, j, bias_value)
    assert_bits_equal(actual, expected, case)


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # the first layer: 600 rows of 256 columns, chunked (256 rows)
    return torch.nn.Sequential(torch.nn.Linear(256, 600), torch.nn.Tanh(), torch.nn.Linear(600, 8))


X = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))


def test_steps_inside_autocast_equal_in_place():
    """The first step (the check) outside autocast, the next ones inside
    torch.autocast("cpu", bfloat16), as docs/dense-probes.md supports."""
    assert_mezo_runs_equal(lambda: _mlp(), squared(X), context=lambda k: torch.autocast(
        "cpu", dtype=torch.bfloat16, enabled=k > 0))


def test_check_inside_autocast_keeps_the_virtual_path():
    """Every step inside autocast: the check passes (out= GEMMs would bypass the autocast)."""
    net = _mlp()
    opt = MeZO(net.parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe="virtual")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt.step(lambda: net(X).float().pow(2).mean())
    assert opt.dense_probe_status.startswith("virtual"), opt.dense_probe_status


def test_direct_gemm_under_vmap_and_forward_ad():
    """F.linear works on functorch-batched and dual (forward-AD) inputs, out= GEMMs do not:
    the chunks are copied there."""
    draw, j, _ = _direct_draw(24, 768, torch.float32, False)
    whole = draw.row_block(j, 0, 768)
    xs = torch.randn(4, 5, 24)
    with torch.no_grad():
        expected = torch.vmap(lambda x: F.linear(x, whole))(xs)
        actual = torch.vmap(lambda x: draw.linear(x, j, None))(xs)
    assert_bits_equal(actual, expected, "vmap")
    with fwAD.dual_level():
        x = fwAD.make_dual(torch.randn(5, 24), torch.randn(5, 24))
        actual = fwAD.unpack_dual(draw.linear(x, j, None))
        expected = fwAD.unpack_dual(F.linear(x, whole))
    assert_bits_equal(actual.primal, expected.primal, "primal")
    assert_bits_equal(actual.tangent, expected.tangent, "tangent")


class PerExample(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(256, 600)  # chunked: 256 rows per chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.vmap(lambda item: torch.tanh(self.lin(item)))(x)


def test_a_forward_with_vmap_keeps_the_virtual_path():
    torch.manual_seed(0)
    net = PerExample()
    xs = torch.randn(4, 3, 256, generator=torch.Generator().manual_seed(1))
    opt = MeZO(net.parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe="virtual")
    opt.step(lambda: net(xs).pow(2).mean())
    assert opt.dense_probe_status.startswith("virtual"), opt.dense_probe_status


def test_fp16_row_input_with_unit_strides_keeps_the_virtual_path():
    """A (1, 256) fp16 input with strides (1, 1) (a column vector transposed): F.linear's
    addmm takes it as it is; the direct path's view gives it strides (256, 1), another
    fp16 GEMM (the bits differed for some inputs: seed 2 here)."""
    for seed in range(6):
        torch.manual_seed(0)
        net = torch.nn.Linear(256, 768).half()  # chunked: 256 rows per chunk
        x = torch.randn(256, 1, dtype=torch.float16,
                        generator=torch.Generator().manual_seed(seed)).t()
        opt = MeZO(net.parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe="virtual")
        opt.step(lambda: net(x).float().pow(2).mean())
        assert opt.dense_probe_status.startswith("virtual"), (seed, opt.dense_probe_status)


@pytest.mark.parametrize("rows", [520, 263, 300])
@pytest.mark.parametrize("inputs", [2, 4, 17])
def test_a_short_last_chunk_takes_rows_from_the_one_before(rows, inputs):
    """fp32, 256-row chunks: a last chunk of 8 rows (520) gave other bits than the whole
    F.linear from 4 input rows on; split 256 + 192 + 72 it matches (263: 192 + 71, 300:
    192 + 108), the largest draw still one 256-row chunk."""
    torch.manual_seed(0)
    model = torch.nn.Linear(256, rows)
    opt = MeZO(model.named_parameters(), eps=1e-3, backend="cpu", probe="inplace")
    target = dense_probe.VirtualDenseTarget(opt.spaces[0])
    probes = dense_probe.DenseProbes([target], scratch_elements=1)
    target.hold(SeededNoise((7,), (1e-3,)))
    draw, j = dense_probe._Draw(probes, target), target.space.names.index("weight")
    whole = draw.row_block(j, 0, rows).requires_grad_()
    x = torch.randn(inputs, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_bits_equal(draw.linear(x, j, None), F.linear(x, whole), f"{rows} rows")
        assert_bits_equal(draw.linear(x[None], j, None), F.linear(x[None], whole), "3-D")
    largest = {520: 256, 263: 192, 300: 192}[rows]
    assert probes.draw_elements(model.weight, {"linear"}) == largest * 256
    assert dense_probe._row_chunks(520, 256) == [(0, 256), (256, 448), (448, 520)]
    assert dense_probe._row_chunks(300, 256) == [(0, 192), (192, 300)]
    assert dense_probe._row_chunks(600, 256) == [(0, 256), (256, 512), (512, 600)]
    assert dense_probe._row_chunks(256, 256) == [(0, 256)]
    assert dense_probe._row_chunks(0, 256) == []


class TokenMixer(torch.nn.Module):
    """MLP-Mixer's token mixing: a Linear over the sequence, fed a transposed (non-contiguous)
    3-D input, chunked (600 rows of 256-row chunks)."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = torch.nn.Linear(9, 600)
        self.out = torch.nn.Linear(600, 4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(h.transpose(1, 2))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_transposed_input_stays_virtual_and_equals_in_place(dtype):
    """F.linear folds a non-contiguous input of a parameter (which requires grad) to rows and
    adds the bias after the product; the chunks do the same (the copy of no-grad chunks ran
    bmm instead, other fp16 bits: the check fell back to in place)."""
    h = torch.randn(3, 9, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert_mezo_runs_equal(lambda: TokenMixer().to(dtype), squared(h))


class SeqFirst(torch.nn.Module):
    """A seq-first model (s, b, k) transposed to batch-first for its bias-free projection:
    with b = 1 the input is contiguous (is_contiguous ignores the size-1 dim's stride) but
    matmul's fold test (strides of the leading dims) fails for a weight without grad."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.transpose(0, 1)  # (1, s, 8), strides (8, 8, 1)
        assert x.is_contiguous()
        return self.proj(x)


def test_single_chunk_contiguous_input_with_odd_size1_stride_equals_in_place():
    """A (1, s, k) input with strides (k, k, 1): contiguous to is_contiguous, not to matmul's
    fold test, which folds the parameter's (requires grad) input anyway: the virtual GEMM
    multiplies the 2-D rows too (a no-grad weight ran bmm: other fp32 bits after the check)."""
    h = torch.randn(3, 1, 8, generator=torch.Generator().manual_seed(3))
    assert_mezo_runs_equal(SeqFirst, squared(h))


class TwoLinears(torch.nn.Module):
    """Two 8 x 8 linears: the first under torch.inference_mode (a frozen-style prefix), or fed
    a 1-D row of the input (the copied chunks' path)."""

    def __init__(self, inference_prefix: bool = False, row: bool = False) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.inference_prefix, self.row = inference_prefix, row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row:
            x = x[0]
        with torch.inference_mode() if self.inference_prefix else contextlib.nullcontext():
            h = self.a(x)
        return self.b(h)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_chunk_buffer_made_in_inference_mode_is_reused_outside(backend):
    """The probe's chunk buffer is first drawn inside torch.inference_mode, then reused
    outside: a normal tensor (an inference tensor may not be written outside the mode)."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    assert_mezo_runs_equal(lambda: TwoLinears(inference_prefix=True), squared(x), backend=backend)


def test_step_under_inference_mode_with_1d_input():
    """A whole step under torch.inference_mode, 1-D inputs (the copied chunks, whose
    requires_grad mirrors the parameter's): nothing raises, the bits are the in-place ones."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    assert_mezo_runs_equal(lambda: TwoLinears(row=True), squared(x), steps=2,
                           context=lambda k: torch.inference_mode())


class Block(torch.nn.Module):
    """A pre-norm MLP block that makes a dozen torch calls per forward (above
    MIN_CALLS_OUTSIDE_MODE); `borrow`, when set, is a parameter of another module it also
    reads (a cross-block read)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)
        self.borrow: torch.nn.Parameter | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)
        x = self.up(x).view(*x.shape[:-1], 2, -1).transpose(-1, -2).reshape(*x.shape[:-1], -1)
        x = F.gelu(x) * 0.5 + torch.tanh(x) * 0.5
        x = self.down(x)
        if self.borrow is not None:
            x = x + F.linear(x, self.borrow[:, : x.shape[-1]])[..., : x.shape[-1]]
        return h + x.clamp(-10, 10)


class Stack(torch.nn.Module):
    def __init__(self, vocab: int = 64, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(depth))
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def stack(dtype: torch.dtype = torch.bfloat16, seed: int = 0, borrow: bool = False) -> Stack:
    torch.manual_seed(seed)
    model = Stack()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    if borrow:  # block 2 also reads block 0's up-projection (not registered a second time)
        object.__setattr__(model.blocks[2], "borrow", model.blocks[0].up.weight)
    return model.to(dtype)


IDS = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))


def stack_closure(model: torch.nn.Module):
    def closure():
        logits = model(IDS[:, :-1]).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))
    return closure


def lezo(model: Stack, probe: str, **kw) -> LeZO:
    return LeZO(model.named_parameters(), layers=list(model.blocks), n_active=1, lr=1e-2,
                eps=1e-3, weight_decay=0.1, backend="cpu", probe=probe, **kw)


class Counting(torch.overrides.TorchFunctionMode):
    """Counts the torch calls made while the blocks run (a user's own mode)."""

    def __init__(self, model: Stack) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def count_mode_calls(monkeypatch) -> list:
    """The calls the probes' mode handles (func names), recorded."""
    seen = []
    original = dense_probe._ProbeMode.__torch_function__

    def spy(self, func, types, args=(), kwargs=None):
        seen.append(getattr(func, "__name__", repr(func)))
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(dense_probe._ProbeMode, "__torch_function__", spy)
    return seen


def steps_equal_in_place(model_kw: dict, steps: int = 5, **opt_kw) -> tuple:
    """LeZO steps with virtual probes on one model and in place on its twin: the losses and
    weights equal bit for bit. Returns (optimizer, model) of the virtual run."""
    nets = {probe: stack(**model_kw) for probe in ("inplace", "virtual")}
    opts = {probe: lezo(net, probe, **opt_kw) for probe, net in nets.items()}
    for k in range(steps):
        losses = {p: opts[p].step(stack_closure(nets[p])) for p in nets}
        assert_bits_equal(losses["virtual"], losses["inplace"], f"loss of step {k}")
    assert_same(snapshot(nets["virtual"]), snapshot(nets["inplace"]), "weights")
    assert opts["virtual"].dense_probe_status == "virtual (27 of 27 parameters)"
    return opts["virtual"], nets["virtual"]


def test_lezo_leaves_the_mode_off_in_the_unselected_blocks(monkeypatch):
    seen = count_mode_calls(monkeypatch)
    opt, model = steps_equal_in_place({})
    scope = opt._probes.scope
    assert scope is not None
    blocks = list(model.blocks)
    # a block is left out whenever none of its parameters is perturbed, never otherwise
    block_of = {id(p): b for b, block in enumerate(blocks) for p in block.parameters()}
    outside = scope.outside({id(p) for p in model.blocks[1].parameters()})
    assert outside == [blocks[0], blocks[2], blocks[3]]
    assert all(id(p) in block_of for b in outside for p in b.parameters())
    # a later step: the mode handles the calls of the selected block only (plus the
    # embedding's, the head's and the loss's), about a quarter of the blocks' calls
    seen.clear()
    opt.step(stack_closure(model))
    with_mode = len(seen)
    seen.clear()
    opt._probes.scope = None
    opt.step(stack_closure(model))
    assert with_mode < 0.6 * len(seen), (with_mode, len(seen))
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in blocks)  # removed


def test_mezo_leaves_nothing_out_and_runs_no_extra_forward():
    """Every block reads a perturbed parameter in every MeZO probe: no scope, and the first
    step evaluates the closure three times (in place, virtual, -eps), not four."""
    model = stack()
    opt = MeZO(model.named_parameters(), lr=1e-2, eps=1e-3, backend="cpu", probe="virtual")
    calls = []
    closure = stack_closure(model)
    opt.step(lambda: calls.append(1) or closure())
    assert len(calls) == 3 and opt._probes.scope is None


def test_a_cross_block_read_keeps_the_mode_on_in_the_reading_block():
    """Block 2 reads block 0's weight: with block 0 selected block 2 is not left out (its read
    sees the perturbation), and the steps equal the in-place ones."""
    opt, model = steps_equal_in_place({"borrow": True}, steps=8)
    blocks = list(model.blocks)
    outside = opt._probes.scope.outside({id(p) for p in blocks[0].parameters()})
    assert blocks[2] not in outside and blocks[0] not in outside
    assert blocks[1] in outside and blocks[3] in outside


def test_user_hooks_on_a_left_out_block():
    """A user's forward hook on a block runs after the probe's hook put the mode back (its read
    of the head's weight, perturbed every step, is seen); a user's pre-hook that reads a
    parameter makes the block's record read it."""
    def add_head_norm(module, args, output):
        return output + module.owner.head.weight.float().norm().to(output.dtype) * 1e-2

    def scale_by_embedding(module, args):
        return (args[0] * (1 + module.owner.embed.weight[0, 0]),)

    nets = {probe: stack(torch.float32) for probe in ("inplace", "virtual")}
    for net in nets.values():
        for block in net.blocks:
            object.__setattr__(block, "owner", net)
        net.blocks[1].register_forward_hook(add_head_norm)
        net.blocks[3].register_forward_pre_hook(scale_by_embedding)
    opts = {p: lezo(net, p) for p, net in nets.items()}
    for k in range(6):
        losses = {p: opts[p].step(stack_closure(nets[p])) for p in nets}
        assert_bits_equal(losses["virtual"], losses["inplace"], f"loss of step {k}")
    assert_same(snapshot(nets["virtual"]), snapshot(nets["inplace"]), "weights")
    scope = opts["virtual"]._probes.scope
    blocks = list(nets["virtual"].blocks)
    assert blocks[1] in scope.outside({id(nets["virtual"].head.weight)})
    assert blocks[3] not in scope.outside({id(nets["virtual"].embed.weight)})


def test_a_users_mode_still_sees_every_call():
    """A user's mode around the steps sees the calls of the left-out blocks too (only the
    probes' own mode is taken off), and the stack is as it was after each step."""
    model = stack()
    opt = lezo(model, "virtual")
    closure = stack_closure(model)
    opt.step(closure)
    assert opt._probes.scope is not None
    plain = Counting(model)
    with plain, torch.no_grad():
        closure()
    with Counting(model) as user:
        opt.step(closure)
        assert torch._C._len_torch_function_stack() == 1
    assert user.calls >= 2 * plain.calls  # two probes' forwards, every call seen
    assert torch._C._len_torch_function_stack() == 0


def test_a_mode_pushed_inside_a_block_keeps_the_stack_consistent():
    """A block whose forward runs under a mode of its own: the probes' mode is below it and
    stays on (nothing is popped out of order); steps equal the in-place ones."""
    class Quiet(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Wrapped(torch.nn.Module):
        def __init__(self, block: torch.nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, h):
            with Quiet():
                return self.block(h)

    nets = {probe: stack() for probe in ("inplace", "virtual")}
    for net in nets.values():
        net.blocks[2] = Wrapped(net.blocks[2])
    opts = {p: LeZO(n.named_parameters(), layers=list(n.blocks), n_active=1, lr=1e-2,
                    eps=1e-3, backend="cpu", probe=p) for p, n in nets.items()}
    for k in range(6):
        losses = {p: opts[p].step(stack_closure(nets[p])) for p in nets}
        assert_bits_equal(losses["virtual"], losses["inplace"], f"loss of step {k}")
        assert torch._C._len_torch_function_stack() == 0
    assert_same(snapshot(nets["virtual"]), snapshot(nets["inplace"]), "weights")


@pytest.mark.parametrize("interrupt", [False, True])
def test_a_failure_inside_a_left_out_block_leaves_nothing_behind(interrupt):
    """An exception (or a KeyboardInterrupt, which skips always-called hooks) raised inside a
    block while the mode is off: the step fails, the weights are bit-identical, no hook is
    left on any module and the torch-function stack is empty; the next step runs."""
    model = stack()
    opt = lezo(model, "virtual")
    closure = stack_closure(model)
    opt.step(closure)
    assert opt._probes.scope is not None
    error = KeyboardInterrupt if interrupt else RuntimeError
    state = {"armed": False}

    def fail(module, args):  # runs after the probe's pre-hook, with the mode off
        if state["armed"] and not torch._C._is_torch_function_mode_enabled():
            raise error("inside a left-out block")

    for block in model.blocks:
        block.register_forward_pre_hook(fail)
    state["armed"] = True
    with pytest.raises(error):
        for _ in range(4):  # every step leaves some block out: the first fails
            before = snapshot(model)
            opt.step(closure)
    assert_same(snapshot(model), before, "weights after the failed step")
    assert torch._C._len_torch_function_stack() == 0
    for block in model.blocks:
        assert list(block._forward_pre_hooks.values()) == [fail] and not block._forward_hooks
    state["armed"] = False
    opt.step(closure)


def test_an_interrupt_in_a_step_with_left_out_blocks_leaves_the_weights():
    model = stack()
    opt = lezo(model, "virtual")
    closure = stack_closure(model)
    opt.step(closure)
    assert opt._probes.scope is not None
    for fail_at in (1, 2):
        assert_interrupted_step_leaves_weights(opt.step, model, closure, fail_at, "LeZO")
        assert torch._C._len_torch_function_stack() == 0


def test_the_check_keeps_the_mode_on_where_leaving_it_off_fails(monkeypatch):
    """The first step's probe with the mode left off raises: the virtual probes are kept with
    the mode on everywhere (no scope), and the steps still equal the in-place ones."""
    original = dense_probe._Suspension._enter
    calls = []

    def enter(self, module, args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("no")
        return original(self, module, args)

    monkeypatch.setattr(dense_probe._Suspension, "_enter", enter)
    opt, _ = steps_equal_in_place({}, steps=3)
    assert calls and opt._probes.scope is None


def test_the_environment_can_keep_the_mode_on_everywhere(monkeypatch):
    """ZOKERNELS_PROBE_SCOPE=0: no scope, no extra evaluation, the same steps."""
    monkeypatch.setenv(dense_probe.SCOPE_ENV, "0")
    model = stack()
    opt = lezo(model, "virtual")
    calls = []
    closure = stack_closure(model)
    opt.step(lambda: calls.append(1) or closure())
    assert len(calls) == 4 and opt._probes.scope is None  # in place, every layer, virtual, -eps
    monkeypatch.setenv(dense_probe.SCOPE_ENV, "1")
    model = stack()
    opt = lezo(model, "virtual")
    closure = stack_closure(model)
    calls.clear()
    opt.step(lambda: calls.append(1) or closure())
    assert len(calls) == 5 and opt._probes.scope is not None


def test_the_benchmark_runs_and_its_ways_agree(tmp_path):
    """benchmarks/dense_probe_calls.py on the tiny model: every virtual way ends with the same
    bits, LeZO leaves the mode off somewhere, and the JSON has a row per configuration."""
    import json

    from helpers import load_benchmark

    out = tmp_path / "calls.json"
    bench = load_benchmark("dense_probe_calls")
    assert bench.main(["--model", "tiny", "--dtype", "float32", "--optimizer", "mezo,lezo",
                       "--variants", "generic,previous", "--repeats", "1",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["optimizer"] for r in rows] == ["mezo", "lezo"]
    assert all(r["same_bits"] and r["status"].startswith("virtual") for r in rows)
    assert rows[1]["mode_left_off"] and all(r["current_page_faults"] >= 0 for r in rows)
    assert bench.main(["--model", "tiny", "--dtype", "bfloat16", "--optimizer", "lezo",
                       "--variants", "previous", "--repeats", "1", "--forwards",
                       "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["mode_left_off"] and "current_saves_vs_previous_ms" in row
