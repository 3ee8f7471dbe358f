"""benchmarks/step_table.py: the README's step tables from `zokernels-bench step --compare-exact`
JSONs, including the two-run ratio table (--again) and ZO parts that came out <= 0."""

from __future__ import annotations

import json
import pathlib

import pytest

from helpers import load_benchmark


@pytest.fixture(scope="module")
def step_table():
    return load_benchmark("step_table")


def _row(optimizer: str, ms: float, forward: float, no_exact: float | None = None) -> dict:
    """A step row as time_step writes it (the fields the tables read)."""
    row = dict(op="step", optimizer=optimizer, model="small", dtype="float32", ms=ms,
               forward_ms=forward, zo_ms=ms - forward, extra_memory_ratio=0.01)
    if no_exact is not None:
        zo, zo_no = ms - forward, no_exact - forward
        row.update(ms_no_exact=no_exact, zo_ms_no_exact=zo_no,
                   step_ratio_exact_vs_no_exact=ms / no_exact,
                   zo_ratio_exact_vs_no_exact=zo / zo_no if min(zo, zo_no) > 0 else None)
    return row


def _write(path: pathlib.Path, rows: list[dict]) -> str:
    path.write_text(json.dumps({"mode": "step", "results": rows}))
    return str(path)


def test_two_runs_give_the_ratio_table(step_table, tmp_path, capsys):
    first = _write(tmp_path / "a.json", [
        _row("mezo-loop", 300.0, 100.0), _row("mezo", 150.0, 100.0, 140.0),
        _row("lezo", 95.0, 100.0, 120.0), _row("tezo", 120.0, 100.0, 120.0),
        _row("tezo-nocache", 130.0, 100.0, 130.0), _row("tezo-deferred", 110.0, 100.0, 110.0),
        _row("tezo-inplace", 180.0, 100.0, 140.0)])
    second = _write(tmp_path / "b.json", [
        _row("mezo-loop", 300.0, 100.0), _row("mezo", 95.0, 100.0, 140.0),
        _row("tezo", 140.0, 100.0, 120.0), _row("tezo-nocache", 150.0, 100.0, 150.0),
        _row("tezo-deferred", 110.0, 100.0, 110.0),
        _row("tezo-inplace", 180.0, 100.0, 140.0)])
    assert step_table.main([first, "--again", second]) == 0
    out = capsys.readouterr().out
    # run 1: ZO 50 against 40 (1.25x), whole step 150 / 140; run 2's ZO part came out < 0
    assert "| MeZO (virtual probes, default) | 50.0 (40.0, 1.25×) |" in out
    assert "| MeZO (virtual probes, default) | 150 (100; 1.07×) |" in out
    assert "| MeZO (virtual probes, default) | 1.25× (1.07×) / – (0.68×) |" in out
    assert "| MeZO loop | 300 (100) |" in out  # no twin, no ratio
    assert "| LeZO (¼ of the blocks, virtual) | -5.0 (20.0, –) |" in out  # a ZO part < 0
    # TeZO's virtual and deferred ZO parts over in-place TeZO's (80 ms), in both runs
    assert "| TeZO (virtual probes, default): ZO part / in-place TeZO's | 0.25× / 0.50× |" in out
    assert "| TeZO deferred: ZO part / in-place TeZO's | 0.12× / 0.12× |" in out
    # the same virtual probes without the factor cache, where measured
    assert "| TeZO virtual, factor_cache=0: ZO part / in-place TeZO's | 0.38× / 0.62× |" in out


def test_again_needs_the_same_columns(step_table, tmp_path, capsys):
    small = _write(tmp_path / "a.json", [_row("mezo", 150.0, 100.0, 140.0)])
    other = [dict(_row("mezo", 150.0, 100.0, 140.0), model="opt-125m")]
    with pytest.raises(SystemExit) as exit_info:
        step_table.main([small, "--again", _write(tmp_path / "b.json", other)])
    assert exit_info.value.code == 2
    assert "--again needs the same columns" in capsys.readouterr().err
