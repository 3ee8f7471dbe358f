"""HeldPerturbation: what the weights hold now, and its moves (docs/undo-log.md).

The one implementation of the exact perturbation protocol, shared by the optimizers
(zokernels.optim) and the MeZO-trainer patch (zokernels.compat). It keeps, per target:

- the perturbation the target's weights hold now (None: they hold theta) and the log slot of
  the pass that wrote it,
- its logs, one per log slot (slot 0: the +eps pass of a step, slot 1: the -eps pass): selector
  logs (dense spaces on cpu / torch: the next pass that recovers from the logged one reads it
  and recovers exactly) or undo logs (Triton, low-rank: the logged elements are rewritten
  after that pass),

and the slots filled since the weights were last exact. Its moves:

    perturb(moves, slot)   theta + move, from theta or by recovery from what is held
    restore()              back to the exact theta (recovery pass, then the undo logs, newest
                           first)
    update(moves, decays)  round(d theta + move) from the exact theta, in one recovering pass
                           plus the undo-logged elements rewritten from their exact values

A target implements `compatible`, `zero`, `write` and `rewrite` over its kind of move (and
optionally `make_log`):

    DenseTarget   over a ParameterSpace       move: SeededNoise(seeds, coefs, layers, dist)
    LowRankSpace  (zokernels.lowrank_space)   move: LowRankNoise(taus, scale)

A target with `writes_probes = False` (zokernels.dense_probe.VirtualDenseTarget) is never
written by perturb or restore: they call its `hold(move)` / `hold(None)`, and the probes read
what it holds; its update is an ordinary pass from theta.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._signals import interrupts_deferred
from .ops.undo import SELECTOR_BACKENDS, LoggedMemoryMoved, SelectorLog, UndoLog
from .space import ParameterSpace

# Log slots per target: MeZO's +eps and -eps passes (restore and update rewrite both).
SLOTS = 2


def _selector(log: Any) -> SelectorLog | None:
    return log if isinstance(log, SelectorLog) else None


def _writes_probes(target: Any) -> bool:
    """False for a target whose probes are evaluated without writing the weights
    (zokernels.dense_probe.VirtualDenseTarget: perturb and restore only set what it `hold`s)."""
    return getattr(target, "writes_probes", True)


@dataclass(frozen=True)
class SeededNoise:
    """sum_k coefs[k] * z(seeds[k]) over a ParameterSpace (its selected layers, LeZO)."""

    seeds: tuple[int, ...]
    coefs: Any  # one per seed: floats, or a float32 tensor (an update's coefficients)
    layers: Any = None
    dist: str = "gaussian"


class DenseTarget:
    """A ParameterSpace as a target of held perturbations."""

    def __init__(self, space: ParameterSpace) -> None:
        # a meta parameter never gets values (torch replaces it, or refuses .data = ...): the
        # optimizers refuse it when built, not at a step
        space.check_materialized()
        self.space = space

    def make_log(self) -> UndoLog:
        """A selector log (a few bits per ambiguous element, read by the next pass, which
        recovers from this one exactly) where every backend of the space has them
        (SELECTOR_BACKENDS: cpu, torch, triton), else an undo log of (index, value) entries
        rewritten after that pass."""
        plan, _ = self.space._full_plan
        if all(group.backend in SELECTOR_BACKENDS for group in plan):
            return SelectorLog()
        return UndoLog()

    def compatible(self, held: SeededNoise, move: SeededNoise) -> bool:
        """Whether a pass of `move` can recover theta from `held` (same layers, its seeds among
        the move's, in order: the recovery regenerates them in the same pass)."""
        if held.layers != move.layers or held.dist != move.dist:
            return False
        try:
            self._applied(held, move)
        except AssertionError:
            return False
        return True

    def zero(self, held: SeededNoise) -> SeededNoise:
        return SeededNoise(held.seeds, [0.0] * len(held.seeds), held.layers, held.dist)

    @staticmethod
    def _applied(held: SeededNoise | None, move: SeededNoise) -> list[float] | None:
        """The held coefficients aligned with the move's seeds (0 for a seed not held): the
        recovery recomputes the held D in the order the pass that wrote it summed it."""
        if held is None:
            return None
        applied = [0.0] * len(move.seeds)
        k = 0  # the held seeds, in order, among the move's (a seed may be in both twice)
        for seed, coef in zip(held.seeds, held.coefs):
            while k < len(move.seeds) and move.seeds[k] != seed:
                k += 1
            if k == len(move.seeds):
                raise AssertionError("the held seeds must be among the seeds of the pass that "
                                     "recovers from them, in the same order")
            applied[k] = coef
            k += 1
        return applied

    def write(self, move: SeededNoise, held: SeededNoise | None = None, *, decay: Any = 1.0,
              rounding: str = "nearest", rounding_seed: int | None = None,
              log: UndoLog | None = None, held_log: UndoLog | None = None) -> None:
        """held_log: the log of the pass that wrote `held` (a selector log makes this pass's
        recovery exact)."""
        self.space.apply(list(move.seeds), move.coefs, layers=move.layers,
                         weight_decay_factor=decay, applied=self._applied(held, move),
                         dist=move.dist, rounding=rounding, rounding_seed=rounding_seed,
                         log=log, held_log=None if held is None else _selector(held_log),
                         check_finite=False)

    def restore(self, held: SeededNoise, held_log: UndoLog | None = None) -> None:
        """Back to theta from `held` (written by the pass of `held_log`). A parameter given
        other memory since that pass (`param.data = ...` in a closure, whatever it assigned:
        another size, dtype, an expanded view, another parameter's memory) keeps what was
        assigned to it while the others are restored exactly where the pass wrote them, without
        checking the parameters again; MovedParameters then names it."""
        selector = _selector(held_log)
        try:
            if selector is not None:
                selector.check_memory("held_log")
        except LoggedMemoryMoved as exc:
            moved = self.space.recover_in_logged_memory(selector, held.seeds, held.coefs,
                                                        held.dist)
            raise MovedParameters(moved) from exc
        self.write(self.zero(held), held, held_log=held_log)

    def rewrite(self, log: UndoLog, move: SeededNoise | None = None, *, decay: Any = 1.0,
                rounding: str = "nearest", rounding_seed: int | None = None) -> None:
        if _selector(log) is not None:
            return  # read by the pass that recovered from its pass: nothing to rewrite
        if move is None:
            self.space.apply_logged(log, check_finite=False)
        else:
            self.space.apply_logged(log, list(move.seeds), move.coefs, weight_decay_factor=decay,
                                    dist=move.dist, rounding=rounding,
                                    rounding_seed=rounding_seed, check_finite=False)


class MovedParameters(RuntimeError):
    """Parameters given other memory while the weights held a perturbation (DenseTarget.restore
    restored the others and left these as assigned)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(f"{', '.join(names)}: given other memory while the weights held a "
                         "perturbation (param.data = ... or model.to(...) inside a step's "
                         "closure?); kept as assigned, the other parameters restored exactly")
        self.names = names


def _partial_update_note(reached: int, count: int, failure: BaseException | None,
                         forced: bool = False) -> str:
    """What an update that failed at target `reached` left behind (HeldPerturbation.update);
    forced: stopped by a second Ctrl-C, target `reached` left as the interrupt found it."""
    if forced and reached == count:
        note = "HeldPerturbation.update stopped by a second Ctrl-C after its last pass"
    elif forced:
        note = (f"HeldPerturbation.update stopped by a second Ctrl-C at target {reached} of "
                f"{count}: targets [0, {reached}) keep the update, target {reached} holds the "
                "update, its perturbation or (written in several kernel calls) a mix of the "
                "two, those after it were restored to the weights before the step")
    else:
        note = (f"HeldPerturbation.update failed at target {reached} of {count}: targets "
                f"[0, {reached}) keep the update; target {reached} and those after it were "
                "restored to the weights before the step, except that a target written in "
                "several kernel calls (one per device and dtype) keeps the calls made before the "
                "failure at neither value")
    if isinstance(failure, MovedParameters):
        note += f"; {failure}"
    elif failure is not None:
        note += f"; the restore failed too: {type(failure).__name__}: {failure}"
    return note


class HeldPerturbation:
    """What the weights of `targets` hold now, and its moves (module docstring).

    exact: keep undo logs (False: recovery only). on_overflow: called once per log whose pass
    overflowed, when its count is read (check_logs, or a restore / update that drops it).
    keep_failed: a target whose restore pass raises keeps its record (and logs), for a later
    restore: where a pass fails before it writes and the weights' memory stays theirs (the
    compat patch); the optimizers' failed steps instead restore the others and name a parameter
    given other memory, which holds what was assigned (base.py)."""

    def __init__(self, targets: Sequence[Any], *, exact: bool = True,
                 on_overflow: Callable[[], None] | None = None,
                 keep_failed: bool = False) -> None:
        self.keep_failed = bool(keep_failed)
        self.targets: list[Any] = []
        self.logs: list[tuple[UndoLog, ...]] = []
        self.held: list[Any] = []
        self.held_slot: list[int | None] = []  # the log slot of the pass that wrote held[i]
        self.live: list[int] = []  # log slots filled since the weights were last exact
        self.exact = bool(exact)
        self.on_overflow = on_overflow
        for target in targets:
            self.add(target)

    def add(self, target: Any) -> int:
        """Register one more target (with fresh logs); returns its index."""
        self.targets.append(target)
        self.logs.append(self._fresh_logs(target))
        self.held.append(None)
        self.held_slot.append(None)
        return len(self.targets) - 1

    def replace(self, index: int, target: Any) -> None:
        """Swap target `index` (fresh logs: the old ones were sized for other weights)."""
        if self.held[index] is not None or self.live:
            raise RuntimeError("a target cannot be replaced while the weights hold a "
                               "perturbation")
        self.targets[index] = target
        self.logs[index] = self._fresh_logs(target)

    @staticmethod
    def _fresh_logs(target: Any) -> tuple[Any, ...]:
        """One log per slot: an UndoLog, or what the target's make_log builds (any object with
        UndoLog's check / clear / plan / nbytes)."""
        make = getattr(target, "make_log", UndoLog)
        return tuple(make() for _ in range(SLOTS))

    def _held_log(self, i: int) -> Any:
        slot = self.held_slot[i]
        return None if self.held[i] is None or slot is None else self.logs[i][slot]

    @property
    def active(self) -> bool:
        """Whether the weights hold a perturbation (or logs of one not yet settled)."""
        return any(h is not None for h in self.held) or bool(self.live)

    @property
    def nbytes(self) -> int:
        return sum(log.nbytes for logs in self.logs for log in logs)

    # -- moves ---------------------------------------------------------------------------------
    def perturb(self, moves: Sequence[Any], slot: int | None) -> None:
        """Move each target to theta + moves[i] (None: leave it), from theta or by recovery from
        what it holds, logging into `slot` (None: no log). A held perturbation no pass can
        recover from (another seed, other layers) is restored exactly first. SIGINT is held
        until it ends: a pass and the record of what it wrote go together."""
        with interrupts_deferred():
            if any(h is not None and m is not None and not t.compatible(h, m)
                   for t, h, m in zip(self.targets, self.held, moves)):
                self.restore()
            logged = self.exact and slot is not None
            if logged and slot not in self.live:
                self.live.append(slot)  # before the pass: a failure inside still restores it
            for i, (target, move) in enumerate(zip(self.targets, moves)):
                if move is None:
                    continue
                if logged and self.held[i] is not None and self.held_slot[i] == slot:
                    raise AssertionError("a pass cannot write the selector log it reads")
                if not _writes_probes(target):
                    target.hold(move)
                else:
                    target.write(move, self.held[i],
                                 log=self.logs[i][slot] if logged else None,
                                 held_log=self._held_log(i))
                # per target: a failure in a later one restores this one
                self.held[i], self.held_slot[i] = move, slot if logged else None

    def declare(self, moves: Sequence[Any]) -> None:
        """The weights hold `moves` now, without logs (the compat patch after an update while
        perturbed: the point they came from was never stored)."""
        self.held = list(moves)
        self.held_slot = [None] * len(self.targets)

    def restore(self, exact: bool = True) -> None:
        """Back to theta: a recovery pass per target holding a perturbation, then (exact) the
        logs rewritten, newest first (an older log holds truer values). exact=False: recovery
        only (the weights were written by someone else meanwhile, the logs predate it)."""
        with interrupts_deferred():  # entered first: the state says what the weights hold
            slots = list(self.held_slot)
            held, held_logs, live = self._take(exact)
            failed: dict[int, BaseException] = {}
            try:
                failed = self._restore_targets(range(len(self.targets)), held, held_logs,
                                               live if exact else [])
                if failed:
                    # a pass fails before it writes (argument checks, allocation): those targets
                    # still hold their perturbation, and their logs stay for a later restore. A
                    # KeyboardInterrupt is a second Ctrl-C (the first is held), which arrives
                    # after a kernel call returns: that target's pass ran.
                    first = next(iter(failed.values()))
                    kept = [i for i, exc in failed.items() if self.keep_failed
                            and not isinstance(exc, KeyboardInterrupt)]
                    for i in kept:
                        self.held[i], self.held_slot[i] = held[i], slots[i]
                    if kept:
                        self.live = list(live)
                    else:
                        failed = {}  # nothing is held any more: the logs are cleared below
                    raise first
            finally:
                if not failed:
                    self.clear_logs()

    def _take(self, exact: bool = True) -> tuple[list[Any], list[Any], list[int]]:
        """What the weights hold (per target), the logs of the passes that wrote it (None
        unless exact) and the live log slots; the state then says the weights hold theta (the
        caller's pass makes that true, inside its held section)."""
        held_logs = [self._held_log(i) if exact else None for i in range(len(self.targets))]
        held, live = self.held, self.live
        self.held, self.held_slot, self.live = [None] * len(held), [None] * len(held), []
        return held, held_logs, live

    def _restore_targets(self, indices: Sequence[int], held: Sequence[Any],
                         held_logs: Sequence[Any], live: Sequence[int]
                         ) -> dict[int, BaseException]:
        """Targets `indices` back to theta from what they held, their `live` log slots rewritten
        newest first; returns the failures by target, in order (a target that fails does not
        keep the others perturbed)."""
        failed: dict[int, BaseException] = {}
        for i in indices:
            target, h = self.targets[i], held[i]
            try:
                if h is not None and not _writes_probes(target):
                    target.hold(None)
                elif h is not None and hasattr(target, "restore"):
                    target.restore(h, held_logs[i])
                elif h is not None:
                    target.write(target.zero(h), h, held_log=held_logs[i])
                for slot in reversed(live):
                    target.rewrite(self.logs[i][slot])
            except BaseException as exc:
                failed[i] = exc
        return failed

    def update(self, moves: Sequence[Any], decays: Sequence[Any], *, rounding: str = "nearest",
               rounding_seed: int | None = None) -> None:
        """theta = round(decays[i] theta + moves[i]) on every target (None: untouched), in ONE
        pass that recovers from the held perturbation, then the logged elements rewritten from
        their exact values: bit for bit the update of the unperturbed weights. Runs no user
        code, with SIGINT held until it ends (zokernels._signals). A target whose pass fails
        (e.g. out of memory) and the ones after it are restored to theta instead: the error
        says which targets kept the update."""
        with interrupts_deferred():  # entered first: the state says what the weights hold
            held, held_logs, live = self._take()
            reached = 0  # the targets before it are updated
            try:
                for target, move, h, decay, held_log in zip(self.targets, moves, held, decays,
                                                            held_logs):
                    if move is not None:
                        target.write(move, h, decay=decay, rounding=rounding,
                                     rounding_seed=rounding_seed, held_log=held_log)
                    reached += 1
            except BaseException as exc:
                # a KeyboardInterrupt here is a second Ctrl-C (the first is held): it arrives
                # after a kernel call returns, so target `reached` may hold either value
                forced = isinstance(exc, KeyboardInterrupt)
                failed = self._restore_targets(
                    range(reached + int(forced), len(self.targets)), held, held_logs, live)
                for i, failure in failed.items():  # still perturbed (recovery alone from
                    if self.keep_failed and not isinstance(failure, KeyboardInterrupt):
                        self.held[i] = held[i]  # here: the logs are cleared)
                if hasattr(exc, "add_note"):
                    exc.add_note(_partial_update_note(reached, len(self.targets),
                                                      next(iter(failed.values()), None), forced))
                raise
            finally:
                try:
                    for slot in reversed(live):
                        for i in range(reached):
                            if moves[i] is not None:
                                self.targets[i].rewrite(self.logs[i][slot], moves[i],
                                                        decay=decays[i], rounding=rounding,
                                                        rounding_seed=rounding_seed)
                finally:
                    self.clear_logs()

    # -- logs ----------------------------------------------------------------------------------
    def _check(self, log: UndoLog) -> None:
        """Read a log's count once (UndoLog.check: an overflow warns and grows the log)."""
        if log.check() and self.on_overflow is not None:
            self.on_overflow()

    def check_logs(self) -> None:
        """Read the logs' counts (with the losses' synchronization): overflow -> warn, grow."""
        for logs in self.logs:
            for log in logs:
                self._check(log)

    def clear_logs(self) -> None:
        """Drop the logs' entries; an overflow not read yet is counted first."""
        for logs in self.logs:
            for log in logs:
                if log.plan is not None:
                    self._check(log)
                    log.clear()
