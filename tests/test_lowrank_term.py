"""The Linear term of TeZO's virtual probes, out += ((x V) diag(c)) U^T: the C++ kernel
(csrc/lowrank_term.cpp) and the torch reference against the exact value, and which one the probes'
hook takes."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from zokernels import lowrank_probe
from zokernels.backends.cpu import lowrank_linear_term_cpu
from zokernels.backends.torch import lowrank_linear_term_torch
from zokernels.optim import TeZO

from helpers import assert_bits_equal

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, n, m, r): whole and partial 4-row blocks and 16-column blocks, r padded to 8, 16, 24, 32
SHAPES = [(0, 3, 5, 2), (1, 1, 1, 1), (3, 5, 17, 3), (4, 16, 16, 8), (7, 33, 40, 9),
          (9, 8, 15, 16), (17, 64, 48, 17), (5, 20, 33, 32)]


def _problem(rows, n, m, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g).to(dtype)
    out = torch.randn(rows, m, generator=g).to(dtype)
    u = torch.randn(m, r, generator=g).to(dtype)
    v = torch.randn(n, r, generator=g).to(dtype)
    coef = torch.randn(r, generator=g)
    return out, x, u, v, coef


def _exact(out, x, u, v, coef):
    """out + term in float64, and the term's size: its sums taken over |terms|."""
    d = torch.float64
    exact = out.to(d) + ((x.to(d) @ v.to(d)) * coef.to(d)) @ u.to(d).t()
    size = ((x.to(d).abs() @ v.to(d).abs()) * coef.to(d).abs()) @ u.to(d).abs().t()
    return exact, size


def _ulp(values, dtype):
    """The spacing of `dtype` at |values| (normal range)."""
    tiny = torch.finfo(dtype).tiny
    exponent = torch.floor(torch.log2(values.abs().clamp_min(tiny)))
    return torch.finfo(dtype).eps * 2.0 ** exponent


def _assert_within(got, out, x, u, v, coef, size_error=0.0):
    """got = out + term computed in float32 (error at most (n + r + 2) 2^-24 of the term's size
    and of |out|), plus `size_error` x size (roundings of partial results), rounded once to
    out's dtype (half an ulp)."""
    exact, size = _exact(out, x, u, v, coef)
    got = got.to(torch.float64)
    error = (out.to(torch.float64).abs() + size) * (x.shape[-1] + u.shape[1] + 2) * 2.0 ** -24
    bound = (error + size_error * size
             + 0.5 * _ulp(torch.maximum(exact.abs(), got.abs()), out.dtype))
    excess = (got - exact).abs() - bound
    worst = int(excess.argmax()) if excess.numel() else 0
    assert excess.numel() == 0 or excess.max() <= 0, (
        f"element {worst}: got {got.flatten()[worst]}, exact {exact.flatten()[worst]}, bound "
        f"{bound.flatten()[worst]}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_rounds_the_float32_value_once(shape, dtype):
    """The C++ kernel: the exact term up to float32 arithmetic, then half an ulp of out's dtype."""
    out, x, u, v, coef = _problem(*shape, dtype)
    got = out.clone()
    lowrank_linear_term_cpu(got, x, u, v, coef)
    _assert_within(got, out, x, u, v, coef)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=str)
def test_reference_is_the_same_formula(shape, dtype):
    """The torch reference computes the same term; it rounds x V and its scaling to out's dtype
    on the way (two relative errors of eps / 2 each on the term's parts, in 16 bits)."""
    out, x, u, v, coef = _problem(*shape, dtype)
    got = out.clone()
    lowrank_linear_term_torch(got, x, u, v, coef)
    _assert_within(got, out, x, u, v, coef,
                   0.0 if dtype == torch.float32 else torch.finfo(dtype).eps)


def test_strided_rows_batched_shapes_and_threads():
    """x with a row stride (a column slice), 3-D out and x, and one or two threads: the same bits
    (a row's term does not depend on how rows are split among threads)."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(2, 40, 600, generator=g)
    x = wide[..., 7:519]  # rows of 512 with a stride of 600
    out = torch.randn(2, 40, 1030, generator=g)
    u, v, coef = torch.randn(1030, 8, generator=g), torch.randn(512, 8, generator=g), torch.randn(8)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            got = out.clone()
            lowrank_linear_term_cpu(got, x, u, v, coef)
            results.append(got)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
    _assert_within(results[0].reshape(80, 1030), out.reshape(80, 1030), x.reshape(80, 512), u, v,
                   coef)


def test_generic_path_within_the_same_bound(tmp_path):
    """ZOKERNELS_CPU_SIMD=generic multiplies, then adds (the AVX2 build fuses them): both are the
    float32 value rounded once, within the bound (not bit for bit)."""
    script = (
        "import sys, torch\n"
        "from zokernels.backends.cpu import build_info, lowrank_linear_term_cpu\n"
        "g = torch.Generator().manual_seed(3)\n"
        "out, x = torch.randn(13, 70, generator=g), torch.randn(13, 45, generator=g)\n"
        "u, v, c = torch.randn(70, 5, generator=g), torch.randn(45, 5, generator=g), "
        "torch.randn(5, generator=g)\n"
        "got = out.clone()\n"
        "lowrank_linear_term_cpu(got, x, u, v, c)\n"
        "torch.save({'simd': build_info()['simd'], 'got': got, 'args': (out, x, u, v, c)}, "
        "sys.argv[1])\n")
    path = tmp_path / "generic.pt"
    # the installed package (its built extension), not a source tree in the working directory
    package_parent = str(pathlib.Path(lowrank_probe.__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=300,
                   cwd=tmp_path, env={**os.environ, "ZOKERNELS_CPU_SIMD": "generic",
                                      "PYTHONPATH": package_parent})
    saved = torch.load(path)
    assert saved["simd"] == "generic"
    _assert_within(saved["got"], *saved["args"])


def test_avx512_path_equals_the_avx2_one(tmp_path):
    """Where the CPU has AVX-512 the Linear term runs 16-lane vectors: the same fused
    multiply-adds in the same order per element as the AVX2 path (ZOKERNELS_CPU_SIMD=avx2), so
    the same bits, in every dtype, at ranks 8..32 and odd sizes."""
    script = (
        "import sys, torch\n"
        "from zokernels.backends.cpu import build_info, lowrank_linear_term_cpu\n"
        "g = torch.Generator().manual_seed(5)\n"
        "saved = {'simd': build_info()['simd']}\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    for rows, n, m, r in ((13, 70, 45, 5), (64, 256, 300, 8), (9, 33, 1030, 32)):\n"
        "        out, x = torch.randn(rows, m, generator=g), torch.randn(rows, n, generator=g)\n"
        "        u, v = torch.randn(m, r, generator=g), torch.randn(n, r, generator=g)\n"
        "        c = torch.randn(r, generator=g)\n"
        "        got = out.to(dtype)\n"
        "        lowrank_linear_term_cpu(got, x.to(dtype), u.to(dtype), v.to(dtype), c)\n"
        "        saved[f'{dtype}-{rows}-{r}'] = got\n"
        "torch.save(saved, sys.argv[1])\n")
    package_parent = str(pathlib.Path(lowrank_probe.__file__).resolve().parents[1])
    results = {}
    for simd in ("", "avx2", "auto"):  # an unknown value means the default
        path = tmp_path / f"term{simd}.pt"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=300,
                       cwd=tmp_path, env={**os.environ, "ZOKERNELS_CPU_SIMD": simd,
                                          "PYTHONPATH": package_parent})
        results[simd] = torch.load(path)
    assert results["auto"]["simd"] == results[""]["simd"]
    if results[""]["simd"] != "avx512" or results["avx2"]["simd"] != "avx2":
        pytest.skip("no AVX-512 on this machine")
    for name, got in results[""].items():
        if name != "simd":
            assert_bits_equal(got, results["avx2"][name], f"{name}: avx512 vs avx2")


@pytest.mark.parametrize("bad, match", [
    ("dtype", "share a float dtype"), ("layout", "contiguous"), ("shape", "do not match"),
    ("rows", "rows"), ("rank", "r <= 32"), ("device", "CPU"), ("3-D u", "2-D"),
    ("empty 3-D factors", "2-D"), ("2-D coef", "1-D"), ("zero columns", "rows")])
def test_kernel_refuses_what_it_cannot_run(bad, match):
    """ValueError, out unchanged, for what the hook never passes (it checks first); factors of
    another rank were read as 2-D (an empty 3-D pair, data_ptr 0, crashed the process)."""
    out, x, u, v, coef = _problem(4, 6, 9, 40 if bad == "rank" else 3, torch.float32)
    if bad == "3-D u":
        u = u.unsqueeze(-1).expand(-1, -1, 2).contiguous()
    elif bad == "empty 3-D factors":
        u, v = torch.empty(9, 3, 0), torch.empty(6, 3, 0)
    elif bad == "2-D coef":
        coef = coef.unsqueeze(0)
    elif bad == "zero columns":  # no columns to add to, but the row counts still differ
        out, u = torch.zeros(5, 0), torch.zeros(0, 3)
    if bad == "dtype":
        x = x.double()
    elif bad == "layout":
        out = out.t().contiguous().t()
    elif bad == "shape":
        coef = coef[:-1]
    elif bad == "rows":
        x = x[:3]
    elif bad == "device":
        u = u.to("meta")
    before = out.clone()
    with pytest.raises(ValueError, match=match):
        lowrank_linear_term_cpu(out, x, u, v, coef)
    assert torch.equal(out, before)


def test_an_output_overlapping_its_input_gets_the_reference_term():
    """out and x views of one buffer (x one row behind out): the kernel writes rows while other
    blocks read x, so it reads a copy; the result is the reference's, to float32 rounding."""
    torch.manual_seed(4)
    buffer = torch.randn(41, 24)
    u, v, coef = torch.randn(24, 3), torch.randn(24, 3), torch.randn(3)
    expected = buffer.clone()
    lowrank_linear_term_torch(expected[1:], expected[:-1].clone(), u, v, coef)
    lowrank_linear_term_cpu(buffer[1:], buffer[:-1], u, v, coef)
    torch.testing.assert_close(buffer, expected, rtol=1e-5, atol=1e-5)


class _Recorder:
    """Counts the calls of each term implementation through the probes' hook."""

    def __init__(self, monkeypatch):
        self.calls = {"cpu": 0, "torch": 0}
        for name, function in (("cpu", lowrank_linear_term_cpu),
                               ("torch", lowrank_linear_term_torch)):
            def counted(*args, name=name, function=function):
                self.calls[name] += 1
                return function(*args)
            monkeypatch.setattr(lowrank_probe, f"lowrank_linear_term_{name}", counted)


def _tezo_losses(backend, rank=4, dtype=torch.float32, steps=3, features=12):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(features, 2 * features), torch.nn.ReLU(),
                                torch.nn.Linear(2 * features, 6)).to(dtype)
    x = torch.randn(5, features).to(dtype)
    opt = TeZO(model.parameters(), lr=1e-2, eps=1e-3, seed=4, rank=rank, backend=backend)
    losses = [float(opt.step(lambda: model(x).float().pow(2).mean())) for _ in range(steps)]
    opt.merge()
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_probes_take_the_kernel_on_cpu(monkeypatch, dtype):
    """backend "auto" / "cpu" on CPU: the hook runs the kernel; backend "torch": the reference.
    The two runs agree to the terms' rounding (float32: 1e-6 relative on the losses)."""
    recorder = _Recorder(monkeypatch)
    native, native_weights = _tezo_losses("auto", dtype=dtype)
    assert recorder.calls["cpu"] > 0 and recorder.calls["torch"] == 0
    recorder.calls.update(cpu=0, torch=0)
    reference, reference_weights = _tezo_losses("torch", dtype=dtype)
    assert recorder.calls["torch"] > 0 and recorder.calls["cpu"] == 0
    rtol = 1e-6 if dtype == torch.float32 else 2e-2
    assert native == pytest.approx(reference, rel=rtol)
    for a, b in zip(native_weights, reference_weights):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)


def test_reference_where_the_kernel_does_not_apply(monkeypatch):
    """Rank above 32, or a forward that autograd records: the torch reference."""
    recorder = _Recorder(monkeypatch)
    _tezo_losses("auto", rank=33, features=40)  # layer 1 at rank 33, layer 2 at min(m, n) = 6
    assert recorder.calls["torch"] > 0 and recorder.calls["cpu"] == recorder.calls["torch"]
    virtual = lowrank_probe.VirtualLowRank([], "auto")
    virtual._native = {}
    out = torch.zeros(2, 3, requires_grad=True) * 1.0
    x = torch.zeros(2, 4)
    with torch.enable_grad():
        assert virtual._linear_term(out, x, 8) is lowrank_probe.lowrank_linear_term_torch
    assert virtual._linear_term(out.detach(), x, 8) is lowrank_probe.lowrank_linear_term_cpu
    assert virtual._linear_term(out.detach().t(), x, 8) is lowrank_probe.lowrank_linear_term_torch
    assert virtual._linear_term(out.detach().to(torch.float64), x, 8) is (
        lowrank_probe.lowrank_linear_term_torch)
    for dtype in (torch.bfloat16, torch.float16):
        assert virtual._linear_term(out.detach().to(dtype), x, 8) is (
            lowrank_probe.lowrank_linear_term_cpu)


def test_linear_term_matches_a_perturbed_layer():
    """The hook's term through F.linear: the layer's output at W + U diag(c) V^T."""
    torch.manual_seed(2)
    layer = torch.nn.Linear(9, 11)
    x = torch.randn(3, 4, 9)
    u, v, coef = torch.randn(11, 3), torch.randn(9, 3), torch.randn(3)
    out = layer(x).detach()
    lowrank_linear_term_cpu(out, x, u, v, coef)
    expected = F.linear(x, layer.weight + (u * coef) @ v.t(), layer.bias)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)
