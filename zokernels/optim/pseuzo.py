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

    beta = 0 leaves only the current term: ZO-SGD with a one-sided difference through the output.
    Two passes over the weights per step (+eps; restore fused with the K-seed update), exact with
    undo logs like MeZO. The window lives on the output's device: `window_bytes` reports it.

    step(forward, loss_fn) returns L(o0), the loss at the unperturbed weights.

    Args (besides MeZO's lr, eps, weight_decay, seed, dist, exact_restore, backend, no_decay,
    record_trajectory):
        window: number of (seed, dO) pairs kept (default 14).
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
        self._window: list[tuple[int, int, torch.Tensor]] = []  # (step, seed, dO)
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), seed=seed,
                         dist=dist, exact_restore=exact_restore, backend=backend,
                         rounding=rounding, process_group=process_group,
                         no_decay=no_decay, record_trajectory=record_trajectory)

    def _trajectory_meta(self) -> dict[str, Any]:
        meta = super()._trajectory_meta()
        meta.update(window=self.window, beta=self.beta)
        return meta

    @property
    def window_bytes(self) -> int:
        return sum(d.numel() * d.element_size() for _, _, d in self._window)

    def step(self, forward: Callable[[], torch.Tensor] | None = None,  # type: ignore[override]
             loss_fn: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
        if forward is None or loss_fn is None:
            raise ValueError("PseuZO.step needs forward() (the model output) and loss_fn(output)")
        return self._guarded(lambda: self._step(forward, loss_fn))

    @staticmethod
    def _output(forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            out = forward()
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise TypeError(f"forward() must return a floating-point tensor, got "
                            f"{type(out).__name__}")
        return out.detach()

    def _step(self, forward, loss_fn) -> torch.Tensor:
        step = self.zo_state["step"]
        o0 = self._output(forward)
        leaf = o0.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = self._evaluate_tensor(loss_fn(leaf))
            (e,) = torch.autograd.grad(loss, leaf)
        eps = [group["eps"] for group in self.param_groups]
        seed = self.seed_for(step)
        self._perturb_held(seed, eps, None, 0)
        o1 = self._output(forward)
        if o1.shape != o0.shape:
            raise ValueError(f"forward() changed its output shape under the perturbation: "
                             f"{tuple(o0.shape)} -> {tuple(o1.shape)}")
        delta = (o1 - o0).to(self.store_dtype or o0.dtype)
        finite_check = torch.stack([loss.detach(), delta.abs().amax().to(torch.float32)])
        if self.process_group is not None:  # a NaN on any rank skips the step on all
            finite_check = self._all_reduce_mean(finite_check)
        if not self._finite(*finite_check):
            self._check_logs()
            self._skip([loss.detach()])
            self.zo_state["step"] = step + 1
            return loss.detach()
        self._check_logs()
        self._window.append((step, seed, delta))
        del self._window[:-self.window]
        seeds = [s for _, s, _ in self._window]  # oldest first: the held seed is last
        projections = torch.stack([aligned_dot(d, e) for _, _, d in self._window])
        if self.process_group is not None:
            # each rank's window holds its own micro-batches' output differences: the
            # coefficients are the mean of the per-rank projections (one all-reduce of K floats)
            both = self._all_reduce_mean(torch.cat([projections, loss.detach().reshape(1)]))
            projections, loss = both[:-1], both[-1]
        weights = torch.tensor([self.beta ** (step - k) for k, _, _ in self._window],
                               dtype=torch.float32, device=projections.device)
        coefs = [-(group["lr"] / group["eps"]) * weights * projections
                 for group in self.param_groups]
        self._update(seeds, coefs, None)
        if self.trajectory is not None:
            decays = [1.0 - g["lr"] * g["weight_decay"] for g in self.param_groups]
            self.trajectory.record(step, seeds, [c.tolist() for c in coefs], decays)
        self.zo_state["step"] = step + 1
        return loss.detach()

    @staticmethod
    def _evaluate_tensor(loss: Any) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("loss_fn(output) must return a scalar tensor (autograd flows through "
                            "it to the output)")
        return loss.reshape(()).to(torch.float32)

    def _extra_state(self) -> dict[str, Any]:
        return {"window": [{"step": k, "seed": s, "delta": d} for k, s, d in self._window]}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._window = [(int(w["step"]), int(w["seed"]), w["delta"])
                        for w in state.get("window", [])]
