"""TeZO's ZO part on the `small` decoder, timed from inside the step, for any zokernels version.

Issue 17 asks for the virtual probes' ZO part against "today's in-place exact TeZO", the one of
the version it was filed against. This script uses only the API every version has (TeZO(...,
**options), step(closure), the bench models), so the same command runs on an older checkout:

    git worktree add /tmp/old 71af2d6            # the last commit before issue 17's work
    (cd /tmp/old && pip wheel --no-deps -w /tmp/whl .)  # then copy zokernels/_C*.so out of it
    PYTHONPATH=/tmp/old python benchmarks/tezo_versions.py --mode old
    PYTHONPATH=. python benchmarks/tezo_versions.py --mode inplace --mode virtual --mode deferred

ZO part = step time - the time spent in the closure + the time spent in the virtual probes'
hooks (they run inside the closure's forwards); thread CPU time, 1 thread; medians of the
timed steps after the warm-up; step_ms: the whole step, forwards included (what a hook costs the
forwards beside its own time, e.g. in caches, shows there). Prints one JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from zokernels.bench.models import build_model, synthetic_batch
from zokernels.optim import TeZO

# "old": the version's default (in place with its exact restore, before virtual probes existed);
# "*-reference-term": the virtual probes with the torch reference in place of the C++ Linear term
# (csrc/lowrank_term.cpp; versions that have it), to show its share in the same run
OPTIONS = {"old": {}, "inplace": {"probe": "inplace"}, "virtual": {},
           "deferred": {"update": "deferred"}, "virtual-reference-term": {},
           "deferred-reference-term": {"update": "deferred"}}


def zo_part(mode: str, dtype: torch.dtype, repeats: int, warmup: int) -> dict:
    model = build_model("small", dtype, "cpu")
    ids = synthetic_batch(model, 4, 64, "cpu")
    opt = TeZO(list(model.module.named_parameters()), lr=1e-6, eps=1e-3, seed=0, rank=8,
               **OPTIONS[mode])
    spent = {"closure": 0.0, "hooks": 0.0}

    def closure():
        start = time.thread_time()
        try:
            return model.loss(ids)
        finally:
            spent["closure"] += time.thread_time() - start

    times, steps = [], []
    for i in range(warmup + repeats):
        if (mode.endswith("-reference-term") and getattr(opt, "_virtual", None) is not None
                and "_linear_term" not in vars(opt._virtual)):
            # from the first step that has virtual probes: the warm-up warms the reference too
            from zokernels.backends.torch import lowrank_linear_term_torch
            opt._virtual._linear_term = lambda *args: lowrank_linear_term_torch
        if i == warmup and getattr(opt, "_virtual", None) is not None:
            add_term = opt._virtual._add_term  # called through the instance by the hook

            def timed(*args, add_term=add_term):
                start = time.thread_time()
                try:
                    return add_term(*args)
                finally:
                    spent["hooks"] += time.thread_time() - start
            opt._virtual._add_term = timed
        spent.update(closure=0.0, hooks=0.0)
        start = time.thread_time()
        opt.step(closure)
        step = time.thread_time() - start
        if i >= warmup:
            times.append(1e3 * (step - spent["closure"] + spent["hooks"]))
            steps.append(1e3 * step)
    low, *_, high = statistics.quantiles(times, n=5)
    return {"mode": mode, "dtype": str(dtype).removeprefix("torch."),
            "zo_ms": round(statistics.median(times), 2), "p20_p80": [round(low, 2), round(high, 2)],
            "step_ms": round(statistics.median(steps), 2),
            "extra_memory_bytes": getattr(opt, "extra_memory_bytes", None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", action="append", choices=list(OPTIONS), required=True)
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for dtype in args.dtype or ["float32", "bfloat16"]:
        for mode in args.mode:
            print(json.dumps(zo_part(mode, getattr(torch, dtype), args.repeats, args.warmup)),
                  flush=True)


if __name__ == "__main__":
    main()
