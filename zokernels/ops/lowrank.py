"""zokernels.lowrank_perturb_: W <- decay * W + scale * U diag(tau) V^T, tile by tile."""

from __future__ import annotations

from typing import Any

import torch

from .._contract import ROUNDINGS
from .._dispatch import BACKEND_CHOICES, implementation, resolve_backend
from .._validate import (
    as_choice,
    as_keys,
    as_scalar_vector,
    as_seed,
    as_tensor_list,
    check_no_internal_overlap,
    check_no_overlap,
)
from ._groups import contiguous_views, group_indices, select as _select


def _as_factor_list(values: Any, count: int, name: str) -> list[torch.Tensor]:
    """One factor per weight; a single tensor is shared by all weights (taus only)."""
    if isinstance(values, torch.Tensor) and name == "taus":
        if values.dim() == 1:
            return [values] * count
        if values.dim() == 2 and values.shape[0] == count:
            return list(values.unbind(0))
        raise ValueError(f"taus as one tensor must be 1-D (shared) or [{count}, r], "
                         f"got shape {tuple(values.shape)}")
    factors = as_tensor_list(values, name)
    if len(factors) != count:
        raise ValueError(f"{name} must have one tensor per weight ({count}), got {len(factors)}")
    return factors


def _float32(factor: torch.Tensor) -> torch.Tensor:
    """Factors are small ((m + n) * r): a float32 contiguous copy, only when needed, is cheap."""
    return factor.detach().to(torch.float32).contiguous()


def lowrank_perturb_(weights: torch.Tensor | list[torch.Tensor], us: Any, vs: Any, taus: Any, *,
                     scale: Any = 1.0, decay: Any = 1.0, keys: list[int] | None = None,
                     rounding: str = "nearest", rounding_seed: int | None = None,
                     backend: str = "auto", check_finite: bool = True) -> None:
    """In place for every 2-D weight W_j (m x n): W = round(decay_j * W + scale * U diag(tau) V^T).

    Args:
        weights: 2-D tensors (float32 / bfloat16 / float16), one launch per (device, dtype) group.
        us: U_j of shape (m_j, r_j); vs: V_j of shape (n_j, r_j) (any float dtype, same device as
            W_j; used in float32).
        taus: tau_j of shape (r_j,): a list, one 1-D tensor shared by all weights, or [count, r].
        scale: a number or a one-element tensor multiplying the product (e.g. eps, or -lr * g as a
            device tensor: no host sync when check_finite=False).
        decay: a number, or one per weight.
        keys, rounding, rounding_seed: as in perturb_; stochastic rounding needs rounding_seed and
            draws its bits for element (row, col) at index row * n + col of the weight's key.

    The m x n product is never materialized: kernels accumulate tiles in float32 and round once.
    Bytes moved: 2 * itemsize * m * n for W plus 4 * (m + n + 1) * r for the factors. Tested
    against decay * W + scale * U @ diag(tau) @ V.T.
    """
    weights = as_tensor_list(weights, "weights")
    count = len(weights)
    us = _as_factor_list(us, count, "us")
    vs = _as_factor_list(vs, count, "vs")
    taus = _as_factor_list(taus, count, "taus")
    rounding = as_choice(rounding, ROUNDINGS, "rounding")
    backend = as_choice(backend, BACKEND_CHOICES, "backend")
    if rounding_seed is None:
        if rounding == "stochastic":
            raise ValueError("rounding_seed is required with rounding='stochastic' (lowrank_perturb_ "
                             "has no seeds to default to)")
        rounding_seed = 0
    rounding_seed = as_seed(rounding_seed, "rounding_seed")
    key_list = as_keys(keys, count)
    scale_vector = as_scalar_vector(scale, 1, "scale", check_finite=check_finite,
                                    allow_broadcast=False)
    decay_vector = as_scalar_vector(decay, count, "decay", check_finite=check_finite,
                                    allow_broadcast=True)
    for j, (w, u, v, tau) in enumerate(zip(weights, us, vs, taus)):
        if w.dim() != 2:
            raise ValueError(f"weights[{j}] must be 2-D, got shape {tuple(w.shape)}")
        if not isinstance(tau, torch.Tensor) or not tau.dtype.is_floating_point:
            raise TypeError(f"taus[{j}] must be a floating-point tensor")
        m, n = w.shape
        if u.dim() != 2 or v.dim() != 2 or tau.dim() != 1:
            raise ValueError(f"us[{j}], vs[{j}], taus[{j}] must be 2-D, 2-D and 1-D, got shapes "
                             f"{tuple(u.shape)}, {tuple(v.shape)}, {tuple(tau.shape)}")
        r = tau.shape[0]
        if u.shape != (m, r) or v.shape != (n, r):
            raise ValueError(f"weights[{j}] is {m} x {n} and taus[{j}] has r = {r}: us[{j}] must be "
                             f"({m}, {r}) and vs[{j}] ({n}, {r}), got {tuple(u.shape)} and "
                             f"{tuple(v.shape)}")
        if r == 0:
            raise ValueError(f"taus[{j}] must have rank r >= 1")
        for name, f in ((f"us[{j}]", u), (f"vs[{j}]", v), (f"taus[{j}]", tau)):
            if f.device != w.device:
                raise ValueError(f"{name} is on {f.device} but weights[{j}] is on {w.device}")
        check_no_internal_overlap(w, f"weights[{j}]")
    # Weights may not overlap each other nor the factors read while they are written.
    check_no_overlap([(f"weights[{j}]", w) for j, w in enumerate(weights)],
                     [(f"{name}[{j}]", f) for name, fs in (("us", us), ("vs", vs), ("taus", taus))
                      for j, f in enumerate(fs)] + [("scale", scale), ("decay", decay)])
    groups = group_indices(weights)
    plan = [(resolve_backend(backend, device), device, indices)
            for (device, _), indices in groups.items()]

    for chosen, device, indices in plan:
        members = [weights[j] for j in indices]
        with torch.no_grad(), contiguous_views(members) as work:
            implementation(chosen, "lowrank_perturb")(
                work,
                [_float32(us[j]) for j in indices],
                [_float32(vs[j]) for j in indices],
                [_float32(taus[j]) for j in indices],
                scale_vector.to(device, non_blocking=True),
                _select(decay_vector, indices).to(device, non_blocking=True),
                [key_list[j] for j in indices],
                rounding,
                rounding_seed,
            )
