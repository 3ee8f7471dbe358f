"""lowrank_perturb_ on the CPU: W = round(decay * W + scale * U diag(tau) V^T), row tiles."""

from __future__ import annotations

import torch
from torch import Tensor

from ._codes import DTYPE_CODES, ROUNDING_CODES
from ._loader import load_cpu_extension


def lowrank_perturb_cpu(weights: list[Tensor], us: list[Tensor], vs: list[Tensor],
                        taus: list[Tensor], scale: Tensor, decays: Tensor, keys: list[int],
                        rounding: str, rounding_seed: int) -> None:
    ext = load_cpu_extension()
    ext.lowrank_perturb(
        [w.data_ptr() for w in weights], [w.shape[0] for w in weights],
        [w.shape[1] for w in weights], [u.shape[1] for u in us], [u.data_ptr() for u in us],
        [v.data_ptr() for v in vs], [t.data_ptr() for t in taus], decays.tolist(),
        float(scale.reshape(-1)[0].item()), list(keys), DTYPE_CODES[weights[0].dtype],
        ROUNDING_CODES[rounding], rounding_seed, torch.get_num_threads())
