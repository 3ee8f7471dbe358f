"""patch_mezo_trainer: fused zo_perturb_parameters / zo_update for trainers that follow MeZO's
`large_models/trainer.py` convention.

The trainer is expected to have `named_parameters_to_optim` (list of (name, param)),
`zo_random_seed`, `projected_grad`, `args.zo_eps`, `args.weight_decay`, `_get_learning_rate()`
and, optionally, `lr_scheduler`. Patching replaces, on that object only, exactly these two
methods, with exactly MeZO's semantics (z from the zokernels noise contract, seed = the seed the
trainer passes, key = the parameter's canonical name, instead of torch.normal after
torch.manual_seed):

    zo_perturb_parameters(random_seed=None, scaling_factor=1)
        theta += scaling_factor * args.zo_eps * z(random_seed or zo_random_seed)
    zo_update(model)
        theta -= lr * (projected_grad * z(zo_random_seed) + weight_decay * theta)
        (no decay on names containing bias / layer_norm / layernorm), then lr_scheduler.step()

Any sequence of calls composes as in the original: perturbations are additive, each seed's z is
regenerated, and zo_update acts on the weights as they are (perturbed or not). The patch tracks
the perturbation the weights hold as a list of (seed, coefficient) pairs, coefficients summed per
seed, so each call is ONE fused pass per (device, dtype) group over all held seeds (recovery with
`applied=` the held coefficients, docs/noise-contract.md), and a seed whose coefficients sum back
to 0 leaves the list.

Exactness. When every held coefficient is back to 0 the weights are bit for bit what they were
when they last held no perturbation (the start, or the result of a zo_update with nothing held;
a zo_update while perturbations are held breaks this chain, see below), in every dtype, for
MeZO's +1, -2, +1 as for A+1, B+1, A-1, B-1 or any other sequence (recovery plus, with
exact_restore=True, selector logs on every backend, read by the pass that recovers from the
logged one: about 3.7% of bf16 / 2.5% of fp32 N(0, 0.02) parameters for two at zo_eps = 1e-3;
docs/undo-log.md). In between, the weights equal the original's
theta + sum_k c_k z_k up to float32 rounding (one rounding per call; the original rounds at least
once per call too). Logs: two between returns to theta (MeZO's loop needs two); a third call in
a row that does not bring every coefficient back to 0 first restores exactly (one extra pass) and
then applies the whole held perturbation from theta in one pass, so memory stays that of two logs
(docs/undo-log.md, "Capacity").

Cost of held seeds. A pass reads and writes every parameter once whatever the number K of seeds
in it (held seeds, plus the new one), but draws K noise streams, so its random-number work grows
linearly with K: on a 2-core EPYC, one pass over 4M fp32 weights takes 24 ms with K = 1, 36 ms
with 2, 60 ms with 4, 112 ms with 8; on a GPU one gaussian stream is at the memory limit and
K > 1 is compute-bound (docs/gpu-performance.md). At most `max_held_seeds` (default 8) distinct seeds
can be held at once; a call that would hold more raises ValueError before anything is written.
zo_update while perturbations are held runs K + 1 seeds in its pass.

zo_update while a perturbation is held (the original updates the perturbed weights):

    decayed parameters:     theta <- decay * (theta + sum_k h_k z_k) - lr * g * z_u
    other parameters:       theta <- theta + sum_k h_k z_k - lr * g * z_u
                            (decay = 1 - lr * weight_decay)

as one pass with seeds = held seeds + the update seed, scales = (decay * h_k ..., -lr * g) (the
undecayed parameters' pass has h_k), recovering theta first with applied = h_k (exactly from the
selector logs, or with the undo logs rescattered with the same update), so the result is exactly
that formula applied to the exact theta (rounded once); when the two classes need different
scales and a log covers both, the weights are restored exactly first and updated from theta (two
passes). Afterwards the held
perturbation is decay * h_k on the decayed parameters and h_k on the others: undoing it later
gives back `decay * theta - lr * g * z_u` (resp. `theta - lr * g * z_u`) to within one rounding,
not bit for bit: that point was never stored. While the two classes hold different coefficients
(weight_decay != 0 and a perturbation held across an update), each pass runs once per class (two
launches per group instead of one).

fuse_restore_update=True (opt-in): the call that brings every held coefficient back to 0 (MeZO's
third zo_perturb_parameters of a step) is deferred and fused into the next zo_update: three passes
per step instead of four. Safe only when nothing reads or writes the weights between the end of
zo_step and zo_update (no evaluation, checkpoint, or other perturbation in between; MeZO's
training loop calls them back to back). A deferred restore is carried out before any other
perturbation, when named_parameters_to_optim changes, before any torch.optim optimizer steps
(a global optimizer step pre-hook, see below), by `unpatch_mezo_trainer`, and by
`trainer.zo_restore_pending()`.

What the patch refuses (MeZOProtocolError, a RuntimeError; the weights are then left at the
unperturbed theta, see "Refusals" below for the one case where that cannot be exact).

At patch time, from the code of the trainer's methods (their code objects' referenced names,
nested functions included; nothing is run), `check_protocol=True` (default) refuses a trainer
whose methods are not MeZO's:
- zo_perturb_parameters or zo_update referencing names MeZO's do not (masks, Hessian scaling,
  another noise helper, momentum / window state, args.learning_rate...): semantics the patch
  would silently drop;
- a zo_update that never touches named_parameters_to_optim / projected_grad (ZO-Bench's only
  steps the scheduler): patched, it would add an update the trainer never makes;
- a zo_step that draws noise, steps an optimizer or writes the weights itself (ZO-Bench's
  torch.manual_seed + torch.normal + self.optimizer.step()): two updates per step, two z;
- any other method that draws noise for named_parameters_to_optim (PseuZO's reference:
  pzo_perturb_parameters / pzo_update / set_grad_data; ZO-Bench's module-wise and conservative
  steps): the trainer trains through code the patch never sees.
Classes of the transformers / torch packages are not scanned (the stock Trainer draws no z).
check_protocol=False skips this (for a trainer known to follow the protocol); the run-time checks
stay.

At run time, at no cost beyond reading each patched tensor's version counter and address (no
pass over the weights; about 0.3 us per tensor on a 2-core EPYC: 0.2 ms for OPT-13B's 644
tensors, 1.6 ms for 5000 LoRA tensors, six times in MeZO's step):
- weights written by someone else while the patch expects them untouched: while a perturbation
  is held or a restore deferred, and between the call that brings a zo_step's perturbations
  (random_seed=None, MeZO's zo_step) back to theta and zo_update. Detected through
  `tensor._version` (every in-place op on the parameter: optimizers, copy_, add_) and the
  tensor's address (`param.data = ...`). Writes through `param.data.add_(...)` bypass the
  version counter and are NOT detected. The counter belongs to the storage: parameters that
  are views of one buffer (a flat parameter buffer) see every write to that buffer, also to
  parts the patch does not hold, and the patch then refuses as if they had been written (a
  false alarm; the held perturbation is removed by recovery, within float32 rounding).
- with fuse_restore_update=True, zo_update not called after such a zo_step: the next zo_step's
  first perturbation carries the deferred restore out and refuses (the weights sat at
  theta - eps z past the step, where an evaluation or a checkpoint may have read them). Without
  fusion a zo_step without zo_update leaves the weights at theta, as MeZO's own methods do, and
  is served (the patch cannot tell it from a caller probing perturbations).
- with fuse_restore_update=True, a torch.optim optimizer stepping while a restore is deferred:
  a global optimizer step pre-hook (registered only while a restore is deferred, holding the
  patch weakly) carries the restore out first, exactly, so a foreign optimizer never steps on
  theta - eps z; if it wrote the patched weights, the following zo_update refuses, the weights
  being exactly theta + that optimizer's update. An optimizer of other parameters (a head
  trained by backprop) changes nothing: the step then costs the one pass fusion saved.
After a refusal, every patched method raises until `unpatch_mezo_trainer(trainer)`.

Refusals and the weights. A refusal leaves the weights at theta (the unperturbed weights, with
whatever another writer applied to them), bit for bit, with one exception:
a foreign write while the weights held a perturbation (explicitly, or a deferred restore that no
optimizer hook caught). The perturbation is then removed by recovery only (theta + the foreign
change, within float32 rounding of the noise): the undo logs hold values from before the foreign
write and would undo it on the logged elements.

Invalid values (a non-integer seed or one outside torch.manual_seed's range [-2^63, 2^64); a
non-finite scaling_factor, zo_eps, lr, weight_decay or projected_grad; a coefficient beyond
float32's range: scaling_factor * zo_eps, a seed's held sum, lr * projected_grad, 1 - lr *
weight_decay) raise TypeError / ValueError naming them and change nothing but a deferred
restore, which is carried out first (the weights never stay at theta - eps z). MeZO, given a
non-finite projected_grad, writes NaN into every weight and carries on; the patch refuses that
zo_update instead (no weight written, scheduler not stepped, the weights at theta) and stays
usable: the caller may catch the ValueError and go on with the next step.

The run-time checks cannot see semantics the patch never runs (a z scaled or masked per parameter
by code outside the patched methods). Use zokernels.optim (MeZO, LeZO, TeZO, PseuZO) or
ParameterSpace for algorithms other than MeZO's.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass
import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .._contract import PERTURB_DISTS
from .._dispatch import BACKEND_CHOICES
from .._signals import interrupts_deferred
from .._validate import as_choice, fits_float32
from .._warn import warn
from ..held import DenseTarget, HeldPerturbation, SeededNoise
from ..lowrank_space import SizedSelectorLog
from ..ops.undo import SelectorLog, UndoLog
from ..space import NO_DECAY_DEFAULT, ParameterSpace
from .protocol import MeZOProtocolError
from .protocol import check_protocol as check_protocol_of

_STATE = "_zokernels_patch"
_METHODS = ("zo_perturb_parameters", "zo_update", "zo_restore_pending")
# Logs between two returns to theta: MeZO's +1, -2 needs two; more would only buy a pass in
# sequences MeZO's loop never makes, at the memory of one more log each.
_LOGGED_PASSES = 2
# A coefficient this small relative to eps is the float residue of +1, -2, +1: exactly 0.
_ZERO = 1e-12
# The largest perturbation coefficient (scaling_factor * zo_eps) a call may apply: beyond
# float32's range every weight would overflow, and the logs' sizing (coefficients to the 4th
# power) overflows from about 1e77.
_MAX_COEF = float(torch.finfo(torch.float32).max)
_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr

Coefs = dict[bool, list[float]]  # per decay class (True: weight decay applies), one per seed


@dataclass(frozen=True)
class ClassedNoise:
    """sum_k coefs[c][k] z(seeds[k]) on the parameters of decay class c."""

    seeds: tuple[int, ...]
    coefs: Coefs
    dist: str


class _ClassLogs:
    """One log slot of _ClassedTarget: a log per pass kind (None: one pass over both classes, or
    a class), kept across steps (each learns its size), and the kinds the last pass used. Each
    is what DenseTarget.make_log builds for its parameters: a selector log on cpu / torch (read
    by the pass that recovers from this one), an undo log on triton (rewritten after it)."""

    def __init__(self, state: "_PatchState") -> None:
        self.state = state
        self.by_tag: dict[bool | None, UndoLog] = {}
        self.used: list[bool | None] = []

    def begin(self, tag: bool | None, move: SeededNoise) -> UndoLog:
        """The log of a pass of `move` over the parameters of `tag`."""
        self.used.append(tag)
        fresh = DenseTarget(self.state.space_of(tag)).make_log()
        if isinstance(fresh, SelectorLog):
            fresh = SizedSelectorLog()  # held seeds make bigger D than MeZO's loop: probe then
        if type(self.by_tag.get(tag)) is not type(fresh):  # new, or the backend changed
            self.by_tag[tag] = fresh
        log = self.by_tag[tag]
        if isinstance(log, SizedSelectorLog):  # D's variance: the sum of the squared coefs
            log.expect(sum(float(c) ** 2 for c in move.coefs) ** 2)
        return log

    def selectors(self) -> dict[bool | None, SelectorLog]:
        """The selector logs of the last pass, by kind ({}: none, or undo logs)."""
        return {tag: self.by_tag[tag] for tag in self.used
                if isinstance(self.by_tag[tag], SelectorLog)}

    @property
    def plan(self) -> Any:
        return True if self.used else None  # HeldPerturbation clears a log with a plan

    def check(self) -> bool:
        return any([self.by_tag[t].check() for t in self.used])

    def clear(self) -> None:
        for tag in self.used:
            self.by_tag[tag].clear()
        self.used = []

    @property
    def nbytes(self) -> int:
        return sum(log.nbytes for log in self.by_tag.values())


class _ClassedTarget:
    """The patched parameters as one held target (zokernels.held) whose moves hold coefficients
    per decay class: ONE pass over all of them while the classes' coefficients agree (weight
    decay 0, or nothing held across an update), one pass per class otherwise."""

    def __init__(self, state: "_PatchState") -> None:
        self.state = state

    def make_log(self) -> _ClassLogs:
        return _ClassLogs(self.state)

    def compatible(self, held: ClassedNoise, move: ClassedNoise) -> bool:
        return True  # the patch always passes the held seeds first

    def zero(self, held: ClassedNoise) -> ClassedNoise:
        return ClassedNoise(held.seeds, {c: [0.0] * len(held.seeds) for c in held.coefs},
                            held.dist)

    def uniform(self, *moves: ClassedNoise | None) -> bool:
        first = self.state.classes[0]
        return all(m is None or m.coefs[c] == m.coefs[first]
                   for m in moves for c in self.state.classes)

    def _passes(self, *moves: ClassedNoise | None,
                per_class: bool = False) -> list[tuple[DenseTarget, bool | None, bool]]:
        """(target, log tag, class) per pass."""
        if self.uniform(*moves) and not per_class:
            return [(DenseTarget(self.state.space), None, self.state.classes[0])]
        return [(DenseTarget(self.state.part(c)), c, c) for c in self.state.classes]

    @staticmethod
    def _of(move: ClassedNoise | None, cls: bool) -> SeededNoise | None:
        return None if move is None else SeededNoise(move.seeds, move.coefs[cls], None,
                                                     move.dist)

    def write(self, move: ClassedNoise, held: ClassedNoise | None = None, *, decay: Any = 1.0,
              rounding: str = "nearest", rounding_seed: int | None = None,
              log: _ClassLogs | None = None, held_log: _ClassLogs | None = None) -> None:
        """held_log: the slot of the pass that wrote `held`. Its selector logs are read by the
        passes over the same parameters: per class when it was written per class. (A log over
        all of them cannot be read per class: _PatchState.update restores exactly first.)"""
        held_selectors = {} if held is None or held_log is None else held_log.selectors()
        per_class = bool(held_selectors) and None not in held_selectors
        passes = self._passes(move, held, per_class=per_class)
        if None in held_selectors and passes[0][1] is not None:
            raise AssertionError("a selector log over all parameters read per class")
        for target, tag, cls in passes:
            part = self._of(move, cls)
            target.write(part, self._of(held, cls), decay=decay,
                         log=None if log is None else log.begin(tag, part),
                         held_log=held_selectors.get(tag))

    def rewrite(self, log: _ClassLogs, move: ClassedNoise | None = None, *, decay: Any = 1.0,
                rounding: str = "nearest", rounding_seed: int | None = None) -> None:
        for tag in log.used:  # selector logs: nothing to rewrite (DenseTarget.rewrite)
            cls = self.state.classes[0] if tag is None else tag
            DenseTarget(self.state.space_of(tag)).rewrite(log.by_tag[tag], self._of(move, cls),
                                                          decay=decay)


def _real(value: Any, what: str) -> float:
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{what} must be a real number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{what} must be finite, got an integer beyond float range") from None
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor without a value
        raise TypeError(f"{what} must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {number}")
    return number


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):  # bool("False") is True
        raise TypeError(f"{what} must be a bool, got {value!r}")
    return value


def _substrings(value: Any, what: str) -> tuple[str, ...]:
    """A sequence of non-empty name substrings (a str would be split into its letters)."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of name substrings, e.g. ('bias',), got "
                        f"{value!r}")
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{what} must be a sequence of name substrings, got "
                        f"{type(value).__name__}") from None
    for item in items:
        if not isinstance(item, str) or not item:  # "" is in every name: nothing would decay
            raise ValueError(f"{what} entries must be non-empty strings, got {item!r}")
    return items


def _seed(value: Any, what: str) -> int:
    """An integer seed in torch.manual_seed's range [-2^63, 2^64), negatives mapped as it maps
    them; TypeError for a non-integer (2.5 as a numpy or tensor scalar too: truncating it would
    reuse seed 2's noise), ValueError outside the range (2^64 + 2 would be seed 2's)."""
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{what} must be an integer seed, got {value!r}")
    try:
        seed = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer seed, got {value!r} "
                        f"({type(value).__name__})") from None
    if not -(1 << 63) <= seed < 1 << 64:
        raise ValueError(f"{what} must be in [-2^63, 2^64) (torch.manual_seed's range), got "
                         f"{seed}")
    return seed & ((1 << 64) - 1)


def _check_coefs(values: Any, what: str) -> None:
    """ValueError naming `what` unless every value is finite in float32 (checked before a pass:
    one refused inside it would restore what the weights hold)."""
    for value in values:
        if not fits_float32(value):
            raise ValueError(f"{what} must be at most {_MAX_COEF:.4g} in magnitude (float32's "
                             f"range), got {value!r}")


class _PatchState:
    def __init__(self, fuse: bool, backend: str, dist: str, exact_restore: bool,
                 no_decay: tuple[str, ...], max_held_seeds: int) -> None:
        self.fuse, self.backend, self.dist = fuse, backend, dist
        self.exact_restore, self.no_decay = exact_restore, no_decay
        self.max_held_seeds = max_held_seeds
        self.space: ParameterSpace | None = None
        self.signature: tuple | None = None
        self.classes: tuple[bool, ...] = (True,)
        self.parts: dict[bool, ParameterSpace] = {}
        # What the weights hold (zokernels.held, one target): seeds in the order the passes
        # summed them (recovery needs the same order to recompute D bit for bit), and their
        # coefficients per decay class.
        # a failed restore keeps the record: unpatch or a retry can still remove it
        self.held = HeldPerturbation([_ClassedTarget(self)], exact=exact_restore,
                                     keep_failed=True)
        self.pending_restore = False
        self.originals: dict[str, Any] = {}
        # run-time checks (module docstring, "What the patch refuses")
        self.awaiting_update = False  # a zo_step's perturbations came back to theta
        self.seen: tuple[list[int], list[int]] | None = None  # versions, addresses after a call
        self.hook: Any = None  # global optimizer step pre-hook while a restore is deferred
        self.refused: str | None = None

    # -- parameters ---------------------------------------------------------------------
    def space_for(self, named: list[tuple[str, torch.Tensor]]) -> ParameterSpace:
        signature = tuple((n, id(p)) for n, p in named)
        if signature != self.signature:
            if self.seeds and not self.pending_restore:
                raise RuntimeError("named_parameters_to_optim changed while the weights hold a "
                                   "perturbation; restore it (scaling factors summing to 0) first")
            if self.pending_restore:
                self.restore()
            space = ParameterSpace(named, backend=self.backend, no_decay=self.no_decay)
            self.space, self.signature, self.parts = space, signature, {}
            self.classes = tuple(sorted(set(space.decayable), reverse=True)) or (True,)
        return self.space

    @property
    def seeds(self) -> list[int]:
        move = self.held.held[0]
        return [] if move is None else list(move.seeds)

    @property
    def coefs(self) -> Coefs:
        move = self.held.held[0]
        return {c: [] if move is None else list(move.coefs[c]) for c in self.classes}

    def moves(self, seeds: list[int], coefs: Coefs) -> list[ClassedNoise]:
        return [ClassedNoise(tuple(seeds), {c: list(coefs[c]) for c in self.classes},
                             self.dist)]

    def space_of(self, tag: bool | None) -> ParameterSpace:
        """The parameters of a pass kind: all (None) or one decay class."""
        return self.space if tag is None else self.part(tag)

    def part(self, cls: bool) -> ParameterSpace:
        """The parameters of one decay class, with the full space's keys (same z)."""
        if cls not in self.parts:
            space = self.space
            members = [j for j, flag in enumerate(space.decayable) if flag == cls]
            self.parts[cls] = ParameterSpace(
                [(space.names[j], space.params[j]) for j in members],
                keys=[space.keys[j] for j in members], backend=self.backend,
                no_decay=self.no_decay)
        return self.parts[cls]

    # -- what the weights hold ------------------------------------------------------------
    def hold(self, seeds: list[int], coefs: Coefs, slot: int | None = None) -> None:
        """The weights hold `seeds` with `coefs` (after the pass that wrote them): seeds whose
        coefficients are 0 in every class are dropped (their terms added +0 to that pass's D,
        so the recovery's D is the same bits). slot: the log slot of that pass (its selector
        logs recover them exactly); None after an update (that point was never stored)."""
        kept = [k for k in range(len(seeds)) if any(coefs[c][k] != 0.0 for c in self.classes)]
        if kept:
            self.held.declare(self.moves([seeds[k] for k in kept],
                                         {c: [coefs[c][k] for k in kept] for c in self.classes}))
            self.held.held_slot[0] = slot
        else:
            self.held.declare([None])
            self.pending_restore = False

    def restore(self) -> None:
        """Back to the weights without any held perturbation (exact, with the logs)."""
        with interrupts_deferred():  # the weights and what this state says they hold, together
            self.held.restore()
            self.pending_restore = False

    # -- run-time checks ------------------------------------------------------------------
    def fingerprint(self) -> tuple[list[int], list[int]]:
        """Each parameter's version counter (bumped by every in-place op on it) and address
        (changed by `param.data = ...`): a Python read per tensor, no pass over the weights."""
        params = self.space.params
        return list(map(_VERSION, params)), list(map(_DATA_PTR, params))

    def guarded(self) -> bool:
        """Whether the weights must be exactly as the patch's last call left them."""
        return bool(self.seeds) or self.pending_restore or self.awaiting_update

    def written(self) -> list[str]:
        """Names of the parameters someone else wrote where the patch expects none."""
        if self.space is None or self.seen is None or not self.guarded():
            return []
        versions, addresses = self.fingerprint()
        return [name for name, v, a, sv, sa
                in zip(self.space.names, versions, addresses, *self.seen) if v != sv or a != sa]

    def drop_held_inexact(self) -> None:
        """Remove the held perturbation by recovery alone (the weights were written meanwhile:
        the undo logs hold older values and would undo that write on the logged elements)."""
        self.held.restore(exact=False)
        self.pending_restore = False

    def refuse(self, message: str) -> None:
        self.refused = message + (" The patch now refuses every call; "
                                  "unpatch_mezo_trainer(trainer) removes it.")
        self.awaiting_update = False
        self.settle()
        raise MeZOProtocolError(self.refused)

    def check(self) -> None:
        """At the start of each patched call: refuse after an earlier refusal, or when the
        weights were written by someone else where the patch expects them untouched."""
        if self.refused is not None:
            raise MeZOProtocolError(self.refused)
        names = self.written()
        if not names:
            return
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        held = bool(self.seeds)
        where = ("while they held a zokernels perturbation" if held else
                 "between a zo_step's restore and zo_update")
        after = ("the perturbation was removed by recovery: the weights are theta plus that "
                 "change, within float32 rounding (not bit-exact: the undo logs predate it)"
                 if held else "the weights are left as that writer made them")

        def message(after: str) -> str:
            return (f"patch_mezo_trainer: the weights ({shown}) were written by someone else "
                    f"{where} (an optimizer step, copy_, param.data = ...): the trainer updates "
                    f"them itself, so the patched zo_update would update them a second time "
                    f"with another z. Nothing was applied; {after}. Such trainers (ZO-Bench's "
                    "zo_step, for one) cannot be patched.")
        with interrupts_deferred():  # the inexact drop and the refusal it leads to, together
            if held:
                try:
                    self.drop_held_inexact()
                except Exception as exc:  # e.g. a parameter cast to a dtype no pass writes
                    self.refuse(message(
                        f"removing the perturbation failed ({type(exc).__name__}: {exc}): the "
                        "weights still hold it, and unpatch_mezo_trainer retries the removal"))
            self.refuse(message(after))

    def settle(self, hook_changes: bool = True) -> None:
        """After each call: remember the weights' fingerprint; hold the optimizer pre-hook
        exactly while a restore is deferred."""
        if hook_changes:
            if self.pending_restore and self.hook is None and self.refused is None:
                self.hook = register_optimizer_step_pre_hook(_pre_hook(self))
            elif (not self.pending_restore or self.refused is not None) and self.hook is not None:
                self.hook.remove()
                self.hook = None
        self.seen = self.fingerprint() if self.space is not None and self.guarded() else None

    def before_optimizer_step(self) -> None:
        """A torch optimizer is about to step while a restore is deferred: carry it out first
        (exactly), so that optimizer never steps on theta - eps z. The hook stays registered
        (inert) until the next patched call removes it: hooks cannot be removed while torch
        runs them."""
        if self.pending_restore and self.refused is None:
            self.check()
            self.restore()
            self.settle(hook_changes=False)

    # -- the trainer's methods ----------------------------------------------------------
    def perturb(self, seed: int, delta: float, eps: float) -> None:
        held_seeds = [] if self.pending_restore else self.seeds
        held = ({c: [] for c in self.classes} if self.pending_restore else self.coefs)
        seeds = held_seeds + ([] if seed in held_seeds else [seed])
        k = seeds.index(seed)
        target: Coefs = {}
        for c in self.classes:
            row = held[c] + [0.0] * (len(seeds) - len(held_seeds))
            row[k] += delta
            if abs(row[k]) < _ZERO * abs(eps):
                row[k] = 0.0  # +1, -2, +1 in floating point: exactly back
            target[c] = row
        for c in self.classes:  # a seed's coefficients add up (two calls with one seed)
            _check_coefs(target[c], f"random_seed {seed}: the held coefficient (scaling_factor "
                                    "* zo_eps, summed over the calls of one seed)")
        nonzero = sum(any(target[c][j] != 0.0 for c in self.classes) for j in range(len(seeds)))
        if nonzero > self.max_held_seeds:
            raise ValueError(f"random_seed {seed}: the weights would hold perturbations of "
                             f"{nonzero} seeds, more than max_held_seeds={self.max_held_seeds}; "
                             "restore some (scaling factors summing to 0) first")
        if nonzero == 0:
            if self.pending_restore or not self.seeds:
                return  # nothing held, nothing added (scaling_factor 0)
            if self.fuse:
                self.pending_restore = True  # carried out inside the next zo_update
                return
            self.restore()
            return
        if self.pending_restore:
            self.restore()
        if self.exact_restore and len(self.held.live) >= _LOGGED_PASSES:
            self.restore()  # out of logs: settle on theta, then move from it in one pass
        if not self.seeds:  # from theta: only the seeds that stay held need a noise stream
            kept = [j for j in range(len(seeds)) if any(target[c][j] != 0.0 for c in self.classes)]
            seeds = [seeds[j] for j in kept]
            target = {c: [target[c][j] for j in kept] for c in self.classes}
        with interrupts_deferred():  # the weights and what this state says they hold, together
            self.held.perturb(self.moves(seeds, target), len(self.held.live))
            self.hold(seeds, target, self.held.held_slot[0])

    def update(self, seed: int, coef: float, decay: float) -> None:
        with interrupts_deferred():  # the weights and what this state says they hold, together
            self._update(seed, coef, decay)

    def _update(self, seed: int, coef: float, decay: float) -> None:
        if self.pending_restore:
            # the weights hold `seeds` but mean theta: restore and update in one pass
            seeds = list(self.seeds) + ([] if seed in self.seeds else [seed])
            row = [0.0] * len(seeds)
            row[seeds.index(seed)] = coef
            self.held.update(self.moves(seeds, {c: row for c in self.classes}),
                             [decay])
            self.pending_restore = False
            return
        if not self.seeds:
            self.held.update(self.moves([seed], {c: [coef] for c in self.classes}),
                             [decay])
            return
        # as the original: the update acts on the perturbed weights, decay included
        held = {c: [(decay if c else 1.0) * h for h in self.coefs[c]] for c in self.classes}
        for c in self.classes:
            _check_coefs(held[c], "the held perturbation's coefficients times the decay 1 - lr "
                                  "* trainer.args.weight_decay")
        seeds = self.seeds + [seed]
        scales = {c: held[c] + [coef] for c in self.classes}
        (move,) = self.moves(seeds, scales)
        whole = any(None in logs[slot].used for logs in self.held.logs for slot in self.held.live)
        if whole and not self.held.targets[0].uniform(move, self.held.held[0]):
            # a log of an all-parameter pass cannot be rescattered with per-class coefficients:
            # restore exactly, then update from theta
            self.restore()
        self.held.update([move], [decay])
        # the logs described the old theta; the new one is only implicit (never stored)
        self.hold(seeds[:-1], {c: held[c] for c in self.classes})


def _pre_hook(state: _PatchState) -> Any:
    """The global optimizer step pre-hook of one patch, holding it weakly (a hook left behind by
    a patched trainer that was dropped keeps no weights alive and does nothing)."""
    ref = weakref.ref(state)

    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        live = ref()
        if live is not None:
            live.before_optimizer_step()
    return hook


def patch_mezo_trainer(trainer: Any, *, fuse_restore_update: bool = False,
                       exact_restore: bool = True, dist: str = "gaussian",
                       backend: str = "auto",
                       no_decay: tuple[str, ...] = NO_DECAY_DEFAULT,
                       max_held_seeds: int = 8, check_protocol: bool = True) -> Any:
    """Replace `trainer.zo_perturb_parameters` and `trainer.zo_update` with fused passes of
    MeZO's semantics, as spelled out in the module docstring, and add
    `trainer.zo_restore_pending()`. Returns the trainer; `unpatch_mezo_trainer` undoes it.

    Replaced semantics: theta += scaling_factor * args.zo_eps * z(seed) and
    theta -= lr * (projected_grad * z(zo_random_seed) + weight_decay * theta) (no decay on names
    containing an entry of `no_decay`), then lr_scheduler.step(), with z from the zokernels noise
    contract. A trainer whose methods do anything else is refused with MeZOProtocolError, when
    patching (from its methods' code) or while running (weights written by someone else,
    zo_update skipped): see the module docstring, "What the patch refuses".

    Args:
        fuse_restore_update: defer the restoring call into the next zo_update (3 passes a step).
        exact_restore: logs (selector logs on cpu / torch, undo logs on triton), so restores
            are bit-exact in every dtype.
        dist: "gaussian" (MeZO) or "rademacher".
        backend: "auto", "triton", "cpu" or "torch".
        no_decay: name substrings exempt from weight decay (MeZO's rule by default): a
            sequence of non-empty strings (a str is refused, TypeError: it is not split into
            its letters).
        max_held_seeds: most distinct seeds the weights may hold at once (>= 1); each held seed
            adds one noise stream to every pass.
        check_protocol: refuse, before patching, a trainer whose methods' code departs from
            MeZO's protocol (False: skip that check; the run-time checks stay).
        fuse_restore_update, exact_restore and check_protocol must be bools (TypeError: a
        string such as "False" would be true).
    """
    for name in ("zo_perturb_parameters", "zo_update"):
        if not callable(getattr(trainer, name, None)):
            raise TypeError(f"trainer has no method {name}: not a MeZO-style trainer")
    if getattr(trainer, _STATE, None) is not None:
        raise RuntimeError("trainer is already patched")
    if isinstance(max_held_seeds, bool) or not isinstance(max_held_seeds, int):
        raise TypeError(f"max_held_seeds must be an int, got {type(max_held_seeds).__name__}")
    if max_held_seeds < 1:
        raise ValueError(f"max_held_seeds must be >= 1, got {max_held_seeds}")
    fuse_restore_update = _flag(fuse_restore_update, "fuse_restore_update")
    exact_restore = _flag(exact_restore, "exact_restore")
    check_protocol = _flag(check_protocol, "check_protocol")
    no_decay = _substrings(no_decay, "no_decay")
    dist = as_choice(dist, PERTURB_DISTS, "dist")
    backend = as_choice(backend, BACKEND_CHOICES, "backend")
    if check_protocol:
        check_protocol_of(trainer)
    state = _PatchState(fuse_restore_update, backend, dist, exact_restore, no_decay,
                        max_held_seeds)
    state.originals = {name: trainer.__dict__[name] for name in _METHODS
                       if name in trainer.__dict__}

    def guarded_call(body: Any) -> None:
        """Run a patched method's body: on an error other than a refusal, a deferred restore is
        carried out (the weights never stay at theta - eps z); always settle afterwards."""
        try:
            state.check()
            body()
        except MeZOProtocolError:
            raise
        except BaseException:
            if state.pending_restore and state.space is not None:
                state.restore()
            raise
        finally:
            state.settle()

    def zo_perturb_parameters(random_seed: int | None = None, scaling_factor: float = 1) -> None:
        def body() -> None:
            if random_seed is None and state.awaiting_update and state.pending_restore:
                state.restore()
                state.refuse("patch_mezo_trainer: a new zo_step began (zo_perturb_parameters "
                             "with the trainer's zo_random_seed) although zo_update was not "
                             "called after the previous one, whose restore fuse_restore_update "
                             "had deferred into it: the weights stayed at theta - eps z past "
                             "that step. The trainer does not follow MeZO's zo_step / zo_update "
                             "protocol (it updates elsewhere, or not at all). The deferred "
                             "restore was carried out; the weights are at theta.")
            if random_seed is None:
                seed = _seed(trainer.zo_random_seed, "trainer.zo_random_seed")
            else:
                seed = _seed(random_seed, "random_seed")
            factor = _real(scaling_factor, "scaling_factor")
            eps = _real(trainer.args.zo_eps, "trainer.args.zo_eps")
            _check_coefs([factor * eps], f"scaling_factor * trainer.args.zo_eps (scaling_factor="
                                         f"{factor!r}, zo_eps={eps!r})")
            state.space_for(_named_parameters(trainer))
            state.perturb(seed, factor * eps, eps)
            if random_seed is None and (state.pending_restore or not state.seeds):
                state.awaiting_update = True  # a zo_step's perturbations are back at theta
        guarded_call(body)

    def zo_update(model: Any = None) -> None:
        def body() -> None:
            try:
                seed = _seed(trainer.zo_random_seed, "trainer.zo_random_seed")
                lr = _real(trainer._get_learning_rate(), "trainer._get_learning_rate()")
                grad = _real(trainer.projected_grad, "trainer.projected_grad")
                weight_decay = _real(getattr(trainer.args, "weight_decay", 0.0),
                                     "trainer.args.weight_decay")
                coef, decay = -lr * grad, 1.0 - lr * weight_decay
                _check_coefs([coef], "trainer._get_learning_rate() * trainer.projected_grad")
                _check_coefs([decay], "1 - trainer._get_learning_rate() * "
                                      "trainer.args.weight_decay")
            except (TypeError, ValueError):
                state.awaiting_update = False  # this step's update is refused, not skipped
                raise
            state.space_for(_named_parameters(trainer))
            state.update(seed, coef, decay)
            state.awaiting_update = False
            scheduler = getattr(trainer, "lr_scheduler", None)
            if scheduler is not None:
                scheduler.step()
        guarded_call(body)

    def zo_restore_pending() -> None:
        """Carry out a restore deferred by fuse_restore_update (e.g. before an evaluation)."""
        def body() -> None:
            if state.pending_restore and state.space is not None:
                state.restore()
        guarded_call(body)

    trainer.zo_perturb_parameters = zo_perturb_parameters
    trainer.zo_update = zo_update
    trainer.zo_restore_pending = zo_restore_pending
    setattr(trainer, _STATE, state)
    return trainer


def _named_parameters(trainer: Any) -> list[tuple[str, torch.Tensor]]:
    """trainer.named_parameters_to_optim as a list of (name, tensor) pairs (TypeError naming it
    otherwise; a one-shot iterator is refused: the next call would find it empty)."""
    named = getattr(trainer, "named_parameters_to_optim", None)
    if (named is None or isinstance(named, (str, bytes, dict, torch.Tensor))
            or not isinstance(named, Iterable) or iter(named) is named):
        raise TypeError("trainer.named_parameters_to_optim must be a list of (name, parameter) "
                        f"pairs (MeZO's trainer sets it before its ZO steps), got "
                        f"{type(named).__name__}")
    pairs = list(named)
    for j, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], torch.Tensor)):
            raise TypeError(f"trainer.named_parameters_to_optim[{j}] must be a (name, tensor) "
                            f"pair, got {type(pair).__name__}")
    return pairs


def unpatch_mezo_trainer(trainer: Any) -> Any:
    """Restore the trainer's own methods, also after a refusal. Any perturbation the weights
    still hold (deferred or not) is removed first, exactly (the original methods could not
    remove zokernels noise), or, when someone else wrote the weights meanwhile, by recovery
    alone, with a RuntimeWarning."""
    state = getattr(trainer, _STATE, None)
    if state is None:
        raise RuntimeError("trainer is not patched")
    if state.space is not None:
        written = state.written()
        try:
            if written and state.seeds:
                state.drop_held_inexact()
                warn(f"unpatch_mezo_trainer: the weights ({', '.join(written[:5])}) were written "
                     "by someone else while they held a zokernels perturbation; it was removed "
                     "by recovery alone (within float32 rounding, not bit-exact)")
            state.restore()
        except Exception as exc:
            raise RuntimeError(
                f"unpatch_mezo_trainer: the weights still hold the zokernels perturbation of "
                f"seeds {state.seeds}, which could not be removed ({type(exc).__name__}: {exc}); "
                "the trainer stays patched: make the parameters writable again (their dtype, "
                "their storage) and call unpatch_mezo_trainer again") from exc
    if state.hook is not None:
        state.hook.remove()
        state.hook = None
    for name in _METHODS:
        if name in state.originals:
            setattr(trainer, name, state.originals[name])
        else:
            trainer.__dict__.pop(name, None)
    delattr(trainer, _STATE)
    return trainer
