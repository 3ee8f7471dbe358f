"""lowrank_perturb_ on the CPU: W = round(decay * theta + scale * U diag(tau) V^T), row tiles."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..._contract import DEFAULT_CONTRACT
from .. import one_dtype
from ..undo_buffers import SelectorBuffers, UndoBuffers
from ._codes import DTYPE_CODES, native_contract
from ._loader import load_cpu_extension

# _C.lowrank_perturb's log_mode codes.
_NO_LOG, _LOG, _COUNT_ONLY = 0, 1, 2


def lowrank_perturb_cpu(weights: list[Tensor], us: list[Tensor], vs: list[Tensor],
                        taus: list[Tensor], scale: Tensor, decays: Tensor, keys: list[int],
                        rounding: str, rounding_seed: int, applied_taus: list[Tensor] | None = None,
                        applied_scale: Tensor | None = None, log: UndoBuffers | None = None,
                        count_only: bool = False, selector_log: SelectorBuffers | None = None,
                        held_log: SelectorBuffers | None = None,
                        contract: int = DEFAULT_CONTRACT, draw: Any = None) -> None:
    """In place: W_j = round(decays[j] * theta + scale * P_j(tau_j)), P_j(tau)[row, col] =
    sum_k U_j[row, k] * (V_j[col, k] * tau[k]) summed in k order, unfused: bit-identical to
    lowrank_perturb_torch. theta = W_j, or with `applied_taus` the weight recovered from
    round(theta + applied_scale * P_j(applied_tau_j)) (docs/noise-contract.md, "Recovery").

    With `log`, the elements a later recovery with this D = scale * P could not give back are
    appended to it (in no particular order) and log.count grows by their number, also past the
    capacity; `count_only` writes nothing but log.count (docs/undo-log.md).

    `selector_log` / `held_log` (SelectorBuffers): the selector log this pass writes (nearest
    rounding, decays 1; with `count_only`, only the pool words it needs are counted) / the one
    it reads, with `applied_taus`, to recover every weight exactly: perturb_cpu's format, blocks
    of each weight's flat index in list order (docs/undo-log.md, "Low-rank groups").
    `contract` picks the stochastic rounding (3: the integer one; csrc/rounding.h code 2) and the
    normals of drawn factors: `draw` (ops.lowrank.FactorDraw) for the weights whose us / vs
    entries are None, drawn inside the pass."""
    if count_only and log is None and selector_log is None:
        raise ValueError("lowrank_perturb_cpu: count_only needs a log")
    if (applied_taus is None) != (applied_scale is None):
        raise ValueError("lowrank_perturb_cpu: applied_taus and applied_scale go together")
    keep = [j for j, w in enumerate(weights) if w.numel() > 0]
    if len(keep) < len(weights):
        # an empty weight has nothing to write (and no block in the logs), and its factors'
        # data_ptr may be 0, the kernel's mark of drawn factors: left out
        def kept(values):
            return None if values is None else [values[j] for j in keep]
        weights, us, vs, taus, keys = kept(weights), kept(us), kept(vs), kept(taus), kept(keys)
        applied_taus, decays = kept(applied_taus), decays[keep]
        if draw is not None:
            draw = type(draw)(draw.seed, kept(draw.u_offsets), kept(draw.v_offsets))
        if not weights:
            return
    ext = load_cpu_extension()
    extra = {}
    if applied_taus is not None:
        extra.update(applied_tau_ptrs=[t.data_ptr() for t in applied_taus],
                     applied_scale=float(applied_scale.reshape(-1)[0].item()))
    if log is not None:
        extra.update(log_index_ptr=log.index.data_ptr(), log_values_ptr=log.values.data_ptr(),
                     log_capacity=min(log.index.numel(), log.values.numel()),
                     log_count_ptr=log.count.data_ptr(),
                     log_mode=_COUNT_ONLY if count_only else _LOG)
    if selector_log is not None:
        extra["selector_out"] = [
            selector_log.regions.data_ptr(), selector_log.regions.shape[1],
            selector_log.pool.data_ptr(), selector_log.pool.numel(),
            selector_log.count.data_ptr(), int(count_only)]
    if held_log is not None:
        extra["selector_in"] = [held_log.regions.data_ptr(), held_log.regions.shape[1],
                                held_log.pool.data_ptr(), held_log.pool.numel()]
    codes = native_contract(rounding, contract)
    if draw is not None:
        extra.update(factor_seed=draw.seed, u_offsets=list(draw.u_offsets),
                     v_offsets=list(draw.v_offsets), factor_contract=codes["contract"])
    ext.lowrank_perturb(
        [w.data_ptr() for w in weights], [w.shape[0] for w in weights],
        [w.shape[1] for w in weights], [t.shape[0] for t in taus],
        [0 if u is None else u.data_ptr() for u in us],
        [0 if v is None else v.data_ptr() for v in vs], [t.data_ptr() for t in taus],
        decays.tolist(), float(scale.reshape(-1)[0].item()), list(keys),
        DTYPE_CODES[one_dtype(weights, "lowrank_perturb_cpu")], codes["rounding"], rounding_seed,
        torch.get_num_threads(), **extra)
