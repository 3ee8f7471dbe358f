"""Selector-log passes on one tensor (CPU): what exact restore costs per pass.

One N(0, 0.02) tensor, MeZO's three moves with and without selector logs
(ParameterSpace.apply with log= / held_log=), timed interleaved, medians:

  plain +eps       a plain perturbation pass (no recovery, no log)
  recover move     a recovering pass (applied=, no log)
  log write +eps   a pass that writes a selector log
  3 passes logged  +eps (log L1), -eps reading L1 writing L2, restore reading L2
  3 passes plain   the same three moves with recovery only (exact_restore=False)

--clock cpu (with --threads 1) times the calling thread's CPU time (time.thread_time: the
kernel runs in that thread), which other jobs on a shared machine do not inflate; --clock wall
times wall-clock (the figure for --threads > 1).

Usage: PYTHONPATH=$PWD python benchmarks/selector_cpu.py [--dtype bfloat16] [--numel 4000000]
       [--eps 1e-3] [--threads 2] [--clock wall] [--repeats 15] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from zokernels.ops.undo import SelectorLog
from zokernels.space import ParameterSpace


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--numel", type=int, default=4_000_000)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter((0.02 * torch.randn(args.numel, generator=g)).to(getattr(torch,
                                                                                   args.dtype)))
    space = ParameterSpace([("w", p)], backend="cpu")
    logs = [SelectorLog(), SelectorLog()]
    eps = args.eps

    def log_write():
        logs[0].clear()
        space.apply([1], [eps], log=logs[0])

    def logged():
        logs[0].clear()
        logs[1].clear()
        space.apply([1], [eps], log=logs[0])
        space.apply([1], [-eps], applied=[eps], log=logs[1], held_log=logs[0])
        space.apply([1], [0.0], applied=[-eps], held_log=logs[1])

    def plain():
        space.apply([1], [eps])
        space.apply([1], [-eps], applied=[eps])
        space.apply([1], [0.0], applied=[-eps])

    cases = {"plain +eps": lambda: space.apply([1], [eps]),
             "recover move": lambda: space.apply([1], [-eps], applied=[eps]),
             "log write +eps": log_write, "3 passes logged": logged, "3 passes plain": plain}
    logged()  # sizes the logs (count-only probes)
    times = {name: [] for name in cases}
    for _ in range(args.repeats + 1):
        for name, fn in cases.items():
            start = clock()
            fn()
            times[name].append(1e3 * (clock() - start))
    rows = {name: statistics.median(t[1:]) for name, t in times.items()}
    for name, ms in rows.items():
        print(f"{args.dtype} {name:16s} {ms:8.2f} ms")
    print(f"{args.dtype} logged / plain step: {rows['3 passes logged'] / rows['3 passes plain']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "selector_cpu", **vars(args), "ms": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
