"""The virtual dense probes' per-call cost on the CPU: MeZO / LeZO steps whose chunk draws go
through the cpu backend's bound call (`perturb_pieces_cpu`: the perturbation's constant
arguments bound once per probe, the default) against the generic `perturb_cpu` path (every
call rebuilds its arguments, as before 2026-12-07), and the same optimizer with in-place probes
without logs (exact_restore=False), all on copies of one model, stepped in turn (paired: the
machine's noise hits every way alike), with the plain forwards of an identical model timed
after each round; each way takes each place in a round in turn (the first after the forwards
measured 2-4 ms slower than the others).

Reports per way the median step and ZO part (step - the forwards' median) and the ratios to the
in-place steps. The bound and the generic ways must end with the same bits (checked). Timed by
the calling thread's CPU time at 1 thread (`--clock cpu`, the default) or by wall time.

Usage: python benchmarks/dense_probe_calls.py [--model small] [--dtype float32,bfloat16]
       [--optimizer mezo,lezo] [--repeats 25] [--threads 1] [--clock cpu] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch

import zokernels.dense_probe as dense_probe
from zokernels.bench.runner import write_report
from zokernels.bench.step import StepSettings, _case, _plain_forwards

CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def measure(model: str, dtype: str, optimizer: str, repeats: int, clock) -> dict:
    settings = StepSettings(model=model, dtype=dtype, device="cpu", backend="auto", batch=4,
                            seq=64, repeats=repeats, warmup=3, lezo_active=0.25, rank=8,
                            window=14, exact_restore=True, clock="cpu")
    bound_native = dense_probe._Draw._native
    generic = {"on": False}

    def native(self, device):  # the generic path where asked: no bound call
        return None if generic["on"] else bound_native(self, device)

    dense_probe._Draw._native = native
    try:
        ways = {"bound": (_case(optimizer, settings, True, 1e-6, 1e-3), False),
                "generic": (_case(optimizer, settings, True, 1e-6, 1e-3), True),
                "inplace_no_logs": (_case(optimizer + "-inplace", settings, False, 1e-6, 1e-3),
                                    False)}
        forwards = _plain_forwards(optimizer, settings)
        times: dict[str, list[float]] = defaultdict(list)
        names = list(ways)
        for round_ in range(settings.warmup + repeats):
            # each way takes each place in the round in turn: the step after the forwards of
            # another model runs in another cache state (measured: 2-4 ms on small)
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in order:
                case, use_generic = ways[name]
                generic["on"] = use_generic
                start = clock()
                case.one_step()
                if round_ >= settings.warmup:
                    times[name].append(1e3 * (clock() - start))
            start = clock()
            forwards()
            if round_ >= settings.warmup:
                times["forwards"].append(1e3 * (clock() - start))
    finally:
        dense_probe._Draw._native = bound_native
    same = all(torch.equal(a, b) for a, b in zip(ways["bound"][0].params,
                                                  ways["generic"][0].params))
    step = {name: statistics.median(ts) for name, ts in times.items()}
    zo = {name: step[name] - step["forwards"] for name in ways}
    row = dict(model=model, dtype=dtype, optimizer=optimizer, repeats=repeats,
               same_bits=same, forwards_ms=step["forwards"],
               status=ways["bound"][0].opt.dense_probe_status)
    for name in ways:
        row[f"{name}_step_ms"], row[f"{name}_zo_ms"] = step[name], zo[name]
    for name in ("bound", "generic"):
        row[f"{name}_step_vs_inplace"] = step[name] / step["inplace_no_logs"]
        row[f"{name}_zo_vs_inplace"] = (zo[name] / zo["inplace_no_logs"]
                                        if zo["inplace_no_logs"] > 0 else None)
    row["bound_saves_ms"] = step["generic"] - step["bound"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--optimizer", default="mezo,lezo")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (the kernels and GEMMs run in this thread)")
    torch.set_num_threads(args.threads)
    rows = []
    for dtype in args.dtype.split(","):
        for optimizer in args.optimizer.split(","):
            row = measure(args.model, dtype, optimizer, args.repeats, CLOCKS[args.clock])
            rows.append(row)
            print(f"{args.model} {dtype} {optimizer}: step ms bound {row['bound_step_ms']:.1f} "
                  f"generic {row['generic_step_ms']:.1f} "
                  f"in place {row['inplace_no_logs_step_ms']:.1f} "
                  f"(forwards {row['forwards_ms']:.1f}); ZO ms bound {row['bound_zo_ms']:.1f} "
                  f"generic {row['generic_zo_ms']:.1f} in place {row['inplace_no_logs_zo_ms']:.1f};"
                  f" bound saves {row['bound_saves_ms']:.1f} ms; same bits {row['same_bits']}",
                  flush=True)
    if args.json:
        write_report(args.json, ["cpu"], "benchmarks/dense_probe_calls.py", argv, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
