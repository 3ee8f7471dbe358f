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
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._dispatch import implementation, resolve_backend
from .backends.cpu.perturb import perturb_pieces_cpu
from .held import DenseTarget, SeededNoise
from .lowrank_probe import _METADATA, _tensors  # metadata reads; the tensors in an argument
from .ops.undo import UndoLog
from .space import ParameterSpace

# Output rows per chunk are a multiple of this: measured on the CPU (oneDNN / MKL, fp32 and
# bf16), F.linear over row chunks of 341 or 1365 rows differs from the whole product in a few
# outputs, over multiples of 64 never; 256 leaves margin.
ROW_ALIGN = 256
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


def _writes(func: Any, args: tuple, kwargs: dict, tensor: torch.Tensor) -> bool:
    """Whether `func` writes `tensor` in place (an in-place method on it, out=, setitem,
    F.embedding's max_norm renormalization)."""
    name = getattr(func, "__name__", "")
    if args and args[0] is tensor and (
            (name.endswith("_") and not name.endswith("__"))
            or name in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                        "__idiv__", "__ipow__", "__iand__", "__ior__", "__ixor__",
                        "set_", "resize_")):
        return True
    out = kwargs.get("out")
    if out is not None and any(t is tensor for t in _tensors(out)):
        return True
    if func is F.embedding:
        weight, max_norm = _embedding_weight(args, kwargs)
        return weight is tensor and max_norm is not None
    return False


class ProbeTracker:
    """What one tracked probe saw, per registered parameter (by id): how it was read
    ("linear": F.linear's 2-D weight, drawn a chunk of rows at a time; "embedding":
    F.embedding's weight, its selected rows; "whole": by any other function, a copy of the
    whole parameter), and the first write of a parameter."""

    def __init__(self) -> None:
        self.reads: dict[int, set[str]] = {}
        self.write: str | None = None

    def note(self, func: Any, args: tuple, kwargs: dict, found: list[torch.Tensor]) -> None:
        rows = _rows_argument(func, args, kwargs)
        for t in found:
            if _writes(func, args, kwargs, t):
                self.write = self.write or getattr(func, "__qualname__", repr(func))
            kind = "whole" if t is not rows else "linear" if func is F.linear else "embedding"
            self.reads.setdefault(id(t), set()).add(kind)


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

    def draw_elements(self, tensor: torch.Tensor, reads: set[str]) -> int:
        """The largest draw a parameter read this way (ProbeTracker.reads) needs at this
        scratch bound (an embedding's rows aside: they depend on the batch)."""
        largest = tensor.numel() if "whole" in reads else 0
        if "linear" in reads:
            rows, columns = tensor.shape
            largest = max(largest, min(rows, self.rows_per_chunk(columns)) * columns)
        return largest

    def qualifies(self, tensor: torch.Tensor, reads: set[str] | None) -> bool:
        """Whether a parameter read this way (ProbeTracker.reads; None: not read) can be
        virtual within the limit."""
        return bool(reads) and self.draw_elements(tensor, reads) <= self.limit_elements

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
        with _ProbeMode(self, active, prefetched, tracker):
            yield

    def _charge(self, pieces: Sequence[torch.Tensor]) -> None:
        self.peak_scratch_bytes = max(self.peak_scratch_bytes,
                                      sum(p.numel() * p.element_size() for p in pieces))

    def rows_per_chunk(self, columns: int) -> int:
        return max(ROW_ALIGN, self.scratch_elements // max(columns, 1) // ROW_ALIGN * ROW_ALIGN)


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
            native(pieces, keys, starts, sources)
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

    def row_block(self, j: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the perturbed 2-D parameter j, drawn in one pass from the
        weight's rows into a new tensor (the kernel's out-of-place form: no clone first)."""
        rows = self.space.tensors[j].detach()[start:stop]
        copy, source = _scratch(rows)
        if copy.numel():
            self._draw([j], [copy.view(-1)], [start * rows.shape[1]],
                       None if source is None else [source])
        return self._laid_out(copy, rows)

    def linear(self, x: torch.Tensor, j: int, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear(x, W', bias) with W' the perturbed weight j, a chunk of rows at a time."""
        rows, columns = self.space.tensors[j].shape
        step = self.probes.rows_per_chunk(columns)
        if rows <= step:
            return F.linear(x, self.row_block(j, 0, rows), bias)
        out = None
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            part = F.linear(x, self.row_block(j, start, stop),
                            None if bias is None else bias[start:stop])
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
        width = weight[0].numel() if weight.shape[0] else 0
        if rows.numel():
            flat = rows.view(rows.shape[0], -1)
            self._draw([j] * flat.shape[0], list(flat.unbind(0)),
                       [int(r) * width for r in unique.reshape(-1).tolist()])
        return F.embedding(inverse, rows)

    def _embedding_by_chunks(self, ids: torch.Tensor, j: int) -> torch.Tensor:
        """F.embedding(ids, W') over chunks of W's rows, each id looked up in the chunk that
        holds it (torch.where, no host synchronization: the selected rows would need one)."""
        rows, columns = self.space.tensors[j].shape
        step = self.probes.rows_per_chunk(columns)
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
    (DenseProbes.probing)."""

    def __init__(self, probes: DenseProbes, active: dict[int, tuple[_Draw, int]],
                 prefetched: dict[int, torch.Tensor], tracker: ProbeTracker | None) -> None:
        super().__init__()
        self.probes, self.active, self.prefetched = probes, active, prefetched
        self.tracker = tracker

    def _whole(self, tensor: torch.Tensor) -> torch.Tensor:
        copy = self.prefetched.get(id(tensor))
        if copy is None:
            draw, j = self.active[id(tensor)]
            (copy,) = draw.wholes([j])
        return copy

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            return func(*args, **kwargs)
        entries = self.probes.entries
        found = _registered(args, entries)
        if kwargs:
            found += _registered(kwargs.values(), entries)
        if not found:
            return func(*args, **kwargs)
        if self.tracker is not None:
            self.tracker.note(func, args, kwargs, found)
        active = self.active
        perturbed = [t for t in found if id(t) in active]
        if not perturbed or any(_writes(func, args, kwargs, t) for t in perturbed):
            return func(*args, **kwargs)  # unperturbed here, or a write: the real parameter
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
        return func(*_replace(args, swap), **_replace(kwargs, swap))


__all__ = ["DenseProbes", "ProbeTracker", "VirtualDenseTarget", "ROW_ALIGN"]
