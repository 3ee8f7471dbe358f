"""TeZO's ZO part per step: in-place exact probes vs virtual probes vs virtual + deferred updates.

ZO part = step time - the time of two plain forwards of the same model on the same batch (no
optimizer, no hooks), measured right after each step, interleaved with the modes: the virtual
probes' hook work happens inside the step's forwards, so the forwards the step would cost
anyway are what is subtracted. Medians over the repeats of one run, ratios against in-place.
That difference of two forwards of ~100 ms each moves by several ms from step to step, as much
as a virtual step's whole ZO part on `small`; so the same steps are also timed from inside
("zo_inside"): step time - the time spent in the closure's forwards + the time spent in the
probe hooks (which run inside those forwards), each read with the same clock around the calls.
It leaves out what the hooks cost the rest of the forward (caches), and has no subtraction of
two different runs.
Also: extra memory (opt.extra_memory_bytes), the merge time of the deferred mode, the loss
agreement of the virtual probes with the in-place ones (same weights, lr = 0), and which 2-D
weights the first step kept virtual.

    python benchmarks/tezo_virtual.py --model bert-minilm --dtype float32 --out results.json

--clock cpu (with --threads 1) times the thread's CPU time instead of wall time: on a shared
machine it moves far less between runs.

Models: bert-minilm (transformers BertForSequenceClassification from a BertConfig with MiniLM's
shapes: hidden 384, 12 layers, 12 heads, intermediate 1536, vocab 30522; random weights) and
the `small` decoder of `zokernels-bench step` (its LM head is an nn.Linear tied to the token
embedding: both read through hooked modules, so all its 2-D weights are virtual).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time

import torch

import zokernels
from zokernels.bench.models import build_model, synthetic_batch
from zokernels.bench.step import CLOCKS
from zokernels.optim import TeZO
from zokernels.optim.tezo import tau_seed

MODES = {"inplace": dict(probe="inplace"), "virtual": dict(probe="virtual"),
         "deferred": dict(probe="virtual", update="deferred")}


def bert_minilm(dtype: torch.dtype, batch: int, seq: int):
    import transformers

    config = transformers.BertConfig(hidden_size=384, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=1536,
                                     num_labels=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(config).to(dtype).eval()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
        labels = torch.randint(0, 2, (batch,), generator=g)
    return model, lambda m: m(input_ids=ids, labels=labels).loss


def small_decoder(dtype: torch.dtype, batch: int, seq: int):
    bench = build_model("small", dtype, "cpu")
    ids = synthetic_batch(bench, batch, seq, "cpu")
    module = bench.module

    def loss(m):
        from zokernels.bench.models import lm_loss
        return lm_loss(m(ids), ids)
    return module, loss


MODELS = {"bert-minilm": bert_minilm, "small": small_decoder}


def float64_losses(base, loss_of, opt: TeZO, held: list[dict], eps: float) -> list[float]:
    """L(theta + eps Z), L(theta - eps Z) in float64 at step 0: 2-D weights
    theta + s U diag(tau) V^T / sqrt(r) from the optimizer's own factors, 1-D parameters as they
    were held during each probe."""
    losses = []
    for sign, state_1d in zip((1.0, -1.0), held):
        twin = copy.deepcopy(base).double()
        params = dict(twin.named_parameters())
        with torch.no_grad():
            for name, value in state_1d.items():
                params[name].copy_(value.double())
            for state in opt.lowrank:
                tau = state.taus(tau_seed(opt.base_seed, 0), opt.backend)
                for j, name in enumerate(state.names):
                    t = (tau * state.rank_norm)[state.offsets[j]:state.offsets[j + 1]].double()
                    u, v = state.factors(j)  # drawn for this weight only
                    z = u.double() @ torch.diag(t) @ v.double().T
                    params[name].add_(sign * eps * z)
            losses.append(float(loss_of(twin)))
    return losses


def measure(model_name: str, dtype_name: str, batch: int, seq: int, rank: int, warmup: int,
            repeats: int, lr: float, eps: float, clock=time.perf_counter) -> dict:
    dtype = getattr(torch, dtype_name)
    base, loss_of = MODELS[model_name](dtype, batch, seq)
    params = [p for p in base.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)

    # loss agreement: the same weights (lr = 0), 3 steps, every probe loss; the first step's
    # projected gradient of each mode against float64 losses at theta +- eps Z
    agreement, first, truth = {}, {}, None
    for mode in ("inplace", "virtual"):
        model = copy.deepcopy(base)
        opt = TeZO(model.named_parameters(), lr=0.0, eps=eps, rank=rank, seed=0, **MODES[mode])
        seen: list[float] = []
        held: list[dict] = []

        def closure(model=model, seen=seen, held=held):
            held.append({n: p.detach().clone() for n, p in model.named_parameters()
                         if p.dim() == 1})
            loss = loss_of(model)
            seen.append(float(loss))
            return loss
        opt.step(closure)
        first[mode] = seen[-2:]
        if mode == "virtual":
            truth = float64_losses(base, loss_of, opt, held[-2:], eps)
        for _ in range(2):
            opt.step(closure)
        agreement[mode] = seen[-6:]
    rel = [abs(v - i) / abs(i) for v, i in zip(agreement["virtual"], agreement["inplace"])]
    def grad(pair):
        return (pair[0] - pair[1]) / (2 * eps)
    grad_error = {mode: abs(grad(pair) - grad(truth)) / abs(grad(truth))
                  for mode, pair in first.items()}
    loss_error = {mode: max(abs(a - b) / abs(b) for a, b in zip(pair, truth))
                  for mode, pair in first.items()}

    models = {mode: copy.deepcopy(base) for mode in MODES}
    opts = {mode: TeZO(models[mode].named_parameters(), lr=lr, eps=eps, rank=rank, seed=0,
                       **options) for mode, options in MODES.items()}
    plain = copy.deepcopy(base)
    for _ in range(warmup):
        for mode, opt in opts.items():
            opt.step(lambda m=models[mode]: loss_of(m))
    steps = {mode: [] for mode in MODES}
    zo = {mode: [] for mode in MODES}
    inside = {mode: [] for mode in MODES}
    forwards = []
    spent = {mode: {"closure": 0.0, "hooks": 0.0} for mode in MODES}
    for mode, opt in opts.items():
        _time_hooks(opt, spent[mode], clock)
    with torch.no_grad():
        for _ in range(repeats):
            for mode, opt in opts.items():
                spent[mode].update(closure=0.0, hooks=0.0)
                closure = _timed_closure(lambda m=models[mode]: loss_of(m), spent[mode], clock)
                start = clock()
                opt.step(closure)
                step_ms = 1e3 * (clock() - start)
                start = clock()
                loss_of(plain)
                loss_of(plain)
                two_forwards = 1e3 * (clock() - start)
                steps[mode].append(step_ms)
                zo[mode].append(step_ms - two_forwards)
                inside[mode].append(step_ms - 1e3 * (spent[mode]["closure"]
                                                     - spent[mode]["hooks"]))
                forwards.append(two_forwards)
    start = time.perf_counter()
    opts["deferred"].merge()
    merge_ms = 1e3 * (time.perf_counter() - start)
    kept = sorted(n for names in opts["virtual"]._virtual_names() for n in names)
    two_d = sorted(n for n, p in base.named_parameters() if p.dim() == 2 and p.requires_grad)
    rows = {}
    for mode in MODES:
        rows[mode] = dict(step_ms=statistics.median(steps[mode]),
                          zo_ms=statistics.median(zo[mode]),
                          zo_inside_ms=statistics.median(inside[mode]),
                          extra_memory_bytes=opts[mode].extra_memory_bytes,
                          extra_memory_ratio=opts[mode].extra_memory_bytes / param_bytes)
    for mode in MODES:
        rows[mode]["zo_vs_inplace"] = rows[mode]["zo_ms"] / rows["inplace"]["zo_ms"]
        rows[mode]["zo_inside_vs_inplace"] = (rows[mode]["zo_inside_ms"]
                                              / rows["inplace"]["zo_inside_ms"])
    return dict(model=model_name, dtype=dtype_name, batch=batch, seq=seq, rank=rank,
                numel=sum(p.numel() for p in params), param_bytes=param_bytes,
                two_forwards_ms=statistics.median(forwards), modes=rows,
                deferred_merge_ms=merge_ms,
                loss_rel_diff_virtual_vs_inplace=dict(max=max(rel), median=statistics.median(rel)),
                first_losses=dict(first, float64=truth),
                first_loss_rel_error_vs_float64=loss_error,
                first_grad_rel_error_vs_float64=grad_error,
                virtual_weights=len(kept), two_d_weights=len(two_d),
                inplace_2d=[n for n in two_d if n not in set(kept)])


def _timed_closure(closure, spent: dict, clock):
    """closure, adding the time of each call to spent["closure"] (seconds)."""
    def timed():
        start = clock()
        try:
            return closure()
        finally:
            spent["closure"] += clock() - start
    return timed


def _time_hooks(opt: TeZO, spent: dict, clock) -> None:
    """Adds the time of each virtual-probe hook call of `opt` to spent["hooks"] (seconds): the
    hook calls its VirtualLowRank's _add_term through the instance, which this wraps."""
    virtual = getattr(opt, "_virtual", None)
    if virtual is None:
        return
    add_term = virtual._add_term

    def timed(*args):
        start = clock()
        try:
            return add_term(*args)
        finally:
            spent["hooks"] += clock() - start
    virtual._add_term = timed


def parse_arguments(description: str, argv: list[str] | None, seq: int, warmup: int,
                    repeats: int, extra=None) -> argparse.Namespace:
    """The TeZO benchmarks' command line (models, dtypes, shapes, rounds, clock, --out), with
    `extra(parser)` adding a script's own options; sets torch's threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", action="append", choices=list(MODELS))
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="cpu: the thread's CPU time (time.thread_time; needs --threads 1, "
                             "where the kernels and the forwards run in the calling thread), "
                             "which other jobs on a shared machine inflate less than wall time")
    parser.add_argument("--out")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (other threads' CPU time is not counted)")
    torch.set_num_threads(args.threads)
    return args


def write_report(benchmark: str, args: argparse.Namespace, results: list[dict],
                 **fields) -> None:
    """The JSON report (date, command, machine, versions, clock, rounds, results) to --out."""
    report = dict(benchmark=benchmark, date=datetime.datetime.now(datetime.timezone.utc)
                  .isoformat(timespec="seconds"), command=" ".join(["python"] + sys.argv),
                  device="cpu", cpu=platform.processor() or platform.machine(),
                  threads=args.threads, clock=args.clock, torch=torch.__version__,
                  zokernels=zokernels.__version__, python=platform.python_version(),
                  **fields, warmup=args.warmup, repeats=args.repeats, results=results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--lr", type=float, default=1e-6)
        parser.add_argument("--eps", type=float, default=1e-3)

    args = parse_arguments(__doc__.splitlines()[0], argv, seq=32, warmup=2, repeats=9,
                           extra=options)
    clock = CLOCKS[args.clock]
    results = []
    for model in args.model or ["bert-minilm", "small"]:
        for dtype in args.dtype or ["float32", "bfloat16"]:
            row = measure(model, dtype, args.batch, args.seq, args.rank, args.warmup,
                          args.repeats, args.lr, args.eps, clock)
            results.append(row)
            modes = row["modes"]
            print(f"{model} {dtype}: two forwards {row['two_forwards_ms']:.1f} ms; ZO part "
                  + ", ".join(f"{m} {modes[m]['zo_ms']:.1f} ms ({modes[m]['zo_vs_inplace']:.2f}x)"
                              for m in MODES)
                  + "; from inside the step: "
                  + ", ".join(f"{m} {modes[m]['zo_inside_ms']:.1f} ms "
                              f"({modes[m]['zo_inside_vs_inplace']:.2f}x)" for m in MODES)
                  + f"; merge {row['deferred_merge_ms']:.1f} ms; loss rel diff max "
                  f"{row['loss_rel_diff_virtual_vs_inplace']['max']:.2e}; loss error vs float64: "
                  + ", ".join(f"{m} {e:.2e}" for m, e in
                              row["first_loss_rel_error_vs_float64"].items())
                  + "; projected gradient "
                  f"error vs float64: " + ", ".join(f"{m} {e:.2e}" for m, e in
                                                    row["first_grad_rel_error_vs_float64"].items())
                  + "; in-place 2-D "
                  f"{row['inplace_2d']}", flush=True)
    write_report("tezo_virtual", args, results, lr=args.lr, eps=args.eps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
