"""`zokernels-bench lora`: a ZO step over LoRA adapters only (hundreds of tiny tensors), and the
host cost of one call on thousands of them.

The adapters are built from shapes (nothing is downloaded, peft is not needed): for every targeted
linear of every decoder layer of an OPT-shaped model, A (r x in) and B (out x r), named and ordered
as peft names them (`...self_attn.q_proj.lora_A.default.weight`). `source="peft"` takes the names
and shapes from a real peft model built on the meta device instead (no memory, no download).

What one run times, per ZO step, each case over its own copy of the same adapter values, the
cases' timed steps taking turns (measure_interleaved: a shared machine's load hits all alike):

    mezo-loop       MeZO's trainer step (step.mezo_loop_step): per pass torch.manual_seed(seed),
                    per tensor torch.normal(0, 1, size) and p.data = p.data + c * z; 4 passes
                    (+eps, -2 eps, +eps, update -lr g z)
    space           ParameterSpace: +eps; -eps with applied=+eps (recovering theta first); the
                    restore fused with the update, applied=-eps: 3 passes, one backend call each
    space-undo      the same with undo logs (exact restore, docs/undo-log.md): the two
                    perturbation passes log what recovery cannot give back, the counts are read,
                    and after the update the logs are scattered (5 passes)
    optimizer       zokernels.optim.MeZO.step with a closure that returns a constant loss: the
    optimizer-undo  passes above plus the optimizer's own bookkeeping (seeds, scalars, trajectory)

The closures return a constant loss, so g = 0: every pass still runs in full (no backend skips a
zero coefficient) and the weights stay put, so the undo logs keep a steady size.

Per-call overhead: ParameterSpace.apply (one pass, no log) on T tensors of a few elements each,
beside the unregistered perturb_ and one pass of the MeZO loop over the same tensors; small
tensors make every path host-bound, so this is the bookkeeping a ZO step pays per pass.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import zokernels

from ..ops.undo import UndoLog
from ..optim import MeZO
from ..space import ParameterSpace
from .runner import DTYPES, Case, device_name, launches_per_call, mezo_loop
from .step import mezo_loop_step
from .timing import Timing, _flush_l2, _quantile, synchronize

Shape = tuple[int, ...]


@dataclass(frozen=True)
class LoraBase:
    """The decoder dimensions that fix the adapter shapes (OPT: ffn = 4 x hidden)."""
    layers: int
    hidden: int
    ffn: int


PRESETS = {
    "tiny": LoraBase(2, 64, 256),  # for tests and smoke runs
    "opt-125m": LoraBase(12, 768, 3072),
    "opt-1.3b": LoraBase(24, 2048, 8192),
    "opt-13b": LoraBase(40, 5120, 20480),
}
# OPTDecoderLayer's linears in registration order (what named_parameters() yields), with the
# (out_features, in_features) of each as a function of the base model.
OPT_LINEARS = (("self_attn.k_proj", lambda b: (b.hidden, b.hidden)),
               ("self_attn.v_proj", lambda b: (b.hidden, b.hidden)),
               ("self_attn.q_proj", lambda b: (b.hidden, b.hidden)),
               ("self_attn.out_proj", lambda b: (b.hidden, b.hidden)),
               ("fc1", lambda b: (b.ffn, b.hidden)),
               ("fc2", lambda b: (b.hidden, b.ffn)))
TARGETS = {"qv": ("q_proj", "v_proj"),  # peft's default for OPT
           "all": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")}
SOURCES = ("shapes", "peft")
PEFT_PREFIX = "base_model.model.model.decoder.layers."
ADAPTER = "default"  # peft's adapter name

EPS = 1e-3
LR = 1e-6
# peft starts B at zero; an adapter a few steps into training has small nonzero B, which is what
# the undo logs and the recovery see from then on.
B_STD = 1e-3

CASES = ("mezo-loop", "space", "space-undo", "optimizer", "optimizer-undo")
# Passes over the adapters per step (steady state: the undo logs' count-only probes of the first
# two steps excluded): dense passes + scatters of the two logs.
PASSES = {"mezo-loop": 4, "space": 3, "space-undo": 5, "optimizer": 3, "optimizer-undo": 5}
EXACT_RESTORE = {"mezo-loop": None, "space": False, "space-undo": True, "optimizer": False,
                 "optimizer-undo": True}
PROBE_STEPS = 2  # UndoLog(probe_passes=2): warm-up below this times the probes too
OVERHEAD_TENSORS = (100, 1000, 4000)
OVERHEAD_NUMEL = 8
OVERHEAD_SAMPLE_MS = 20.0  # calls per sample: enough for about this long
OVERHEAD_MAX_CALLS = 1000


def _target_linears(targets: str) -> list[tuple[str, Callable[[LoraBase], tuple[int, int]]]]:
    wanted = TARGETS[targets]
    return [(path, dims) for path, dims in OPT_LINEARS if path.split(".")[-1] in wanted]


def lora_shapes(preset: str, targets: str = "qv", rank: int = 8,
                layers: int | None = None) -> list[tuple[str, Shape]]:
    """(peft parameter name, shape) of every adapter tensor, in peft's order: per layer, per
    targeted linear (registration order), lora_A (r x in) then lora_B (out x r).

    opt-1.3b: 96 tensors for "qv", 288 for "all"; `layers` overrides the preset's layer count
    (to reach thousands of tensors)."""
    base = PRESETS[preset]
    shapes = []
    for i in range(base.layers if layers is None else layers):
        for path, dims in _target_linears(targets):
            out_features, in_features = dims(base)
            stem = f"{PEFT_PREFIX}{i}.{path}"
            shapes += [(f"{stem}.lora_A.{ADAPTER}.weight", (rank, in_features)),
                       (f"{stem}.lora_B.{ADAPTER}.weight", (out_features, rank))]
    return shapes


# a tensor's Python and allocator overhead beside its elements, roughly (thousands of tiny ones)
TENSOR_OVERHEAD_BYTES = 1024


def adapter_bytes(preset: str, targets: str, rank: int, layers: int | None,
                  dtype: torch.dtype) -> int:
    """Memory of the adapters lora_shapes describes (elements and per-tensor overhead), counted
    without listing them: what a run must allocate before anything is timed."""
    base = PRESETS[preset]
    linears = [dims(base) for _, dims in _target_linears(targets)]
    per_layer = sum(rank * (out_features + in_features) for out_features, in_features in linears)
    count = base.layers if layers is None else layers
    element = torch.empty((), dtype=dtype).element_size()
    return count * (per_layer * element + 2 * len(linears) * TENSOR_OVERHEAD_BYTES)


def peft_lora_shapes(preset: str, targets: str = "qv", rank: int = 8,
                     layers: int | None = None) -> list[tuple[str, Shape]]:
    """The trainable (name, shape) of a real peft LoRA model of the preset's dimensions, built
    on the meta device (no memory, nothing downloaded). Needs transformers and peft."""
    import peft
    import transformers

    base = PRESETS[preset]
    config = transformers.OPTConfig(vocab_size=16, hidden_size=base.hidden, ffn_dim=base.ffn,
                                    num_hidden_layers=base.layers if layers is None else layers,
                                    num_attention_heads=max(1, base.hidden // 64),
                                    max_position_embeddings=16, word_embed_proj_dim=base.hidden)
    with torch.device("meta"):
        model = transformers.OPTForCausalLM(config)
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank,
                                                           target_modules=list(TARGETS[targets])))
    return [(name, tuple(p.shape)) for name, p in model.named_parameters() if p.requires_grad]


def build_adapters(shapes: list[tuple[str, Shape]], dtype: torch.dtype, device: str | torch.device,
                   seed: int = 0, b_std: float = B_STD) -> list[tuple[str, torch.nn.Parameter]]:
    """Adapter parameters for the shapes: A ~ U(-1/sqrt(in), 1/sqrt(in)) (peft's kaiming-uniform
    bound), B ~ N(0, b_std^2); the same values for the same seed, on any device."""
    generator = torch.Generator().manual_seed(seed)
    named = []
    for name, shape in shapes:
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(shape[1])
            values = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        else:
            values = torch.randn(shape, generator=generator) * b_std
        named.append((name, torch.nn.Parameter(values.to(device=device, dtype=dtype))))
    return named


def constant_loss(device: str | torch.device) -> Callable[[], torch.Tensor]:
    """A closure whose loss never changes (g = 0): only perturb/update and bookkeeping run."""
    loss = torch.ones((), device=device)
    return lambda: loss


def space_step(space: ParameterSpace, seed: int, eps: float, coef: float,
               logs: tuple[UndoLog, UndoLog] | None = None) -> None:
    """The passes of one ZO step through ParameterSpace, as MeZO runs them:

        theta + eps z                                   (log L1)
        theta - eps z, recovering theta from +eps z     (log L2)
        theta + coef z, recovering theta from -eps z    (then L2, L1 rewritten with the update)

    coef = -lr g; with coef = 0 the last pass is the exact restore (with logs: bit for bit)."""
    plus, minus = logs if logs is not None else (None, None)
    space.apply(seed, eps, log=plus)
    space.apply(seed, -eps, applied=eps, log=minus)
    if logs is not None:
        plus.check()  # the optimizer reads the counts with the losses (one synchronization)
        minus.check()
    space.apply(seed, coef, applied=-eps)
    if logs is not None:
        space.apply_logged(minus, seed, coef)  # latest first: L1 holds the truer values
        space.apply_logged(plus, seed, coef)
        minus.clear()
        plus.clear()


@dataclass
class LoraSettings:
    """One `lora` run: the adapters (preset, targets, rank, layers, source), how they are timed,
    and the per-call overhead's tensor counts and (device, backend) pairs."""
    preset: str = "opt-1.3b"
    targets: tuple[str, ...] = ("qv",)  # each a key of TARGETS, timed one after the other
    rank: int = 8
    layers: int | None = None  # None: the preset's
    dtype: str = "float32"
    device: str = "cpu"
    backend: str = "cpu"  # concrete (resolved by the caller): cpu, triton or torch
    warmup: int = 2
    repeats: int = 5
    source: str = "shapes"
    cases: tuple[str, ...] = CASES
    overhead_tensors: tuple[int, ...] = OVERHEAD_TENSORS
    overhead_numel: int = OVERHEAD_NUMEL
    # (device, backend) pairs timed for the per-call overhead
    overhead_backends: list[tuple[str, str]] = field(default_factory=list)
    eps: float = EPS
    lr: float = LR

    @property
    def num_layers(self) -> int:
        return PRESETS[self.preset].layers if self.layers is None else self.layers

    def shapes(self, targets: str) -> list[tuple[str, Shape]]:
        build = peft_lora_shapes if self.source == "peft" else lora_shapes
        return build(self.preset, targets, self.rank, self.layers)

    def describe(self, targets: str, shapes: list[tuple[str, Shape]]) -> dict:
        """What one target set is: for the JSON and the table header."""
        numel = sum(_numel(shape) for _, shape in shapes)
        return dict(targets=targets, target_modules=list(TARGETS[targets]), tensors=len(shapes),
                    numel=numel, bytes=numel * DTYPES[self.dtype].itemsize)


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def _step_callable(case: str, named: list[tuple[str, torch.nn.Parameter]],
                   settings: LoraSettings) -> tuple[Callable[[], None], object | None]:
    """One ZO step of the case over `named` (its own copy), and the object holding its state."""
    closure = constant_loss(settings.device)
    seeds = itertools.count(1)
    eps, lr = settings.eps, settings.lr
    if case == "mezo-loop":
        params = [p for _, p in named]
        return lambda: mezo_loop_step(params, closure, seed=next(seeds), eps=eps, lr=lr), None
    if case in ("space", "space-undo"):
        space = ParameterSpace(named, backend=settings.backend)
        logs = (UndoLog(), UndoLog()) if case == "space-undo" else None
        grad = float(closure() - closure()) / (2 * eps)  # constant loss: 0
        return lambda: space_step(space, next(seeds), eps, -lr * grad, logs), logs
    if case in ("optimizer", "optimizer-undo"):
        # in-place probes: the constant closure reads no parameter, and the passes are timed
        opt = MeZO(named, lr=lr, eps=eps, backend=settings.backend,
                   exact_restore=case == "optimizer-undo", probe="inplace")
        return lambda: opt.step(closure), opt
    raise ValueError(f"unknown case {case!r}")


def _state_bytes(case: str, state: object | None) -> int | None:
    if isinstance(state, MeZO):
        return state.undo_log_bytes
    if isinstance(state, tuple):
        return sum(log.nbytes for log in state)
    return 0 if case != "mezo-loop" else None


def measure_interleaved(fns: list[Callable[[], object]], *, device: str, warmup: int,
                        repeats: int) -> list[Timing]:
    """timing.measure for several callables side by side: each is warmed up, then the timed
    calls take turns (a, b, c, a, b, c, ...), so load that comes and goes on a shared machine
    hits every case alike and their ratios stay meaningful.

    CPU: wall clock around each call. CUDA: a pair of events around each call after an L2 flush
    (host time inside a launch-bound call is GPU idle time between the events, so it counts)."""
    cuda = torch.device(device).type == "cuda"
    for fn in fns:
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, samples):
            if cuda:
                _flush_l2(device)
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1e3)
    return [Timing(statistics.median(t), _quantile(t, 0.2), _quantile(t, 0.8), repeats, warmup,
                   t) for t in samples]


def time_cases(targets: str, shapes: list[tuple[str, Shape]], settings: LoraSettings) -> list[dict]:
    """Median ms per ZO step of every case of the settings, each over its own copy of the same
    adapter values, timed interleaved; the speedup vs the MeZO loop when it is among them."""
    device = torch.device(settings.device)
    steps = [_step_callable(case, build_adapters(shapes, DTYPES[settings.dtype], device),
                            settings) for case in settings.cases]
    timings = measure_interleaved([fn for fn, _ in steps], device=settings.device,
                                  warmup=settings.warmup, repeats=settings.repeats)
    tensors, numel = len(shapes), sum(_numel(s) for _, s in shapes)
    rows = []
    for case, (fn, state), timing in zip(settings.cases, steps, timings):
        backend = "torch-loop" if case == "mezo-loop" else settings.backend
        # After the warm-up: the undo logs' count-only probes are not counted.
        launches = launches_per_call(Case(case, backend=backend), fn, device)
        passes = PASSES[case]
        rows.append(dict(
            op="lora-step", case=case, backend=backend, exact_restore=EXACT_RESTORE[case],
            preset=settings.preset, targets=targets, rank=settings.rank,
            layers=settings.num_layers, dtype=settings.dtype, device=settings.device,
            tensors=tensors, numel=numel, ms=timing.median_ms, ms_p20=timing.p20_ms,
            ms_p80=timing.p80_ms, repeats=timing.repeats, warmup=timing.warmup, passes=passes,
            us_per_tensor_pass=1e3 * timing.median_ms / (tensors * passes),
            launches_per_step=launches,
            launches_per_pass=None if launches is None else launches / passes,
            state_bytes=_state_bytes(case, state), speedup_vs_mezo_loop=None))
    loop = next((r for r in rows if r["case"] == "mezo-loop"), None)
    for row in rows:
        row["speedup_vs_mezo_loop"] = None if loop is None else loop["ms"] / row["ms"]
    return rows


def per_call_us(fns: list[Callable[[], object]], device: str, *, warmup: int, repeats: int,
                sample_ms: float = OVERHEAD_SAMPLE_MS) -> list[tuple[float, float, float, int]]:
    """Host cost of one call of each fn: (median, p20, p80 in microseconds, calls per sample).

    A sample is n back-to-back calls, synchronized once at the end, divided by n (n from the
    last warm-up call, for about sample_ms per sample); the fns' samples take turns. On a GPU
    this is the host's issue rate when it is the bottleneck (tiny tensors), which CUDA events
    around single calls would not show."""
    def block(fn: Callable[[], object], calls: int) -> float:
        synchronize(device)
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        return (time.perf_counter() - begin) * 1e6 / calls

    counts = []
    for fn in fns:
        for _ in range(max(0, warmup - 1)):
            fn()
        estimate_us = block(fn, 1)
        counts.append(max(1, min(OVERHEAD_MAX_CALLS, int(1e3 * sample_ms / max(estimate_us, 1)))))
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, calls, times in zip(fns, counts, samples):
            times.append(block(fn, calls))
    return [(statistics.median(t), _quantile(t, 0.2), _quantile(t, 0.8), calls)
            for t, calls in zip(samples, counts)]


def overhead_rows(count: int, settings: LoraSettings, device: str, backend: str) -> list[dict]:
    """ParameterSpace.apply, perturb_ and a MeZO-loop pass on `count` tensors of
    settings.overhead_numel elements: microseconds per call and per tensor."""
    dtype = DTYPES[settings.dtype]
    generator = torch.Generator().manual_seed(count)
    values = [torch.randn(settings.overhead_numel, generator=generator) for _ in range(count)]

    def copy() -> list[torch.Tensor]:
        # Each call gets its own tensors: the loop's `p.data = ...` gives them new storage, and
        # a ParameterSpace that sees new storage registers it again (the cost of a rebuild).
        return [v.to(device, dtype, copy=True) for v in values]

    named = [(f"adapter.{j}.weight", t) for j, t in enumerate(copy())]
    register = []
    for _ in range(3):
        begin = time.perf_counter()
        space = ParameterSpace(named, backend=backend)
        register.append((time.perf_counter() - begin) * 1e3)
    eps, unregistered, looped = settings.eps, copy(), copy()
    calls = {"ParameterSpace.apply": lambda: space.apply(1, eps),
             "perturb_": lambda: zokernels.perturb_(unregistered, 1, eps, backend=backend),
             "mezo-loop pass": lambda: mezo_loop(looped, 1, eps)}
    timings = per_call_us(list(calls.values()), device, warmup=settings.warmup,
                          repeats=settings.repeats)
    rows = []
    for name, (median, p20, p80, per_sample) in zip(calls, timings):
        rows.append(dict(op="lora-overhead", case=name,
                         backend="torch-loop" if name == "mezo-loop pass" else backend,
                         device=device, dtype=settings.dtype, tensors=count,
                         numel_per_tensor=settings.overhead_numel, us_per_call=median,
                         us_p20=p20, us_p80=p80, us_per_tensor=median / count,
                         calls_per_sample=per_sample, repeats=settings.repeats,
                         register_ms=statistics.median(register)
                         if name == "ParameterSpace.apply" else None,
                         speedup_vs_mezo_loop=None))
    loop = rows[-1]["us_per_call"]
    for row in rows:
        row["speedup_vs_mezo_loop"] = loop / row["us_per_call"]
    return rows


def run_lora_bench(settings: LoraSettings,
                   shapes: dict[str, list[tuple[str, Shape]]] | None = None, *,
                   on_start: Callable[[str], None] | None = None,
                   on_done: Callable[[str, str], None] | None = None) -> tuple[list[dict],
                                                                                list[dict]]:
    """(step rows, overhead rows): per target set (its shapes from `shapes`, else built), the
    cases in order, with the speedup vs that set's MeZO loop filled in when the loop is timed;
    then the per-call overhead."""
    shapes = shapes or {targets: settings.shapes(targets) for targets in settings.targets}
    devices = {torch.device(d) for d, _ in settings.overhead_backends} | {
        torch.device(settings.device)}
    # The MeZO loop reseeds the global generators: give them back as they were.
    with torch.random.fork_rng(devices=[d for d in devices if d.type == "cuda"]):
        return _run(settings, shapes, on_start, on_done)


def _run(settings: LoraSettings, shapes: dict[str, list[tuple[str, Shape]]],
         on_start: Callable[[str], None] | None,
         on_done: Callable[[str, str], None] | None) -> tuple[list[dict], list[dict]]:
    steps = []
    for targets in settings.targets:
        if on_start:
            on_start(f"{settings.preset} {targets} r={settings.rank}: "
                     f"{len(settings.cases)} cases interleaved")
        rows = time_cases(targets, shapes[targets], settings)
        steps += rows
        if on_done:
            on_done(targets, ", ".join(f"{r['case']} {r['ms']:.3g} ms" for r in rows))
    overhead = []
    for device, backend in settings.overhead_backends:
        for count in settings.overhead_tensors:
            if on_start:
                on_start(f"per-call overhead: {count} tensors on {device}, {backend}")
            overhead += overhead_rows(count, settings, device, backend)
            if on_done:
                on_done(f"overhead {count}", f"{overhead[-3]['us_per_call']:.3g} us per apply")
    return steps, overhead


# ------------------------------------------------------------------------------------- tables

def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _align(table: list[list[str]], left: int = 1) -> list[str]:
    """Rows of cells, the first `left` columns left-aligned, a rule under the header."""
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = []
    for index, line in enumerate(table):
        lines.append("  ".join(c.ljust(w) if i < left else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


STEP_COLUMNS = ("case", "backend", "ms/step", "p20-p80", "vs loop", "passes", "us/tensor/pass",
                "launches/step", "launches/pass", "state MB", "n")
OVERHEAD_COLUMNS = ("call", "backend", "device", "tensors", "us/call", "p20-p80", "us/tensor",
                    "vs loop", "calls/sample", "register ms")


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def format_lora_tables(settings: LoraSettings, sets: list[dict], steps: list[dict],
                       overhead: list[dict]) -> str:
    """One step table per target set (`sets`: LoraSettings.describe), then the per-call
    overhead table."""
    def text(value: object, fmt: Callable[[float], str] = _fmt) -> str:
        return "-" if value is None else fmt(value) if isinstance(value, float) else str(value)

    blocks = []
    for described in sets:
        rows = [r for r in steps if r["targets"] == described["targets"]]
        if not rows:
            continue
        header = (f"lora · {settings.preset} ({settings.num_layers} layers) · "
                  f"{', '.join(described['target_modules'])} · r={settings.rank} · "
                  f"{described['tensors']} tensors, {described['numel'] / 1e6:.2f}M elements "
                  f"({_size(described['bytes'])}) · {settings.dtype} · {settings.device} "
                  f"({device_name(settings.device)})")
        table = [list(STEP_COLUMNS)]
        for r in rows:
            speedup = r["speedup_vs_mezo_loop"]
            table.append([r["case"], r["backend"], _fmt(r["ms"]),
                          f"{_fmt(r['ms_p20'])}-{_fmt(r['ms_p80'])}",
                          "-" if speedup is None else f"{speedup:.2f}x", str(r["passes"]),
                          _fmt(r["us_per_tensor_pass"]), text(r["launches_per_step"]),
                          text(r["launches_per_pass"], lambda v: f"{v:.1f}"),
                          "-" if r["state_bytes"] is None else f"{r['state_bytes'] / 1e6:.2f}",
                          str(r["repeats"])])
        blocks.append("\n".join([header] + _align(table, left=2)))
    if overhead:
        first = overhead[0]
        table = [list(OVERHEAD_COLUMNS)]
        for r in overhead:
            table.append([r["case"], r["backend"], r["device"], str(r["tensors"]),
                          _fmt(r["us_per_call"]), f"{_fmt(r['us_p20'])}-{_fmt(r['us_p80'])}",
                          _fmt(r["us_per_tensor"]), f"{r['speedup_vs_mezo_loop']:.2f}x",
                          str(r["calls_per_sample"]), text(r["register_ms"])])
        head = (f"per-call overhead: one pass over T tensors of {first['numel_per_tensor']} "
                f"elements ({first['dtype']}), microseconds per call, medians of "
                f"{first['repeats']} samples")
        lines = [head] + _align(table, left=3)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
