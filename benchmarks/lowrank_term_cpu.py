"""TeZO's virtual-probe Linear term on the CPU: the C++ kernel against the torch reference.

out += ((x V) diag(c)) U^T for N rows, one call per implementation on the same tensors, medians
of repeated calls (thread CPU time at 1 thread, wall time at more). The probes' hook takes the
kernel for the dtypes where it is faster (zokernels/lowrank_probe.py, _NATIVE_TERM_DTYPES).

    PYTHONPATH=. python benchmarks/lowrank_term_cpu.py --threads 1 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

from zokernels.backends.cpu import lowrank_linear_term_cpu
from zokernels.backends.torch import lowrank_linear_term_torch
from zokernels.bench.runner import device_name

# (n, m): small's 256-1024 layers and tied 8192-row head, MiniLM-BERT's 384 / 1536 and its
# 30522-row MLM head, OPT-125m's 768 / 3072 and its 50272-row head
SHAPES = [(256, 256), (256, 1024), (1024, 256), (256, 8192), (384, 1536), (1536, 384),
          (768, 3072), (3072, 768), (384, 30522), (768, 50272)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _median_us(fn, threads: int, repeats: int) -> float:
    clock = time.thread_time if threads == 1 else time.perf_counter
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append((clock() - start) * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, action="append")
    parser.add_argument("--dtype", action="append", choices=list(DTYPES))
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    g = torch.Generator().manual_seed(0)
    for threads in args.threads or [1]:
        torch.set_num_threads(threads)
        for name in args.dtype or list(DTYPES):
            dtype = DTYPES[name]
            for n, m in SHAPES:
                x = torch.randn(args.rows, n, generator=g).to(dtype)
                out = torch.randn(args.rows, m, generator=g).to(dtype)
                u = torch.randn(m, args.rank, generator=g).to(dtype)
                v = torch.randn(n, args.rank, generator=g).to(dtype)
                coef = torch.randn(args.rank, generator=g)
                # alternating, so that drifts of a shared machine fall on both
                reference, kernel = [], []
                for _ in range(3):
                    reference.append(_median_us(
                        lambda: lowrank_linear_term_torch(out, x, u, v, coef), threads,
                        args.repeats))
                    kernel.append(_median_us(
                        lambda: lowrank_linear_term_cpu(out, x, u, v, coef), threads,
                        args.repeats))
                row = {"threads": threads, "dtype": name, "n": n, "m": m,
                       "reference_us": round(statistics.median(reference), 1),
                       "kernel_us": round(statistics.median(kernel), 1)}
                row["ratio"] = round(row["kernel_us"] / row["reference_us"], 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"benchmark": "lowrank_term_cpu",
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                           timespec="seconds"),
                       "device": "cpu", "cpu": device_name("cpu"),
                       "torch": torch.__version__, "python": platform.python_version(),
                       "rows": args.rows, "rank": args.rank,
                       "clock": "thread CPU time at 1 thread, wall time at more",
                       "measure": f"medians of {args.repeats} calls, median of 3 alternating "
                                  "rounds per implementation",
                       "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
