"""LowRankSpace: the 2-D weights of one param group with fixed factors, as a target of held
perturbations (zokernels.held): W = round(d * theta + scale * U diag(tau) V^T / sqrt(r)).
The factors are a pure function of (seed, key): they are drawn for each pass that needs them
and freed after it, never kept (`factors`).

The space layer's one low-rank front door for the optimizers: TeZO draws tau and moves the
weights through zokernels.held.HeldPerturbation, which calls `write` / `rewrite` here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ._contract import DEFAULT_CONTRACT
from ._dispatch import resolve_backend
from ._validate import meta_parameter_error
from .ops.lowrank import FactorDraw, draw_factors, lowrank_perturb_, run_lowrank_scatter
from .ops.noise import noise
from .ops.undo import SELECTOR_BACKENDS, LoggedMemoryMoved, SelectorLog, UndoLog
from .sharding import is_dtensor, local_tensor
from .space import ParameterSpace


# The scratch of one launch of a pass without logs (the factors of the weights it writes, float32;
# on the cpu backend, whose kernel draws them, its (V diag(tau))^T rows, 4 n r bytes per matrix)
# is kept under FACTOR_FRACTION of those weights' bytes, capped at FACTOR_BUDGET: the factors
# are 1-9% of a matrix's bf16 bytes at rank 8 (4 (m + n) r against 2 m n), so the fraction
# bounds the scratch relative to the model (OPT-125m: 7 MiB of factors, 2.5 MiB runs), and the
# cap cuts a 7B model's 80 MiB into 10 launches of a 13 GB pass, whose launch costs are
# negligible next to it. A weight whose own scratch exceeds the bound is a run by itself.
FACTOR_FRACTION = 0.01
FACTOR_BUDGET = 8 << 20

# Position -> (U, V) in float32 where the caller already holds them (the bits `factors` would
# draw), else None: a pass then draws only the others (TeZO's factor cache, lowrank_probe).
KeptFactors = Callable[[int], Optional[tuple[torch.Tensor, torch.Tensor]]]


class SizedSelectorLog(SelectorLog):
    """A SelectorLog whose pool is also probed before a pass larger than every pass it learned
    its size from. The pool words of a pass grow steeply with the spread of its D: on a
    2048 x 2048 N(0, 0.02) weight, eps = 1e-3, a low-rank pass (rank 8) needs pool words of
    0.01% / 0.11% / 0.43% of the weight's bytes at ||tau|| / sqrt(r) = 0.7 / 1.0 / 1.47 in bf16
    (0.02% / 0.19% / 0.54% in fp32), so a pool sized by earlier passes overflows at the first
    larger tau (TeZO: ||tau|| changes every step), or at the first pass of two held seeds (the
    MeZO-trainer patch's A+1, B+1). The caller gives each pass's size (`expect`: a number, or
    one per (device, dtype) group key): the 4th power of D's standard deviation, a monotone
    stand-in for that growth. A new largest size of a random sequence is a record, so the probes
    are few (about ln(passes) for TeZO's taus, none after the first two for MeZO's loop). A log
    loaded from a state_dict keeps the saved sizing for its first pass (the largest size is not
    saved): that pass's count is learned with its size. Arguments: SelectorLog's."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size: float | dict = 0.0  # the coming pass's size
        self._largest: dict = {}  # per group key, the largest size whose pool words were learned

    def expect(self, size: float | dict) -> None:
        self.size = size

    def _size(self, key) -> float:
        return self.size.get(key, 0.0) if isinstance(self.size, dict) else float(self.size)

    def needs_probe(self, plan) -> bool:
        keys = [self._key(g) for g in plan]
        return super().needs_probe(plan) or any(
            key in self._largest and self._size(key) > self._largest[key] for key in keys)

    def _learn(self, group, count: int) -> None:
        super()._learn(group, count)
        key = self._key(group)
        self._largest[key] = max(self._largest.get(key, 0.0), self._size(key))


@dataclass(frozen=True)
class LowRankNoise:
    """scale * U diag(taus) V^T / sqrt(r) on every weight of a LowRankSpace (taus: the flat
    tau vector of all its weights, in weight order)."""

    taus: torch.Tensor
    scale: Any = 1.0


class LowRankSpace:
    """The 2-D weights of one param group, the seed of their fixed factors and their tau-space
    moments; a target of zokernels.held.HeldPerturbation (moves: LowRankNoise).

    Memory: kept, the two moment vectors (8 bytes per rank entry). Transient, the factors of a
    pass, drawn before its launch and freed after it: a pass that writes or reads a selector
    / undo log (TeZO's in-place probes and the update that recovers from them) draws the
    factors of all its weights, 4 (m + n) r bytes per matrix, as one launch (`perturb`); the
    others (updates without logs, merges) launch per run of weights whose factors fit
    FACTOR_FRACTION of their weights' bytes and `factor_budget` (FACTOR_BUDGET), or one
    weight's factors (`chunks`)."""

    def __init__(self, names: list[str], weights: list[torch.Tensor], keys: list[int],
                 decayable: list[bool], rank: int, seed: int, backend: str,
                 shards: list[Any] | None = None, contract: int = DEFAULT_CONTRACT) -> None:
        """weights: the parameters (DTensors included; the kernels write their local shards);
        shards: per weight None or its zokernels.sharding.Shard (the unsharded shape and the
        box's offset); seed: the factor seed (factor_seed(base seed)); contract: the version of
        the gaussian normals U, V and tau are drawn with."""
        self.contract = contract
        self.names, self.keys = names, keys
        # the parameters as given (DTensors) and what the kernels write (their local shards,
        # looked up again before each pass: a sharding wrapper may swap them)
        self.params = weights
        self._dtensors = [j for j, w in enumerate(weights) if is_dtensor(w)]
        self.weights = [local_tensor(w) for w in weights]
        self.check_materialized()  # the moments live on the weights' device
        self.decayable = decayable
        self.shards = shards if shards is not None else [None] * len(weights)
        self.shapes = [tuple(w.shape) if sh is None else tuple(sh.global_shape)
                       for w, sh in zip(self.weights, self.shards)]
        # the rank rule on the unsharded shape: every rank of a sharded run uses the same r
        self.ranks = [min(rank, m, n) for m, n in self.shapes]
        self.offsets = [0]
        for r in self.ranks:
            self.offsets.append(self.offsets[-1] + r)
        device = weights[0].device if weights else torch.device("cpu")
        self.device = device
        # 1/sqrt(r_j) per tau entry, built once: makes Z's entries unit-variance
        self.rank_norm = torch.tensor([1.0 / math.sqrt(r) for r in self.ranks for _ in range(r)],
                                      dtype=torch.float32, device=device)
        self.momentum = torch.zeros(self.offsets[-1], dtype=torch.float32, device=device)
        self.second = torch.zeros_like(self.momentum)
        # the weights the in-place passes write (all, until TeZO moves some to virtual probes)
        self.inplace = list(range(len(weights)))
        self.factor_budget = FACTOR_BUDGET
        self.set_factor_seed(seed, backend)

    def set_factor_seed(self, seed: int, backend: str) -> None:
        """U_j, V_j are drawn from (seed, key_j) alone when a pass needs them (`factors`):
        nothing is kept, so a new seed (resume, replay) takes effect at the next use."""
        self.factor_seed, self.backend = seed, backend

    def factors(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """U_j, V_j of weight j, drawn now (float32; the caller frees them).

        U_j is rows x r of the unsharded m x r (flat offset row0 * r), V_j cols x r of n x r
        (after U's m * r elements): a shard's block of U diag(tau) V^T is the unsharded one.
        The noise contract makes them the same bits on every backend and at every call."""
        (rows, cols), r = self.weights[j].shape, self.ranks[j]
        return draw_factors(self.factor_seed, self.keys[j], rows, cols, r, *self.factor_offsets(j),
                            device=self.weights[j].device, backend=self.backend,
                            contract=self.contract)

    def factor_offsets(self, j: int) -> tuple[int, int]:
        """Where U_j's and V_j's local rows start in the factor stream of (factor_seed, key_j)."""
        r, (m, _), shard = self.ranks[j], self.shapes[j], self.shards[j]
        row0, col0 = (0, 0) if shard is None else shard.global_offset
        return row0 * r, (m + col0) * r

    def factors_for(self, positions: list[int], kept: KeptFactors | None = None
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The factors of the weights at `positions` (lists of U_j, of V_j), drawn now, or
        kept(j) where it holds them (float32, the bits of a draw: TeZO's factor cache)."""
        pairs = [(None if kept is None else kept(j)) or self.factors(j) for j in positions]
        return [u for u, _ in pairs], [v for _, v in pairs]

    @property
    def us(self) -> list[torch.Tensor]:
        """Every weight's U_j, drawn at each access (see `factors`; a convenience for inspection:
        code that needs one weight's factors calls `factors(j)`)."""
        return self.factors_for(range(len(self.weights)))[0]

    @property
    def vs(self) -> list[torch.Tensor]:
        """Every weight's V_j, drawn at each access (see `factors`)."""
        return self.factors_for(range(len(self.weights)))[1]

    def factor_bytes(self, j: int) -> int:
        """Bytes of U_j and V_j (float32) of the local block of weight j."""
        rows, cols = self.weights[j].shape
        return 4 * (rows + cols) * self.ranks[j]

    def drawn_scratch_bytes(self, j: int) -> int:
        """Bytes of the scratch a kernel drawing weight j's factors keeps for the whole launch:
        (V_j diag(tau))^T, 4 n r (U_j's rows are drawn per work item: 4 r (32768 / n + 2) bytes
        per thread at most, a few KiB for n >= 256)."""
        return 4 * self.weights[j].shape[1] * self.ranks[j]

    def chunks(self, positions: list[int], drawn: bool = False,
               recovering: bool = False) -> list[list[int]]:
        """`positions` cut, in order, into runs whose scratch fits min(factor_budget,
        FACTOR_FRACTION of the bytes of the weights at `positions`) (a run holds at least one
        weight, whatever its size): their factors, or with `drawn` (the kernel draws them) its
        scaled V^T rows, twice for a pass `recovering` from applied taus."""
        budget = min(self.factor_budget, FACTOR_FRACTION * sum(
            self.weights[j].numel() * self.weights[j].element_size() for j in positions))
        copies = 2 if recovering else 1

        def scratch(j: int) -> int:
            return copies * self.drawn_scratch_bytes(j) if drawn else self.factor_bytes(j)
        runs: list[list[int]] = []
        used = 0
        for j in positions:
            size = scratch(j)
            if not runs or used + size > budget:
                runs.append([])
                used = 0
            runs[-1].append(j)
            used += size
        return runs

    def perturb(self, positions: list[int], per_weight: dict[str, list], *, chunked: bool,
                kept: KeptFactors | None = None, **common: Any) -> None:
        """lowrank_perturb_ on the weights at `positions` with their factors drawn for the pass:
        per_weight maps an argument of lowrank_perturb_ to its values in `positions` order
        (taus, decay, applied_taus), `common` holds the others. chunked: one launch per `chunks`
        run, its scratch within the run's bound; else one launch, whose scratch is the factors
        of all of `positions`: what a pass that writes or reads a log must be, since a log holds
        the blocks of one call and the pass that recovers from it must name the same weights in
        the same order. kept: factors already held (`factors_for`)."""
        at = {j: i for i, j in enumerate(positions)}
        drawn = self._draws_in_pass(positions, common.get("backend", "auto"))
        runs = self.chunks(positions, drawn, recovering="applied_taus" in per_weight)
        for run in runs if chunked else [positions]:
            weights = [self.weights[j] for j in run]
            taken = {name: [values[at[j]] for j in run] for name, values in per_weight.items()}
            extra: dict[str, Any] = {}
            if drawn:  # the kernel draws what is not kept (FactorDraw)
                pairs = [None if kept is None else kept(j) for j in run]
                us = [None if pair is None else pair[0] for pair in pairs]
                vs = [None if pair is None else pair[1] for pair in pairs]
                offsets = [self.factor_offsets(j) for j in run]
                extra["draw"] = FactorDraw(self.factor_seed, [u for u, _ in offsets],
                                           [v for _, v in offsets])
            else:
                us, vs = self.factors_for(run, kept)
            lowrank_perturb_(weights, us, vs, keys=[self.keys[j] for j in run],
                             contract=self.contract, **extra, **taken, **common)
            del us, vs  # freed before the next run's factors are drawn

    def runs(self, positions: list[int], backend: str) -> list[list[int]]:
        """The launches of a pass over `positions` without logs (`chunks`, by the scratch of the
        factors or, where the kernel draws them, of its scaled V^T rows)."""
        return self.chunks(positions, self._draws_in_pass(positions, backend))

    def _draws_in_pass(self, positions: list[int], backend: str) -> bool:
        """Whether a pass over `positions` runs on the cpu backend, whose kernel draws the
        factors itself (ops.lowrank.FactorDraw) with the noise of `self.backend` (the same
        bits: the cpu backend's)."""
        devices = {self.weights[j].device for j in positions}  # resolved once per device
        return bool(positions) and all(resolve_backend(b, device) == "cpu"
                                       for device in devices for b in (backend, self.backend))

    def taus(self, seed: int, backend: str) -> torch.Tensor:
        """tau_j = noise(r_j, seed, key_j) for every weight, concatenated in weight order: each
        weight's tau depends on its key only, not on which other weights are registered."""
        if not self.weights:
            return self.momentum
        return torch.cat([noise(r, seed, key, device=self.device, backend=backend,
                                contract=self.contract)
                          for r, key in zip(self.ranks, self.keys)])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def _per_weight(self, taus: torch.Tensor) -> list[torch.Tensor]:
        """The flat tau vector scaled by 1/sqrt(r_j) and split per weight. Elementwise, so the
        same taus give the same bits in every pass (a recovery needs the writer's exact D)."""
        return self.split(taus * self.rank_norm)

    def check_materialized(self) -> None:
        """Refuse meta weights (ValueError naming the first): they hold no values, and the
        moments and factors would be made on the meta device."""
        for j, w in enumerate(self.weights):
            if w.is_meta:
                raise meta_parameter_error(f"weight {self.names[j]}")

    def check_shapes(self) -> None:
        """Refuse (ValueError naming it) a weight whose shape changed since it was registered
        (param.data = a tensor of another shape): its rank, factors' offsets, moments and the
        trajectory's recorded shape are the registered shape's, and would draw other noise."""
        self._refresh()
        for j, (w, shard) in enumerate(zip(self.weights, self.shards)):
            if shard is None and tuple(w.shape) != self.shapes[j]:
                raise ValueError(f"weight {self.names[j]} is {tuple(w.shape)}, it was "
                                 f"{self.shapes[j]} when the optimizer was built (its rank, "
                                 "factors and moments are that shape's): build a new optimizer "
                                 "for a resized weight")

    def _refresh(self) -> None:
        for j in self._dtensors:
            self.weights[j] = local_tensor(self.params[j])

    def _decays(self, decay: float) -> list[float]:
        return [decay if d else 1.0 for d in self.decayable]

    def apply(self, taus: torch.Tensor, scale: Any, decay: float, backend: str, *,
              applied: tuple[torch.Tensor, float] | None = None,
              log: UndoLog | None = None, held_log: SelectorLog | None = None,
              rounding: str = "nearest", rounding_seed: int = 0,
              positions: list[int] | None = None, kept: KeptFactors | None = None) -> None:
        """W = round(d * theta + scale * U diag(tau) V^T / sqrt(r)) for the weights at
        `positions` (default: self.inplace), d = decay on decayable weights: one launch with
        a log or held_log, else one per `chunks` run (`perturb`: the factors' scratch). The
        1/sqrt(r) makes Z's entries unit-variance. theta = W, or with applied = (held taus, held
        scale) the weight recovered from the perturbation W holds now, exactly with `held_log`
        (the SelectorLog of the pass that wrote it, over the same positions); `log` (a
        SelectorLog, or an UndoLog) keeps what a later recovery of this pass needs or would
        miss. rounding: of the write (stochastic: updates only, bits from stream 1 of
        rounding_seed, the rule of the space's contract: 3 integer, else uniform-based; refused
        on sharded weights, whose bits would be drawn at local indices). kept: factors already
        held (`factors_for`). taus (and applied taus) cover every weight."""
        pick = self.inplace if positions is None else positions
        if not pick:
            return
        for name, t in (("taus", taus),) + (() if applied is None else (("applied taus",
                                                                         applied[0]),)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (self.offsets[-1],):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be one vector of the {self.offsets[-1]} entries "
                                 f"of every weight's tau (the sum of their ranks), got {got}")
        if rounding == "stochastic" and any(self.shards[j] is not None for j in pick):
            raise ValueError("rounding='stochastic' on sharded weights: the low-rank op draws "
                             "its rounding bits at local indices, not the unsharded ones")
        self._refresh()
        if isinstance(log, SizedSelectorLog):
            log.expect(self._sizes(taus, scale, pick))
        per_weight = {"taus": _take(self._per_weight(taus), pick),
                      "decay": _take(self._decays(decay), pick)}
        held: dict = {}
        if applied is not None:
            per_weight["applied_taus"] = _take(self._per_weight(applied[0]), pick)
            held = dict(applied_scale=applied[1], held_log=held_log)
        logged = log is not None or held.get("held_log") is not None
        self.perturb(pick, per_weight, chunked=not logged, kept=kept, scale=scale,
                     backend=backend, rounding=rounding, rounding_seed=rounding_seed,
                     check_finite=False, log=log, **held)

    def _sizes(self, taus: torch.Tensor, scale: Any, pick: list[int]) -> dict:
        """Per (device, dtype) of the weights at `pick`: the size of a pass (SizedSelectorLog),
        the mean over their elements of (|scale| ||tau_j|| / sqrt(r_j))^4 (the standard
        deviation of D = scale U diag(tau_j) V^T / sqrt(r_j) for unit-variance U, V)."""
        squares = (taus.detach().float() * self.rank_norm) ** 2
        norms = [float(v) for v in torch.stack([squares[self.offsets[j]:self.offsets[j + 1]].sum()
                                                for j in pick]).tolist()]
        factor = float(scale) ** 4
        totals: dict = {}
        for j, norm in zip(pick, norms):
            w = self.weights[j]
            total, count = totals.get((w.device, w.dtype), (0.0, 0))
            totals[(w.device, w.dtype)] = (total + w.numel() * norm * norm * factor,
                                           count + w.numel())
        return {key: total / max(1, count) for key, (total, count) in totals.items()}

    def apply_logged(self, log: UndoLog, taus: torch.Tensor | None = None, scale: float = 0.0,
                     decay: float = 1.0, rounding: str = "nearest",
                     rounding_seed: int = 0) -> None:
        """Rewrite the elements `log` holds (logged by in-place passes over self.inplace): taus
        None puts their logged values back bit for bit (restore); else W = round(d * logged +
        scale * U diag(tau) V^T / sqrt(r)) (update, with the update pass's rounding and
        rounding_seed: the same bits as that pass)."""
        pick = self.inplace
        if not pick or log.plan is None:
            return
        us, vs = self.factors_for(pick)  # the logged pass's weights: one scatter, all factors
        run_lowrank_scatter(log, us, vs,
                            None if taus is None else _take(self._per_weight(taus), pick),
                            torch.tensor([scale], dtype=torch.float32),
                            torch.tensor(_take(self._decays(decay), pick), dtype=torch.float32),
                            rounding, rounding_seed, contract=self.contract)

    # -- the target interface of zokernels.held ------------------------------------------------
    def make_log(self) -> UndoLog:
        """A selector log where every weight's backend has them (SELECTOR_BACKENDS: cpu, torch,
        triton): the pass that recovers from the logged one reads it and is exact; else an undo
        log of (index, value) entries rewritten after that pass."""
        if all(resolve_backend(self.backend, w.device) in SELECTOR_BACKENDS
               for w in self.weights):
            return SizedSelectorLog()
        return UndoLog()

    def compatible(self, held: LowRankNoise, move: LowRankNoise) -> bool:
        return True  # the kernels take the held taus apart from the new ones

    def zero(self, held: LowRankNoise) -> LowRankNoise:
        return LowRankNoise(held.taus, 0.0)

    def write(self, move: LowRankNoise, held: LowRankNoise | None = None, *, decay: float = 1.0,
              rounding: str = "nearest", rounding_seed: int | None = None,
              log: UndoLog | None = None, held_log: Any = None) -> None:
        """held_log: the log of the pass that wrote `held` (a selector log makes this pass's
        recovery exact; an undo log is rewritten after it, `rewrite`). A weight given other
        memory since that pass: LoggedMemoryMoved naming it, nothing written (the other weights
        keep the perturbation they hold: low-rank passes have no stand-in recovery)."""
        try:
            self.apply(move.taus, move.scale, decay, self.backend,
                       applied=None if held is None else (held.taus, held.scale), log=log,
                       held_log=held_log if isinstance(held_log, SelectorLog) else None,
                       rounding=rounding, rounding_seed=rounding_seed or 0)
        except LoggedMemoryMoved as exc:
            moved = {id(t) for t in held_log.moved()}
            names = [n for n, w in zip(self.names, self.weights) if id(w) in moved]
            others = [n for n, w in zip(self.names, self.weights) if id(w) not in moved]
            raise LoggedMemoryMoved(
                f"{', '.join(names) or 'a weight'}: given other memory while the weights held "
                "a low-rank perturbation (param.data = ... inside a step's closure?); nothing "
                f"was written; the other weights ({', '.join(others) or 'none'}) still hold "
                "it") from exc

    def rewrite(self, log: UndoLog, move: LowRankNoise | None = None, *, decay: float = 1.0,
                rounding: str = "nearest", rounding_seed: int | None = None) -> None:
        if isinstance(log, SelectorLog):
            return  # read by the pass that recovered from its pass: nothing to rewrite
        if move is None:
            self.apply_logged(log)
        else:
            self.apply_logged(log, move.taus, move.scale, decay, rounding, rounding_seed or 0)

    @property
    def state_numel(self) -> int:
        """Optimizer state elements: the two moment vectors (2 r per matrix). The factors are
        not state: each pass, probe and merge draws the ones it needs (`factors`)."""
        return self.momentum.numel() + self.second.numel()


def _take(values: list, positions: list[int]) -> list:
    return values if len(positions) == len(values) else [values[j] for j in positions]


def split_by_rank(space: ParameterSpace) -> tuple[list[int], list[int]]:
    """Positions of the non-empty 2-D tensors (low-rank noise) and of the others (full noise).
    An empty matrix (0 x n) has nothing to perturb (and no rank r >= 1): the dense space skips it.
    Emptiness is judged on the unsharded shape: an empty local shard of a non-empty weight stays
    low-rank (its tau and moments are the other ranks')."""
    numels = space.global_numels()
    two_d = [j for j, t in enumerate(space.params) if t.dim() == 2 and numels[j] > 0]
    chosen = set(two_d)
    return two_d, [j for j in range(len(space.params)) if j not in chosen]
