"""Render the README's step tables from `zokernels-bench step --compare-exact` JSONs.

Columns are the JSON files given, in order (named by model and dtype); rows the optimizers.
Three tables: ZO part in ms (exact; no logs and their ratio), extra memory in % of the
parameters' bytes, step ms (forwards ms; the whole step's ratio to the step without logs).

Usage: python benchmarks/step_table.py benchmarks/results/cpu_step_small_float32.json ...
"""

from __future__ import annotations

import argparse
import json

NAMES = {"mezo-loop": "MeZO loop", "mezo": "MeZO (virtual probes, default)",
         "mezo-inplace": "MeZO in place", "lezo": "LeZO (¼ of the blocks, virtual)",
         "lezo-inplace": "LeZO in place", "tezo": "TeZO (virtual probes, default)",
         "tezo-deferred": "TeZO deferred", "tezo-inplace": "TeZO in place",
         "pseuzo": "PseuZO (window 14, full; virtual probe, default)",
         "pseuzo-inplace": "PseuZO in place"}
MODELS = {"hf-bert-minilm": "MiniLM-BERT"}
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _ms(v: float) -> str:
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    columns = []
    for path in args.files:
        with open(path) as f:
            doc = json.load(f)
        rows = {r["optimizer"]: r for r in doc["results"] if r.get("op") == "step"}
        first = next(iter(rows.values()))
        columns.append((f"{MODELS.get(first['model'], first['model'])} "
                        f"{DTYPES.get(first['dtype'], first['dtype'])}", rows))
    order = [name for name in NAMES if any(name in rows for _, rows in columns)]

    def table(title: str, cell) -> None:
        print(f"| {title} | " + " | ".join(c for c, _ in columns) + " |")
        print("| --- |" + " ---: |" * len(columns))
        for name in order:
            cells = [cell(rows[name]) if name in rows else "" for _, rows in columns]
            if any(cells):
                print(f"| {NAMES[name]} | " + " | ".join(cells) + " |")
        print()

    def zo(r: dict) -> str:
        if r.get("zo_ms_no_exact") is None:
            return _ms(r["zo_ms"])
        return (f"{_ms(r['zo_ms'])} ({_ms(r['zo_ms_no_exact'])}, "
                f"{r['zo_ratio_exact_vs_no_exact']:.2f}×)")

    def memory(r: dict) -> str:
        ratio = r.get("extra_memory_ratio")
        return "" if ratio is None else f"{100 * ratio:.2f}%"

    table("ZO part, ms: exact (no logs, ratio)", zo)
    table("extra memory, % of the parameters' bytes", memory)
    def step(r: dict) -> str:
        ratio = r.get("step_ratio_exact_vs_no_exact")
        tail = "" if ratio is None else f"; {ratio:.2f}×"
        return f"{_ms(r['ms'])} ({_ms(r['forward_ms'])}{tail})"

    table("step ms (forwards ms; vs no logs)", step)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
