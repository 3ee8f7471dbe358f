"""Dense perturbations evaluated without writing the weights (virtual probes of MeZO / LeZO).

A probe needs f(theta + eps z). Instead of writing theta + eps z into the weights (and restoring
them exactly afterwards, which needs undo or selector logs), a TorchFunctionMode hands every torch
function that reads a registered parameter the perturbed values, computed on the fly from the
seed by the same kernels and the same rounding as the in-place pass:

    F.linear(x, W, b)       W' = round(W + eps z) materialized a chunk of output rows at a time
                            (whole multiples of 256 rows: CPU GEMMs then give the unchunked
                            result bit for bit), each chunk's outputs written into the result
    F.embedding(i, W)       only the rows that i selects (unique rows, drawn at their indices)
    anything else           a perturbed copy of the parameter (small ones: 1-D norms, biases)

Nothing is written to a parameter, so there is nothing to restore and no log: an exception or a
KeyboardInterrupt anywhere leaves the weights as they were. The noise of element i is the
contract's z(seed, key, i) whatever the chunk (index maps), so the probe sees exactly the bits the
in-place pass would write. The cost is the in-place pass's noise (once per read: a weight read
twice, e.g. a tied embedding and head, draws its noise twice, the embedding only for its rows)
written straight into scratch (the kernel's out-of-place form reads theta and writes
theta + eps z: one pass where a clone and an in-place pass took two); the scratch is bounded
(`scratch_elements`, the peak is reported).

What qualifies is measured, not assumed: the optimizer's first probe runs in place AND virtually
(`ProbeTracker` classifies every read) and keeps the virtual path only when both losses are equal
bit for bit and nothing wrote a parameter; parameters whose draw would exceed the limit
(`DenseProbes.qualifies`), or not read at all, keep the in-place path.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.nn.modules import module as _module
from torch.overrides import TorchFunctionMode

from ._dispatch import implementation, resolve_backend
from .backends.cpu.perturb import perturb_pieces_cpu
from .held import DenseTarget, MovedParameters, SeededNoise
from .lowrank_probe import _METADATA, _tensors  # metadata reads; the tensors in an argument
from .ops.undo import UndoLog
from .space import ParameterSpace

# Output rows per chunk are a multiple of this: measured on the CPU (oneDNN / MKL, fp32 and
# bf16), F.linear over row chunks of 341 or 1365 rows differs from the whole product in a few
# outputs, over multiples of 64 never; 256 leaves margin.
ROW_ALIGN = 256
# A weight's last chunk is at least this many rows (the chunk before it gives up 64): measured
# (torch 2.13, fp32, 1 thread), a last chunk of 1-63 rows (e.g. 520 = 2 x 256 + 8) gave other
# bits than the whole product from 4 input rows on (not at 1-3: a check on a small batch would
# pass and a later batch differ); so split (256 + 192 + 72), every case of 257-2148 rows x
# 48-768 columns x 1-255 inputs matched, in fp32, bf16 and fp16.
MIN_LAST_CHUNK_ROWS = 64
# A linear weight's chunk aims at 1% of the virtual parameters' elements, at least 2^16 (and
# never below ROW_ALIGN rows): measured on OPT-125m bf16 (CPU), 1% makes the ZO part 0.83x that
# of exact_restore=False at 0.94% extra memory. One draw may hold up to 4% (a ROW_ALIGN-row
# chunk of a wide weight in a small model, a parameter read whole); a parameter that needs more
# stays in place, where its selector logs take about 3.7% (bf16).
SCRATCH_FRACTION = 0.01
MIN_SCRATCH_ELEMENTS = 1 << 16
LIMIT_FRACTION = 0.04


class VirtualDenseTarget(DenseTarget):
    """A ParameterSpace whose probes are not written (HeldPerturbation calls `hold` instead of
    writing them): `current` is the perturbation the weights are evaluated at, which
    `DenseProbes.probing` hands to the reads. Its updates are ordinary passes from theta."""

    writes_probes = False

    def __init__(self, space: ParameterSpace) -> None:
        super().__init__(space)
        self.current: SeededNoise | None = None

    def make_log(self) -> UndoLog:
        return UndoLog()  # never filled: nothing is written that would need restoring

    def compatible(self, held: SeededNoise, move: SeededNoise) -> bool:
        return True

    def hold(self, move: SeededNoise | None) -> None:
        if move is not None:  # what the probes will draw from, as a pass would check it
            self.space.check_materialized()
        self.current = move

    def write(self, move: SeededNoise, held: SeededNoise | None = None, **kwargs: Any) -> None:
        self.current = None  # an update: the weights hold theta, there is nothing to recover
        super().write(move, None, **kwargs)

    def rewrite(self, log: UndoLog, move: SeededNoise | None = None, **kwargs: Any) -> None:
        return None


def _registered(values: Any, entries: dict) -> list[torch.Tensor]:
    """The tensors among `values` (and in their containers) whose id is in `entries`: the mode's
    test of every torch call, written for the common case of a few plain tensor arguments."""
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            if id(value) in entries:
                found.append(value)
        elif isinstance(value, (list, tuple, dict)):
            found.extend(t for t in _tensors(value) if id(t) in entries)
    return found


def _replace(value: Any, swap: dict[int, torch.Tensor]) -> Any:
    """`value` with the tensors whose id is in `swap` replaced (containers rebuilt)."""
    if isinstance(value, torch.Tensor):
        return swap.get(id(value), value)
    if isinstance(value, (list, tuple)):
        items = [_replace(item, swap) for item in value]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, dict):
        return {k: _replace(v, swap) for k, v in value.items()}
    return value


def _embedding_weight(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """F.embedding's (weight, max_norm) arguments."""
    return (args[1] if len(args) > 1 else kwargs.get("weight"),
            args[3] if len(args) > 3 else kwargs.get("max_norm"))


_INPLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                               "__ifloordiv__", "__imod__", "__idiv__", "__ipow__", "__imatmul__",
                               "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"})
_SET_DATA = torch.Tensor.data.__set__  # `t.data = value` (compared with ==: new each access)
# position of the `inplace` argument of a torch.nn.functional function (None: it has none)
_INPLACE_AT: dict[Any, int | None] = {}


def _sets_memory(func: Any) -> bool:
    """Whether `func` gives its first argument other memory (`t.data = value`, Tensor.set_)
    rather than writing values into the memory it has."""
    name = getattr(func, "__name__", "")
    return name == "set_" or (name == "__set__" and func == _SET_DATA)


# dropouts write nothing when not training or with p == 0, inplace=True or not
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
             F.feature_alpha_dropout}


def _inplace_requested(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a torch.nn.functional function is called with inplace=True (F.relu(w, True))
    and writes (a dropout in eval mode or with p = 0 does not)."""
    if func in _DROPOUTS:
        try:
            bound = inspect.signature(func).bind(*args, **kwargs)
        except TypeError:  # the call itself will raise
            return False
        bound.apply_defaults()
        options = bound.arguments
        return bool(options["inplace"]) and bool(options["training"]) and options["p"] != 0
    if "inplace" in kwargs:
        return bool(kwargs["inplace"])
    try:
        at = _INPLACE_AT[func]
    except KeyError:
        at = None
        if getattr(func, "__module__", None) == "torch.nn.functional":
            try:
                at = list(inspect.signature(func).parameters).index("inplace")
            except (ValueError, TypeError):
                at = None
        _INPLACE_AT[func] = at
    except TypeError:  # not hashable
        return False
    return at is not None and len(args) > at and bool(args[at])


def _describe(func: Any) -> str:
    """`func` named in a write's report."""
    if getattr(func, "__name__", "") == "__set__" and func == _SET_DATA:
        return "Tensor.data.__set__"
    return getattr(func, "__qualname__", repr(func))


def _write_targets(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors `func` writes in place: its first argument for an in-place method or function
    (name ending in `_`, an augmented assignment, setitem, `.data = `, inplace=True), every
    tensor of the first argument of a `_foreach_*_` function, out=, and F.embedding's weight
    with max_norm (renormalized in place)."""
    name = getattr(func, "__name__", "")
    targets: list[torch.Tensor] = []
    if args:
        first = args[0]
        if ((name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS
                or (name == "__set__" and func == _SET_DATA)):
            if isinstance(first, torch.Tensor):
                targets.append(first)
            elif name.startswith("_foreach_") and isinstance(first, (list, tuple)):
                targets.extend(t for t in first if isinstance(t, torch.Tensor))
        elif isinstance(first, torch.Tensor) and _inplace_requested(func, args, kwargs):
            targets.append(first)
    out = kwargs.get("out")
    if out is not None:
        targets.extend(_tensors(out))
    if func is F.embedding:
        weight, max_norm = _embedding_weight(args, kwargs)
        if max_norm is not None and isinstance(weight, torch.Tensor):
            targets.append(weight)
    return targets


def _storage_pointer(tensor: torch.Tensor) -> int | None:
    """The address of `tensor`'s storage (None: no elements or no storage)."""
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return pointer or None


class _ModuleRecord:
    """What ran inside one module during a tracked probe (its forward and hooks, its children
    included): the registered parameters read (ids), the torch calls, how often it was entered
    and from which modules (ids; None: from outside every module)."""

    __slots__ = ("module", "reads", "calls", "entries", "parents")

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.reads: set[int] = set()
        self.calls = 0
        self.entries = 0
        self.parents: set[int | None] = set()


class ProbeTracker:
    """What one tracked probe saw, per registered parameter (by id): how it was read
    ("linear": F.linear's 2-D weight, drawn a chunk of rows at a time; "embedding":
    F.embedding's weight, its selected rows; "whole": by any other function, a copy of the
    whole parameter), and the first write of a parameter. With `watching_modules`, also what
    ran inside each module (`modules`, id -> _ModuleRecord, in the order first entered)."""

    def __init__(self) -> None:
        self.reads: dict[int, set[str]] = {}
        self.write: str | None = None
        self.modules: dict[int, _ModuleRecord] = {}
        self._running: list[_ModuleRecord] = []

    def note(self, func: Any, args: tuple, kwargs: dict, found: list[torch.Tensor]) -> None:
        """Classify the reads of the registered parameters `found` by `func` (the writes are
        recorded by the mode, which also sees those through a perturbed copy's aliases)."""
        rows = _rows_argument(func, args, kwargs)
        for t in found:
            kind = "whole" if t is not rows else "linear" if func is F.linear else "embedding"
            self.reads.setdefault(id(t), set()).add(kind)
        for record in self._running:
            record.reads.update(id(t) for t in found)

    def count(self) -> None:
        """One torch call, inside the modules running now."""
        for record in self._running:
            record.calls += 1

    @contextlib.contextmanager
    def watching_modules(self) -> Iterator[None]:
        """Inside the block, global module hooks keep the running modules. They are registered
        after the user's global hooks and run after them, and torch runs every global hook
        before the module's own: a module's record covers its own pre-hooks, its forward and
        the global forward hooks, not its own forward hooks, as _Suspension brackets it."""
        handles = [_module.register_module_forward_pre_hook(self._enter)]
        try:
            handles.append(_module.register_module_forward_hook(self._leave, always_call=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._running.clear()

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        record = self.modules.get(id(module))
        if record is None:
            record = self.modules[id(module)] = _ModuleRecord(module)
        record.entries += 1
        record.parents.add(id(self._running[-1].module) if self._running else None)
        self._running.append(record)

    def _leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._running and self._running[-1].module is module:
            self._running.pop()


# A module's torch calls run outside the probes' mode when it reads no perturbed parameter and
# makes at least this many calls per entry. Measured on the CPU (torch 2.13): the mode costs
# about 3 us per call of a cheap op (more through torch.nn.functional's Python wrappers), taking
# it off and back by a module's hooks about 8 us per entry (the hooks' registration included).
MIN_CALLS_OUTSIDE_MODE = 8
# ZOKERNELS_PROBE_SCOPE=0: the first probe's check looks for no module to leave out (the mode
# stays on everywhere, as before 2026-12-07b), e.g. for a forward whose reads of a parameter
# move between modules from one step to the next.
SCOPE_ENV = "ZOKERNELS_PROBE_SCOPE"


def scope_wanted() -> bool:
    """Whether the probes may leave their mode off in some modules (SCOPE_ENV is not "0")."""
    return os.environ.get(SCOPE_ENV, "1").strip() != "0"


class ModuleScope:
    """Where a probe's mode may be left off: the modules of a tracked probe (ProbeTracker
    .modules) that made at least MIN_CALLS_OUTSIDE_MODE torch calls per entry. `outside(active)`
    lists those whose record reads none of `active` (parameter ids), outermost only: a
    module whose every caller is listed, or runs inside one listed, runs outside the mode
    already. Valid while the forward reads each parameter where the tracked one did: the
    optimizer's first probe checks it (MeZO._checked_scope), later forwards are trusted."""

    def __init__(self, tracker: ProbeTracker) -> None:
        self.records = list(tracker.modules.values())

    def outside(self, active: Any) -> list[torch.nn.Module]:
        covered: dict[int | None, bool] = {None: False}
        chosen = []
        for record in self.records:  # parents first: a module is entered after its caller
            inside = all(covered.get(parent, False) for parent in record.parents)
            free = (not inside and record.calls >= MIN_CALLS_OUTSIDE_MODE * record.entries
                    and record.reads.isdisjoint(active))
            if free:
                chosen.append(record.module)
            covered[id(record.module)] = inside or free
        return chosen


class _Suspension:
    """Takes `mode` off the torch-function stack while one of `modules` runs (its pre-hook,
    first of the module's, pops it where it is on top; its forward hook, first of the
    module's and always called, pushes it back): their torch calls cost nothing extra. A
    module entered inside another, or below a mode the forward pushed itself, keeps the stack
    as it is; so does a module run in another thread (the stack is per thread: so is what the
    hooks remember). Under torch.compile's tracing the hooks do nothing. `close` removes the
    hooks and, where the mode is no longer on this thread's stack (a BaseException skips
    always-called hooks), pushes it back."""

    def __init__(self, mode: TorchFunctionMode, modules: Sequence[torch.nn.Module]) -> None:
        self.mode = mode
        self.thread = threading.get_ident()
        self.popped: list[bool] = []  # per module running: whether its entry popped the mode
        self.handles: list[Any] = []
        try:
            for module in modules:
                self.handles.append(module.register_forward_pre_hook(self._enter, prepend=True))
                self.handles.append(module.register_forward_hook(self._leave, prepend=True,
                                                                 always_call=True))
        except BaseException:
            self.close()
            raise

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        if threading.get_ident() != self.thread:
            return
        depth = torch._C._len_torch_function_stack()
        on_top = (depth > 0 and torch._C._get_function_stack_at(depth - 1) is self.mode
                  and not torch.compiler.is_compiling())
        self.popped.append(on_top)
        if on_top:
            torch._C._pop_torch_function_stack()

    def _leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() != self.thread:
            return
        if self.popped and self.popped.pop():
            torch._C._push_on_torch_function_stack(self.mode)

    def close(self) -> None:
        while self.handles:
            self.handles.pop().remove()
        self.popped.clear()
        stack = [torch._C._get_function_stack_at(i)
                 for i in range(torch._C._len_torch_function_stack())]
        if not any(mode is self.mode for mode in stack):
            torch._C._push_on_torch_function_stack(self.mode)


def _rows_argument(func: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The weight that `func` reads row-chunkable (F.linear's 2-D weight, F.embedding's weight
    without max_norm), or None."""
    if func is F.linear:
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
    if func is F.embedding:
        weight, max_norm = _embedding_weight(args, kwargs)
        return weight if max_norm is None else None
    return None


class DenseProbes:
    """The virtual dense targets of one optimizer (one per param group) and the torch-function
    mode that evaluates their probes (module docstring).

    scratch_elements: the elements a chunk of a linear weight's rows aims at (never fewer
    than ROW_ALIGN rows); default max(2^16, SCRATCH_FRACTION of the targets' elements).
    `limit_elements`: the most one draw may hold (a chunk, or a whole parameter read by other
    functions): LIMIT_FRACTION of the targets' elements, at least scratch_elements; a parameter
    whose draw would be larger stays in place (`qualifies`). `peak_scratch_bytes`: the largest
    draw seen (an embedding's selected rows included)."""

    def __init__(self, targets: Sequence[VirtualDenseTarget],
                 scratch_elements: int | None = None) -> None:
        self.targets = list(targets)
        self.entries = {id(t.space.params[j]): (t, j)
                        for t in self.targets for j in range(len(t.space))}
        total = sum(t.space.numel for t in self.targets)
        self.scratch_elements = (max(MIN_SCRATCH_ELEMENTS, int(total * SCRATCH_FRACTION))
                                 if scratch_elements is None else int(scratch_elements))
        self.limit_elements = max(self.scratch_elements, int(total * LIMIT_FRACTION))
        self.peak_scratch_bytes = 0
        self.scope: ModuleScope | None = None  # where the mode may be left off (checked)
        self._chunk_buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def chunk_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """A flat buffer of like's dtype and device with like.numel() elements, kept across the
        draws of one probe (grown when a larger chunk needs it; freed when the probe ends;
        counted in the peak beside any draw made while it lives)."""
        key = (like.device, like.dtype)
        buffer = self._chunk_buffers.get(key)
        if buffer is None or buffer.numel() < like.numel():
            self._chunk_buffers.pop(key, None)  # the old one freed before the new one
            with torch.inference_mode(False):  # written inside and outside inference mode
                buffer = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
            self._chunk_buffers[key] = buffer
        return buffer[:like.numel()]

    def draw_elements(self, tensor: torch.Tensor, reads: set[str]) -> int:
        """The largest draw a parameter read this way (ProbeTracker.reads) needs at this
        scratch bound (an embedding's rows aside: they depend on the batch)."""
        largest = tensor.numel() if "whole" in reads else 0
        if "linear" in reads:
            rows, columns = tensor.shape
            chunks = _row_chunks(rows, self.rows_per_chunk(columns))
            largest = max(largest, max((b - a for a, b in chunks), default=0) * columns)
        return largest

    def qualifies(self, tensor: torch.Tensor, reads: set[str] | None) -> bool:
        """Whether a parameter read this way (ProbeTracker.reads; None: not read) can be
        virtual within the limit."""
        return bool(reads) and self.draw_elements(tensor, reads) <= self.limit_elements

    def perturbed_ids(self) -> set[int]:
        """The ids of the parameters the targets' `current` perturbations move."""
        return {id(target.space.params[j]) for target in self.targets
                if target.current is not None
                for j in target.space.indices(target.current.layers)}

    @contextlib.contextmanager
    def probing(self, tracker: ProbeTracker | None = None) -> Iterator[None]:
        """Inside the block, reads of the targets' parameters see their `current` perturbation;
        with a tracker, every read of a registered parameter is classified too. The 1-D
        parameters of the perturbation (biases, norms) are drawn on entry, in one call per
        target, while they fit in the scratch bound; the others when read."""
        active: dict[int, tuple[_Draw, int]] = {}
        prefetched: dict[int, torch.Tensor] = {}
        for target in self.targets:
            if target.current is None:
                continue
            chosen = target.space.indices(target.current.layers)
            if not chosen:
                continue
            draw = _Draw(self, target)
            for j in chosen:
                active[id(target.space.params[j])] = (draw, j)
            small, room = [], self.scratch_elements
            for j in chosen:
                size = target.space.tensors[j].numel()
                if target.space.tensors[j].dim() <= 1 and size <= room:
                    small.append(j)
                    room -= size
            for j, copy in zip(small, draw.wholes(small)):
                prefetched[id(target.space.params[j])] = copy
        if not active and tracker is None:
            yield
            return
        try:
            with _ProbeMode(self, active, prefetched, tracker) as mode:
                if tracker is not None:
                    with tracker.watching_modules():
                        yield
                    return
                suspension = _Suspension(mode, self.scope.outside(active) if self.scope else ())
                try:
                    yield
                finally:
                    suspension.close()
        finally:
            self._chunk_buffers.clear()  # scratch of this probe only

    def _charge(self, pieces: Sequence[torch.Tensor]) -> None:
        """Raise the peak to the bytes of `pieces` (a draw) plus the chunk buffers alive beside
        them (a draw into a buffer counts the buffer once)."""
        buffers = {b.untyped_storage().data_ptr(): b.numel() * b.element_size()
                   for b in self._chunk_buffers.values()}
        drawn = sum(p.numel() * p.element_size() for p in pieces
                    if not buffers or p.untyped_storage().data_ptr() not in buffers)
        self.peak_scratch_bytes = max(self.peak_scratch_bytes, drawn + sum(buffers.values()))

    def rows_per_chunk(self, columns: int) -> int:
        return max(ROW_ALIGN, self.scratch_elements // max(columns, 1) // ROW_ALIGN * ROW_ALIGN)


def _row_chunks(rows: int, step: int) -> list[tuple[int, int]]:
    """[start, stop) of a weight's row chunks: `step` rows each (a multiple of ROW_ALIGN) from
    row 0; a last chunk of fewer than MIN_LAST_CHUNK_ROWS rows takes that many more from the
    chunk before (still a multiple of 64 rows, the largest chunk still `step`)."""
    bounds = [(start, min(rows, start + step)) for start in range(0, rows, step)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < MIN_LAST_CHUNK_ROWS:
        (start, middle), (_, stop) = bounds[-2:]
        bounds[-2:] = [(start, middle - MIN_LAST_CHUNK_ROWS), (middle - MIN_LAST_CHUNK_ROWS, stop)]
    return bounds


def _plain_operand(t: torch.Tensor | None) -> bool:
    """None, or a plain CPU-addressable tensor: a torch.Tensor that is no functorch wrapper
    (vmap, grad) and carries no forward-mode tangent (out= supports neither)."""
    return t is None or (type(t) is torch.Tensor and t.layout == torch.strided
                         and not torch._C._functorch.is_functorch_wrapped_tensor(t)
                         and forward_ad.unpack_dual(t).tangent is None)


def _direct_gemm(x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, bool] | None:
    """How F.linear(x, weight, bias) runs on the CPU as one GEMM whose output a chunk's GEMM may
    write in place of a copy: (the 2-D matrix multiplied, whether the bias is added inside the
    GEMM, torch.addmm, or after it, add_); None where it is not one GEMM or out= cannot follow.
    As at::linear does it for a weight that requires grad (a registered parameter):
      - 2-D x: addmm(bias, x, W^T) with a bias, else mm(x, W^T), x with its own strides (they
        choose the kernel: an fp16 (1, k) row with unit strides gave other bits as a view);
      - contiguous x of 3 or more dimensions, flattened to rows: addmm with a 1-D bias, else mm;
      - non-contiguous x of 3 or more dimensions: matmul folds it to rows (reshape: a copy, as
        the weight requires grad) and multiplies (mm), then adds the bias (add_).
    Measured (torch 2.13, fp32 / bf16 / fp16, 2-D to 4-D inputs, contiguous, transposed and
    expanded, with and without bias): the chunks' GEMMs writing into the output's columns (row
    stride = all rows) give F.linear's bits, and save the copy (about 1 ms per forward of
    `small`'s 8192-row head). Not where F.linear does something out= cannot: under autocast
    (which casts F.linear's operands), vmap or forward-mode AD; not with autograd recording;
    not for a weight that does not require grad (matmul then folds by other rules); not off the
    CPU (a GPU GEMM may choose its algorithm by the output's alignment: unmeasured)."""
    if (x.device.type != "cpu" or x.dim() < 2 or x.dtype != weight.dtype
            or not weight.requires_grad):
        return None
    if bias is not None and (bias.dim() != 1 or bias.dtype != weight.dtype
                             or bias.device != x.device):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None  # out= takes no autograd
    if torch.is_autocast_enabled("cpu") or not (_plain_operand(x) and _plain_operand(bias)):
        return None
    if x.dim() == 2:
        return x, True
    if x.is_contiguous():
        return x.view(-1, x.shape[-1]), True
    return x.reshape(-1, x.shape[-1]), False


def _scratch(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a new contiguous tensor to draw `values` + eps z into, the flat values the draw reads
    from). A non-contiguous parameter's values are cloned into it instead and drawn in place
    (None): a contiguous copy to read from would be a second piece of scratch."""
    if values.is_contiguous():
        return torch.empty_like(values), values.view(-1)
    return values.clone(memory_format=torch.contiguous_format), None


def _in_layout(drawn: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`drawn` (contiguous) with the memory order of `like`: its dimensions laid out in the
    order of its strides, largest first. Reductions and GEMMs choose their order by the layout,
    so a perturbed copy of a transposed or channels-last parameter must keep it to give the
    in-place probe's bits."""
    if like.is_contiguous():
        return drawn
    dims = sorted(range(like.dim()), key=lambda d: -like.stride(d))  # stable: ties in order
    laid = drawn.permute(dims).contiguous()
    return laid.permute([dims.index(d) for d in range(like.dim())])


class _Draw:
    """The perturbed values of one target's parameters under its `current` perturbation: copies
    drawn by the backend's perturb kernel (the in-place pass's arithmetic and rounding), element
    i of parameter j at the contract index i (index maps for chunks and rows)."""

    def __init__(self, probes: DenseProbes, target: VirtualDenseTarget) -> None:
        self.probes, self.target, self.space = probes, target, target.space
        move = target.current
        self.seeds, self.dist = list(move.seeds), move.dist
        self.scales = torch.tensor([float(c) for c in move.coefs], dtype=torch.float32)
        self._kernels: dict[torch.device, tuple[Any, torch.Tensor]] = {}
        self._ones: dict[torch.device, torch.Tensor] = {}  # decays of 1, grown on demand
        self._natives: dict[torch.device, Any] = {}

    def _native(self, device: torch.device) -> Any:
        """The cpu backend's draw with this perturbation bound (perturb_pieces_cpu) where the
        space's backend resolves to "cpu" on `device`, else None (`_kernel`)."""
        if device not in self._natives:
            self._natives[device] = (
                perturb_pieces_cpu(self.seeds, self.scales.tolist(), self.dist, "nearest",
                                   self.seeds[0], self.space.contract)
                if resolve_backend(self.space.backend, device) == "cpu" else None)
        return self._natives[device]

    def _kernel(self, device: torch.device, count: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """The device's perturb kernel, scales, and `count` decays of 1."""
        if device not in self._kernels:
            backend = resolve_backend(self.space.backend, device)
            self._kernels[device] = (implementation(backend, "perturb"),
                                     self.scales.to(device, non_blocking=True))
        ones = self._ones.get(device)
        if ones is None or ones.numel() < count:
            ones = self._ones[device] = torch.ones(count, dtype=torch.float32, device=device)
        return (*self._kernels[device], ones[:count])

    def _draw(self, positions: list[int], pieces: list[torch.Tensor], starts: list[int],
              sources: list[torch.Tensor] | None = None) -> None:
        """pieces[k] (contiguous, holding elements starting at flat index starts[k] of parameter
        positions[k]) = round(sources[k] + sum_s scales[s] z(seeds[s], key, start + i)) in one
        kernel call, sources[k] (contiguous, read only) holding the parameter's values there
        (None: the pieces hold them already, updated in place)."""
        keys = [self.space.keys[j] for j in positions]
        native = self._native(pieces[0].device)
        if native is not None:  # the cpu backend's kernel, its constant arguments bound once
            native([p.data_ptr() for p in pieces], [p.numel() for p in pieces], pieces[0].dtype,
                   keys, starts, None if sources is None else [s.data_ptr() for s in sources])
            self.probes._charge(pieces)
            return
        kernel, scales, ones = self._kernel(pieces[0].device, len(pieces))
        maps = [None if start == 0 and piece.numel() == self.space.tensors[j].numel()
                else (start, piece.numel(), piece.numel())
                for j, piece, start in zip(positions, pieces, starts)]
        extra = {"index_maps": maps} if any(m is not None for m in maps) else {}
        if sources is not None:
            extra["sources"] = sources
        with torch.no_grad():
            kernel(pieces, keys, self.seeds, scales, ones, self.dist, "nearest", self.seeds[0],
                   contract=self.space.contract, **extra)
        self.probes._charge(pieces)

    def wholes(self, positions: list[int]) -> list[torch.Tensor]:
        """Perturbed copies of the parameters at `positions` (same shapes, contiguous)."""
        values = [self.space.tensors[j].detach() for j in positions]
        pieces = [_scratch(v) for v in values]
        groups: dict[tuple[torch.device, torch.dtype, bool], list[int]] = {}
        for k, (copy, source) in enumerate(pieces):
            if copy.numel():
                groups.setdefault((copy.device, copy.dtype, source is None), []).append(k)
        for (_, _, in_place), ks in groups.items():
            self._draw([positions[k] for k in ks], [pieces[k][0].view(-1) for k in ks],
                       [0] * len(ks), None if in_place else [pieces[k][1] for k in ks])
        return [self._laid_out(copy, value) for (copy, _), value in zip(pieces, values)]

    def _laid_out(self, drawn: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """_in_layout, its second copy charged to the scratch peak."""
        laid = _in_layout(drawn, like)
        if laid is not drawn:
            self.probes._charge([drawn, laid])
        return laid

    def row_block(self, j: int, start: int, stop: int, reuse: bool = False) -> torch.Tensor:
        """Rows [start, stop) of the perturbed 2-D parameter j, drawn in one pass from the
        weight's rows into a new tensor (the kernel's out-of-place form: no clone first).
        reuse: into the probe's chunk buffer instead (DenseProbes.chunk_buffer: valid until
        the next reusing draw, for a caller that is done with it by then)."""
        rows = self.space.tensors[j].detach()[start:stop]
        if reuse and rows.is_contiguous():
            copy = self.probes.chunk_buffer(rows).view(rows.shape)
            source = rows.view(-1)
        else:
            copy, source = _scratch(rows)
        if copy.numel():
            self._draw([j], [copy.view(-1)], [start * rows.shape[1]],
                       None if source is None else [source])
        return self._laid_out(copy, rows)

    def linear(self, x: torch.Tensor, j: int, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear(x, W', bias) with W' the perturbed weight j, a chunk of rows at a time
        (one chunk: the whole weight): on the CPU each chunk's GEMM writes its columns of the
        output directly, as at::linear computes it for the parameter (_direct_gemm), elsewhere
        a chunk's F.linear is copied there (_linear_copied)."""
        weight = self.space.tensors[j]
        rows, columns = weight.shape
        step = self.probes.rows_per_chunk(columns)
        direct = _direct_gemm(x, weight, bias)
        if direct is None:
            return self._linear_copied(x, j, bias, step)
        flat, fused = direct
        if rows <= step and fused:  # one chunk, one GEMM: F.linear's own call (measured:
            # about 3% faster than the same addmm / mm writing into out=), on the 2-D operand
            # (matmul folds a no-grad weight's >= 3-D input by its strides, a size-1
            # dimension's included, where the parameter's always folds: other fp32 bits)
            out = F.linear(flat, self.row_block(j, 0, rows, reuse=True), bias)
            return out if flat is x else out.view(*x.shape[:-1], rows)
        out = x.new_empty(x.shape[:-1] + (rows,))
        columns_of = out.view(-1, rows)
        for start, stop in _row_chunks(rows, step):
            # the chunk is read by this GEMM only: one buffer for every chunk of the probe (a
            # new 1 MB scratch per chunk of `small`'s fp32 head measured 12.4k page faults a
            # MeZO step against 8.4k for the copy path, 30 ms: glibc gave the memory back to
            # the system and faulted it in again)
            block = self.row_block(j, start, stop, reuse=True).t()
            columns = columns_of[:, start:stop]
            if bias is None:
                torch.mm(flat, block, out=columns)
            elif fused:
                torch.addmm(bias[start:stop], flat, block, out=columns)
            else:
                torch.mm(flat, block, out=columns)
                columns.add_(bias[start:stop])
        return out

    def _linear_copied(self, x: torch.Tensor, j: int, bias: torch.Tensor | None,
                       step: int) -> torch.Tensor:
        """F.linear(x, W', bias) by F.linear on each chunk, its result copied into the
        output's columns (one chunk: F.linear's result itself). A chunk requires grad as the
        parameter does where autograd does not record (matmul folds a non-contiguous input
        of 3 or more dimensions to rows for a weight that requires grad, and runs a batched
        GEMM, other fp16 bits, for one that does not); under autograd it does not (a graph
        would keep every chunk alive)."""
        weight = self.space.tensors[j]
        rows = weight.shape[0]
        # (not inside a functorch transform: it refuses requires_grad_, and batches by its own
        # rules)
        mirror = (weight.requires_grad and not torch.is_grad_enabled()
                  and torch._C._functorch.peek_interpreter_stack() is None)
        out = None
        for start, stop in _row_chunks(rows, step) or [(0, 0)]:
            block = self.row_block(j, start, stop)
            if mirror and block.is_leaf:
                block.requires_grad_()
            part = F.linear(x, block, None if bias is None else bias[start:stop])
            if stop - start == rows:
                return part
            if out is None:
                out = part.new_empty(part.shape[:-1] + (rows,))
            out[..., start:stop].copy_(part)
        return out

    def embedding(self, ids: torch.Tensor, j: int) -> torch.Tensor:
        """F.embedding(ids, W') reading only the selected rows of the perturbed weight j (on
        the CPU; elsewhere a chunk of rows at a time, which needs no host synchronization)."""
        weight = self.space.tensors[j].detach()
        if ids.device.type != "cpu":
            return self._embedding_by_chunks(ids, j)
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = weight.index_select(0, unique.reshape(-1))
        if rows.numel():
            self._draw_rows(j, rows.view(rows.shape[0], -1), unique.reshape(-1).tolist())
        return F.embedding(inverse, rows)

    def _draw_rows(self, j: int, block: torch.Tensor, rows: list[int]) -> None:
        """block[k] (contiguous (n, width), holding row rows[k] of parameter j) drawn in place:
        on the cpu backend one call given each row's address (no tensor per row)."""
        count, width = block.shape
        starts = [r * width for r in rows]
        native = self._native(block.device)
        if native is None:
            self._draw([j] * count, list(block.unbind(0)), starts)
            return
        base, stride = block.data_ptr(), width * block.element_size()
        native([base + k * stride for k in range(count)], [width] * count, block.dtype,
               [self.space.keys[j]] * count, starts)
        self.probes._charge([block])

    def _embedding_by_chunks(self, ids: torch.Tensor, j: int) -> torch.Tensor:
        """F.embedding(ids, W') over chunks of W's rows, each id looked up in the chunk that
        holds it (torch.where, no host synchronization: the selected rows would need one). An id
        outside [0, rows) fails as F.embedding's does (an asynchronous device assert; on the
        CPU a RuntimeError at once) instead of reading a clamped row."""
        rows, columns = self.space.tensors[j].shape
        step = self.probes.rows_per_chunk(columns)
        if ids.numel():
            torch._assert_async(((ids >= 0) & (ids < rows)).all(),
                                f"index out of range in self: an embedding id of "
                                f"{self.space.names[j]} is outside [0, {rows})")
        if not rows:
            return F.embedding(ids, self.row_block(j, 0, 0))
        out = None
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            block = self.row_block(j, start, stop)
            inside = (ids >= start) & (ids < stop)
            looked = F.embedding((ids - start).clamp(0, stop - start - 1), block)
            out = looked if out is None else torch.where(inside.unsqueeze(-1), looked, out)
        return out


class _ProbeMode(TorchFunctionMode):
    """Hands the probes' perturbed values to every torch function reading an active parameter
    (DenseProbes.probing).

    Writes: the perturbed copies handed out, and the tensors sharing their memory that calls
    on them return (`w.data`, `w.detach()`, `w[:, :4]`, ...: `handed`, by id, dropped when the
    tensor dies), stand for their parameters. A write (an in-place method or function, out=,
    setitem, a `_foreach_*_` list, inplace=True, F.embedding's max_norm, `.data = `) of a
    registered parameter or of such an alias is never silently applied elsewhere than the
    in-place probe would apply it:
      - with a tracker (the optimizer's check), it is recorded (`ProbeTracker.write`: the check
        falls back to in-place probes) and runs on a throw-away clone of the parameter (an
        alias: on the throw-away copy it is), so the trial writes nothing, and the forward
        goes on (an exception would end the step where forwards gather shards, _attempt);
      - otherwise it raises a RuntimeError naming the parameter (nothing written: the
        optimizer restores the weights), except where the in-place probe writes the same:
        a parameter not perturbed in this probe (LeZO's other layers), and `.data = ` or
        set_ of a parameter, which gives the real parameter other memory as in place (kept as
        assigned; a perturbed one then raises MovedParameters, as the in-place restore does).
        `.data = ` / set_ of an alias is no write: it rebinds the alias."""

    def __init__(self, probes: DenseProbes, active: dict[int, tuple[_Draw, int]],
                 prefetched: dict[int, torch.Tensor], tracker: ProbeTracker | None) -> None:
        super().__init__()
        self.probes, self.active, self.prefetched = probes, active, prefetched
        self.tracker = tracker
        self.handed: dict[int, tuple[Any, str]] = {}  # id -> (weak reference, parameter name)

    def _whole(self, tensor: torch.Tensor) -> torch.Tensor:
        copy = self.prefetched.get(id(tensor))
        if copy is None:
            draw, j = self.active[id(tensor)]
            (copy,) = draw.wholes([j])
        return copy

    def _name(self, tensor: torch.Tensor) -> str:
        """The parameter `tensor` is, or stands for (an alias of its perturbed copy)."""
        entry = self.probes.entries.get(id(tensor))
        if entry is not None:
            target, j = entry
            return repr(target.space.names[j])
        return f"{self.handed[id(tensor)][1]} through an alias of its perturbed copy"

    def _remember(self, tensor: torch.Tensor, name: str) -> None:
        key, handed = id(tensor), self.handed

        def forget(ref: Any) -> None:
            if handed.get(key, (None,))[0] is ref:
                del handed[key]
        try:
            ref: Any = weakref.ref(tensor, forget)
        except TypeError:  # no weak references: held until the probe ends
            ref = lambda tensor=tensor: tensor  # noqa: E731
        handed[key] = (ref, name)

    def _hand(self, result: Any, sources: list[tuple[torch.Tensor, str]],
              rebound: torch.Tensor | None = None) -> None:
        """Remember the tensors of `result` (and `rebound`: the first argument of `.data = `
        or set_) that share memory with a perturbed copy or alias among `sources`."""
        pointers = {}
        for tensor, name in sources:
            pointer = _storage_pointer(tensor)
            if pointer is not None:
                pointers[pointer] = name
        if not pointers:
            return
        outputs = list(_tensors(result)) if isinstance(result, (torch.Tensor, list, tuple)) else []
        if rebound is not None:
            outputs.append(rebound)
        for out in outputs:
            if id(out) not in self.probes.entries:
                name = pointers.get(_storage_pointer(out))
                if name is not None:
                    self._remember(out, name)

    def _write(self, func: Any, args: tuple, kwargs: dict, found: list[torch.Tensor],
               written: list[torch.Tensor], sets_memory: bool) -> Any:
        """`func` writing `written` (registered parameters or aliases; class docstring)."""
        entries, active = self.probes.entries, self.active
        what = f"{_describe(func)} of {self._name(written[0])}"
        targets = {id(t) for t in written}
        if self.tracker is not None:
            self.tracker.write = self.tracker.write or what
            # the trial writes nothing: a parameter's write goes to a throw-away clone (an
            # alias is one already), its other reads see the probe as usual
            swap = {id(t): t.detach().clone() for t in written if id(t) in entries}
            swap.update((id(t), self._whole(t)) for t in found
                        if id(t) in active and id(t) not in targets)
            return func(*_replace(args, swap), **_replace(kwargs, swap))
        blocked = [t for t in written
                   if id(t) not in entries or (id(t) in active and not sets_memory)]
        if blocked:
            raise RuntimeError(
                f"probe='virtual': the forward writes parameter {self._name(blocked[0])} "
                f"({_describe(func)}) during a probe. Virtual probes hand the forward "
                "perturbed copies of the parameters and never write them, so the write would "
                "be lost or differ from an in-place probe's; nothing was written. Use "
                "probe='inplace' for a forward that writes its parameters.")
        if sets_memory:
            # the real parameter given other memory, kept as assigned as in place; a perturbed
            # one fails the step as in place (MovedParameters: the probe's memory moved)
            result = func(*args, **kwargs)
            moved = [t for t in written if id(t) in active]
            if moved:
                raise MovedParameters([entries[id(t)][0].space.names[entries[id(t)][1]]
                                       for t in moved])
            return result
        # a parameter not perturbed in this probe: written for real, as in place; the other
        # parameters the call reads see the probe
        swap = {id(t): self._whole(t) for t in found if id(t) in active and id(t) not in targets}
        return func(*_replace(args, swap), **_replace(kwargs, swap))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            return func(*args, **kwargs)
        if self.tracker is not None:
            self.tracker.count()
        entries, handed = self.probes.entries, self.handed
        found = _registered(args, entries)
        if kwargs:
            found += _registered(kwargs.values(), entries)
        aliases = []
        if handed:
            aliases = _registered(args, handed)
            if kwargs:
                aliases += _registered(kwargs.values(), handed)
        if not found and not aliases:
            return func(*args, **kwargs)
        if self.tracker is not None and found:
            self.tracker.note(func, args, kwargs, found)
        sets_memory = _sets_memory(func)
        written = [t for t in _write_targets(func, args, kwargs)
                   if id(t) in entries or (id(t) in handed and not sets_memory)]
        if written:
            return self._write(func, args, kwargs, found, written, sets_memory)
        rebound = None
        if sets_memory and args and isinstance(args[0], torch.Tensor):
            rebound = args[0]  # an alias given other memory is one no more (unless of a copy)
            handed.pop(id(rebound), None)
        sources = [(t, handed[id(t)][1]) for t in aliases if id(t) in handed]
        active = self.active
        perturbed = [t for t in found if id(t) in active]
        if not perturbed:  # unperturbed here, or only aliases: their aliases are remembered
            result = func(*args, **kwargs)
            self._hand(result, sources, rebound)
            return result
        rows = _rows_argument(func, args, kwargs)
        if rows is not None and id(rows) in active:
            draw, j = active[id(rows)]
            if func is F.linear:
                x = args[0] if args else kwargs["input"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                if id(x) in active:  # a parameter as the input (a prefix through an encoder)
                    x = self._whole(x)
                if bias is not None and id(bias) in active:
                    bias = self._whole(bias)
                return draw.linear(x, j, bias)
            return draw.embedding(args[0] if args else kwargs["input"], j)
        swap = {id(t): self._whole(t) for t in perturbed}
        result = func(*_replace(args, swap), **_replace(kwargs, swap))
        self._hand(result, sources + [(swap[id(t)], self._name(t)) for t in perturbed], rebound)
        return result


__all__ = ["DenseProbes", "ModuleScope", "ProbeTracker", "VirtualDenseTarget", "ROW_ALIGN"]
