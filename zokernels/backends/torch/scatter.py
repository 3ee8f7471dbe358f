"""scatter_perturb reference: rewrite the elements of an undo log (docs/undo-log.md)."""

import torch

from ..._contract import DEFAULT_CONTRACT
from .index_map import map_indices
from .noise import contract_values_at
from .rounding import round_at


def scatter_perturb_torch(tensors, keys, index, values, count, seeds, scales, decays, dist,
                          rounding, rounding_seed, index_maps=None,
                          contract=DEFAULT_CONTRACT) -> None:
    """For the first min(count, capacity) entries e of a log over `tensors` (group-flat indices,
    in list order): with no seeds, t[index[e]] = values[e] bit for bit; else
    t_j[i] = round(decays[j] * values[e] + sum_k scales[k] * z(seeds[k], keys[j], i)),
    the arithmetic and rounding of perturb_torch, so an entry ends as a dense pass from values[e]
    would leave it. `index_maps`: as in perturb_torch (noise and rounding at g(local index));
    `contract`: the contract version (normals, stochastic rounding)."""
    maps = index_maps if index_maps is not None else [None] * len(tensors)
    used = min(int(count.item()), index.numel())
    index, values = index[:used], values[:used]
    start = 0
    for tensor, key, decay, index_map in zip(tensors, keys, decays, maps):
        numel = tensor.numel()
        mine = (index >= start) & (index < start + numel)
        if mine.any():
            local = index[mine] - start
            flat = tensor.view(-1)
            if len(seeds) == 0:
                flat[local] = values[mine]
            else:
                key_column = torch.full_like(local, key)
                where = local if index_map is None else map_indices(index_map, local)
                noise_sum = torch.zeros(local.numel(), dtype=torch.float32, device=local.device)
                for seed, scale in zip(seeds, scales):
                    z = contract_values_at(seed, key_column, where, dist, contract=contract)
                    noise_sum = noise_sum + scale * z
                acc = values[mine].to(torch.float32) * decay + noise_sum
                flat[local] = round_at(acc, tensor.dtype, rounding, rounding_seed, key_column, where,
                                       contract)
        start += numel

