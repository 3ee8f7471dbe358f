"""Low-rank perturbations evaluated without writing the weights (TeZO's virtual probes).

With fixed factors U (m x r), V (n x r), a 2-D weight W that is read only by the forward of exact
`nn.Linear` / `nn.Embedding` modules can be evaluated at

    W_eff + U diag(c) V^T,        W_eff = D W + U diag(a) V^T

without a pass over W: a forward hook adds the low-rank part to the module's output,

    nn.Linear     y = x W^T + b   ->  D (y - b) + b + ((x V) * (a + c)) U^T
    nn.Embedding  y = W[i]        ->  D y + (U[i] * (a + c)) V^T

O(N r (m + n)) for N rows of input, against O(m n) for a pass over W. D (a scalar per weight) and
a (an r-vector per weight) hold updates that were not written yet (deferred updates); `merge`
writes them, W = round(D W + U diag(a) V^T), one rounding per merge.

Whether a weight qualifies is measured, not assumed: `UseTracker` watches one forward (a
TorchFunctionMode sees every torch call that reads the weight, global module hooks say which
module is running) and reports, per weight, the exact Linear / Embedding modules that read it in
their own forward and the first read anywhere else (a tied head read as `weight.t()`, a
ParameterDict passed to F.embedding, a subclass with its own forward, an Embedding with
max_norm, which renormalizes W in place, ...). A weight read elsewhere, or not read at all, must
stay with the in-place path.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules import module as _module
from torch.overrides import TorchFunctionMode

from ._dispatch import resolve_backend
from ._signals import interrupts_deferred
from ._warn import warn
from ._validate import float32_value, overlapped_span, written_spans
from .backends.cpu.lowrank_term import lowrank_linear_term_cpu
from .backends.torch.lowrank_term import lowrank_linear_term_torch
from .lowrank_space import KeptFactors, LowRankSpace
from .sharding import local_tensor

# Calls on a weight that neither see nor change its values (metadata), allowed anywhere.
_METADATA = frozenset({
    torch.Tensor.requires_grad_,
    torch.Tensor.dtype.__get__, torch.Tensor.shape.__get__, torch.Tensor.device.__get__,
    torch.Tensor.ndim.__get__, torch.Tensor.requires_grad.__get__, torch.Tensor.is_cuda.__get__,
    torch.Tensor.layout.__get__, torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel,
    torch.Tensor.is_floating_point, torch.Tensor.element_size, torch.Tensor.data_ptr,
    torch.Tensor.__len__, torch.Tensor.stride, torch.Tensor.is_contiguous,
    torch.Tensor.storage_offset, torch.Tensor.nelement,
})


# What the probes give the C++ Linear term (csrc/lowrank_term.cpp), the rest going to the torch
# reference: the three float dtypes of the parameters (benchmarks/results/cpu_lowrank_term.json:
# per call on fresh tensors bfloat16 is slower on mid-sized outputs, where torch's GEMMs use
# AVX-512 BF16 dot products; inside whole steps it is 0.7x the reference's time on every bench
# model, cpu_lowrank_term_in_model.json and docs/tezo.md, "Time").
_NATIVE_TERM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NATIVE_TERM_RANK = 32


def owner_function(module: torch.nn.Module) -> Any:
    """The function through which `module` reads its weight when the low-rank term can be added
    to its output exactly: F.linear for an exact nn.Linear, F.embedding for an exact nn.Embedding
    without max_norm; None otherwise (subclasses, a replaced forward)."""
    if "forward" in module.__dict__:
        return None
    kind = type(module)
    if kind is torch.nn.Linear:
        return F.linear
    if kind is torch.nn.Embedding and module.max_norm is None:
        return F.embedding
    return None


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def first_global_forward_hook(handle: Any) -> Any:
    """Moves the global forward hook of `handle` before the others registered earlier (torch
    runs global forward hooks in registration order, before the module's own): a user's global
    hook then sees what it would see in place (the output with the probe's term) and runs after
    the module's forward has ended. Returns the handle."""
    hooks = getattr(_module, "_global_forward_hooks", None)
    if hooks is not None and getattr(handle, "id", None) in hooks:
        hooks.move_to_end(handle.id, last=False)
    return handle


class UseTracker(TorchFunctionMode):
    """Who reads each of `weights` during the forwards run inside `with tracker:`.

    After the block: owners[j] lists the exact Linear / Embedding modules (owner_function) that
    read weights[j] in their own forward; foreign[j] (when present) names the first other read.
    Costs a Python call per torch call while active (meant for one step)."""

    def __init__(self, weights: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self._weights = list(weights)
        self._position = {id(w): j for j, w in enumerate(self._weights)}
        # the weights' memory (registered parameters: disjoint): a read through another tensor
        # over it (a view made before the step, a .detach() alias, W.data) is a read elsewhere
        self._memory = written_spans([(j, w) for j, w in enumerate(self._weights)])
        self.owners: list[list[torch.nn.Module]] = [[] for _ in self._weights]
        self.foreign: dict[int, str] = {}
        self._running: list[tuple[torch.nn.Module, Any]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> "UseTracker":
        try:
            self._handles.append(_module.register_module_forward_pre_hook(self._enter_module))
            self._handles.append(first_global_forward_hook(_module.register_module_forward_hook(
                self._leave_module, always_call=True)))
            super().__enter__()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._remove()
            self._running.clear()

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _enter_module(self, module: torch.nn.Module, args: Any) -> None:
        # the global pre-hooks run before the module's own: a module with pre-hooks of its own
        # (which may read the weight, where no output term can follow) reads it elsewhere
        reader = owner_function(module)
        if (reader is not None and id(module.weight) in self._position
                and not module._forward_pre_hooks):
            self._running.append((module, reader))

    def _leave_module(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._running and self._running[-1][0] is module:
            self._running.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _METADATA:
            for t in _tensors((args, kwargs)):
                j = self._position.get(id(t))
                if j is None:
                    alias = self._overlapped(t)
                    if alias is not None:
                        self.foreign.setdefault(alias, getattr(func, "__qualname__", repr(func)))
                    continue
                module, reader = self._running[-1] if self._running else (None, None)
                if module is not None and module.weight is t and func is reader:
                    if not any(o is module for o in self.owners[j]):
                        self.owners[j].append(module)
                else:
                    self.foreign.setdefault(j, getattr(func, "__qualname__", repr(func)))
        return func(*args, **kwargs)

    def _overlapped(self, t: torch.Tensor) -> int | None:
        """The weight whose memory `t` (not the weight itself) overlaps, or None (t without
        elements or memory: sparse, nested, meta, a subclass without storage)."""
        try:
            if t.layout != torch.strided or t.is_nested or t.is_meta or t.numel() == 0:
                return None
            return overlapped_span(self._memory, t)
        except (RuntimeError, NotImplementedError, TypeError):
            return None

    def readers_only_through_owners(self, j: int) -> bool:
        """Whether weights[j] was read, and only by its owners' forwards."""
        return bool(self.owners[j]) and j not in self.foreign


class VirtualPart:
    """The virtual weights of one param group: the weights at `positions` of its LowRankSpace
    (whose `factors` draws U_j, V_j when a hook or a merge needs them), their owner modules
    (known after a tracked forward) and their deferred update: one float32 vector `accum`
    holding a_j at offsets[j]:offsets[j + 1], and the scale D_j per weight. index: position in
    the space -> j."""

    def __init__(self, space: LowRankSpace, positions: list[int]) -> None:
        self.space, self.positions = space, list(positions)
        self.index = {position: j for j, position in enumerate(self.positions)}
        self.weights = [space.params[j] for j in self.positions]
        self.keys = [space.keys[j] for j in self.positions]
        self.decayable = [space.decayable[j] for j in self.positions]
        self.owners: list[list[torch.nn.Module]] = [[] for _ in self.weights]
        self.ranks = [space.ranks[j] for j in self.positions]
        self.offsets = [0]
        for r in self.ranks:
            self.offsets.append(self.offsets[-1] + r)
        device = self.weights[0].device if self.weights else torch.device("cpu")
        self.accum = torch.zeros(self.offsets[-1], dtype=torch.float32, device=device)
        self.decay_mask = torch.tensor([1.0 if d else 0.0 for d, r in zip(self.decayable,
                                                                        self.ranks)
                                        for _ in range(r)], dtype=torch.float32, device=device)
        self.scales = [1.0] * len(self.weights)
        self.pending = False
        # per weight, while it has a pending update: (memory, version counter, shape) when the
        # update began to accumulate (VirtualLowRank.drop_written); None: nothing pending
        self.stamps: list[tuple | None] = [None] * len(self.weights)

    def slices(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def factors(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """U, V of this part's j-th weight, drawn now (float32)."""
        return self.space.factors(self.positions[j])


class FactorCache:
    """The virtual probes' factors U_j, V_j cast to a forward's dtype, kept while they fit.

    An entry is added when a hook first needs a weight's factors in a dtype and the entries'
    bytes stay within `budget` bytes (first come, first kept: the model's order of use); past
    the budget a hook draws and casts them per call, as with no cache. The cast is elementwise,
    so a kept factor is the one a call would draw, bit for bit: the cache changes time and
    memory, never a result. A weight's entries (one per dtype its forwards produce: a tied
    embedding and head share them when their outputs have one dtype, not under autocast) are
    dropped together when what they are drawn from changed: its space's factor seed or contract
    (a resumed run adopts the saved ones), or the weight's device. An entry that no hook used in
    the current probe or the one before is stale (the forwards stopped producing its dtype,
    e.g. autocast turned off, or stopped reading its weight): a new entry that does not fit
    makes room by dropping the stale ones first. Entries in use are never dropped for a new one,
    so a model whose factors exceed the budget keeps its first ones rather than churning. The
    budget is set again at each probe (`begin_probe`: the parameters may have been cast); a
    cache over a lowered budget drops its stale entries, then, if still over, all of them (it
    refills within the new one)."""

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self._swept = -1  # the probe in which _drop_stale last ran (nothing turns stale inside one)
        # (part, position) -> (stamp, {dtype: (U, V, probe of last use)}); bytes are counted
        # from it (the count kept for one probe below can only err high)
        self._entries: dict[tuple[int, int], tuple[tuple, dict]] = {}
        self._probe = 0  # probes begun (VirtualLowRank.probing)
        # (probe, bytes): nbytes as last counted in that probe, raised before an entry is added
        # (an interrupt between the two leaves an overcount, until the next probe recounts)
        self._counted: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return sum(_factor_bytes(u, v) for _, kept in self._entries.values()
                   for u, v, _ in kept.values())

    def clear(self) -> None:
        self._entries.clear()
        self._counted = None

    def _bytes_now(self) -> int:
        """nbytes, counted once per probe (a miss asked it twice per call: 70 us on `small`)."""
        if self._counted is None or self._counted[0] != self._probe:
            self._counted = (self._probe, self.nbytes)
        return self._counted[1]

    def begin_probe(self, budget: int) -> None:
        self._probe += 1
        self.budget = int(budget)
        if self.nbytes > self.budget:
            self._drop_stale()
        if self.nbytes > self.budget:
            self.clear()

    @staticmethod
    def _stamp(part: VirtualPart, j: int) -> tuple:
        """What part's j-th weight's factors are drawn from, beside its key and shape."""
        return part.space.factor_seed, part.space.contract, part.weights[j].device

    def kept(self, part: VirtualPart, p: int, j: int,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """U, V of part p's j-th weight in `dtype` if kept and still current, else None."""
        entry = self._entries.get((p, j))
        if entry is not None and entry[0] != self._stamp(part, j):
            del self._entries[(p, j)]
            self._counted = None
            entry = None
        if entry is None or dtype not in entry[1]:
            return None
        u, v, _ = entry[1][dtype]
        return u, v

    def factors(self, part: VirtualPart, p: int, j: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """U, V of part p's j-th weight in `dtype` for a hook: kept, or drawn now (and kept if
        they fit)."""
        kept = self.kept(part, p, j, dtype)
        if kept is not None:
            self._entries[(p, j)][1][dtype] = (*kept, self._probe)
            return kept
        u, v = part.factors(j)
        u, v = u.to(dtype), v.to(dtype)
        size = _factor_bytes(u, v)
        if (size <= self.budget and self._swept != self._probe
                and self._bytes_now() + size > self.budget):
            self._drop_stale()
        used = self._bytes_now()
        if used + size <= self.budget:
            self._counted = (self._probe, used + size)
            self._entries.setdefault((p, j), (self._stamp(part, j), {}))[1][dtype] = (
                u, v, self._probe)
        return u, v

    def _drop_stale(self) -> None:
        """Drops the entries unused in this probe and the one before."""
        self._swept = self._probe
        self._counted = None
        for key, (_, kept) in list(self._entries.items()):
            for dtype in [d for d, (_, _, used) in kept.items() if used < self._probe - 1]:
                del kept[dtype]
            if not kept:
                del self._entries[key]


def _factor_bytes(u: torch.Tensor, v: torch.Tensor) -> int:
    """Bytes U and V keep alive (a float32 draw is one buffer holding both)."""
    return (u.numel() + v.numel()) * u.element_size()


class _MergeHook:
    """A merge-on-observe hook of the owner modules: VirtualLowRank._observed, the object
    weakly referenced, so that a model keeps no optimizer alive. A copy of the model
    (copy.deepcopy, pickling: torch.save(model)) gets an inert hook, not a copy of the optimizer
    (its pending updates are the optimizer's: merge before copying, docs/tezo.md)."""

    def __init__(self, owner: "VirtualLowRank | None") -> None:
        self._owner = None if owner is None else weakref.ref(owner)

    def __call__(self, *args: Any) -> None:
        owner = None if self._owner is None else self._owner()
        if owner is not None:
            owner._observed()

    def __reduce__(self) -> tuple:
        return _MergeHook, (None,)

    def __deepcopy__(self, memo: dict) -> "_MergeHook":
        return _MergeHook(None)


def _stamp(weight: torch.Tensor) -> tuple:
    """((memory, storage object), version counter, shape) of the tensor a rank writes
    (VirtualPart.stamps)."""
    local = local_tensor(weight)
    return ((local.data_ptr(), local.untyped_storage()._cdata), local._version,
            tuple(local.shape))


def _functorch_wrapped(t: torch.Tensor) -> bool:
    """A torch.func (vmap / grad) wrapper: a plain torch.Tensor by type, without memory."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


class VirtualLowRank:
    """Virtual probes and deferred updates over the parts (param groups) of one optimizer.

    `probing(coefs)` makes the owners of every registered weight compute, inside the block, as
    if W_j = W_eff,j + U_j diag(c_j) V_j^T (c = coefs[p] sliced per weight; None: no
    perturbation): one global module forward hook that exists only inside the block (removed on
    any exception, KeyboardInterrupt included; one left behind by an interrupt inside its own
    registration is inert) adds the low-rank term to the output of every exact nn.Linear /
    nn.Embedding whose weight is registered, whichever module that is (tied weights included).
    Its correctness needs every read of the weight to be such a forward: `UseTracker` checks
    it. `accumulate` defers an update, `merge` writes the pending ones. While updates are
    pending the owner modules carry three hooks that merge before the model can be observed or
    changed through them: a forward pre-hook (outside `stepping()`), a state_dict pre-hook and a
    load_state_dict pre-hook; merge removes them.

    The term is computed in the output's dtype, from the layer's factors cast to it. The hooks
    keep those cast factors (`FactorCache`) while they fit `cache_bytes` (bytes, or a function
    giving them, asked at each probe): drawing and casting
    them in every call was a third of the hooks' time on `small` (docs/tezo.md, "The factor
    cache"); past the budget a call draws them and frees them when it returns."""

    def __init__(self, parts: list[VirtualPart], backend: str = "auto",
                 cache_bytes: int | Callable[[], int] = 0) -> None:
        self.parts = parts
        self.backend = backend
        self.pending = False
        self.merges = 0  # merge() calls, pending or not (the optimizer records them)
        self._cache_budget = cache_bytes if callable(cache_bytes) else (lambda: cache_bytes)
        self.cache = FactorCache(self._cache_budget())
        self._stepping = False
        # (token, totals, their per-weight slices per part (None until a hook needs them),
        # the (part, index) pairs hooked)
        self._probe: tuple[object, list[torch.Tensor], list, set] | None = None
        self._native: dict[torch.device, bool] = {}
        self.hooked: set[tuple[int, int]] = set()  # (part, index) whose term the last probe added
        self._watch: list[Any] = []
        self._index()

    def _index(self) -> None:
        self._entries = {id(w): (p, j) for p, part in enumerate(self.parts)
                         for j, w in enumerate(part.weights)}

    def weights(self) -> list[torch.Tensor]:
        return [w for part in self.parts for w in part.weights]

    def restrict(self, keep: list[list[int]], owners: list[list[list[torch.nn.Module]]]) -> None:
        """Keep the weights at keep[p] of each part, with their owner modules (owners[p][k]: of
        the k-th kept weight). Nothing may be pending (a tracked forward precedes the first
        update)."""
        if self.pending:
            raise RuntimeError("restrict with pending deferred updates")
        parts = []
        for part, kept_at, found in zip(self.parts, keep, owners):
            kept = VirtualPart(part.space, [part.positions[k] for k in kept_at])
            kept.owners = [list(modules) for modules in found]
            parts.append(kept)
        self.parts = parts
        self.cache.clear()  # keyed by (part, position): the kept weights' indices changed
        self._index()

    @property
    def modules(self) -> list[torch.nn.Module]:
        seen: dict[int, torch.nn.Module] = {}
        for part in self.parts:
            for owners in part.owners:
                for module in owners:
                    seen.setdefault(id(module), module)
        return list(seen.values())

    @property
    def nbytes(self) -> int:
        """Memory this object keeps: the deferred vectors a and their decay masks, 8 bytes per
        rank entry, and the cached factors (at most the cache's budget). Transient: a hook
        whose factors are not cached draws its layer's U, V (4 (m + n) r bytes), and every hook
        an N x r scratch, freed when it returns; a merge, the factors of one run of weights."""
        return (sum(p.accum.numel() * 4 + p.decay_mask.numel() * 4 for p in self.parts)
                + self.cache.nbytes)

    # -- probes --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stepping(self) -> Iterator[None]:
        """Marks an optimizer step: the merge-on-observe hooks stay inert inside. Pending updates
        of weights written since are dropped first (drop_written): the step's probes add them
        to the weights."""
        self.drop_written()
        self._stepping = True
        try:
            yield
        finally:
            self._stepping = False

    @contextlib.contextmanager
    def probing(self, coefs: Sequence[torch.Tensor | None]) -> Iterator[None]:
        """Owner outputs as if W_j = W_eff,j + U_j diag(c_j) V_j^T inside the block."""
        totals = [part.accum if c is None else part.accum + c
                  for part, c in zip(self.parts, coefs)]
        self.cache.begin_probe(self._cache_budget())
        token = object()
        handle = None
        hooked: set[tuple[int, int]] = set()
        try:
            self._probe = (token, totals, [None] * len(self.parts), hooked)
            self._native = {}  # the term's implementation, resolved once per probe and device
            handle = first_global_forward_hook(_module.register_module_forward_hook(
                lambda module, args, kwargs, output: self._add_term(token, module, args, kwargs,
                                                                    output),
                with_kwargs=True))
            yield
        finally:
            self._probe = None
            self.hooked = hooked
            if handle is not None:
                handle.remove()
                # torch's handle does not remove its with_kwargs flag: 2 entries a step leaked,
                # and torch.compile then warns of global hooks forever
                getattr(_module, "_global_forward_hooks_with_kwargs", {}).pop(handle.id, None)

    def unhooked(self) -> list[str]:
        """Names of the weights whose term the last probe added nowhere: none of their owner
        modules ran the hook (a torch.compile'd forward reuses graphs compiled before the hook
        existed: torch does not guard on global module hooks; or the modules were skipped)."""
        return [part.space.names[position] for p, part in enumerate(self.parts)
                for j, position in enumerate(part.positions) if (p, j) not in self.hooked]

    def _add_term(self, token, module, args, kwargs, output) -> None:
        probe = self._probe
        if probe is None or probe[0] is not token:
            return None
        reader = owner_function(module)
        if reader is None:
            return None
        entry = self._entries.get(id(module.weight))
        if entry is None:
            return None
        p, j = entry
        probe[3].add(entry)
        if probe[2][p] is None:
            probe[2][p] = self.parts[p].slices(probe[1][p])
        coef = probe[2][p][j]  # float32
        dtype = output.dtype
        u, v = self.cache.factors(self.parts[p], p, j, dtype)  # in the output's dtype
        scale = self.parts[p].scales[j]
        x = args[0] if args else kwargs["input"]
        if reader is F.linear:
            if scale != 1.0:  # D (y - b) + b = D x W^T + b
                output.mul_(scale)
                if module.bias is not None:
                    output.add_(module.bias, alpha=1.0 - scale)
            if x.dtype != dtype:
                x = x.to(dtype)
            self._linear_term(output, x, u.shape[1])(output, x, u, v, coef)
            return None
        if scale != 1.0:
            output.mul_(scale)
        left = F.embedding(x, u).reshape(-1, u.shape[1])  # U[i], N x r
        left.mul_(coef)
        if output.is_contiguous():
            output.view(-1, v.shape[0]).addmm_(left, v.t())
        else:
            output.add_((left @ v.t()).view(output.shape))
        return None

    def _linear_term(self, output: torch.Tensor, x: torch.Tensor,
                     rank: int) -> Callable[..., None]:
        """The implementation of the Linear term: the C++ kernel where the optimizer's backend
        resolves to "cpu" on the output's device (a plain contiguous float32 / bfloat16 /
        float16 output, rank <= 32), else the torch reference (CUDA: cuBLAS). The kernel makes
        one pass over the output where the reference makes three BLAS calls (docs/tezo.md,
        "Time")."""
        native = self._native.get(output.device)
        if native is None:
            native = resolve_backend(self.backend, output.device) == "cpu"
            self._native[output.device] = native
        # plain tensors only (a DTensor's or a fake tensor's memory is not its data_ptr), and
        # none that autograd records (the kernel writes behind its back)
        if (native and type(output) is torch.Tensor and type(x) is torch.Tensor
                and not _functorch_wrapped(output) and not _functorch_wrapped(x)
                and output.is_contiguous() and output.dtype in _NATIVE_TERM_DTYPES
                and rank <= _NATIVE_TERM_RANK
                and not (output.requires_grad and torch.is_grad_enabled())):
            return lowrank_linear_term_cpu
        return lowrank_linear_term_torch

    # -- deferred updates ----------------------------------------------------------------------
    def accumulate(self, p: int, update: torch.Tensor, decay: float) -> None:
        """W_eff = d W_eff + U diag(u) V^T for the weights of part p (d = decay on decayable
        weights, 1 on the others): a = d a + u, D = d D. update: float32, one r-slice per weight
        in the part's order (already including any 1/sqrt(r)). d is used rounded to float32, as
        the low-rank kernels and a saved trajectory hold it."""
        part = self.parts[p]
        if not part.weights:
            return
        decay = float32_value(decay)
        part.stamps = [_stamp(w) if stamp is None else stamp
                       for w, stamp in zip(part.weights, part.stamps)]
        if decay != 1.0:
            part.accum.mul_(1.0 + (decay - 1.0) * part.decay_mask)
            part.scales = [s * decay if d else s for s, d in zip(part.scales, part.decayable)]
        part.accum.add_(update)
        part.pending = True
        if not self.pending:
            self.pending = True
            self._watch_modules()

    def merge(self) -> None:
        """W = round(D W + U diag(a) V^T) for every weight with a pending update (one low-rank
        launch per run of a part's weights, LowRankSpace.chunks, rounding to nearest), then
        a = 0, D = 1 and the observe hooks removed."""
        with interrupts_deferred():  # a run written and its a, D reset happen together
            self.merges += 1
            if self.pending:
                self.drop_written()
                self._merge_parts()

    def drop_written(self) -> None:
        """Drop (with a warning) the pending updates of the weights written in place since they
        began to accumulate (copy_, zero_, a load_state_dict through a module that has no merge
        hook: their version counter moved on the same memory; or resized): the write set the
        effective weight, which an update merged on top would change. Weights moved or cast
        (model.to(...), param.data = ...: other memory, the same shape) keep theirs, merged into
        the new memory. Writes that bypass the version counter (through `p.data`, numpy, DLPack)
        are not seen: merge before them (docs/tezo.md)."""
        if not self.pending:  # nothing stamped (every step asks)
            return
        dropped = []
        for part in self.parts:
            for i, (w, stamp) in enumerate(zip(part.weights, part.stamps)):
                if stamp is None:
                    continue
                now = _stamp(w)
                # a version counter only grows: a lower one is another tensor's (swapped in by
                # model.to(...) under torch.__future__'s swap, maybe at a reused address)
                written = now[0] == stamp[0] and now[1] > stamp[1]
                if now[2] != stamp[2] or written:
                    part.accum[part.offsets[i]:part.offsets[i + 1]].zero_()
                    part.scales[i] = 1.0
                    part.stamps[i] = None
                    dropped.append(part.space.names[part.positions[i]])
        if dropped:
            warn(f"TeZO: {len(dropped)} weight(s) (e.g. {dropped[0]}) were written or resized "
                 "while deferred updates were pending for them; those updates are dropped (the "
                 "write set the weight). Call opt.merge() before writing weights to keep them.")

    def _merge_parts(self) -> None:
        for p, part in enumerate(self.parts):
            if not part.pending:
                continue
            at = part.index
            # run by run, each run's a and D reset once it is written: a failure between runs
            # leaves the others pending, none merged twice
            slices = part.slices(part.accum)
            # the weights with an update pending (a dropped one has none: no pass adding +-0)
            positions = [j for j in part.positions if part.stamps[at[j]] is not None]
            for run in part.space.runs(positions, self.backend):
                picked = [at[j] for j in run]
                part.space.perturb(run, {"taus": [slices[i] for i in picked],
                                         "decay": [part.scales[i] for i in picked]},
                                   chunked=False, kept=self.kept_float32(p), scale=1.0,
                                   backend=self.backend, check_finite=False)
                for i in picked:
                    part.accum[part.offsets[i]:part.offsets[i + 1]].zero_()
                    part.scales[i] = 1.0
                    part.stamps[i] = None
            part.pending = False
        self.pending = False
        self._unwatch_modules()

    def kept_float32(self, p: int) -> KeptFactors:
        """Part p's factors the hooks keep in float32 (forwards in float32: the draws
        themselves), by position in its space, for the passes that write these weights (the
        update, a merge): they skip those draws."""
        part = self.parts[p]

        def kept(position: int) -> tuple[torch.Tensor, torch.Tensor] | None:
            j = part.index.get(position)
            return None if j is None else self.cache.kept(part, p, j, torch.float32)
        return kept

    def _watch_modules(self) -> None:
        for module in self.modules:
            hook = _MergeHook(self)
            self._watch.append(module.register_forward_pre_hook(hook))
            self._watch.append(module.register_state_dict_pre_hook(hook))
            self._watch.append(module.register_load_state_dict_pre_hook(hook))

    def _unwatch_modules(self) -> None:
        while self._watch:
            self._watch.pop().remove()

    def _observed(self, *args: Any) -> None:
        if not self._stepping:
            self.merge()


__all__ = ["FactorCache", "UseTracker", "VirtualLowRank", "VirtualPart", "owner_function"]
