"""lowrank_scatter on the CPU: rewrite the elements of a low-rank pass's undo log."""

from __future__ import annotations

import torch
from torch import Tensor

from ..._contract import DEFAULT_CONTRACT
from .. import one_dtype
from ._codes import DTYPE_CODES, native_contract
from ._loader import load_cpu_extension


def lowrank_scatter_cpu(weights: list[Tensor], us: list[Tensor], vs: list[Tensor],
                        taus: list[Tensor] | None, index: Tensor, values: Tensor, count: Tensor,
                        scale: Tensor, decays: Tensor, keys: list[int], rounding: str,
                        rounding_seed: int, contract: int = DEFAULT_CONTRACT) -> None:
    """For the first min(count, capacity) entries e of a log over `weights` (group-flat indices,
    in list order): taus None, W[index[e]] = values[e] bit for bit; else
    W_j[i] = round(decays[j] * values[e] + scale * P_j(tau_j)[row, col]) with lowrank_perturb_cpu's
    P and rounding (`contract` 3: the integer stochastic rounding): bit-identical to the dense
    pass from values[e] (and to the torch reference).
    Raises ValueError for indices outside the weights (after writing the others)."""
    ext = load_cpu_extension()
    ext.lowrank_scatter(
        [w.data_ptr() for w in weights], [w.shape[0] for w in weights],
        [w.shape[1] for w in weights], [u.shape[1] for u in us], [u.data_ptr() for u in us],
        [v.data_ptr() for v in vs], [] if taus is None else [t.data_ptr() for t in taus],
        decays.tolist(), float(scale.reshape(-1)[0].item()), list(keys),
        DTYPE_CODES[one_dtype(weights, "lowrank_scatter_cpu")], index.data_ptr(), values.data_ptr(),
        min(index.numel(), values.numel()), count.data_ptr(),
        native_contract(rounding, contract)["rounding"],
        rounding_seed, torch.get_num_threads())
