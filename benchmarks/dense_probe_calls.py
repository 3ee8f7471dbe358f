"""The virtual dense probes' fixed costs on the CPU: MeZO / LeZO steps with the library as it is
("current") against variants with one of its savings undone, and the same optimizer with
in-place probes without logs (exact_restore=False), all on copies of one model, stepped in
turn (paired: the machine's noise hits every way alike), with the plain forwards of an
identical model timed after each round; each way takes each place in a round in turn (the first
after the forwards measured 2-4 ms slower than the others).

Variants (--variants, any of):
  generic   the chunk draws through `perturb_cpu`, which rebuilds its arguments per call,
            instead of the cpu backend's bound call (`perturb_pieces_cpu`, 2026-12-07)
  previous  the library before 2026-12-07b: the probes' mode on in every module (no
            ModuleScope), each chunk's F.linear copied into the output (no direct GEMM
            output), an embedding's rows drawn as one tensor per row

Reports per way the median step and ZO part (step - the forwards' median), the ratios to the
in-place steps and the median page faults of a step (minor faults: memory the allocator gave
back to the system and touched again). Every virtual way must end with the same bits
(checked). Timed by the calling thread's CPU time at 1 thread (`--clock cpu`, the default) or
by wall time.

--forwards measures the probe forwards alone, more precisely: one optimizer, its check done,
each round holding a fresh perturbation (LeZO: of n_active random blocks) and evaluating the
model's loss under the probes with each way's patches, beside the plain forward of the same
model; reports the median extra time of a probe forward per way (no step, no update pass).

--settle-malloc (glibc only) sets the allocator to keep freed memory (mallopt: no trimming,
no mmap below 256 MiB): measured on `small` fp32, a step then takes no page faults instead of
8-12 thousand (some ms each thousand), which glibc's heuristics hand to one way or another
from run to run; the comparison is then of the computation alone.

Usage: python benchmarks/dense_probe_calls.py [--model small] [--dtype float32,bfloat16]
       [--optimizer mezo,lezo] [--variants generic,previous] [--repeats 25] [--threads 1]
       [--clock cpu] [--forwards] [--settle-malloc] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

import zokernels.dense_probe as dense_probe
from zokernels.bench.runner import write_report
from zokernels.bench.step import StepSettings, _case, _make, _model_and_batch, _plain_forwards
from zokernels.held import SeededNoise

CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


@contextlib.contextmanager
def _patched(owner: object, name: str, value: object) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def generic(opt) -> Iterator[None]:
    with _patched(dense_probe._Draw, "_native", lambda self, device: None):
        yield


def _rows_one_tensor_each(self, j, block, rows):
    width = block.shape[1]
    self._draw([j] * block.shape[0], list(block.unbind(0)), [r * width for r in rows])


@contextlib.contextmanager
def previous(opt) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if opt._probes is not None:  # decided by the first probe's check
            stack.enter_context(_patched(opt._probes, "scope", None))
        stack.enter_context(_patched(dense_probe, "_direct_gemm", lambda *args: None))
        stack.enter_context(_patched(dense_probe._Draw, "_draw_rows", _rows_one_tensor_each))
        yield


def current(opt) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


VARIANTS = {"generic": generic, "previous": previous}


def settle_malloc() -> None:
    """glibc: keep freed memory in the process (no trimming, no mmap below 256 MiB)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    if not (libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 1 << 28)):
        raise RuntimeError("mallopt failed (not glibc?)")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(model: str, dtype: str, optimizer: str, variants: list[str], repeats: int,
            clock) -> dict:
    settings = StepSettings(model=model, dtype=dtype, device="cpu", backend="auto", batch=4,
                            seq=64, repeats=repeats, warmup=3, lezo_active=0.25, rank=8,
                            window=14, exact_restore=True, clock="cpu")
    ways = {"current": (_case(optimizer, settings, True, 1e-6, 1e-3), current)}
    for name in variants:
        ways[name] = (_case(optimizer, settings, True, 1e-6, 1e-3), VARIANTS[name])
    ways["inplace_no_logs"] = (_case(optimizer + "-inplace", settings, False, 1e-6, 1e-3),
                               current)
    forwards = _plain_forwards(optimizer, settings)
    times: dict[str, list[float]] = defaultdict(list)
    faults: dict[str, list[int]] = defaultdict(list)
    names = list(ways)
    for round_ in range(settings.warmup + repeats):
        # each way takes each place in the round in turn: the step after the forwards of
        # another model runs in another cache state (measured: 2-4 ms on small)
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            case, variant = ways[name]
            with variant(case.opt):
                faulted, start = _faults(), clock()
                case.one_step()
                elapsed, faulted = clock() - start, _faults() - faulted
            if round_ >= settings.warmup:
                times[name].append(1e3 * elapsed)
                faults[name].append(faulted)
        start = clock()
        forwards()
        if round_ >= settings.warmup:
            times["forwards"].append(1e3 * (clock() - start))
    virtual = [name for name in ways if name != "inplace_no_logs"]
    same = all(torch.equal(a, b) for name in virtual[1:]
               for a, b in zip(ways["current"][0].params, ways[name][0].params))
    step = {name: statistics.median(ts) for name, ts in times.items()}
    zo = {name: step[name] - step["forwards"] for name in ways}
    row = dict(model=model, dtype=dtype, optimizer=optimizer, repeats=repeats,
               same_bits=same, forwards_ms=step["forwards"],
               status=ways["current"][0].opt.dense_probe_status,
               mode_left_off=ways["current"][0].opt._probes is not None
               and ways["current"][0].opt._probes.scope is not None)
    for name in ways:
        row[f"{name}_step_ms"], row[f"{name}_zo_ms"] = step[name], zo[name]
        row[f"{name}_page_faults"] = statistics.median(faults[name])
    for name in virtual:
        row[f"{name}_step_vs_inplace"] = step[name] / step["inplace_no_logs"]
        row[f"{name}_zo_vs_inplace"] = (zo[name] / zo["inplace_no_logs"]
                                        if zo["inplace_no_logs"] > 0 else None)
        if name != "current":
            row[f"current_saves_vs_{name}_ms"] = step[name] - step["current"]
    return row


def measure_forwards(model: str, dtype: str, optimizer: str, variants: list[str],
                     repeats: int, clock) -> dict:
    """Probe forwards alone (--forwards): extra time over the plain forward, per way."""
    settings = StepSettings(model=model, dtype=dtype, device="cpu", backend="auto", batch=4,
                            seq=64, repeats=repeats, warmup=3, lezo_active=0.25, rank=8,
                            window=14, exact_restore=True, clock="cpu")
    bench, ids = _model_and_batch(settings)
    opt = _make(optimizer, bench, settings, 1e-6, 1e-3)
    for _ in range(2):  # the first step's check decides the virtual path and its scope
        opt.step(lambda: bench.loss(ids))
    probes = opt._probes
    if probes is None:
        raise RuntimeError(f"{optimizer}: no virtual probes ({opt.dense_probe_status})")
    blocks = getattr(opt, "num_layers", None)
    active = getattr(opt, "n_active", None)
    ways = {"current": current, **{name: VARIANTS[name] for name in variants}}
    times: dict[str, list[float]] = defaultdict(list)
    names = list(ways) + ["plain"]
    random = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for round_ in range(settings.warmup + repeats):
            layers = (None if blocks is None else
                      sorted(torch.randperm(blocks, generator=random)[:active].tolist()))
            move = SeededNoise((1000 + round_,), (1e-3,), layers=layers)
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                start = clock()
                if name == "plain":
                    bench.loss(ids)
                else:
                    for target in probes.targets:
                        target.hold(move)
                    try:
                        with ways[name](opt), probes.probing():
                            bench.loss(ids)
                    finally:
                        for target in probes.targets:
                            target.hold(None)
                if round_ >= settings.warmup:
                    times[name].append(1e3 * (clock() - start))
    plain = statistics.median(times["plain"])
    row = dict(model=model, dtype=dtype, optimizer=optimizer, repeats=repeats,
               plain_forward_ms=plain, status=opt.dense_probe_status,
               mode_left_off=probes.scope is not None)
    for name in ways:
        row[f"{name}_probe_forward_extra_ms"] = statistics.median(times[name]) - plain
        if name != "current":
            row[f"current_saves_vs_{name}_ms"] = (row[f"{name}_probe_forward_extra_ms"]
                                                  - row["current_probe_forward_extra_ms"])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--optimizer", default="mezo,lezo")
    parser.add_argument("--variants", default="previous",
                        help=f"comma-separated, of {sorted(VARIANTS)} (may be empty)")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--forwards", action="store_true",
                        help="time the probe forwards alone (no steps)")
    parser.add_argument("--settle-malloc", action="store_true",
                        help="glibc: keep freed memory in the process (no page faults)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.settle_malloc:
        settle_malloc()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (the kernels and GEMMs run in this thread)")
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    torch.set_num_threads(args.threads)
    rows = []
    for dtype in args.dtype.split(","):
        for optimizer in args.optimizer.split(","):
            if args.forwards:
                row = measure_forwards(args.model, dtype, optimizer, variants, args.repeats,
                                       CLOCKS[args.clock])
                rows.append(row)
                print(f"{args.model} {dtype} {optimizer} (plain forward "
                      f"{row['plain_forward_ms']:.2f} ms): probe forward extra ms "
                      + ", ".join(f"{w} {row[w + '_probe_forward_extra_ms']:.2f}"
                                  for w in ["current", *variants])
                      + f"; mode left off somewhere {row['mode_left_off']}", flush=True)
                continue
            row = measure(args.model, dtype, optimizer, variants, args.repeats,
                          CLOCKS[args.clock])
            rows.append(row)
            ways = ["current", *variants, "inplace_no_logs"]
            print(f"{args.model} {dtype} {optimizer} (forwards {row['forwards_ms']:.1f} ms): "
                  + "; ".join(f"{w} step {row[w + '_step_ms']:.1f} ZO {row[w + '_zo_ms']:.1f}"
                              for w in ways)
                  + "; ZO vs in place: "
                  + ", ".join(f"{w} {row[w + '_zo_vs_inplace']:.3f}" for w in ways[:-1]
                              if row[w + "_zo_vs_inplace"] is not None)
                  + "; page faults: "
                  + ", ".join(f"{w} {row[w + '_page_faults']:.0f}" for w in ways)
                  + f"; mode left off somewhere {row['mode_left_off']}; "
                    f"same bits {row['same_bits']}", flush=True)
    if args.json:
        write_report(args.json, ["cpu"], "benchmarks/dense_probe_calls.py", argv,
                     settle_malloc=args.settle_malloc, forwards=args.forwards, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
