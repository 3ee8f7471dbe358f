"""TeZO (Sun et al. 2025, arXiv 2501.19057): low-rank ZO noise with fixed factors, momentum and
Adam state in the r-dimensional tau space.

Every weight's noise is a pure function of (seed, its key): U_j, V_j of (factor_seed(base seed),
key_j), tau_{t,j} of (tau_seed(base seed, t), key_j). Keys come from canonical names, so a
weight's noise survives checkpoint/resume, freezing other parameters, regrouping and wrapper
prefixes such as `module.`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from .._contract import DEFAULT_CONTRACT, saved_contract
from .._signals import interrupts_deferred
from .._validate import as_seed, is_finite_number
from .._warn import warn
from ..held import DenseTarget
from ..lowrank_probe import UseTracker, VirtualLowRank, VirtualPart
from ..lowrank_space import LowRankNoise, LowRankSpace, split_by_rank
from ..ops.undo import SelectorLog, UndoLog
from ..sharding import local_tensor
from ..space import NO_DECAY_DEFAULT, ParameterSpace
from ..trajectory import MAX_SEEDS_PER_STEP, meta_dist
from .base import _random_state, _set_random_state, check_common_hyper, check_hyper
from .mezo import MeZO
from ._seeds import step_seed

VARIANTS = ("sgd", "momentum", "adam")
PROBES = ("virtual", "inplace")
UPDATES = ("inplace", "deferred")
# The virtual probes keep the factors they cast while those fit this fraction of the parameters'
# bytes (lowrank_probe.FactorCache): all of them from about 10M parameters at rank 8 (r (m + n)
# elements per m x n matrix: 4.2% of the 7M `small`, 1.4% of OPT-125m, 0.3-0.4% at d = 4096), with
# room left under the 5% of docs/undo-log.md's memory target for the moments and the logs of
# the in-place parameters.
FACTOR_CACHE = 0.04
# Trajectory meta marker: tau and factors per key (earlier recordings sliced one flat tau per
# param group and seeded the factors by group index; they cannot be replayed with this code).
NOISE_LAYOUT = "per-key"


def factor_seed(base_seed: int) -> int:
    """The seed of the fixed factors: U_j = noise(m r, s, key_j), V_j = noise(n r, s, key_j,
    offset=m r). Depends on the base seed only (not on groups or positions)."""
    return step_seed(base_seed, 0, 0, purpose="factors")


def tau_seed(base_seed: int, step: int, index: int = 0) -> int:
    """The seed of step `step`'s tau (of its probe `index`, n_spsa): tau_j = noise(r_j, s,
    key_j). Distinct from the factor seed and from the dense z seed, so its draws overlap
    neither."""
    return step_seed(base_seed, step, index, purpose="tau")


class TeZONoise(NamedTuple):
    """One probe's noise: the dense seed (1-D parameters) and each group's tau vector."""

    seed: int
    taus: list[torch.Tensor]


def g_tau(grads: Sequence[torch.Tensor], taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tau-space projected gradient (1 / n) sum_k g_k tau_k of n probes (g tau for one)."""
    if len(taus) == 1:
        return grads[0] * taus[0]
    total = (grads[0] / len(taus)) * taus[0]
    for grad, tau in zip(grads[1:], taus[1:]):
        total = total + (grad / len(taus)) * tau
    return total


class TeZO(MeZO):
    """ZO with low-rank noise Z_t = U diag(tau_t) V^T / sqrt(r) on every non-empty 2-D weight.

    Per weight j (m x n, key k_j from its canonical name), with r_j = min(rank, m, n):

        U_j     = noise(m r_j, factor_seed(seed), k_j).view(m, r_j)             fixed
        V_j     = noise(n r_j, factor_seed(seed), k_j, offset=m r_j).view(n, r_j) fixed
        tau_t,j = noise(r_j, tau_seed(seed, t), k_j)                              fresh each step

    pure functions of (seed, step, key): a weight's noise does not change when other parameters
    are frozen, regrouped or renamed by a wrapper (`module.`), and resuming from a state_dict
    draws U, V from the saved seed. Dividing by sqrt(r) gives Z's entries variance 1 (without
    it, r), so eps and lr mean what they mean for MeZO. 1-D parameters (biases, norms) get
    full-size noise and plain ZO-SGD; empty matrices (0 x n) are skipped. With
    g = (l+ - l-) / (2 eps), moments per weight in its r_j-dimensional tau space:

        sgd:      W -= lr g Z_t
        momentum: m = b1 m + (1 - b1) g tau_t;        W -= lr U diag(m) V^T / sqrt(r)
        adam:     m as above, v = b2 v + (1 - b2) (g tau_t)^2,
                  W -= lr U diag(m_hat / (sqrt(v_hat) + delta)) V^T / sqrt(r)   (bias-corrected)

    The update is fused with the restore (one low-rank pass recovers theta from the held -eps Z_t
    and applies the update; they share U and V). rounding="stochastic" applies to that update
    pass (bf16 / fp16 weights; the perturbations round to nearest, which their recovery needs);
    it is refused for sharded 2-D weights (the low-rank kernels draw rounding bits at local
    indices).
    Memory: the optimizer state per matrix is two r-vectors (the moments). Passes and merges
    draw the factors they need from (seed, key) and free them, or take the float32 ones the
    virtual probes' cache keeps; on the cpu backend the kernel draws them (V once per matrix,
    U's rows per work item). Transient scratch: a logged in-place pass, 4 (m + n) r bytes per
    matrix for all of its weights at once (cpu: 4 n r, twice when it recovers); a pass without
    logs, runs of weights whose scratch fits 1% of their bytes and 8 MiB (LowRankSpace.chunks).
    The virtual probes' hooks keep U, V cast to the forward's dtype while they fit
    factor_cache (a fraction of the parameters' bytes, default FACTOR_CACHE = 0.04; 0 draws
    them in every hook call), and draw the rest per call: the same results either way
    (lowrank_probe.FactorCache). The logs of the
    in-place 2-D weights are larger: with exact_restore=True each keeps, per
    perturbation pass, a selector log (a row of 6 / 8 int32 words per 1024 elements plus a
    small pool: about 2.4% of bf16, 1.7% of fp32 weights for the two passes at eps = 1e-3) on
    every backend; see undo_log_bytes. exact_restore=False drops them.
    Restore exactness: as MeZO's, for every parameter. The 2-D weights are moved between
    perturbations by recovery (lowrank_perturb_'s applied_taus / applied_scale), exact from the
    selector log of the pass that wrote them (or made exact by rewriting the undo-logged
    elements afterwards; docs/undo-log.md, "Low-rank groups"), so a failed
    closure or a skipped step leaves every weight bit-identical and the update is computed from
    the exact theta. exact_restore=False drops the logs (recovery quality only).

    probe="virtual" (the default): the 2-D weights read only by exact nn.Linear / nn.Embedding
    forwards are never written by the probes; a forward hook adds the low-rank term
    +-eps x V diag(tau / sqrt(r)) U^T to those modules' outputs (zokernels.lowrank_probe): no pass
    over them, nothing to restore, no undo log. The first step checks it (every read of each
    such weight must be its modules' forward; a weight read anywhere else, e.g. a head that
    reads `weight.t()`, or not read at all stays with the in-place path, and that first step then
    runs once more, one more closure call). The probes see theta + eps Z in the output's
    arithmetic instead of round(theta + eps Z) in the weight's dtype (docs/tezo.md: losses agree
    to float32 rounding in fp32, within the bf16 forward's error in bf16); the update is the
    in-place one, bit for bit.
    probe="inplace": every 2-D weight as described above.
    n_spsa, perturbation_parallel: as MeZO's (TeZO is MeZO's SPSA step over a low-rank target):
    probe k of step t perturbs with z(seed_for(t, k)) and tau(tau_seed(seed, t, k)), all probes
    run first, their losses are averaged over the ranks in ONE all-reduce (8 n_spsa bytes), and
    the 2-D weights take the tau-space step of (1 / n) sum_k g_k tau_k (the moments too).
    update="deferred" (needs probe="virtual"): the virtual weights are not written by the update
    either: W_eff = D W + U diag(a) V^T, a = d a - lr direction / sqrt(r), D = d D (d = 1 - lr wd
    on decayable weights), and `merge()` writes W = round(W_eff) (nearest rounding, also with
    rounding="stochastic", which then applies to the other parameters). Merged automatically
    before the model's state_dict() / load_state_dict(), before a forward of their modules outside
    a step, by this optimizer's state_dict() / load_state_dict() and at the end of finetune();
    reading the parameters directly (p.data, named_parameters()) needs `merge()` first. A merge
    followed by more steps gives the result of never merging up to one rounding per merge.
    """

    algorithm = "tezo"

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 seed: int = 0, dist: str = "gaussian", *, rank: int = 8, variant: str = "sgd",
                 betas: tuple[float, float] = (0.9, 0.999), delta: float = 1e-8,
                 exact_restore: bool = True, backend: str = "auto",
                 rounding: str = "nearest", process_group: Any = None,
                 no_decay: Sequence[str] = NO_DECAY_DEFAULT,
                 record_trajectory: bool = True, probe: str = "virtual",
                 update: str = "inplace", n_spsa: int = 1,
                 perturbation_parallel: bool = False,
                 contract: int = DEFAULT_CONTRACT,
                 factor_cache: float = FACTOR_CACHE) -> None:
        check_common_hyper(lr, eps, weight_decay)
        check_hyper("delta", delta, low_open=True)
        check_hyper("factor_cache", factor_cache, high=1.0)
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {list(PROBES)}, got {probe!r}")
        if update not in UPDATES:
            raise ValueError(f"update must be one of {list(UPDATES)}, got {update!r}")
        if update == "deferred" and probe != "virtual":
            raise ValueError("update='deferred' needs probe='virtual' (the deferred part of a "
                             "weight is evaluated by the virtual probes' hooks)")
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
        self.probe, self.update = probe, update
        self.factor_cache = float(factor_cache)
        # the 2-D weights the probes leave unwritten (virtual), and whether the first step's
        # tracked forward has confirmed them (zokernels.lowrank_probe)
        self._virtual: VirtualLowRank | None = None
        self._virtual_positions: list[list[int]] = []
        self._demoting: list[list[int]] = []
        self._virtual_index: list[torch.Tensor] = []
        self._tracked = False
        self._virtual_abandoned = False  # _abandon_virtual: the trajectory's virtual names stay
        self._in_step = False
        self._merges_recorded = 0
        self._merge_called = False  # merge() since the last record (update="deferred")
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, seed=seed,
                         dist=dist, n_spsa=n_spsa, exact_restore=exact_restore, backend=backend,
                         rounding=rounding, process_group=process_group, no_decay=no_decay,
                         record_trajectory=record_trajectory,
                         perturbation_parallel=perturbation_parallel, contract=contract,
                         probe="inplace")  # its dense part: TeZO probes low-rank (below)

    # The base class builds one ParameterSpace per group over all params; TeZO splits them: the
    # dense space keeps the 1-D ones, the low-rank space the 2-D ones (both held targets).
    def _split_spaces(self) -> None:
        self.lowrank: list[LowRankSpace] = []
        self._lowrank_targets: list[int] = []  # held target of group g's low-rank space
        for g in range(len(self.spaces)):
            self._split_group(g)
        self._build_virtual()

    def _check_added_space(self, space: ParameterSpace) -> None:
        self._check_splittable(space)

    def _group_added(self) -> None:
        self.merge()
        self._split_group(len(self.spaces) - 1)
        self._build_virtual()

    def _check_splittable(self, space: ParameterSpace) -> None:
        if self.rounding != "stochastic":
            return
        two_d, _ = split_by_rank(space)
        sharded = [space.names[j] for j in two_d if space.shards[j] is not None]
        if sharded:
            raise ValueError(f"rounding='stochastic' with sharded 2-D weights ({sharded[:3]}): "
                             "the low-rank kernels draw rounding bits at local indices, so "
                             "shards would not round as the unsharded weight; use "
                             "rounding='nearest'")

    def _split_group(self, g: int) -> None:
        """Param group g's full space -> its low-rank state (the non-empty 2-D weights, with two
        undo logs: the +eps and the -eps pass) and a dense space (the others)."""
        space = self._registered[g]
        self._check_splittable(space)
        two_d, rest = split_by_rank(space)
        state = LowRankSpace(
            [space.names[j] for j in two_d], [space.params[j] for j in two_d],
            [space.keys[j] for j in two_d], [space.decayable[j] for j in two_d], self.rank,
            factor_seed(self.base_seed), self.backend, [space.shards[j] for j in two_d],
            self.contract)
        dense = ParameterSpace([(space.names[j], space.params[j]) for j in rest],
                               keys=[space.keys[j] for j in rest], backend=self.backend,
                               no_decay=self.no_decay, contract=self.contract)
        self.lowrank.append(state)
        self.spaces[g] = dense
        self.held.replace(self._dense_targets[g], DenseTarget(dense))
        self._lowrank_targets.append(self.held.add(state))
        self._target_group.append(g)

    @property
    def _lowrank_logs(self) -> list[tuple[UndoLog, ...]]:
        """The undo logs of each param group's low-rank space (the +eps and the -eps pass)."""
        return [self.held.logs[i] for i in self._lowrank_targets]

    @_lowrank_logs.setter
    def _lowrank_logs(self, pairs: list[tuple[UndoLog, ...]]) -> None:
        for i, pair in zip(self._lowrank_targets, pairs):
            self.held.logs[i] = tuple(pair)

    def _has_shards(self) -> bool:
        return super()._has_shards() or any(
            shard is not None for state in self.lowrank for shard in state.shards)

    # -- virtual probes (zokernels.lowrank_probe) --------------------------------------------------
    def _build_virtual(self) -> None:
        """probe="virtual": every unsharded 2-D weight is a candidate until the next step's tracked
        forward confirms it (the in-place passes take the others)."""
        if self.probe != "virtual":
            return
        positions = [[j for j in range(len(state.weights))
                      if state.shards[j] is None and j not in state._dtensors]
                     for state in self.lowrank]
        parts = [VirtualPart(state, chosen) for state, chosen in zip(self.lowrank, positions)]
        self._virtual = VirtualLowRank(parts, self.backend, cache_bytes=self._factor_cache_bytes)
        self._merges_recorded = 0
        self._tracked = False
        self._virtual_abandoned = False
        self._demoting = [[] for _ in self.lowrank]
        self._set_positions(positions)

    def _factor_cache_bytes(self) -> int:
        """factor_cache x the bytes the parameters hold now (a shard's local ones), asked at each
        probe: a model cast to another dtype gets the budget of its new bytes."""
        local = [local_tensor(p) for space in self._registered for p in space.params]
        return int(self.factor_cache * sum(t.numel() * t.element_size() for t in local))

    def _set_positions(self, positions: list[list[int]]) -> None:
        """The weights at positions[g] of each group's low-rank state are the virtual ones, the
        others in-place (with fresh undo logs when the in-place set changed: the old ones were
        sized for other weights)."""
        indices = []
        for g, (state, chosen) in enumerate(zip(self.lowrank, positions)):
            inplace = [j for j in range(len(state.weights)) if j not in set(chosen)]
            if inplace != state.inplace:
                state.inplace = inplace
                self.held.replace(self._lowrank_targets[g], state)
            indices.append(self._entries(state, chosen))
        self._virtual_positions = [list(chosen) for chosen in positions]
        self._virtual_index = indices
        if self.trajectory is not None and not self._virtual_abandoned:
            self.trajectory.meta["tezo_virtual"] = self._virtual_names()

    def _virtual_names(self) -> list[list[str]]:
        return [[state.names[j] for j in chosen]
                for state, chosen in zip(self.lowrank, self._virtual_positions)]

    def _tracking_result(self, tracker: UseTracker) -> tuple[list[list[int]], list[list[Any]]]:
        """Per group, the candidates' indices (within their part) read only through their
        modules' forwards, and those modules."""
        at, keep, owners = 0, [], []
        for chosen in self._virtual_positions:
            kept, found = [], []
            for k in range(len(chosen)):
                if tracker.readers_only_through_owners(at):
                    kept.append(k)
                    found.append(tracker.owners[at])
                at += 1
            keep.append(kept)
            owners.append(found)
        return keep, owners

    def _confirm(self, keep: list[list[int]], owners: list[list[Any]]) -> None:
        """Keep the confirmed candidates virtual (with their owner modules). The others are
        `_demoting` until _finish_demotion moves them to the in-place path (once no weight holds
        a perturbation): within the tracked step they are read by nobody, so their probe
        perturbation changes no loss either way, and their update is written from theta."""
        self._virtual.restrict(keep, owners)
        self._tracked = True
        kept = [[chosen[k] for k in ks] for chosen, ks in zip(self._virtual_positions, keep)]
        self._demoting = [[j for j in chosen if j not in set(ks)]
                          for chosen, ks in zip(self._virtual_positions, kept)]
        self._virtual_positions = kept
        self._virtual_index = [self._entries(state, chosen)
                               for state, chosen in zip(self.lowrank, kept)]

    def _finish_demotion(self) -> None:
        if not any(self._demoting):
            return
        self._demoting = [[] for _ in self.lowrank]
        self._set_positions(self._virtual_positions)
        if not any(self._virtual_positions):
            self._virtual = None

    @staticmethod
    def _entries(state: LowRankSpace, chosen: list[int]) -> torch.Tensor:
        """The flat tau-space entries of the weights at `chosen`."""
        index = [i for j in chosen for i in range(state.offsets[j], state.offsets[j + 1])]
        return torch.tensor(index, dtype=torch.long, device=state.device)

    def _virtual_coefs(self, taus: list[torch.Tensor], coefs: list[float]) -> list[torch.Tensor]:
        """Per group, scale * tau / sqrt(r) at the virtual weights' entries."""
        return [(tau * state.rank_norm)[index] * coef
                for state, tau, index, coef in zip(self.lowrank, taus, self._virtual_index, coefs)]

    def _probe_loss(self, closure, taus: list[torch.Tensor], coefs: list[float]) -> torch.Tensor:
        """The closure's loss with the virtual weights at W_eff + coefs[g] Z (the in-place
        ones and the dense space already hold their perturbation). The first probe of an
        optimizer also tracks who reads the virtual weights; if some must move to the in-place
        path it raises _Retrack (the step is restored, then run again)."""
        if self._virtual is None:
            return self._evaluate(closure)
        probing = self._virtual.probing(self._virtual_coefs(taus, coefs))
        if self._tracked:
            with probing:
                loss = self._evaluate(closure)
            missed = self._virtual.unhooked()
            # this loss missed their perturbation: in place from now on, run again; with
            # sharded forwards every rank decides so (a rank rerunning alone would hang)
            if not self._on_every_rank(not missed, loss.device):
                self._abandon_virtual(missed or ["a weight whose hook did not run on another "
                                                 "rank"])
                raise _Retrack
            return loss
        tracker = UseTracker(self._virtual.weights())
        with tracker, probing:
            loss = self._evaluate(closure)
        keep, owners = self._tracking_result(tracker)
        self._confirm(keep, owners)
        if tracker.foreign:  # this loss missed their perturbation: restore, then run again
            raise _Retrack
        return loss

    def _abandon_virtual(self, missed: list[str]) -> None:
        """Every virtual weight moves to the in-place path (after the step is restored: _Retrack),
        its pending deferred updates written first. The trajectory keeps naming the weights that
        were virtual: the steps it recorded as deferred deferred theirs; the next ones record
        no deferral."""
        warn(f"TeZO: the forward ran no virtual-probe hook for {len(missed)} weight(s) (e.g. "
             f"{missed[0]}) that the optimizer's first step saw read through their modules, so "
             "this probe missed their perturbation (a torch.compile'd model reuses graphs "
             "compiled before the hooks existed; or the model skipped those modules). TeZO "
             "continues with in-place probes (probe='inplace') and runs this step again.")
        self._virtual.merge()
        self._merge_called = True  # recorded with the next step: replay merges where the run did
        self._virtual_abandoned = True
        self._confirm([[] for _ in self._virtual_positions],
                      [[] for _ in self._virtual_positions])

    def merge(self) -> None:
        """Write the deferred updates (update="deferred"): W = round(D W + U diag(a) V^T) for
        every virtual weight with a pending update, one low-rank pass per param group; a no-op
        otherwise. RuntimeError during a step."""
        if self._step_in_progress():
            raise RuntimeError("merge called during a step (the closure is running)")
        with interrupts_deferred():  # the merge and the record of it (trajectories), together
            self._merge_called = True
            if self._virtual is not None:
                self._virtual.merge()

    @property
    def _merges(self) -> int:
        return 0 if self._virtual is None else self._virtual.merges

    def _trajectory_meta(self) -> dict[str, Any]:
        meta = super()._trajectory_meta()  # every parameter (the full spaces)
        lowrank = []
        for space in self._registered:
            two_d, _ = split_by_rank(space)
            shapes = space.global_shapes()
            lowrank.append({"param_names": [space.names[j] for j in two_d],
                            "keys": [space.keys[j] for j in two_d],
                            "numel": [math.prod(shapes[j]) for j in two_d],
                            # the factors depend on (m, n), not only on m n: a replay onto a
                            # weight of another shape would draw other noise
                            "shapes": [list(shapes[j]) for j in two_d]})
        meta.update(rank=self.rank, variant=self.variant, betas=list(self.betas),
                    delta=self.delta, lowrank=lowrank, noise_layout=NOISE_LAYOUT,
                    tezo_probe=self.probe, tezo_update=self.update)
        if getattr(self, "_virtual_positions", None):
            meta["tezo_virtual"] = self._virtual_names()
        if self.zo_state["step"] > 0 and self.variant != "sgd":
            # a trajectory started at a resumed step: the moments it starts from (O(r) floats per
            # matrix), so that its replay on the checkpoint's weights continues the recursion
            meta["initial_moments"] = {
                "momentum": [s.momentum.tolist() for s in self.lowrank],
                "second": [s.second.tolist() for s in self.lowrank]}
        return meta

    # the probes (virtual or in place) and their weights do not change what a record means
    _RESUME_FREE_META = MeZO._RESUME_FREE_META | {"tezo_probe", "tezo_virtual",
                                                  "initial_moments"}

    def _step_in_progress(self) -> bool:
        return super()._step_in_progress() or self._in_step

    def _extra_columns(self) -> set[str]:
        """As _commit records them: per group its projected gradients and lr, and with
        update="deferred" the merge flags."""
        columns = {f"{name}{g}" for g in range(len(self.param_groups)) for name in ("grad", "lr")}
        columns |= {f"grad{g}_{k}" for g in range(len(self.param_groups))
                    for k in range(1, self.n_spsa)}
        return columns | ({"merge", "deferred"} if self.update == "deferred" else set())

    @property
    def state_numel(self) -> int:
        return sum(s.state_numel for s in self.lowrank)

    def _buffer_bytes(self) -> int:
        """extra_memory_bytes beside the undo logs (dense and low-rank): the moments (float32,
        8 bytes per rank entry) and, with virtual probes, the deferred vectors (8 bytes per rank
        entry) and the factor cache (at most factor_cache x the parameters' bytes). A pass
        draws its factors as transient scratch (LowRankSpace: up to 4 (m + n) r bytes per matrix
        it writes; 4 n r where the cpu kernel draws them)."""
        return 4 * self.state_numel + (0 if self._virtual is None else self._virtual.nbytes)

    def _probe_noise(self, step: int, k: int) -> TeZONoise:
        """Probe k's dense seed and taus (k = 0: the seeds TeZO always drew)."""
        seed = tau_seed(self.base_seed, step, k)
        return TeZONoise(self.seed_for(step, k),
                         [state.taus(seed, self.backend) for state in self.lowrank])

    def _probe_moves(self, noise: TeZONoise, coefs: list[float], layers: list | None) -> list:
        moves = super()._probe_moves(noise.seed, coefs, layers)
        for g, i in enumerate(self._lowrank_targets):
            moves[i] = LowRankNoise(noise.taus[g], coefs[g])
        return moves

    def _step(self, closure) -> torch.Tensor:
        # its dense and low-rank passes each check their own part: the group as a whole first
        self._check_parameters()
        for state in self.lowrank:
            state.check_shapes()
        return super()._step(closure)

    def _probe_eval(self, closure, noise: TeZONoise, coefs: list[float]) -> torch.Tensor:
        return self._probe_loss(closure, noise.taus, coefs)

    def step(self, closure=None) -> torch.Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("TeZO.step needs a closure that returns the loss")
        if self._in_step:  # before the virtual probes' hooks are entered a second time
            self._refuse_nested_step()
        stepping = (contextlib.nullcontext() if self._virtual is None
                    else self._virtual.stepping())
        self._in_step = True
        try:
            with stepping:
                # restored after each _Retrack, the weights read elsewhere (or whose hooks did
                # not run) move to in-place; at most twice: after a fallback nothing is virtual
                for _ in range(2):
                    # the run again starts from the same random state (dropout masks alike)
                    before = _random_state()
                    try:
                        return self._guarded(lambda: self._step(closure))
                    except _Retrack:
                        self._finish_demotion()
                        _set_random_state(before)
                return self._guarded(lambda: self._step(closure))
        finally:
            self._in_step = False
            self._finish_demotion()

    def state_dict(self) -> dict[str, Any]:
        """As ZOOptimizer.state_dict, after merging the deferred updates (update="deferred"), so
        that the model's weights saved beside it are the ones it continues from."""
        if not self._step_in_progress():
            self.merge()
        return super().state_dict()

    def _before_adopting(self) -> None:
        """load_state_dict (ZOOptimizer's: validated first, through the load pre hooks, nothing
        changed on bad input): pending deferred updates are merged into the current weights
        once the state is checked, before it is adopted."""
        self.merge()

    def _virtual_update(self, g: int, update: torch.Tensor, decay: float,
                        rounding_seed: int, zero: bool = False) -> None:
        """The update of group g's virtual weights: deferred (accumulated), or written from the
        unperturbed weights as the in-place pass writes them (zero: the update is all 0)."""
        state = self.lowrank[g]
        written = self._demoting[g]
        if self._adds_nothing(g, decay, zero):  # the virtual (and demoting) weights hold theta
            return
        if self.update == "deferred":
            self._virtual.accumulate(g, (update * state.rank_norm)[self._virtual_index[g]],
                                     decay)
        else:
            written = sorted(written + self._virtual_positions[g])
        state.apply(update, 1.0, decay, self.backend, rounding=self.rounding,
                    rounding_seed=rounding_seed, positions=written,
                    kept=self._virtual.kept_float32(g))

    def _finish_step(self, step: int, noises: list[TeZONoise], losses: torch.Tensor,
                     layers: list | None, chosen: list[int] | None) -> torch.Tensor:
        """MeZO's estimate per probe k, g_k = (l+ - l-) / (2 eps); the 1-D parameters get
        MeZO's update, the 2-D ones the tau-space update of (1 / n) sum_k g_k tau_k."""
        seeds = [noise.seed for noise in noises]
        half_diffs = (losses[:, 0] - losses[:, 1]) / 2
        grads = [half_diffs / group["eps"] for group in self.param_groups]  # [n_spsa] per group
        lrs = [group["lr"] for group in self.param_groups]
        decays = [1.0 - group["lr"] * group["weight_decay"] for group in self.param_groups]
        coefs = [-(lrs[g] / self.n_spsa) * grads[g] for g in range(len(self.param_groups))]
        # The tau-space updates (advancing the moments) before the one host synchronization, so
        # that a projected gradient overflowing float32 anywhere (the losses' difference, the
        # moments, the update) skips the step like a non-finite loss, the moments put back; so
        # does any failure before the update (a warning raised as an error). From here on the
        # step ends whole: the moments, the update and the state that records it (a Ctrl-C
        # waits, zokernels._signals).
        with interrupts_deferred():
            moments = [(s.momentum.clone(), s.second.clone()) for s in self.lowrank]
            try:
                updates = [-lrs[g] * self._direction(
                               state, g_tau(list(grads[g]), [noise.taus[g] for noise in noises]),
                               step)
                           for g, state in enumerate(self.lowrank)]
                finite, zero = self._finite_and_zero(
                    [losses, *coefs, *updates,
                     *(t for s in self.lowrank for t in (s.momentum, s.second))],
                    [*coefs, *updates])
                self._check_logs()
                self._check_parameters()  # the update's passes write them one part at a time
            except BaseException:
                self._put_back(moments)
                raise
            if not finite:
                self._put_back(moments)
                self._skip(losses.reshape(-1), step)
                return losses[0, 0]
            return self._commit(step, seeds, coefs, decays, lrs, grads, updates, losses, zero)

    def _put_back(self, moments: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The moments as they were before this step's tau-space update."""
        for s, (m, v) in zip(self.lowrank, moments):
            s.momentum.copy_(m)
            s.second.copy_(v)

    def _commit(self, step: int, seeds: list[int], coefs: list[Any], decays: list[float],
                lrs: list[float], grads: list[torch.Tensor], updates: list[torch.Tensor],
                losses: torch.Tensor, zero: list[bool]) -> torch.Tensor:
        """The step's update (dense 1-D parameters, low-rank weights in place, the virtual
        ones written or deferred), its trajectory record and step counter. zero: per group,
        whether its dense coefficients, then whether its tau-space update, are all exactly 0
        (_finite_and_zero)."""
        seed = seeds[0]
        groups = len(self.param_groups)
        moves = self._dense_moves(seeds, coefs, None)
        for g, i in enumerate(self._lowrank_targets):
            moves[i] = LowRankNoise(updates[g], 1.0)
        self._apply_update(moves, decays, seed, zero[:groups])
        if self._virtual is not None:
            for g in range(len(self.lowrank)):
                self._virtual_update(g, updates[g], decays[g], seed, zero[groups + g])
        if self.trajectory is not None:
            deferred = {}
            if self.update == "deferred":  # replay follows the merges and the deferred steps
                merged = self._merge_called or self._merges != self._merges_recorded
                deferred = {"merge": float(merged), "deferred": float(self._virtual is not None)}
                self._merges_recorded, self._merge_called = self._merges, False
            columns = {f"grad{g}" + (f"_{k}" if k else ""): grads[g][k]
                       for g in range(len(grads)) for k in range(self.n_spsa)}
            self.trajectory.record(step, seeds, coefs, decays, **columns,
                                   **{f"lr{g}": lrs[g] for g in range(len(lrs))}, **deferred)
        self.zo_state["step"] = step + 1
        return losses[0, 0]

    def _direction(self, state: LowRankSpace, g_tau: torch.Tensor, step: int) -> torch.Tensor:
        """The tau-space update direction from the projected gradient g tau; advances the
        moments."""
        return tezo_direction(self.variant, self.betas, self.delta, state, g_tau, step)

    def _extra_state(self) -> dict[str, Any]:
        return {"rank": self.rank, "variant": self.variant, "betas": list(self.betas),
                "delta": self.delta,
                "momentum": [s.momentum.clone() for s in self.lowrank],
                "second": [s.second.clone() for s in self.lowrank],
                "lowrank_undo_logs": [[log.state_dict() for log in pair]
                                      for pair in self._lowrank_logs],
                "lowrank_log_kinds": [[_log_kind(log) for log in pair]
                                      for pair in self._lowrank_logs]}

    def _check_extra_state(self, extra: dict[str, Any], step: int) -> None:
        """TeZO's state, checked before anything is modified (ValueError naming the entry): rank
        and variant as this optimizer's, betas and delta valid, per param group one float32
        moment vector of the sum of its 2-D weights' ranks (O(r) per matrix to check), and
        valid low-rank log states, with their kinds ("lowrank_log_kinds", "selector" or "undo"
        per log; absent in checkpoints from before the low-rank selector logs: all "undo")."""
        for name in ("rank", "variant", "betas", "delta", "momentum", "second",
                     "lowrank_undo_logs"):
            if name not in extra:
                raise ValueError(f"state_dict extra lacks {name!r}")
        for name, mine in (("rank", self.rank), ("variant", self.variant)):
            if type(extra[name]) is not type(mine) or extra[name] != mine:
                raise ValueError(f"state_dict was saved with {name}={extra[name]!r}, this "
                                 f"optimizer has {name}={mine!r}")
        betas = extra["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"state_dict betas must be a pair, got {betas!r}")
        check_hyper("state_dict betas[0]", betas[0], high=1.0, high_open=True)
        check_hyper("state_dict betas[1]", betas[1], high=1.0, high_open=True)
        check_hyper("state_dict delta", extra["delta"], low_open=True)
        groups = len(self.lowrank)
        for name in ("momentum", "second"):
            vectors = extra[name]
            if not isinstance(vectors, (list, tuple)) or len(vectors) != groups:
                raise ValueError(f"state_dict {name} must hold one vector per param group "
                                 f"({groups}), got {type(vectors).__name__}"
                                 + (f" of {len(vectors)}" if isinstance(vectors, (list, tuple))
                                    else ""))
            for g, (state, v) in enumerate(zip(self.lowrank, vectors)):
                size = state.offsets[-1]
                if (not isinstance(v, torch.Tensor) or v.dtype != torch.float32
                        or tuple(v.shape) != (size,)):
                    got = (f"shape {tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor)
                           else type(v).__name__)
                    raise ValueError(f"state_dict {name}[{g}] must be a float32 vector of shape "
                                     f"({size},) (the sum of the ranks of param group {g}'s 2-D "
                                     f"weights), got {got}")
                if v.device not in (state.device, torch.device("cpu")):
                    raise ValueError(f"state_dict {name}[{g}] is on {v.device}; TeZO's moments "
                                     f"live on {state.device} (a CPU copy loads too)")
                # O(r) values: a NaN / inf (or a negative second moment: the sqrt of it) would
                # be written into every later update
                if not bool(torch.isfinite(v).all()) or (name == "second"
                                                        and bool((v < 0).any())):
                    raise ValueError(f"state_dict {name}[{g}] must hold finite values"
                                     + (" >= 0" if name == "second" else ""))
        logs = extra["lowrank_undo_logs"]
        if not isinstance(logs, (list, tuple)) or len(logs) != groups:
            raise ValueError(f"state_dict lowrank_undo_logs must hold one pair per param group "
                             f"({groups})")
        for g, pair in enumerate(logs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"state_dict lowrank_undo_logs[{g}] must be a pair")
            for k, saved in enumerate(pair):
                UndoLog.check_state(saved, f"state_dict lowrank_undo_logs[{g}][{k}]")
        kinds = extra.get("lowrank_log_kinds", [["undo", "undo"]] * groups)
        if (not isinstance(kinds, (list, tuple)) or len(kinds) != groups
                or any(not isinstance(pair, (list, tuple)) or len(pair) != 2
                       or any(kind not in _LOG_KINDS for kind in pair) for pair in kinds)):
            raise ValueError(f"state_dict lowrank_log_kinds must hold one pair per param group "
                             f"({groups}) of {' / '.join(_LOG_KINDS)}, got {kinds!r}")

    def _adopted_meta(self, state: dict[str, Any]) -> dict[str, Any]:
        extra = state["extra"]
        return {"betas": [float(b) for b in extra["betas"]], "delta": float(extra["delta"])}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """betas and delta restored like the seed, the moments copied, the low-rank logs' sizing
        loaded; U and V drawn from the loaded seed and contract from now on (passes, probes and
        merges draw them when they need them), so a resume into an optimizer built with another
        seed continues the saved run."""
        self.betas = (float(state["betas"][0]), float(state["betas"][1]))
        self.delta = float(state["delta"])
        for s, m, v in zip(self.lowrank, state["momentum"], state["second"]):
            s.momentum.copy_(m)
            s.second.copy_(v)
        kinds = state.get("lowrank_log_kinds", [["undo", "undo"]] * len(self.lowrank))
        for pair, saved_pair, kind_pair in zip(self._lowrank_logs, state["lowrank_undo_logs"],
                                               kinds):
            for log, saved, kind in zip(pair, saved_pair, kind_pair):
                parsed = UndoLog.check_state(saved)
                if kind != _log_kind(log):
                    # sizes in another unit (lost elements vs pool words per element): only the
                    # counters carry over, the log probes its size again
                    parsed.update(fraction={}, passes={})
                log.load_checked_state(parsed)
        for s in self.lowrank:
            s.contract = self.contract
            s.set_factor_seed(factor_seed(self.base_seed), self.backend)


# A low-rank log's kind in a state_dict: its sizing state means pool words per element
# (selector) or lost elements per element (undo).
_LOG_KINDS = ("selector", "undo")


def _log_kind(log: UndoLog) -> str:
    return "selector" if isinstance(log, SelectorLog) else "undo"


class _Retrack(Exception):
    """The first step's tracked forward found weights read outside their modules: restore, move
    them to the in-place path, run the step again."""


def tezo_direction(variant: str, betas: tuple[float, float], delta: float, state: LowRankSpace,
                   g_tau: torch.Tensor, step: int) -> torch.Tensor:
    if variant == "sgd":
        return g_tau
    b1, b2 = betas
    state.momentum.mul_(b1).add_((1 - b1) * g_tau)
    if variant == "momentum":
        return state.momentum.clone()
    state.second.mul_(b2).add_((1 - b2) * g_tau * g_tau)
    t = step + 1
    m_hat = state.momentum / (1 - b1 ** t)
    v_hat = state.second / (1 - b2 ** t)
    return m_hat / (v_hat.sqrt() + delta)


def _check_tezo_replay(trajectory, spaces) -> None:
    """What _replay_tezo reads of a trajectory's meta, checked before it applies anything
    (ValueError naming the field): a hostile file must not steer the moments into NaN (the
    updates themselves are checked finite by _replay_tezo's first pass)."""
    meta = trajectory.meta
    if meta.get("noise_layout") != NOISE_LAYOUT:
        return  # _replay_tezo refuses it before writing
    rank, variant, betas = meta.get("rank"), meta.get("variant"), meta.get("betas")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"TeZO trajectory meta rank must be a positive integer, got {rank!r}")
    if variant not in VARIANTS:
        raise ValueError(f"TeZO trajectory meta variant must be one of {list(VARIANTS)}, got "
                         f"{variant!r}")
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
        raise ValueError(f"TeZO trajectory meta betas must be a pair, got {betas!r}")
    check_hyper("TeZO trajectory meta betas[0]", betas[0], high=1.0, high_open=True)
    check_hyper("TeZO trajectory meta betas[1]", betas[1], high=1.0, high_open=True)
    check_hyper("TeZO trajectory meta delta", meta.get("delta"), low_open=True)
    n_spsa = meta.get("n_spsa", 1)
    if (isinstance(n_spsa, bool) or not isinstance(n_spsa, int)
            or not 1 <= n_spsa <= MAX_SEEDS_PER_STEP):
        raise ValueError(f"TeZO trajectory meta n_spsa must be a positive integer, got "
                         f"{n_spsa!r}")
    missing = [f"grad{g}_{k}" for g in range(len(spaces)) for k in range(1, n_spsa)
               if f"grad{g}_{k}" not in trajectory.extra]
    if missing:
        raise ValueError(f"TeZO trajectory of n_spsa={n_spsa} lacks the columns {missing[:3]}")
    try:
        as_seed(meta.get("base_seed"), "TeZO trajectory meta base_seed")
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    lowrank = meta.get("lowrank")
    if not isinstance(lowrank, list) or len(lowrank) != len(spaces):
        raise ValueError("TeZO trajectory meta lowrank must describe each param group")
    if meta.get("tezo_update") == "deferred":
        virtual = meta.get("tezo_virtual", [[] for _ in spaces])
        if not isinstance(virtual, list) or len(virtual) != len(spaces) or not all(
                isinstance(names, list) and isinstance(group, dict)
                and all(isinstance(name, str) for name in names)
                and set(names) <= set(group.get("param_names") or ())
                for names, group in zip(virtual, lowrank)):
            raise ValueError("TeZO trajectory meta tezo_virtual must name, per param group, "
                             "2-D parameters of its lowrank entry")
        missing = [name for name in ("merge", "deferred") if name not in trajectory.extra]
        if missing:
            raise ValueError(f"TeZO trajectory of update='deferred' lacks the columns {missing}")
    sizes = []
    for g, (group, space) in enumerate(zip(lowrank, spaces)):
        names = group.get("param_names") if isinstance(group, dict) else None
        at = {name: j for j, name in enumerate(space.names)}
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not set(
                names) <= set(at) or len(set(names)) != len(
                names) or any(space.params[at[n]].dim() != 2 for n in names):
            raise ValueError(f"TeZO trajectory meta lowrank[{g}] must name 2-D parameters of "
                             f"param group {g}, each once")
        global_shapes = space.global_shapes()
        shapes = [global_shapes[at[n]] for n in names]
        recorded = group.get("shapes")  # absent in trajectories of earlier versions
        if recorded is not None and (not isinstance(recorded, list) or len(recorded) != len(names)
                                     or any(not isinstance(r, list) or tuple(r) != shape
                                            for r, shape in zip(recorded, shapes))):
            raise ValueError(f"TeZO trajectory meta lowrank[{g}] shapes {recorded!r} are not "
                             f"those of the parameters {[list(s) for s in shapes]} (the "
                             "low-rank noise depends on the shape)")
        sizes.append(sum(min(rank, m, n) for m, n in shapes))
    initial = meta.get("initial_moments")
    if initial is not None:
        for name in ("momentum", "second"):
            vectors = initial.get(name) if isinstance(initial, dict) else None
            if not isinstance(vectors, list) or [len(v) if isinstance(v, list) else -1
                                                 for v in vectors] != sizes or not all(
                    is_finite_number(x) and (name == "momentum" or x >= 0)
                    for v in vectors for x in v):
                raise ValueError(f"TeZO trajectory meta initial_moments {name} must hold "
                                 f"finite values, {sizes} per param group")


def _replay_tezo(trajectory, spaces, backend) -> None:
    """Rebuild a TeZO run: the 1-D parameters from the recorded seeded updates, the 2-D ones by
    re-running the tau-space recursions on the recorded projected gradients, with the run's
    factors, taus and rounding, from zero moments or, for a trajectory started at a resumed step,
    from the moments recorded in its meta ("initial_moments"). The recursions run twice: once
    to check every update finite before anything is written, then to apply them."""
    meta = trajectory.meta
    if meta.get("noise_layout") != NOISE_LAYOUT:
        raise ValueError("this TeZO trajectory was recorded before tau and the factors were drawn "
                         "per tensor key (its noise depended on param-group index and position); "
                         "it cannot be replayed by this version")
    base = meta["base_seed"]
    n_spsa = meta.get("n_spsa", 1)
    betas, delta = (float(meta["betas"][0]), float(meta["betas"][1])), float(meta["delta"])
    rounding, dist = meta.get("rounding", "nearest"), meta_dist(meta)
    states = []
    for space, lowrank in zip(spaces, meta["lowrank"]):
        names = set(lowrank["param_names"])
        two_d = [j for j, n in enumerate(space.names) if n in names]
        states.append(LowRankSpace(
            [space.names[j] for j in two_d], [space.params[j] for j in two_d],
            [space.keys[j] for j in two_d], [space.decayable[j] for j in two_d], meta["rank"],
            factor_seed(base), backend, [space.shards[j] for j in two_d],
            saved_contract(meta)))
    dense = []
    for space, lowrank in zip(spaces, meta["lowrank"]):
        names = set(lowrank["param_names"])
        rest = [j for j, n in enumerate(space.names) if n not in names]
        dense.append(ParameterSpace([(space.names[j], space.params[j]) for j in rest],
                                    keys=[space.keys[j] for j in rest], backend=backend,
                                    no_decay=meta.get("no_decay", ()),
                                    contract=saved_contract(meta)))
    # update="deferred": the virtual weights' updates of the steps marked "deferred" are
    # accumulated and written at the recorded merges (before the step marked "merge") and at the
    # end, as the run wrote them
    deferred = trajectory.extra.get("deferred") if meta.get("tezo_update") == "deferred" else None
    merges = trajectory.extra.get("merge")
    target, virtual, indices = None, [], []
    if deferred is not None:
        parts = []
        for state, names in zip(states, meta.get("tezo_virtual", [[] for _ in states])):
            chosen = [j for j, n in enumerate(state.names) if n in set(names)]
            virtual.append(chosen)
            indices.append(TeZO._entries(state, chosen))
            parts.append(VirtualPart(state, chosen))
        target = VirtualLowRank(parts, backend)
    def updates():
        """Per record, per group, the tau-space update -lr * direction, advancing the moments
        from where the run started them."""
        initial = meta.get("initial_moments")
        for g, state in enumerate(states):
            state.momentum.zero_()
            state.second.zero_()
            if initial is not None:  # a trajectory that starts at a resumed step
                state.momentum.copy_(torch.tensor(initial["momentum"][g], dtype=torch.float32))
                state.second.copy_(torch.tensor(initial["second"][g], dtype=torch.float32))
        for i, (step, *_) in enumerate(trajectory.records()):
            per_group = []
            for g, state in enumerate(states):
                lr = trajectory.extra[f"lr{g}"][i]
                taus = [state.taus(tau_seed(base, step, k), backend) for k in range(n_spsa)]
                grads = [torch.tensor(trajectory.extra[f"grad{g}" + (f"_{k}" if k else "")][i],
                                      dtype=torch.float32).to(taus[0].device)
                         for k in range(n_spsa)]
                direction = tezo_direction(meta["variant"], betas, delta, state,
                                           g_tau(grads, taus), step)
                per_group.append(-lr * direction)
            yield per_group

    # First pass, writing nothing: finite values in the file can still overflow float32 in the
    # recursions, and the run would have skipped such a step rather than record it.
    for i, per_group in enumerate(updates()):
        for g, update in enumerate(per_group):
            if not bool(torch.isfinite(update).all()):
                raise ValueError(f"TeZO trajectory record {i}: the update of param group {g} "
                                 "is not finite (the recorded projected gradients overflow "
                                 "float32); nothing was replayed")
    for i, ((_, seeds, coefs, decays, _), per_group) in enumerate(zip(trajectory.records(),
                                                                      updates())):
        if target is not None and merges[i]:
            target.merge()
        for g, (state, update) in enumerate(zip(states, per_group)):
            written = None
            if target is not None and deferred[i]:
                target.accumulate(g, (update * state.rank_norm)[indices[g]], decays[g])
                written = [j for j in range(len(state.weights)) if j not in set(virtual[g])]
            # the run's update rounding; its stochastic bits come from the step's dense seed
            state.apply(update, 1.0, decays[g], backend, rounding=rounding,
                        rounding_seed=seeds[0], positions=written)
            dense[g].update(seeds, coefs[g], decay=decays[g], dist=dist,
                            rounding=rounding)
    if target is not None:
        target.merge()

