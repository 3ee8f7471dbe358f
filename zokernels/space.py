"""ParameterSpace: a model's parameters registered once for repeated fused perturbations.

Registration does the per-tensor work that `perturb_` repeats on every call (type and overlap
checks, stable keys, (device, dtype) grouping, backend resolution), so a ZO step on a model with
thousands of small tensors (LoRA) pays only for the scalars it passes. Optimizers and other ZO
code call `perturb` / `update` (or the general `apply`) once per pass.

Keys: a parameter's noise key comes from its canonical name, so it survives checkpoint/resume,
freezing other parameters and wrapper prefixes. The canonical name drops the path components that
wrappers insert (`module` of DataParallel/DDP, `_orig_mod` of torch.compile,
`_fsdp_wrapped_module`, `_checkpoint_wrapped_module`) and PEFT's leading `base_model.model.`; the
key is the first 4 bytes (little-endian) of its BLAKE2b digest. Two names with the same digest (a
chance of about n^2 / 2^33 for n names) are told apart deterministically: in sorted name order,
the second gets the digest of "name#1", the third of "name#2", ... Unnamed tensors get their
position as key. Explicit keys can be passed instead.

Plans (the backend groups of one call): the plan over all parameters is built once per storage
(rebuilt when a parameter's address, size or dtype changes); the plan of a layer selection
(layers=) is put together from per-layer buckets and cached per selection (PLAN_CACHE_SIZE most
recent), dropped with the storage like the full one. Host time per pass on 2000 tensors of 8
elements in 24 blocks, 6 selected: 1.41 -> 0.81 ms for a repeated selection, 1.46 -> 1.15 ms for
a new one; all 24 selected: 7.33 -> 3.12 ms, as without layers= (2-core AMD EPYC,
benchmarks/results/cpu_call_overhead_tiny2000_*.json).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, count
from typing import Any

import torch

from ._contract import DEFAULT_CONTRACT, PERTURB_DISTS, ROUNDINGS, as_contract
from ._dispatch import BACKEND_CHOICES, resolve_backend
from ._validate import (
    as_choice,
    as_key,
    as_scalar_vector,
    as_seed,
    as_seed_list,
    as_tensor_list,
    plain_tensor,
    check_no_internal_overlap,
    check_reads,
    meta_parameter_error,
    written_spans,
)
from .ops.perturb import PerturbGroup, group_index_maps, run_perturb
from .ops.undo import RegisteredMemory, SelectorLog, UndoLog, memory_of, run_scatter
from .sharding import is_dtensor, local_tensor, shard_of

# Registrations, numbered across spaces: a log stamped with the one it was written under is
# read under the same one only if no tensor of the space changed memory in between.
_REGISTRATIONS = count(1)
WRAPPER_COMPONENTS = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module",
                                "_checkpoint_wrapped_module"})
PEFT_PREFIX = "base_model.model."
# MeZO's rule: no weight decay on biases and layer norms.
NO_DECAY_DEFAULT = ("bias", "layer_norm", "layernorm")
# Plans kept per layer selection. LeZO draws a new selection every step and uses it for 3-4
# passes (+eps, -eps, update, undo-log rewrites), so a few entries catch every reuse; each entry
# holds only references to the parameters and the backends' small launch data.
PLAN_CACHE_SIZE = 8


def canonical_name(name: str) -> str:
    """The parameter name without wrapper path components (see the module docstring)."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def key_from_name(name: str) -> int:
    """A stable 32-bit key for a canonical name (independent of Python's hash seed)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")


def keys_from_names(names: Sequence[str]) -> list[int]:
    """Keys for canonical names, with collisions resolved deterministically (sorted order)."""
    keys: dict[str, int] = {}
    used: set[int] = set()
    for name in sorted(set(names)):
        key, suffix = key_from_name(name), 0
        while key in used:
            suffix += 1
            key = key_from_name(f"{name}#{suffix}")
        keys[name] = key
        used.add(key)
    return [keys[name] for name in names]


def _listed(values: Any, name: str) -> list:
    """A sequence argument as a list (a generator is read once), TypeError naming it otherwise."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence, got {type(values).__name__}")
    try:
        return list(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence, got {type(values).__name__}") from None


def _named(params: Any, trainable_only: bool) -> list[tuple[str | None, torch.Tensor]]:
    if isinstance(params, torch.nn.Module):
        return [(n, p) for n, p in params.named_parameters()
                if p.requires_grad or not trainable_only]
    if isinstance(params, torch.Tensor):
        return [(None, params)]
    if not isinstance(params, Iterable) or isinstance(params, (str, bytes)):
        raise TypeError(f"params must be a module, tensors or (name, tensor) pairs, "
                        f"got {type(params).__name__}")
    named: list[tuple[str | None, torch.Tensor]] = []
    for j, item in enumerate(params):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            named.append((item[0], item[1]))
        else:
            named.append((None, item))
        if not isinstance(named[-1][1], torch.Tensor):
            raise TypeError(f"params[{j}] must be a tensor or a (name, tensor) pair, "
                            f"got {type(item).__name__}")
    if any(n is None for n, _ in named) and any(n is not None for n, _ in named):
        raise ValueError("params mixes named and unnamed tensors: name all or none")
    return named


@dataclass(frozen=True)
class _Group:
    """One kernel call's key. The dtype is part of it: a backend call takes one dtype for all of
    its tensors, and a group equal across dtypes would hand it bf16 and fp32 weights together."""
    backend: str
    device: torch.device
    dtype: torch.dtype


class ParameterSpace:
    """Parameters registered once: names, stable keys, layers, weight-decay mask, groups.

    Args:
        params: an nn.Module (its parameters that require grad, unless trainable_only=False), an
            iterable of tensors, or of (name, tensor) pairs.
        layers: optional sparsifiable blocks (LeZO): a list whose items are each a module, or a
            list of parameter names or tensors. Parameters in no layer are always included.
        keys: explicit keys, one per parameter (default: from names, or positions if unnamed).
        no_decay: name substrings exempt from weight decay (MeZO's rule by default).
        backend: the backend every call uses ("auto": triton for CUDA, cpu for CPU tensors).

    Sharded parameters (DTensor, e.g. FSDP2's fully_shard, or tensors marked with
    zokernels.sharding.mark_shard): each rank writes only its local shard, drawing the noise at
    the unsharded element indices, so z is the unsharded model's (docs/sharding.md). Names and
    keys are the unsharded model's.
    """

    def __init__(self, params: Any, *, layers: Sequence[Any] | None = None,
                 keys: Sequence[int] | None = None, no_decay: Sequence[str] = NO_DECAY_DEFAULT,
                 backend: str = "auto", trainable_only: bool = True,
                 contract: int = DEFAULT_CONTRACT) -> None:
        # a str would be read letter by letter ("bias": any name with b, i, a or s exempt)
        no_decay = _listed(no_decay, "no_decay")
        if not all(isinstance(s, str) for s in no_decay):
            raise TypeError(f"no_decay must be a sequence of name substrings, e.g. ('bias',), "
                            f"got {no_decay!r}")
        layers = None if layers is None else _listed(layers, "layers")
        keys = None if keys is None else _listed(keys, "keys")
        named = _named(params, trainable_only)
        self.params: list[torch.Tensor] = [t for _, t in named]  # as given (DTensors included)
        self.names: list[str] = [n if n is not None else str(j) for j, (n, _) in enumerate(named)]
        # what the kernels write: the local shards of sharded parameters
        self.shards = [shard_of(t, f"params[{j}] ({self.names[j]})")
                       for j, t in enumerate(self.params)]
        self.index_maps = [None if shard is None else shard.index_map for shard in self.shards]
        # DTensors and tensor subclasses: what the kernels write is re-fetched at every call
        self._dtensors = [j for j, t in enumerate(self.params)
                          if is_dtensor(t) or type(t) not in (torch.Tensor, torch.nn.Parameter)]
        self.tensors: list[torch.Tensor] = [self._writable(j) for j in range(len(self.params))]
        if keys is not None:
            if len(keys) != len(self.tensors):
                raise ValueError(f"keys must have one key per parameter ({len(self.tensors)}), "
                                 f"got {len(keys)}")
            self.keys = [as_key(k, f"keys[{j}]") for j, k in enumerate(keys)]
        elif named and named[0][0] is not None:
            self.keys = keys_from_names([canonical_name(n) for n in self.names])
        else:
            self.keys = list(range(len(self.tensors)))
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("keys must be distinct: two parameters would get the same noise")
        self.decayable = [not any(s in name for s in no_decay) for name in self.names]
        self.backend = as_choice(backend, BACKEND_CHOICES, "backend")
        # the version of the gaussian normals every pass of this space uses unless told otherwise
        # (an optimizer's, adopted from a checkpoint or a trajectory; docs/noise-contract.md)
        self.contract = as_contract(contract)

        self._layer_of = self._assign_layers(layers)
        self.num_layers = 0 if layers is None else len(layers)
        # Members per layer (index num_layers: parameters in no layer), in registration order.
        self._members: list[list[int]] = [[] for _ in range(self.num_layers + 1)]
        for j, layer in enumerate(self._layer_of):
            self._members[self.num_layers if layer is None else layer].append(j)
        self._register_memory()

    def _register_memory(self) -> None:
        """Checks, (device, dtype) groups and backends for the tensors' current storage.

        Runs at registration and again when a parameter's storage changed since (model.to(...),
        param.data = ...): a cached group must never hand a kernel a stale dtype or device.
        """
        tensors = as_tensor_list(self.tensors, "params")
        for j, t in enumerate(tensors):
            check_no_internal_overlap(t, f"params[{j}] ({self.names[j]})")
        # meta parameters (a model not materialized yet) are registered, refused when written
        self._meta = [j for j, t in enumerate(tensors) if t.is_meta]
        self._registration = next(_REGISTRATIONS)
        self._spans = written_spans([(f"params[{j}] ({self.names[j]})", t)
                                     for j, t in enumerate(tensors)])
        self._storage = self._storage_signature()
        # what the logs of this registration's passes describe (never mutated: replaced)
        self._memory = RegisteredMemory(self._storage, list(self.tensors))
        # Backend per (device, dtype), resolved now: a refusal happens before any write.
        self._group_of: list[_Group] = []
        resolved: dict[tuple[torch.device, torch.dtype], _Group] = {}
        for t in tensors:
            signature = (t.device, t.dtype)
            if signature not in resolved:
                resolved[signature] = _Group(resolve_backend(self.backend, t.device), t.device,
                                              t.dtype)
            self._group_of.append(resolved[signature])
        self._full_plan = self._plan(None)
        # Per layer (index num_layers: no layer), the non-empty members of each group in
        # registration order: a selection's plan is put together from these, never from a loop
        # over the parameters. Plans built for the old storage are dropped with it.
        self._any_shard = any(m is not None for m in self.index_maps)
        self._layer_buckets: list[dict[_Group, list[int]]] = []
        for members in self._members:
            buckets: dict[_Group, list[int]] = {}
            for j in members:
                if self.tensors[j].numel() > 0:
                    buckets.setdefault(self._group_of[j], []).append(j)
            self._layer_buckets.append(buckets)
        self._plan_cache: OrderedDict[tuple[int, ...],
                                      tuple[list[PerturbGroup], torch.Tensor]] = OrderedDict()

    def _storage_signature(self) -> list[list]:
        # A dtype or device change (model.to, p.data = ...) allocates the new storage while the
        # old one is alive, so each tensor's address changes: addresses catch both, and map()
        # reads them at C speed (about 0.1 us per tensor: LoRA has thousands).
        for j in self._dtensors:  # a sharding wrapper may swap a DTensor's local tensor
            self.tensors[j] = self._writable(j)
        # sizes and dtypes too: p.data = p.data[:k] keeps the address, and cached launch data
        # (the cpu backend's lists) must never outlive the size it was built for; strides and
        # the storage's size: p.data = p.data[:1].expand(...) keeps address and size, and a
        # storage resized below its tensor can come back at the same address (the checks of
        # _register_memory must run again, or a kernel writes past the storage's end)
        return memory_of(self.tensors)

    def _writable(self, j: int) -> torch.Tensor:
        """What the kernels write for parameter j: a DTensor's local shard, a subclass's plain
        alias (never what the subclass's overrides say about its memory, see plain_tensor)."""
        return plain_tensor(local_tensor(self.params[j]), f"params[{j}]")

    def _assign_layers(self, layers: Sequence[Any] | None) -> list[int | None]:
        assigned: list[int | None] = [None] * len(self.tensors)
        if layers is None:
            return assigned
        position = {id(t): j for j, t in enumerate(self.params)}
        position.update({id(t): j for j, t in enumerate(self.tensors)})  # local shards too
        by_name = {n: j for j, n in enumerate(self.names)}
        canonical = {canonical_name(n): j for j, n in enumerate(self.names)}
        for layer, spec in enumerate(layers):
            members = spec.parameters() if isinstance(spec, torch.nn.Module) else spec
            if isinstance(members, (str, torch.Tensor)):
                raise TypeError(f"layers[{layer}] must be a module or a list of names/tensors")
            for item in members:
                if isinstance(item, str):
                    j = by_name.get(item, canonical.get(canonical_name(item)))
                elif isinstance(item, torch.Tensor):
                    j = position.get(id(item))
                    if j is None and isinstance(spec, torch.nn.Module):
                        continue  # a frozen parameter of the block: not registered
                else:
                    raise TypeError(f"layers[{layer}] holds a {type(item).__name__}; "
                                    "expected parameter names or tensors")
                if j is None:
                    raise ValueError(f"layers[{layer}] names a parameter that is not registered: "
                                     f"{item if isinstance(item, str) else tuple(item.shape)}")
                if assigned[j] is not None and assigned[j] != layer:
                    raise ValueError(f"parameter {self.names[j]} is in layers[{assigned[j]}] "
                                     f"and layers[{layer}]")
                assigned[j] = layer
        return assigned

    def subspace(self, positions: Sequence[int]) -> "ParameterSpace":
        """The parameters at `positions` as a space of their own: same names, keys, layer
        numbering (a layer selection means the same blocks in both), decay mask, backend and
        contract, so its passes draw and write exactly what this space's would for them."""
        positions = list(positions)
        layers = None
        if self.num_layers:
            layers = [[self.params[j] for j in positions if self._layer_of[j] == layer]
                      for layer in range(self.num_layers)]
        sub = ParameterSpace([(self.names[j], self.params[j]) for j in positions],
                             layers=layers, keys=[self.keys[j] for j in positions],
                             no_decay=(), backend=self.backend, contract=self.contract)
        sub.decayable = [self.decayable[j] for j in positions]
        sub._register_memory()  # its plans carry the decay mask
        return sub

    def check_materialized(self) -> None:
        """Refuse to write meta parameters (ValueError naming the first): they hold no values
        (a `param.data = ...` since the last call is registered first)."""
        if self._storage_signature() != self._storage:
            self._register_memory()
        if self._meta:
            j = self._meta[0]
            raise meta_parameter_error(f"params[{j}] ({self.names[j]})")

    def plain(self, j: int) -> bool:
        """Whether parameter j is an ordinary unsharded tensor (no DTensor, subclass or shard)."""
        return self.index_maps[j] is None and j not in self._dtensors

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def sharded(self) -> bool:
        """Whether any parameter is a shard (DTensor or mark_shard): the local tensors are then
        parts of the unsharded ones."""
        return any(shard is not None for shard in self.shards)

    def global_shapes(self) -> list[tuple[int, ...]]:
        """Each parameter's shape in the unsharded model (a shard's whole tensor)."""
        return [tuple(t.shape) if shard is None else tuple(shard.global_shape)
                for t, shard in zip(self.params, self.shards)]

    def global_numels(self) -> list[int]:
        """Each parameter's element count in the unsharded model: what a trajectory records, so
        that it replays on the unsharded model."""
        return [math.prod(shape) for shape in self.global_shapes()]

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    def layer_members(self, layer: int) -> list[int]:
        """Positions of the parameters of layer `layer` (num_layers: the ones in no layer)."""
        return list(self._members[layer])

    def layer_numel(self, layer: int) -> int:
        return sum(self.tensors[j].numel() for j in self._members[layer])

    def indices(self, layers: Sequence[int] | None = None) -> list[int]:
        """Parameters a call with `layers` touches: the selected layers plus those in no layer."""
        if layers is None:
            return list(range(len(self.tensors)))
        chosen = self._check_layers(layers)
        selected = [j for layer in chosen for j in self._members[layer]]
        return sorted(selected + self._members[self.num_layers])

    def _check_layers(self, layers: Sequence[int]) -> list[int]:
        chosen = []
        for position, layer in enumerate(layers):
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise TypeError(f"layers[{position}] must be a layer index, got {layer!r}")
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"layers[{position}] = {layer} is not a layer index "
                                 f"(0 .. {self.num_layers - 1})")
            chosen.append(layer)
        if len(set(chosen)) != len(chosen):
            raise ValueError("layers must not repeat a layer")
        return chosen

    def _selection_plan(self, layers: Sequence[int]) -> tuple[list[PerturbGroup], torch.Tensor]:
        """_plan(layers), validated by _check_layers on every call and cached per selection (the
        sorted layer indices; the PLAN_CACHE_SIZE most recently used are kept). The same plan
        objects on every call let the backends reuse their launch data (group.cache). Built from
        the per-layer buckets: the same groups, tensors and order as _plan(layers)."""
        selection = tuple(sorted(self._check_layers(layers)))
        cache = self._plan_cache
        cached = cache.get(selection)
        if cached is not None:
            cache.move_to_end(selection)
            return cached
        parts: dict[_Group, list[list[int]]] = {}
        for layer in selection + (self.num_layers,):
            for group, members in self._layer_buckets[layer].items():
                parts.setdefault(group, []).append(members)
        sharded = self._any_shard
        plan, order = [], []
        # groups in the order of their first member, members in registration order (as _plan)
        for group, lists in sorted(parts.items(), key=lambda item: min(m[0] for m in item[1])):
            members = sorted(chain.from_iterable(lists))
            start = len(order)
            plan.append(PerturbGroup(group.backend, group.device,
                                     list(map(self.tensors.__getitem__, members)),
                                     list(map(self.keys.__getitem__, members)),
                                     list(range(start, start + len(members))),
                                     group_index_maps([self.index_maps[j] for j in members],
                                                      list(range(len(members))))
                                     if sharded else None))
            order += members
        entry = plan, torch.tensor(list(map(self.decayable.__getitem__, order)), dtype=torch.bool)
        cache[selection] = entry
        while len(cache) > PLAN_CACHE_SIZE:
            cache.popitem(last=False)
        return entry

    def _plan(self, layers: Sequence[int] | None) -> tuple[list[PerturbGroup], torch.Tensor]:
        """Backend groups for a selection, and the decay flags in the order of their tensors:
        built from scratch (the reference for _selection_plan; the full plan is built once per
        storage)."""
        buckets: dict[_Group, list[int]] = {}
        for j in self.indices(layers):
            if self.tensors[j].numel() > 0:
                buckets.setdefault(self._group_of[j], []).append(j)
        plan, order = [], []
        for group, members in buckets.items():
            start = len(order)
            positions = list(range(start, start + len(members)))
            plan.append(PerturbGroup(group.backend, group.device,
                                     [self.tensors[j] for j in members],
                                     [self.keys[j] for j in members], positions,
                                     group_index_maps([self.index_maps[j] for j in members],
                                                      list(range(len(members))))))
            order += members
        return plan, torch.tensor([self.decayable[j] for j in order], dtype=torch.bool)

    def apply(self, seeds: int | Sequence[int], scales: Any, *,
              layers: Sequence[int] | None = None, weight_decay_factor: Any = 1.0,
              applied: Any = None, dist: str = "gaussian", rounding: str = "nearest",
              rounding_seed: int | None = None, check_finite: bool = True,
              log: UndoLog | None = None, held_log: SelectorLog | None = None,
              contract: int | None = None) -> None:
        """perturb_ over the registered parameters (all, or the selected layers):

            theta = round(d * theta + sum_k scales[k] * z(seeds[k], key, i))

        with d = weight_decay_factor for decayable parameters and 1 for the others (MeZO's
        no-decay rule). `applied` recovers the weights first (see perturb_). `log` (an UndoLog,
        nearest rounding and no decay only) keeps the elements recovery cannot give back, for
        `apply_logged` (docs/undo-log.md); the first pass of a log also runs a count-only probe
        to size it. A SelectorLog instead keeps what a later pass needs to recover every weight
        exactly: that pass names it `held_log` (with `applied` = the logged pass's scale, the same
        seed and layers), and its own result is then exact whatever the rounding did
        (docs/undo-log.md). One backend call per (device, dtype) group; validation covers only
        the scalars passed here. `contract`: the version of the gaussian normals (see perturb_).
        """
        seed_list = as_seed_list(seeds)
        dist = as_choice(dist, PERTURB_DISTS, "dist")
        contract = self.contract if contract is None else as_contract(contract)
        rounding = as_choice(rounding, ROUNDINGS, "rounding")
        rounding_seed = (seed_list[0] if rounding_seed is None
                         else as_seed(rounding_seed, "rounding_seed"))
        scale_vector = as_scalar_vector(scales, len(seed_list), "scales",
                                        check_finite=check_finite, allow_broadcast=False)
        applied_vector = None if applied is None else as_scalar_vector(
            applied, len(seed_list), "applied", check_finite=check_finite, allow_broadcast=False)
        factor = as_scalar_vector(weight_decay_factor, 1, "weight_decay_factor",
                                  check_finite=check_finite, allow_broadcast=False)
        if log is not None:
            if not isinstance(log, UndoLog):
                raise TypeError(f"log must be an UndoLog, got {type(log).__name__}")
            if rounding != "nearest":
                raise ValueError("log needs rounding='nearest' (recovery inverts nearest rounding)")
            if isinstance(weight_decay_factor, torch.Tensor) or weight_decay_factor != 1.0:
                raise ValueError("log needs weight_decay_factor=1.0 (a perturbation, not an "
                                 "update)")
        self.check_materialized()
        check_reads(self._spans, [("scales", scales), ("applied", applied),
                                  ("weight_decay_factor", weight_decay_factor)])
        plan, flags = self._full_plan if layers is None else self._selection_plan(layers)
        held = (None if held_log is None
                else _held_buffers(held_log, plan, applied_vector, self._registration))
        if not plan:
            if log is not None:
                log.begin(plan, flags, stamp=self._registration, memory=self._memory)
            return
        decays = torch.where(flags.to(factor.device), factor, torch.ones_like(factor))
        if log is None:
            run_perturb(plan, seed_list, scale_vector, decays, applied_vector, dist, rounding,
                        rounding_seed, held_logs=held, contract=contract)
            return
        if isinstance(log, SelectorLog):
            if log.needs_probe(plan):
                log.probe(plan, lambda counters: run_perturb(
                    plan, seed_list, scale_vector, decays, applied_vector, dist, rounding,
                    rounding_seed, selector_logs=counters, count_only=True, held_logs=held, contract=contract))
            buffers = log.begin(plan, flags, stamp=self._registration, memory=self._memory)
            run_perturb(plan, seed_list, scale_vector, decays, applied_vector, dist, rounding,
                        rounding_seed, selector_logs=buffers, held_logs=held, contract=contract)
            return
        if log.needs_probe(plan):
            log.probe(plan, lambda counters: run_perturb(
                plan, seed_list, scale_vector, decays, applied_vector, dist, rounding,
                rounding_seed, logs=counters, count_only=True, contract=contract))
        buffers = log.begin(plan, flags, stamp=self._registration, memory=self._memory)
        run_perturb(plan, seed_list, scale_vector, decays, applied_vector, dist, rounding,
                    rounding_seed, logs=buffers, contract=contract)

    def recover_in_logged_memory(self, held_log: SelectorLog, seeds: Sequence[int],
                                 applied: Sequence[float], dist: str) -> list[str]:
        """Recover theta from the perturbation (seeds, applied coefficients) that held_log's
        pass wrote, exactly, in the memory that pass wrote: a tensor given other memory since
        (`param.data = ...` during a step) keeps what was assigned to it, the others go back
        to theta. Returns the names of the ones that moved. The restore of a failed step."""
        plan, moved = held_log.stand_ins()
        count = max((j for group in plan for j in group.indices), default=-1) + 1
        run_perturb(plan, list(seeds), torch.zeros(len(seeds), dtype=torch.float32),
                    torch.ones(count, dtype=torch.float32),
                    torch.tensor([float(c) for c in applied], dtype=torch.float32), dist,
                    "nearest", seeds[0], held_logs=held_log.buffers, contract=self.contract)
        return [self.names[j] for j, t in enumerate(self.tensors) if any(t is m for m in moved)]

    def apply_logged(self, log: UndoLog, seeds: int | Sequence[int] = (), scales: Any = (), *,
                     weight_decay_factor: Any = 1.0, dist: str = "gaussian",
                     rounding: str = "nearest", rounding_seed: int | None = None,
                     check_finite: bool = True, contract: int | None = None) -> None:
        """Rewrite the elements `log` holds from their logged (pre-pass) values: with no seeds,
        put the values back bit for bit (the end of an exact restore); with seeds,

            theta = round(d * logged + sum_k scales[k] * z(seeds[k], key, i))

        exactly as `apply` computes it from an unperturbed weight (the end of an exact update).
        Call it after the dense pass (restore: `applied=` with scale 0; update: `applied=` with
        the update's coefficients) over the same parameters the logged pass covered, with the
        pass's `contract`.
        """
        if not isinstance(log, UndoLog):
            raise TypeError(f"log must be an UndoLog, got {type(log).__name__}")
        # no seeds (an empty sequence): a restore; else any seed form apply takes
        empty = isinstance(seeds, Sequence) and not isinstance(seeds, (str, bytes)) and not seeds
        seed_list = [] if empty else as_seed_list(seeds)
        dist = as_choice(dist, PERTURB_DISTS, "dist")
        contract = self.contract if contract is None else as_contract(contract)
        rounding = as_choice(rounding, ROUNDINGS, "rounding")
        rounding_seed = (as_seed(rounding_seed, "rounding_seed") if rounding_seed is not None
                         else seed_list[0] if seed_list else 0)
        scale_vector = (as_scalar_vector(scales, len(seed_list), "scales",
                                         check_finite=check_finite, allow_broadcast=False)
                        if seed_list else torch.zeros(0, dtype=torch.float32))
        factor = as_scalar_vector(weight_decay_factor, 1, "weight_decay_factor",
                                  check_finite=check_finite, allow_broadcast=False)
        if log.plan is None:
            return
        self.check_materialized()  # a changed memory registered (or refused) first
        flags = log.decay_flags
        decays = torch.where(flags.to(factor.device), factor, torch.ones_like(factor))
        # a log of this registration describes the memory; another one is compared (refused
        # for tensors given other memory since its pass)
        run_scatter(log, seed_list, scale_vector, decays, dist, rounding, rounding_seed,
                    contract=contract, memory_checked=log.stamp == self._registration)

    def perturb(self, seed: int, scale: Any, *, layers: Sequence[int] | None = None,
                applied: Any = None, dist: str = "gaussian", **kwargs: Any) -> None:
        """theta += scale * z(seed) over the parameters (MeZO's zo_perturb_parameters)."""
        self.apply(seed, scale, layers=layers, applied=applied, dist=dist, **kwargs)

    def update(self, seeds: int | Sequence[int], coefs: Any, *, decay: Any = 1.0,
               layers: Sequence[int] | None = None, applied: Any = None,
               dist: str = "gaussian", **kwargs: Any) -> None:
        """theta = decay * theta + sum_k coefs[k] * z(seeds[k]) in one pass; decay applies to the
        decayable parameters only (e.g. decay = 1 - lr * weight_decay)."""
        self.apply(seeds, coefs, layers=layers, weight_decay_factor=decay, applied=applied,
                   dist=dist, **kwargs)


def _held_buffers(held_log: SelectorLog, plan: list[PerturbGroup], applied: Any,
                  registration: int) -> list:
    """The buffers of the selector log a recovering pass reads: it must have logged the same
    tensors (same groups, same order, same memory), ValueError / TypeError before anything is
    written. A log written under the space's current registration describes its memory (the
    space compared every tensor's at this call): not compared again."""
    if not isinstance(held_log, SelectorLog):
        raise TypeError(f"held_log must be a SelectorLog, got {type(held_log).__name__}")
    if applied is None:
        raise ValueError("held_log needs applied= (the perturbation the log describes)")
    return held_log.buffers_over(plan, "held_log",
                                 memory_checked=held_log.stamp == registration)


def check_disjoint_spaces(spaces: Sequence[ParameterSpace]) -> None:
    """Param groups must not share memory: each group's space proves its own tensors distinct,
    the same check over all groups' tensors proves them distinct across groups (ValueError
    naming two tensors that share memory)."""
    written_spans([(f"param group {g} tensor {name!r}", t) for g, space in enumerate(spaces)
                   for name, t in zip(space.names, space.tensors)])
