"""TeZO's virtual-probe Linear term inside whole steps: the C++ kernel against the torch reference.

benchmarks/lowrank_term_cpu.py times one call on tensors it just made; inside a step the inputs
arrive from the forward (its caches, its memory layout). Here one optimizer steps a bench model
with the hook's Linear term forced to one implementation per step, alternating, and the thread
CPU time of every term call is summed per step (1 thread, 4 x 64 tokens, rank 8):

    PYTHONPATH=. python benchmarks/lowrank_term_in_model.py --model small --model opt-125m \
        --dtype bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

from zokernels.backends.cpu import build_info, lowrank_linear_term_cpu
from zokernels.backends.torch import lowrank_linear_term_torch
from zokernels.bench.models import build_model, synthetic_batch
from zokernels.bench.runner import device_name
from zokernels.optim import TeZO

IMPLEMENTATIONS = {"kernel": lowrank_linear_term_cpu, "reference": lowrank_linear_term_torch}


def term_ms(model_name: str, dtype: torch.dtype, rounds: int, warmup: int) -> dict:
    model = build_model(model_name, dtype, "cpu")
    ids = synthetic_batch(model, 4, 64, "cpu")
    opt = TeZO(list(model.module.named_parameters()), lr=1e-6, eps=1e-3, seed=0, rank=8)
    for _ in range(warmup):
        opt.step(lambda: model.loss(ids))
    spent = {name: [] for name in IMPLEMENTATIONS}
    for _ in range(rounds):
        for name, term in IMPLEMENTATIONS.items():
            total = [0.0]

            def timed(out, x, u, v, coef, term=term, total=total):
                start = time.thread_time()
                term(out, x, u, v, coef)
                total[0] += time.thread_time() - start
            # every Linear term of this step through `term`
            opt._virtual._linear_term = lambda output, x, rank, timed=timed: timed
            opt.step(lambda: model.loss(ids))
            spent[name].append(round(1e3 * total[0], 2))
    del opt._virtual._linear_term
    kernel, reference = (statistics.median(spent[n]) for n in IMPLEMENTATIONS)
    return {"model": model_name, "dtype": str(dtype).removeprefix("torch."),
            "kernel_ms": spent["kernel"], "reference_ms": spent["reference"],
            "ratio": round(kernel / reference, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for name in args.model:
        for dtype in args.dtype or ["float32", "bfloat16"]:
            results.append(term_ms(name, getattr(torch, dtype), args.rounds, args.warmup))
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "lowrank_term_in_model",
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                           timespec="seconds"),
                       "device": "cpu", "cpu": device_name("cpu"), "simd": build_info()["simd"],
                       "torch": torch.__version__, "python": platform.python_version(),
                       "threads": 1, "clock": "thread CPU time",
                       "measure": "sum of one step's Linear-term calls (two probes), one step per "
                                  "implementation, alternating, per round",
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
