"""The benchmark engine behind `zokernels-bench` and benchmarks/sweep_ops.py.

A run is a list of groups, one per (shape set, dtype, device); each group allocates its tensor set
once (random values), times a list of cases over it, and frees it before the next group. Cases:

    copy             dst.copy_(src) per tensor: the bandwidth reference, measured in every group
    mezo-loop        MeZO's zo_perturb_parameters: torch.manual_seed(s); per tensor
                     z = torch.normal(0, 1, p.size(), dtype, device); p.data = p.data + scale * z
    randn-add-loop   per tensor p.add_(torch.randn_like(p), alpha=scale) (in place, z still in memory)
    perturb_         zokernels.perturb_ on one backend: K seeds, dist, rounding; with `applied`,
                     the pass a ZO step makes after its first probe (recover theta from the
                     perturbation the tensors hold, then apply the new one: applied= scales)
    lowrank_perturb_ zokernels.lowrank_perturb_ over the 2-D tensors of the set, rank r, fp32 factors

Every row reports the bytes the op must move (read + write of the tensors it updates, plus the
factors for the low-rank op), so GB/s compares with the copy measured in the same group.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import zokernels

from .shapes import DecoderConfig, Shape, _opt, model_shapes, shape_set_names
from .timing import measure, synchronize

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                 "half": "float16"}
BASELINE = "baseline"  # the `backend` of the copy and the two torch loops
BASELINE_OPS = ("mezo-loop", "randn-add-loop")
SCALE = 1e-3  # eps-sized: values stay O(1) however many times a case runs

# A tiny OPT-style decoder (36 tensors, 0.17M elements) for tests and smoke runs.
TINY = "tiny"
_TINY_CONFIG = DecoderConfig("opt", hidden=64, layers=2, ffn=256, vocab=1000, max_positions=126)


@dataclass(frozen=True)
class ShapeSet:
    """A named list of tensor shapes (a model's parameters, or a single tensor for sweeps)."""
    name: str
    shapes: tuple[Shape, ...]

    @property
    def numel(self) -> int:
        return sum(_count(shape) for shape in self.shapes)

    @property
    def matrices(self) -> list[Shape]:
        """The 2-D shapes: what the low-rank op perturbs."""
        return [shape for shape in self.shapes if len(shape) == 2]

    @property
    def largest(self) -> int:
        return max((_count(shape) for shape in self.shapes), default=0)


def _count(shape: Shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def known_shape_sets() -> list[str]:
    return shape_set_names() + [TINY]


def get_shape_set(name: str) -> ShapeSet:
    """A model's shape set by name (see shapes.py; `-lora` for LoRA r=8 adapters) or `tiny`."""
    if name == TINY:
        return ShapeSet(TINY, tuple(shape for _, shape in _opt(_TINY_CONFIG)))
    if name not in known_shape_sets():
        raise ValueError(f"unknown shape set {name!r}; known: {', '.join(known_shape_sets())}")
    return ShapeSet(name, tuple(shape for _, shape in model_shapes(name)))


def single_tensor(numel: int) -> ShapeSet:
    return ShapeSet(f"1x{numel}", ((numel,),))


@dataclass(frozen=True)
class Case:
    """One timed row. Fused ops name their backend; the copy and the loops are BASELINE."""
    op: str
    backend: str = BASELINE
    dist: str | None = None
    k: int | None = None
    rounding: str | None = None
    rank: int | None = None
    applied: bool = False  # perturb_ with applied= (recovery of the held perturbation first)
    # perturb_ on shards (index maps: Workload.shard_maps): None unsharded; "split" the 2-D
    # tensors at whole Philox calls, the 1-D ones at an offset that is not (the Triton backend
    # splits such a call into a shifted and a mapped launch); "mapped" the same maps in one
    # mapped launch (the split turned off, as before it existed)
    shards: str | None = None
    repeats: int | None = None  # overrides the run's (the costly CPU loops in the quick run)
    warmup: int | None = None

    def label(self) -> str:
        parts = [self.op] + ([self.backend] if self.backend != BASELINE else [])
        if self.dist:
            parts.append(self.dist)
        if self.k is not None and self.op != "mezo-loop" and self.op != "randn-add-loop":
            parts.append(f"K={self.k}")
        if self.rank is not None:
            parts.append(f"r={self.rank}")
        if self.rounding == "stochastic":
            parts.append("stochastic")
        if self.applied:
            parts.append("applied")
        if self.shards:
            parts.append(f"shards={self.shards}")
        return " ".join(parts)


COPY = Case("copy")
MEZO = Case("mezo-loop", dist="gaussian", k=1, rounding="nearest")
RANDN_ADD = Case("randn-add-loop", dist="gaussian", k=1, rounding="nearest")


@dataclass
class Group:
    """One (shape set, dtype, device) and its cases; the copy case is added first if missing."""
    shape_set: ShapeSet
    dtype: str
    device: str
    cases: list[Case] = field(default_factory=list)

    def __post_init__(self) -> None:
        if COPY not in self.cases:
            self.cases.insert(0, COPY)

    @property
    def max_rank(self) -> int:
        return max((c.rank for c in self.cases if c.rank is not None), default=0)

    def required_bytes(self) -> dict[str, int]:
        """Peak memory of the group, by part: the tensor set, the copy buffer, the temporaries
        of the loops (z and the new p.data of the largest tensor) and the low-rank factors."""
        itemsize = DTYPES[self.dtype].itemsize
        parts = {"tensors": self.shape_set.numel * itemsize,
                 "copy buffer": self.shape_set.numel * itemsize}
        if any(c.op in BASELINE_OPS for c in self.cases):
            parts["loop temporaries"] = 2 * self.shape_set.largest * itemsize
        if self.max_rank:
            parts["factors"] = 4 * sum(m + n + 1 for m, n in self.shape_set.matrices) * self.max_rank
        return parts


class Workload:
    """The tensors of one group, allocated once with random values, and the callables timed."""

    def __init__(self, group: Group, seed: int = 0) -> None:
        self.group = group
        self.device = torch.device(group.device)
        dtype = DTYPES[group.dtype]
        generator = torch.Generator(device=self.device).manual_seed(seed)
        self.tensors = [torch.randn(shape, dtype=dtype, device=self.device, generator=generator)
                        for shape in group.shape_set.shapes]
        self.copies = [torch.empty_like(t) for t in self.tensors]
        self.matrices = [t for t in self.tensors if t.dim() == 2]
        self._factors: dict[int, tuple[list[torch.Tensor], ...]] = {}

    def factors(self, rank: int) -> tuple[list[torch.Tensor], ...]:
        """U (m x r), V (n x r), tau (r) per 2-D weight, float32, made once per rank."""
        if rank not in self._factors:
            generator = torch.Generator(device=self.device).manual_seed(rank)

            def randn(*shape: int) -> torch.Tensor:
                return torch.randn(shape, device=self.device, generator=generator)

            self._factors[rank] = ([randn(w.shape[0], rank) for w in self.matrices],
                                   [randn(w.shape[1], rank) for w in self.matrices],
                                   [randn(rank) for _ in self.matrices])
        return self._factors[rank]

    def numel(self, case: Case) -> tuple[int, int]:
        """(elements, tensors) that the case updates."""
        if case.op == "lowrank_perturb_":
            return sum(w.numel() for w in self.matrices), len(self.matrices)
        return self.group.shape_set.numel, len(self.tensors)

    def bytes_moved(self, case: Case) -> int:
        """Read + write of every updated element, plus the factors the low-rank op reads."""
        elements, _ = self.numel(case)
        moved = 2 * DTYPES[self.group.dtype].itemsize * elements
        if case.op == "lowrank_perturb_":
            moved += 4 * sum(m + n + 1 for m, n in (w.shape for w in self.matrices)) * case.rank
        return moved

    def callable(self, case: Case) -> Callable[[], None]:
        tensors, copies = self.tensors, self.copies
        if case.op == "copy":
            return lambda: copy_loop(copies, tensors)
        if case.op == "mezo-loop":
            return lambda: mezo_loop(tensors, 1, SCALE)
        if case.op == "randn-add-loop":
            return lambda: randn_add_loop(tensors, 1, SCALE)
        if case.op == "perturb_":
            seeds, scales = list(range(1, case.k + 1)), [SCALE / case.k] * case.k
            # applied = scales: recover theta from round(theta + D), then apply D again, so the
            # values stay where they are however many times the case runs.
            applied = scales if case.applied else None
            maps = None if case.shards is None else self.shard_maps()

            def perturb() -> None:
                zokernels.perturb_(tensors, seeds, scales, dist=case.dist,
                                   rounding=case.rounding, applied=applied, index_maps=maps,
                                   backend=case.backend)
            if case.shards == "mapped":
                return lambda: _without_split(perturb)
            return perturb
        if case.op == "lowrank_perturb_":
            us, vs, taus = self.factors(case.rank)
            return lambda: zokernels.lowrank_perturb_(self.matrices, us, vs, taus, scale=SCALE,
                                                      rounding=case.rounding, rounding_seed=7,
                                                      backend=case.backend)
        raise ValueError(f"unknown op {case.op!r}")

    def shard_maps(self) -> list[tuple[int, int, int]]:
        """Every tensor as rank 1's dim-0 shard of a tensor twice its size (g(i) = numel + i),
        the 1-D ones 2 elements further (g(i) = numel + 2 + i): FSDP2's layout, where 1-D
        chunks (e.g. 5120 / 16 = 320) need not start at whole Philox calls (4 gaussian, 128
        rademacher), while rows of 2048 do."""
        return [(t.numel() + (2 if t.dim() == 1 else 0), t.numel(), t.numel())
                for t in self.tensors]

    def free(self) -> None:
        self.tensors = self.copies = self.matrices = []
        self._factors = {}
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _without_split(fn: Callable[[], None]) -> None:
    """fn() with the Triton backend's shifted / mapped split turned off (a call with any map
    that the plain kernel cannot take runs in one mapped launch, as before the split)."""
    try:
        from zokernels.backends.triton import perturb as triton_perturb
    except ImportError:  # no Triton: nothing to turn off
        fn()
        return
    bound = triton_perturb.SPLIT_MIN_ELEMENTS
    triton_perturb.SPLIT_MIN_ELEMENTS = 1 << 62
    try:
        fn()
    finally:
        triton_perturb.SPLIT_MIN_ELEMENTS = bound


def copy_loop(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    for dst, src in zip(destinations, sources):
        dst.copy_(src)


def mezo_loop(params: list[torch.Tensor], seed: int, scale: float) -> None:
    """The MeZO-style loop: the operations of MeZO's zo_perturb_parameters (Malladi et al. 2023)."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype, device=p.device)
        p.data = p.data + scale * z


def randn_add_loop(params: list[torch.Tensor], seed: int, scale: float) -> None:
    """The obvious in-place improvement: no new p.data, but z is still written and read."""
    torch.manual_seed(seed)
    for p in params:
        p.add_(torch.randn_like(p), alpha=scale)


def launches_per_call(case: Case, fn: Callable[[], None], device: torch.device) -> int | None:
    """Kernel launches of one call: the triton backend counts its own; on CUDA the others are
    counted with torch.profiler; None on the CPU, where there are no launches to count."""
    if case.backend == "triton":
        from zokernels.backends.triton import launch_count, reset_launch_count

        reset_launch_count()
        fn()
        synchronize(device)
        return launch_count()
    if device.type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            synchronize(device)
        # Kernels, memcpys and memsets: everything the host enqueued on the GPU.
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # profiler unavailable (e.g. CUPTI missing): the column is optional
        return None


class Progress:
    """`[i/n] label ... result` lines on stderr, one per timed case."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def start(self, label: str) -> None:
        print(f"[{self.done + 1}/{self.total}] {label} ...", end="", file=sys.stderr, flush=True)

    def finish(self, result: str) -> None:
        self.done += 1
        print(f" {result}", file=sys.stderr, flush=True)


def run_group(group: Group, *, warmup: int, repeats: int, target_ms: float | None = None,
              on_start: Callable[[Case], None] | None = None,
              on_done: Callable[[Case, dict], None] | None = None) -> list[dict]:
    """Time every case of the group over one allocation; returns one result dict per case with
    % of copy bandwidth and the speedup vs the MeZO loop filled in (None without it)."""
    work = Workload(group)
    device = work.device
    rows: list[dict] = []
    try:
        for case in group.cases:
            if on_start:
                on_start(case)
            fn = work.callable(case)
            launches = launches_per_call(case, fn, device)
            timing = measure(fn, device=group.device,
                             warmup=warmup if case.warmup is None else case.warmup,
                             repeats=repeats if case.repeats is None else case.repeats,
                             target_ms=target_ms)
            elements, tensors = work.numel(case)
            moved = work.bytes_moved(case)
            row = dict(op=case.op, backend=case.backend, dtype=group.dtype, device=group.device,
                       dist=case.dist, k=case.k, rounding=case.rounding, rank=case.rank,
                       applied=case.applied, shards=case.shards,
                       shape_set=group.shape_set.name, numel=elements, tensors=tensors,
                       bytes=moved, ms=timing.median_ms, ms_p20=timing.p20_ms,
                       ms_p80=timing.p80_ms, repeats=timing.repeats, warmup=timing.warmup,
                       gbps=moved / timing.median_ms / 1e6, pct_copy_bw=None,
                       speedup_vs_mezo_loop=None, launches_per_call=launches)
            rows.append(row)
            if on_done:
                on_done(case, row)
    finally:
        work.free()
    copy = next(r for r in rows if r["op"] == "copy")
    mezo = next((r for r in rows if r["op"] == "mezo-loop"), None)
    for row in rows:
        row["pct_copy_bw"] = 100.0 * row["gbps"] / copy["gbps"]
        if mezo is not None:
            row["speedup_vs_mezo_loop"] = mezo["ms"] / row["ms"]
    return rows


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(devices: list[str]) -> dict:
    """Versions and machine facts for the JSON's top level."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    info = dict(device="; ".join(device_name(d) for d in devices), devices=devices,
                torch=torch.__version__, triton=triton_version, zokernels=zokernels.__version__,
                python=platform.python_version(), threads=torch.get_num_threads(),
                cpu_count=os.cpu_count(), backends_available=zokernels.available_backends(),
                triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")
    if "cpu" in zokernels.available_backends():
        from zokernels.backends.cpu import build_info

        info["cpu_extension"] = build_info()
    if any(torch.device(d).type == "cuda" for d in devices):
        info["cuda"] = torch.version.cuda
    return info


def write_report(path: str, devices: list[str], script: str, argv: list[str] | None,
                 **fields) -> None:
    """A benchmark script's JSON: environment(devices), the date, the command that ran it
    (`python <script> <argv>`) and `fields`."""
    doc = dict(environment(devices),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command=f"python {script} " + " ".join(sys.argv[1:] if argv is None else argv),
               **fields)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def available_memory_bytes(device: str) -> int | None:
    """Free memory for a new tensor set: free GPU memory, or MemAvailable on Linux."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
