"""Sweep perturb_ over tensor sizes and model shape sets; write JSON and plot it.

Two sweeps, per fused backend, each row beside a copy and the MeZO loop over the same tensors in
the same run (the engine of `zokernels-bench`, zokernels/bench/runner.py):

  sizes   one tensor of 2^a .. 2^b elements: perturb_ gaussian and rademacher, K=1
          -> <prefix>_bandwidth.png: effective GB/s vs tensor size, with the copy line
  models  shape sets (LoRA adapters to full models): perturb_ gaussian K=1/2, rademacher K=1,
          lowrank_perturb_ r=16 -> <prefix>_speedup.png: speedup vs the MeZO loop vs model size

The JSON (<prefix>.json, the CLI's schema plus a `sweep` field per row) goes to
benchmarks/results/. Plots need matplotlib (pip install 'zokernels[bench]'); --plot-only PATH
re-plots a JSON. The default CPU run takes a few minutes on 2 cores.

Usage:  python benchmarks/sweep_ops.py [--device cpu] [--dtype float32] [--max-log2 24]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys

import torch

from zokernels.bench.cli import UsageError, fused_backends
from zokernels.bench.runner import (
    DTYPE_ALIASES,
    DTYPES,
    MEZO,
    Case,
    Group,
    Progress,
    available_memory_bytes,
    device_name,
    environment,
    get_shape_set,
    run_group,
    single_tensor,
)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# LoRA adapter sets span 0.3M..19M elements, the full models 125M and up: the CPU default stops at
# opt-125m (a MeZO-loop pass over opt-1.3b takes ~10 s on 2 cores); GPUs go to 6.7B parameters.
MODEL_SETS = {
    "cpu": ["opt-125m-lora", "opt-1.3b-lora", "opt-6.7b-lora", "opt-30b-lora", "opt-66b-lora",
            "opt-125m"],
    "cuda": ["opt-125m-lora", "opt-6.7b-lora", "opt-66b-lora", "opt-125m", "opt-1.3b",
             "opt-2.7b", "opt-6.7b"],
}
MAX_LOG2 = {"cpu": 24, "cuda": 26}
# Small tensors take microseconds: time them for about this long in total (up to 500 calls).
TARGET_MS = 300.0


def size_cases(backends: list[str]) -> list[Case]:
    return [MEZO] + [Case("perturb_", b, dist, 1, "nearest")
                     for b in backends for dist in ("gaussian", "rademacher")]


def model_cases(backends: list[str]) -> list[Case]:
    cases = [MEZO]
    for b in backends:
        cases += [Case("perturb_", b, "gaussian", 1, "nearest"),
                  Case("perturb_", b, "gaussian", 2, "nearest"),
                  Case("perturb_", b, "rademacher", 1, "nearest"),
                  Case("lowrank_perturb_", b, rounding="nearest", rank=16)]
    return cases


def sweep(args: argparse.Namespace) -> dict:
    device = args.device
    kind = torch.device(device).type
    notes: list[str] = []
    backends = fused_backends(args.backend or ["auto"], [device], notes)[device]
    free = available_memory_bytes(device)
    groups: list[tuple[str, Group]] = []
    for log2 in range(args.min_log2, (args.max_log2 or MAX_LOG2[kind]) + 1, args.step):
        groups.append(("size", Group(single_tensor(1 << log2), args.dtype, device,
                                     size_cases(backends))))
    for name in args.shape_set or MODEL_SETS[kind]:
        groups.append(("model", Group(get_shape_set(name), args.dtype, device,
                                      model_cases(backends))))
    fitting = []
    for sweep_name, group in groups:
        needed = sum(group.required_bytes().values())
        if free is not None and needed > 0.9 * free:
            notes.append(f"skipped {group.shape_set.name}: needs {needed / 1e9:.1f} GB, "
                         f"{free / 1e9:.1f} GB free")
        else:
            fitting.append((sweep_name, group))

    progress = Progress(sum(len(g.cases) for _, g in fitting))
    results: list[dict] = []
    for sweep_name, group in fitting:
        def on_start(case: Case, group: Group = group) -> None:
            progress.start(f"{group.shape_set.name}: {case.label()}")

        def on_done(case: Case, row: dict) -> None:
            progress.finish(f"{row['ms']:.3g} ms")

        rows = run_group(group, warmup=args.warmup, repeats=args.repeats,
                         target_ms=TARGET_MS if sweep_name == "size" else None,
                         on_start=on_start, on_done=on_done)
        results += [dict(row, sweep=sweep_name) for row in rows]

    document = environment([device])
    document.update(
        mode="sweep", timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        command=shlex.join(["python", "benchmarks/sweep_ops.py", *sys.argv[1:]]),
        warmup={device: args.warmup}, repeats={device: args.repeats}, notes=notes, skipped=[],
        results=results)
    return document


# ------------------------------------------------------------------------------------------ plots

def _series_label(row: dict) -> str:
    if row["op"] == "copy":
        return "copy_ (memory reference)"
    if row["op"] == "mezo-loop":
        return "MeZO loop (torch.normal + add)"
    if row["op"] == "lowrank_perturb_":
        return f"lowrank_perturb_ [{row['backend']}] r={row['rank']}"
    return f"perturb_ [{row['backend']}] {row['dist']} K={row['k']}"


def _style(label: str) -> dict:
    if label.startswith("copy"):
        return dict(color="black", linestyle="--", marker="")
    if label.startswith("MeZO"):
        return dict(color="0.55", linestyle="-", marker="s", markersize=4)
    return dict(marker="o", markersize=4)


def _series(rows: list[dict], key: str) -> dict[str, list[tuple[float, float, str]]]:
    series: dict[str, list[tuple[float, float, str]]] = {}
    for row in rows:
        if row[key] is not None:
            series.setdefault(_series_label(row), []).append((row["numel"], row[key],
                                                              row["shape_set"]))
    return {label: sorted(points) for label, points in series.items()}


def plot(document: dict, prefix: str) -> list[str]:
    """The two PNGs; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    rows = document["results"]
    dtype = rows[0]["dtype"] if rows else "?"
    where = f"{document['device']}, {document['threads']} threads, torch {document['torch']}"
    written = []

    sizes = [r for r in rows if r["sweep"] == "size"]
    if sizes:
        fig, ax = plt.subplots(figsize=(8, 5))
        for label, points in _series(sizes, "gbps").items():
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, **_style(label))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        written.append(_finish(fig, ax, f"elements in the tensor ({dtype})",
                               "effective GB/s (read + write of the tensor)",
                               f"One tensor, one pass: GB/s vs size\n{where}",
                               f"{prefix}_bandwidth.png"))

    models = [r for r in rows if r["sweep"] == "model"]
    if models:
        fig, ax = plt.subplots(figsize=(8, 5))
        # x = the elements of the whole set, so the low-rank op (2-D tensors only) lines up.
        totals = {r["shape_set"]: r["numel"] for r in models if r["op"] == "copy"}
        for label, points in _series(models, "speedup_vs_mezo_loop").items():
            xs = [totals[p[2]] for p in points]
            ax.plot(xs, [p[1] for p in points], label=label, **_style(label))
        for name, numel in totals.items():  # set names along the bottom, clear of the lines
            ax.axvline(numel, color="0.85", linewidth=0.8, zorder=0)
            ax.text(numel, 0.02, f" {name}", transform=ax.get_xaxis_transform(), rotation=90,
                    fontsize=7, color="0.35", va="bottom", ha="right")
        ax.set_xscale("log")
        ax.set_yscale("log")
        written.append(_finish(fig, ax, f"elements in the shape set ({dtype})",
                               "speedup vs the MeZO loop (×)",
                               "One perturbation pass over a model's tensors: speedup vs the "
                               f"MeZO loop\n{where}", f"{prefix}_speedup.png"))
    return written


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: str) -> str:
    """Labels, grid, legend, then save and close: the same for every plot."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (cpu default), bfloat16 (cuda)")
    parser.add_argument("--backend", action="append", choices=["auto", "cpu", "triton", "torch"])
    parser.add_argument("--min-log2", type=int, default=10)
    parser.add_argument("--max-log2", type=int, default=None, help="default 24 cpu, 26 cuda")
    parser.add_argument("--step", type=int, default=2, help="log2 step of the size sweep")
    parser.add_argument("--shape-set", action="append", help="model sets (repeatable)")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 cpu, 20 cuda")
    parser.add_argument("--warmup", type=int, default=None, help="default 1 cpu, 5 cuda")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out-dir", default=RESULTS)
    parser.add_argument("--plot-only", metavar="JSON", help="re-plot a sweep's JSON, run nothing")
    args = parser.parse_args(argv)

    if args.plot_only:
        with open(args.plot_only) as f:
            document = json.load(f)
        prefix = os.path.splitext(args.plot_only)[0]
    else:
        kind = torch.device(args.device).type
        if kind == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available")
        args.dtype = DTYPE_ALIASES.get(args.dtype, args.dtype) or (
            "float32" if kind == "cpu" else "bfloat16")
        if args.dtype not in DTYPES:
            parser.error(f"--dtype must be one of {', '.join(DTYPES)}")
        args.repeats = args.repeats or (5 if kind == "cpu" else 20)
        args.warmup = args.warmup if args.warmup is not None else (1 if kind == "cpu" else 5)
        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            document = sweep(args)
        except (UsageError, ValueError) as exc:
            parser.error(str(exc))
        os.makedirs(args.out_dir, exist_ok=True)
        prefix = os.path.join(args.out_dir, f"sweep_ops_{kind}_{args.dtype}")
        with open(f"{prefix}.json", "w") as f:
            json.dump(document, f, indent=2)
            f.write("\n")
        print(f"wrote {prefix}.json ({device_name(args.device)})", file=sys.stderr)
    for note in document["notes"]:
        print(f"note: {note}", file=sys.stderr)
    try:
        for path in plot(document, prefix):
            print(f"wrote {path}", file=sys.stderr)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib, or "
              "pip install 'zokernels[bench]'); re-plot later with --plot-only "
              f"{prefix}.json", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
