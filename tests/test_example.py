"""The offline example (python -m zokernels.integrations.example) runs end to end in a fresh
process with the hub switched off: tiny model from a config, AdamW pre-training, ZO fine-tuning
through finetune() or, with --trainer, through ZOTrainer; the held-out loss must drop. Skipped
without transformers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import SUBPROCESS_TIMEOUT

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--steps", "60", "--pretrain-steps", "100", "--quiet"]


def run_example(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "zokernels.integrations.example", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


def result_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), proc.stdout
    return json.loads(last[len("RESULT "):])


def test_mezo_example_lowers_the_loss_and_saves_its_trajectory(tmp_path):
    from zokernels.trajectory import Trajectory

    path = tmp_path / "trajectory.pt"
    result = result_of(run_example("--optimizer", "mezo", "--save-trajectory", str(path), *QUICK))
    assert result["optimizer"] == "mezo" and result["steps"] == 60
    assert math.isfinite(result["initial_loss"])
    assert result["final_loss"] < result["initial_loss"] - 0.05, result
    assert result["state_bytes"] == 0 and result["window_bytes"] == 0
    # virtual probes (the default) keep no log: the extra memory is their largest draw
    assert result["probes"].startswith("virtual"), result["probes"]
    assert result["undo_log_bytes"] == 0 and result["extra_memory_bytes"] > 0
    assert len(Trajectory.load(path)) == 60


def test_pseuzo_example_in_bf16_lowers_the_loss():
    result = result_of(run_example("--optimizer", "pseuzo", "--dtype", "bfloat16", *QUICK))
    assert result["optimizer"] == "pseuzo" and result["dtype"] == "bfloat16"
    assert result["final_loss"] < result["initial_loss"] - 0.05, result
    assert result["window_bytes"] > 0 and result["state_bytes"] >= result["window_bytes"]
    assert result["steps_per_s"] > 0


def test_trainer_example_lowers_the_loss():
    result = result_of(run_example("--trainer", "--optimizer", "lezo", *QUICK))
    assert result["trainer"] is True and result["optimizer"] == "lezo"
    assert result["steps"] == 60 and result["skipped_steps"] == 0
    assert result["final_loss"] < result["initial_loss"] - 0.05, result
    assert result["probes"].startswith("virtual"), result["probes"]
    assert result["undo_log_bytes"] == 0 and result["extra_memory_bytes"] > 0


def test_example_refuses_bad_arguments():
    proc = run_example("--steps", "0")
    assert proc.returncode == 2 and "--steps must be >= 1" in proc.stderr
    proc = run_example("--optimizer", "adam")
    assert proc.returncode == 2 and "--optimizer" in proc.stderr
