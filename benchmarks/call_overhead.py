"""Per-call cost on many small tensors (LoRA adapters): perturb_, ParameterSpace, the MeZO loop.

Small tensors make every approach launch- or Python-bound; this measures what a ZO step pays per
pass for the bookkeeping alone. Usage: python benchmarks/call_overhead.py [--shape-set opt-1.3b-lora]
"""

from __future__ import annotations

import argparse
import sys

import torch

import zokernels
from zokernels.bench.runner import mezo_loop
from zokernels.bench.shapes import model_shapes, numel
from zokernels.bench.timing import measure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape-set", default="opt-1.3b-lora")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    shapes = model_shapes(args.shape_set)
    named = [(name, torch.randn(shape, device=args.device)) for name, shape in shapes]
    params = [t for _, t in named]
    space = zokernels.ParameterSpace(named)

    rows = [("mezo-loop", measure(lambda: mezo_loop(params, 1, 1e-3), device=args.device,
                                  repeats=args.repeats)),
            ("perturb_", measure(lambda: zokernels.perturb_(params, 1, 1e-3), device=args.device,
                                 repeats=args.repeats)),
            ("ParameterSpace.perturb", measure(lambda: space.perturb(1, 1e-3), device=args.device,
                                               repeats=args.repeats))]
    print(f"{args.shape_set}: {len(params)} tensors, {numel(shapes) / 1e6:.2f}M elements, "
          f"{args.device}, {torch.get_num_threads()} threads")
    base = rows[0][1].median_ms
    for label, timing in rows:
        print(f"  {label:<24} {timing.median_ms:8.3f} ms  ({timing.spread()})  "
              f"{base / timing.median_ms:5.1f}x vs MeZO loop  "
              f"{timing.median_ms * 1e3 / len(params):6.1f} us per tensor (with the noise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
