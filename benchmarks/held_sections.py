"""What holding SIGINT costs a step: the same optimizer stepped with zokernels' held sections
(zokernels._signals.interrupts_deferred) and with them replaced by a no-op, alternately in one
process, on a small MLP (`--width` x `--width` linear layers, `--layers` of them) where a step
takes about a millisecond and a fixed cost shows. Medians of `--steps` steps per way, thread
CPU time at 1 thread, and the number of sections a step enters.

Usage: python benchmarks/held_sections.py [--optimizers mezo-inplace,mezo,tezo] [--steps 300]
       [--width 64] [--layers 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

import zokernels._signals as signals
from zokernels import held
from zokernels.bench.runner import write_report
from zokernels.optim import MeZO, TeZO, base, mezo, tezo

# every module that opens a held section on a step's path
_USERS = (held, base, mezo, tezo)


def _use(section) -> None:
    for module in _USERS:
        module.interrupts_deferred = section


def build(name: str, net: torch.nn.Module):
    if name == "mezo-inplace":
        return MeZO(net.parameters(), lr=1e-4, probe="inplace")
    if name == "mezo":
        return MeZO(net.parameters(), lr=1e-4)
    if name == "tezo":
        return TeZO(net.parameters(), lr=1e-4, rank=4)
    raise ValueError(f"unknown optimizer {name!r} (mezo-inplace, mezo, tezo)")


def measure(name: str, width: int, layers: int, steps: int) -> dict:
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    x = torch.randn(8, width)
    opt = build(name, net)
    closure = lambda: net(x).pow(2).mean()  # noqa: E731
    entered = [0]

    @contextlib.contextmanager
    def counted():
        entered[0] += 1
        with signals.interrupts_deferred():
            yield

    _use(counted)
    for _ in range(20):  # warm-up (logs sized, factors cached)
        opt.step(closure)
    entered[0] = 0
    opt.step(closure)
    per_step = entered[0]
    times: dict[str, list[float]] = {"held": [], "none": []}
    try:
        for i in range(2 * steps):
            way = "held" if i % 2 else "none"
            _use(signals.interrupts_deferred if way == "held" else contextlib.nullcontext)
            start = time.thread_time()
            opt.step(closure)
            times[way].append(1e3 * (time.thread_time() - start))
    finally:
        _use(signals.interrupts_deferred)
    held_ms, none_ms = (statistics.median(times[w]) for w in ("held", "none"))
    return dict(optimizer=name, width=width, layers=layers, sections_per_step=per_step,
                ms_held=held_ms, ms_without=none_ms, us_per_step=1e3 * (held_ms - none_ms))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default="mezo-inplace,mezo,tezo")
    parser.add_argument("--steps", type=int, default=300, help="steps per way")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for name in args.optimizers.split(","):
        row = measure(name, args.width, args.layers, args.steps)
        results.append(row)
        print(f"{name}: {row['ms_without']:.3f} ms without held sections, {row['ms_held']:.3f} "
              f"ms with ({row['sections_per_step']} entered per step): "
              f"{row['us_per_step']:+.0f} us per step (medians of {args.steps}, thread CPU)")
    if args.json:
        write_report(args.json, ["cpu"], "benchmarks/held_sections.py", argv, steps=args.steps,
                     results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
