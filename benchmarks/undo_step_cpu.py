"""Exact restore, old and new, side by side: one MeZO step's ZO time and extra memory on the CPU.

Four MeZO (or LeZO: --optimizer lezo) optimizers on the same bench model (zokernels.bench.models, random N(0, 0.02)-like
init), stepped interleaved so that machine noise hits them alike:

  virtual    the default: virtual probes (docs/dense-probes.md), nothing written, no log
  selector   probe="inplace": selector logs (docs/undo-log.md), each pass reads the previous log
  undo-log   the protocol before them: (index, value) undo logs rewritten after each dense pass
             (the in-place optimizer with its logs swapped for UndoLog pairs)
  no-exact   probe="inplace", exact_restore=False: recovery only, no logs

ZO time = step time minus two forwards of an identical model without optimizer, timed right
after each step (a virtual probe draws its noise inside the forward, so the closure's own time
is not the forward's). Medians over the timed steps after warm-up steps (which size the logs and
run the virtual probes' check), ratios against no-exact. --clock cpu (needs
--threads 1: the kernels and the forward then run in the calling thread) times the thread's CPU
time (time.thread_time), which other jobs on a shared machine inflate far less than wall-clock.

Usage: python benchmarks/undo_step_cpu.py [--model small] [--optimizer mezo|lezo]
       [--dtype bfloat16] [--repeats 7]
       [--warmup 2] [--threads 2] [--clock wall] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics

import torch

from zokernels.bench.models import build_model, synthetic_batch
from zokernels.bench.step import CLOCKS
from zokernels.ops.undo import UndoLog
from zokernels.optim import LeZO, MeZO


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--optimizer", choices=["mezo", "lezo"], default="mezo",
                        help="lezo: a quarter of the model's blocks per step")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (other threads' CPU time is not counted)")
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, dtype, "cpu")
    ids = synthetic_batch(model, args.batch, args.seq, "cpu")
    params = [p for p in model.module.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    named = list(model.module.named_parameters())
    common = dict(lr=1e-6, eps=1e-3, seed=0, backend="cpu")
    if args.optimizer == "lezo":
        common.update(layers=model.blocks, n_active=max(1, round(len(model.blocks) / 4)))
    build = MeZO if args.optimizer == "mezo" else LeZO
    opts = {"virtual": build(named, **common),
            "selector": build(named, probe="inplace", **common),
            "undo-log": build(named, probe="inplace", **common),
            "no-exact": build(named, probe="inplace", exact_restore=False, **common)}
    opts["undo-log"]._logs = [(UndoLog(), UndoLog()) for _ in opts["undo-log"]._logs]
    plain = build_model(args.model, dtype, "cpu")

    def closure():
        return model.loss(ids)

    def plain_forwards() -> float:
        start = clock()
        with torch.no_grad():
            plain.loss(ids)
            plain.loss(ids)
        return clock() - start

    zo = {name: [] for name in opts}
    total = {name: [] for name in opts}
    with torch.random.fork_rng():
        for r in range(args.warmup + args.repeats):
            for name, opt in opts.items():
                start = clock()
                opt.step(closure)
                elapsed = clock() - start
                forwards = plain_forwards()
                if r >= args.warmup:
                    zo[name].append(1e3 * (elapsed - forwards))
                    total[name].append(1e3 * elapsed)
    base = statistics.median(zo["no-exact"])
    rows = []
    for name, opt in opts.items():
        extra = opt.extra_memory_bytes
        row = dict(variant=name, zo_ms=statistics.median(zo[name]),
                   step_ms=statistics.median(total[name]), zo_vs_no_exact=statistics.median(
                       zo[name]) / base, extra_memory_bytes=extra,
                   extra_bytes_per_param=extra / sum(p.numel() for p in params),
                   extra_percent_of_params=100 * extra / param_bytes,
                   undo_overflows=opt.zo_state["undo_overflows"],
                   probes=opt.dense_probe_status)
        rows.append(row)
        print(f"{args.optimizer} {args.model} {args.dtype} {name:9s} ZO {row['zo_ms']:8.1f} ms "
              f"({row['zo_vs_no_exact']:.2f}x no-exact)  step {row['step_ms']:8.1f} ms  extra "
              f"{extra / 1e6:7.2f} MB = {row['extra_bytes_per_param']:.3f} B/param = "
              f"{row['extra_percent_of_params']:.2f}% of the parameters", flush=True)
    doc = {"benchmark": "undo_step_cpu", "date": datetime.datetime.now(datetime.timezone.utc)
           .isoformat(timespec="seconds"), "device": platform.processor() or platform.machine(),
           "torch": torch.__version__, "threads": args.threads, "model": args.model,
           "optimizer": args.optimizer,
           "dtype": args.dtype, "numel": sum(p.numel() for p in params), "param_bytes": param_bytes,
           "repeats": args.repeats, "warmup": args.warmup, "batch": args.batch, "seq": args.seq,
           "command": "python benchmarks/undo_step_cpu.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json"),
           "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
