"""scatter_perturb on the CPU: rewrite the elements of an undo log (docs/undo-log.md)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..._contract import DEFAULT_CONTRACT
from .. import one_dtype
from ._codes import DIST_CODES, DTYPE_CODES, native_contract
from ._loader import load_cpu_extension
from .perturb import index_map_kwargs


def scatter_perturb_cpu(tensors: list[Tensor], keys: list[int], index: Tensor, values: Tensor,
                        count: Tensor, seeds: list[int], scales: Tensor, decays: Tensor, dist: str,
                        rounding: str, rounding_seed: int, index_maps: list | None = None,
                        contract: int = DEFAULT_CONTRACT) -> None:
    """For the first min(count, capacity) entries e of a log over `tensors` (group-flat indices,
    in list order): with no seeds, t[index[e]] = values[e] bit for bit; else
    t_j[i] = round(decays[j] * values[e] + sum_k scales[k] * z(seeds[k], keys[j], g(i))) with
    perturb_cpu's arithmetic and rounding, so an entry ends as a dense pass from values[e] would
    leave it. `index_maps` as in perturb_cpu: the log's indices are local, g(i) is where the
    noise and the rounding uniform are drawn. `contract`: 1, 2 or 3 (normals,
    stochastic rounding)."""
    ext = load_cpu_extension()
    codes = native_contract(rounding, contract)
    dtype_code = DTYPE_CODES[one_dtype(tensors, "scatter_perturb_cpu")]
    ext.scatter_perturb([t.data_ptr() for t in tensors], [t.numel() for t in tensors], list(keys),
                        decays.tolist(), dtype_code, index.data_ptr(),
                        values.data_ptr(), min(index.numel(), values.numel()), count.data_ptr(),
                        list(seeds), scales.tolist(), DIST_CODES[dist], codes["rounding"],
                        rounding_seed, torch.get_num_threads(),
                        **index_map_kwargs(tensors, index_maps), contract=codes["contract"])
