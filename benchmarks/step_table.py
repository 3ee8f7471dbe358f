"""Render the README's step tables from `zokernels-bench step --compare-exact` JSONs.

Columns are the JSON files given, in order (named by model and dtype); rows the optimizers.
Three tables: ZO part in ms (exact; no logs and their ratio), extra memory in % of the
parameters' bytes, step ms (forwards ms; the whole step's ratio to the step without logs).
With --again (the same columns from a second run of the same commands), a fourth table: each
optimizer's ratios to its copy without logs, of the ZO part and of the whole step, in both runs,
and TeZO's virtual and deferred ZO parts as fractions of in-place TeZO's.

Usage: python benchmarks/step_table.py benchmarks/results/cpu_step_small_float32.json ...
           [--again second_run/cpu_step_small_float32.json ...]
"""

from __future__ import annotations

import argparse
import json

NAMES = {"mezo-loop": "MeZO loop", "mezo": "MeZO (virtual probes, default)",
         "mezo-inplace": "MeZO in place", "lezo": "LeZO (¼ of the blocks, virtual)",
         "lezo-inplace": "LeZO in place", "tezo": "TeZO (virtual probes, default)",
         "tezo-deferred": "TeZO deferred", "tezo-inplace": "TeZO in place",
         "tezo-nocache": "TeZO virtual, factor_cache=0",
         "pseuzo": "PseuZO (window 14, full; virtual probe, default)",
         "pseuzo-inplace": "PseuZO in place"}
MODELS = {"hf-bert-minilm": "MiniLM-BERT"}
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _ms(v: float) -> str:
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--again", nargs="+", default=[],
                        help="the same columns, in the same order, from a second run")
    args = parser.parse_args(argv)
    columns = [_column(path) for path in args.files]
    again = [_column(path) for path in args.again]
    if again and [c for c, _ in again] != [c for c, _ in columns]:
        parser.error("--again needs the same columns in the same order")
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
        ratio = r["zo_ratio_exact_vs_no_exact"]  # None when a ZO part came out <= 0
        return (f"{_ms(r['zo_ms'])} ({_ms(r['zo_ms_no_exact'])}, "
                + ("–" if ratio is None else f"{ratio:.2f}×") + ")")

    def memory(r: dict) -> str:
        ratio = r.get("extra_memory_ratio")
        return "" if ratio is None else f"{100 * ratio:.2f}%"

    table("ZO part, ms: exact (no logs, ratio)", zo)
    table("extra memory, % of the parameters' bytes", memory)
    def step(r: dict) -> str:
        ratio = r.get("step_ratio_exact_vs_no_exact")
        tail = "" if "ms_no_exact" not in r else "; –" if ratio is None else f"; {ratio:.2f}×"
        return f"{_ms(r['ms'])} ({_ms(r['forward_ms'])}{tail})"

    table("step ms (forwards ms; vs no logs)", step)
    if again:
        _ratio_table(columns, again, order)
    return 0


def _column(path: str) -> tuple[str, dict]:
    """A JSON's column title (model dtype) and its step rows by optimizer."""
    with open(path) as f:
        doc = json.load(f)
    rows = {r["optimizer"]: r for r in doc["results"] if r.get("op") == "step"}
    first = next(iter(rows.values()))
    return (f"{MODELS.get(first['model'], first['model'])} "
            f"{DTYPES.get(first['dtype'], first['dtype'])}", rows)


def _ratio_table(columns: list, again: list, order: list[str]) -> None:
    """Per optimizer and column: 'ZO ratio (step ratio) / the same in the second run'; then
    TeZO's virtual (with and without the factor cache, where measured) and deferred ZO parts
    over in-place TeZO's, in both runs."""
    def pair(rows: dict, name: str) -> str:
        r = rows.get(name, {})
        zo, step = r.get("zo_ratio_exact_vs_no_exact"), r.get("step_ratio_exact_vs_no_exact")
        return "" if step is None else ("–" if zo is None else f"{zo:.2f}×") + f" ({step:.2f}×)"

    def tezo(rows: dict, name: str) -> str:
        if name not in rows or "tezo-inplace" not in rows:
            return ""
        if min(rows[name]["zo_ms"], rows["tezo-inplace"]["zo_ms"]) <= 0:
            return "–"
        return f"{rows[name]['zo_ms'] / rows['tezo-inplace']['zo_ms']:.2f}×"

    titles = " | ".join(c for c, _ in columns)
    print(f"| vs no logs: ZO part (whole step), run 1 / run 2 | {titles} |")
    print("| --- |" + " ---: |" * len(columns))
    for name in order:
        cells = [f"{pair(a, name)} / {pair(b, name)}" if pair(a, name) else ""
                 for (_, a), (_, b) in zip(columns, again)]
        if any(cells):
            print(f"| {NAMES[name]} | " + " | ".join(cells) + " |")
    for name in ("tezo", "tezo-nocache", "tezo-deferred"):
        if name not in order:
            continue
        cells = [f"{tezo(a, name)} / {tezo(b, name)}" for (_, a), (_, b) in zip(columns, again)]
        print(f"| {NAMES[name]}: ZO part / in-place TeZO's | " + " | ".join(cells) + " |")
    print()


if __name__ == "__main__":
    raise SystemExit(main())
