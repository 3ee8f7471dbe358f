"""patch_mezo_trainer: fused zo_perturb_parameters / zo_update for trainers that follow MeZO's
`large_models/trainer.py` convention (also ZO-Bench, PseuZO, HiZOO and other copies of it).

The trainer is expected to have `named_parameters_to_optim` (list of (name, param)),
`zo_random_seed`, `projected_grad`, `args.zo_eps`, `args.weight_decay`, `_get_learning_rate()`
and, optionally, `lr_scheduler`. Patching replaces, on that object only:

    zo_perturb_parameters(random_seed=None, scaling_factor=1)   theta += scaling_factor * eps * z
    zo_update(model)                                            theta -= lr * (g * z + wd * theta)
                                                                (no decay on bias / layer norms),
                                                                then lr_scheduler.step()

with the same meaning, z drawn from the zokernels noise contract (seed = the same seed the trainer
passes, key = the parameter's canonical name) instead of torch.normal after torch.manual_seed.
Each call is one fused pass per (device, dtype) group. The weights are tracked: a perturbation
of the same seed moves from what they hold (recovery, plus undo logs with exact_restore=True),
so +1, -2, +1 gives the original bits back, exactly, in every dtype.

fuse_restore_update=True (opt-in): the restoring call (the one that brings the cumulative factor
back to 0, MeZO's third zo_perturb_parameters of a step) is deferred and fused into the next
zo_update: three passes per step instead of four. Safe only when nothing reads or writes the
weights between the end of zo_step and zo_update (no evaluation, checkpoint, or other perturbation
in between; MeZO's training loop calls them back to back). A deferred restore is carried out
before any other perturbation, by `unpatch_mezo_trainer`, and by `trainer.zo_restore_pending()`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops.undo import UndoLog
from ..space import NO_DECAY_DEFAULT, ParameterSpace

_STATE = "_zokernels_patch"


class _PatchState:
    def __init__(self, fuse: bool, backend: str, dist: str, exact_restore: bool,
                 no_decay: tuple[str, ...]) -> None:
        self.fuse, self.backend, self.dist = fuse, backend, dist
        self.exact_restore, self.no_decay = exact_restore, no_decay
        self.space: ParameterSpace | None = None
        self.signature: tuple | None = None
        self.seed: int | None = None   # the perturbation the weights hold: seed and factor
        self.held = 0.0
        self.logs = [UndoLog(), UndoLog()]
        self.live: list[UndoLog] = []
        self.pending_restore = False
        self.originals: dict[str, Any] = {}

    def space_for(self, named: list[tuple[str, torch.Tensor]]) -> ParameterSpace:
        signature = tuple((n, id(p)) for n, p in named)
        if signature != self.signature:
            if self.seed is not None:
                raise RuntimeError("named_parameters_to_optim changed while the weights hold a "
                                   "perturbation; restore (scaling_factor bringing it to 0) first")
            self.space = ParameterSpace(named, backend=self.backend, no_decay=self.no_decay)
            self.signature = signature
        return self.space

    def move(self, space: ParameterSpace, seed: int, target: float) -> None:
        """Bring the weights from theta + held * z(seed) to theta + target * z(seed)."""
        if self.seed is not None and seed != self.seed:
            self.restore(space)
        applied = self.held if self.seed is not None else None
        if target == 0.0:
            if applied is not None:
                self.restore(space)
            return
        log = None
        if self.exact_restore:
            log = self.logs[len(self.live) % 2]
            if log in self.live:  # a third move of one seed: settle back to theta first
                self.restore(space)
                applied, log = None, self.logs[0]
            self.live.append(log)
        space.apply(seed, target, applied=applied, dist=self.dist, log=log, check_finite=False)
        self.seed, self.held = seed, target

    def restore(self, space: ParameterSpace) -> None:
        if self.seed is None:
            return
        space.apply(self.seed, 0.0, applied=self.held, dist=self.dist, check_finite=False)
        for log in reversed(self.live):
            space.apply_logged(log, dist=self.dist)
            log.clear()
        self.live, self.seed, self.held, self.pending_restore = [], None, 0.0, False


def _seed_of(trainer: Any, random_seed: int | None) -> int:
    seed = trainer.zo_random_seed if random_seed is None else random_seed
    return int(seed) & ((1 << 64) - 1)


def patch_mezo_trainer(trainer: Any, *, fuse_restore_update: bool = False,
                       exact_restore: bool = True, dist: str = "gaussian",
                       backend: str = "auto",
                       no_decay: tuple[str, ...] = NO_DECAY_DEFAULT) -> Any:
    """Replace `trainer.zo_perturb_parameters` and `trainer.zo_update` with fused versions of the
    same semantics (module docstring). Returns the trainer; `unpatch_mezo_trainer` undoes it."""
    for name in ("zo_perturb_parameters", "zo_update"):
        if not callable(getattr(trainer, name, None)):
            raise TypeError(f"trainer has no method {name}: not a MeZO-style trainer")
    if getattr(trainer, _STATE, None) is not None:
        raise RuntimeError("trainer is already patched")
    state = _PatchState(fuse_restore_update, backend, dist, exact_restore, tuple(no_decay))
    state.originals = {name: trainer.__dict__[name] for name in
                       ("zo_perturb_parameters", "zo_update", "zo_restore_pending")
                       if name in trainer.__dict__}

    def zo_perturb_parameters(random_seed: int | None = None, scaling_factor: float = 1) -> None:
        space = state.space_for(list(trainer.named_parameters_to_optim))
        seed = _seed_of(trainer, random_seed)
        current = state.held if state.seed == seed and not state.pending_restore else 0.0
        target = current + float(scaling_factor) * float(trainer.args.zo_eps)
        if abs(target) < 1e-12 * abs(float(trainer.args.zo_eps)):
            target = 0.0  # +1, -2, +1 in floating point: exactly back to theta
        if target == 0.0 and state.fuse and state.seed == seed:
            state.pending_restore = True  # carried out inside the next zo_update
            return
        if state.pending_restore:
            state.restore(space)
        state.move(space, seed, target)

    def zo_update(model: Any = None) -> None:
        space = state.space_for(list(trainer.named_parameters_to_optim))
        seed = _seed_of(trainer, None)
        lr = float(trainer._get_learning_rate())
        weight_decay = float(getattr(trainer.args, "weight_decay", 0.0))
        coef = -lr * float(trainer.projected_grad)
        decay = 1.0 - lr * weight_decay
        if state.pending_restore and state.seed == seed:
            held, logs = state.held, list(state.live)
            space.update(seed, coef, decay=decay, applied=held, dist=state.dist,
                         check_finite=False)
            for log in reversed(logs):
                space.apply_logged(log, seed, coef, weight_decay_factor=decay, dist=state.dist)
                log.clear()
            state.live, state.seed, state.held, state.pending_restore = [], None, 0.0, False
        else:
            state.restore(space)
            space.update(seed, coef, decay=decay, dist=state.dist, check_finite=False)
        scheduler = getattr(trainer, "lr_scheduler", None)
        if scheduler is not None:
            scheduler.step()

    def zo_restore_pending() -> None:
        """Carry out a restore deferred by fuse_restore_update (e.g. before an evaluation)."""
        if state.pending_restore and state.space is not None:
            state.restore(state.space)

    trainer.zo_perturb_parameters = zo_perturb_parameters
    trainer.zo_update = zo_update
    trainer.zo_restore_pending = zo_restore_pending
    setattr(trainer, _STATE, state)
    return trainer


def unpatch_mezo_trainer(trainer: Any) -> Any:
    """Restore the trainer's own methods (after carrying out a deferred restore)."""
    state = getattr(trainer, _STATE, None)
    if state is None:
        raise RuntimeError("trainer is not patched")
    if state.space is not None:
        state.restore(state.space)
    for name in ("zo_perturb_parameters", "zo_update", "zo_restore_pending"):
        if name in state.originals:
            setattr(trainer, name, state.originals[name])
        else:
            trainer.__dict__.pop(name, None)
    delattr(trainer, _STATE)
    return trainer
