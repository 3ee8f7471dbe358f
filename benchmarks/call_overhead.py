"""Per-call cost on many small tensors (LoRA adapters): perturb_, ParameterSpace, the MeZO loop.

Small tensors make every approach launch- or Python-bound; this measures what a ZO step pays per
pass for the bookkeeping alone, with and without a LeZO layer selection (layers=). Usage:

    python benchmarks/call_overhead.py [--shape-set opt-1.3b-lora | --tiny-tensors 2000]
        [--active 6] [--baseline-rev HEAD~1] [--json out.json]

Layer cases (the space registered with `--layers` blocks; parameters named `layers.<i>.` go to
block i, the rest to no block): "same selection" repeats one selection (LeZO's +eps, -eps and
update passes of one step), "new selection" cycles through 64 different ones (a new step every
call). `--baseline-rev REV` also times zokernels/space.py as it was at git revision REV, loaded
next to the current one, so before and after are measured side by side in one process.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import zokernels
from zokernels.bench.runner import environment, mezo_loop
from zokernels.bench.shapes import model_shapes, numel
from zokernels.bench.timing import measure

ROOT = Path(__file__).resolve().parent.parent
SELECTIONS = 64
WARMUP = 2
ROUNDS = 3


def load_space_at(rev: str):
    """zokernels/space.py at git revision `rev`, imported as a module of the zokernels package
    (its relative imports resolve to the current package)."""
    source = subprocess.run(["git", "show", f"{rev}:zokernels/space.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "space_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("zokernels._space_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def layer_groups(names: list[str], count: int) -> list[list[str]]:
    """Parameter names per block, from their `layers.<i>.` component."""
    blocks: list[list[str]] = [[] for _ in range(count)]
    for name in names:
        match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if match and int(match.group(1)) < count:
            blocks[int(match.group(1))].append(name)
    return [b for b in blocks if b]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape-set", default="opt-1.3b-lora")
    parser.add_argument("--tiny-tensors", type=int, default=None, metavar="T",
                        help="instead of a shape set: T tensors of 8 elements in --layers blocks")
    parser.add_argument("--layers", type=int, default=24, help="blocks of --tiny-tensors")
    parser.add_argument("--active", type=int, default=None,
                        help="blocks per selection (default: a quarter)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--baseline-rev", default=None, metavar="REV")
    parser.add_argument("--no-loop", action="store_true", help="skip the MeZO loop and perturb_")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)

    if args.tiny_tensors is not None:
        label = f"tiny-{args.tiny_tensors}x8"
        shapes = [(f"layers.{j % args.layers}.t{j}.weight", (8,))
                  for j in range(args.tiny_tensors)]
    else:
        label = args.shape_set
        shapes = model_shapes(args.shape_set)
    named = [(name, torch.randn(shape, device=args.device)) for name, shape in shapes]
    params = [t for _, t in named]
    blocks = layer_groups([n for n, _ in named], 10**6)
    active = args.active if args.active is not None else max(1, len(blocks) // 4)
    rng = random.Random(0)
    selections = [sorted(rng.sample(range(len(blocks)), active)) for _ in range(SELECTIONS)]
    cycle = iter(range(10**9))

    def next_selection():
        return selections[next(cycle) % SELECTIONS]

    spaces = {"": zokernels.ParameterSpace}
    if args.baseline_rev:
        spaces[f" [{args.baseline_rev}]"] = load_space_at(args.baseline_rev).ParameterSpace

    cases = []
    if not args.no_loop:
        cases += [("mezo-loop", lambda: mezo_loop(params, 1, 1e-3)),
                  ("perturb_", lambda: zokernels.perturb_(params, 1, 1e-3))]
    for suffix, cls in spaces.items():
        flat = cls(named)
        layered = cls(named, layers=blocks)
        same = selections[0]
        cases += [(f"ParameterSpace.perturb{suffix}", lambda flat=flat: flat.perturb(1, 1e-3)),
                  (f"layers=, same selection{suffix}",
                   lambda layered=layered: layered.perturb(1, 1e-3, layers=same)),
                  (f"layers=, new selection{suffix}",
                   lambda layered=layered: layered.perturb(1, 1e-3, layers=next_selection()))]
    touched = len(layered.indices(selections[0]))
    # Case by case, in ROUNDS rounds (a change of machine load hits every case, not one); the
    # median over all samples. Not interleaved call by call: that made one ParameterSpace pass
    # over 200 tiny tensors take 1.8 ms instead of 0.24 ms on 2 cores (each case then pays for
    # the switch from the previous one, apparently thread pools waking up), not the case itself.
    samples = {name: [] for name, _ in cases}
    for _ in range(ROUNDS):
        for name, fn in cases:
            samples[name] += measure(fn, device=args.device, warmup=WARMUP,
                                     repeats=args.repeats).samples_ms
    print(f"{label}: {len(params)} tensors, {numel(shapes) / 1e6:.3f}M elements, {len(blocks)} "
          f"blocks, {active} per selection ({touched} tensors), {args.device}, "
          f"{torch.get_num_threads()} threads, medians of {ROUNDS} rounds x {args.repeats} calls "
          f"after {WARMUP} warm-up calls each")
    results = []
    for name, values in samples.items():
        ms, p20, p80 = (statistics.quantiles(values, n=10, method="inclusive")[k] for k in (4, 1, 7))
        print(f"  {name:<40} {ms:8.3f} ms  ({p20:.2f}-{p80:.2f})")
        results.append({"case": name, "ms": ms, "ms_p20": p20, "ms_p80": p80,
                        "repeats": ROUNDS * args.repeats, "warmup": WARMUP})
    if args.json:
        doc = {**environment([args.device]), "mode": "call_overhead",
               "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"),
               "command": " ".join(["python", "benchmarks/call_overhead.py",
                                    *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
               "shape_set": label, "tensors": len(params), "numel": numel(shapes),
               "blocks": len(blocks), "active": active, "tensors_per_selection": touched,
               "selections_cycled": SELECTIONS, "baseline_rev": args.baseline_rev,
               "results": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
