"""ZOOptimizer: what every zokernels optimizer shares.

Param groups, validation, per-step seeds, one ParameterSpace per param group, the exact
perturb / restore / update protocol with undo logs (docs/undo-log.md), exception safety,
non-finite-loss skips, state_dict round trips and trajectory recording. Subclasses compute a few
scalars per step and call the passes below; none loops over parameters doing arithmetic.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._contract import PERTURB_DISTS, ROUNDINGS
from .._dispatch import BACKEND_CHOICES
from ..ops.undo import UndoLog
from ..space import ParameterSpace
from ..trajectory import Trajectory
from ._params import normalize_param_groups
from ._seeds import step_seed

Closure = Callable[[], Any]


def check_hyper(name: str, value: Any, *, low: float = 0.0, low_open: bool = False,
                high: float | None = None, high_open: bool = False) -> float:
    """A finite real hyperparameter in the given range, else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if value < low or (low_open and value == low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_common_hyper(lr: Any, eps: Any, weight_decay: Any) -> None:
    """The hyperparameters every optimizer shares: lr >= 0, eps > 0, weight_decay >= 0."""
    check_hyper("lr", lr)
    check_hyper("eps", eps, low_open=True)
    check_hyper("weight_decay", weight_decay)


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
                 rounding: str = "nearest", process_group: Any = None) -> None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
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
            for name in ("lr", "eps", "weight_decay"):
                if name in group:
                    self._check_group_option(name, group[name], g)
        super().__init__(groups, defaults)
        self.base_seed = int(seed)
        self.dist = dist
        self.exact_restore = bool(exact_restore)
        self.rounding = rounding  # of the update (the perturbations round to nearest)
        self.process_group = process_group
        if process_group is not None:
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized():
                raise ValueError("process_group given but torch.distributed is not initialized")
        self.backend = backend
        self.no_decay = tuple(no_decay)
        self.zo_state: dict[str, Any] = {"step": 0, "skipped_steps": 0, "undo_overflows": 0}
        self.spaces = [ParameterSpace(list(zip(group["param_names"], group["params"])),
                                      layers=self._layers_for(group, layers), backend=backend,
                                      no_decay=self.no_decay)
                       for group in self.param_groups]
        if process_group is None and any(space.sharded for space in self.spaces):
            self.process_group = default_group_for_shards()
        # Two logs per param group: the +eps pass and the -eps pass of a step.
        self._logs = [(UndoLog(), UndoLog()) for _ in self.param_groups]
        # What the weights hold now: {"seed", "coefs" per group, "layers"} or None, and the log
        # slots filled since they were last exact.
        self._held: dict[str, Any] | None = None
        self._live_slots: list[int] = []
        self.trajectory: Trajectory | None = (
            Trajectory(self.algorithm, self._trajectory_meta()) if record_trajectory else None)
        self._split_spaces()

    def _split_spaces(self) -> None:
        """Hook run once the trajectory has recorded the full parameter spaces (TeZO moves its
        2-D weights to low-rank state here)."""

    # -- construction helpers -------------------------------------------------------------
    @staticmethod
    def _check_group_option(name: str, value: Any, g: int) -> None:
        check_hyper(f"param group {g} {name}", value, low_open=(name == "eps"))

    def _layers_for(self, group: dict[str, Any], layers: Sequence[Any] | None):
        """The layer spec restricted to this group's tensors (LeZO), or None."""
        if layers is None:
            return None
        mine = {id(t) for t in group["params"]}
        names = dict(zip(group["param_names"], group["params"]))
        restricted = []
        for spec in layers:
            members = list(spec.parameters()) if isinstance(spec, torch.nn.Module) else list(spec)
            chosen = []
            for item in members:
                tensor = names.get(item) if isinstance(item, str) else item
                if isinstance(tensor, torch.Tensor) and id(tensor) in mine:
                    chosen.append(tensor)
            restricted.append(chosen)
        return restricted

    def _trajectory_meta(self) -> dict[str, Any]:
        return {"base_seed": self.base_seed, "dist": self.dist, "rounding": self.rounding,
                "groups": [{"param_names": list(g["param_names"]),
                            "numel": space.global_numels(),
                            "keys": list(space.keys)}
                           for g, space in zip(self.param_groups, self.spaces)],
                "no_decay": list(self.no_decay)}

    # -- seeds ------------------------------------------------------------------------------
    def seed_for(self, step: int, index: int = 0, purpose: str = "z") -> int:
        return step_seed(self.base_seed, step, index, purpose=purpose)

    # -- the passes ----------------------------------------------------------------------------
    def _perturb(self, seed: int, scales: list[float], layers: list | None, *,
                 applied: list[float] | None = None, log_slot: int | None = None) -> None:
        """One pass per param group: theta += scales[g] * z(seed) (after recovering from the
        held perturbation `applied[g]`), logging into log slot `log_slot`."""
        for g, space in enumerate(self.spaces):
            log = None if log_slot is None else self._logs[g][log_slot]
            space.apply(seed, scales[g], layers=self._group_layers(layers, g),
                        applied=None if applied is None else applied[g], dist=self.dist,
                        log=log, check_finite=False)

    def _restore(self) -> None:
        """Put the weights back to their exact pre-step bits (docs/undo-log.md): a dense pass
        that recovers from the held perturbation, then the logs rewritten, latest first (an
        earlier log holds truer values)."""
        held, slots = self._held, self._live_slots
        self._held, self._live_slots = None, []
        if held is not None:
            self._perturb(held["seed"], [0.0] * len(self.spaces), held["layers"],
                          applied=held["coefs"])
        for slot in reversed(slots):
            for g, space in enumerate(self.spaces):
                space.apply_logged(self._logs[g][slot], dist=self.dist)
        self._clear_logs()

    @staticmethod
    def _group_layers(layers: list | None, g: int):
        return None if layers is None else layers[g]

    def _clear_logs(self) -> None:
        for pair in self._logs:
            for log in pair:
                if log.plan is not None:
                    log.clear()

    def _check_logs(self) -> None:
        """Read the logs' counts (with the losses' synchronization): overflow -> warn, grow."""
        if not self.exact_restore:
            return
        for pair in self._logs:
            for log in pair:
                if log.check():
                    self.zo_state["undo_overflows"] += 1

    def _perturb_held(self, seed: int, coefs: list[float], layers: list | None,
                      slot: int) -> None:
        """Move the weights to theta + coefs[g] * z(seed) (from theta, or from the perturbation
        they hold, which must have the same seed), logging into `slot`."""
        applied = None
        if self._held is not None:
            if self._held["seed"] != seed or self._held["layers"] != layers:
                self._restore()
            else:
                applied = self._held["coefs"]
        self._live_slots.append(slot)  # before the pass: a failure inside still restores it
        self._perturb(seed, coefs, layers, applied=applied,
                      log_slot=slot if self.exact_restore else None)
        self._held = {"seed": seed, "coefs": list(coefs), "layers": layers}

    def _probe_two_point(self, closure: Closure, seed: int, eps: list[float],
                         layers: list | None) -> tuple[torch.Tensor, torch.Tensor]:
        """theta + eps z -> f, theta - eps z -> f. Leaves -eps held with both logs live."""
        self._perturb_held(seed, eps, layers, 0)
        loss_plus = self._evaluate(closure)
        self._perturb_held(seed, [-e for e in eps], layers, 1)
        loss_minus = self._evaluate(closure)
        return loss_plus, loss_minus

    @staticmethod
    def _evaluate(closure: Closure) -> torch.Tensor:
        with torch.no_grad():
            loss = closure()
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"the closure must return a scalar loss, got shape "
                                 f"{tuple(loss.shape)}")
            return loss.detach().reshape(()).to(torch.float32)
        if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
            return torch.tensor(float(loss), dtype=torch.float32)
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

    def _finite(self, *losses: torch.Tensor) -> bool:
        """One host synchronization: the step needs to know whether to skip."""
        values = torch.stack([l.to("cpu") if l.device.type != "cpu" else l for l in losses])
        return bool(torch.isfinite(values).all())

    def _skip(self, losses: Sequence[torch.Tensor]) -> None:
        self._restore()
        self.zo_state["skipped_steps"] += 1
        warnings.warn(f"{type(self).__name__}: non-finite loss at step {self.zo_state['step']} "
                      f"({[float(l) for l in losses]}); step skipped, weights restored exactly",
                      RuntimeWarning, stacklevel=3)

    def _update(self, seeds: list[int], coefs_per_group: list[Any], layers: list | None) -> None:
        """theta = (1 - lr * wd) * theta + sum_k coefs[g][k] * z_k in ONE pass per group,
        recovering from the held perturbation (its seed must be the last of `seeds`), then the
        logged elements rewritten from their exact values: the result equals an update applied
        to the unperturbed weights, bit for bit. Runs no user code; an interrupt between the
        passes still finishes the rewrites."""
        held, slots = self._held, self._live_slots
        if held is not None and held["seed"] != seeds[-1]:
            raise AssertionError("the held perturbation's seed must be the update's last seed")
        decays = [1.0 - group["lr"] * group["weight_decay"] for group in self.param_groups]
        try:
            for g, space in enumerate(self.spaces):
                applied = None if held is None else [0.0] * (len(seeds) - 1) + [held["coefs"][g]]
                space.update(seeds, coefs_per_group[g], decay=decays[g],
                             layers=self._group_layers(layers, g), applied=applied,
                             dist=self.dist, rounding=self.rounding, check_finite=False)
        finally:
            self._held, self._live_slots = None, []
            for slot in reversed(slots):
                for g, space in enumerate(self.spaces):
                    space.apply_logged(self._logs[g][slot], seeds, coefs_per_group[g],
                                       weight_decay_factor=decays[g], dist=self.dist,
                                       rounding=self.rounding, check_finite=False)
            self._clear_logs()

    def _guarded(self, body: Callable[[], Any]) -> Any:
        """Run a step body; on any exception (KeyboardInterrupt included) restore exactly."""
        try:
            return body()
        except BaseException:
            self._restore()
            raise

    # -- state ------------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        """Algorithm state (momentum, windows, ...): tensors and plain values."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        groups = [{k: v for k, v in g.items() if k not in ("params", "_named")}
                  for g in self.param_groups]
        return {"algorithm": self.algorithm, "base_seed": self.base_seed, "dist": self.dist,
                "zo_state": dict(self.zo_state), "param_groups": groups,
                "undo_logs": [[log.state_dict() for log in pair] for pair in self._logs],
                "extra": self._extra_state(),
                "trajectory": None if self.trajectory is None else self.trajectory.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("algorithm") != self.algorithm:
            raise ValueError(f"state_dict is for {state_dict.get('algorithm')!r}, "
                             f"not {self.algorithm!r}")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, the optimizer has "
                             f"{len(self.param_groups)}")
        for g, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if list(saved["param_names"]) != list(group["param_names"]):
                raise ValueError(f"param group {g}: the saved parameter names differ from this "
                                 "optimizer's")
        for saved, group in zip(groups, self.param_groups):
            for k, v in saved.items():
                if k != "param_names":
                    group[k] = v
        self.base_seed = int(state_dict["base_seed"])
        self.dist = state_dict["dist"]
        self.zo_state = dict(state_dict["zo_state"])
        for pair, saved_pair in zip(self._logs, state_dict.get("undo_logs", [])):
            for log, saved in zip(pair, saved_pair):
                log.load_state_dict(saved)
        self._load_extra_state(state_dict.get("extra", {}))
        saved_trajectory = state_dict.get("trajectory")
        if saved_trajectory is not None:
            self.trajectory = Trajectory.from_state_dict(saved_trajectory)

    @property
    def undo_log_bytes(self) -> int:
        """Device memory held by the undo logs (0 with exact_restore=False)."""
        return sum(log.nbytes for pair in self._logs for log in pair)

    def zero_grad(self, set_to_none: bool = True) -> None:  # ZO keeps no gradients
        return None
