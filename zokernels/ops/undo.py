"""UndoLog: the elements a perturbation pass cannot give back by recovery, kept for an exact
restore (docs/undo-log.md). Used through ParameterSpace.apply(..., log=) / .apply_logged().

One log holds one pass: per (device, dtype) group of the pass, a slice of a persistent
(index, values) buffer and a device counter. Capacities come from the fraction of lost elements
seen so far in that group (a count-only probe the first time), times a headroom; an overflow
doubles the count it learns (docs/undo-log.md, "Capacity" and "Overflow").
"""

from __future__ import annotations

import math
from itertools import chain
from operator import attrgetter

import torch

from .._contract import DEFAULT_CONTRACT
from .._dispatch import implementation
from .._warn import warn
from ..backends.torch.selector_log import n_blocks
from ..backends.undo_buffers import SelectorBuffers, UndoBuffers
from ._groups import contiguous_views, select
from .perturb import PerturbGroup

GroupKey = tuple[torch.device, torch.dtype]
# After an overflow, a group's log is sized for this many times the count that overflowed it.
OVERFLOW_GROWTH = 2


class UndoLog:
    """The lost elements of one perturbation pass, per (device, dtype) group.

    Args:
        headroom: capacity = headroom * (largest lost fraction seen) * elements + slack.
        slack: entries added to every capacity (small tensors, fluctuations).
        probe_passes: the first passes of a (device, dtype) group each run a count-only probe
            first. Two, because weights that start at exactly zero (LayerNorm biases, LoRA's B)
            are often recoverable at the first step and all lost at the second, once the first
            update has made them tiny.

    Attributes:
        overflows: passes whose lost elements did not all fit (their restore is recovery-quality
            for the unlogged ones); after each, the group's capacity is sized for
            OVERFLOW_GROWTH x the count that overflowed it.
        probes: count-only passes run to size the log.
    """

    # What a learned fraction counts, saved with it: a state in another unit (another kind of log,
    # or a selector log of an older stream format) loads its counters but not its sizes.
    UNIT = "lost_elements"
    LEGACY_UNITS: tuple[str | None, ...] = (None,)  # states saved before units were recorded

    def __init__(self, *, headroom: float = 1.15, slack: int = 1024, probe_passes: int = 2) -> None:
        if not headroom >= 1.0:
            raise ValueError(f"headroom must be >= 1, got {headroom}")
        if slack < 0:
            raise ValueError(f"slack must be >= 0, got {slack}")
        self.headroom = headroom
        self.slack = int(slack)
        self.probe_passes = int(probe_passes)
        self._passes: dict[GroupKey, int] = {}
        self.overflows = 0
        self.probes = 0
        self._fraction: dict[GroupKey, float] = {}
        # per group: index and values buffers (they only grow) and the pass's counter
        self._storage: dict[GroupKey, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.plan: list[PerturbGroup] | None = None
        # the memory its pass wrote (plan_memory, or the space's RegisteredMemory) and the
        # space's registration then (ParameterSpace; None from the ops)
        self.memory: list[list] | RegisteredMemory | None = None
        self.stamp: int | None = None
        self.decay_flags: torch.Tensor | None = None
        self.buffers: list[UndoBuffers] | None = None
        self._checked = True

    # -- sizing ---------------------------------------------------------------------------
    @staticmethod
    def _key(group: PerturbGroup) -> GroupKey:
        return (group.device, group.tensors[0].dtype)

    @staticmethod
    def _numel(group: PerturbGroup) -> int:
        return sum(t.numel() for t in group.tensors)

    def needs_probe(self, plan: list[PerturbGroup]) -> bool:
        return any(self._key(g) not in self._fraction
                   or self._passes.get(self._key(g), 0) < self.probe_passes for g in plan)

    def _capacity(self, group: PerturbGroup) -> int:
        numel = self._numel(group)
        wanted = math.ceil(self._fraction[self._key(group)] * self.headroom * numel) + self.slack
        return min(numel, wanted)

    def _learn(self, group: PerturbGroup, count: int) -> None:
        key = self._key(group)
        fraction = min(1.0, count / max(1, self._numel(group)))
        self._fraction[key] = max(fraction, self._fraction.get(key, 0.0))

    # -- a pass ---------------------------------------------------------------------------
    def probe(self, plan: list[PerturbGroup], run) -> None:
        """Size the log: `run(buffers)` performs the pass in count-only mode."""
        counters = [_empty_buffers(g) for g in plan]
        run(counters)
        for group, counter in zip(plan, counters):
            self._learn(group, int(counter.count.item()))
        self.probes += 1

    def begin(self, plan: list[PerturbGroup], decay_flags: torch.Tensor,
              stamp: int | None = None,
              memory: RegisteredMemory | None = None) -> list[UndoBuffers]:
        """Buffers for a pass over `plan` (the previous pass's entries are dropped)."""
        if not self._checked:
            self.check()
        buffers = []
        for group in plan:
            capacity = self._capacity(group)
            key = self._key(group)
            index, values, count = self._storage.get(key, (None, None, None))
            if index is None or index.numel() < capacity:
                index = torch.empty(capacity, dtype=torch.int64, device=group.device)
                values = torch.empty(capacity, dtype=key[1], device=group.device)
                count = torch.zeros(1, dtype=torch.int64, device=group.device)
                self._storage[key] = (index, values, count)
            buffers.append(UndoBuffers(index[:capacity], values[:capacity], count.zero_()))
        for group in plan:
            self._passes[self._key(group)] = self._passes.get(self._key(group), 0) + 1
        self.plan, self.decay_flags, self.buffers = plan, decay_flags, buffers
        self.memory = plan_memory(plan) if memory is None else memory
        self.stamp = stamp
        self._checked = False
        return buffers

    def check_memory(self, what: str) -> None:
        """LoggedMemoryMoved (a ValueError) unless the logged pass's tensors still have the
        memory it wrote (a `param.data = ...` or `model.to(...)` since gives them another
        address, size or dtype: the log's indices and selector rows would then be read for
        memory they do not describe, past its end for a larger tensor)."""
        if self.plan is not None and plan_memory(self.plan) != self._logged_memory():
            raise LoggedMemoryMoved(f"{what}: a tensor of the logged pass was given other memory "
                                    "since (param.data = ..., model.to(...)); the log does not "
                                    "describe it")

    def moved(self) -> list[torch.Tensor]:
        """The logged pass's tensors that have other memory now than the pass wrote."""
        now = zip(*plan_memory(self.plan))
        logged = zip(*self._logged_memory())
        tensors = [t for group in self.plan for t in group.tensors]
        return [t for t, a, b in zip(tensors, now, logged) if a != b]

    def _logged_memory(self) -> list[list]:
        """plan_memory of the logged pass's tensors as the pass found them."""
        if isinstance(self.memory, RegisteredMemory):
            return self.memory.of(self.plan)
        return self.memory

    def counts(self) -> list[int]:
        """Lost elements per group of the last pass (one host synchronization)."""
        if not self.buffers:
            return []
        return [int(c) for c in torch.cat([b.count.to("cpu") for b in self.buffers]).tolist()]

    def check(self) -> bool:
        """Read the last pass's counts, grow the capacities they need; True if it overflowed."""
        if self._checked or self.buffers is None:
            return False
        self._checked = True
        overflowed = False
        for group, buffers, count in zip(self.plan, self.buffers, self.counts()):
            if count > buffers.capacity:
                overflowed = True
                # geometric growth: the group's next capacities are sized for OVERFLOW_GROWTH x
                # this count, so a repeat needs a pass losing that many more elements
                self._learn(group, OVERFLOW_GROWTH * count)
            else:
                self._learn(group, count)
        if overflowed:
            self.overflows += 1
            warn("zokernels: an undo log overflowed; this step's restore and update are exact "
                 "only for the logged elements, the others are recovery-quality "
                 "(docs/undo-log.md, 'Overflow'); the log has grown for the next steps")
        return overflowed

    def clear(self) -> None:
        """Forget the last pass (its entries must not be scattered again)."""
        if not self._checked:
            self.check()
        self.plan = self.decay_flags = self.buffers = self.memory = self.stamp = None

    def release(self) -> None:
        """Free the buffers (the learned fractions stay)."""
        self.clear()
        self._storage.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held by the persistent buffers."""
        return sum(i.numel() * i.element_size() + v.numel() * v.element_size()
                   for i, v, _ in self._storage.values())

    def state_dict(self) -> dict:
        return {"fraction": {f"{d}|{t}": f for (d, t), f in self._fraction.items()},
                "passes": {f"{d}|{t}": n for (d, t), n in self._passes.items()},
                "overflows": self.overflows, "probes": self.probes, "unit": self.UNIT}

    @staticmethod
    def check_state(state: object, where: str = "undo-log state") -> dict:
        """Validate a state_dict() of an UndoLog without loading it: a dict of "fraction"
        ({"device|dtype": lost fraction in [0, 1]}), "passes" ({"device|dtype": passes >= 0}),
        "overflows" and "probes" (integers >= 0) and "unit" (a string: what the fractions count),
        any of them absent. ValueError naming the entry (prefixed by `where`); returns the parsed
        state for load_checked_state."""
        if not isinstance(state, dict):
            raise ValueError(f"{where} must be a dict, got {type(state).__name__}")
        unknown = set(state) - {"fraction", "passes", "overflows", "probes", "unit"}
        if unknown:
            raise ValueError(f"{where} has unknown entries {sorted(unknown)}")

        def count(value: object, name: str) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where} {name} must be a non-negative integer, got {value!r}")
            return value

        def per_group(name: str, parse) -> dict:
            table = state.get(name, {})
            if not isinstance(table, dict):
                raise ValueError(f"{where} {name} must be a dict, got {type(table).__name__}")
            return {_group_key(k, f"{where} {name}"): parse(v, f"{name}[{k!r}]")
                    for k, v in table.items()}

        def fraction(value: object, name: str) -> float:
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not 0.0 <= value <= 1.0):
                raise ValueError(f"{where} {name} must be a fraction in [0, 1], got {value!r}")
            return float(value)

        unit = state.get("unit")
        if unit is not None and not isinstance(unit, str):
            raise ValueError(f"{where} unit must be a string, got {type(unit).__name__}")
        return {"fraction": per_group("fraction", fraction), "passes": per_group("passes", count),
                "overflows": count(state.get("overflows", 0), "overflows"),
                "probes": count(state.get("probes", 0), "probes"), "unit": unit}

    def load_checked_state(self, parsed: dict) -> None:
        """Adopt a state parsed by check_state (cannot fail). Sizes learned in another unit
        are dropped: the log probes its size again."""
        self.overflows, self.probes = parsed["overflows"], parsed["probes"]
        if parsed.get("unit") in (self.UNIT, *self.LEGACY_UNITS):
            self._fraction, self._passes = dict(parsed["fraction"]), dict(parsed["passes"])
        else:
            self._fraction, self._passes = {}, {}

    def load_state_dict(self, state: dict) -> None:
        """Load a state_dict(): validated as a whole first (ValueError), so a bad one changes
        nothing. The learned sizes only; the buffers are allocated by the next pass."""
        self.load_checked_state(self.check_state(state))


# Words per block row of a selector log (header included), by dtype: measured on N(0, 0.02)
# weights at eps = 1e-3 (benchmarks/undo_memory.py, benchmarks/results/undo_memory_cpu.json), a
# block of 1024 elements needs on average 192 stream bits in bf16 (p99.9: 355), 175 in fp16
# (p99.9: 241) and 286 in fp32 (p99.9: 413); rows of 8, 8 and 12 words keep two logs (a step's at
# most) at 3.6%, 3.2% and 2.4% of the parameters' bytes, pool included, the least of the row
# sizes measured.
REGION_WORDS = {torch.float32: 12, torch.bfloat16: 8, torch.float16: 8}
# Backends whose perturb reads and writes selector logs (selector_log=, held_log=).
SELECTOR_BACKENDS = ("cpu", "torch", "triton")


class SelectorLog(UndoLog):
    """What one perturbation pass writes so that a later pass (`held_log=`) recovers every weight
    exactly: per (device, dtype) group a row of REGION_WORDS int32 words per block of 1024
    elements and a pool for the blocks whose selector bits do not fit their row
    (docs/undo-log.md). Sizing, probes, overflow reporting and growth as UndoLog's, for the
    pool: `fraction` is pool words per element. A pool that overflows loses the blocks that did
    not get room: their weights are recovered as `applied=` alone recovers them."""

    # pool words per element of the v2 stream (selector_log.py); states of the v1 stream (no
    # unit recorded) sized a smaller pool
    UNIT = "selector_v2_pool_words"
    LEGACY_UNITS = ()

    def __init__(self, *, headroom: float = 1.15, slack: int = 256, probe_passes: int = 2,
                 words: int | None = None) -> None:
        super().__init__(headroom=headroom, slack=slack, probe_passes=probe_passes)
        if words is not None and words < 2:
            raise ValueError(f"words must be >= 2 (a header and bits), got {words}")
        self.words = words  # per block row, header included; None: REGION_WORDS[dtype]
        # per group: flat regions buffer, pool, count (they only grow)
        self._sel_storage: dict[GroupKey, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _rows(group: PerturbGroup) -> int:
        return sum(n_blocks(t.numel()) for t in group.tensors)

    def _capacity(self, group: PerturbGroup) -> int:
        wanted = math.ceil(self._fraction[self._key(group)] * self.headroom * self._numel(group))
        return min(wanted + self.slack, (1 << 31) - 2)

    def _buffers(self, group: PerturbGroup, capacity: int) -> SelectorBuffers:
        key = self._key(group)
        words = self.words or REGION_WORDS[key[1]]
        rows = self._rows(group)
        regions, pool, count = self._sel_storage.get(key, (None, None, None))
        if regions is None:
            count = torch.zeros(1, dtype=torch.int64, device=group.device)
            regions = pool = torch.empty(0, dtype=torch.int32, device=group.device)
        if regions.numel() < rows * words:
            regions = torch.empty(rows * words, dtype=torch.int32, device=group.device)
        if pool.numel() < capacity:
            pool = torch.empty(capacity, dtype=torch.int32, device=group.device)
        self._sel_storage[key] = (regions, pool, count)
        return SelectorBuffers(regions[:rows * words].view(rows, words), pool[:capacity],
                               count.zero_())

    def probe(self, plan: list[PerturbGroup], run) -> None:
        """Size the pool: `run(buffers)` performs the pass in count-only mode."""
        counters = [self._buffers(g, 0) for g in plan]
        run(counters)
        for group, counter in zip(plan, counters):
            self._learn(group, int(counter.count.item()))
        self.probes += 1

    def begin(self, plan: list[PerturbGroup], decay_flags: torch.Tensor,
              stamp: int | None = None,
              memory: RegisteredMemory | None = None) -> list[SelectorBuffers]:
        if not self._checked:
            self.check()
        buffers = [self._buffers(g, self._capacity(g)) for g in plan]
        for group in plan:
            self._passes[self._key(group)] = self._passes.get(self._key(group), 0) + 1
        self.plan, self.decay_flags, self.buffers = plan, decay_flags, buffers
        self.memory = plan_memory(plan) if memory is None else memory
        self.stamp = stamp
        self._checked = False
        return buffers

    def buffers_over(self, plan: list[PerturbGroup], what: str, items: str = "tensors", *,
                     memory_checked: bool = False) -> list[SelectorBuffers]:
        """The buffers a pass over `plan` reads to recover from this log's pass: ValueError,
        before anything is written, unless that pass wrote these very tensors (same groups,
        same order) in the memory they have now (memory_checked: the caller knows they do)."""
        if not memory_checked:
            self.check_memory(what)
        logged = self.plan
        if logged is None or len(logged) != len(plan) or any(
                len(a.tensors) != len(b.tensors)
                or any(x is not y for x, y in zip(a.tensors, b.tensors))
                for a, b in zip(logged, plan)):
            raise ValueError(f"{what} was not written by a pass over these {items}")
        return self.buffers

    def stand_ins(self) -> tuple[list[PerturbGroup], list[torch.Tensor]]:
        """The logged pass's plan with every tensor given other memory since replaced by a
        scratch tensor of the memory it had (a pass recovering from the log then writes the
        others exactly where it logged them), and the replaced tensors."""
        moved = self.moved()
        logged = zip(*self._logged_memory())
        plan = []
        for group in self.plan:
            tensors = []
            for t in group.tensors:
                _, numel, dtype, _, _ = next(logged)
                tensors.append(torch.empty(numel, dtype=dtype, device=group.device)
                               if any(t is m for m in moved) else t)
            plan.append(PerturbGroup(group.backend, group.device, tensors, group.keys,
                                     group.indices, group.index_maps))
        return plan, moved

    def check(self) -> bool:
        return super().check()

    def release(self) -> None:
        self.clear()
        self._sel_storage.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held by the persistent buffers (rows, pool, counter)."""
        return sum(r.numel() * 4 + p.numel() * 4 + c.numel() * 8
                   for r, p, c in self._sel_storage.values())


def _group_key(name: object, where: str) -> GroupKey:
    """"cpu|torch.bfloat16" -> (device, floating dtype); ValueError otherwise."""
    if not isinstance(name, str) or name.count("|") != 1:
        raise ValueError(f"{where}: key {name!r} is not 'device|dtype'")
    device, dtype_name = name.split("|")
    try:
        parsed_device = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{where}: key {name!r} names no device") from exc
    dtype = getattr(torch, dtype_name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{where}: key {name!r} names no floating dtype")
    return parsed_device, dtype


def _empty_buffers(group: PerturbGroup) -> UndoBuffers:
    empty_index = torch.empty(0, dtype=torch.int64, device=group.device)
    empty_values = torch.empty(0, dtype=group.tensors[0].dtype, device=group.device)
    return UndoBuffers(empty_index, empty_values,
                       torch.zeros(1, dtype=torch.int64, device=group.device))


class RegisteredMemory:
    """The memory of a ParameterSpace's tensors at one registration: its signature columns
    (addresses, elements, dtypes, strides, storage sizes; plan_memory's) in the space's order.
    A log written by the space keeps it instead of reading every tensor's memory at each pass;
    `of` picks a plan's tensors when a reader asks."""

    def __init__(self, signature: list[list], tensors: list[torch.Tensor]) -> None:
        self.signature, self.tensors = signature, tensors

    def of(self, plan: list[PerturbGroup]) -> list[list]:
        position = {id(t): j for j, t in enumerate(self.tensors)}
        order = [position[id(t)] for group in plan for t in group.tensors]
        return [[column[j] for j in order] for column in self.signature]


class LoggedMemoryMoved(ValueError):
    """A log is read for tensors given other memory since its pass (UndoLog.check_memory)."""


def memory_of(tensors: list[torch.Tensor]) -> list[list]:
    """Addresses, elements, dtypes, strides and storage sizes of `tensors` now, one list per
    column (strides: a transposed view has the address and size, not the element order, a log
    describes; the storage's size: one shrunk below its tensor can come back at the same
    address); read by map() at C speed, for thousands of LoRA tensors per pass. The one
    definition of "the same memory": ParameterSpace's signature and the logs' stamps."""
    return [list(map(torch.Tensor.data_ptr, tensors)), list(map(torch.Tensor.numel, tensors)),
            list(map(_dtype_of, tensors)), list(map(torch.Tensor.stride, tensors)),
            list(map(torch.UntypedStorage.nbytes, map(torch.Tensor.untyped_storage, tensors)))]


def plan_memory(plan: list[PerturbGroup]) -> list[list]:
    """memory_of a plan's tensors, in plan order."""
    return memory_of(list(chain.from_iterable(group.tensors for group in plan)))


_dtype_of = attrgetter("dtype")


def run_scatter(log: UndoLog, seeds: list[int], scales: torch.Tensor, decays: torch.Tensor,
                dist: str, rounding: str, rounding_seed: int,
                contract: int = DEFAULT_CONTRACT, memory_checked: bool = False) -> None:
    """Rewrite the logged elements of the last pass, group by group (docs/undo-log.md);
    contract: the version of the gaussian normals; memory_checked: the caller knows the logged
    tensors have the memory the pass wrote (else compared here, LoggedMemoryMoved)."""
    if log.plan is None:
        return
    if not memory_checked:
        log.check_memory("log")
    for group, buffers in zip(log.plan, log.buffers):
        device = group.device
        extra = {} if group.index_maps is None else {"index_maps": group.index_maps}
        if group.backend == "triton":  # the perturb passes' static launch table, reused
            extra["table_cache"] = group.cache
        with torch.no_grad(), contiguous_views(group.tensors) as work:
            implementation(group.backend, "scatter_perturb")(
                work, group.keys, buffers.index, buffers.values, buffers.count, seeds,
                scales.to(device, non_blocking=True),
                select(decays, group.indices).to(device, non_blocking=True),
                dist, rounding, rounding_seed, contract=contract, **extra)


__all__ = ["SELECTOR_BACKENDS", "SelectorLog", "UndoLog", "run_scatter"]
