"""What an exact restore must keep: the selector streams, measured (docs/undo-log.md).

For weights theta and a perturbation D = eps * z (z standard normal), y = round(theta + D). A
reader knows y and D: r = round(y - D) is theta unless the element fails a test on (y, D); those
("kept") keep key(theta) - key(r) in a few bits of their block's stream
(zokernels/backends/torch/selector_log.py). This script reports, per dtype and eps, on
N(0, 0.02) weights and on the worst cases (zeros, tiny values, -0.0, NaN):

  kept                fraction of elements the stream keeps (each costs >= 1 bit)
  moved               fraction with theta != r (they cost >= 3 bits)
  recovery_wrong      fraction that recovery alone (applied=) gets wrong (the undo log's entries)
  bits_per_element    mean stream bits per element
  block_bits          per block of 1024 elements: mean / p99 / p99.9 / max stream bits
  layouts             bytes per element of one log for region sizes (words per block incl. the
                      header word): regions + the pool words of the blocks that spill, and % of
                      the parameters' bytes for the two logs a step keeps at most
  old_log             bytes per element of the undo log's (index, value) entries
                      (recovery_wrong x (8 + itemsize)), per pass

Usage: python benchmarks/undo_memory.py [--elements 2097152] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch

from zokernels.backends.torch.selector_log import BLOCK, stream_stats

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REGION_WORDS = (4, 6, 8, 9, 10, 12, 14, 16)


def _summary(theta: torch.Tensor, d: torch.Tensor) -> dict:
    stats = stream_stats(theta, d)
    per_block = stats["block_bits"].to(torch.float64)
    n = theta.numel()
    itemsize = theta.element_size()
    out = {"elements": n, "kept": float(stats["kept"].float().mean()),
           "moved": float(stats["moved"].float().mean()),
           "recovery_wrong": float(stats["recovery_wrong"].float().mean()),
           "bits_per_element": float(per_block.sum()) / n}
    blocks = n // BLOCK
    if blocks:
        per_block = per_block[:blocks]
        q = torch.quantile(per_block, torch.tensor([0.99, 0.999], dtype=torch.float64))
        out["block_bits"] = {"mean": float(per_block.mean()), "p99": float(q[0]),
                             "p99.9": float(q[1]), "max": float(per_block.max())}
        words = torch.ceil(per_block / 32)
        layouts = {}
        for w in REGION_WORDS:
            spill = words > (w - 1)
            per_elem = (4 * w * blocks + 4 * float(words[spill].sum())) / (blocks * BLOCK)
            layouts[str(w)] = {"bytes_per_element": per_elem,
                               "spilled_blocks": float(spill.float().mean()),
                               "two_logs_percent_of_params": 200 * per_elem / itemsize}
        out["layouts"] = layouts
    out["old_log_bytes_per_element"] = out["recovery_wrong"] * (8 + itemsize)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 21)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    n = args.elements
    results = []
    for name, dtype in DTYPES.items():
        for eps in (1e-3, 1e-4):
            z = torch.randn(n, generator=gen)
            d = (eps * z).to(torch.float32)
            cases = {
                "normal_0.02": (0.02 * torch.randn(n, generator=gen)).to(dtype),
                "zeros": torch.zeros(n, dtype=dtype),
                "negative_zeros": torch.full((n,), -0.0, dtype=dtype),
                "tiny_1e-5": (1e-5 * torch.randn(n, generator=gen)).to(dtype),
                "tiny_1e-7": (1e-7 * torch.randn(n, generator=gen)).to(dtype),
                "nan": torch.full((n,), float("nan"), dtype=dtype),
            }
            for case, theta in cases.items():
                row = {"dtype": name, "eps": eps, "weights": case}
                row.update(_summary(theta, d))
                results.append(row)
                lay = row.get("layouts", {})
                print(f"{name:9s} eps={eps:g} {case:14s} kept={row['kept']:.4f} moved={row['moved']:.4f} "
                      f"wrong={row['recovery_wrong']:.4f} bits/elem={row['bits_per_element']:.3f} "
                      f"block p99.9={row.get('block_bits', {}).get('p99.9', 0):.0f} "
                      + " ".join(f"W{w}:{v['two_logs_percent_of_params']:.2f}%"
                                 for w, v in lay.items()), flush=True)
    doc = {"benchmark": "undo_memory", "date": datetime.datetime.now(datetime.timezone.utc)
           .isoformat(timespec="seconds"), "device": platform.processor() or platform.machine(),
           "torch": torch.__version__, "command": "python benchmarks/undo_memory.py "
           f"--elements {n}", "block": BLOCK, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
