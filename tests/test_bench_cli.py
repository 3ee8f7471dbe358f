"""The zokernels-bench CLI: help, a tiny run with its JSON schema, one-line errors with exit 2.

main() runs in-process (importing torch in a subprocess costs seconds); one test runs
`python -m zokernels.bench.cli --help`, what the console script runs. Runs use the `tiny` shape
set with one repeat, so the whole file takes a few seconds on a CPU.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import zokernels
from zokernels.bench import cli

from helpers import SUBPROCESS_TIMEOUT, cli_runner

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
    return cli_runner(capsys)


def test_help(bench):
    status, out, _ = bench("--help")
    assert status == 0 and "usage: zokernels-bench" in out and "{ops,step,lora}" in out


def test_module_help(tmp_path):
    """The console script's entry point, in a fresh interpreter (one: each costs an import)."""
    result = subprocess.run([sys.executable, "-m", "zokernels.bench.cli", "ops", "--help"],
                            capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
                            env=dict(os.environ, PYTHONPATH=PACKAGE_PARENT), cwd=tmp_path)
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


def test_shards_rows(bench, tmp_path):
    """--shards none,split: each perturb_ case unsharded and on shards (index maps); the row
    says which."""
    path = tmp_path / "bench.json"
    status, _, err = bench("ops", "--shape-set", "tiny", "--repeats", "1", "--warmup", "0",
                           "--k", "1", "--dist", "gaussian", "--op", "perturb", "--no-baselines",
                           "--shards", "none,split", "--json", str(path))
    assert status == 0, err
    rows = [r for r in json.loads(path.read_text())["results"] if r["op"] == "perturb_"]
    assert sorted((r["shards"] or "none") for r in rows) == ["none", "split"]
    assert all(r["ms"] > 0 for r in rows)


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
    (["ops", "--shards", "rows"], "--shards"),
    (["ops", "--repeats", "0"], "--repeats"),
    (["ops", "--no-such-option"], "unrecognized arguments"),
    # a list of separators names nothing (it indexed an empty list, or timed nothing)
    (["ops", "--k", ","], "--k: no value given"),
    (["ops", "--op", " , "], "--op: no value given"),
    (["ops", "--device", ","], "--device: no value given"),
    (["ops", "--dtype", ""], "--dtype: no value given"),
    (["--device", ","], "--device: no value given"),
    (["ops", "--json", ""], "--json: the path is empty"),
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


def test_json_path_through_symbolic_links(bench, tmp_path):
    """A loop is refused before the run; a dangling link is written through (its directory
    created, as for a plain path); a write that fails after the run is one error line, exit 1."""
    loop = tmp_path / "loop.json"
    loop.symlink_to(tmp_path / "other.json")
    (tmp_path / "other.json").symlink_to(loop)
    status, out, err = bench(*TINY_RUN, "--json", str(loop))
    assert status == 2 and "symbolic links" in err and not out, err
    parent_loop = tmp_path / "loopdir"
    parent_loop.symlink_to(parent_loop)
    status, out, err = bench(*TINY_RUN, "--json", str(parent_loop / "out.json"))
    assert status == 2 and "symbolic links" in err and not out, err
    # a trailing separator names a directory (realpath would drop it and write a file there)
    existing = tmp_path / "results.json"
    existing.write_text("{}")
    for name in (f"{existing}/", f"{tmp_path / 'newdir'}/"):
        status, out, err = bench(*TINY_RUN, "--json", name)
        assert status == 2 and "names a directory" in err and not out, err
    assert existing.read_text() == "{}" and not (tmp_path / "newdir").exists()
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "missing" / "out.json")
    status, _, err = bench(*TINY_RUN, "--json", str(dangling))
    assert status == 0, err
    assert json.loads((tmp_path / "missing" / "out.json").read_text())["results"]


def test_json_write_failure_after_the_run_exits_1(bench, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli.json, "dump", full)
    status, out, err = bench(*TINY_RUN, "--json", str(tmp_path / "out.json"))
    assert status == 1 and "Traceback" not in err, err
    assert "the results could not be written: No space left on device" in err
    assert "perturb" in out  # the table was printed before


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
               "speedup_vs_mezo_loop", "zo_speedup_vs_mezo_loop", "repeats",
               "extra_memory_bytes", "extra_memory_ratio", "clock"}


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
        assert row["ms"] > 0 and row["forward_ms"] > 0
        # the forwards are an identical model's, timed apart: the ZO part is the difference
        assert row["zo_ms"] == row["ms"] - row["forward_ms"]
    assert document["results"][0]["speedup_vs_mezo_loop"] == 1.0
    assert all(row["state_bytes"] is not None for row in document["results"][1:])
    assert "extra/params" in out
    for row in document["results"][1:]:  # logs (+ window, moments) as a fraction of the params
        assert row["extra_memory_bytes"] > 0
        assert row["extra_memory_ratio"] == row["extra_memory_bytes"] / row["param_bytes"]
    assert document["results"][0]["extra_memory_bytes"] is None  # the MeZO loop keeps nothing


def test_pseuzo_row_is_timed_with_a_full_window(bench, tmp_path):
    """PseuZO's window gains an entry per step: its row warms up until the window is full, so
    the time (one seed per entry in the update) and the memory (one stored dO per entry) are the
    steady state's, not those of a half-empty window."""
    path = tmp_path / "step.json"
    batch, seq, window = 2, 8, 5
    status, out, err = bench("step", "--model", "tiny", "--optimizer", "mezo,pseuzo",
                             "--repeats", "1", "--warmup", "1", "--batch", str(batch), "--seq",
                             str(seq), "--window", str(window), "--json", str(path))
    assert status == 0, err
    rows = {row["optimizer"]: row for row in json.loads(path.read_text())["results"]}
    assert rows["mezo"]["warmup"] == 1 and rows["pseuzo"]["warmup"] == window
    from zokernels.bench.step import StepSettings, _case

    # the memory of the same optimizer stepped window times by hand: its window full (a row
    # measured after 2 steps would hold 2 entries of dO and report less)
    settings = StepSettings("tiny", "float32", "cpu", batch, seq, 1, 1, window=window)
    case = _case("pseuzo", settings, True, 1e-6, 1e-3)
    for _ in range(window):
        case.one_step()
    assert case.opt.window_length == window
    assert rows["pseuzo"]["extra_memory_bytes"] == case.opt.extra_memory_bytes


def test_step_forwards_are_timed_apart_after_each_step(monkeypatch):
    """Every row's forwards are those of an identical model without an optimizer, timed after
    each step and outside it (time_step), one forward time for both interleaved copies. The
    clock is replaced by one that advances only inside forwards: 100 s per forward of an
    optimized copy, 1 s per forward of the plain model. A step must then take exactly its own
    forwards and the forward time exactly the plain ones, in that order."""
    from zokernels.bench import step as step_module
    from zokernels.bench.models import BenchModel

    clock, log, built, plain = [0.0], [], [], []
    real_build, real_plain_forwards = step_module.build_model, step_module._plain_forwards

    def build(*args, **kwargs) -> BenchModel:
        model = real_build(*args, **kwargs)
        features = model.features  # a field of the model; its loss calls it too

        def traced(ids):
            log.append(id(model))
            out = features(ids)
            clock[0] += 1.0 if plain and model is plain[0] else 100.0
            return out
        model.features = traced
        built.append(model)
        return model

    def plain_forwards(*args, **kwargs):
        forwards = real_plain_forwards(*args, **kwargs)
        plain.append(built[-1])  # the model it has just built
        return forwards

    monkeypatch.setattr(step_module, "build_model", build)
    monkeypatch.setattr(step_module, "_plain_forwards", plain_forwards)
    monkeypatch.setitem(step_module.CLOCKS, "cpu", lambda: clock[0])
    settings = step_module.StepSettings("tiny", "float32", "cpu", 2, 8, warmup=1, repeats=3,
                                        clock="cpu")
    row = step_module.time_step("mezo", settings, compare_exact=True)
    assert len(built) == 3  # the optimized copy, its twin without logs, the plain model
    n = step_module.FORWARDS["mezo"]
    assert row["ms"] == row["ms_no_exact"] == 1e3 * 100.0 * n
    assert row["forward_ms"] == 1e3 * 1.0 * n
    assert row["zo_ms"] == row["zo_ms_no_exact"] == row["ms"] - row["forward_ms"]
    assert row["step_ratio_exact_vs_no_exact"] == 1.0
    # the timed part, in order: per repeat and copy, the copy's forwards, then the plain ones
    optimized, twin, plain_model = (id(m) for m in built)
    assert plain == [built[2]]
    one_round = [optimized] * n + [plain_model] * n + [twin] * n + [plain_model] * n
    assert log[-len(one_round) * 3:] == one_round * 3


def test_step_compare_exact_interleaves_a_copy_without_logs(bench, tmp_path):
    path = tmp_path / "step.json"
    status, out, err = bench("step", "--model", "tiny", "--optimizer", "mezo", "--repeats", "1",
                             "--warmup", "1", "--batch", "2", "--seq", "8", "--compare-exact",
                             "--json", str(path))
    assert status == 0, err
    assert "exact vs no-logs" in out
    loop, mezo = json.loads(path.read_text())["results"]
    assert "zo_ms_no_exact" not in loop and mezo["exact_restore"] is True
    assert mezo["ms_no_exact"] > 0
    assert mezo["zo_ms_no_exact"] == mezo["ms_no_exact"] - mezo["forward_ms"]
    # ZO parts are differences of medians: with one wall-clock repeat either may be <= 0
    if min(mezo["zo_ms"], mezo["zo_ms_no_exact"]) > 0:
        assert mezo["zo_ratio_exact_vs_no_exact"] == mezo["zo_ms"] / mezo["zo_ms_no_exact"]
    else:
        assert mezo["zo_ratio_exact_vs_no_exact"] is None


def test_step_clock_cpu_times_the_calling_thread(bench, tmp_path, monkeypatch):
    """--clock cpu: every row (the loop, in-place and virtual probes) is timed by the thread's
    CPU time and says so. Its clock is replaced by one that ticks 1 s per reading: the steps and
    forwards timed by it are whole seconds, which wall time would not give."""
    from zokernels.bench import step as step_module

    ticks = itertools.count()
    monkeypatch.setitem(step_module.CLOCKS, "cpu", lambda: float(next(ticks)))
    path = tmp_path / "step.json"
    status, out, err = bench("step", "--model", "tiny", "--optimizer", "mezo,tezo-inplace",
                             "--repeats", "1", "--warmup", "1", "--batch", "2", "--seq", "8",
                             "--threads", "1", "--clock", "cpu", "--json", str(path))
    assert status == 0, err
    assert "thread CPU time" in out
    rows = json.loads(path.read_text())["results"]
    assert [row["optimizer"] for row in rows] == ["mezo-loop", "mezo", "tezo-inplace"]
    for row in rows:
        assert row["clock"] == "cpu"
        for key in ("ms", "forward_ms"):
            assert row[key] > 0 and row[key] % 1000.0 == 0.0, (row["optimizer"], key, row[key])


def test_step_settings_refuse_an_unknown_clock():
    from zokernels.bench.step import StepSettings

    with pytest.raises(ValueError, match="clock must be one of"):
        StepSettings("tiny", "float32", "cpu", 2, 8, 1, 1, clock="cycles")


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs for --threads 2")
def test_step_clock_cpu_needs_one_thread(bench):
    status, _, err = bench("step", "--model", "tiny", "--threads", "2", "--clock", "cpu")
    assert status == 2 and "--clock cpu counts the calling thread's CPU time only" in err


def test_step_rows_of_virtual_and_inplace_probes(bench, tmp_path):
    """MeZO / LeZO probe virtually by default; their in-place rows are mezo-inplace /
    lezo-inplace. A virtual row says which path its check kept."""
    path = tmp_path / "step.json"
    status, out, err = bench("step", "--model", "tiny", "--optimizer", "mezo,mezo-inplace",
                             "--repeats", "1", "--warmup", "1", "--batch", "2", "--seq", "8",
                             "--json", str(path))
    assert status == 0, err
    _, virtual, inplace = json.loads(path.read_text())["results"]
    assert virtual["optimizer"] == "mezo" and inplace["optimizer"] == "mezo-inplace"
    assert virtual["dense_probe_status"].startswith("virtual")
    assert "dense_probe_status" not in inplace
    assert virtual["weight_passes"].startswith("1") and inplace["weight_passes"] == "3"


@pytest.mark.parametrize("argv,needle", [
    (["step", "--model", "gpt-5"], "--model: unknown model"),
    (["step", "--optimizer", "adamw"], "--optimizer: unknown value"),
    (["step", "--batch", "0"], "--batch must be >= 1"),
    (["step", "--lezo-active", "1.5"], "--lezo-active"),
    (["step", "--backend", "fpga"], "--backend: unknown value"),
    (["step", "--compare-exact", "--no-exact-restore"], "give one of them"),
    (["step", "--model", "tiny", "--seq", "257"], "--model tiny takes at most 256 tokens"),
    (["step", "--seq", str(10 ** 20)], "takes at most 512 tokens"),
    (["step", "--model", "tiny", "--batch", str(10 ** 12)], "the logits alone need"),
    (["step", "--dtype", ","], "--dtype: no value given"),
    (["step", "--seq", "1"], "--seq must be >= 2"),  # no next token: every step skipped
    (["step", "--json", ""], "--json: the path is empty"),
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


def test_bert_minilm_bench_model_views_agree():
    """The MiniLM-shaped BERT: 12 blocks for LeZO, and PseuZO's features -> head_loss split gives
    the model's loss (the MLM head's decoder tied to the word embeddings)."""
    pytest.importorskip("transformers")
    from zokernels.bench.models import build_model, synthetic_batch

    model = build_model("hf-bert-minilm", torch.float32, "cpu")
    assert len(model.blocks) == 12 and model.vocab == 30522
    head = model.module.cls.predictions.decoder
    assert head.weight is model.module.bert.embeddings.word_embeddings.weight
    ids = synthetic_batch(model, 1, 8, "cpu")
    with torch.no_grad():
        logits = model.module(input_ids=ids).logits
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 30522),
                                                     ids[:, 1:].reshape(-1))
        assert torch.isfinite(model.loss(ids))
        assert torch.equal(model.loss(ids), expected)


# ------------------------------------------------------------------------------------------ lora

LORA_TINY_RUN = ["lora", "--preset", "tiny", "--repeats", "1", "--warmup", "2",
                 "--overhead-tensors", "10,30"]
LORA_STEP_FIELDS = {"op", "case", "backend", "exact_restore", "preset", "targets", "rank",
                    "layers", "dtype", "device", "tensors", "numel", "ms", "ms_p20", "ms_p80",
                    "passes", "us_per_tensor_pass", "launches_per_step", "launches_per_pass",
                    "state_bytes", "speedup_vs_mezo_loop", "repeats", "warmup"}
LORA_OVERHEAD_FIELDS = {"case", "backend", "device", "tensors", "numel_per_tensor", "us_per_call",
                        "us_p20", "us_p80", "us_per_tensor", "speedup_vs_mezo_loop",
                        "calls_per_sample", "register_ms"}


def test_lora_tiny_run_writes_json(bench, tmp_path):
    from zokernels.bench.lora import CASES

    path = tmp_path / "lora.json"
    status, out, err = bench(*LORA_TINY_RUN, "--device", "cpu", "--json", str(path))
    assert status == 0, err
    assert "[1/" in err, "no progress display on stderr"
    assert "mezo-loop" in out and "optimizer-undo" in out and "ParameterSpace.apply" in out, out
    document = json.loads(path.read_text())
    assert TOP_FIELDS | {"lora", "overhead"} <= set(document) and document["mode"] == "lora"
    assert document["command"].startswith("zokernels-bench lora --preset tiny")
    config = document["lora"]
    assert config["targets"] == ["qv"] and config["backend"] == "cpu" and len(config["sets"]) == 1
    # tiny: 2 layers x (q_proj, v_proj) x (A, B) of a 64-wide model, r = 8
    described = config["sets"][0]
    assert described["tensors"] == 8 and described["numel"] == 8 * 64 * 8
    assert described["target_modules"] == ["q_proj", "v_proj"]
    assert described["bytes"] == 4 * described["numel"]
    rows = document["results"]
    assert [r["case"] for r in rows] == list(CASES)
    for row in rows:
        assert LORA_STEP_FIELDS <= set(row), LORA_STEP_FIELDS - set(row)
        assert row["ms_p20"] <= row["ms"] <= row["ms_p80"] and row["ms"] > 0
        assert row["tensors"] == 8 and row["dtype"] == "float32" and row["device"] == "cpu"
        assert row["launches_per_step"] is None, "no launches to count on the CPU"
    assert rows[0]["speedup_vs_mezo_loop"] == 1.0 and rows[0]["passes"] == 4
    by_case = {r["case"]: r for r in rows}
    assert by_case["space"]["passes"] == 3 and by_case["space-undo"]["passes"] == 5
    assert by_case["space"]["state_bytes"] == 0 and by_case["space-undo"]["state_bytes"] > 0
    assert by_case["optimizer-undo"]["exact_restore"] is True
    overhead = document["overhead"]
    assert {(r["case"], r["tensors"]) for r in overhead} == {
        (case, count) for case in ("ParameterSpace.apply", "perturb_", "mezo-loop pass")
        for count in (10, 30)}
    for row in overhead:
        assert LORA_OVERHEAD_FIELDS <= set(row), LORA_OVERHEAD_FIELDS - set(row)
        assert row["us_per_tensor"] == pytest.approx(row["us_per_call"] / row["tensors"])
        assert row["us_p20"] <= row["us_per_call"] <= row["us_p80"]
        assert (row["register_ms"] is not None) == (row["case"] == "ParameterSpace.apply")
        assert row["backend"] == ("torch-loop" if row["case"] == "mezo-loop pass" else "cpu")


def test_lora_two_target_sets_bf16_no_overhead(bench, tmp_path):
    path = tmp_path / "lora.json"
    status, out, err = bench("lora", "--preset", "tiny", "--targets", "qv,all", "--dtype", "bf16",
                             "--layers", "1", "--case", "mezo-loop,space,optimizer-undo",
                             "--repeats", "1", "--warmup", "0", "--no-overhead", "--json",
                             str(path))
    assert status == 0, err
    assert "include the count-only probes" in out, "warm-up below the probe steps is noted"
    assert out.count("lora · tiny (1 layers)") == 2, "one table per target set"
    document = json.loads(path.read_text())
    assert document["overhead"] == [] and "per-call overhead" not in out
    # 1 layer x (2 or 6 linears) x (A, B)
    assert [s["tensors"] for s in document["lora"]["sets"]] == [4, 12]
    rows = document["results"]
    assert [(r["targets"], r["case"]) for r in rows] == [
        (t, c) for t in ("qv", "all") for c in ("mezo-loop", "space", "optimizer-undo")]
    assert all(r["dtype"] == "bfloat16" for r in rows)
    assert [r["speedup_vs_mezo_loop"] for r in rows if r["case"] == "mezo-loop"] == [1.0, 1.0]


LORA_BAD_ARGUMENTS = [
    (["lora", "--preset", "opt-7b"], "--preset: unknown preset 'opt-7b'"),
    (["lora", "--targets", "mlp"], "--targets: unknown value 'mlp'"),
    (["lora", "--rank", "0"], "--rank must be >= 1"),
    (["lora", "--rank", "eight"], "--rank"),
    (["lora", "--layers", "0"], "--layers must be >= 1"),
    (["lora", "--dtype", "float64"], "unknown dtype 'float64'"),
    (["lora", "--backend", "fpga"], "--backend: unknown value 'fpga'"),
    (["lora", "--case", "adam"], "--case: unknown value 'adam'"),
    (["lora", "--repeats", "0"], "--repeats must be >= 1"),
    (["lora", "--warmup", "-1"], "--warmup must be >= 0"),
    (["lora", "--overhead-tensors", "0"], "--overhead-tensors"),
    (["lora", "--overhead-numel", "0"], "--overhead-numel must be >= 1"),
    (["lora", "--source", "hub"], "--source: unknown value 'hub'"),
    (["lora", "--device", "tpu"], "unknown device 'tpu'"),
    (["lora", "--device", "cpu,cpu:1"], "lora takes one --device"),
    (["lora", "--dtype", ","], "--dtype: no value given"),
    (["lora", "--targets", ","], "--targets: no value given"),
    (["lora", "--case", ","], "--case: no value given"),
]
LORA_BAD_ARGUMENTS += [(["lora", "--layers", str(10 ** 9)], "the adapters of the 5 cases need"),
                       (["lora", "--rank", str(10 ** 9)], "the adapters of the 5 cases need")]
if not CUDA:
    LORA_BAD_ARGUMENTS += [(["lora", "--device", "cuda"], "CUDA is not available")]
    if "triton" in zokernels.available_backends():  # the interpreter: never timed
        LORA_BAD_ARGUMENTS += [(["lora", "--backend", "triton"], "not timed on CPU tensors")]
else:
    LORA_BAD_ARGUMENTS += [(["lora", "--device", "cuda", "--backend", "cpu"], "CPU tensors only")]


@pytest.mark.parametrize("args, message", LORA_BAD_ARGUMENTS,
                         ids=[" ".join(a) for a, _ in LORA_BAD_ARGUMENTS])
def test_lora_bad_argument_exits_2(bench, args, message):
    status, out, err = bench(*args)
    assert status == 2, (status, err)
    assert message in err, err
    assert "Traceback" not in err and not out
    assert len(err.strip().splitlines()) == 1, err


def test_lora_shapes():
    from zokernels.bench.lora import lora_shapes

    qv, every = lora_shapes("opt-1.3b", "qv"), lora_shapes("opt-1.3b", "all")
    assert len(qv) == 96 and len(every) == 288
    assert dict(qv)["base_model.model.model.decoder.layers.23.self_attn.v_proj.lora_A.default"
                    ".weight"] == (8, 2048)
    shapes = dict(every)
    stem = "base_model.model.model.decoder.layers.0."
    assert shapes[stem + "fc1.lora_A.default.weight"] == (8, 2048)
    assert shapes[stem + "fc1.lora_B.default.weight"] == (8192, 8)
    assert shapes[stem + "fc2.lora_A.default.weight"] == (8, 8192)
    assert shapes[stem + "fc2.lora_B.default.weight"] == (2048, 8)
    assert sum(a * b for _, (a, b) in every) == 24 * 8 * (4 * 2 * 2048 + 2 * (2048 + 8192))
    assert len(lora_shapes("opt-13b", "all", rank=4, layers=200)) == 2400
    from zokernels.bench.lora import TENSOR_OVERHEAD_BYTES, adapter_bytes

    assert adapter_bytes("opt-1.3b", "all", 8, None, torch.bfloat16) == (
        2 * sum(a * b for _, (a, b) in every) + len(every) * TENSOR_OVERHEAD_BYTES)
    assert lora_shapes("opt-125m", "qv", rank=16)[0][1] == (16, 768)


@pytest.mark.parametrize("targets", ["qv", "all"])
def test_lora_shapes_match_peft(targets):
    """The shapes path names and orders the adapters exactly as peft does."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from zokernels.bench.lora import lora_shapes, peft_lora_shapes

    assert lora_shapes("tiny", targets, rank=4, layers=3) == peft_lora_shapes("tiny", targets,
                                                                              rank=4, layers=3)


def test_lora_paths_change_adapters_and_restore_exactly():
    """The loop and the zokernels passes both move the adapters; with lr = 0, +eps / -eps /
    restore through ParameterSpace with undo logs gives them back bit for bit."""
    from zokernels.bench.lora import build_adapters, lora_shapes, space_step
    from zokernels.bench.step import mezo_loop_step
    from zokernels.ops.undo import UndoLog

    shapes = lora_shapes("tiny", "all")

    def fresh():
        named = build_adapters(shapes, torch.float32, "cpu", seed=3)
        return named, [p.detach().clone() for _, p in named]

    def changed(named, before):
        return sum(not torch.equal(p, b) for (_, p), b in zip(named, before))

    named, before = fresh()
    params = [p for _, p in named]
    with torch.random.fork_rng():
        mezo_loop_step(params, lambda: sum((p.float() ** 2).sum() for p in params), seed=5,
                       eps=1e-3, lr=1e-2)
    assert changed(named, before) == len(shapes), "the loop left some adapters unchanged"

    for logs in (None, (UndoLog(), UndoLog())):
        named, before = fresh()
        space = zokernels.ParameterSpace(named, backend="cpu")
        space_step(space, 5, 1e-3, -1e-3, logs)  # coef = -lr g
        assert changed(named, before) == len(shapes), "the update left some adapters unchanged"

        named, before = fresh()
        space = zokernels.ParameterSpace(named, backend="cpu")
        for seed in (5, 6, 7):  # a few steps: the logs are past their probes
            space_step(space, seed, 1e-3, 0.0, logs)
        if logs is None:  # recovery only: exact but for an ulp of theta + eps z here and there
            for (_, p), b in zip(named, before):
                torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-6)
        else:
            for (name, p), b in zip(named, before):
                assert torch.equal(p.detach().view(torch.int32), b.view(torch.int32)), name



def test_memory_refusals_count_everything_a_run_holds(capsys, monkeypatch):
    """With the free memory faked just above what one part needs, the runs that would hold more
    are refused before any work: every lora case's copy of the adapters (one copy used to be
    counted), the overhead rows' four lists of tensors, and a step row's two or three copies of
    the model (only its logits were counted)."""
    from zokernels.bench import cli
    from zokernels.bench.lora import adapter_bytes
    from zokernels.bench.models import parameter_count
    run = cli_runner(capsys, monkeypatch, forbid_work=True)
    free = {"bytes": 0}
    monkeypatch.setattr(cli, "available_memory_bytes", lambda device: free["bytes"])

    one_copy = adapter_bytes("opt-1.3b", "qv", 8, 2, torch.float32)
    free["bytes"] = int(1.25 * one_copy / cli.MEMORY_HEADROOM)
    status, _, err = run("lora", "--device", "cpu", "--dtype", "fp32", "--layers", "2",
                         "--no-overhead")
    assert status == 2 and "the adapters of the 5 cases need" in err, err

    free["bytes"] = 2 * 10 ** 9
    status, _, err = run("lora", "--device", "cpu", "--dtype", "fp32", "--layers", "2",
                         "--case", "mezo-loop", "--overhead-tensors", "10000000")
    assert status == 2 and "--overhead-tensors 10000000" in err and "on cpu" in err, err

    weights = parameter_count("opt-1.3b") * 4
    assert weights > 5 * 10 ** 9
    free["bytes"] = int(1.5 * weights / cli.MEMORY_HEADROOM)  # one copy and the logits fit
    status, _, err = run("step", "--device", "cpu", "--model", "opt-1.3b", "--dtype", "fp32",
                         "--seq", "16", "--batch", "1")
    assert status == 2 and "2 copies of its weights" in err, err
