"""Comparison helpers that say which elements differ and by how much."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import zokernels
from zokernels.backends.torch.selector_log import BLOCK, block_check, n_blocks, row_header

# Wall-clock bounds of tests that wait on other processes. They only turn a hang into a failure,
# so they are generous: a full run on a loaded 2-core machine can stretch a few-second child
# process or a peer's step by minutes, and that must not fail a test.
SUBPROCESS_TIMEOUT = 1800  # seconds a child interpreter may run
COLLECTIVE_TIMEOUT = 600  # seconds a gloo collective waits for its peer

MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
SMALLEST_SPACING = {torch.float32: 2.0 ** -149, torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |values| (float64), never below the subnormal spacing."""
    _, exponent = torch.frexp(values.to(torch.float64).abs())
    spacing = torch.pow(2.0, (exponent - 1 - MANTISSA_BITS[dtype]).to(torch.float64))
    return torch.clamp_min(spacing, SMALLEST_SPACING[dtype])


def _report(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, what: str) -> str:
    positions = bad.reshape(-1).nonzero().reshape(-1)
    a, e = actual.reshape(-1), expected.reshape(-1)
    lines = [f"{what}: {positions.numel()} of {a.numel()} elements differ; first ones:"]
    for p in positions[:8].tolist():
        lines.append(f"  [{p}] actual={a[p].item()!r} expected={e[p].item()!r} "
                     f"diff={(a[p].double() - e[p].double()).item():.3g}")
    return "\n".join(lines)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensors") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.dtype.is_floating_point:
        bits = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
        a, e = a.view(bits), e.view(bits)
    bad = a != e
    assert not bad.any(), _report(actual.cpu(), expected.cpu(), bad, what)


def snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                what: str) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_bits_equal(actual[name], expected[name], what=f"{what}: {name}")


def assert_interrupted_step_leaves_weights(step, net: torch.nn.Module, closure,
                                           fail_at: int, what: str) -> None:
    """`step(failing)` where the closure raises KeyboardInterrupt at its call number `fail_at`:
    the interrupt propagates and every weight of `net` is bit-identical to before the step."""
    before = snapshot(net)
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return closure()

    with pytest.raises(KeyboardInterrupt):
        step(failing)
    assert_same(snapshot(net), before, f"{what} failed at call {fail_at}")


def assert_states_equal(a, b, path: str = "state") -> None:
    """Deep equality of state_dicts (tensors bit for bit)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_states_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert_bits_equal(a, b, what=path)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float | torch.Tensor,
                 ulps: float = 0.0, dtype: torch.dtype | None = None, what: str = "tensors") -> None:
    """|actual - expected| <= atol + ulps * ulp(expected) elementwise (float64 arithmetic)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a = actual.detach().cpu().to(torch.float64)
    e = expected.detach().cpu().to(torch.float64)
    bound = atol + ulps * ulp(torch.maximum(a.abs(), e.abs()), dtype or expected.dtype)
    bad = ~((a - e).abs() <= bound) & ~(a.isnan() & e.isnan()) & ~(a == e)  # a == e: equal infinities
    assert not bad.any(), _report(a, e, bad, what)


def backend_device_cases() -> list[tuple[str, str]]:
    """(fast backend, device) pairs to test against the torch reference on CPU."""
    available = zokernels.available_backends()
    cases = []
    if "cpu" in available:
        cases.append(("cpu", "cpu"))
    if "triton" in available:
        cases.append(("triton", "cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available():
        cases.append(("torch", "cuda"))
    return cases


BACKEND_CASES = backend_device_cases()
ALL_BACKEND_CASES = [("torch", "cpu")] + BACKEND_CASES


def interpreted(backend: str, device: str) -> bool:
    """Interpreted Triton is slow: such cases use smaller tensors."""
    return backend == "triton" and device == "cpu"


def assert_same_in_both_simd_modes(script: str, tmp_path: pathlib.Path,
                                   timeout: int = SUBPROCESS_TIMEOUT) -> None:
    """Run `script` (it saves a dict with "simd" = build_info()["simd"] and tensors to argv[1])
    once with the CPU extension's default SIMD path and once with ZOKERNELS_CPU_SIMD=generic, in
    fresh interpreters; every tensor must be bit-identical. Skips where only generic exists."""
    package_parent = str(pathlib.Path(zokernels.__file__).resolve().parents[1])
    results = {}
    for simd in ("", "generic"):
        path = tmp_path / f"out{simd}.pt"
        env = dict(os.environ, ZOKERNELS_CPU_SIMD=simd, PYTHONPATH=package_parent)
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env,
                       cwd=tmp_path, timeout=timeout)
        results[simd] = torch.load(path)
    assert results["generic"]["simd"] == "generic"
    if results[""]["simd"] == "generic":
        pytest.skip("no SIMD path on this machine")
    for name, value in results[""].items():
        if name != "simd":
            assert_bits_equal(value, results["generic"][name], f"{name}: simd vs generic")


def cli_runner(capsys, monkeypatch=None, *, forbid_work: bool = False):
    """A function calling zokernels-bench's cli.main(argv) -> (exit status, stdout, stderr):
    argparse's exits are caught and the thread count (--threads) is restored afterwards. With
    `forbid_work` (needs monkeypatch) the benchmark itself raises: a refusal must come before
    any work."""
    from zokernels.bench import cli

    if forbid_work:
        def no_work(*args, **kwargs):
            raise AssertionError("the benchmark ran before the bad argument was refused")

        for name in ("execute", "run_step_bench", "run_lora_bench"):
            monkeypatch.setattr(cli, name, no_work)
    threads = torch.get_num_threads()

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            status = cli.main(list(argv))
        except SystemExit as exc:
            status = exc.code
        finally:
            torch.set_num_threads(threads)
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def load_benchmark(name: str):
    """benchmarks/<name>.py imported as a module (the scripts are not a package)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def two_layer_model(seed: int = 0) -> torch.nn.Module:
    """A 6 -> 5 -> 3 stack of two Linear layers, seeded (the hardening tests' model)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))


class MixedDtypeNet(torch.nn.Module):
    """A float32 block, a bfloat16 block and a float16 norm: three dtypes in one module, so a
    group of its parameters takes several kernel calls and targets per pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(6, 8)
        self.second = torch.nn.Linear(8, 4).to(torch.bfloat16)
        self.norm = torch.nn.LayerNorm(4).to(torch.float16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.first(x)).to(torch.bfloat16)
        out = self.second(hidden).to(torch.float16)
        return torch.nn.functional.layer_norm(out.float(), (4,), self.norm.weight.float(),
                                              self.norm.bias.float())


def square_loss(net: torch.nn.Module):
    """A closure: the mean square of net's output on a fixed 2 x 6 batch."""
    x = torch.linspace(-1, 1, 12).reshape(2, 6)
    return lambda: net(x).pow(2).mean()


def finish_process_group() -> None:
    """End a 2-process gloo worker: a barrier (both ranks past their last collective, results
    saved), then destroy the group. A rank that tears down while its peer still works can abort
    in gloo's destructors (SIGABRT, seen on a loaded 2-core machine)."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def record_perturb_launches(monkeypatch, *flags: str) -> list:
    """The Triton perturb kernel's launches from now on: per launch, the value of the one
    constexpr in `flags`, or the tuple of several (e.g. "MAPPED", "SHIFTED"), in order."""
    from zokernels.backends.triton import perturb as perturb_module

    launched = []
    kernel = perturb_module._perturb_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                values = tuple(kwargs[f] for f in flags)
                launched.append(values[0] if len(values) == 1 else values)
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(perturb_module, "_perturb_kernel", Recorder())
    return launched


def selector_checks(tensors) -> list[int]:
    """block_check (zokernels/backends/torch/selector_log.py) of each selector-log block of
    `tensors` (flat, 1024 elements per block, the tensors' blocks one after the other): one per
    row of a log of a pass that stored them."""
    checks = []
    for t in tensors:
        flat = t.detach().cpu().reshape(-1)
        checks += [block_check(flat[b * BLOCK:(b + 1) * BLOCK])
                   for b in range(n_blocks(flat.numel()))]
    return checks


def selector_pool_offset(header: int) -> int | None:
    """Where a selector-log row's header puts its block's stream in the pool (header <= -2), or
    None: in the row (header >= 0, the check's low 31 bits) or lost (-1)."""
    return -2 - header if header <= -2 else None


def assert_selector_checks(log, tensors, what: str) -> None:
    """Each block's check in `log` is that of the block as `tensors` hold it (what the pass
    stored): the header of a stream in its row holds the check's low 31 bits, a spilled block's
    word 1 all of it; lost blocks (-1) hold none."""
    for row, check in enumerate(selector_checks(tensors)):
        header, word = int(log.regions[row, 0]), int(log.regions[row, 1])
        if header >= 0:
            assert header == row_header(check), f"{what}: the check in row {row}'s header"
        elif header <= -2:
            assert word == check, f"{what}: the check in row {row}'s word 1"
