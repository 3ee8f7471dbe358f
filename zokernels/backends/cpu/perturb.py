"""perturb_ on the CPU: all tensors of one dtype and all K seeds in one fused pass."""

from __future__ import annotations

import torch
from torch import Tensor

from ..undo_buffers import UndoBuffers
from ._codes import DIST_CODES, DTYPE_CODES, ROUNDING_CODES
from ._loader import load_cpu_extension

# _C.perturb's log_mode codes.
_NO_LOG, _LOG, _COUNT_ONLY = 0, 1, 2


def perturb_cpu(tensors: list[Tensor], keys: list[int], seeds: list[int], scales: Tensor,
                decays: Tensor, dist: str, rounding: str, rounding_seed: int,
                applied: Tensor | None = None, log: UndoBuffers | None = None,
                count_only: bool = False) -> None:
    """In place: t[i] = round(decays[j] * t[i] + D), D = sum_k scales[k] * z(seeds[k], keys[j], i)
    summed from 0 in seed order. With `applied` (float32 [K]), the perturbation sum_k applied[k] * z
    that t holds now is undone first (docs/noise-contract.md, "Recovery").

    With `log`, the elements a later recovery could not give back are appended to it (in no
    particular order) and log.count grows by their number, also past the capacity; `count_only`
    writes nothing but log.count (docs/undo-log.md)."""
    if count_only and log is None:
        raise ValueError("perturb_cpu: count_only needs a log")
    ext = load_cpu_extension()
    log_args = {}
    if log is not None:
        log_args = dict(log_index_ptr=log.index.data_ptr(), log_values_ptr=log.values.data_ptr(),
                        log_capacity=min(log.index.numel(), log.values.numel()),
                        log_count_ptr=log.count.data_ptr(),
                        log_mode=_COUNT_ONLY if count_only else _LOG)
    ext.perturb([t.data_ptr() for t in tensors], [t.numel() for t in tensors], list(keys),
                decays.tolist(), DTYPE_CODES[tensors[0].dtype], list(seeds), scales.tolist(),
                [] if applied is None else applied.tolist(), DIST_CODES[dist],
                ROUNDING_CODES[rounding], rounding_seed, torch.get_num_threads(), **log_args)
