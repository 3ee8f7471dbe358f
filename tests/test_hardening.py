"""Hostile input (issue 18): tensors without real storage, overlapping views, bad state dicts,
bad trajectories. Every refusal is a clear exception raised before anything is written.

Inputs that used to crash the interpreter are tried in a child process: a crash there fails
the tests instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import zokernels
from helpers import cli_runner
from zokernels import ParameterSpace, lowrank_perturb_, perturb_

PACKAGE_PARENT = str(pathlib.Path(zokernels.__file__).resolve().parents[1])

# Each case runs in the child and reports the exception it raised (or "no error"), and whether
# the tensor it wrote to kept its bits.
_CHILD = textwrap.dedent(r"""
    import json, sys, warnings
    import torch
    import torch.distributed as dist
    from zokernels import ParameterSpace, lowrank_perturb_, perturb_

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.two_tensor import TwoTensor

    mesh = init_device_mesh("cpu", (1,))

    def make(kind):
        if kind == "dtensor":
            return distribute_tensor(torch.zeros(4, 4), mesh, [Shard(0)])
        if kind == "fake":
            with FakeTensorMode():
                return torch.zeros(4, 4)
        if kind == "twotensor":
            return TwoTensor(torch.zeros(4, 4), torch.zeros(4, 4))
        if kind == "functional":
            return torch._to_functional_tensor(torch.zeros(4, 4))
        if kind == "nested":
            return torch.nested.nested_tensor([torch.zeros(4), torch.zeros(4), torch.zeros(4),
                                               torch.zeros(4)], layout=torch.strided)
        if kind == "jagged":
            return torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)],
                                              layout=torch.jagged)
        if kind == "shrunk":
            t = torch.zeros(4096, 4)
            t.untyped_storage().resize_(64)
            return t
        raise AssertionError(kind)

    def ops(kind, backend):
        yield "perturb_", lambda t: perturb_(t, 1, [1.0], backend=backend)
        yield "lowrank_perturb_", lambda t: lowrank_perturb_(
            t, [torch.ones(t.shape[0], 1)], [torch.ones(t.shape[1], 1)], torch.ones(1),
            backend=backend)
        yield "ParameterSpace", lambda t: ParameterSpace([t], backend=backend).perturb(1, 1.0)

    results = {}
    for kind in ("dtensor", "fake", "twotensor", "functional", "nested", "jagged", "shrunk"):
        for backend in ("auto", "torch"):
            for op, call in ops(kind, backend):
                if op == "lowrank_perturb_" and kind in ("nested", "jagged"):
                    continue  # no 2-D shape to build factors for
                try:
                    call(make(kind))
                    outcome = "no error"
                except Exception as exc:
                    outcome = type(exc).__name__ + ": " + str(exc)
                results[f"{kind}-{op}-{backend}"] = outcome

    # a registered parameter whose storage shrinks after registration
    t = torch.zeros(4096, 4)
    space = ParameterSpace([t])
    space.perturb(1, 1.0)
    t.untyped_storage().resize_(64)
    try:
        space.perturb(2, 1.0)
        results["shrunk-after-registration"] = "no error"
    except Exception as exc:
        results["shrunk-after-registration"] = type(exc).__name__ + ": " + str(exc)
    print("RESULTS " + json.dumps(results))
""")


@pytest.fixture(scope="module")
def child_results(tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("hostile")
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT, OMP_NUM_THREADS="1")
    # no timeout: a slow machine must not fail this (a hang would show as a hung test run)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(directory / "store")],
                          capture_output=True, text=True, env=env, cwd=directory)
    assert proc.returncode == 0, (f"the child died (rc {proc.returncode}): a hostile tensor "
                                  f"crashed the interpreter\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


NO_STORAGE = ["dtensor", "fake", "twotensor", "functional", "nested", "jagged"]


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("op", ["perturb_", "lowrank_perturb_", "ParameterSpace"])
@pytest.mark.parametrize("kind", NO_STORAGE)
def test_tensor_without_real_storage_is_refused(child_results, kind, op, backend):
    """Items 1, 2: DTensor, FakeTensor, TwoTensor, functional and nested tensors -> TypeError
    naming the argument (they used to SIGSEGV in the cpu kernels or be written over a flat
    buffer)."""
    if op == "lowrank_perturb_" and kind in ("nested", "jagged"):
        pytest.skip("no 2-D shape")
    outcome = child_results[f"{kind}-{op}-{backend}"]
    if kind == "dtensor" and op == "ParameterSpace":
        assert outcome == "no error"  # ParameterSpace writes a DTensor's local shard
        return
    argument = {"perturb_": "tensors[0]", "lowrank_perturb_": "weights[0]",
                "ParameterSpace": "params[0]"}[op]
    assert outcome.startswith("TypeError: "), outcome
    assert argument in outcome, outcome
    if kind == "dtensor":
        assert "DTensor" in outcome


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("op", ["perturb_", "lowrank_perturb_", "ParameterSpace"])
def test_storage_smaller_than_view_is_refused(child_results, op, backend):
    """Item 3: a storage resized below what the view addresses -> ValueError, nothing written."""
    outcome = child_results[f"shrunk-{op}-{backend}"]
    assert outcome.startswith("ValueError: ") and "storage" in outcome, outcome


def test_storage_shrunk_after_registration_is_refused(child_results):
    outcome = child_results["shrunk-after-registration"]
    assert outcome.startswith("ValueError: ") and "storage" in outcome, outcome


# -- item 5: internal overlap --------------------------------------------------------------------

def _overlapping() -> tuple[torch.Tensor, torch.Tensor]:
    base = torch.arange(16, dtype=torch.float32)
    return base, base.as_strided((4, 4), (1, 1))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_internal_overlap_refused_by_perturb(backend):
    base, view = _overlapping()
    before = base.clone()
    with pytest.raises(ValueError, match=r"tensors\[0\].*overlap"):
        perturb_(view, 1, [1.0], backend=backend)
    assert torch.equal(base, before)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_internal_overlap_refused_by_lowrank(backend):
    base, view = _overlapping()
    before = base.clone()
    with pytest.raises(ValueError, match=r"weights\[0\].*overlap"):
        lowrank_perturb_([view], [torch.ones(4, 1)], [torch.ones(4, 1)], torch.ones(1),
                         backend=backend)
    assert torch.equal(base, before)


def test_internal_overlap_refused_by_parameter_space():
    base, view = _overlapping()
    with pytest.raises(ValueError, match=r"params\[0\].*overlap"):
        ParameterSpace([view])


@pytest.mark.parametrize("make", [
    lambda x: x.view(8, 8)[:, ::2],
    lambda x: x.view(8, 8).t(),
    lambda x: x.view(2, 4, 8).permute(2, 0, 1),
    lambda x: x.view(8, 8)[1:7, 2:5],
    lambda x: x.view(1, 4, 4, 4).contiguous(memory_format=torch.channels_last),
    lambda x: x.as_strided((3, 5), (20, 3)),
], ids=["step-slice", "transpose", "permute", "box", "channels-last", "as-strided-disjoint"])
def test_non_overlapping_views_are_still_accepted(make):
    """The overlap proof accepts every ordinary view (same result as on a contiguous copy)."""
    base = torch.randn(64)
    view = make(base)
    expected = view.clone()
    perturb_(expected, 7, [0.5])
    perturb_(view, 7, [0.5])
    assert torch.equal(view, expected)


# -- CLI (items 4, 15): one-line errors, exit 2, before any work ---------------------------------

@pytest.fixture
def bench(capsys, monkeypatch):
    """cli.main(argv) -> (status, stdout, stderr), with the benchmark itself forbidden: a refusal
    must come before any work. The thread count is restored afterwards."""
    return cli_runner(capsys, monkeypatch, forbid_work=True)


def _assert_usage_error(result, *needles):
    status, out, err = result
    assert status == 2, (status, err)
    assert "Traceback" not in err and not out, err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


_THREADS_CHILD = textwrap.dedent(r"""
    import contextlib, io, json
    from zokernels.bench import cli

    statuses = {}
    for command in ([], ["ops"], ["step"], ["lora"]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                status = cli.main(["--threads", "100000", *command])
            except SystemExit as exc:
                status = exc.code
        statuses[" ".join(command) or "quick"] = [status, err.getvalue()]
    print("RESULTS " + json.dumps(statuses))
""")


def test_cli_threads_bounded(tmp_path):
    """Item 4: --threads 100000 used to SIGSEGV inside torch.set_num_threads (in a child: a crash
    fails this test instead of killing pytest)."""
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _THREADS_CHILD], capture_output=True,
                          text=True, env=env, cwd=tmp_path)  # not the checkout: the package
    assert proc.returncode == 0, f"the child died (rc {proc.returncode})\n{proc.stderr[-3000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    for command, (status, err) in json.loads(line[len("RESULTS "):]).items():
        assert status == 2 and "--threads" in err and len(err.strip().splitlines()) == 1, \
            (command, status, err)


@pytest.mark.parametrize("command", [[], ["ops"], ["step"], ["lora"]],
                         ids=["quick", "ops", "step", "lora"])
def test_cli_threads_zero(bench, command):
    _assert_usage_error(bench("--threads", "0", *command), "--threads")


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_cli_max_gb_must_be_finite_positive(bench, value):
    _assert_usage_error(bench("ops", "--shape-set", "tiny", "--max-gb", value), "--max-gb")


@pytest.mark.parametrize("command", [["ops", "--shape-set", "tiny"], ["step"], ["lora"]],
                         ids=["ops", "step", "lora"])
def test_cli_json_at_a_directory_or_under_a_file(bench, tmp_path, command):
    _assert_usage_error(bench("--json", str(tmp_path), *command), "--json", "directory")
    a_file = tmp_path / "file"
    a_file.write_text("")
    _assert_usage_error(bench("--json", str(a_file / "out.json"), *command), "--json",
                        "not a directory")
