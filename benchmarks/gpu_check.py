"""The one-command GPU check: everything the first lent GPU should tell us, in <= 8 minutes.

    python benchmarks/gpu_check.py OUTDIR [--budget-s 480] [--device cuda] [--shape-set opt-1.3b]

from the repository root, after `pip install .` or `python setup.py build_ext --inplace` (the
tests run from the source tree either way).

Writes OUTDIR/gpu_check.json (device, versions, date, command, one section per check) and
OUTDIR/gpu_check.log (everything printed, the pytest output included), one section per check:

  tests      the GPU test lane: the test files whose Triton cases run on CUDA tensors when a GPU
             is present (GPU_LANE), in a subprocess with a time limit; counts and failing tests
  ops        `zokernels-bench ops` rows on opt-1.3b bf16 shapes: copy, the MeZO loop, perturb_
             gaussian K=1/2/14, rademacher K=1/14, stochastic rounding, applied=, low-rank
             r=16/64, and perturb_ on an FSDP2-like rank group's shards (gaussian K=1,
             rademacher K=1/14) split into a shifted and a mapped launch against one mapped
             launch; GB/s and % of the copy measured in the same run
  step       MeZO's and TeZO's steps on opt-1.3b shapes (bf16), virtual probes (the default)
             and in place: forward / ZO split and peak extra memory
  host_sync  a step's three passes (perturb, probe move, restore + update) with device-tensor
             coefficients under torch.cuda.set_sync_debug_mode("error") (any host sync raises),
             then captured in a CUDA graph and replayed: the bits must equal the eager passes

Each section has a time cap inside the budget; a section that does not fit is recorded as
skipped, never silently dropped. Exit status: 0 all sections passed, 1 a check failed, 2 bad
arguments, 3 no CUDA device (the JSON then says so; nothing is measured). `--cpu-dry-run` runs
the same pipeline on the CPU with tiny shapes (how the script itself is tested without a GPU);
its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import zokernels  # noqa: F401  (installed: pip install .)
except ImportError:  # a source tree built in place (python setup.py build_ext --inplace)
    sys.path.insert(0, str(ROOT))
SCHEMA = "zokernels-gpu-check/1"
SECTIONS = ("tests", "ops", "step", "host_sync")
# Test files with Triton cases on the GPU (tests/helpers.py: BACKEND_CASES gets ("triton", "cuda")
# and ("torch", "cuda") when a device is present), kernel-level ones first.
GPU_LANE = ("tests/test_triton_backend.py", "tests/test_philox.py", "tests/test_noise.py",
            "tests/test_perturb.py", "tests/test_rounding.py", "tests/test_recovery.py",
            "tests/test_lowrank.py", "tests/test_undo_triton.py", "tests/test_lowrank_undo.py",
            "tests/test_index_map_triton.py", "tests/test_table_cache_triton.py",
            "tests/test_validation.py")
# Seconds each section may take at most (the tests get what the others leave).
SECTION_CAPS = {"ops": 120.0, "step": 75.0, "host_sync": 30.0}
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_GPU = 0, 1, 2, 3


class Log:
    """Print to stdout and append to OUTDIR/gpu_check.log."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, *parts: object) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", help="directory for gpu_check.json and gpu_check.log "
                                       "(created; existing files of those names are replaced)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-clock budget for all sections (default 480 s, within 8 min)")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (default cuda)")
    parser.add_argument("--shape-set", default="opt-1.3b", help="ops shape set (default opt-1.3b)")
    parser.add_argument("--model", default="opt-1.3b", help="step model (default opt-1.3b)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--pytest-args", default=None,
                        help="replaces the GPU lane's test selection (one string, split on spaces)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the pipeline on the CPU with tiny shapes (tests the script)")
    args = parser.parse_args(argv)
    if not (args.budget_s == args.budget_s and 10.0 <= args.budget_s <= 3600.0):  # NaN fails
        parser.error(f"--budget-s must be within [10, 3600] seconds, got {args.budget_s}")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        parser.error(f"--sections: unknown {unknown or sections!r}; choose from {', '.join(SECTIONS)}")
    args.sections = sections
    if args.cpu_dry_run:
        args.device = "cpu"
    elif not re.fullmatch(r"cuda(:\d+)?", args.device):
        parser.error(f"--device must be cuda or cuda:N, got {args.device!r}")
    outdir = Path(args.outdir)
    if outdir.exists() and not outdir.is_dir():
        parser.error(f"outdir {str(outdir)!r} exists and is not a directory")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        probe = outdir / ".gpu_check_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        parser.error(f"outdir {str(outdir)!r} is not writable: {error}")
    return args


def versions() -> dict[str, Any]:
    import zokernels

    info: dict[str, Any] = dict(torch=torch.__version__, cuda=torch.version.cuda,
                                zokernels=zokernels.__version__,
                                python=platform.python_version(),
                                backends=zokernels.available_backends())
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as error:  # the check still runs the torch-only parts
        info["triton"] = f"unavailable: {error}"
    try:
        info["git_rev"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                         capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["git_rev"] = None
    return info


def device_info(device: str) -> dict[str, Any]:
    if not device.startswith("cuda"):
        from zokernels.bench.runner import device_name

        return dict(name=device_name(device), kind="cpu")
    props = torch.cuda.get_device_properties(torch.device(device))
    return dict(name=props.name, kind="cuda", capability=f"{props.major}.{props.minor}",
                multiprocessors=props.multi_processor_count,
                memory_gib=round(props.total_memory / 2**30, 1))


# ---------------------------------------------------------------- sections


def section_tests(args: argparse.Namespace, cap_s: float, log: Log) -> dict[str, Any]:
    """The GPU lane in a subprocess (a crashing kernel cannot take the check down with it)."""
    selection = args.pytest_args.split() if args.pytest_args else list(GPU_LANE)
    junit = Path(args.outdir) / "gpu_check_pytest.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf",
               f"--junitxml={junit}", *selection]
    log("$", " ".join(command))
    import zokernels

    # The tests import the package this script imported (installed, or the source tree built in
    # place), not whatever the working directory holds: PYTHONSAFEPATH keeps `python -m` from
    # putting the repository root first on sys.path.
    package_parent = str(Path(zokernels.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONSAFEPATH="1",
               PYTHONPATH=os.pathsep.join(filter(None, [package_parent,
                                                        os.environ.get("PYTHONPATH")])))
    if args.cpu_dry_run:
        env["TRITON_INTERPRET"] = "1"
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, text=True, capture_output=True,
                              timeout=cap_s)
        output, returncode, timed_out = done.stdout + done.stderr, done.returncode, False
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or "") + (expired.stderr or "")
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        returncode, timed_out = None, True
    log(output.rstrip())
    counts = pytest_counts(output)
    failures = re.findall(r"^FAILED (\S+)", output, flags=re.MULTILINE)
    ok = returncode == 0 and counts.get("passed", 0) > 0
    return dict(status="passed" if ok else ("timed out" if timed_out else "failed"),
                selection=selection, returncode=returncode, seconds=time.perf_counter() - start,
                cap_s=cap_s, failures=failures, junit=junit.name, **counts)


def pytest_counts(output: str) -> dict[str, int]:
    """passed / failed / skipped / errors ... from pytest's closing line ('3 passed, 1 failed')."""
    counts: dict[str, int] = {}
    for line in reversed(output.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)",
                           line)
        if found:
            for number, word in found:
                counts["errors" if word.startswith("error") else word] = int(number)
            break
    return counts


def _case(op: str, backend: str, **fields: Any):
    from zokernels.bench.runner import Case

    return Case(op, backend=backend, **fields)


def ops_cases(backend: str) -> list:
    from zokernels.bench.runner import COPY, MEZO

    perturb = [dict(dist="gaussian", k=1), dict(dist="gaussian", k=2), dict(dist="gaussian", k=14),
               dict(dist="rademacher", k=1), dict(dist="rademacher", k=14)]
    cases = [COPY, MEZO]
    cases += [_case("perturb_", backend, rounding="nearest", **p) for p in perturb]
    cases.append(_case("perturb_", backend, dist="gaussian", k=1, rounding="stochastic"))
    cases.append(_case("perturb_", backend, dist="gaussian", k=1, rounding="nearest",
                       applied=True))
    cases += [_case("lowrank_perturb_", backend, rank=r, rounding="nearest") for r in (16, 64)]
    # an FSDP2-like rank group (runner.Workload.shard_maps): the shifted / mapped split against
    # one mapped launch
    cases += [_case("perturb_", backend, rounding="nearest", shards=shards, **p)
              for p in (dict(dist="gaussian", k=1), dict(dist="rademacher", k=1),
                        dict(dist="rademacher", k=14))
              for shards in ("split", "mapped")]
    return cases


def section_ops(args: argparse.Namespace, cap_s: float, log: Log) -> dict[str, Any]:
    from zokernels.bench.runner import Group, get_shape_set, run_group

    shape_set = "tiny" if args.cpu_dry_run else args.shape_set
    backend = "cpu" if args.cpu_dry_run else "triton"
    group = Group(get_shape_set(shape_set), "bfloat16", args.device, ops_cases(backend))
    deadline = time.perf_counter() + cap_s
    rows: list[dict] = []

    def on_done(case, row: dict) -> None:
        row["label"] = case.label()
        log(f"  {row['label']:40s} {row['ms']:9.3f} ms  {row['gbps']:8.1f} GB/s")
        rows.append(row)
        if time.perf_counter() > deadline:
            raise TimeoutError(f"ops exceeded its cap of {cap_s:.0f} s")

    warmup, repeats = (1, 2) if args.cpu_dry_run else (3, 10)
    log(f"ops: {shape_set} bf16 on {args.device}, {len(group.cases)} cases")
    try:
        rows = run_group(group, warmup=warmup, repeats=repeats, on_done=on_done)
    except TimeoutError as error:  # rows so far are kept, without % of copy for the missing
        return dict(status="timed out", error=str(error), rows=rows)
    for row in rows:
        log(f"  {row['label']:40s} {row['pct_copy_bw']:6.1f}% of copy")
    return dict(status="passed", shape_set=shape_set, dtype="bfloat16", rows=rows)


def section_step(args: argparse.Namespace, cap_s: float, log: Log) -> dict[str, Any]:
    from zokernels.bench.step import StepSettings, time_step

    model = "tiny" if args.cpu_dry_run else args.model
    settings = StepSettings(model=model, dtype="bfloat16", device=args.device, batch=4, seq=64,
                            warmup=2 if args.cpu_dry_run else 3,
                            repeats=2 if args.cpu_dry_run else 10)
    rows = []
    start = time.perf_counter()
    # virtual probes (the default) and in place: MeZO's dense draws, TeZO's low-rank hooks
    for name in ("mezo-loop", "mezo", "mezo-inplace", "tezo", "tezo-inplace"):
        if time.perf_counter() - start > cap_s:
            return dict(status="timed out", rows=rows, cap_s=cap_s)
        row = time_step(name, settings)
        peak = row["peak_extra_bytes"]
        log(f"  step {name:12s} {row['ms']:9.2f} ms  forward {row['forward_ms']:8.2f} ms  "
            f"ZO {row['zo_ms']:8.2f} ms  peak extra "
            + ("-" if peak is None else f"{peak / 2**20:.1f} MiB"))
        rows.append(row)
    return dict(status="passed", model=model, rows=rows)


def section_host_sync(args: argparse.Namespace, cap_s: float, log: Log) -> dict[str, Any]:
    """A MeZO step's passes with every coefficient a device tensor: no host sync allowed."""
    import zokernels

    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    shapes = [(2048, 2048), (2048,), (8192, 2048), (5, 7)]
    params = [(0.02 * torch.randn(s, device=device, generator=generator)).to(torch.bfloat16)
              for s in shapes]
    eps = torch.tensor([1e-3], device=device)
    loss_plus, loss_minus = torch.tensor(2.5, device=device), torch.tensor(2.4, device=device)
    lr = 1e-4
    seed = 1234

    def passes() -> None:
        zokernels.perturb_(params, seed, eps, check_finite=False)
        zokernels.perturb_(params, seed, -eps, applied=eps, check_finite=False)
        grad = (loss_plus - loss_minus) / (2 * eps)
        zokernels.perturb_(params, seed, -lr * grad, applied=-eps, check_finite=False)

    checks = []
    if device.type != "cuda":
        return dict(status="skipped", reason="host syncs are only observable on a CUDA device",
                    checks=checks)
    initial = [p.clone() for p in params]
    passes()  # compile the kernels and build the cached launch tables outside the checks
    torch.cuda.synchronize(device)
    for p, q in zip(params, initial):
        p.copy_(q)
    try:
        torch.cuda.set_sync_debug_mode("error")
        try:
            passes()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checks.append(dict(name="no sync in sync-debug error mode", ok=True))
    except RuntimeError as error:
        checks.append(dict(name="no sync in sync-debug error mode", ok=False, detail=str(error)))
    torch.cuda.synchronize(device)
    eager = [p.clone() for p in params]
    for p, q in zip(params, initial):
        p.copy_(q)
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph, stream=stream):
                passes()
        torch.cuda.current_stream(device).wait_stream(stream)
        for p, q in zip(params, initial):
            p.copy_(q)  # capture does not run the kernels; replay from the same start
        graph.replay()
        torch.cuda.synchronize(device)
        same = all(torch.equal(p.view(torch.int16), e.view(torch.int16))
                   for p, e in zip(params, eager))
        checks.append(dict(name="CUDA graph capture + replay equals eager", ok=same,
                           detail=None if same else "replayed bits differ from the eager passes"))
    except Exception as error:  # capture refused: an illegal (syncing) call inside the passes
        checks.append(dict(name="CUDA graph capture + replay equals eager", ok=False,
                           detail=f"{type(error).__name__}: {error}"))
    checks.append(_virtual_probe_sync_check(device))
    for check in checks:
        log(f"  {'ok ' if check['ok'] else 'FAIL'} {check['name']}"
            + (f": {check['detail']}" if check.get("detail") else ""))
    return dict(status="passed" if all(c["ok"] for c in checks) else "failed", checks=checks)


def _virtual_probe_sync_check(device: torch.device) -> dict[str, Any]:
    """A virtual probe's forward (docs/dense-probes.md: an embedding looked up chunk by chunk, a
    linear's rows drawn in chunks) under sync-debug error mode, after the first step's check
    (which may synchronize) has kept the virtual path."""
    from zokernels.held import SeededNoise
    from zokernels.optim import MeZO

    name = "virtual probe forward: no sync in sync-debug error mode"
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(4096, 512), torch.nn.Linear(512, 4096))
        model = model.to(device=device, dtype=torch.bfloat16)
        ids = torch.randint(0, 4096, (4, 64), device=device)

        def closure() -> torch.Tensor:
            return model(ids).float().logsumexp(-1).mean()

        opt = MeZO(model.named_parameters(), lr=1e-4, eps=1e-3)
        opt.step(closure)
        if opt._probes is None:
            return dict(name=name, ok=False, detail=f"not virtual: {opt.dense_probe_status}")
        target = opt._probes.targets[0]
        target.hold(SeededNoise((1234,), (1e-3,)))
        try:
            with torch.no_grad(), opt._probes.probing():
                closure()  # kernels compiled, tables built
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.no_grad(), opt._probes.probing():
                    closure()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        finally:
            target.hold(None)
        return dict(name=name, ok=True)
    except Exception as error:
        return dict(name=name, ok=False, detail=f"{type(error).__name__}: {error}")


RUNNERS: dict[str, Callable[[argparse.Namespace, float, Log], dict[str, Any]]] = {
    "tests": section_tests, "ops": section_ops, "step": section_step,
    "host_sync": section_host_sync}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    outdir = Path(args.outdir)
    (outdir / "gpu_check.log").write_text("")
    log = Log(outdir / "gpu_check.log")
    began = time.perf_counter()
    report: dict[str, Any] = dict(
        schema=SCHEMA, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        command=" ".join([Path(sys.argv[0]).name if argv is None else "gpu_check.py",
                          *(sys.argv[1:] if argv is None else argv)]),
        host=platform.node(), budget_s=args.budget_s, dry_run=args.cpu_dry_run,
        versions=versions(), sections={})
    if not args.cpu_dry_run and not torch.cuda.is_available():
        reason = (f"no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda}) "
                  f"sees none, so nothing was measured; run this on a GPU machine "
                  f"(or --cpu-dry-run to exercise the script)")
        log(f"gpu_check: {reason}")
        report.update(status="no-gpu", reason=reason, device=None)
        _write(outdir, report, began)
        return EXIT_NO_GPU
    report["device"] = device_info(args.device)
    log(f"gpu_check: {report['device']['name']} · torch {torch.__version__} · "
        f"triton {report['versions']['triton']} · budget {args.budget_s:.0f} s")
    # In-process sections first, smallest first; the tests run in a fresh process last, so a
    # kernel fault that poisons this process's CUDA context cannot take them down too.
    order = [s for s in ("host_sync", "ops", "step", "tests") if s in args.sections]
    for name in order:
        remaining = args.budget_s - (time.perf_counter() - began)
        cap = remaining - 5.0 if name == "tests" else min(SECTION_CAPS[name], remaining - 5.0)
        if cap < 5.0:
            report["sections"][name] = dict(status="skipped", reason="budget exhausted")
            log(f"[{name}] skipped: budget exhausted")
            continue
        log(f"[{name}] (cap {cap:.0f} s)")
        start = time.perf_counter()
        try:
            result = RUNNERS[name](args, cap, log)
        except Exception as error:  # one broken section must not hide the others' results
            log(traceback.format_exc().rstrip())
            result = dict(status="error", error=f"{type(error).__name__}: {error}")
        result.setdefault("seconds", time.perf_counter() - start)
        report["sections"][name] = result
        log(f"[{name}] {result['status']} in {result['seconds']:.1f} s")
        _write(outdir, report, began)  # partial results survive a later kill
    bad = [n for n, r in report["sections"].items() if r["status"] not in ("passed", "skipped")]
    report["status"] = "failed" if bad else "passed"
    report["failed_sections"] = bad
    _write(outdir, report, began)
    log(f"gpu_check: {report['status']} in {time.perf_counter() - began:.0f} s -> "
        f"{outdir / 'gpu_check.json'}")
    return EXIT_FAILED if bad else EXIT_OK


def _write(outdir: Path, report: dict[str, Any], began: float) -> None:
    report["elapsed_s"] = time.perf_counter() - began
    tmp = outdir / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(outdir / "gpu_check.json")


if __name__ == "__main__":
    sys.exit(main())
