"""TeZO (Sun et al. 2025, arXiv 2501.19057): low-rank ZO noise with fixed factors, momentum and
Adam state in the r-dimensional tau space."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..ops.lowrank import lowrank_perturb_, run_lowrank_scatter
from ..ops.noise import noise
from ..ops.undo import UndoLog
from ..sharding import is_dtensor, local_tensor
from ..space import NO_DECAY_DEFAULT, ParameterSpace
from ..trajectory import register_replayer
from .base import ZOOptimizer, check_common_hyper, check_hyper
from ._seeds import step_seed

VARIANTS = ("sgd", "momentum", "adam")


class _LowRankState:
    """The 2-D weights of one param group with their fixed factors and tau-space moments."""

    def __init__(self, names: list[str], weights: list[torch.Tensor], keys: list[int],
                 decayable: list[bool], rank: int, factor_seed: int, backend: str,
                 shards: list[Any] | None = None) -> None:
        """weights: the tensors written (local shards of sharded weights); shards: per weight None
        or its zokernels.sharding.Shard (the unsharded shape and the box's offset)."""
        self.names, self.keys = names, keys
        # the parameters as given (DTensors) and what the kernels write (their local shards,
        # looked up again before each pass: a sharding wrapper may swap them)
        self.params = weights
        self._dtensors = [j for j, w in enumerate(weights) if is_dtensor(w)]
        self.weights = [local_tensor(w) for w in weights]
        self.decayable = decayable
        shards = shards if shards is not None else [None] * len(weights)
        shapes = [tuple(w.shape) if sh is None else sh.global_shape
                  for w, sh in zip(self.weights, shards)]
        # the rank rule on the unsharded shape: every rank of a sharded run uses the same r
        self.ranks = [min(rank, m, n) for m, n in shapes]
        self.us, self.vs = [], []
        for w, key, r, (m, n), shard in zip(self.weights, keys, self.ranks, shapes, shards):
            row0, col0 = (0, 0) if shard is None else shard.global_offset
            rows, cols = w.shape
            # drawn once, as pure functions of (seed, key): never saved, rebuilt on resume/replay.
            # U is rows x r of the unsharded m x r (flat offset row0 * r), V cols x r of n x r
            # (after U's m * r elements): a shard's block of U diag(tau) V^T is the unsharded one.
            u = noise(rows * r, factor_seed, key, offset=row0 * r, device=w.device,
                      backend=backend).view(rows, r)
            v = noise(cols * r, factor_seed, key, offset=m * r + col0 * r, device=w.device,
                      backend=backend).view(cols, r)
            self.us.append(u)
            self.vs.append(v)
        self.offsets = [0]
        for r in self.ranks:
            self.offsets.append(self.offsets[-1] + r)
        device = weights[0].device if weights else torch.device("cpu")
        # 1/sqrt(r_j) per tau entry, built once: makes Z's entries unit-variance
        self.rank_norm = torch.tensor([1.0 / math.sqrt(r) for r in self.ranks for _ in range(r)],
                                      dtype=torch.float32, device=device)
        self.momentum = torch.zeros(self.offsets[-1], dtype=torch.float32, device=device)
        self.second = torch.zeros_like(self.momentum)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def _per_weight(self, taus: torch.Tensor) -> list[torch.Tensor]:
        """The flat tau vector scaled by 1/sqrt(r_j) and split per weight. Elementwise, so the
        same taus give the same bits in every pass (a recovery needs the writer's exact D)."""
        return self.split(taus * self.rank_norm)

    def _refresh(self) -> None:
        for j in self._dtensors:
            self.weights[j] = local_tensor(self.params[j])

    def _decays(self, decay: float) -> list[float]:
        return [decay if d else 1.0 for d in self.decayable]

    def apply(self, taus: torch.Tensor, scale: Any, decay: float, backend: str, *,
              applied: tuple[torch.Tensor, float] | None = None,
              log: UndoLog | None = None) -> None:
        """W = round(d * theta + scale * U diag(tau) V^T / sqrt(r)) for every weight (one launch);
        d = decay on decayable weights. The 1/sqrt(r) makes Z's entries unit-variance.
        theta = W, or with applied = (held taus, held scale) the weight recovered from the
        perturbation W holds now; `log` keeps what a later recovery of this pass would miss."""
        if not self.weights:
            return
        self._refresh()
        held = {} if applied is None else dict(applied_taus=self._per_weight(applied[0]),
                                               applied_scale=applied[1])
        lowrank_perturb_(self.weights, self.us, self.vs, self._per_weight(taus), scale=scale,
                         decay=self._decays(decay), keys=self.keys, backend=backend,
                         check_finite=False, log=log, **held)

    def apply_logged(self, log: UndoLog, taus: torch.Tensor | None = None, scale: float = 0.0,
                     decay: float = 1.0) -> None:
        """Rewrite the elements `log` holds: taus None puts their logged values back bit for bit
        (restore); else W = round(d * logged + scale * U diag(tau) V^T / sqrt(r)) (update)."""
        if not self.weights or log.plan is None:
            return
        run_lowrank_scatter(log, self.us, self.vs,
                            None if taus is None else self._per_weight(taus),
                            torch.tensor([scale], dtype=torch.float32),
                            torch.tensor(self._decays(decay), dtype=torch.float32))

    @property
    def state_numel(self) -> int:
        """Optimizer state elements: U, V and the two moment vectors (O((m + n) r) per matrix)."""
        return (sum(u.numel() + v.numel() for u, v in zip(self.us, self.vs))
                + self.momentum.numel() + self.second.numel())


def _split_by_rank(space: ParameterSpace) -> tuple[list[int], list[int]]:
    """Positions of the 2-D tensors (low-rank noise) and of the others (full noise)."""
    two_d = [j for j, t in enumerate(space.params) if t.dim() == 2]
    return two_d, [j for j, t in enumerate(space.params) if t.dim() != 2]


class TeZO(ZOOptimizer):
    """ZO with low-rank noise Z_t = U diag(tau_t) V^T / sqrt(r) on every 2-D weight.

    U (m x r), V (n x r) ~ N(0, 1) are fixed, drawn once from (seed, tensor key); tau_t ~ N(0, I_r)
    is fresh each step. Dividing by sqrt(r) gives Z's entries variance 1 (without it, r), so eps and
    lr mean what they mean for MeZO. Rank rule: r_j = min(rank, m_j, n_j). 1-D parameters (biases,
    norms) get full-size noise and plain ZO-SGD. With g = (l+ - l-) / (2 eps):

        sgd:      W -= lr g Z_t
        momentum: m = b1 m + (1 - b1) g tau_t;        W -= lr U diag(m) V^T / sqrt(r)
        adam:     m as above, v = b2 v + (1 - b2) (g tau_t)^2,
                  W -= lr U diag(m_hat / (sqrt(v_hat) + delta)) V^T / sqrt(r)   (bias-corrected)

    The update is fused with the restore (one low-rank pass recovers theta from the held -eps Z_t
    and applies the update; they share U and V). Optimizer state per matrix: U, V and two
    r-vectors, never m x n.
    Restore exactness: as MeZO's, for every parameter. The 2-D weights are moved between
    perturbations by recovery (lowrank_perturb_'s applied_taus / applied_scale) and keep undo logs
    of the elements recovery cannot give back (docs/undo-log.md, "Low-rank groups"), so a failed
    closure or a skipped step leaves every weight bit-identical and the update is computed from
    the exact theta. exact_restore=False drops the logs (recovery quality only).
    """

    algorithm = "tezo"

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 seed: int = 0, dist: str = "gaussian", *, rank: int = 8, variant: str = "sgd",
                 betas: tuple[float, float] = (0.9, 0.999), delta: float = 1e-8,
                 exact_restore: bool = True, backend: str = "auto",
                 rounding: str = "nearest", process_group: Any = None,
                 no_decay: Sequence[str] = NO_DECAY_DEFAULT,
                 record_trajectory: bool = True) -> None:
        check_common_hyper(lr, eps, weight_decay)
        check_hyper("delta", delta, low_open=True)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair, got {betas!r}")
        check_hyper("betas[0]", betas[0], high=1.0, high_open=True)
        check_hyper("betas[1]", betas[1], high=1.0, high_open=True)
        self.rank, self.variant = rank, variant
        self.betas, self.delta = (float(betas[0]), float(betas[1])), float(delta)
        # What each group's 2-D weights hold now ((tau, coef) or None = theta), and the log
        # slots filled since they were last exact.
        self._lowrank_held: list[tuple[torch.Tensor, float] | None] | None = None
        self._lowrank_slots: list[int] = []
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), seed=seed,
                         dist=dist, exact_restore=exact_restore, backend=backend,
                         rounding=rounding, process_group=process_group,
                         no_decay=no_decay, record_trajectory=record_trajectory)

    # The base class builds one ParameterSpace per group over all params; TeZO splits them: the
    # dense space keeps the 1-D ones, the low-rank state the 2-D ones.
    def _split_spaces(self) -> None:
        self.lowrank = []
        dense_spaces = []
        for g, space in enumerate(self.spaces):
            two_d, rest = _split_by_rank(space)
            self.lowrank.append(_LowRankState(
                [space.names[j] for j in two_d], [space.params[j] for j in two_d],
                [space.keys[j] for j in two_d], [space.decayable[j] for j in two_d], self.rank,
                step_seed(self.base_seed, 0, g, purpose="factors"), self.backend,
                [space.shards[j] for j in two_d]))
            dense_spaces.append(ParameterSpace(
                [(space.names[j], space.params[j]) for j in rest],
                keys=[space.keys[j] for j in rest], backend=self.backend,
                no_decay=self.no_decay))
        self.spaces = dense_spaces
        # Two logs per param group for the 2-D weights too: the +eps and the -eps pass.
        self._lowrank_logs = [(UndoLog(), UndoLog()) for _ in self.lowrank]

    def _trajectory_meta(self) -> dict[str, Any]:
        meta = super()._trajectory_meta()  # all parameters: the split comes after
        lowrank = []
        for space in self.spaces:
            two_d, _ = _split_by_rank(space)
            lowrank.append({"param_names": [space.names[j] for j in two_d],
                            "keys": [space.keys[j] for j in two_d],
                            "numel": [space.global_numels()[j] for j in two_d]})
        meta.update(rank=self.rank, variant=self.variant, betas=list(self.betas),
                    delta=self.delta, lowrank=lowrank)
        return meta

    @property
    def state_numel(self) -> int:
        return sum(s.state_numel for s in self.lowrank)

    @property
    def undo_log_bytes(self) -> int:
        """Device memory held by the undo logs, dense and low-rank (0 with exact_restore=False)."""
        return super().undo_log_bytes + sum(log.nbytes for pair in self._lowrank_logs
                                            for log in pair)

    def _taus(self, step: int, state: _LowRankState, g: int) -> torch.Tensor:
        if state.offsets[-1] == 0:
            return state.momentum
        return noise(state.offsets[-1], step_seed(self.base_seed, step, g, purpose="tau"), 0,
                     device=state.momentum.device, backend=self.backend)

    def step(self, closure=None) -> torch.Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("TeZO.step needs a closure that returns the loss")
        return self._guarded(lambda: self._step(closure))

    def _restore(self) -> None:
        """The 2-D weights back to their exact pre-step bits (a recovery pass with scale 0, then
        the logs rewritten, latest first), then the dense ones (base class)."""
        held, slots = self._lowrank_held, self._lowrank_slots
        self._lowrank_held, self._lowrank_slots = None, []
        try:
            for state, h in zip(self.lowrank, held or []):
                if h is not None:
                    state.apply(h[0], 0.0, 1.0, self.backend, applied=h)
            for slot in reversed(slots):
                for state, pair in zip(self.lowrank, self._lowrank_logs):
                    state.apply_logged(pair[slot])
        finally:
            self._clear_lowrank_logs()
            super()._restore()

    def _clear_lowrank_logs(self) -> None:
        for pair in self._lowrank_logs:
            for log in pair:
                if log.plan is not None:
                    log.clear()

    def _check_logs(self) -> None:
        super()._check_logs()
        if not self.exact_restore:
            return
        for pair in self._lowrank_logs:
            for log in pair:
                if log.check():
                    self.zo_state["undo_overflows"] += 1

    def _lowrank_perturb(self, taus: list[torch.Tensor], coefs: list[float], slot: int) -> None:
        """Move the 2-D weights to theta + coefs[g] Z(taus[g]), from theta or by recovery from the
        perturbation they hold (same taus), logging into `slot`; _lowrank_held stays true after
        each group for a restore."""
        held = self._lowrank_held or [None] * len(self.lowrank)
        if slot not in self._lowrank_slots:
            self._lowrank_slots.append(slot)  # before the pass: a failure inside still restores it
        for g, (state, tau) in enumerate(zip(self.lowrank, taus)):
            log = self._lowrank_logs[g][slot] if self.exact_restore else None
            state.apply(tau, coefs[g], 1.0, self.backend, applied=held[g], log=log)
            held = held[:g] + [(tau, coefs[g])] + held[g + 1:]
            self._lowrank_held = held

    def _lowrank_update(self, taus: list[torch.Tensor], grads: list[torch.Tensor],
                        lrs: list[float], decays: list[float], step: int) -> None:
        """W = round(d * theta - lr U diag(direction) V^T / sqrt(r)) in ONE pass per group that
        recovers theta from the held -eps Z_t, then the logged elements rewritten from their exact
        values: bit-identical to the update applied to the unperturbed weights (and to a replay).
        Runs no user code; an interrupt between the passes still finishes the rewrites."""
        held, slots = self._lowrank_held, self._lowrank_slots
        self._lowrank_held, self._lowrank_slots = None, []
        updates: list[torch.Tensor] = []
        try:
            for g, state in enumerate(self.lowrank):
                update = -lrs[g] * self._direction(state, taus[g], grads[g], step)
                updates.append(update)
                state.apply(update, 1.0, decays[g], self.backend,
                            applied=None if held is None else held[g])
        finally:
            for slot in reversed(slots):
                for g, (state, update) in enumerate(zip(self.lowrank, updates)):
                    state.apply_logged(self._lowrank_logs[g][slot], update, 1.0, decays[g])
            self._clear_lowrank_logs()

    def _step(self, closure) -> torch.Tensor:
        step = self.zo_state["step"]
        eps = [group["eps"] for group in self.param_groups]
        seed = self.seed_for(step)
        taus = [self._taus(step, state, g) for g, state in enumerate(self.lowrank)]
        self._lowrank_perturb(taus, eps, 0)
        self._perturb_held(seed, eps, None, 0)
        loss_plus = self._evaluate(closure)
        self._lowrank_perturb(taus, [-e for e in eps], 1)
        self._perturb_held(seed, [-e for e in eps], None, 1)
        loss_minus = self._evaluate(closure)
        if self.process_group is not None:
            loss_plus, loss_minus = self._all_reduce_mean(torch.stack([loss_plus, loss_minus]))
        if not self._finite(loss_plus, loss_minus):
            self._check_logs()
            self._skip([loss_plus, loss_minus])
            self.zo_state["step"] = step + 1
            return loss_plus
        self._check_logs()
        half_diff = (loss_plus - loss_minus) / 2
        grads = [half_diff / group["eps"] for group in self.param_groups]
        lrs = [group["lr"] for group in self.param_groups]
        decays = [1.0 - group["lr"] * group["weight_decay"] for group in self.param_groups]
        self._lowrank_update(taus, grads, lrs, decays, step)
        coefs = [(-lrs[g] * grads[g]).reshape(1) for g in range(len(self.param_groups))]
        self._update([seed], coefs, None)
        if self.trajectory is not None:
            self.trajectory.record(step, [seed], [c.tolist() for c in coefs], decays,
                                   **{f"grad{g}": float(grads[g]) for g in range(len(grads))},
                                   **{f"lr{g}": lrs[g] for g in range(len(lrs))})
        self.zo_state["step"] = step + 1
        return loss_plus

    def _direction(self, state: _LowRankState, tau: torch.Tensor, grad: torch.Tensor,
                   step: int) -> torch.Tensor:
        """The tau-space update direction; advances the moments."""
        return tezo_direction(self.variant, self.betas, self.delta, state, tau, grad, step)

    def _extra_state(self) -> dict[str, Any]:
        return {"momentum": [s.momentum.clone() for s in self.lowrank],
                "second": [s.second.clone() for s in self.lowrank],
                "lowrank_undo_logs": [[log.state_dict() for log in pair]
                                      for pair in self._lowrank_logs]}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        for s, m, v in zip(self.lowrank, state.get("momentum", []), state.get("second", [])):
            s.momentum.copy_(m)
            s.second.copy_(v)
        for pair, saved_pair in zip(self._lowrank_logs, state.get("lowrank_undo_logs", [])):
            for log, saved in zip(pair, saved_pair):
                log.load_state_dict(saved)


def tezo_direction(variant: str, betas: tuple[float, float], delta: float, state: _LowRankState,
                   tau: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
    if variant == "sgd":
        return grad * tau
    b1, b2 = betas
    g_tau = grad * tau
    state.momentum.mul_(b1).add_((1 - b1) * g_tau)
    if variant == "momentum":
        return state.momentum.clone()
    state.second.mul_(b2).add_((1 - b2) * g_tau * g_tau)
    t = step + 1
    m_hat = state.momentum / (1 - b1 ** t)
    v_hat = state.second / (1 - b2 ** t)
    return m_hat / (v_hat.sqrt() + delta)


def _replay_tezo(trajectory, spaces, backend) -> None:
    """Rebuild a TeZO run: the 1-D parameters from the recorded seeded updates, the 2-D ones by
    re-running the tau-space recursions on the recorded projected gradients."""
    meta = trajectory.meta
    base = meta["base_seed"]
    betas = tuple(meta["betas"])
    states = []
    for g, (space, lowrank) in enumerate(zip(spaces, meta["lowrank"])):
        names = set(lowrank["param_names"])
        two_d = [j for j, n in enumerate(space.names) if n in names]
        states.append(_LowRankState(
            [space.names[j] for j in two_d], [space.params[j] for j in two_d],
            [space.keys[j] for j in two_d], [space.decayable[j] for j in two_d], meta["rank"],
            step_seed(base, 0, g, purpose="factors"), backend, [space.shards[j] for j in two_d]))
    dense = []
    for space, lowrank in zip(spaces, meta["lowrank"]):
        names = set(lowrank["param_names"])
        rest = [j for j, n in enumerate(space.names) if n not in names]
        dense.append(ParameterSpace([(space.names[j], space.params[j]) for j in rest],
                                    keys=[space.keys[j] for j in rest], backend=backend,
                                    no_decay=meta.get("no_decay", ())))
    for i, (step, seeds, coefs, decays, _) in enumerate(trajectory.records()):
        for g, state in enumerate(states):
            grad = torch.tensor(trajectory.extra[f"grad{g}"][i], dtype=torch.float32)
            lr = trajectory.extra[f"lr{g}"][i]
            tau = (noise(state.offsets[-1], step_seed(base, step, g, purpose="tau"), 0,
                         device=state.momentum.device, backend=backend)
                   if state.offsets[-1] else state.momentum)
            grad = grad.to(tau.device)
            direction = tezo_direction(meta["variant"], betas, meta["delta"], state, tau, grad,
                                       step)
            state.apply(-lr * direction, 1.0, decays[g], backend)
            dense[g].update(seeds, coefs[g], decay=decays[g], dist=meta["dist"])


register_replayer("tezo", _replay_tezo)
