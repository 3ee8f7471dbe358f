"""One perturb_ pass over a model's parameters on the CPU, against the MeZO-style loop.

Side by side in one run, medians over repeats after a warm-up:
  mezo-loop     torch.manual_seed(s); per tensor z = torch.normal(0, 1, size, dtype);
                p.data = p.data + scale * z            (MeZO's zo_perturb_parameters)
  randn-add     per tensor p.add_(torch.randn_like(p), alpha=scale)   (in place, still z in memory)
  copy          dst.copy_(src) per tensor: the memory-traffic floor (same bytes as perturb_)
  perturb_      zokernels, K seeds in one pass, gaussian / rademacher

Usage:  python benchmarks/perturb_cpu.py [--shape-set opt-125m] [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys

import torch

import zokernels
from zokernels.bench.runner import mezo_loop, randn_add_loop
from zokernels.bench.shapes import model_shapes, numel
from zokernels.bench.timing import measure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape-set", default="opt-125m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    shapes = model_shapes(args.shape_set)
    params = [torch.randn(shape) for _, shape in shapes]
    copies = [torch.empty_like(p) for p in params]
    total = numel(shapes)
    bytes_per_pass = 2 * 4 * total  # fp32 read + write of every element

    rows = []

    def run(label, fn, dist="gaussian", k=1):
        timing = measure(fn, repeats=args.repeats)
        rows.append(dict(op=label, dist=dist, k=k, ms=timing.median_ms, ms_p20=timing.p20_ms,
                         ms_p80=timing.p80_ms, gbps=bytes_per_pass / timing.median_ms / 1e6))
        print(f"  {label:<22} {dist:<10} K={k:<3} {timing.median_ms:9.1f} ms  "
              f"({timing.spread()})", file=sys.stderr, flush=True)

    print(f"{args.shape_set}: {len(shapes)} tensors, {total / 1e6:.1f}M fp32 elements, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    run("mezo-loop", lambda: mezo_loop(params, 1, 1e-3))
    run("randn-add", lambda: randn_add_loop(params, 1, 1e-3))
    run("copy", lambda: [c.copy_(p) for c, p in zip(copies, params)], dist="-", k=0)
    for dist in ("gaussian", "rademacher"):
        for k in (1, 2, 14):
            seeds, scales = list(range(1, k + 1)), [1e-3 / k] * k
            run(f"perturb_[{args.backend}]",
                lambda: zokernels.perturb_(params, seeds, scales, dist=dist, backend=args.backend),
                dist=dist, k=k)

    base = rows[0]["ms"]
    copy_gbps = next(r["gbps"] for r in rows if r["op"] == "copy")
    print()
    print(f"{'op':<22} {'dist':<10} {'K':>3} {'ms':>9} {'p20-p80':>15} {'GB/s':>7} {'%copy':>6} "
          f"{'vs mezo':>8}")
    for r in rows:
        r["pct_copy_bw"] = 100 * r["gbps"] / copy_gbps
        r["speedup_vs_mezo_loop"] = base / r["ms"]
        print(f"{r['op']:<22} {r['dist']:<10} {r['k']:>3} {r['ms']:>9.1f} "
              f"{r['ms_p20']:>7.1f}-{r['ms_p80']:<7.1f} {r['gbps']:>7.2f} {r['pct_copy_bw']:>5.0f}% "
              f"{r['speedup_vs_mezo_loop']:>7.2f}x")
    if args.json:
        from zokernels.backends.cpu import build_info

        result = dict(
            device=f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            torch=torch.__version__, zokernels=zokernels.__version__, python=platform.python_version(),
            cpu_extension=build_info(),
            timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command="python " + " ".join(sys.argv), shape_set=args.shape_set, numel=total,
            tensors=len(shapes), repeats=args.repeats, results=rows)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
