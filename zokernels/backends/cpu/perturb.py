"""perturb_ on the CPU: all tensors of one dtype and all K seeds in one fused pass."""

from __future__ import annotations

import torch
from torch import Tensor

from ._codes import DIST_CODES, DTYPE_CODES, ROUNDING_CODES
from ._loader import load_cpu_extension


def perturb_cpu(tensors: list[Tensor], keys: list[int], seeds: list[int], scales: Tensor,
                decays: Tensor, dist: str, rounding: str, rounding_seed: int,
                applied: Tensor | None = None) -> None:
    """In place: t[i] = round(decays[j] * t[i] + D), D = sum_k scales[k] * z(seeds[k], keys[j], i)
    summed from 0 in seed order. With `applied` (float32 [K]), the perturbation sum_k applied[k] * z
    that t holds now is undone first (docs/noise-contract.md, "Recovery")."""
    ext = load_cpu_extension()
    ext.perturb([t.data_ptr() for t in tensors], [t.numel() for t in tensors], list(keys),
                decays.tolist(), DTYPE_CODES[tensors[0].dtype], list(seeds), scales.tolist(),
                [] if applied is None else applied.tolist(), DIST_CODES[dist],
                ROUNDING_CODES[rounding], rounding_seed, torch.get_num_threads())
