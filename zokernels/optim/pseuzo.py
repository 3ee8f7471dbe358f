"""PseuZO (Yue et al., NeurIPS 2025): ZO estimates of the model output's Jacobian, reused over a
sliding window of past perturbations, applied in ONE fused multi-seed pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..space import NO_DECAY_DEFAULT
from .base import ZOOptimizer, check_common_hyper, check_hyper


def aligned_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> in float32 over their common trailing extent in every dimension (sequences of
    different lengths are aligned at their last positions); a 0-d device tensor."""
    if a.dim() != b.dim():
        raise ValueError(f"model outputs of different ranks: {tuple(a.shape)} vs {tuple(b.shape)}")
    slices = tuple(slice(-min(x, y), None) if min(x, y) else slice(0, 0)
                   for x, y in zip(a.shape, b.shape))
    return (a[slices].to(torch.float32) * b[slices].to(torch.float32)).sum()


class PseuZO(ZOOptimizer):
    """Pseudo-Jacobian ZO: per step, with o = forward() the model output and L = loss_fn(o),

        o0 = forward(theta),  e = dL/do at o0 (autograd through loss_fn only)
        o1 = forward(theta + eps z_t),  dO_t = o1 - o0        (window of the last `window` steps)
        c_k = beta^(t - k) <dO_k, e> / eps                     (k in the window)
        theta = (1 - lr wd) theta - lr sum_k c_k z_k          (one fused K-seed pass)

    beta = 0 leaves only the current term: ZO-SGD with a one-sided difference through the output;
    the window then keeps the current entry only. Two passes over the weights per step (+eps;
    restore fused with the K-seed update), exact with undo logs like MeZO. The window lives on
    the output's device: `window_bytes` reports it.

    Data parallel (process_group): each rank keeps the output differences of its own
    micro-batches; the K projections <dO_k, e>, the loss and max |dO_t| are averaged over the
    ranks in ONE all-reduce of K + 2 floats, and every rank applies the identical update. A
    non-finite loss, output difference or projection on any rank skips the step on every rank
    (weights restored exactly, the window unchanged, warned, counted in
    zo_state["skipped_steps"]).

    step(forward, loss_fn) returns L(o0), the loss at the unperturbed weights (the mean over the
    ranks).

    Args (besides MeZO's lr, eps, weight_decay, seed, dist, exact_restore, backend, no_decay,
    record_trajectory):
        window: number of (seed, dO) pairs kept (default 14; with beta = 0, one).
        beta: EMA factor in [0, 1) weighting older pairs.
        store_dtype: dtype of the stored dO (default: the output's dtype).
    """

    algorithm = "pseuzo"

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = 1e-3,
                 weight_decay: float = 0.0, seed: int = 0, dist: str = "gaussian", *,
                 window: int = 14, beta: float = 0.9, store_dtype: torch.dtype | None = None,
                 exact_restore: bool = True, backend: str = "auto",
                 rounding: str = "nearest", process_group: Any = None,
                 no_decay: Sequence[str] = NO_DECAY_DEFAULT,
                 record_trajectory: bool = True) -> None:
        check_common_hyper(lr, eps, weight_decay)
        check_hyper("beta", beta, high=1.0, high_open=True)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if store_dtype is not None and not (isinstance(store_dtype, torch.dtype)
                                            and store_dtype.is_floating_point):
            raise ValueError(f"store_dtype must be a floating torch.dtype, got {store_dtype!r}")
        self.window = window
        self.beta = float(beta)
        self.store_dtype = store_dtype
        self._window: list[tuple[int, int, torch.Tensor]] = []  # (step, seed, dO), oldest first
        # (ages t - k of the window's entries as a float64 device tensor, the step t they are
        # for): next step's ages are these + the steps elapsed, then a new 0, with no
        # host-to-device copy. None: rebuilt from the window (after a load).
        self._ages: tuple[torch.Tensor, int] | None = None
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), seed=seed,
                         dist=dist, exact_restore=exact_restore, backend=backend,
                         rounding=rounding, process_group=process_group,
                         no_decay=no_decay, record_trajectory=record_trajectory)

    def _trajectory_meta(self) -> dict[str, Any]:
        meta = super()._trajectory_meta()
        meta.update(window=self.window, beta=self.beta)
        return meta

    @property
    def capacity(self) -> int:
        """Entries the window keeps: `window`, or 1 with beta = 0 (older weights are 0)."""
        return 1 if self.beta == 0.0 else self.window

    @property
    def window_bytes(self) -> int:
        """Bytes held by the stored output differences dO_k."""
        return sum(d.numel() * d.element_size() for _, _, d in self._window)

    def _buffer_bytes(self) -> int:  # extra_memory_bytes: the output window
        return self.window_bytes

    def step(self, forward: Callable[[], torch.Tensor] | None = None,  # type: ignore[override]
             loss_fn: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
        """One PseuZO step: forward() is called twice (theta, theta + eps z), loss_fn once, on
        the unperturbed output. Returns the loss there."""
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
        if not out.is_floating_point():
            raise TypeError(f"forward() must return a floating-point tensor, got dtype "
                            f"{out.dtype}")
        if out.numel() == 0:
            raise ValueError(f"forward() returned an empty tensor (shape {tuple(out.shape)})")
        return out.detach()

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

    def _step(self, forward, loss_fn) -> torch.Tensor:
        step = self.zo_state["step"]
        o0 = self._output(forward)
        leaf = o0.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = self._loss_value(loss_fn(leaf))
            (e,) = torch.autograd.grad(loss, leaf)
        eps = [group["eps"] for group in self.param_groups]
        seed = self.seed_for(step)
        self._perturb_held(seed, eps, None, 0)
        o1 = self._output(forward)
        if o1.shape != o0.shape:
            raise ValueError(f"forward() changed its output shape under the perturbation: "
                             f"{tuple(o0.shape)} -> {tuple(o1.shape)}")
        delta = (o1 - o0).to(self.store_dtype or o0.dtype)
        # the window this step uses; self._window changes only once the step is taken
        keep = self.capacity - 1
        old = [(k, s, d if d.device == e.device else d.to(e.device))
               for k, s, d in (self._window[-keep:] if keep else [])]
        window = old + [(step, seed, delta)]
        ages = torch.cat([self._old_ages(step, e.device)[len(self._window) - len(old):],
                          torch.zeros(1, dtype=torch.float64, device=e.device)])
        # one all-reduce of K + 2 floats: the projections, the loss, and max |dO_t| (finite
        # check of this step's difference); a NaN / inf on any rank reaches every rank
        packed = torch.cat([torch.stack([aligned_dot(d, e) for _, _, d in window]),
                            loss.detach().reshape(1),
                            delta.abs().amax().to(torch.float32).reshape(1)])
        packed = self._all_reduce_mean(packed)
        projections, mean_loss = packed[:-2], packed[-2]
        finite = self._finite(packed)  # the step's one host synchronization
        self._check_logs()
        if not finite:
            self._skip([mean_loss])
            self.zo_state["step"] = step + 1
            return mean_loss
        # beta^(t - k) on the device (float64, rounded once to float32 as a host power would)
        weights = torch.pow(self.beta, ages).to(torch.float32)
        coefs = [-(group["lr"] / group["eps"]) * weights * projections
                 for group in self.param_groups]
        seeds = [s for _, s, _ in window]  # oldest first: the held seed is last
        self._update(seeds, coefs, None)
        self._window, self._ages = window, (ages, step)
        if self.trajectory is not None:
            decays = [1.0 - g["lr"] * g["weight_decay"] for g in self.param_groups]
            self.trajectory.record(step, seeds, coefs, decays)
        self.zo_state["step"] = step + 1
        return mean_loss

    # -- state ------------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {"step": self.zo_state["step"],
                "window": [{"step": k, "seed": s, "delta": d} for k, s, d in self._window]}

    def _check_extra_state(self, extra: Any) -> None:
        """A loaded window, checked before anything changes (ValueError naming the field): a
        list of at most `capacity` dicts, oldest first, each with an int step (increasing, below
        the saved step counter `extra["step"]` when present), an int seed in [0, 2^64) and a
        floating-point tensor delta, all deltas of one shape."""
        if not isinstance(extra, dict):
            raise ValueError(f"state_dict['extra'] must be a dict, got {type(extra).__name__}")
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
        shape, previous = None, -1
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
            if saved_step is not None and k >= saved_step:
                raise ValueError(f"{where}['step'] = {k} is not below the saved step counter "
                                 f"{saved_step}")
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 1 << 64:
                raise ValueError(f"{where}['seed'] must be an int in [0, 2^64), got {s!r}")
            if not isinstance(d, torch.Tensor) or not d.is_floating_point():
                raise ValueError(f"{where}['delta'] must be a floating-point tensor, got "
                                 f"{d.dtype if isinstance(d, torch.Tensor) else type(d).__name__}")
            if shape is not None and d.shape != shape:
                raise ValueError(f"{where}['delta'] has shape {tuple(d.shape)}, the earlier "
                                 f"entries {tuple(shape)}")
            shape, previous = d.shape, k

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._window = [(int(w["step"]), int(w["seed"]), w["delta"])
                        for w in state.get("window", [])]
        self._ages = None
