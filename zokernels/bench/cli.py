"""zokernels-bench: time the fused ops against the MeZO loop, with a copy as bandwidth reference.

    zokernels-bench                 a quick representative run on the best device (cuda, else cpu)
    zokernels-bench ops [options]   perturb_ and lowrank_perturb_ over model shape sets, per backend
    zokernels-bench step [options]  one full ZO step per optimizer on a model vs the MeZO loop
    zokernels-bench lora [options]  perturb/update of LoRA adapters only (hundreds of tiny tensors)
                                    vs the MeZO loop, and the per-call host overhead

Results print as an aligned table on stdout (progress goes to stderr); --json PATH writes them with
the device, versions, thread count and command. The JSON schema is documented in README.md
("Benchmark CLI").
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field

import torch

import zokernels

from ..trajectory import MAX_SEEDS_PER_STEP
from .lora import CASES as LORA_CASES
from .lora import B_STD, OVERHEAD_NUMEL, OVERHEAD_TENSORS, PROBE_STEPS, SOURCES, TARGETS
from .lora import PRESETS as LORA_PRESETS
from .lora import TENSOR_OVERHEAD_BYTES, LoraSettings, adapter_bytes, format_lora_tables
from .lora import run_lora_bench
from .models import HF_MODELS, parameter_count, vocab_and_positions
from .models import PRESETS as MODEL_PRESETS
from .step import (OPTIMIZERS, PROBE_MODES, TEZO_MODES, StepSettings, format_step_table,
                   run_step_bench)
from .runner import (
    BASELINE,
    DTYPE_ALIASES,
    DTYPES,
    MEZO,
    RANDN_ADD,
    Case,
    Group,
    Progress,
    available_memory_bytes,
    device_name,
    environment,
    get_shape_set,
    known_shape_sets,
    run_group,
)

PROG = "zokernels-bench"
STEP_MODELS = tuple(MODEL_PRESETS) + HF_MODELS
STEP_OPTIMIZERS = OPTIMIZERS
FUSED_BACKENDS = ("cpu", "triton", "torch")
OPS = {"perturb": "perturb_", "perturb_": "perturb_", "lowrank": "lowrank_perturb_",
       "lowrank_perturb_": "lowrank_perturb_"}
DISTS = ("gaussian", "rademacher")
ROUNDINGS = ("nearest", "stochastic")
# Per device type: the shape set and dtype when none is given, the warm-up and repeats.
DEFAULTS = {"cpu": dict(shape_set="opt-125m", dtype="float32", warmup=1, repeats=5),
            "cuda": dict(shape_set="opt-1.3b", dtype="bfloat16", warmup=5, repeats=20)}
MEMORY_HEADROOM = 0.9  # of the free memory, when --max-gb is not given
TRITON_ON_CPU_NOTE = ("triton is not timed on CPU tensors: they run under the Triton interpreter, "
                      "whose timings mean nothing; time it on a CUDA device")


class UsageError(Exception):
    """A bad argument: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage block), still exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass
class Plan:
    """What a run times: groups in order, their settings, and the notes printed under the table."""
    mode: str
    groups: list[Group]
    warmup: dict[str, int]  # per device
    repeats: dict[str, int]
    notes: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    json_path: str | None = None


# ---------------------------------------------------------------------------------------- parsing

def _add_run_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Options of both the quick run and `ops`. In the subparser their defaults are suppressed,
    so `zokernels-bench --json x ops` keeps the value given before the subcommand."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--json", metavar="PATH", default=default,
                        help="write the results (and device, versions, command) as JSON")
    parser.add_argument("--threads", type=int, metavar="N", default=default,
                        help="CPU threads for torch and the cpu backend (default: torch's, "
                             "reported either way)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                     epilog="Without a subcommand: a quick run on the best device (opt-125m fp32 "
                            "on CPU, opt-1.3b bf16 on GPU): copy, MeZO loop, perturb_ gaussian "
                            "K=1/2, rademacher K=1, low-rank r=16.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", action="append",
                        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    _add_run_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="{ops,step,lora}")
    ops = sub.add_parser(
        "ops", help="perturb_ and lowrank_perturb_ vs the MeZO loop, per backend",
        description="Time perturb_ (K seeds, gaussian/rademacher, nearest/stochastic rounding) and "
                    "lowrank_perturb_ (the 2-D tensors, fp32 factors of rank r) on every available "
                    "backend, against the MeZO loop, an in-place randn_like + add_ loop and a copy "
                    "of the same tensors. List options are repeatable or comma-separated.")
    ops.add_argument("--shape-set", action="append", metavar="NAME",
                     help=f"model shape set(s) (default: opt-125m on cpu, opt-1.3b on cuda); "
                          f"known: {', '.join(known_shape_sets())}")
    ops.add_argument("--dtype", action="append",
                     help="float32, bfloat16, float16 (default: float32 on cpu, bfloat16 on cuda)")
    ops.add_argument("--device", action="append", default=argparse.SUPPRESS,
                     help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    ops.add_argument("--backend", action="append",
                     help="auto (triton on cuda, cpu on cpu), cpu, triton, torch (the slow "
                          "reference, only when named)")
    ops.add_argument("--op", action="append", help="perturb, lowrank (default: both)")
    ops.add_argument("--k", action="append", metavar="K", help="seeds per call (default: 1,2,14)")
    ops.add_argument("--dist", action="append", help="gaussian, rademacher (default: both)")
    ops.add_argument("--rounding", action="append",
                     help="nearest, stochastic (default: both; stochastic for bf16/fp16 only)")
    ops.add_argument("--rank", action="append", metavar="R",
                     help="low-rank op ranks (default: 8,16,64)")
    ops.add_argument("--shards", action="append",
                     help="perturb_ on the tensors as shards with index maps (FSDP2's dim-0 "
                          "layout, the 1-D ones off whole Philox calls): none, split (the "
                          "Triton backend's shifted + mapped launches), mapped (one mapped "
                          "launch) (default: none)")
    ops.add_argument("--repeats", type=int, help="timed calls per row (default: 5 cpu, 20 cuda)")
    ops.add_argument("--warmup", type=int, help="untimed calls first (default: 1 cpu, 5 cuda)")
    ops.add_argument("--max-gb", type=float, metavar="GB",
                     help="skip shape sets whose tensors + copy buffer (+ loop temporaries, "
                          "factors) need more (default: 90%% of the free memory)")
    ops.add_argument("--no-baselines", action="store_true",
                     help="skip the MeZO and randn_like + add_ loops (the copy is always timed)")
    _add_run_options(ops, suppress=True)
    step = sub.add_parser(
        "step", help="one full ZO step per optimizer on a model, vs the MeZO loop",
        description="Time one full step of MeZO, LeZO, TeZO and PseuZO (zokernels.optim) on a "
                    "model with random weights and a synthetic batch, split into forward and "
                    "perturb/update time, against MeZO's per-parameter loop on the same model.")
    step.add_argument("--model", help=f"{', '.join(STEP_MODELS)} (default: small on cpu, "
                                      "opt-1.3b on cuda; hf-* need transformers)")
    step.add_argument("--optimizer", action="append",
                      help=f"{', '.join(STEP_OPTIMIZERS)} (default: these), TeZO's "
                           "other modes tezo-inplace, tezo-deferred, tezo-nocache "
                           "(factor_cache=0), or MeZO / LeZO / PseuZO with in-place probes: "
                           "mezo-inplace, lezo-inplace, pseuzo-inplace")
    step.add_argument("--dtype", help="float32, bfloat16, float16 (default: float32 on cpu, "
                                      "bfloat16 on cuda)")
    step.add_argument("--device", action="append", default=argparse.SUPPRESS,
                      help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    step.add_argument("--backend", default="auto", help="auto, cpu, triton or torch")
    step.add_argument("--batch", type=int, default=4, help="sequences per batch (default 4)")
    step.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    step.add_argument("--repeats", type=int, help="timed steps (default: 3 cpu, 10 cuda)")
    step.add_argument("--warmup", type=int, help="untimed steps first (default: 2 cpu, 3 cuda; "
                                                 "the first steps size the undo logs; PseuZO "
                                                 "at least --window, to fill its window)")
    step.add_argument("--lezo-active", type=float, default=0.25, metavar="FRACTION",
                      help="fraction of the blocks LeZO perturbs per step (default 0.25)")
    step.add_argument("--rank", type=int, default=8, help="TeZO rank (default 8)")
    step.add_argument("--window", type=int, default=14, help="PseuZO window (default 14)")
    step.add_argument("--no-exact-restore", action="store_true",
                      help="optimizers without exact-restore logs (recovery-quality restore, "
                           "no log memory)")
    step.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                      help="wall (default): wall time; cpu: the calling thread's CPU time "
                           "(needs --threads 1 and the cpu device, where the kernels and the "
                           "forwards run in that thread), which other jobs on a shared machine "
                           "move far less")
    step.add_argument("--compare-exact", action="store_true",
                      help="also step each optimizer without exact-restore logs on a copy of the "
                           "model (MeZO / LeZO / PseuZO: with in-place probes), interleaved step "
                           "by step, and report both ZO times and the ratios of the ZO parts and "
                           "of the whole steps")
    _add_run_options(step, suppress=True)
    lora = sub.add_parser(
        "lora", help="perturb/update of LoRA adapters only vs the MeZO loop; per-call overhead",
        description="Time one ZO step over LoRA adapters only (A: r x in, B: out x r for every "
                    "targeted linear of an OPT-shaped model; nothing is downloaded): the MeZO "
                    "loop, ParameterSpace's three passes with and without undo logs, and the "
                    "MeZO optimizer's step with a constant-loss closure, side by side; then the "
                    "host cost of ParameterSpace.apply on T tensors of a few elements each.")
    lora.add_argument("--preset", default="opt-1.3b",
                      help=f"base model dimensions: {', '.join(LORA_PRESETS)} (default opt-1.3b)")
    lora.add_argument("--targets", action="append",
                      help="qv (q_proj, v_proj: peft's default for OPT; 96 tensors on opt-1.3b), "
                           "all (q, k, v, out_proj, fc1, fc2: 288), or both: qv,all (default qv)")
    lora.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    lora.add_argument("--layers", type=int, metavar="N",
                      help="decoder layers (default: the preset's); more to reach thousands of "
                           "tensors")
    lora.add_argument("--source", default="shapes",
                      help="shapes (default: built from the preset) or peft (names and shapes "
                           "of a real peft model built on the meta device; needs transformers "
                           "and peft)")
    lora.add_argument("--dtype", help="float32, bfloat16, float16 (default: float32 on cpu, "
                                      "bfloat16 on cuda)")
    lora.add_argument("--device", action="append", default=argparse.SUPPRESS,
                      help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    lora.add_argument("--backend", default="auto",
                      help="auto (triton on cuda, cpu on cpu), cpu, triton (CUDA only) or torch")
    lora.add_argument("--case", action="append", metavar="CASE",
                      help=f"{', '.join(LORA_CASES)} (default: all)")
    lora.add_argument("--repeats", type=int, help="timed steps per case (default: 5 cpu, 20 cuda)")
    lora.add_argument("--warmup", type=int,
                      help=f"untimed steps first (default: {PROBE_STEPS} cpu, 5 cuda; the first "
                           f"{PROBE_STEPS} size the undo logs)")
    lora.add_argument("--overhead-tensors", action="append", metavar="T",
                      help=f"tensor counts for the per-call overhead (default: "
                           f"{','.join(map(str, OVERHEAD_TENSORS))})")
    lora.add_argument("--overhead-numel", type=int, default=OVERHEAD_NUMEL, metavar="N",
                      help=f"elements per tensor there (default {OVERHEAD_NUMEL})")
    lora.add_argument("--no-overhead", action="store_true", help="skip the per-call overhead")
    _add_run_options(lora, suppress=True)
    return parser


def _items(values: list[str] | None, default: str, option: str) -> list[str]:
    """Repeatable, comma-separated option values, in order, without duplicates; UsageError
    when they name nothing (`--dtype ,`)."""
    items: list[str] = []
    for value in values or [default]:
        for item in value.split(","):
            item = item.strip()
            if item and item not in items:
                items.append(item)
    if not items:
        raise UsageError(f"{option}: no value given")
    return items


def _choices(values: list[str] | None, default: str, allowed: tuple[str, ...] | dict,
             option: str) -> list[str]:
    chosen = []
    for item in _items(values, default, option):
        name = allowed[item] if isinstance(allowed, dict) and item in allowed else item
        if name not in allowed:
            raise UsageError(f"{option}: unknown value {item!r}; choose from "
                             f"{', '.join(dict.fromkeys(allowed))}")
        if name not in chosen:
            chosen.append(name)
    return chosen


def _ints(values: list[str] | None, default: str, option: str,
          high: int | None = None) -> list[int]:
    numbers = []
    for item in _items(values, default, option):
        try:
            number = int(item)
        except ValueError:
            raise UsageError(f"{option}: {item!r} is not an integer") from None
        if number < 1:
            raise UsageError(f"{option}: values must be >= 1, got {number}")
        if high is not None and number > high:
            raise UsageError(f"{option}: values must be <= {high}, got {number}")
        numbers.append(number)
    return numbers


def _dtypes(values: list[str] | None, default: str) -> list[str]:
    names = []
    for item in _items(values, default, "--dtype"):
        name = DTYPE_ALIASES.get(item, item)
        if name not in DTYPES:
            raise UsageError(f"--dtype: unknown dtype {item!r}; choose from "
                             f"{', '.join(DTYPES)} (or fp32, bf16, fp16)")
        names.append(name)
    return names


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if device.type not in DEFAULTS:
        raise UsageError(f"--device: {text!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: CUDA is not available (torch {torch.__version__}, "
                             f"{torch.cuda.device_count()} CUDA devices)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA devices")
    return str(device)


def _best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _unavailable_reason(backend: str) -> str:
    """Why a backend is missing from zokernels.available_backends(), in one line."""
    if backend == "cpu":
        return "the C++ extension zokernels._C did not build or load (pip install .)"
    from zokernels._dispatch import backend_supports

    try:
        reason = backend_supports(backend, torch.device("cuda" if torch.cuda.is_available()
                                                        else "cpu"))
    except Exception as exc:  # a broken triton install may raise here
        reason = f"{type(exc).__name__}: {exc}"
    return (reason or "not usable in this process").splitlines()[0]


def fused_backends(requested: list[str], devices: list[str],
              notes: list[str]) -> dict[str, list[str]]:
    """The fused backends timed on each device. `auto` is the fast one for the device; triton on
    CPU tensors is never timed (interpreter); a named backend must run on some requested device."""
    available = zokernels.available_backends()
    for backend in requested:
        if backend != "auto" and backend not in available:
            raise UsageError(f"--backend {backend}: not available here: "
                             f"{_unavailable_reason(backend)}")
    plan: dict[str, list[str]] = {}
    used: set[str] = set()
    for device in devices:
        kind = torch.device(device).type
        chosen: list[str] = []
        for backend in requested:
            if backend == "auto":
                if kind == "cpu" and TRITON_ON_CPU_NOTE not in notes:
                    notes.append(TRITON_ON_CPU_NOTE)
                backend = "triton" if kind == "cuda" else "cpu"
                if backend not in available:
                    notes.append(f"auto on {device}: backend {backend!r} is not available "
                                 f"({_unavailable_reason(backend)}); name --backend torch for the "
                                 f"(slow) reference")
                    continue
            if backend == "triton" and kind == "cpu":
                if TRITON_ON_CPU_NOTE not in notes:
                    notes.append(TRITON_ON_CPU_NOTE)
                used.add(backend)  # skipped on purpose, not an error
                continue
            if backend == "cpu" and kind != "cpu":
                continue
            if backend not in chosen:
                chosen.append(backend)
                used.add(backend)
        plan[device] = chosen
    for backend in requested:
        if backend not in ("auto", *used):
            raise UsageError(f"--backend {backend}: it runs on CPU tensors only, and --device is "
                             f"{', '.join(devices)}")
    return plan


def _memory_check(group: Group, max_gb: float | None, plan: Plan) -> bool:
    """True if the group fits; otherwise record why it is skipped."""
    parts = group.required_bytes()
    needed = sum(parts.values())
    if max_gb is not None:
        limit, source = max_gb * 1e9, f"--max-gb {max_gb:g}"
    else:
        free = available_memory_bytes(group.device)
        if free is None:
            return True
        limit, source = MEMORY_HEADROOM * free, f"{MEMORY_HEADROOM:.0%} of the free memory"
    if needed <= limit:
        return True
    detail = " + ".join(f"{name} {size / 1e9:.2f}" for name, size in parts.items())
    reason = f"needs {needed / 1e9:.2f} GB ({detail}) > {limit / 1e9:.2f} GB ({source})"
    plan.skipped.append(dict(shape_set=group.shape_set.name, dtype=group.dtype,
                             device=group.device, reason=reason))
    plan.notes.append(f"skipped {group.shape_set.name} {group.dtype} on {group.device}: {reason}")
    return False


def plan_quick(args: argparse.Namespace) -> Plan:
    """The no-argument run: one representative shape set on the best device."""
    devices = _items(args.device, _best_device(), "--device")
    if len(devices) > 1:
        raise UsageError("the quick run takes one --device (use `ops` for several)")
    device = _device(devices[0])
    kind = torch.device(device).type
    notes: list[str] = []
    backend = "triton" if kind == "cuda" else "cpu"
    if backend not in zokernels.available_backends():
        notes.append(f"backend {backend!r} is not available ({_unavailable_reason(backend)}): "
                     f"timing the torch reference instead")
        backend = "torch"
    if kind == "cpu":
        notes.append(TRITON_ON_CPU_NOTE)
    defaults = DEFAULTS[kind]
    if kind == "cpu":
        # A MeZO-loop pass over opt-125m takes about 1 s on 2 cores (randn-add about 0.6 s), and
        # allocates new tensors every call, so a first call is not much colder than the others:
        # 3 timed calls, no warm-up, keep the quick run well under a minute on a busy machine.
        loops = [Case(c.op, dist=c.dist, k=c.k, rounding=c.rounding, repeats=3, warmup=0)
                 for c in (MEZO, RANDN_ADD)]
        notes.append("quick run on CPU: the MeZO and randn-add loops (about 1 s per pass) are "
                     "timed 3 times without warm-up, the other rows 5 times after 1: see the n "
                     "column")
    else:
        loops = [MEZO, RANDN_ADD]
    cases = loops + [Case("perturb_", backend, "gaussian", 1, "nearest"),
                     Case("perturb_", backend, "rademacher", 1, "nearest"),
                     Case("perturb_", backend, "gaussian", 2, "nearest")]
    if defaults["dtype"] != "float32":
        cases.append(Case("perturb_", backend, "gaussian", 1, "stochastic"))
    cases.append(Case("lowrank_perturb_", backend, rounding="nearest", rank=16))
    plan = Plan("quick", [], {device: defaults["warmup"]}, {device: defaults["repeats"]}, notes,
                json_path=args.json)
    group = Group(get_shape_set(defaults["shape_set"]), defaults["dtype"], device, cases)
    if _memory_check(group, None, plan):
        plan.groups.append(group)
    return plan


def plan_ops(args: argparse.Namespace) -> Plan:
    """The `ops` run: every (shape set, dtype, device) group with its cases."""
    devices = [_device(d)
               for d in _items(getattr(args, "device", None), _best_device(), "--device")]
    if args.repeats is not None and args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup is not None and args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if args.max_gb is not None and not (math.isfinite(args.max_gb) and args.max_gb > 0):
        raise UsageError(f"--max-gb must be a finite number > 0, got {args.max_gb:g}")
    names = _items(args.shape_set, "", "--shape-set") if args.shape_set is not None else None
    shape_sets = []
    for name in names or []:
        try:
            shape_sets.append(get_shape_set(name))
        except ValueError as exc:
            raise UsageError(f"--shape-set: {exc}") from None
    dtypes = _dtypes(args.dtype, "") if args.dtype is not None else None
    ops = _choices(args.op, "perturb,lowrank", OPS, "--op")
    # seeds per call: at most what one recorded step may hold (the optimizers' own limit)
    ks = _ints(args.k, "1,2,14", "--k", high=MAX_SEEDS_PER_STEP)
    dists = _choices(args.dist, ",".join(DISTS), DISTS, "--dist")
    roundings = _choices(args.rounding, ",".join(ROUNDINGS), ROUNDINGS, "--rounding")
    ranks = _ints(args.rank, "8,16,64", "--rank")
    shards = [None if v == "none" else v
              for v in _choices(args.shards, "none", ("none", "split", "mapped"), "--shards")]
    requested = _choices(args.backend, "auto", ("auto",) + FUSED_BACKENDS, "--backend")
    notes: list[str] = []
    backends = fused_backends(requested, devices, notes)

    plan = Plan("ops", [], {}, {}, notes, json_path=args.json)
    if "stochastic" in roundings and (dtypes is None or "float32" in dtypes):
        notes.append("stochastic rounding is timed for bfloat16/float16 only (float32 rounds "
                     "exactly)")
    for device in devices:
        defaults = DEFAULTS[torch.device(device).type]
        plan.warmup[device] = defaults["warmup"] if args.warmup is None else args.warmup
        plan.repeats[device] = defaults["repeats"] if args.repeats is None else args.repeats
        for shape_set in shape_sets or [get_shape_set(defaults["shape_set"])]:
            for dtype in dtypes or [defaults["dtype"]]:
                cases = [] if args.no_baselines else [MEZO, RANDN_ADD]
                for backend in backends[device]:
                    rounds = [r for r in roundings if r == "nearest" or dtype != "float32"]
                    if "perturb_" in ops:
                        cases += [Case("perturb_", backend, dist, k, rounding, shards=layout)
                                  for dist in dists for k in ks for rounding in rounds
                                  for layout in shards]
                    if "lowrank_perturb_" in ops and shape_set.matrices:
                        cases += [Case("lowrank_perturb_", backend, rounding=rounding, rank=rank)
                                  for rank in ranks for rounding in rounds]
                group = Group(shape_set, dtype, device, cases)
                if _memory_check(group, args.max_gb, plan):
                    plan.groups.append(group)
    if not any(c.backend != BASELINE for g in plan.groups for c in g.cases) and not plan.skipped:
        notes.append("no fused backend to time on the requested devices: baselines only")
    return plan


# -------------------------------------------------------------------------------------- execution

def _ms(value: float) -> str:
    """Three significant digits or so, whatever the scale."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def _progress_label(group: Group, case: Case) -> str:
    return f"{group.shape_set.name} {group.dtype} {group.device}: {case.label()}"


def execute(plan: Plan) -> list[dict]:
    """Run the groups in order, with a [i/n] progress line per case on stderr."""
    progress = Progress(sum(len(g.cases) for g in plan.groups))
    results: list[dict] = []
    for group in plan.groups:
        def on_start(case: Case, group: Group = group) -> None:
            progress.start(_progress_label(group, case))

        def on_done(case: Case, row: dict) -> None:
            progress.finish(f"{_ms(row['ms'])} ms")

        group_start = progress.done
        try:
            results += run_group(group, warmup=plan.warmup[group.device],
                                 repeats=plan.repeats[group.device],
                                 on_start=on_start, on_done=on_done)
        except torch.OutOfMemoryError as exc:
            print(" out of memory", file=sys.stderr, flush=True)
            reason = f"out of memory: {str(exc).splitlines()[0]}"
            plan.skipped.append(dict(shape_set=group.shape_set.name, dtype=group.dtype,
                                     device=group.device, reason=reason))
            plan.notes.append(f"skipped {group.shape_set.name} {group.dtype} on "
                              f"{group.device}: {reason} (lower --max-gb)")
            progress.done = group_start + len(group.cases)
    return results


def _same_group(row: dict, group: Group) -> bool:
    return (row["shape_set"], row["dtype"], row["device"]) == (group.shape_set.name, group.dtype,
                                                               group.device)


COLUMNS = ("op", "backend", "dist", "K", "rounding", "r", "ms", "p20-p80", "GB/s", "% copy",
           "vs MeZO", "launches", "n")
RIGHT = {"K", "r", "ms", "p20-p80", "GB/s", "% copy", "vs MeZO", "launches", "n"}


def _cells(row: dict) -> list[str]:
    def text(value: object) -> str:
        return "-" if value is None else str(value)

    speedup = row["speedup_vs_mezo_loop"]
    return [row["op"], row["backend"], text(row["dist"]), text(row["k"]), text(row["rounding"]),
            text(row["rank"]), _ms(row["ms"]), f"{_ms(row['ms_p20'])}-{_ms(row['ms_p80'])}",
            f"{row['gbps']:.2f}", f"{row['pct_copy_bw']:.0f}%",
            "-" if speedup is None else f"{speedup:.2f}x", text(row["launches_per_call"]),
            str(row["repeats"])]


def format_table(results: list[dict], groups: list[Group]) -> str:
    """One aligned table per group, under a line saying what the group is."""
    blocks = []
    for group in groups:
        rows = [r for r in results if _same_group(r, group)]
        if not rows:
            continue
        copy = next(r for r in rows if r["op"] == "copy")
        head = (f"{group.shape_set.name} · {group.dtype} · {group.device} "
                f"({device_name(group.device)}): {copy['tensors']} tensors, "
                f"{copy['numel'] / 1e6:.1f}M elements, {_size(copy['bytes'])} per "
                f"read + write pass; copy {copy['gbps']:.1f} GB/s")
        table = [list(COLUMNS)] + [_cells(r) for r in rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
        lines = [head]
        for index, line in enumerate(table):
            lines.append("  ".join(cell.rjust(w) if COLUMNS[i] in RIGHT else cell.ljust(w)
                                   for i, (cell, w) in enumerate(zip(line, widths))).rstrip())
            if index == 0:
                lines.append("  ".join("-" * w for w in widths))
        lowrank = next((r for r in rows if r["op"] == "lowrank_perturb_"), None)
        if lowrank is not None:
            lines.append(f"lowrank_perturb_ updates the {lowrank['tensors']} 2-D tensors "
                         f"({lowrank['numel'] / 1e6:.1f}M of {copy['numel'] / 1e6:.1f}M elements; "
                         f"its bytes add the fp32 factors); vs MeZO compares with the loop over "
                         f"all tensors")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def check_json_path(path: str) -> None:
    """Refuse (UsageError) a --json PATH that cannot be written, before anything runs: a
    directory, a path under a file, or a place this process may not write."""
    if not path:
        raise UsageError("--json: the path is empty")
    if "\0" in path:  # os.path answers False for it; open() would raise after the run
        raise UsageError(f"--json {path!r}: a path cannot contain a NUL character")
    if path.endswith(("/", os.sep)):  # realpath would drop the separator and name a file
        raise UsageError(f"--json {path}: names a directory; give a file path")
    try:  # through symbolic links: a loop fails here, a dangling one is checked at its target
        path = os.path.realpath(path, strict=False)
        if os.path.islink(path):
            os.stat(path)
    except OSError as exc:
        raise UsageError(f"--json {path}: {exc.strerror or exc}") from None
    if os.path.isdir(path):
        raise UsageError(f"--json {path}: is a directory; give a file path")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"--json {path}: the file is not writable")
    # the nearest existing ancestor must be a directory we may create entries in
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    try:  # a symbolic link loop among the ancestors (realpath leaves it unresolved)
        os.stat(ancestor)
    except OSError as exc:
        raise UsageError(f"--json {path}: {ancestor}: {exc.strerror or exc}") from None
    if not os.path.isdir(ancestor):
        raise UsageError(f"--json {path}: {ancestor} is not a directory")
    if not os.path.exists(path) and not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--json {path}: cannot create files in {ancestor}")


def apply_run_options(args: argparse.Namespace) -> None:
    """The options every run shares, checked before any work: --json PATH writable, --threads
    in [1, CPUs of this machine] (torch crashes on absurd counts); then the threads are set."""
    if getattr(args, "json", None) is not None:
        check_json_path(args.json)
    threads = getattr(args, "threads", None)
    if threads is not None:
        limit = os.cpu_count() or 1
        if not 1 <= threads <= limit:
            raise UsageError(f"--threads must be in [1, {limit}] (the CPUs of this machine), "
                             f"got {threads}")
        torch.set_num_threads(threads)


def write_json(path: str, plan: Plan, results: list[dict], argv: list[str],
               extra: dict | None = None) -> bool:
    """The results with the environment, date and command; `extra`: more top-level fields.
    False (after an error line on stderr) when the file could not be written."""
    devices = list(dict.fromkeys([g.device for g in plan.groups] + list(plan.repeats)))
    document = environment(devices or ["cpu"])
    document.update(
        mode=plan.mode,
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join([PROG, *argv]),
        warmup=plan.warmup, repeats=plan.repeats, notes=plan.notes, skipped=plan.skipped,
        results=results, **(extra or {}))
    try:  # checked before the run (check_json_path); what fails now (a full disk) is reported
        target = os.path.realpath(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as f:
            json.dump(document, f, indent=2)
            f.write("\n")
    except OSError as exc:
        print(f"{PROG}: error: --json {path}: the results could not be written: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return False
    print(f"wrote {path}", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command == "step":
        return main_step(args, argv)
    if args.command == "lora":
        return main_lora(args, argv)
    try:
        apply_run_options(args)
        plan = plan_ops(args) if args.command == "ops" else plan_quick(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    devices = list(plan.repeats)
    print(f"{PROG} {plan.mode}: zokernels {zokernels.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, devices: "
          f"{', '.join(f'{d} ({device_name(d)})' for d in devices)}", file=sys.stderr)
    results = execute(plan)
    print(f"zokernels {zokernels.__version__} · torch {torch.__version__} · "
          f"{torch.get_num_threads()} CPU threads · medians after warm-up, "
          f"GB/s = bytes the op must move / median time")
    if results:
        print()
        print(format_table(results, plan.groups))
    for note in plan.notes:
        print(f"note: {note}")
    if plan.json_path is not None and not write_json(plan.json_path, plan, results, argv):
        return 1
    if not results:
        print(f"{PROG}: nothing was timed (see the notes)", file=sys.stderr)
        return 1
    return 0


def _check_fits(needed: int, device: str, what: str) -> None:
    """UsageError naming `what` when `needed` bytes exceed MEMORY_HEADROOM of the device's
    free memory (unknown free memory: no check)."""
    free = available_memory_bytes(device)
    if free is not None and needed > MEMORY_HEADROOM * free:
        raise UsageError(f"{what} need {needed / 1e9:.2f} GB, more than {MEMORY_HEADROOM:.0%} "
                         f"of the free memory ({free / 1e9:.2f} GB)")


def plan_step(args: argparse.Namespace) -> tuple[StepSettings, list[str]]:
    devices = _items(getattr(args, "device", None), _best_device(), "--device")
    if len(devices) != 1:
        raise UsageError("step takes one --device")
    device = _device(devices[0])
    kind = torch.device(device).type
    model = args.model or ("small" if kind == "cpu" else "opt-1.3b")
    if model not in STEP_MODELS:
        raise UsageError(f"--model: unknown model {model!r}; choose from {', '.join(STEP_MODELS)}")
    if model in HF_MODELS:
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            raise UsageError(f"--model {model}: needs transformers (pip install transformers)")
    optimizers = _choices(args.optimizer, ",".join(STEP_OPTIMIZERS),
                          tuple(dict.fromkeys(STEP_OPTIMIZERS + tuple(TEZO_MODES)
                                              + tuple(PROBE_MODES))), "--optimizer")
    dtype = _dtypes([args.dtype] if args.dtype is not None else None, DEFAULTS[kind]["dtype"])[0]
    backend = args.backend
    if backend not in ("auto",) + FUSED_BACKENDS:
        raise UsageError(f"--backend: unknown value {backend!r}; choose from auto, "
                         f"{', '.join(FUSED_BACKENDS)}")
    if backend != "auto" and backend not in zokernels.available_backends():
        raise UsageError(f"--backend {backend}: not available here: "
                         f"{_unavailable_reason(backend)}")
    for option, value in (("--batch", args.batch), ("--rank", args.rank),
                          ("--window", args.window)):
        if value < 1:
            raise UsageError(f"{option} must be >= 1, got {value}")
    if args.seq < 2:  # the loss predicts each next token: one token leaves it nothing to predict
        raise UsageError(f"--seq must be >= 2, got {args.seq}")
    vocab, positions = vocab_and_positions(model)
    if args.seq > positions:
        raise UsageError(f"--seq {args.seq}: --model {model} takes at most {positions} tokens")
    # the loss's float32 logits, the largest activation of a step: refuse what cannot fit
    logits = args.batch * args.seq * vocab * 4
    _check_fits(logits, device, f"--batch {args.batch} x --seq {args.seq}: the logits alone")
    # a row holds the optimizer's model, the plain-forward twin and, compared, the exact one
    count = parameter_count(model)
    copies = 3 if args.compare_exact else 2
    weights = 0 if count is None else copies * count * DTYPES[dtype].itemsize
    _check_fits(weights + logits, device,
                f"--model {model} --dtype {dtype}: {copies} copies of its weights and the logits")
    if args.window > MAX_SEEDS_PER_STEP:  # PseuZO's own limit, checked before any work
        raise UsageError(f"--window must be <= {MAX_SEEDS_PER_STEP}, got {args.window}")
    if not 0.0 < args.lezo_active <= 1.0:
        raise UsageError(f"--lezo-active must be in (0, 1], got {args.lezo_active:g}")
    repeats = args.repeats if args.repeats is not None else (3 if kind == "cpu" else 10)
    warmup = args.warmup if args.warmup is not None else (2 if kind == "cpu" else 3)
    if repeats < 1 or warmup < 0:
        raise UsageError("--repeats must be >= 1 and --warmup >= 0")
    if args.compare_exact and args.no_exact_restore:
        raise UsageError("--compare-exact compares against --no-exact-restore: give one of them")
    if args.clock == "cpu" and (kind != "cpu" or torch.get_num_threads() != 1):
        raise UsageError("--clock cpu counts the calling thread's CPU time only: it needs "
                         f"--threads 1 and --device cpu (got {torch.get_num_threads()} threads, "
                         f"device {device})")
    settings = StepSettings(model, dtype, device, args.batch, args.seq, warmup, repeats,
                            backend, args.lezo_active, args.rank, args.window,
                            exact_restore=not args.no_exact_restore, clock=args.clock)
    return settings, optimizers


def main_step(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        apply_run_options(args)
        settings, optimizers = plan_step(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    progress = Progress(1 + len(optimizers))
    print(f"{PROG} step: zokernels {zokernels.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, {settings.device} "
          f"({device_name(settings.device)})", file=sys.stderr)
    rows = run_step_bench(settings, optimizers,
                          on_start=lambda name: progress.start(f"{settings.model} {name}"),
                          on_done=lambda name, row: progress.finish(f"{_ms(row['ms'])} ms"),
                          compare_exact=args.compare_exact)
    clock = "" if settings.clock == "wall" else " · thread CPU time"
    print(f"zokernels {zokernels.__version__} · torch {torch.__version__} · "
          f"{torch.get_num_threads()} CPU threads · medians of {settings.repeats} steps after "
          f"{settings.warmup}{clock}")
    print()
    print(format_step_table(rows))
    print("note: perturb/update = step - forwards, the forwards of an identical model "
          "without the optimizer timed after each step (PseuZO's includes its autograd through "
          "loss_fn; virtual-probe rows: the draws inside their forwards); state = extra = "
          "exact-restore logs + PseuZO window + TeZO moments, deferred vectors and factor "
          "cache + the virtual probes' largest draw (opt.extra_memory_bytes); peak extra = GPU "
          "memory above the start of the timed steps (CUDA only)")
    if getattr(args, "json", None) is not None:
        plan = Plan("step", [], {settings.device: settings.warmup},
                    {settings.device: settings.repeats}, [], json_path=args.json)
        if not write_json(args.json, plan, rows, argv):
            return 1
    return 0


# ------------------------------------------------------------------------------------------ lora

LORA_DEFAULTS = {"cpu": dict(warmup=PROBE_STEPS, repeats=5), "cuda": dict(warmup=5, repeats=20)}


def _lora_backend(requested: str, device: str) -> str:
    """The concrete backend of the step rows on the device, or a UsageError saying why not."""
    from zokernels._dispatch import resolve_backend

    kind = torch.device(device).type
    if requested not in ("auto",) + FUSED_BACKENDS:
        raise UsageError(f"--backend: unknown value {requested!r}; choose from auto, "
                         f"{', '.join(FUSED_BACKENDS)}")
    if requested != "auto" and requested not in zokernels.available_backends():
        raise UsageError(f"--backend {requested}: not available here: "
                         f"{_unavailable_reason(requested)}")
    if requested == "cpu" and kind != "cpu":
        raise UsageError(f"--backend cpu: it runs on CPU tensors only, and --device is {device}")
    if requested == "triton" and kind == "cpu":
        raise UsageError(f"--backend triton: {TRITON_ON_CPU_NOTE} (--device cuda)")
    try:
        backend = resolve_backend(requested, torch.device(device))
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--backend {requested}: {str(exc).splitlines()[0]}") from None
    if backend == "triton" and kind == "cpu":  # ZOKERNELS_BACKEND=triton with auto
        raise UsageError(f"backend triton (from ZOKERNELS_BACKEND): {TRITON_ON_CPU_NOTE}")
    return backend


def plan_lora(args: argparse.Namespace) -> tuple[LoraSettings, list[str]]:
    """Settings of a `lora` run (every argument checked before anything runs), and its notes."""
    devices = _items(getattr(args, "device", None), _best_device(), "--device")
    if len(devices) != 1:
        raise UsageError("lora takes one --device")
    device = _device(devices[0])
    kind = torch.device(device).type
    if args.preset not in LORA_PRESETS:
        raise UsageError(f"--preset: unknown preset {args.preset!r}; choose from "
                         f"{', '.join(LORA_PRESETS)}")
    targets = _choices(args.targets, "qv", tuple(TARGETS), "--targets")
    if args.source not in SOURCES:
        raise UsageError(f"--source: unknown value {args.source!r}; choose from "
                         f"{', '.join(SOURCES)}")
    if args.source == "peft":
        import importlib.util

        missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(f"--source peft: needs {' and '.join(missing)} "
                             f"(pip install {' '.join(missing)})")
    for option, value in (("--rank", args.rank), ("--layers", args.layers),
                          ("--overhead-numel", args.overhead_numel)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be >= 1, got {value}")
    dtype = _dtypes([args.dtype] if args.dtype is not None else None, DEFAULTS[kind]["dtype"])[0]
    cases = _choices(args.case, ",".join(LORA_CASES), LORA_CASES, "--case")
    # every case steps its own copy of the adapters, all alive while they are timed interleaved
    adapters = len(cases) * max(adapter_bytes(args.preset, t, args.rank, args.layers,
                                              DTYPES[dtype]) for t in targets)
    _check_fits(adapters, device, f"--rank {args.rank}, --layers {args.layers or 'of the preset'}"
                                  f": the adapters of the {len(cases)} cases")
    defaults = LORA_DEFAULTS[kind]
    repeats = defaults["repeats"] if args.repeats is None else args.repeats
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    if repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {warmup}")
    counts = [] if args.no_overhead else _ints(args.overhead_tensors,
                                               ",".join(map(str, OVERHEAD_TENSORS)),
                                               "--overhead-tensors")
    if counts:  # the overhead's tensors are allocated at once: refuse what cannot fit
        # float32 values on the CPU and three copies in the run's dtype on the device, each
        # tensor with its own object and allocation
        values = max(counts) * (args.overhead_numel * 4 + TENSOR_OVERHEAD_BYTES)
        copies = 3 * max(counts) * (args.overhead_numel * DTYPES[dtype].itemsize
                                    + TENSOR_OVERHEAD_BYTES)
        needs = {"cpu": values + (copies if kind == "cpu" else 0)}
        if kind != "cpu":
            needs[device] = copies
        for where, needed in needs.items():
            _check_fits(needed, where, f"--overhead-numel {args.overhead_numel} x "
                                       f"--overhead-tensors {max(counts)}: the tensors on {where}")
    backend = _lora_backend(args.backend, device)
    notes = ["the closures return a constant loss (g = 0): every pass still runs in full, only "
             "perturb/update and the optimizer's bookkeeping are timed",
             "passes per step: the loop's 4 (torch.normal per tensor each), zokernels' 3 "
             "(+eps, -eps recovering theta, restore fused with the update), + 2 undo-log "
             "scatters with exact restore; us/tensor/pass = ms/step / (tensors x passes)"]
    if warmup < PROBE_STEPS and any(c.endswith("undo") for c in cases):
        notes.append(f"--warmup {warmup} < {PROBE_STEPS}: the undo-log rows include the "
                     f"count-only probes that size the logs in the first {PROBE_STEPS} steps")
    if kind == "cpu":
        notes.append("launches are counted on CUDA only (triton: its own counter; the loop: "
                     "torch.profiler)")
    elif backend == "triton":
        notes.append("launches of the zokernels rows are Triton kernel launches "
                     "(backends.triton launch_count), not the few small torch ops of the scalars")
    overhead_backends: list[tuple[str, str]] = []
    if counts:
        if "cpu" in zokernels.available_backends():
            overhead_backends.append(("cpu", "cpu"))
        if (device, backend) not in overhead_backends:
            overhead_backends.append((device, backend))
    settings = LoraSettings(preset=args.preset, targets=tuple(targets), rank=args.rank,
                            layers=args.layers, dtype=dtype, device=device, backend=backend,
                            warmup=warmup, repeats=repeats, source=args.source,
                            cases=tuple(cases), overhead_tensors=tuple(counts),
                            overhead_numel=args.overhead_numel,
                            overhead_backends=overhead_backends)
    return settings, notes


def main_lora(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        apply_run_options(args)
        settings, notes = plan_lora(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    progress = Progress(len(settings.targets)
                        + len(settings.overhead_tensors) * len(settings.overhead_backends))
    print(f"{PROG} lora: zokernels {zokernels.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, {settings.device} "
          f"({device_name(settings.device)})", file=sys.stderr)
    shapes = {targets: settings.shapes(targets) for targets in settings.targets}
    sets = [settings.describe(targets, shapes[targets]) for targets in settings.targets]
    steps, overhead = run_lora_bench(settings, shapes, on_start=progress.start,
                                     on_done=lambda _, result: progress.finish(result))
    print(f"zokernels {zokernels.__version__} · torch {torch.__version__} · "
          f"{torch.get_num_threads()} CPU threads · medians of {settings.repeats} steps after "
          f"{settings.warmup}, the cases' steps interleaved")
    print()
    print(format_lora_tables(settings, sets, steps, overhead))
    for note in notes:
        print(f"note: {note}")
    if getattr(args, "json", None) is not None:
        devices = list(dict.fromkeys([settings.device]
                                     + [d for d, _ in settings.overhead_backends]))
        plan = Plan("lora", [], {d: settings.warmup for d in devices},
                    {d: settings.repeats for d in devices}, notes, json_path=args.json)
        config = dict(preset=settings.preset, targets=list(settings.targets),
                      rank=settings.rank, layers=settings.num_layers, source=settings.source,
                      dtype=settings.dtype, device=settings.device, backend=settings.backend,
                      eps=settings.eps, lr=settings.lr, b_std=B_STD, cases=list(settings.cases),
                      sets=sets, overhead_tensors=list(settings.overhead_tensors),
                      overhead_numel=settings.overhead_numel,
                      overhead_backends=[list(pair) for pair in settings.overhead_backends])
        if not write_json(args.json, plan, steps, argv,
                          extra=dict(lora=config, overhead=overhead)):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
