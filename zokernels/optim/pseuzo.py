"""PseuZO (Yue et al., NeurIPS 2025): ZO estimates of the model output's Jacobian, reused over a
sliding window of past perturbations, applied in ONE fused multi-seed pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._contract import DEFAULT_CONTRACT
from .._signals import interrupts_deferred
from .._validate import as_seed
from ..space import NO_DECAY_DEFAULT
from ..trajectory import MAX_SEEDS_PER_STEP
from .base import ZOOptimizer, check_common_hyper, check_hyper


def aligned_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> in float32 over their common trailing extent in every dimension (sequences of
    different lengths are aligned at their last positions); a 0-d device tensor."""
    if a.dim() != b.dim():
        raise ValueError(f"model outputs of different ranks: {tuple(a.shape)} vs {tuple(b.shape)}")
    slices = tuple(slice(-min(x, y), None) if min(x, y) else slice(0, 0)
                   for x, y in zip(a.shape, b.shape))
    return (a[slices].to(torch.float32) * b[slices].to(torch.float32)).sum()


def reference_beta(step: int, cycle: int, epoch_steps: int = 1) -> float:
    """The beta schedule of PseuZO's reference (pzo_trainer.py, `cyclic_hyperbola`): epochs of
    `epoch_steps` steps, cycles of `cycle` epochs; in epoch t of a cycle (t = 0, 1, ...)
    beta = 1 / (1 + 10 t) for t <= 10, then 0 until the cycle ends. The reference clears its
    window at each cycle start (beta = 1) and runs plain MeZO while beta = 0. Tested, with
    PseuZO(beta="reference"), against a sequential re-implementation of the reference's update
    rule (tests/test_pseuzo.py)."""
    t = (step // epoch_steps) % cycle
    return 1.0 / (1.0 + 10.0 * t) if t <= 10 else 0.0


BETA_ZERO_MODES = ("one_sided", "mezo")
# dtypes of the stored output differences and of the outputs (float8 has no CPU reductions)
STORE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class PseuZO(ZOOptimizer):
    """Pseudo-Jacobian ZO: per step t, with o = forward() the model output and L = loss_fn(o),

        o0 = forward(theta),  e = dL/do at o0 (autograd through loss_fn only)
        o1 = forward(theta + eps z_t),  dO_t = o1 - o0        (window of the last `window` steps)
        c_k = beta_t^(t - k) <dO_k, e> / eps                   (k in the window)
        theta = (1 - lr wd) theta - lr sum_k c_k z_k          (one fused K-seed pass)

    beta_t is a number, a schedule, or the reference's schedule ("reference", see
    reference_beta). A schedule is a callable of the schedule epoch t // beta_epoch_steps (with
    the default beta_epoch_steps = 1: of the step t = zo_state["step"]). The whole window is
    weighted with the current beta_t, so a change of beta re-weights it, as in the reference.
    beta_t = 1 weights the window uniformly. A step with beta_t = 0 is, with
    beta_zero="one_sided" (default for a number or a callable), ZO-SGD with a one-sided
    difference through the output (the update uses the current entry only; with a constant
    beta = 0 the window keeps just that entry); with beta_zero="mezo" (default for "reference",
    as the reference does), a plain MeZO step: two forwards at theta +- eps z_t,
    g = (L+ - L-) / (2 eps), theta = (1 - lr wd) theta - lr g z_t, the window left as it is.
    Window resets, as the reference's: with a schedule ("reference" or a callable), the window is
    cleared at the first step of every epoch whose beta is 1 ("reference": each cycle start);
    never with a number.

    decay_per_entry=True applies the reference's weight decay: (1 - lr wd) once per window entry,
    as its sequential loop does: theta = d^K theta - lr sum_k d^(K-1-k) c_k z_k with
    d = 1 - lr wd and K the entries used (still one pass).

    Passes over the weights per step: with virtual probes (the default, as MeZO's) one, the
    K-seed update; theta + eps z_t is drawn inside the forward's reads (docs/dense-probes.md).
    With probe="inplace" two (+eps; restore fused with the K-seed update), exact with selector
    logs like MeZO's in-place probes (MeZO steps: one / three). The window lives on the output's
    device: `window_bytes` reports it.

    Data parallel (process_group): each rank keeps the output differences of its own
    micro-batches; the K projections <dO_k, e>, the loss and max |dO_t| are averaged over the
    ranks in ONE all-reduce of K + 2 floats (MeZO steps: the two losses), and every rank applies
    the identical update. A non-finite loss, output difference or projection on any rank skips
    the step on every rank (weights restored exactly, the window unchanged except for a reset due
    at that step, warned, counted in zo_state["skipped_steps"]).

    step(forward, loss_fn) returns L(o0), the loss at the unperturbed weights (the mean over the
    ranks); a MeZO step returns L(theta + eps z_t), as MeZO does.

    Differences from the reference that remain (with the same noise and batches it matches to
    float32 rounding): the reference returns L(theta + eps z) on PseuZO steps too; it computes
    <dO_k, e> in the output's dtype (here float32); its window is indexed by position, so a step
    skipped here (non-finite) ages the window by one step more than the reference would (it has
    no skips); its schedule counts epochs of the data loader and derives cycle =
    num_train_epochs // 2 (pass beta_cycle accordingly and beta_epoch_steps = steps per epoch),
    and it runs plain MeZO in the epochs after the last whole cycle (an odd epoch count), which
    "reference" does not (use a callable); after a beta = 0 epoch it stays in MeZO mode until
    beta is 1 again, where a schedule here takes a PseuZO step for any beta > 0 (only a callable
    can go from 0 to a beta in (0, 1)); its noise is torch.normal after torch.manual_seed, here
    the zokernels noise contract.

    Resume: state_dict() saves the window and the schedule's settings; the schedule's position
    is the step counter zo_state["step"]. load_state_dict requires the optimizer to be built with
    the same beta (number or "reference" with the same beta_cycle / beta_epoch_steps),
    beta_zero and decay_per_entry (ValueError naming the field otherwise). A callable cannot be
    saved: the state records only that beta was one; build the resumed optimizer with the same
    callable, a pure function of the epoch (it is called again for the resumed steps).

    Args (besides MeZO's lr, eps, weight_decay, seed, dist, exact_restore, backend, no_decay,
    record_trajectory):
        window: number of (seed, dO) pairs kept (default 14; with a constant beta = 0, one).
        beta: a number in [0, 1], "reference", or a callable epoch -> beta in [0, 1].
        beta_cycle: with "reference": epochs per cycle (required).
        beta_epoch_steps: with a schedule: steps per epoch (default 1).
        beta_zero: "one_sided" or "mezo": what a step with beta = 0 does (default: "mezo" for
            "reference", else "one_sided").
        decay_per_entry: weight decay once per window entry, as the reference (default False:
            once per step).
        store_dtype: dtype of the stored dO (default: the output's dtype). A window loaded (or
            kept) in another dtype is converted to it at the next step.
        probe: "virtual" (default) or "inplace", as MeZO's: the forward at theta + eps z_t
            reads perturbed copies drawn on the fly and writes no weight; the first probe runs
            both ways and keeps the virtual path only if the two outputs are equal bit for bit
            (else it warns and stays in place; dense_probe_status says which). A passing run
            has exactly the outputs, window, weights and trajectory of the in-place one.
    """

    algorithm = "pseuzo"

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = 1e-3,
                 weight_decay: float = 0.0, seed: int = 0, dist: str = "gaussian", *,
                 window: int = 14, beta: float | str | Callable[[int], float] = 0.9,
                 beta_cycle: int | None = None, beta_epoch_steps: int = 1,
                 beta_zero: str | None = None, decay_per_entry: bool = False,
                 store_dtype: torch.dtype | None = None,
                 exact_restore: bool = True, backend: str = "auto",
                 rounding: str = "nearest", process_group: Any = None,
                 no_decay: Sequence[str] = NO_DECAY_DEFAULT,
                 record_trajectory: bool = True, contract: int = DEFAULT_CONTRACT,
                 probe: str = "virtual") -> None:
        check_common_hyper(lr, eps, weight_decay)
        if isinstance(beta, str) and beta != "reference":
            raise ValueError(f"beta must be a number in [0, 1], 'reference' or a callable of the "
                             f"epoch, got {beta!r}")
        if beta == "reference" or callable(beta):  # a schedule (a callable's values: per step)
            needed = (("beta_cycle", beta_cycle),) if beta == "reference" else ()
            for name, value in needed + (("beta_epoch_steps", beta_epoch_steps),):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"beta={'reference' if beta == 'reference' else 'callable'} "
                                     f"needs {name} as a positive integer (epochs per cycle, "
                                     f"steps per epoch), got {value!r}")
        else:
            beta = check_hyper("beta", beta, high=1.0)
        if beta != "reference" and beta_cycle is not None:
            raise ValueError(f"beta_cycle is for beta='reference' only, got beta_cycle="
                             f"{beta_cycle!r} with beta={beta!r}")
        if isinstance(beta, float) and beta_epoch_steps != 1:
            raise ValueError(f"beta_epoch_steps is for a beta schedule only, got "
                             f"beta_epoch_steps={beta_epoch_steps!r} with beta={beta!r}")
        if beta_zero is None:
            beta_zero = "mezo" if beta == "reference" else "one_sided"
        if beta_zero not in BETA_ZERO_MODES:
            raise ValueError(f"beta_zero must be one of {list(BETA_ZERO_MODES)}, got "
                             f"{beta_zero!r}")
        if (isinstance(window, bool) or not isinstance(window, int)
                or not 1 <= window <= MAX_SEEDS_PER_STEP):
            raise ValueError(f"window must be an integer in [1, {MAX_SEEDS_PER_STEP}], "
                             f"got {window!r}")
        if store_dtype is not None and store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype must be one of {list(STORE_DTYPES)}, got "
                             f"{store_dtype!r}")
        self.window = window
        self.beta = beta
        self.beta_cycle = beta_cycle if beta == "reference" else None
        self.beta_epoch_steps = 1 if isinstance(beta, float) else beta_epoch_steps
        self.beta_zero = beta_zero
        self.decay_per_entry = bool(decay_per_entry)
        self.store_dtype = store_dtype
        self._window: list[tuple[int, int, torch.Tensor]] = []  # (step, seed, dO), oldest first
        # (ages t - k of the window's entries as a float64 device tensor, the step t they are
        # for): next step's ages are these + the steps elapsed, then a new 0, with no
        # host-to-device copy. None: rebuilt from the window (after a load).
        self._ages: tuple[torch.Tensor, int] | None = None
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), seed=seed,
                         dist=dist, exact_restore=exact_restore, backend=backend,
                         rounding=rounding, process_group=process_group,
                         no_decay=no_decay, record_trajectory=record_trajectory,
                         contract=contract, dense_probe=probe)

    def _schedule(self) -> dict[str, Any]:
        """The beta settings, as saved (a callable as the word "callable")."""
        return {"beta": "callable" if callable(self.beta) else self.beta,
                "beta_cycle": self.beta_cycle, "beta_epoch_steps": self.beta_epoch_steps,
                "beta_zero": self.beta_zero, "decay_per_entry": self.decay_per_entry}

    # the records hold their seeds and coefficients; the window and the schedule describe the
    # settings (compared with the state's "schedule" where it has one, _check_schedule_state)
    _RESUME_FREE_META = ZOOptimizer._RESUME_FREE_META | {
        "window", "beta", "beta_cycle", "beta_epoch_steps", "beta_zero", "decay_per_entry"}

    def _trajectory_meta(self) -> dict[str, Any]:
        meta = super()._trajectory_meta()
        meta.update(window=self.window, **self._schedule())
        return meta

    def beta_at(self, step: int) -> float:
        """beta for step `step` (ValueError naming it when a callable returns a value outside
        [0, 1])."""
        if self.beta == "reference":
            return reference_beta(step, self.beta_cycle, self.beta_epoch_steps)
        if callable(self.beta):
            epoch = step // self.beta_epoch_steps
            return check_hyper(f"beta({epoch})", self.beta(epoch), high=1.0)
        return self.beta

    def resets_window(self, step: int, beta: float | None = None) -> bool:
        """Whether the window is cleared before step `step`: with a schedule, at the first step
        of every epoch whose beta is 1 (as the reference). beta: the step's beta_at(step), when
        the caller has it (a step evaluates a callable schedule once)."""
        if isinstance(self.beta, float):
            return False
        if step % self.beta_epoch_steps:
            return False
        return (self.beta_at(step) if beta is None else beta) == 1.0

    def _seeds_per_step(self) -> tuple[int, int]:
        return 1, self.capacity

    def _decay_power(self) -> int:
        return self.capacity if self.decay_per_entry else 1

    @property
    def capacity(self) -> int:
        """Entries the window keeps: `window`, or 1 with a constant beta = 0 (older weights are
        0)."""
        return 1 if self.beta == 0.0 and not callable(self.beta) else self.window

    @property
    def window_length(self) -> int:
        """Entries (seed, dO) the window holds now: one more per step up to `capacity`."""
        return len(self._window)

    @property
    def window_bytes(self) -> int:
        """Bytes held by the stored output differences dO_k."""
        return sum(d.numel() * d.element_size() for _, _, d in self._window)

    def _buffer_bytes(self) -> int:  # extra_memory_bytes: the output window
        return self.window_bytes

    def step(self, forward: Callable[[], torch.Tensor] | None = None,  # type: ignore[override]
             loss_fn: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
        """One PseuZO step: forward() is called twice (theta, theta + eps z), loss_fn once, on
        the unperturbed output (a MeZO step: forward and loss_fn at theta +- eps z). Returns the
        loss there (a MeZO step: at theta + eps z)."""
        if forward is None or loss_fn is None:
            raise ValueError("PseuZO.step needs forward() (the model output) and loss_fn(output)")
        return self._guarded(lambda: self._step(forward, loss_fn))

    @staticmethod
    def _output(forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            out = forward()
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"forward() must return a tensor (the model output), got "
                            f"{type(out).__name__}")
        if out.dtype not in STORE_DTYPES:
            raise TypeError(f"forward() must return a tensor of {list(STORE_DTYPES)}, got dtype "
                            f"{out.dtype}")
        if out.numel() == 0:
            raise ValueError(f"forward() returned an empty tensor (shape {tuple(out.shape)})")
        # a copy: an output over a parameter's memory (forward returning a view of a weight)
        # would follow the weights as the probes move them, and its difference would vanish
        return out.detach().clone()

    @staticmethod
    def _loss_value(loss: Any) -> torch.Tensor:
        """loss_fn's result as a 0-d float32 tensor (autograd must flow through it)."""
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss_fn(output) must return a scalar tensor (autograd flows "
                            f"through it to the output), got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss_fn(output) must return a scalar loss, got shape "
                             f"{tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError("loss_fn(output) does not depend on the output (no autograd path "
                             "from the output to the loss)")
        return loss.reshape(()).to(torch.float32)

    def _old_ages(self, step: int, device: torch.device) -> torch.Tensor:
        """t - k for the window's entries, float64 on `device`: from the cache (no copy), or,
        after a load, built once from the window."""
        if self._ages is not None and self._ages[0].device == device:
            ages, at = self._ages
            return ages + float(step - at)
        if not self._window:
            return torch.zeros(0, dtype=torch.float64, device=device)
        return torch.tensor([float(step - k) for k, _, _ in self._window], dtype=torch.float64,
                            device=device)

    def _decays(self, count: int) -> list[float]:
        """Per group, the decay of a K-entry update: 1 - lr wd, or (1 - lr wd)^K per entry."""
        power = count if self.decay_per_entry else 1
        return [(1.0 - g["lr"] * g["weight_decay"]) ** power for g in self.param_groups]

    def _entry_decays(self, count: int, device: torch.device) -> list[torch.Tensor | float]:
        """Per group, the factors d^(K-1-k) of the entries (oldest first) with decay_per_entry
        (the decay the reference applies after entry k), else 1."""
        if not self.decay_per_entry:
            return [1.0] * len(self.param_groups)
        exponents = torch.arange(count - 1, -1, -1, dtype=torch.float64, device=device)
        return [torch.pow(1.0 - g["lr"] * g["weight_decay"], exponents).to(torch.float32)
                for g in self.param_groups]

    def _step(self, forward, loss_fn) -> torch.Tensor:
        step = self.zo_state["step"]
        beta = self.beta_at(step)
        if beta == 0.0 and self.beta_zero == "mezo":
            return self._mezo_step(step, forward, loss_fn)
        if torch.is_inference_mode_enabled():
            raise RuntimeError("PseuZO.step differentiates loss_fn(output): call it outside "
                               "torch.inference_mode() (torch.no_grad() is fine)")
        reset = self.resets_window(step, beta)  # the schedule is called once per step
        o0 = self._output(forward)
        # the entries this step keeps must have the output's rank (their lengths may differ:
        # aligned_dot aligns them); checked before the first write, whatever beta weights them
        keep = 0 if reset else self.capacity - 1
        kept = self._window[-keep:] if keep else []
        for k, _, d in kept:
            if d.dim() != o0.dim():
                raise ValueError(f"forward() returned a {o0.dim()}-D output {tuple(o0.shape)}, "
                                 f"the window's entry of step {k} is {d.dim()}-D "
                                 f"{tuple(d.shape)}: outputs must keep their rank across steps")
        leaf = o0.detach().requires_grad_(True)  # o0 is already a copy (_output)
        with torch.enable_grad():
            loss = self._loss_value(loss_fn(leaf))
            (e,) = torch.autograd.grad(loss, leaf, allow_unused=True)
        if e is None:  # the loss requires grad through something else only
            raise ValueError("loss_fn(output) does not depend on the output (its autograd graph "
                             "does not reach it)")
        eps = [group["eps"] for group in self.param_groups]
        seed = self.seed_for(step)
        self._perturb_held(seed, eps, None, 0)
        o1 = self._probe_eval(forward, seed, eps, evaluate=self._output)
        if o1.shape != o0.shape:
            raise ValueError(f"forward() changed its output shape under the perturbation: "
                             f"{tuple(o0.shape)} -> {tuple(o1.shape)}")
        delta = (o1 - o0).to(self.store_dtype or o0.dtype)
        # the window this step keeps (`kept`); self._window changes only once the step is taken.
        # One device and dtype, this step's: a window loaded (or kept from steps whose outputs
        # had another dtype) in another one would not save as one window
        old = [(k, s, d.to(device=e.device, dtype=delta.dtype)) for k, s, d in kept]
        window = old + [(step, seed, delta)]
        ages = torch.cat([self._old_ages(step, e.device)[len(self._window) - len(old):],
                          torch.zeros(1, dtype=torch.float64, device=e.device)])
        # the entries the update uses: beta = 0 weights all but the current one by 0
        used, used_ages = (window, ages) if beta != 0.0 else (window[-1:], ages[-1:])
        # one all-reduce of K + 2 floats: the projections, the loss, and max |dO_t| (finite
        # check of this step's difference); a NaN / inf on any rank reaches every rank
        packed = torch.cat([torch.stack([aligned_dot(d, e) for _, _, d in used]),
                            loss.detach().reshape(1),
                            delta.abs().amax().to(torch.float32).reshape(1)])
        packed = self._all_reduce_mean(packed)
        projections, mean_loss = packed[:-2], packed[-2]
        # beta^(t - k) on the device (float64, rounded once to float32 as a host power would)
        weights = torch.pow(beta, used_ages).to(torch.float32)
        coefs = [-(group["lr"] / group["eps"]) * weights * projections * entry
                 for group, entry in zip(self.param_groups,
                                         self._entry_decays(len(used), e.device))]
        decays = self._decays(len(used))
        # the step's one host synchronization; finite projections can still give coefficients
        # that overflow float32: such a step is skipped too
        finite, zero = self._finite_and_zero([packed, *coefs], coefs)
        self._check_logs()
        if not finite:
            with interrupts_deferred():  # the window's reset and the skip, together
                if reset:
                    self._window, self._ages = [], None
                self._skip([mean_loss], step)
            return mean_loss
        seeds = [s for _, s, _ in used]  # oldest first: the held seed is last
        with interrupts_deferred():  # the window goes with the step that records it
            self._commit_step(step, seeds, coefs, None, decays, zero_groups=zero)
            self._window, self._ages = window, (ages, step)
        return mean_loss

    def _mezo_step(self, step: int, forward, loss_fn) -> torch.Tensor:
        """beta = 0 with beta_zero="mezo": one MeZO step (two-sided, losses at theta +- eps z);
        the window is left as it is."""
        seed = self.seed_for(step)
        eps = [group["eps"] for group in self.param_groups]
        losses = torch.stack(self._probe_two_point(lambda: loss_fn(self._output(forward)), seed,
                                                   eps, None))
        losses = self._all_reduce_mean(losses)
        grad = ((losses[0] - losses[1]) / 2).reshape(1)
        coefs = [-group["lr"] * (grad / group["eps"]) for group in self.param_groups]  # as MeZO
        finite, zero = self._finite_and_zero([losses, *coefs], coefs)  # overflow: skipped too
        self._check_logs()
        if not finite:
            self._skip(losses, step)
            return losses[0]
        self._commit_step(step, [seed], coefs, None, self._decays(1), zero_groups=zero)
        return losses[0]

    # -- state ------------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {"step": self.zo_state["step"],
                "window": [{"step": k, "seed": s, "delta": d} for k, s, d in self._window],
                "schedule": self._schedule()}

    def _check_schedule_state(self, extra: dict[str, Any]) -> None:
        """The saved beta settings (absent in states saved before they existed: not checked)
        must be this optimizer's: the window and the steps to come depend on them."""
        saved = extra.get("schedule")
        if saved is None:
            return
        if not isinstance(saved, dict):
            raise ValueError(f"state_dict['extra']['schedule'] must be a dict, got "
                             f"{type(saved).__name__}")
        for field, value in self._schedule().items():
            saved_value = saved.get(field)
            # plain values only: a tensor's != is a tensor (ambiguous, or a meta error)
            plain = saved_value is None or isinstance(saved_value, (bool, int, float, str))
            if field not in saved or not plain or saved_value != value:
                raise ValueError(f"state_dict['extra']['schedule']['{field}'] is "
                                 f"{saved_value!r}, this optimizer has {value!r}: build it "
                                 f"with the saved {field} to resume")

    def _check_extra_state(self, extra: Any, step: int) -> None:
        """A loaded window, checked before anything changes (ValueError naming the field): a
        list of at most `capacity` dicts, oldest first, each with an int step (increasing, below
        the step counter the optimizer adopts, `step`, and `extra["step"]` when present), an int
        seed in [0, 2^64) and a floating-point tensor delta, all deltas of one rank, dtype and
        device (their lengths may differ as the outputs' do: aligned_dot aligns them)."""
        if not isinstance(extra, dict):
            raise ValueError(f"state_dict['extra'] must be a dict, got {type(extra).__name__}")
        self._check_schedule_state(extra)
        entries = extra.get("window", [])
        if not isinstance(entries, list):
            raise ValueError(f"state_dict['extra']['window'] must be a list, got "
                             f"{type(entries).__name__}")
        if len(entries) > self.capacity:
            raise ValueError(f"state_dict['extra']['window'] has {len(entries)} entries, this "
                             f"optimizer keeps at most {self.capacity} (window={self.window}, "
                             f"beta={self.beta})")
        saved_step = extra.get("step")
        if saved_step is not None and (isinstance(saved_step, bool)
                                       or not isinstance(saved_step, int) or saved_step < 0):
            raise ValueError(f"state_dict['extra']['step'] must be a non-negative int, got "
                             f"{saved_step!r}")
        shape = dtype = device = None
        previous = -1
        for j, entry in enumerate(entries):
            where = f"state_dict['extra']['window'][{j}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{where} must be a dict, got {type(entry).__name__}")
            missing = {"step", "seed", "delta"} - entry.keys()
            if missing:
                raise ValueError(f"{where} lacks {sorted(missing)}")
            k, s, d = entry["step"], entry["seed"], entry["delta"]
            if isinstance(k, bool) or not isinstance(k, int) or k <= previous:
                raise ValueError(f"{where}['step'] must be an int above the previous entry's "
                                 f"({previous}), got {k!r}")
            for counter, name in ((saved_step, "state_dict['extra']['step']"),
                                  (step, "state_dict['zo_state']['step']")):
                if counter is not None and k >= counter:  # ages t - k must be positive
                    raise ValueError(f"{where}['step'] = {k} is not below the saved step "
                                     f"counter {name} = {counter}")
            try:
                entry["seed"] = as_seed(s, "seed")  # the ops' seed rule, kept as an int
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}['seed']: {exc}") from None
            if not isinstance(d, torch.Tensor) or not d.is_floating_point():
                raise ValueError(f"{where}['delta'] must be a floating-point tensor, got "
                                 f"{d.dtype if isinstance(d, torch.Tensor) else type(d).__name__}")
            if self.store_dtype is not None and d.dtype != self.store_dtype:
                raise ValueError(f"{where}['delta'] is {d.dtype}, this optimizer stores "
                                 f"{self.store_dtype}")
            if d.device.type == "meta" or d.is_sparse or d.layout != torch.strided:
                raise ValueError(f"{where}['delta'] must be a dense tensor with values, got a "
                                 f"{d.layout} tensor on {d.device}")
            if shape is not None and (d.dim(), d.dtype, d.device) != (len(shape), dtype, device):
                raise ValueError(f"{where}['delta'] has shape {tuple(d.shape)} ({d.dtype}, "
                                 f"{d.device}), the earlier entries {len(shape)} dimensions "
                                 f"({dtype}, {device})")
            # in float32, as aligned_dot reads it, and with a finite float32 sum of squares (a
            # delta near float32's max overflows every projection): else every later step
            # would be skipped, and a skipped step keeps its window
            if not bool(torch.isfinite(d.to(torch.float32).square().sum())):
                raise ValueError(f"{where}['delta'] must hold values finite in float32, with a "
                                 "finite float32 sum of squares")
            shape, dtype, device, previous = d.shape, d.dtype, d.device, k

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._window = [(int(w["step"]), int(w["seed"]), w["delta"])
                        for w in state.get("window", [])]
        self._ages = None
