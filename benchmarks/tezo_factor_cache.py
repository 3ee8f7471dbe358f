"""TeZO's virtual probes with and without the factor cache: the hooks' cost per probe.

Two identical models, each with a TeZO optimizer (virtual probes): one with the default
`factor_cache` (its hooks keep U, V cast to the forward's dtype), one with `factor_cache=0`
(every hook call draws and casts them). After two steps (the first step's tracked forward, the
cache filled), forwards are timed in a shuffled order each round: plain (no hook), probed with
the cache, probed without. The hook cost per probe is the median over rounds of (probed -
plain) of the same round. Then both optimizers step alternately and the update pass over the
2-D weights (LowRankSpace.apply) is timed inside each step: with the cache, an fp32 model's
update takes the kept float32 factors instead of drawing them (bf16 forwards keep bf16 casts:
no difference expected). Also: the cache's bytes, its budget and the full need, as % of the
parameters' bytes, and that both optimizers' probe losses are identical.

    python benchmarks/tezo_factor_cache.py --model small --dtype bfloat16 --threads 1 \\
        --clock cpu --out results.json
"""

from __future__ import annotations

import copy
import pathlib
import random
import statistics
import sys

import torch

from zokernels.bench.step import CLOCKS
from zokernels.lowrank_space import LowRankSpace
from zokernels.optim import TeZO

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# the same models and batches, command line and report
from tezo_virtual import MODELS, parse_arguments, write_report  # noqa: E402


def measure(model_name: str, dtype_name: str, batch: int, seq: int, rank: int, repeats: int,
            warmup: int, clock) -> dict:
    dtype = getattr(torch, dtype_name)
    model, loss_of = MODELS[model_name](dtype, batch, seq)
    twin = copy.deepcopy(model)
    cached = TeZO(model.named_parameters(), lr=1e-6, rank=rank)
    drawn = TeZO(twin.named_parameters(), lr=1e-6, rank=rank, factor_cache=0.0)
    with torch.no_grad():
        for _ in range(2):
            losses = [cached.step(lambda: loss_of(model)), drawn.step(lambda: loss_of(twin))]
            assert torch.equal(torch.as_tensor(losses[0]), torch.as_tensor(losses[1])), losses
    generator = torch.Generator().manual_seed(0)
    coefs = [torch.randn(part.offsets[-1], generator=generator) * 1e-3
             for part in cached._virtual.parts]
    runs = {"plain": (model, None), "cache": (model, cached), "no cache": (twin, drawn)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    shuffle = random.Random(0)
    for r in range(warmup + repeats):
        shuffle.shuffle(order)
        for name in order:
            net, opt = runs[name]
            start = clock()
            with torch.no_grad():
                if opt is None:
                    loss_of(net)
                else:
                    with opt._virtual.probing(coefs):
                        loss_of(net)
            if r >= warmup:
                times[name].append(1e3 * (clock() - start))
    hook = {name: statistics.median(a - b for a, b in zip(times[name], times["plain"]))
            for name in ("cache", "no cache")}
    update = _update_pass_ms({"cache": (model, cached), "no cache": (twin, drawn)}, loss_of,
                             repeats, warmup, clock)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cache = cached._virtual.cache
    need = sum((w.shape[0] + w.shape[1]) * part.ranks[j] * w.element_size()
               for part in cached._virtual.parts for j, w in enumerate(part.weights))
    return dict(model=model_name, dtype=dtype_name, batch=batch, seq=seq, rank=rank,
                virtual_weights=sum(len(part.weights) for part in cached._virtual.parts),
                plain_forward_ms=statistics.median(times["plain"]),
                hook_ms_per_probe={name: round(v, 3) for name, v in hook.items()},
                hook_ratio_cache_vs_not=hook["cache"] / hook["no cache"],
                update_pass_ms={name: round(v, 3) for name, v in update.items()},
                update_ratio_cache_vs_not=update["cache"] / update["no cache"],
                cache_pct_of_params=100 * cache.nbytes / param_bytes,
                budget_pct_of_params=100 * cache.budget / param_bytes,
                full_need_pct_of_params=100 * need / param_bytes,
                extra_memory_pct={"cache": 100 * cached.extra_memory_bytes / param_bytes,
                                  "no cache": 100 * drawn.extra_memory_bytes / param_bytes})


def _update_pass_ms(runs: dict, loss_of, repeats: int, warmup: int, clock) -> dict:
    """Median per step of the time spent in LowRankSpace.apply (the 2-D weights' update) for
    each (model, optimizer), stepped alternately."""
    spent: list[float] = []
    apply = LowRankSpace.apply

    def timed(self, *args, **kwargs):
        start = clock()
        try:
            return apply(self, *args, **kwargs)
        finally:
            spent.append(clock() - start)
    times: dict[str, list[float]] = {name: [] for name in runs}
    LowRankSpace.apply = timed
    try:
        with torch.no_grad():
            for r in range(warmup + repeats):
                for name, (net, opt) in runs.items():
                    spent.clear()
                    opt.step(lambda net=net: loss_of(net))
                    if r >= warmup:
                        times[name].append(1e3 * sum(spent))
    finally:
        LowRankSpace.apply = apply
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(__doc__.splitlines()[0], argv, seq=64, warmup=5, repeats=40)
    results = []
    for model in args.model or ["small", "bert-minilm"]:
        for dtype in args.dtype or ["float32", "bfloat16"]:
            row = measure(model, dtype, args.batch, args.seq, args.rank, args.repeats,
                          args.warmup, CLOCKS[args.clock])
            results.append(row)
            hook = row["hook_ms_per_probe"]
            print(f"{model} {dtype}: forward {row['plain_forward_ms']:.1f} ms; hooks per probe "
                  f"{hook['no cache']:.2f} ms without the cache, {hook['cache']:.2f} ms with it "
                  f"({row['hook_ratio_cache_vs_not']:.2f}x); update pass "
                  f"{row['update_pass_ms']['no cache']:.2f} / {row['update_pass_ms']['cache']:.2f}"
                  f" ms ({row['update_ratio_cache_vs_not']:.2f}x); cache "
                  f"{row['cache_pct_of_params']:.2f}% of the parameters (budget "
                  f"{row['budget_pct_of_params']:.2f}%, all factors "
                  f"{row['full_need_pct_of_params']:.2f}%)", flush=True)
    write_report("tezo_factor_cache", args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
