"""Step-time breakdown bars from `zokernels-bench step --json` files: per optimizer, the forward
time and the perturb/update time of one step, the MeZO loop first.

    python benchmarks/plot_step.py benchmarks/results/cpu_step_small_fp32.json \\
        benchmarks/results/cpu_step_small_fp32_no_undo_log.json \\
        --out benchmarks/results/cpu_step_small_fp32.png
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="step JSON files (one panel each)")
    parser.add_argument("--out", required=True, help="PNG path")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    documents = []
    for path in args.json:
        with open(path) as f:
            documents.append(json.load(f))
        if documents[-1].get("mode") != "step":
            parser.error(f"{path} is not a `zokernels-bench step` result")
    fig, axes = plt.subplots(1, len(documents), figsize=(6.5 * len(documents), 4.2), squeeze=False)
    for ax, document in zip(axes[0], documents):
        rows = document["results"]
        names = [r["optimizer"] for r in rows]
        forward = [r["forward_ms"] for r in rows]
        zo = [r["zo_ms"] for r in rows]
        ax.bar(names, forward, label="forward passes", color="#9bb7d4")
        ax.bar(names, zo, bottom=forward, label="perturb / update", color="#d9534f")
        for i, r in enumerate(rows):
            ax.text(i, r["ms"], f"{r['ms']:.0f} ms", ha="center", va="bottom", fontsize=8)
        first = rows[0]
        exact = next((r.get("exact_restore") for r in rows if r.get("exact_restore") is not None),
                     None)
        logs = {True: ", undo logs on", False: ", undo logs off"}.get(exact, "")
        ax.set_title(f"{first['model']} ({first['numel'] / 1e6:.1f}M params), {first['dtype']}, "
                     f"{first['device']}{logs}", fontsize=9)
        ax.set_ylabel("ms per step (median)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
