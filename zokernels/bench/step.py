"""`zokernels-bench step`: one full ZO step on a model, split into forward and perturb/update
time, against the same step done with MeZO's per-parameter loop.

Each optimizer runs on a fresh copy of the model (same random weights) and the same batch. The
step is timed whole (synchronized on GPU); after it, the same number of forwards of an identical
model without an optimizer, so perturb/update (the ZO part) = step - forwards (time_step).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..optim import LeZO, MeZO, PseuZO, TeZO
from .models import BenchModel, build_model, synthetic_batch
from .timing import _quantile, synchronize

OPTIMIZERS = ("mezo", "lezo", "tezo", "pseuzo")
# TeZO's probe / update modes as rows of their own ("tezo" is the default: virtual probes)
TEZO_MODES = {"tezo": {}, "tezo-inplace": {"probe": "inplace"},
              "tezo-deferred": {"update": "deferred"},
              "tezo-nocache": {"factor_cache": 0.0}}  # the hooks draw U, V in every call
# MeZO / LeZO / PseuZO probe virtually by default (zokernels.dense_probe); their in-place
# probes are rows of their own. --compare-exact compares each of their rows with the in-place
# optimizer built with exact_restore=False.
PROBE_MODES = {"mezo-inplace": "mezo", "lezo-inplace": "lezo", "pseuzo-inplace": "pseuzo"}
MEZO_LOOP = "mezo-loop"
# Forward passes per step and passes over the weights per step (the MeZO loop: 4 with
# torch.normal for every parameter each time).
FORWARDS = {"mezo": 2, "lezo": 2, "tezo": 2, "tezo-inplace": 2, "tezo-deferred": 2, "pseuzo": 2,
            "tezo-nocache": 2, MEZO_LOOP: 2, "mezo-inplace": 2, "lezo-inplace": 2,
            "pseuzo-inplace": 2}
WEIGHT_PASSES = {"mezo": "1 (+2 drawn in the reads)", "lezo": "1 (+2 in the reads; active layers)",
                 "mezo-inplace": "3", "lezo-inplace": "3 (over the active layers)",
                 "tezo": "1 (low-rank, virtual probes)", "tezo-inplace": "3 (low-rank)",
                 "tezo-deferred": "0 (+1 per merge)",
                 "tezo-nocache": "1 (low-rank, virtual probes)",
                 "pseuzo": "1 (+1 drawn in the reads)", "pseuzo-inplace": "2", MEZO_LOOP: "4"}


@dataclass
class StepSettings:
    model: str
    dtype: str
    device: str
    batch: int
    seq: int
    warmup: int
    repeats: int
    backend: str = "auto"
    lezo_active: float = 0.25  # fraction of blocks LeZO perturbs per step
    rank: int = 8
    window: int = 14
    exact_restore: bool = True  # undo logs (docs/undo-log.md); False: recovery only
    clock: str = "wall"  # "cpu": the calling thread's CPU time (1 thread, CPU device only)

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {self.clock!r}")


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def mezo_loop_step(params: list[torch.Tensor], closure: Callable[[], torch.Tensor], *, seed: int,
                   eps: float, lr: float) -> torch.Tensor:
    """MeZO's trainer step as published: torch.manual_seed, then per parameter a torch.normal
    tensor and `p.data = p.data + scale * z * eps`; four passes, the update regenerating z."""
    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype)
            p.data = p.data + scale * z * eps

    with torch.no_grad():
        perturb(1)
        loss_plus = closure()
        perturb(-2)
        loss_minus = closure()
        perturb(1)
        grad = float(loss_plus - loss_minus) / (2 * eps)
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype)
            p.data = p.data - lr * grad * z
    return loss_plus


def _make(name: str, model: BenchModel, settings: StepSettings, lr: float, eps: float):
    named = list(model.module.named_parameters())
    common = dict(lr=lr, eps=eps, seed=0, backend=settings.backend,
                  exact_restore=settings.exact_restore)
    if name in PROBE_MODES:
        name, common["probe"] = PROBE_MODES[name], "inplace"
    if name == "mezo":
        return MeZO(named, **common)
    if name == "lezo":
        active = max(1, round(settings.lezo_active * len(model.blocks)))
        return LeZO(named, layers=model.blocks, n_active=active, **common)
    if name in TEZO_MODES:
        return TeZO(named, rank=settings.rank, **common, **TEZO_MODES[name])
    if name == "pseuzo":
        return PseuZO(named, window=settings.window, **common)
    raise ValueError(name)


def _state_bytes(opt) -> int:
    """Logs and buffers beyond the parameters: undo / selector logs, PseuZO's window, TeZO's
    moments, deferred vectors and factor cache, the virtual probes' largest draw
    (ZOOptimizer.extra_memory_bytes)."""
    return opt.extra_memory_bytes


def _steps_to_fill(opt) -> int:
    """Warm-up steps after which a step's work and memory stop growing: PseuZO's window gains
    one (seed, dO) entry per step up to its capacity, and every entry is a seed of the update
    and a stored output difference; timed or measured before it is full, the row would
    understate both."""
    return opt.capacity if isinstance(opt, PseuZO) else 0


@dataclass
class _Case:
    """One optimizer (or the MeZO loop) on a fresh copy of the model, ready to step."""

    opt: object
    one_step: Callable[[], None]
    params: list[torch.Tensor]


def _model_and_batch(settings: StepSettings) -> tuple[BenchModel, torch.Tensor]:
    """A fresh copy of the settings' model (the same random weights every time) and its batch."""
    model = build_model(settings.model, getattr(torch, settings.dtype), settings.device)
    return model, synthetic_batch(model, settings.batch, settings.seq, settings.device)


def _case(name: str, settings: StepSettings, exact_restore: bool, lr: float,
          eps: float) -> _Case:
    model, ids = _model_and_batch(settings)
    params = [p for p in model.module.parameters() if p.requires_grad]
    if name == MEZO_LOOP:
        seeds = iter(range(10**9))

        def one_step() -> None:
            mezo_loop_step(params, lambda: model.loss(ids), seed=next(seeds), eps=eps, lr=lr)
        return _Case(None, one_step, params)
    opt = _make(name, model, replace(settings, exact_restore=exact_restore), lr, eps)
    if isinstance(opt, PseuZO):  # its forward is the model's output, its loss a function of it
        def one_step() -> None:
            opt.step(lambda: model.features(ids), lambda h: model.head_loss(h, ids))
    else:
        def one_step() -> None:
            opt.step(lambda: model.loss(ids))
    return _Case(opt, one_step, params)


def _plain_forwards(name: str, settings: StepSettings) -> Callable[[], None]:
    """The forwards of one step (FORWARDS[name]) on an identical model without an optimizer,
    under no_grad: what a step's ZO part is measured against (time_step)."""
    plain, ids = _model_and_batch(settings)
    forward = plain.features if PROBE_MODES.get(name, name) == "pseuzo" else plain.loss

    def forwards() -> None:
        with torch.no_grad():
            for _ in range(FORWARDS[name]):
                forward(ids)
    return forwards


def time_step(name: str, settings: StepSettings, lr: float = 1e-6, eps: float = 1e-3,
              compare_exact: bool = False) -> dict:
    """Median step time of one optimizer (or the MeZO loop) and its ZO part, by settings.clock
    (wall time, or the calling thread's CPU time).

    ZO part = step - the step's forwards, the forwards being those of an identical model
    without the optimizer, timed right after every step (`forward_ms`, their median). One
    definition for every row: a virtual probe's draws or hooks run inside its forwards and
    cannot be timed apart, and forwards timed inside an in-place step ran in another cache and
    allocator state than those subtracted from a virtual one (measured on `small` at 1 thread:
    up to 15% of a forward apart, i.e. up to half of the ZO part).

    compare_exact: also step the same optimizer built with exact_restore=False (MeZO / LeZO /
    PseuZO: with in-place probes) on another copy of the model, interleaved step by step with
    this one so that machine noise hits both alike; the plain forwards after both steps are
    pooled into the one `forward_ms` of both. Reports its step and ZO time (`ms_no_exact`,
    `zo_ms_no_exact`) and the ratios of the medians (`step_ratio_exact_vs_no_exact`, which
    subtracts nothing, and `zo_ratio_exact_vs_no_exact`)."""
    cases = [_case(name, settings, settings.exact_restore, lr, eps)]
    if compare_exact and name != MEZO_LOOP:
        # MeZO / LeZO / PseuZO against their in-place probes without logs
        twin = {base: row for row, base in PROBE_MODES.items()}.get(name, name)
        cases.append(_case(twin, settings, False, lr, eps))
    forwards = _plain_forwards(name, settings)
    main = cases[0]
    opt, params = main.opt, main.params
    now = CLOCKS[settings.clock]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    cuda = torch.device(settings.device).type == "cuda"
    steps: list[list[float]] = [[] for _ in cases]
    forward_ms: list[float] = []

    def timed(fn: Callable[[], object]) -> float:
        synchronize(settings.device)
        start = now()
        fn()
        synchronize(settings.device)
        return 1e3 * (now() - start)

    warmup = max(settings.warmup, _steps_to_fill(opt))
    peak = None  # CUDA: the most allocated during a timed step above the start of the timed steps
    with torch.random.fork_rng(devices=[torch.device(settings.device)] if cuda else []):
        for _ in range(warmup):
            for case in cases:
                case.one_step()
            forwards()
        if cuda:
            base = torch.cuda.memory_allocated(settings.device)
        for _ in range(settings.repeats):
            for c, case in enumerate(cases):
                if cuda:  # the steps' peak, not the plain forwards' (compare_exact: both copies)
                    torch.cuda.reset_peak_memory_stats(settings.device)
                steps[c].append(timed(case.one_step))
                if cuda:
                    peak = max(peak or 0, torch.cuda.max_memory_allocated(settings.device) - base)
                forward_ms.append(timed(forwards))
    step_ms = [statistics.median(ts) for ts in steps]
    forward = statistics.median(forward_ms)
    zo = [ms - forward for ms in step_ms]
    row = dict(op="step", optimizer=name, backend="torch-loop" if opt is None else settings.backend,
               model=settings.model, dtype=settings.dtype, device=settings.device,
               numel=sum(p.numel() for p in params), param_bytes=param_bytes,
               batch=settings.batch, seq=settings.seq, clock=settings.clock,
               ms=step_ms[0], ms_p20=_quantile(steps[0], 0.2),
               ms_p80=_quantile(steps[0], 0.8), forward_ms=forward,
               zo_ms=zo[0], forwards_per_step=FORWARDS[name],
               weight_passes=WEIGHT_PASSES[name], repeats=settings.repeats,
               warmup=warmup,
               state_bytes=None if opt is None else _state_bytes(opt),
               # logs + buffers beyond the parameters (ZOOptimizer.extra_memory_bytes)
               extra_memory_bytes=None if opt is None else opt.extra_memory_bytes,
               extra_memory_ratio=None if opt is None else opt.extra_memory_bytes / param_bytes,
               peak_extra_bytes=peak, speedup_vs_mezo_loop=None, zo_speedup_vs_mezo_loop=None,
               exact_restore=None if opt is None else settings.exact_restore)
    if len(cases) > 1:
        row["ms_no_exact"], row["zo_ms_no_exact"] = step_ms[1], zo[1]
        row["step_ratio_exact_vs_no_exact"] = step_ms[0] / step_ms[1] if step_ms[1] > 0 else None
        # a ZO part is a difference of medians: under noise it can come out <= 0 (no ratio)
        row["zo_ratio_exact_vs_no_exact"] = zo[0] / zo[1] if min(zo) > 0 else None
    if opt is not None and getattr(opt, "dense_probe", "inplace") == "virtual":
        row["dense_probe_status"] = opt.dense_probe_status
    if PROBE_MODES.get(name, name) == "lezo":
        row["lezo_active_layers"] = opt.n_active
        row["lezo_layers"] = opt.num_layers
    return row


def run_step_bench(settings: StepSettings, optimizers: list[str],
                   on_start: Callable[[str], None] | None = None,
                   on_done: Callable[[str, dict], None] | None = None,
                   compare_exact: bool = False) -> list[dict]:
    """The MeZO loop first, then each optimizer; speedups filled in against the loop
    (compare_exact: see time_step)."""
    rows = []
    for name in [MEZO_LOOP] + [o for o in optimizers if o != MEZO_LOOP]:
        if on_start:
            on_start(name)
        row = time_step(name, settings, compare_exact=compare_exact)
        rows.append(row)
        if on_done:
            on_done(name, row)
    loop = rows[0]
    for row in rows:
        row["speedup_vs_mezo_loop"] = loop["ms"] / row["ms"]
        row["zo_speedup_vs_mezo_loop"] = (loop["zo_ms"] / row["zo_ms"]
                                          if min(row["zo_ms"], loop["zo_ms"]) > 0 else None)
    return rows


COLUMNS = ("optimizer", "step ms", "p20-p80", "forward ms", "perturb/update ms", "weight passes",
           "state MB", "extra MB", "extra/params", "peak extra MB", "step vs loop",
           "perturb/update vs loop")
# with compare_exact: the ZO time of the same optimizer without logs, and the ratios
COMPARE_COLUMNS = ("no-logs perturb/update ms", "exact vs no-logs", "step vs no-logs")


def format_step_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    first = rows[0]
    head = (f"step · {first['model']} ({first['numel'] / 1e6:.1f}M params) · {first['dtype']} · "
            f"{first['device']} · batch {first['batch']} x {first['seq']} tokens")

    def mb(value):
        return "-" if value is None else f"{value / 1e6:.1f}"

    def fmt(value: float) -> str:
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"

    compare = any("zo_ms_no_exact" in r for r in rows)
    table = [list(COLUMNS) + (list(COMPARE_COLUMNS) if compare else [])]
    for r in rows:
        zo_speed = r["zo_speedup_vs_mezo_loop"]
        table.append([r["optimizer"], fmt(r["ms"]), f"{fmt(r['ms_p20'])}-{fmt(r['ms_p80'])}",
                      fmt(r["forward_ms"]), fmt(r["zo_ms"]), r["weight_passes"],
                      mb(r["state_bytes"]), mb(r.get("extra_memory_bytes")),
                      "-" if r.get("extra_memory_ratio") is None
                      else f"{100 * r['extra_memory_ratio']:.2f}%",
                      mb(r["peak_extra_bytes"]),
                      f"{r['speedup_vs_mezo_loop']:.2f}x",
                      "-" if zo_speed is None else f"{zo_speed:.2f}x"])
        if compare:
            ratio = r.get("zo_ratio_exact_vs_no_exact")
            step_ratio = r.get("step_ratio_exact_vs_no_exact")
            table[-1] += ["-" if "zo_ms_no_exact" not in r else fmt(r["zo_ms_no_exact"]),
                          "-" if ratio is None else f"{ratio:.2f}x",
                          "-" if step_ratio is None else f"{step_ratio:.2f}x"]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = [head]
    for index, line in enumerate(table):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
