"""benchmarks/gpu_check.py as far as a CPU-only machine can take it: arguments, the no-GPU answer,
and the whole pipeline in --cpu-dry-run mode with the JSON's schema."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import load_benchmark


@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark("gpu_check")


@pytest.mark.parametrize("argv, message", [
    (["--budget-s", "nan"], "--budget-s"),
    (["--budget-s", "5"], "--budget-s"),
    (["--sections", "ops,bogus"], "--sections"),
    (["--device", "cpu"], "--device"),
])
def test_bad_arguments_exit_2_naming_the_option(gpu_check, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main([str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "gpu_check.json").exists()


def test_outdir_that_is_a_file_is_refused(gpu_check, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main([str(target)])
    assert exit_info.value.code == 2
    assert "not a directory" in capsys.readouterr().err
    assert target.read_text() == "keep me"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without GPU")
def test_without_a_gpu_it_says_so_and_measures_nothing(gpu_check, tmp_path, capsys):
    assert gpu_check.main([str(tmp_path)]) == gpu_check.EXIT_NO_GPU
    out = capsys.readouterr().out
    assert "no CUDA device" in out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["schema"] == gpu_check.SCHEMA
    assert report["status"] == "no-gpu" and report["sections"] == {}
    assert "no CUDA device" in report["reason"]
    assert report["versions"]["torch"] == torch.__version__
    assert "no CUDA device" in (tmp_path / "gpu_check.log").read_text()


def test_cpu_dry_run_writes_every_section(gpu_check, tmp_path):
    code = gpu_check.main([str(tmp_path), "--cpu-dry-run",
                           "--pytest-args", "tests/test_philox.py -k known_answer"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == gpu_check.EXIT_OK, report
    for key in ("schema", "date", "command", "versions", "device", "budget_s", "elapsed_s",
                "status", "sections"):
        assert key in report, key
    assert report["dry_run"] is True and report["status"] == "passed"
    assert {"torch", "triton", "zokernels", "cuda", "python"} <= report["versions"].keys()
    sections = report["sections"]
    assert set(sections) == set(gpu_check.SECTIONS)
    assert sections["host_sync"]["status"] == "skipped"  # not observable without CUDA

    tests = sections["tests"]
    assert tests["status"] == "passed" and tests["passed"] >= 1 and tests["failures"] == []

    labels = [row["label"] for row in sections["ops"]["rows"]]
    expected = [case.label() for case in gpu_check.ops_cases("cpu")]
    assert labels == expected
    assert any("applied" in label for label in labels)
    assert any("stochastic" in label for label in labels)
    assert {"K=1", "K=2", "K=14"} <= {part for label in labels for part in label.split()}
    for row in sections["ops"]["rows"]:
        assert row["pct_copy_bw"] > 0 and row["gbps"] > 0 and row["dtype"] == "bfloat16"

    optimizers = [row["optimizer"] for row in sections["step"]["rows"]]
    assert optimizers == ["mezo-loop", "mezo", "mezo-inplace", "tezo", "tezo-inplace"]
    assert all("peak_extra_bytes" in row for row in sections["step"]["rows"])
    log = (tmp_path / "gpu_check.log").read_text()
    assert "[tests] passed" in log and "% of copy" in log
