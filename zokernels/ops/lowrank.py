"""zokernels.lowrank_perturb_: W <- decay * W + scale * U diag(tau) V^T, tile by tile; recovery of
a held low-rank perturbation (applied_scale / applied_taus), its selector logs and its undo log
(docs/undo-log.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._contract import DEFAULT_CONTRACT, ROUNDINGS, as_contract
from .._dispatch import BACKEND_CHOICES, implementation
from .._validate import (
    as_choice,
    as_keys,
    as_scalar_vector,
    as_seed,
    as_tensor_list,
    check_dtype,
    check_no_internal_overlap,
    check_no_overlap,
    check_values,
    plain_tensor,
)
from ._groups import contiguous_views, select as _select
from .noise import noise
from .perturb import PerturbGroup, plan_groups
from .undo import SELECTOR_BACKENDS, SelectorLog, UndoLog


def _as_factor_list(values: Any, count: int, name: str) -> list[torch.Tensor]:
    """One factor per weight; a single tensor is shared by all weights (taus only)."""
    if isinstance(values, torch.Tensor) and name in ("taus", "applied_taus"):
        values = plain_tensor(values, name)
        check_values(values, name)
        check_dtype(values, name)  # as a list's (a negated view is resolved when read)
        if values.dim() == 1:
            return [values] * count
        if values.dim() == 2 and values.shape[0] == count:
            return list(values.unbind(0))
        raise ValueError(f"{name} as one tensor must be 1-D (shared) or [{count}, r], "
                         f"got shape {tuple(values.shape)}")
    factors = as_tensor_list(values, name, read_only=True)  # only read: inference tensors too
    if len(factors) != count:
        raise ValueError(f"{name} must have one tensor per weight ({count}), got {len(factors)}")
    return factors


def _float32(factor: torch.Tensor) -> torch.Tensor:
    """Factors are small ((m + n) * r): a float32 contiguous copy, only when needed, is cheap.
    What the optimizers pass is that already: returned as is (4 calls fewer per factor)."""
    if (type(factor) is torch.Tensor and factor.dtype == torch.float32
            and not factor.requires_grad and not factor.is_neg() and factor.is_contiguous()):
        return factor
    return factor.detach().to(torch.float32).resolve_neg().contiguous()


@dataclass(frozen=True)
class FactorDraw:
    """Factors a pass draws itself, for the weights whose `us` / `vs` entries are None:
    U_j[row, k] = z(seed, keys[j], u_offsets[j] + row * r_j + k) and V_j[col, k] = z(seed,
    keys[j], v_offsets[j] + col * r_j + k), the gaussian noise of the pass's contract: the values
    of noise(m_j * r_j, seed, keys[j], offset=u_offsets[j]).view(m_j, r_j) (TeZO's fixed factors,
    LowRankSpace.factors). The cpu backend draws them inside the pass (V_j once per weight, U_j's
    rows per work item: no (m + n) r float32 scratch); the others draw a group's before its
    launch."""

    seed: int
    u_offsets: Sequence[int]
    v_offsets: Sequence[int]


def draw_factors(seed: int, key: int, rows: int, cols: int, rank: int, u_offset: int,
                 v_offset: int, *, device: torch.device, backend: str, contract: Any
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """U (rows x rank) and V (cols x rank), float32, of the factor stream (seed, key) from
    u_offset and v_offset: the values FactorDraw describes, drawn now on `device` (one launch when
    V's elements follow U's)."""
    def draw(numel: int, offset: int) -> torch.Tensor:
        return noise(numel, seed, key, offset=offset, device=device, backend=backend,
                     contract=contract)

    if u_offset + rows * rank == v_offset:
        both = draw((rows + cols) * rank, u_offset)
        return both[:rows * rank].view(rows, rank), both[rows * rank:].view(cols, rank)
    return (draw(rows * rank, u_offset).view(rows, rank),
            draw(cols * rank, v_offset).view(cols, rank))


def _checked_draw(draw: Any, count: int) -> FactorDraw:
    if not isinstance(draw, FactorDraw):
        raise TypeError(f"draw must be a FactorDraw, got {type(draw).__name__}")
    seed = as_seed(draw.seed, "draw.seed")
    offsets = []
    for name in ("u_offsets", "v_offsets"):
        values = getattr(draw, name)
        if not isinstance(values, (list, tuple)) or len(values) != count:
            raise ValueError(f"draw.{name} must hold one offset per weight ({count})")
        offsets.append(tuple(as_seed(v, f"draw.{name}[{j}]") for j, v in enumerate(values)))
    return FactorDraw(seed, *offsets)


def _drawable_factor_list(values: Any, count: int, name: str) -> list[torch.Tensor | None]:
    """us / vs with a FactorDraw: None (all drawn) or one entry per weight, None where drawn."""
    if values is None:
        return [None] * count
    if not isinstance(values, (list, tuple)) or len(values) != count:
        raise ValueError(f"{name} must be None or hold one entry per weight ({count}) with draw")
    return [None if f is None else as_tensor_list([f], f"{name}[{j}]", read_only=True)[0]
            for j, f in enumerate(values)]


@dataclass
class LowRankCall:
    """Validated arguments of one low-rank pass, in the caller's weight order (factors float32
    contiguous, scalars float32 vectors), and its (device, dtype) groups."""

    plan: list[PerturbGroup]
    us: list[torch.Tensor]
    vs: list[torch.Tensor]
    taus: list[torch.Tensor]
    scale: torch.Tensor
    decays: torch.Tensor
    rounding: str
    rounding_seed: int
    applied_taus: list[torch.Tensor] | None = None
    applied_scale: torch.Tensor | None = None
    contract: int = DEFAULT_CONTRACT
    draw: FactorDraw | None = None  # us[j], vs[j] None: drawn by the pass


def lowrank_perturb_(weights: torch.Tensor | list[torch.Tensor], us: Any, vs: Any, taus: Any, *,
                     scale: Any = 1.0, decay: Any = 1.0, keys: list[int] | None = None,
                     rounding: str = "nearest", rounding_seed: int | None = None,
                     applied_scale: Any = None, applied_taus: Any = None,
                     log: UndoLog | None = None, held_log: SelectorLog | None = None,
                     backend: str = "auto", check_finite: bool = True,
                     contract: int = DEFAULT_CONTRACT, draw: FactorDraw | None = None) -> None:
    """In place for every 2-D weight W_j (m x n): W = round(decay_j * theta + scale * P_j(tau_j)),
    P_j(tau) = U_j diag(tau) V_j^T, theta = W (or the recovered weight, below).

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
        applied_scale, applied_taus: both or neither. The perturbation the weights hold now:
            W = round(theta + applied_scale * P_j(applied_tau_j)) (nearest rounding, decay 1, the
            same U, V and weight list). Each theta is first recovered (docs/noise-contract.md,
            "Recovery") with D1 computed exactly as the pass that wrote it computed its D, so a
            TeZO step (+eps, then -eps with applied +eps, then the update with applied -eps)
            restores far more weights bit for bit than adding the opposite perturbation.
        log: a SelectorLog or an UndoLog (nearest rounding, decay 1 only). A SelectorLog
            keeps the few bits per ambiguous element that a later pass over the same weights,
            naming it `held_log` with applied_* = this pass's (scale, taus), needs to recover
            every weight exactly. An UndoLog keeps the elements a later
            recovery could not give back; `run_lowrank_scatter` rewrites them after that pass
            (docs/undo-log.md, "Low-rank groups"). The first passes of a log also run a
            count-only probe to size it.
        held_log: the SelectorLog of the pass that wrote the perturbation the weights hold
            (applied_scale / applied_taus, the same weights in the same order): each theta is
            recovered exactly from it, and an element this pass leaves at its value (scale 0,
            decay 1: a restore) keeps theta's exact bits. Any decay and rounding for the move.
        contract: 3 (default), 2 or 1, the version of the noise contract
            (docs/noise-contract.md): 3 makes rounding="stochastic" the integer stochastic
            rounding (16 random bits per element), 1 and 2 the uniform-based one, as perturb_.
        draw: a FactorDraw: the weights whose us / vs entries are None (or us = vs = None: all)
            get factors drawn by the pass from the noise stream, as FactorDraw describes.

    The m x n product is never materialized: kernels accumulate tiles in float32 and round once.
    Bytes moved: 2 * itemsize * m * n for W plus 4 * (m + n + 1) * r for the factors (twice the
    factor reads with recovery). Tested against decay * W + scale * U @ diag(tau) @ V.T and, bit
    for bit on the cpu backend, against the torch reference.
    """
    weights = as_tensor_list(weights, "weights")
    if log is not None and not isinstance(log, UndoLog):
        raise TypeError(f"log must be an UndoLog or a SelectorLog, got {type(log).__name__}")
    if held_log is not None and not isinstance(held_log, SelectorLog):
        raise TypeError(f"held_log must be a SelectorLog, got {type(held_log).__name__}")
    if log is not None and log is held_log:
        raise ValueError("log and held_log must be two logs: a pass cannot overwrite the log "
                         "it reads")
    call = prepare_lowrank(weights, us, vs, taus, scale=scale, decay=decay, keys=keys,
                           rounding=rounding, rounding_seed=rounding_seed,
                           applied_scale=applied_scale, applied_taus=applied_taus,
                           backend=backend, check_finite=check_finite, contract=contract,
                           draw=draw)
    held = None if held_log is None else _held_buffers(held_log, call)
    if held is not None and log is not None and not isinstance(log, SelectorLog) and any(
            group.backend == "triton" for group in call.plan):
        # the Triton selector pass (k-ordered P) keeps no undo log; refused before any write
        raise ValueError("log: with held_log, the triton backend needs a SelectorLog (an "
                         "UndoLog is written by cpu / torch only)")
    if log is None:
        run_lowrank(call, held_logs=held)
        return
    if call.rounding != "nearest":
        raise ValueError("log needs rounding='nearest' (recovery inverts nearest rounding)")
    if not bool((call.decays == 1.0).all()):
        raise ValueError("log needs decay=1.0 (a perturbation, not an update)")
    selector = isinstance(log, SelectorLog)
    if selector:
        _check_selector_backends(call.plan, "log")
    flags = torch.ones(len(weights), dtype=torch.bool)
    if not call.plan:
        log.begin(call.plan, flags)
        return
    key = "selector_logs" if selector else "logs"
    if log.needs_probe(call.plan):
        log.probe(call.plan, lambda counters: run_lowrank(
            call, count_only=True, held_logs=held, **{key: counters}))
    run_lowrank(call, held_logs=held, **{key: log.begin(call.plan, flags)})


def _check_selector_backends(plan: list[PerturbGroup], name: str) -> None:
    for group in plan:
        if group.backend not in SELECTOR_BACKENDS:
            raise ValueError(f"{name}: selector logs need the {' or '.join(SELECTOR_BACKENDS)} "
                             f"backend, the weights on {group.device} run on {group.backend} "
                             "(use an UndoLog there)")


def _held_buffers(held_log: SelectorLog, call: LowRankCall) -> list:
    """The buffers of the selector log a recovering pass reads: written by a pass over the same
    weights (same groups, same order), with applied_*; ValueError before anything is written."""
    if call.applied_taus is None:
        raise ValueError("held_log needs applied_scale and applied_taus (the perturbation the "
                         "log describes)")
    _check_selector_backends(call.plan, "held_log")
    return held_log.buffers_over(call.plan, "held_log", "weights")


def prepare_lowrank(weights: list[torch.Tensor], us: Any, vs: Any, taus: Any, *, scale: Any,
                    decay: Any, keys: list[int] | None, rounding: str, rounding_seed: int | None,
                    applied_scale: Any, applied_taus: Any, backend: str,
                    check_finite: bool, contract: int = DEFAULT_CONTRACT,
                    draw: FactorDraw | None = None) -> LowRankCall:
    """Validate every argument (raising TypeError / ValueError naming it, before anything is
    written) and group the weights; `run_lowrank` then performs the pass."""
    count = len(weights)
    if draw is None:
        us = _as_factor_list(us, count, "us")
        vs = _as_factor_list(vs, count, "vs")
    else:
        draw = _checked_draw(draw, count)
        us = _drawable_factor_list(us, count, "us")
        vs = _drawable_factor_list(vs, count, "vs")
        for j, (u, v) in enumerate(zip(us, vs)):
            if (u is None) != (v is None):
                raise ValueError(f"us[{j}] and vs[{j}] must both be given or both be None "
                                 "(drawn)")
    taus = _as_factor_list(taus, count, "taus")
    if (applied_scale is None) != (applied_taus is None):
        raise ValueError("applied_scale and applied_taus go together: pass both (recovery of the "
                         "held perturbation) or neither")
    held_taus = None if applied_taus is None else _as_factor_list(applied_taus, count,
                                                                  "applied_taus")
    rounding = as_choice(rounding, ROUNDINGS, "rounding")
    backend = as_choice(backend, BACKEND_CHOICES, "backend")
    contract = as_contract(contract)
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
    applied_vector = None if applied_scale is None else as_scalar_vector(
        applied_scale, 1, "applied_scale", check_finite=check_finite, allow_broadcast=False)
    for j, (w, u, v, tau) in enumerate(zip(weights, us, vs, taus)):
        if w.dim() != 2:
            raise ValueError(f"weights[{j}] must be 2-D, got shape {tuple(w.shape)}")
        m, n = w.shape
        for name, t in ((f"taus[{j}]", tau),) + (
                () if held_taus is None else ((f"applied_taus[{j}]", held_taus[j]),)):
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating-point tensor")
        if tau.dim() != 1:
            raise ValueError(f"taus[{j}] must be 1-D, got shape {tuple(tau.shape)}")
        drawn = u is None
        if not drawn and (u.dim() != 2 or v.dim() != 2):
            raise ValueError(f"us[{j}], vs[{j}] must be 2-D, got shapes {tuple(u.shape)}, "
                             f"{tuple(v.shape)}")
        r = tau.shape[0]
        if not drawn and (u.shape != (m, r) or v.shape != (n, r)):
            raise ValueError(f"weights[{j}] is {m} x {n} and taus[{j}] has r = {r}: us[{j}] must be "
                             f"({m}, {r}) and vs[{j}] ({n}, {r}), got {tuple(u.shape)} and "
                             f"{tuple(v.shape)}")
        if r == 0:
            raise ValueError(f"taus[{j}] must have rank r >= 1")
        if held_taus is not None and held_taus[j].shape != (r,):
            raise ValueError(f"applied_taus[{j}] must have the shape of taus[{j}] ({r},), got "
                             f"{tuple(held_taus[j].shape)}")
        if drawn and (draw.u_offsets[j] + m * r > 2 ** 64 or draw.v_offsets[j] + n * r > 2 ** 64):
            raise ValueError(f"draw: the factors of weights[{j}] run past index 2^64 of the "
                             "noise stream")
        factors = [] if drawn else [(f"us[{j}]", u), (f"vs[{j}]", v)]
        factors.append((f"taus[{j}]", tau))
        if held_taus is not None:
            factors.append((f"applied_taus[{j}]", held_taus[j]))
        for name, f in factors:
            if f.device != w.device:
                raise ValueError(f"{name} is on {f.device} but weights[{j}] is on {w.device}")
        check_no_internal_overlap(w, f"weights[{j}]")
    # Weights may not overlap each other nor the factors read while they are written.
    factor_lists = (("us", us), ("vs", vs), ("taus", taus)) + (
        () if held_taus is None else (("applied_taus", held_taus),))
    check_no_overlap([(f"weights[{j}]", w) for j, w in enumerate(weights)],
                     [(f"{name}[{j}]", f) for name, fs in factor_lists for j, f in enumerate(fs)
                      if f is not None]
                     + [("scale", scale), ("decay", decay), ("applied_scale", applied_scale)])
    # Resolve every group's backend before writing anything.
    plan = plan_groups(weights, key_list, backend)
    us, vs, taus = ([None if u is None else _float32(u) for u in us],
                    [None if v is None else _float32(v) for v in vs], [_float32(t) for t in taus])
    held_taus = None if held_taus is None else [_float32(t) for t in held_taus]
    if check_finite:  # as scale's check: the optimizers pass check_finite=False (no host sync)
        named = [(f"{name}[{j}]", f) for name, fs in (("us", us), ("vs", vs), ("taus", taus),
                                                      ("applied_taus", held_taus or []))
                 for j, f in enumerate(fs) if f is not None]
        by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
        for name, f in named:
            by_device.setdefault(f.device, []).append((name, f))
        for entries in by_device.values():  # one synchronization per device
            if not bool(torch.isfinite(torch.cat([f.reshape(-1) for _, f in entries])).all()):
                bad = next(name for name, f in entries if not bool(torch.isfinite(f).all()))
                raise ValueError(f"{bad} must be finite in float32")
    return LowRankCall(plan, us, vs, taus, scale_vector, decay_vector, rounding, rounding_seed,
                       held_taus, applied_vector, contract, draw)


def run_lowrank(call: LowRankCall, logs: list | None = None, count_only: bool = False,
                selector_logs: list | None = None, held_logs: list | None = None) -> None:
    """Apply a validated call group by group (shared by lowrank_perturb_ and its logged passes).

    logs: None, or one UndoBuffers per group (docs/undo-log.md); count_only: only count.
    selector_logs / held_logs: None, or one SelectorBuffers per group, written / read."""
    for g, group in enumerate(call.plan):
        device = group.device
        pick = group.indices
        extra: dict[str, Any] = {}
        if call.applied_taus is not None:
            extra.update(applied_taus=[call.applied_taus[j] for j in pick],
                         applied_scale=call.applied_scale.to(device, non_blocking=True))
        if logs is not None:
            extra.update(log=logs[g], count_only=count_only)
        if selector_logs is not None:
            extra.update(selector_log=selector_logs[g], count_only=count_only)
        if held_logs is not None:
            extra["held_log"] = held_logs[g]
        us, vs = [call.us[j] for j in pick], [call.vs[j] for j in pick]
        if call.draw is not None and group.backend == "cpu":
            extra["draw"] = FactorDraw(call.draw.seed, [call.draw.u_offsets[j] for j in pick],
                                       [call.draw.v_offsets[j] for j in pick])
        elif call.draw is not None:
            us, vs = _drawn_factors(call, group, us, vs)
        with torch.no_grad(), contiguous_views(group.tensors, write_back=not count_only) as work:
            implementation(group.backend, "lowrank_perturb")(
                work,
                us,
                vs,
                [call.taus[j] for j in pick],
                call.scale.to(device, non_blocking=True),
                _select(call.decays, pick).to(device, non_blocking=True),
                group.keys,
                call.rounding,
                call.rounding_seed,
                contract=call.contract,
                **extra,
            )


def _drawn_factors(call: LowRankCall, group: PerturbGroup, us: list, vs: list
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A group's drawn factors materialized (float32) for a backend that takes them as tensors."""
    us, vs = list(us), list(vs)
    for i, (j, w, key) in enumerate(zip(group.indices, group.tensors, group.keys)):
        if us[i] is None:
            (m, n), r = w.shape, call.taus[j].shape[0]
            us[i], vs[i] = draw_factors(call.draw.seed, key, m, n, r, call.draw.u_offsets[j],
                                        call.draw.v_offsets[j], device=w.device,
                                        backend=group.backend, contract=call.contract)
    return us, vs


def _check_scatter_factors(log: UndoLog, us: list[torch.Tensor], vs: list[torch.Tensor],
                           taus: list[torch.Tensor] | None, decays: torch.Tensor) -> None:
    """The factors of run_lowrank_scatter, checked against the logged weights before anything
    is written (ValueError naming the first): the kernels index them by the weights' rows and
    columns. Float32, contiguous, on the weight's device: U_j (m, r), V_j (n, r), tau_j (r,),
    one decay per weight."""
    weights = {j: w for group in log.plan for j, w in zip(group.indices, group.tensors)}
    count = max(weights, default=-1) + 1  # at least: empty weights after the last are in no group
    for name, given in (("us", us), ("vs", vs)) + (() if taus is None else (("taus", taus),)):
        if not isinstance(given, (list, tuple)) or len(given) < count:
            raise ValueError(f"{name} must hold one tensor per weight of the logged pass "
                             f"(at least {count})")
    if not isinstance(decays, torch.Tensor) or decays.dtype != torch.float32 or \
            decays.numel() < count:
        raise ValueError(f"decays must be a float32 tensor of one value per weight (at least "
                         f"{count})")
    for j, w in weights.items():
        m, n = w.shape
        r = us[j].shape[-1] if isinstance(us[j], torch.Tensor) else -1
        shapes = [("us", us[j], (m, r)), ("vs", vs[j], (n, r))]
        if taus is not None:
            shapes.append(("taus", taus[j], (r,)))
        for name, t, shape in shapes:
            if (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or r < 1
                    or t.dtype != torch.float32 or not t.is_contiguous() or t.device != w.device):
                got = (f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor)
                       else type(t).__name__)
                raise ValueError(f"{name}[{j}] must be a contiguous float32 tensor of shape "
                                 f"{shape} on {w.device} (weight {j} is {m} x {n}), got {got}")


def run_lowrank_scatter(log: UndoLog, us: list[torch.Tensor], vs: list[torch.Tensor],
                        taus: list[torch.Tensor] | None, scale: torch.Tensor,
                        decays: torch.Tensor, rounding: str = "nearest",
                        rounding_seed: int = 0, contract: int = DEFAULT_CONTRACT) -> None:
    """Rewrite the logged elements of the last low-rank pass of `log`, group by group
    (docs/undo-log.md, "Low-rank groups"): taus None puts the logged values back bit for bit (the
    end of an exact restore); else W = round(decays[j] * logged + scale * P_j(tau_j)) (the end of
    an exact update). us, vs, taus (float32 contiguous), decays (float32 [count]) are in the order
    of the weight list the logged pass was given; call it after the dense pass (restore:
    applied_* with scale 0; update: applied_* with the update's taus and scale). contract: the
    update pass's (its stochastic rounding)."""
    contract = as_contract(contract)
    if log.plan is None:
        return
    log.check_memory("log")
    _check_scatter_factors(log, us, vs, taus, decays)
    for group, buffers in zip(log.plan, log.buffers):
        device = group.device
        pick = group.indices
        with torch.no_grad(), contiguous_views(group.tensors) as work:
            implementation(group.backend, "lowrank_scatter")(
                work, [us[j] for j in pick], [vs[j] for j in pick],
                None if taus is None else [taus[j] for j in pick],
                buffers.index, buffers.values, buffers.count,
                scale.to(device, non_blocking=True),
                _select(decays, pick).to(device, non_blocking=True),
                group.keys, rounding, rounding_seed, contract=contract)


__all__ = ["lowrank_perturb_", "prepare_lowrank", "run_lowrank", "run_lowrank_scatter",
           "FactorDraw", "LowRankCall", "draw_factors"]
