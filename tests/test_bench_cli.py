"""The zokernels-bench CLI: help, a tiny run with its JSON schema, one-line errors with exit 2.

main() runs in-process (importing torch in a subprocess costs seconds); one test runs
`python -m zokernels.bench.cli --help`, what the console script runs. Runs use the `tiny` shape
set with one repeat, so the whole file takes a few seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import zokernels
from zokernels.bench import cli

PACKAGE_PARENT = str(pathlib.Path(zokernels.__file__).resolve().parents[1])
CUDA = torch.cuda.is_available()
TINY_RUN = ["ops", "--shape-set", "tiny", "--repeats", "1", "--warmup", "0", "--k", "1,2",
            "--rank", "8"]

RESULT_FIELDS = {"op", "backend", "dtype", "dist", "k", "rounding", "rank", "shape_set", "numel",
                 "tensors", "ms", "ms_p20", "ms_p80", "gbps", "pct_copy_bw",
                 "speedup_vs_mezo_loop", "launches_per_call"}
TOP_FIELDS = {"device", "torch", "triton", "zokernels", "timestamp", "command", "threads",
              "results"}


@pytest.fixture
def bench(capsys, monkeypatch):
    """Call cli.main(argv) -> (exit status, stdout, stderr); argparse's exits are caught and the
    thread count (--threads) is restored for the rest of the session."""
    monkeypatch.setenv("ZOKERNELS_BACKEND", "")
    threads = torch.get_num_threads()

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            status = cli.main(list(argv))
        except SystemExit as exc:
            status = exc.code
        finally:
            torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_help(bench):
    status, out, _ = bench("--help")
    assert status == 0 and "usage: zokernels-bench" in out and "{ops,step}" in out


def test_module_help():
    """The console script's entry point, in a fresh interpreter (one: each costs an import)."""
    result = subprocess.run([sys.executable, "-m", "zokernels.bench.cli", "ops", "--help"],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=PACKAGE_PARENT))
    assert result.returncode == 0, result.stderr
    assert "usage: zokernels-bench ops" in result.stdout
    assert "--shape-set" in result.stdout and "--max-gb" in result.stdout


def test_tiny_run_writes_json(bench, tmp_path):
    path = tmp_path / "out" / "bench.json"  # the directory is created
    device = "cuda" if CUDA else "cpu"
    status, out, err = bench(*TINY_RUN, "--device", device, "--threads", "1", "--json", str(path))
    assert status == 0, err
    assert "[1/" in err, "no progress display on stderr"
    assert "perturb_" in out and "mezo-loop" in out, out

    document = json.loads(path.read_text())
    assert TOP_FIELDS <= document.keys()
    assert document["threads"] == 1 or CUDA
    assert document["zokernels"] == zokernels.__version__
    assert document["command"].startswith("zokernels-bench ops")
    rows = document["results"]
    for row in rows:
        assert RESULT_FIELDS <= row.keys(), RESULT_FIELDS - row.keys()
        assert row["shape_set"] == "tiny" and row["dtype"] == "float32"
        assert row["ms_p20"] <= row["ms"] <= row["ms_p80"] and row["gbps"] > 0
    ops = {(r["op"], r["backend"]) for r in rows}
    fused = "triton" if CUDA else "cpu"
    assert {("copy", "baseline"), ("mezo-loop", "baseline"), ("randn-add-loop", "baseline"),
            ("perturb_", fused), ("lowrank_perturb_", fused)} <= ops
    assert ("perturb_", "torch") not in ops, "the torch reference is timed only when named"
    if not CUDA:
        assert ("perturb_", "triton") not in ops, "interpreted triton must not be timed"
    copy = next(r for r in rows if r["op"] == "copy")
    assert copy["pct_copy_bw"] == pytest.approx(100.0)
    mezo = next(r for r in rows if r["op"] == "mezo-loop")
    assert mezo["speedup_vs_mezo_loop"] == pytest.approx(1.0)
    perturbs = [r for r in rows if r["op"] == "perturb_"]
    assert {(r["dist"], r["k"]) for r in perturbs} == {(d, k) for d in ("gaussian", "rademacher")
                                                       for k in (1, 2)}
    assert all(r["rounding"] == "nearest" for r in perturbs), "stochastic is for bf16/fp16 only"
    itemsize = 4
    assert all(r["bytes"] == 2 * itemsize * r["numel"] for r in perturbs)
    lowrank = next(r for r in rows if r["op"] == "lowrank_perturb_")
    assert lowrank["rank"] == 8 and lowrank["numel"] < copy["numel"]
    assert lowrank["bytes"] > 2 * itemsize * lowrank["numel"], "factor bytes are counted"
    if CUDA:
        assert next(r for r in perturbs)["launches_per_call"] == 1


def test_no_baselines_and_bf16(bench, tmp_path):
    path = tmp_path / "bench.json"
    status, _, err = bench("ops", "--shape-set", "tiny", "--dtype", "bf16", "--repeats", "1", "--warmup",
                   "0", "--k", "1", "--dist", "rademacher", "--op", "perturb", "--no-baselines",
                   "--json", str(path))
    assert status == 0, err
    rows = json.loads(path.read_text())["results"]
    assert [r["op"] for r in rows].count("copy") == 1, "the copy reference is always timed"
    assert not any(r["op"] in ("mezo-loop", "randn-add-loop") for r in rows)
    assert all(r["speedup_vs_mezo_loop"] is None for r in rows)
    assert {r["rounding"] for r in rows if r["op"] == "perturb_"} == {"nearest", "stochastic"}
    assert all(r["dtype"] == "bfloat16" for r in rows)


def test_max_gb_skips_with_reason(bench):
    status, out, err = bench(*TINY_RUN, "--max-gb", "0.0001")
    assert status == 1, err
    assert "skipped tiny float32" in out and "--max-gb" in out, out


BAD_ARGUMENTS = [
    (["ops", "--shape-set", "opt-7b"], "unknown shape set 'opt-7b'"),
    (["ops", "--dtype", "float64"], "unknown dtype 'float64'"),
    (["ops", "--device", "tpu"], "unknown device 'tpu'"),
    (["ops", "--backend", "tensorrt"], "unknown value 'tensorrt'"),
    (["ops", "--k", "0"], "--k"),
    (["ops", "--rank", "eight"], "--rank"),
    (["ops", "--repeats", "0"], "--repeats"),
    (["ops", "--no-such-option"], "unrecognized arguments"),
]
if not CUDA:
    BAD_ARGUMENTS += [(["ops", "--device", "cuda"], "CUDA is not available"),
                      (["--device", "cuda"], "CUDA is not available")]
else:
    BAD_ARGUMENTS += [(["ops", "--device", "cuda", "--backend", "cpu"], "CPU tensors only")]


@pytest.mark.parametrize("args, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_argument_exits_2(bench, args, message):
    status, out, err = bench(*args)
    assert status == 2, (status, err)
    assert message in err, err
    assert "Traceback" not in err and not out
    assert len(err.strip().splitlines()) == 1, err


def test_unavailable_backend_exits_2(bench, monkeypatch):
    """A backend missing from available_backends() (e.g. triton without CUDA or the interpreter)."""
    monkeypatch.setattr(zokernels, "available_backends", lambda: ["torch", "cpu"])
    status, _, err = bench("ops", "--backend", "triton")
    assert status == 2, err
    assert "--backend triton: not available here" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(CUDA, reason="checks the CPU note")
def test_triton_on_cpu_tensors_is_skipped_with_a_note(bench, monkeypatch):
    monkeypatch.setattr(zokernels, "available_backends", lambda: ["torch", "cpu", "triton"])
    status, out, err = bench(*TINY_RUN, "--backend", "triton", "--op", "perturb",
                             "--no-baselines")
    assert status == 0, err
    assert "note: triton is not timed on CPU tensors" in out
    assert " triton " not in out.split("note:")[0], "interpreted triton must not be timed"


STEP_FIELDS = {"op", "optimizer", "backend", "model", "dtype", "device", "numel", "ms", "ms_p20",
               "ms_p80", "forward_ms", "zo_ms", "state_bytes", "peak_extra_bytes",
               "speedup_vs_mezo_loop", "zo_speedup_vs_mezo_loop", "repeats"}


def test_step_tiny_run_with_json(bench, tmp_path):
    path = tmp_path / "step.json"
    status, out, err = bench("step", "--model", "tiny", "--repeats", "1", "--warmup", "1",
                             "--batch", "2", "--seq", "8", "--json", str(path))
    assert status == 0, err
    assert "mezo-loop" in out and "perturb/update ms" in out
    document = json.loads(path.read_text())
    assert TOP_FIELDS <= set(document) and document["mode"] == "step"
    names = [row["optimizer"] for row in document["results"]]
    assert names == ["mezo-loop", "mezo", "lezo", "tezo", "pseuzo"]
    for row in document["results"]:
        assert STEP_FIELDS <= set(row), STEP_FIELDS - set(row)
        assert row["ms"] > 0 and 0 <= row["forward_ms"] <= row["ms"] + 1e-6
    assert document["results"][0]["speedup_vs_mezo_loop"] == 1.0
    assert all(row["state_bytes"] is not None for row in document["results"][1:])


@pytest.mark.parametrize("argv,needle", [
    (["step", "--model", "gpt-5"], "--model: unknown model"),
    (["step", "--optimizer", "adamw"], "--optimizer: unknown value"),
    (["step", "--batch", "0"], "--batch must be >= 1"),
    (["step", "--lezo-active", "1.5"], "--lezo-active"),
    (["step", "--backend", "fpga"], "--backend: unknown value"),
])
def test_step_bad_arguments_exit_2(bench, argv, needle):
    status, _, err = bench(*argv)
    assert status == 2 and needle in err and "Traceback" not in err


def test_step_on_a_transformers_model(bench):
    pytest.importorskip("transformers")
    status, out, err = bench("step", "--model", "hf-llama-tiny", "--optimizer", "mezo,pseuzo",
                             "--repeats", "1", "--warmup", "1", "--batch", "1", "--seq", "8")
    assert status == 0, err
    assert "hf-llama-tiny" in out and "pseuzo" in out
