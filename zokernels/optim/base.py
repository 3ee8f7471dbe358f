"""ZOOptimizer: what every zokernels optimizer shares.

Param groups, validation, per-step seeds, one ParameterSpace per param group, the exact
perturb / restore / update protocol (zokernels.held.HeldPerturbation: one dense target per param
group, TeZO adds low-rank ones; undo logs, docs/undo-log.md), exception safety,
non-finite-loss skips, state_dict round trips and trajectory recording. Subclasses compute a few
scalars per step and call the passes below; none loops over parameters doing arithmetic.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._contract import (DEFAULT_CONTRACT, PERTURB_DISTS, ROUNDINGS, as_contract,
                          saved_contract)
from .._dispatch import BACKEND_CHOICES
from .._signals import interrupts_deferred
from .._validate import (FLOAT32_MAX, StorageBudget, as_seed, check_nesting,
                         float32_value, is_finite_number)
from .._warn import warn
from ..dense_probe import (DenseProbes, ModuleScope, ProbeTracker, VirtualDenseTarget,
                           scope_wanted)
from ..held import DenseTarget, HeldPerturbation, SeededNoise
from ..ops.undo import UndoLog
from ..space import ParameterSpace, canonical_name, check_disjoint_spaces
from ..trajectory import COUNTER_LIMIT, Trajectory, meta_dist
from ._params import normalize_param_groups
from ._seeds import step_seed

Closure = Callable[[], Any]
# How dense probes are evaluated: "inplace" writes theta +- eps z into the weights (restored
# exactly with logs), "virtual" hands the perturbed values to the forward's reads
# (zokernels.dense_probe), checked on the first probe.
DENSE_PROBES = ("virtual", "inplace")
_GROUP_OPTIONS = ("lr", "eps", "weight_decay")  # every param group's, checked by check_hyper
# Learning rates torch's schedulers keep in the param groups (LRScheduler, OneCycleLR, SWALR):
# a checkpoint may bring them to an optimizer whose scheduler is built after the load.
_SCHEDULER_KEYS = ("initial_lr", "max_lr", "min_lr", "swa_lr")


FLOAT32_HALF_TINY = 2.0 ** -150  # half the smallest float32 subnormal: rounds to 0


def check_hyper(name: str, value: Any, *, low: float = 0.0, low_open: bool = False,
                high: float | None = None, high_open: bool = False) -> float:
    """A finite real hyperparameter in the given range, else ValueError naming it."""
    if not is_finite_number(value):  # an int too large for a float is not finite either
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if value < low or (low_open and value == low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if low_open and low == 0.0 and value <= FLOAT32_HALF_TINY:
        # the kernels take it as a float32 scalar: there it would be 0 (eps: 0 / 0 every step)
        raise ValueError(f"{name} must be > 0 in float32 (above 2^-150), got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_common_hyper(lr: Any, eps: Any, weight_decay: Any) -> None:
    """The hyperparameters every optimizer shares: lr >= 0, eps > 0, weight_decay >= 0, each
    finite in float32 (the kernels' scalars), with a decay factor 1 - lr * wd finite in
    float32."""
    check_decay(check_hyper("lr", lr, high=FLOAT32_MAX),
                check_hyper("weight_decay", weight_decay, high=FLOAT32_MAX), "")
    check_hyper("eps", eps, low_open=True, high=FLOAT32_MAX)


def check_decay(lr: float, weight_decay: float, where: str, power: int = 1) -> None:
    """The update's decay factor (1 - lr * weight_decay)^power (checked lr and weight_decay;
    power: the times a step applies it) must be finite in float32, or the kernels refuse every
    step."""
    decay = 1.0 - lr * weight_decay
    if abs(decay) > FLOAT32_MAX ** (1.0 / power):  # (decay <= 1: only its magnitude can grow)
        raise ValueError(f"{where}lr * weight_decay = {lr * weight_decay:g}: the decay factor "
                         f"(1 - lr * weight_decay)" + (f"^{power}" if power > 1 else "")
                         + " is not finite in float32; lower lr or weight_decay")


def default_group_for_shards() -> Any:
    """Sharded parameters (each rank holds part of every tensor) need one projected gradient for
    all ranks, or each shard would take a different step: without an explicit process_group the
    losses are averaged over the default (world) group."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("sharded parameters (DTensor / mark_shard) need torch.distributed to be "
                         "initialized, or an explicit process_group")
    return dist.group.WORLD


class ZOOptimizer(torch.optim.Optimizer):
    """Base class (not used directly). See MeZO for the common arguments."""

    algorithm = "zo"

    def __init__(self, params: Any, defaults: dict[str, Any], *, seed: int, dist: str,
                 exact_restore: bool, backend: str, no_decay: Sequence[str],
                 record_trajectory: bool, layers: Sequence[Any] | None = None,
                 rounding: str = "nearest", process_group: Any = None,
                 contract: int = DEFAULT_CONTRACT, dense_probe: str = "inplace") -> None:
        seed = as_seed(seed, "seed")  # the ops' rule: an integer in [0, 2^64)
        contract = as_contract(contract)
        if dense_probe not in DENSE_PROBES:
            raise ValueError(f"probe must be one of {list(DENSE_PROBES)}, got {dense_probe!r}")
        if dist not in PERTURB_DISTS:
            raise ValueError(f"dist must be one of {list(PERTURB_DISTS)}, got {dist!r}")
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {list(BACKEND_CHOICES)}, got {backend!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {list(ROUNDINGS)}, got {rounding!r}")
        if isinstance(no_decay, str):
            raise TypeError("no_decay must be a sequence of name substrings, e.g. ('bias',)")
        groups = normalize_param_groups(params)
        for g, group in enumerate(groups):
            for name in _GROUP_OPTIONS:
                if name in group:
                    group[name] = self._check_group_option(name, group[name], g)
        # as floats: an int beyond int64 passes as a finite number, then breaks tensor arithmetic
        defaults = {k: float(v) if k in _GROUP_OPTIONS else v for k, v in defaults.items()}
        self._zo_ready = False  # torch's __init__ calls add_param_group for the groups above
        self._stepping = False  # a step is running (its closure included): step() is refused
        super().__init__(groups, defaults)
        for g, group in enumerate(self.param_groups):  # the defaults filled in
            self._check_group_decay(group, g)
        self.base_seed = int(seed)
        self.dist = dist
        self.contract = contract  # of the gaussian normals (docs/noise-contract.md)
        self.exact_restore = bool(exact_restore)
        self.rounding = rounding  # of the update (the perturbations round to nearest)
        self.process_group = process_group
        if process_group is not None:
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized():
                raise ValueError("process_group given but torch.distributed is not initialized")
            outside = process_group is getattr(dist.GroupMember, "NON_GROUP_MEMBER", None)
            if not outside and not isinstance(process_group, dist.ProcessGroup):
                raise TypeError(f"process_group must be a torch.distributed ProcessGroup, got "
                                f"{type(process_group).__name__}")
            if outside or dist.get_rank() not in dist.get_process_group_ranks(process_group):
                # its collectives would do nothing here (world size -1): a silent wrong step
                raise ValueError(f"process_group does not hold this rank ({dist.get_rank()}): "
                                 "new_group(ranks) is for the ranks it lists")
        self.backend = backend
        self.no_decay = tuple(no_decay)
        self.zo_state: dict[str, Any] = {"step": 0, "skipped_steps": 0, "undo_overflows": 0}
        self._layer_spec = None if layers is None else list(layers)
        self._layer_of = self._resolve_layers(self.param_groups)
        # The full space of every param group (what the trajectory describes) and the spaces the
        # passes use (the same ones, except where a subclass splits them, see _split_spaces).
        self._registered = [self._space_for(group, self._layer_of) for group in self.param_groups]
        check_disjoint_spaces(self._registered)
        self.spaces = list(self._registered)
        if process_group is None and any(space.sharded for space in self.spaces):
            self.process_group = default_group_for_shards()
        # What the weights hold now and its moves (zokernels.held): one dense target per param
        # group (with two logs: the +eps and the -eps pass of a step); TeZO adds low-rank ones.
        self.held = HeldPerturbation([DenseTarget(space) for space in self.spaces],
                                     exact=self.exact_restore, on_overflow=self._count_overflow)
        self._dense_targets = list(range(len(self.spaces)))  # held target of group g's space
        self._target_group = list(range(len(self.spaces)))  # param group of each held target
        # virtual dense probes (zokernels.dense_probe): requested, checked on the first probe,
        # then the held target of each group's virtual part (None: all in place)
        self.dense_probe = dense_probe
        self._probe_check = dense_probe == "virtual"
        self._virtual_targets: list[int | None] = [None] * len(self.spaces)
        self._probes: DenseProbes | None = None
        self.dense_probe_status = ("in place" if dense_probe == "inplace"
                                   else "virtual requested: checked on the first probe")
        self.trajectory: Trajectory | None = (
            Trajectory(self.algorithm, self._trajectory_meta()) if record_trajectory else None)
        self._split_spaces()
        self._zo_ready = True

    def _split_spaces(self) -> None:
        """Hook run once the trajectory has recorded the full parameter spaces (TeZO moves its
        2-D weights to low-rank state here)."""

    def _check_added_space(self, space: ParameterSpace) -> None:
        """Hook: refuse (ValueError) a param group added by add_param_group, before anything is
        modified, when _group_added could not take it."""

    def _group_added(self) -> None:
        """Hook run by add_param_group once the new (last) group has its space and logs (TeZO
        splits it as _split_spaces does)."""

    # -- construction helpers -------------------------------------------------------------
    @staticmethod
    def _check_group_option(name: str, value: Any, g: int) -> float:
        """lr, eps or weight_decay of param group g, checked (finite in float32: the kernels'
        scalars), as a float."""
        return check_hyper(f"param group {g} {name}", value, low_open=(name == "eps"),
                           high=FLOAT32_MAX)

    def _check_group_decay(self, group: dict[str, Any], g: int, where: str = "") -> None:
        check_decay(group["lr"], group["weight_decay"], f"{where}param group {g}: ",
                    self._decay_power())

    def _decay_power(self) -> int:
        """How many times a step applies the decay factor at most (PseuZO: per window entry)."""
        return 1

    def _space_for(self, group: dict[str, Any], layer_of: dict[int, int] | None) -> ParameterSpace:
        return ParameterSpace(list(zip(group["param_names"], group["params"])),
                              layers=self._layers_for(group, layer_of), backend=self.backend,
                              no_decay=self.no_decay, contract=self.contract)

    def _resolve_layers(self, groups: Sequence[dict[str, Any]]) -> dict[int, int] | None:
        """The layer (LeZO block) of each parameter, by id, over all param groups; None without a
        layer spec.

        A block is a module (its parameters; frozen ones are skipped) or a list of parameter
        names and tensors. Names match the optimizer's names exactly or through canonical_name
        (so "module.layers.0.fc.weight" finds "layers.0.fc.weight"). ValueError: a listed name
        or tensor (or a trainable parameter of a block module) that is not among this
        optimizer's parameters, a name whose canonical form matches two parameters, a
        parameter in two blocks, a block with no parameter of this optimizer."""
        if self._layer_spec is None:
            return None
        named = [(n, t) for group in groups for n, t in zip(group["param_names"], group["params"])]
        mine = {id(t): n for n, t in named}
        by_name = {n: t for n, t in named}
        by_canonical: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for n, t in named:
            by_canonical.setdefault(canonical_name(n), []).append((n, t))
        layer_of: dict[int, int] = {}
        for i, spec in enumerate(self._layer_spec):
            from_module = isinstance(spec, torch.nn.Module)
            if from_module:
                members = list(spec.parameters())
            elif isinstance(spec, (str, bytes, torch.Tensor)) or not isinstance(spec, Sequence):
                raise TypeError(f"layers[{i}] must be a module or a list of parameter names / "
                                f"tensors, got {type(spec).__name__}")
            else:
                members = list(spec)
            found = False
            for item in members:
                if isinstance(item, str):
                    tensor = by_name.get(item)
                    if tensor is None:
                        matches = by_canonical.get(canonical_name(item), [])
                        if len(matches) > 1:
                            raise ValueError(f"layers[{i}] names {item!r}, which matches "
                                             f"{[n for n, _ in matches]} (one canonical name)")
                        if not matches:
                            raise ValueError(f"layers[{i}] names {item!r}, which is not among "
                                             "the optimizer's trainable parameters")
                        tensor = matches[0][1]
                elif isinstance(item, torch.Tensor):
                    tensor = item
                    if id(tensor) not in mine:
                        if from_module and not item.requires_grad:
                            continue  # a frozen parameter of the block
                        raise ValueError(
                            f"layers[{i}] holds a tensor of shape {tuple(item.shape)} that is not "
                            "among the optimizer's trainable parameters"
                            + (" (a trainable parameter of the block module: pass it to the "
                               "optimizer or freeze it)" if from_module else ""))
                else:
                    raise TypeError(f"layers[{i}] holds a {type(item).__name__}; expected "
                                    "parameter names or tensors")
                previous = layer_of.setdefault(id(tensor), i)
                if previous != i:
                    raise ValueError(f"parameter {mine[id(tensor)]!r} is in layers[{previous}] "
                                     f"and layers[{i}]")
                found = True
            if not found:
                raise ValueError(f"layers[{i}] has no trainable parameter of this optimizer (in "
                                 "any param group)")
        return layer_of

    def _layers_for(self, group: dict[str, Any],
                    layer_of: dict[int, int] | None) -> list[list[torch.Tensor]] | None:
        """The layer spec restricted to this group's tensors (LeZO), or None."""
        if layer_of is None:
            return None
        restricted: list[list[torch.Tensor]] = [[] for _ in self._layer_spec]
        for tensor in group["params"]:
            layer = layer_of.get(id(tensor))
            if layer is not None:
                restricted[layer].append(tensor)
        return restricted

    def _trajectory_meta(self) -> dict[str, Any]:
        """What a replay needs besides the records; "groups" describes every parameter of every
        param group (the full spaces, before any split)."""
        return {"base_seed": self.base_seed, "dist": self.dist, "contract": self.contract,
                "rounding": self.rounding,
                "groups": [{"param_names": list(g["param_names"]),
                            "named": bool(g.get("_named", True)),
                            "numel": space.global_numels(),
                            "keys": list(space.keys)}
                           for g, space in zip(self.param_groups, self._registered)],
                "no_decay": list(self.no_decay)}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group before the first step (as torch.optim.Optimizer.add_param_group).

        The group is normalized as the constructor's groups are: (name, tensor) pairs or
        tensors, frozen nn.Parameters skipped, a tensor already in the optimizer refused,
        lr / eps / weight_decay validated, missing options from the defaults. It gets its
        ParameterSpace (and its layers, LeZO), undo logs and trajectory description (TeZO: its
        low-rank split), so the optimizer behaves as one built with all the groups. RuntimeError
        after the first step: the trajectory and the state would no longer describe one run."""
        if not getattr(self, "_zo_ready", False):
            super().add_param_group(param_group)  # torch's __init__: the constructor's groups
            return
        if self._step_in_progress():
            raise RuntimeError("add_param_group called during a step")
        if self.zo_state["step"] > 0:
            raise RuntimeError(
                f"add_param_group after the first step ({self.zo_state['step']} taken): the "
                "trajectory and the optimizer state would no longer describe one run; build the "
                "optimizer with all the param groups, or add them before the first step")
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        g = len(self.param_groups)
        try:
            (group,) = normalize_param_groups([param_group])
        except (TypeError, ValueError) as exc:  # its messages count groups from 0
            raise type(exc)(str(exc).replace("param group 0", f"param group {g}")) from None
        if not group["_named"]:
            group["param_names"] = [f"{g}.{j}" for j in range(len(group["params"]))]
        present = {id(t) for existing in self.param_groups for t in existing["params"]}
        for name, tensor in zip(group["param_names"], group["params"]):
            if id(tensor) in present:
                raise ValueError(f"param group {g}: {name} is already in another param group")
        for name in _GROUP_OPTIONS:
            if name in group:
                group[name] = self._check_group_option(name, group[name], g)
        for name, value in self.defaults.items():
            group.setdefault(name, value)
        self._check_group_decay(group, g)
        layer_of = self._resolve_layers(list(self.param_groups) + [group])
        space = self._space_for(group, layer_of)  # these may raise: nothing is modified yet
        check_disjoint_spaces(self._registered + [space])
        self._check_added_space(space)
        process_group = self.process_group
        if process_group is None and space.sharded:
            process_group = default_group_for_shards()
        super().add_param_group(group)
        self.process_group = process_group
        self._layer_of = layer_of
        self._registered.append(space)
        self.spaces.append(space)
        self._dense_targets.append(self.held.add(DenseTarget(space)))
        self._target_group.append(len(self.spaces) - 1)
        self._virtual_targets.append(None)
        if self.trajectory is not None:
            self.trajectory = Trajectory(self.algorithm, self._trajectory_meta())
        self._group_added()

    # -- seeds ------------------------------------------------------------------------------
    def seed_for(self, step: int, index: int = 0, purpose: str = "z") -> int:
        return step_seed(self.base_seed, step, index, purpose=purpose)

    # -- the passes ----------------------------------------------------------------------------
    @property
    def _logs(self) -> list[tuple[UndoLog, ...]]:
        """The undo logs of each param group's dense space (the +eps and the -eps pass)."""
        return [self.held.logs[i] for i in self._dense_targets]

    @_logs.setter
    def _logs(self, pairs: list[tuple[UndoLog, ...]]) -> None:
        for i, pair in zip(self._dense_targets, pairs):
            self.held.logs[i] = tuple(pair)

    def _dense_moves(self, seeds: Sequence[int], coefs: list[Any],
                     layers: list | None) -> list[Any]:
        """One move per held target: sum_k coefs[g][k] z(seeds[k]) on group g's dense space (the
        other targets, TeZO's low-rank ones, None)."""
        moves: list[Any] = [None] * len(self.held.targets)
        for g, i in enumerate(self._dense_targets):
            moves[i] = SeededNoise(tuple(seeds), coefs[g], self._group_layers(layers, g),
                                   self.dist)
            if self._virtual_targets[g] is not None:
                moves[self._virtual_targets[g]] = moves[i]
        return moves

    def _probe_moves(self, seed: Any, coefs: list[float], layers: list | None) -> list[Any]:
        """The moves of a probe: coefs[g] z(seed) per group (TeZO adds its low-rank noise)."""
        return self._dense_moves([seed], [(c,) for c in coefs], layers)

    def _restore(self) -> None:
        """Put the weights back to their exact pre-step bits (docs/undo-log.md)."""
        self.held.restore()

    @staticmethod
    def _group_layers(layers: list | None, g: int):
        return None if layers is None else layers[g]

    def _count_overflow(self) -> None:
        # saturates: an int64 counter (a loaded one may be near its end), never a failing step
        self.zo_state["undo_overflows"] = min(self.zo_state["undo_overflows"] + 1,
                                              COUNTER_LIMIT - 1)

    def _clear_logs(self) -> None:
        self.held.clear_logs()

    def _check_parameters(self) -> None:
        """Every parameter of every param group as registered, or checked again where its
        storage changed since (param.data = ..., model.to(...)): ValueError (overlapping or
        expanded tensors, a storage smaller than its tensor, meta) before anything is written.
        The passes check the tensors they write; an update written in several passes (TeZO's
        dense, low-rank and virtual parts) checks them all first."""
        for space in self._registered:
            space.check_materialized()

    def _check_logs(self) -> None:
        """Read the logs' counts (with the losses' synchronization): overflow -> warn, grow,
        counted in zo_state["undo_overflows"]."""
        self.held.check_logs()

    def _perturb_held(self, seed: Any, coefs: list[float], layers: list | None,
                      slot: int) -> None:
        """Move the weights to theta + coefs[g] * z(seed) (from theta, or from the perturbation
        they hold, which must have the same seed), logging into `slot`."""
        moves = self._probe_moves(seed, coefs, layers)
        if self._probe_check and not self.held.exact:
            # the virtual probes' check compares at the exact theta: this pass logs, so that
            # its restore is exact, even with exact_restore=False
            self.held.exact = True
            try:
                self.held.perturb(moves, slot)
            finally:
                self.held.exact = False
            return
        self.held.perturb(moves, slot)

    def _probe_eval(self, closure: Closure, seed: Any, coefs: list[float],
                    evaluate: Callable[[Closure], torch.Tensor] | None = None) -> torch.Tensor:
        """evaluate(closure) (default: the closure's loss, _evaluate) at the probe just moved
        to: its virtual part evaluated through zokernels.dense_probe (TeZO: its low-rank
        virtual probes)."""
        evaluate = evaluate or self._evaluate
        if self._probe_check:
            return self._checked_probe(closure, evaluate)
        if self._probes is None:
            return evaluate(closure)
        with self._probes.probing():
            return evaluate(closure)

    def _checked_probe(self, closure: Closure,
                       evaluate: Callable[[Closure], torch.Tensor]) -> torch.Tensor:
        """The first probe with probe="virtual": evaluated in place (its result is the step's),
        restored, then evaluated again with every plain parameter virtual, the random state
        reset in between (dropout draws alike) and every read classified (a probe of some
        layers, LeZO's, is compared with a third evaluation: in place, every parameter
        perturbed, with logs of its own). The virtual path is kept when the results (a loss;
        PseuZO: the model output) are equal bit for bit and no parameter was written, on every
        rank of the process group; it then holds the parameters read through torch functions
        whose draws fit the limit (DenseProbes.qualifies; the others, and those not read, stay
        in place). Otherwise everything stays in place, with a warning. A non-finite first
        loss leaves the check to the next probe. Either way the weights hold theta afterwards:
        the caller's next move starts from there."""
        before = _random_state()
        loss = evaluate(closure)
        after = _random_state()
        moves = step_moves = list(self.held.held)
        self.held.restore()
        if not self._on_every_rank(bool(torch.isfinite(loss).all()), loss.device):
            return loss  # nothing to compare: checked again on the next probe
        reference, reason, virtual, scope = loss, None, None, None
        try:
            if self._probes_some_layers(moves):
                # LeZO's probe perturbs some layers: every parameter is checked once, against an
                # in-place probe of its own with all of them perturbed
                moves = [dataclasses.replace(m, layers=None) if isinstance(m, SeededNoise)
                         else m for m in moves]
                # it raising (a point the run never visits) decides the check: in place
                reference, reason = self._attempt(
                    lambda: self._reference_probe(closure, evaluate, moves, before),
                    "the in-place probe of every layer")
                if reason is None and not bool(torch.isfinite(reference).all()):
                    reason = "the in-place probe of every layer is not finite"
                if not self._on_every_rank(reason is None, loss.device) and reason is None:
                    reason = "the in-place probe of every layer failed on another rank"
            if reason is None:
                candidates = [[j for j in range(len(space)) if space.plain(j)]
                              for space in self.spaces]
                trial = DenseProbes([VirtualDenseTarget(space.subspace(chosen))
                                     for space, chosen in zip(self.spaces, candidates)])
                for g, target in enumerate(trial.targets):
                    target.hold(moves[self._dense_targets[g]])
                tracker = ProbeTracker()
                _set_random_state(before)

                def trial_probe() -> torch.Tensor:
                    with self._others_in_place(moves, candidates), trial.probing(tracker):
                        return evaluate(closure)
                # the virtual path failing where in place did not decides the check: in place
                virtual, reason = self._attempt(trial_probe, "the virtual probe")
                if (virtual is not None and tracker.write is None
                        and _same_bits(virtual, reference)):
                    scope = self._checked_scope(trial, tracker, closure, evaluate, step_moves,
                                                candidates, before, loss)
        finally:
            _set_random_state(after)
        # the decision and the split it makes, together: an interrupt waits for both (half a
        # split would leave parameters in a virtual target that no probe draws)
        with interrupts_deferred():
            self._probe_check = False  # decided (an interrupt above leaves it to the next probe)
            if virtual is not None:
                if tracker.write is not None:
                    reason = f"a parameter is written during the forward ({tracker.write})"
                elif not _same_bits(virtual, reference):
                    reason = (f"the virtual +eps loss {float(virtual)!r} differs from the in-place "
                              f"one {float(reference)!r}" if reference.numel() == 1 else
                              "the virtual +eps output differs from the in-place one")
            if not self._on_every_rank(reason is None, loss.device) and reason is None:
                reason = "the check failed on another rank"
            if reason is None:
                reason = self._split_virtual(trial, candidates, tracker)
            if reason is None and scope is not None:
                self._probes.scope = scope
            if not self.held.exact:  # drop the check's log buffers: nothing logs from now on
                for i in self._dense_targets:
                    self.held.replace(i, self.held.targets[i])
            if reason is not None:
                self.dense_probe_status = f"in place ({reason})"
                warn(f"{type(self).__name__}: probe='virtual' falls back to in-place probes: "
                     f"{reason}")
        return loss

    def _checked_scope(self, trial: DenseProbes, tracker: ProbeTracker, closure: Closure,
                       evaluate: Callable[[Closure], torch.Tensor], moves: list[Any],
                       candidates: list[list[int]], before: Any,
                       loss: torch.Tensor) -> ModuleScope | None:
        """Where the probes' mode may be left off (dense_probe.ModuleScope: modules whose
        tracked forward read no perturbed parameter), checked: this step's probe (`moves`,
        LeZO's layers included), evaluated virtually with the mode left off there from the
        random state `before`, must equal the in-place `loss` bit for bit. None where nothing
        would be left off, where that differs or raises, where the forwards gather shards
        (every rank must run the same forwards) or ZOKERNELS_PROBE_SCOPE=0."""
        if self._sharded_forwards() or not scope_wanted():
            return None
        scope = ModuleScope(tracker)
        for g, target in enumerate(trial.targets):
            target.hold(moves[self._dense_targets[g]])
        if not scope.outside(trial.perturbed_ids()):
            return None
        trial.scope = scope
        _set_random_state(before)

        def scoped_probe() -> torch.Tensor:
            with self._others_in_place(moves, candidates), trial.probing():
                return evaluate(closure)
        try:
            result, failed = self._attempt(scoped_probe, "the probe with the mode left off")
        finally:
            trial.scope = None
        return scope if failed is None and _same_bits(result, loss) else None

    @contextlib.contextmanager
    def _others_in_place(self, moves: list[Any], candidates: list[list[int]]) -> Any:
        """Inside the block, the parameters outside `candidates` (sharded ones) hold `moves` in
        place, as they will in the steps after the check (_moved_in_place)."""
        targets, held_moves = [], []
        for g, (space, chosen) in enumerate(zip(self.spaces, candidates)):
            kept = set(chosen)
            rest = [j for j in range(len(space)) if j not in kept]
            if rest:
                targets.append(DenseTarget(space.subspace(rest)))
                held_moves.append(moves[self._dense_targets[g]])
        if not targets:
            yield
            return
        with self._moved_in_place(targets, held_moves):
            yield

    def _probes_some_layers(self, moves: list[Any]) -> bool:
        """Whether a dense move perturbs only some of its space's layers (LeZO)."""
        return any(isinstance(m, SeededNoise) and m.layers is not None
                   and len(t.space.indices(m.layers)) < len(t.space)
                   for t, m in zip(self.held.targets, moves))

    def _sharded_forwards(self) -> bool:
        """Whether the forwards gather shards (sharded parameters in a process group): every
        rank must then run the same forwards, or one would wait forever in a collective."""
        return self.process_group is not None and any(s.sharded for s in self._registered)

    def _on_every_rank(self, flag: bool, device: torch.device) -> bool:
        """With _sharded_forwards, whether `flag` holds on every rank of the process group (one
        small all-reduce, in the first probe's check only). Otherwise `flag`: the ranks of a
        data-parallel step may decide apart (the virtual and the in-place path give the same
        bits), and the step keeps its one collective."""
        if not self._sharded_forwards():
            return flag
        votes = self._all_reduce_mean(torch.tensor([float(flag)], device=device))
        return bool(votes.item() == 1.0)

    def _attempt(self, run: Callable[[], torch.Tensor], what: str
                 ) -> tuple[torch.Tensor | None, str | None]:
        """(run(), None), or (None, why) when it raised an Exception; with _sharded_forwards
        the exception propagates instead (a peer may be waiting in that forward's collective:
        the step fails on every rank rather than hang)."""
        try:
            return run(), None
        except Exception as exc:
            if self._sharded_forwards():
                raise
            return None, f"{what} raised {type(exc).__name__}: {exc}"

    def _reference_probe(self, closure: Closure, evaluate: Callable[[Closure], torch.Tensor],
                         moves: list[Any], before: Any) -> torch.Tensor:
        """evaluate(closure) with the weights moved in place to `moves`, from the random state
        `before`; the weights hold theta again afterwards (_moved_in_place)."""
        with self._moved_in_place(self.held.targets, moves):
            _set_random_state(before)
            return evaluate(closure)

    @contextlib.contextmanager
    def _moved_in_place(self, targets: list[Any], moves: list[Any]) -> Any:
        """Inside the block, `targets` hold `moves` in place, exact whatever exact_restore (the
        check compares at the exact theta), with logs of their own, dropped with the block: the
        run's logs keep the size of the run's passes."""
        moved = HeldPerturbation(targets, exact=True, on_overflow=self._count_overflow)
        try:
            moved.perturb(moves, 0)
            yield
        finally:
            moved.restore()

    def _split_virtual(self, trial: DenseProbes, candidates: list[list[int]],
                       tracker: ProbeTracker) -> str | None:
        """Make the checked parameters virtual (DenseProbes.qualifies): each group's held
        target splits into an in-place part (_dense_targets[g]) and a virtual one (a
        VirtualDenseTarget); self.spaces keeps the whole groups. Returns why none qualified,
        or None."""
        chosen = [[j for j in positions if trial.qualifies(space.tensors[j],
                                                           tracker.reads.get(id(space.params[j])))]
                  for space, positions in zip(self.spaces, candidates)]
        if not any(chosen):
            return "no parameter is read through torch functions the probes can intercept"
        virtual = []
        for g, (space, keep) in enumerate(zip(list(self.spaces), chosen)):
            if not keep:
                continue
            kept = set(keep)
            rest = space.subspace([j for j in range(len(space)) if j not in kept])
            target = VirtualDenseTarget(space.subspace(keep))
            self.held.replace(self._dense_targets[g], DenseTarget(rest))
            self._virtual_targets[g] = self.held.add(target)
            self._target_group.append(g)
            virtual.append(target)
        # chunks as large as the largest draw some virtual parameter needs anyway (fewer
        # calls, same peak); the steps' draws are measured from the next probe on (the check
        # drew every read parameter once, those that stay in place included)
        needed = max(trial.draw_elements(space.tensors[j], tracker.reads[id(space.params[j])])
                     for space, keep in zip(self.spaces, chosen) for j in keep)
        self._probes = DenseProbes(virtual, max(trial.scratch_elements, needed))
        count, total = sum(len(keep) for keep in chosen), sum(len(s) for s in self._registered)
        self.dense_probe_status = (f"virtual ({count} of {total} parameters"
                                   + ("" if count == total else "; the others in place") + ")")
        return None

    def _probe_two_point(self, closure: Closure, seed: int, eps: list[float],
                         layers: list | None) -> tuple[torch.Tensor, torch.Tensor]:
        """theta + eps z -> f, theta - eps z -> f. Leaves -eps held with both logs live."""
        self._perturb_held(seed, eps, layers, 0)
        loss_plus = self._probe_eval(closure, seed, eps)
        minus = [-e for e in eps]
        self._perturb_held(seed, minus, layers, 1)
        loss_minus = self._probe_eval(closure, seed, minus)
        return loss_plus, loss_minus

    @staticmethod
    def _evaluate(closure: Closure) -> torch.Tensor:
        with torch.no_grad():
            loss = closure()
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"the closure must return a scalar loss, got shape "
                                 f"{tuple(loss.shape)}")
            if loss.dtype == torch.bool or loss.is_complex():  # as a Python bool is refused
                raise TypeError(f"the closure must return a real scalar loss, got a "
                                f"{loss.dtype} tensor")
            return loss.detach().reshape(()).to(torch.float32, copy=True)  # never a weight alias
        if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
            try:
                value = float(loss)
            except OverflowError:  # an int beyond float range: a non-finite loss (skipped)
                value = math.inf if loss > 0 else -math.inf
            return torch.tensor(value, dtype=torch.float32)
        raise TypeError(f"the closure must return a scalar loss (tensor or number), "
                        f"got {type(loss).__name__}")

    def _all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Data parallel: the mean over the ranks of a small tensor (losses, projections), in one
        collective; every rank then applies the identical seeded update. Identity without a
        process group."""
        if self.process_group is None:
            return values
        import torch.distributed as dist

        reduced = values.detach().to(torch.float32).clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=self.process_group)
        return reduced / dist.get_world_size(self.process_group)

    def _finite(self, *values: torch.Tensor) -> bool:
        """Whether every value (losses, and the projected gradients / coefficients computed from
        them, any shapes) is finite: one host synchronization per device (one in practice), the
        step needs it to know whether to skip."""
        return self._finite_and_zero(values, [])[0]

    def _finite_and_zero(self, values: Sequence[torch.Tensor], coefs: Sequence[torch.Tensor]
                         ) -> tuple[bool, list[bool]]:
        """(_finite(*values), for each group's coefficients whether all are exactly zero), in
        the same host synchronization: a virtual target's update skips a pass that would add
        only +-0 (it would turn -0.0 weights into +0.0; the in-place recovering update keeps
        them)."""
        flags = [torch.isfinite(v.detach().to(torch.float32)).all() for v in values]
        flags += [(c.detach() == 0).all() for c in coefs]
        per_device: dict[torch.device, list[int]] = {}
        for k, flag in enumerate(flags):
            per_device.setdefault(flag.device, []).append(k)
        read: list[bool] = [False] * len(flags)
        for ks in per_device.values():  # one transfer per device
            for k, value in zip(ks, torch.stack([flags[k] for k in ks]).tolist()):
                read[k] = value
        return all(read[:len(values)]), read[len(values):]

    def _skip(self, losses: Sequence[torch.Tensor], step: int) -> None:
        """A step whose losses, or the projected gradient / update coefficients computed from
        them (finite losses whose difference overflows float32), are not finite: weights
        restored exactly, counted in zo_state["skipped_steps"], the step counter advanced past
        it (the three together: an interrupt waits for them), warned."""
        with interrupts_deferred():
            self._restore()
            self.zo_state["skipped_steps"] += 1
            self.zo_state["step"] = step + 1
            warn(f"{type(self).__name__}: non-finite loss or projected gradient at step {step} "
                 f"(losses {[float(l) for l in losses]}); step skipped, weights restored "
                 "exactly")

    def _update(self, seeds: list[int], coefs_per_group: list[Any], layers: list | None,
                decays: list[float] | None = None, zero_groups: Sequence[bool] = ()) -> None:
        """theta = decays[g] * theta + sum_k coefs[g][k] * z_k in ONE pass per group (decays
        default: 1 - lr * wd), recovering from the held perturbation (its seed must be among
        `seeds`) exactly with its selector log (Triton: then the undo-logged elements rewritten
        from their exact values): the result equals an update applied to the unperturbed
        weights, bit for bit (HeldPerturbation.update)."""
        self._apply_update(self._dense_moves(seeds, coefs_per_group, layers), decays, seeds[0],
                           zero_groups)

    def _commit_step(self, step: int, seeds: list[int], coefs: list[Any], layers: list | None,
                     decays: list[float] | None = None, chosen: list[int] | None = None,
                     zero_groups: Sequence[bool] = ()) -> None:
        """The step's update (`_update`), its trajectory record and the step counter, together:
        an interrupt waits for all three (zokernels._signals). decays default: 1 - lr * wd."""
        if decays is None:
            decays = [1.0 - group["lr"] * group["weight_decay"] for group in self.param_groups]
        with interrupts_deferred():
            self._update(seeds, coefs, layers, decays, zero_groups)
            if self.trajectory is not None:
                self.trajectory.record(step, seeds, coefs, decays, chosen)
            self.zo_state["step"] = step + 1

    def _apply_update(self, moves: list[Any], decays: list[float] | None,
                      rounding_seed: int, zero_groups: Sequence[bool] = ()) -> None:
        """HeldPerturbation.update with each target's group decay and this optimizer's rounding
        (stochastic bits from `rounding_seed`, the step's first seed). zero_groups[g]: group
        g's coefficients are all exactly zero (_finite_and_zero; absent: not known)."""
        if decays is None:
            decays = [1.0 - group["lr"] * group["weight_decay"] for group in self.param_groups]
        moves = list(moves)
        for g, i in enumerate(self._virtual_targets):
            zero = g < len(zero_groups) and zero_groups[g]
            if i is not None and self._adds_nothing(g, decays[g], zero):
                # nothing to apply: skip the pass (a pass adding +-0.0 would turn -0.0 into
                # +0.0; the in-place path's recovering update keeps it)
                self.held.targets[i].hold(None)
                moves[i] = None
        self.held.update(moves, [decays[g] for g in self._target_group], rounding=self.rounding,
                         rounding_seed=rounding_seed)

    def _adds_nothing(self, g: int, decay: float, zero: bool) -> bool:
        """Whether group g's update is the identity: lr 0 or all coefficients exactly 0 (zero),
        with a decay that is 1 in float32 (the kernels'). A virtual target then skips its pass:
        one adding +-0.0 would turn -0.0 into +0.0, which the in-place recovering update keeps."""
        return (zero or self.param_groups[g]["lr"] == 0) and float32_value(decay) == 1.0

    def _check_can_step(self) -> None:
        """Refuse (ValueError) a step that could not commit, before it modifies anything: a step
        counter at its int64 end (its state_dict would no longer load), or group options a
        scheduler (or a user) set outside the constructor's rules (the kernels would refuse
        the update, or the trajectory its record, after the weights moved)."""
        if self.zo_state["step"] >= COUNTER_LIMIT - 1:
            raise ValueError(f"the step counter zo_state['step'] = {self.zo_state['step']} is at "
                             "its end (2^63 - 1): no further step can be recorded")
        for g, group in enumerate(self.param_groups):
            for name in _GROUP_OPTIONS:
                self._check_group_option(name, group[name], g)
            self._check_group_decay(group, g)

    def _refuse_nested_step(self) -> None:
        raise RuntimeError(f"{type(self).__name__}.step() called while a step is running "
                           "(from its closure?): steps cannot nest")

    def _guarded(self, body: Callable[[], Any]) -> Any:
        """Run a step body; on any exception (KeyboardInterrupt included) restore exactly.

        A step called again from inside a step (its closure calling opt.step()) is refused with
        RuntimeError before it touches anything; the outer step then fails and restores."""
        if self._stepping:
            self._refuse_nested_step()
        self._check_can_step()
        self._stepping = True
        try:
            return body()
        except BaseException:
            self._restore()
            raise
        finally:
            self._stepping = False

    # -- state ------------------------------------------------------------------------------------
    def _step_in_progress(self) -> bool:
        """Whether the weights hold a perturbation (a step, e.g. its closure, is running)."""
        return self.held.active

    def _extra_state(self) -> dict[str, Any]:
        """Algorithm state (momentum, windows, ...): tensors and plain values."""
        return {}

    def _check_extra_state(self, extra: dict[str, Any], step: int) -> None:
        """Validate the algorithm state of a state_dict without changing anything (ValueError
        naming the entry); load_state_dict calls it before modifying the optimizer. step: the
        (checked) step counter the optimizer would adopt with it."""

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Adopt the algorithm state (validated by _check_extra_state, its tensors already copied;
        runs after the base fields, base_seed included, are assigned). Must not fail."""

    STATE_KEYS = ("algorithm", "base_seed", "dist", "zo_state", "param_groups", "undo_logs",
                  "extra", "trajectory")

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: hyperparameters per group, base seed, dist, step counters,
        undo-log sizing, algorithm state and the trajectory. Plain containers copied; no tensor
        aliases state that a later step mutates in place. Runs the hooks registered with
        register_state_dict_pre_hook / register_state_dict_post_hook as torch.optim does (a
        post hook may return a replacement)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        groups = [{k: copy.deepcopy(v) for k, v in g.items() if k not in ("params", "_named")}
                  for g in self.param_groups]
        state = {"algorithm": self.algorithm, "base_seed": self.base_seed, "dist": self.dist,
                 "contract": self.contract, "zo_state": dict(self.zo_state), "param_groups": groups,
                 "undo_logs": [[log.state_dict() for log in pair] for pair in self._logs],
                 "extra": self._extra_state(),
                 "trajectory": None if self.trajectory is None else self.trajectory.state_dict()}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def _checked_state(self, state: Any) -> tuple[list[dict], list[list[dict]],
                                                   Trajectory | None]:
        """Validate a (copied) state_dict; ValueError naming the first bad field. Returns the
        group options to assign, the parsed undo-log states and the trajectory to adopt."""
        if not isinstance(state, dict):
            raise ValueError(f"state_dict must be a dict, got {type(state).__name__}")
        if state.get("algorithm") != self.algorithm:
            raise ValueError(f"state_dict is for {state.get('algorithm')!r}, "
                             f"not {self.algorithm!r}")
        missing = [k for k in self.STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"state_dict lacks {missing}")
        try:
            # the constructor's (and the ops') rule; kept as the int it reads (a uint64 or
            # one-element tensor from a file would not convert with int() when adopted)
            state["base_seed"] = as_seed(state["base_seed"], "base_seed")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"state_dict {exc}") from None
        if state["dist"] not in PERTURB_DISTS:
            raise ValueError(f"state_dict dist must be one of {list(PERTURB_DISTS)}, "
                             f"got {state['dist']!r}")
        as_contract(saved_contract(state), "state_dict contract")
        zo_state = state["zo_state"]
        if not isinstance(zo_state, dict) or set(zo_state) != set(self.zo_state):
            raise ValueError(f"state_dict zo_state must be a dict with keys "
                             f"{sorted(self.zo_state)}, got "
                             f"{sorted(zo_state) if isinstance(zo_state, dict) else zo_state!r}")
        for key, value in zo_state.items():
            # int64 counters: the trajectory's step column (and torch) store them as such
            if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                    or not 0 <= value < COUNTER_LIMIT):
                raise ValueError(f"state_dict zo_state[{key!r}] must be an integer in "
                                 f"[0, 2^63), got {value!r}")
        if zo_state["skipped_steps"] > zo_state["step"]:
            raise ValueError(f"state_dict zo_state: skipped_steps {zo_state['skipped_steps']} "
                             f"exceeds step {zo_state['step']}")
        groups = state["param_groups"]
        if not isinstance(groups, (list, tuple)) or len(groups) != len(self.param_groups):
            got = len(groups) if isinstance(groups, (list, tuple)) else type(groups).__name__
            raise ValueError(f"state_dict has {got} param groups, the optimizer has "
                             f"{len(self.param_groups)}")
        options = []
        for g, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, dict):
                raise ValueError(f"state_dict param group {g} must be a dict")
            names = saved.get("param_names")
            if not isinstance(names, (list, tuple)) or list(names) != list(group["param_names"]):
                raise ValueError(f"state_dict param group {g}: the saved parameter names differ "
                                 "from this optimizer's")
            options.append(self._checked_group_state(saved, group, g))
        logs = state["undo_logs"]
        if not isinstance(logs, (list, tuple)) or len(logs) != len(self._logs):
            raise ValueError(f"state_dict undo_logs must hold one pair per param group "
                             f"({len(self._logs)})")
        parsed_logs = []
        for g, pair in enumerate(logs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"state_dict undo_logs[{g}] must be a pair")
            parsed_logs.append([UndoLog.check_state(saved, f"state_dict undo_logs[{g}][{k}]")
                                for k, saved in enumerate(pair)])
        if not isinstance(state["extra"], dict):
            raise ValueError(f"state_dict extra must be a dict, got "
                             f"{type(state['extra']).__name__}")
        self._check_extra_state(state["extra"], zo_state["step"])
        trajectory = self._checked_trajectory(state)
        return options, parsed_logs, trajectory

    def _checked_group_state(self, saved: dict[str, Any], group: dict[str, Any],
                             g: int) -> dict[str, Any]:
        """The options of saved param group g to adopt, every key checked (ValueError naming
        it): lr / eps / weight_decay as the constructor checks them, a scheduler's learning
        rates (_SCHEDULER_KEYS) finite and >= 0, "_named" (internal, not adopted) as this
        group's, any other key one this optimizer's group holds (set when it was built),
        of the same type; "params" and unknown keys are refused."""
        for name in _GROUP_OPTIONS:
            if name not in saved:
                raise ValueError(f"state_dict param group {g} lacks {name!r}")
        options = {}
        for key, value in saved.items():
            if key == "param_names":  # compared by the caller
                continue
            where = f"state_dict param group {g} {key!r}"
            if key == "params":
                raise ValueError(f"state_dict param group {g} holds 'params' (tensors are "
                                 "matched by name, not saved)")
            if key == "_named":  # how the group was built: not a setting a load changes
                if value is not group["_named"]:
                    raise ValueError(f"{where} must be {group['_named']}, got {value!r}")
                continue
            if key in _GROUP_OPTIONS:
                value = self._check_group_option(key, value, g)
            elif key in _SCHEDULER_KEYS:
                value = check_hyper(where, value, high=FLOAT32_MAX)
            elif key not in group:
                raise ValueError(f"state_dict param group {g} holds an unknown key {key!r} "
                                 "(not one of this optimizer's param group's)")
            elif type(value) is not type(group[key]):
                raise ValueError(f"{where} is a {type(value).__name__}, this optimizer's is a "
                                 f"{type(group[key]).__name__}")
            options[key] = value
        self._check_group_decay(options, g, "state_dict ")
        return options

    def _checked_trajectory(self, state: dict[str, Any]) -> Trajectory | None:
        """The saved trajectory, parsed (it must describe this run: algorithm, seed, dist,
        rounding, parameter names), or None when none was saved."""
        saved = state["trajectory"]
        if saved is None:
            return None
        try:
            trajectory = Trajectory.from_state_dict(saved)
        except Exception as exc:
            raise ValueError(f"state_dict trajectory is not a trajectory state: {exc}") from exc
        meta = trajectory.meta
        last = trajectory.last_step()
        if last is not None and last >= state["zo_state"]["step"]:
            raise ValueError(f"state_dict trajectory records step {last}, not below the saved "
                             f"step counter {state['zo_state']['step']}")
        expected = {"algorithm": (trajectory.algorithm, self.algorithm),
                    "base_seed": (meta.get("base_seed"), int(state["base_seed"])),
                    "dist": (meta_dist(meta), state["dist"]),
                    "contract": (saved_contract(meta), saved_contract(state)),
                    "rounding": (meta.get("rounding", "nearest"), self.rounding)}
        for field, (got, want) in expected.items():
            if got != want:
                raise ValueError(f"state_dict trajectory {field} is {got!r}, the state / "
                                 f"optimizer has {want!r}")
        groups = meta.get("groups")
        if (not isinstance(groups, list) or len(groups) != len(self.param_groups)
                or any(not isinstance(saved_group, dict)
                       or not _same_meta(saved_group.get("param_names"), group["param_names"])
                       for saved_group, group in zip(groups, self.param_groups))):
            raise ValueError("state_dict trajectory describes other parameters than this "
                             "optimizer's param groups")
        # the rest of what its records mean (noise keys, sizes, decay mask, blocks, ranks,
        # moments' settings...) as this optimizer records it: the run goes on appending to it
        adopted = self._adopted_meta(state)
        for field, want in self._trajectory_meta().items():
            if field in self._RESUME_FREE_META:
                continue
            want = adopted.get(field, want)
            where = _meta_difference(meta.get(field, _META_DEFAULTS.get(field, _MISSING)),
                                     want, field)
            if where is not None:
                raise ValueError(f"state_dict trajectory meta {where} differs from what this "
                                 "optimizer records (its records would not replay); set "
                                 "state_dict['trajectory'] = None to start a new trajectory")
        try:  # every record as this optimizer would have recorded it (seeds, layers, columns)
            trajectory.check_records(self._registered, self._seeds_per_step())
        except ValueError as exc:
            raise ValueError(f"state_dict {exc}") from None
        # the columns this optimizer records, no other: the next record appends to each, so an
        # unknown column would fall behind the records and make the trajectory unloadable
        columns, mine = set(trajectory.extra), self._extra_columns()
        if columns - mine or (len(trajectory) and columns != mine):
            raise ValueError(f"state_dict trajectory has the extra columns {sorted(columns)}, "
                             f"this optimizer records {sorted(mine)}")
        return trajectory

    def _extra_columns(self) -> set[str]:
        """The names of the trajectory's extra columns this optimizer records (TeZO's)."""
        return set()

    # Trajectory meta fields a resumed optimizer need not share with the saved run's: compared
    # with the state above (seed, dist, contract, rounding), or describing its settings only.
    _RESUME_FREE_META = frozenset({"base_seed", "dist", "contract", "rounding"})

    def _adopted_meta(self, state: dict[str, Any]) -> dict[str, Any]:
        """Trajectory meta fields as they will be once `state` (checked) is loaded, for the
        settings a load adopts from it (TeZO: betas and delta)."""
        return {}

    def _seeds_per_step(self) -> tuple[int, int]:
        """(fewest, most) seeds one recorded step of this optimizer holds."""
        return 1, 1

    def _before_adopting(self) -> None:
        """What a load does once the state is checked, before it adopts anything (TeZO: merge
        its pending deferred updates into the current weights)."""

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Validate `state_dict` as load_state_dict would (ValueError naming the first bad
        field), without adopting anything: the optimizer is left as it was either way."""
        self._checked_state(_copied(self._pre_hooked(state_dict)))

    def _pre_hooked(self, state_dict: Any) -> Any:
        """state_dict through torch.optim's load_state_dict pre hooks (each may return a
        replacement)."""
        if isinstance(state_dict, dict):
            state_dict = dict(state_dict)
            for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
                result = pre_hook(self, state_dict)
                if result is not None:
                    state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from a state_dict: all of it is validated first (ValueError naming the field;
        the optimizer is then left exactly as it was), its tensors are copied, and its values
        are adopted, base seed and dist included, so that a resume continues the saved run
        whatever seed this optimizer was built with. The saved trajectory is adopted; without
        one, a trajectory being recorded restarts empty with the loaded seed (its records then
        replay from the checkpoint's weights). RuntimeError during a step."""
        if self._step_in_progress() or self._stepping:
            raise RuntimeError("load_state_dict called during a step (the weights hold a "
                               "perturbation); call it between steps")
        state = _copied(self._pre_hooked(state_dict))
        options, logs, trajectory = self._checked_state(state)
        self._before_adopting()
        # -- nothing below raises: the state was validated above
        for group, saved in zip(self.param_groups, options):
            group.update(saved)
        self.base_seed = int(state["base_seed"])
        self.dist = state["dist"]
        self._adopt_contract(saved_contract(state))
        self.zo_state = {k: int(v) for k, v in state["zo_state"].items()}
        for pair, saved_pair in zip(self._logs, logs):
            for log, saved in zip(pair, saved_pair):
                log.load_checked_state(saved)
        self._load_extra_state(state["extra"])
        if trajectory is not None:
            self.trajectory = trajectory
        elif self.trajectory is not None:
            # none saved: record from the resumed step on, described with the loaded values
            self.trajectory = Trajectory(self.algorithm, self._trajectory_meta())
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _adopt_contract(self, contract: int) -> None:
        """Use normals of this contract version from now on (a loaded state's: a run resumes
        with the noise it was recorded with); TeZO draws its factors with it from then on."""
        self.contract = contract
        held = [t.space for t in self.held.targets if isinstance(t, DenseTarget)]
        for space in self._registered + self.spaces + held:
            space.contract = contract

    @property
    def undo_log_bytes(self) -> int:
        """Device memory held by the undo logs, of every held target (0 with
        exact_restore=False)."""
        return self.held.nbytes

    @property
    def extra_memory_bytes(self) -> int:
        """Memory a step needs beyond the parameters, held between steps: the undo logs
        (undo_log_bytes, persistent buffers that only grow) plus the algorithm's own buffers
        (_buffer_bytes), plus, with virtual probes, the largest perturbed copy a probe has
        held so far (zokernels.dense_probe: a chunk of a weight's rows, an embedding's selected
        rows or a small parameter, transient). The kernels' scratch is per thread on the stack
        (C++) or in registers (Triton) and counts nothing; see docs/undo-log.md."""
        scratch = 0 if self._probes is None else self._probes.peak_scratch_bytes
        return self.undo_log_bytes + self._buffer_bytes() + scratch

    def _buffer_bytes(self) -> int:
        """Device memory of the algorithm's buffers (TeZO's moments, ...); 0 here."""
        return 0

    def zero_grad(self, set_to_none: bool = True) -> None:  # ZO keeps no gradients
        return None


_MISSING = object()
# Meta fields a trajectory of an earlier version may lack, read as the replays read them.
_META_DEFAULTS = {"named": True, "no_decay": [], "n_spsa": 1, "tezo_update": "inplace"}
# Fields an earlier version did not record and that a replay checks only where present (TeZO's
# weight shapes): a saved meta without one matches.
_META_OPTIONAL = frozenset({"shapes"})


def _same_meta(got: Any, want: Any) -> bool:
    return _meta_difference(got, want, "") is None


def _meta_difference(got: Any, want: Any, where: str) -> str | None:
    """Where a saved trajectory meta value differs from this optimizer's (None: nowhere):
    dicts by want's keys (defaults for fields older versions lack), sequences element by
    element, numbers by value with bools apart, anything else (a tensor, an object) differs."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return where
        for key, value in want.items():
            if key in _META_OPTIONAL and key not in got:
                continue
            found = _meta_difference(got.get(key, _META_DEFAULTS.get(key, _MISSING)), value,
                                     f"{where}[{key!r}]")
            if found is not None:
                return found
        return None
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            return where
        for j, (a, b) in enumerate(zip(got, want)):
            found = _meta_difference(a, b, f"{where}[{j}]")
            if found is not None:
                return found
        return None
    if isinstance(want, (bool, str)) or want is None:
        return None if type(got) is type(want) and got == want else where
    if isinstance(want, numbers.Real):
        same = (isinstance(got, numbers.Real) and not isinstance(got, bool)
                and not isinstance(got, torch.Tensor) and got == want)
        return None if same else where
    return where


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two floating tensors hold the same bits (same shape and dtype; NaN payloads and
    signed zeros count): the virtual probe's check."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


def _random_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """torch's CPU and (initialized) CUDA generator states."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_random_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _copied(state: Any) -> Any:
    """A copy of a state_dict: containers rebuilt, tensors cloned (detached), other values as
    they are; the optimizer never keeps a reference into what it was given. A tensor object
    that appears several times is cloned once (aliasing kept, as deepcopy keeps it); each is
    counted against its storage before it is cloned (StorageBudget: ValueError naming it), so
    an expanded view, or views of one storage, in a small file cannot make the copy allocate
    more than the file holds. Containers are copied once too, after check_nesting; sparse (or
    other non-strided) tensors are refused by name."""
    check_nesting(state, "state_dict")  # cyclic or too deep: refused, not a RecursionError
    budget, copies = StorageBudget(), {}

    def copied(obj: Any, where: str) -> Any:
        if id(obj) in copies:  # shared: copied once (work bounded by the file's contents)
            return copies[id(obj)]
        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided:  # a state holds none; torch's ops would fail later
                raise ValueError(f"{where} is a {obj.layout} tensor; a state_dict holds dense "
                                 "tensors")
            budget.charge(obj, where)
            result = obj.detach().clone()
        elif isinstance(obj, dict):
            result = {k: copied(v, f"{where}[{k!r}]") for k, v in obj.items()}
        elif isinstance(obj, list):
            result = [copied(v, f"{where}[{j}]") for j, v in enumerate(obj)]
        elif isinstance(obj, tuple):
            result = tuple(copied(v, f"{where}[{j}]") for j, v in enumerate(obj))
        else:
            return copy.deepcopy(obj)
        copies[id(obj)] = result
        return result

    return copied(state, "state_dict")
