"""perturb_ reference: t = round(decay * t + sum_k scales[k] * z(seeds[k], key, i))."""

import torch

from .noise import contract_values
from .rounding import round_to

# Elements per chunk: bounds the reference's temporaries; chunking does not change z.
_CHUNK = 1 << 22


def perturb_torch(tensors, keys, seeds, scales, decays, dist, rounding, rounding_seed) -> None:
    """In place, in float32, one rounding per element (reference for every fast path)."""
    for tensor, key, decay in zip(tensors, keys, decays):
        flat = tensor.view(-1)
        for start in range(0, flat.numel(), _CHUNK):
            chunk = flat[start:start + _CHUNK]
            acc = chunk.to(torch.float32) * decay
            for seed, scale in zip(seeds, scales):
                acc = acc + scale * contract_values(seed, key, start, chunk.numel(), dist, chunk.device)
            chunk.copy_(round_to(acc, tensor.dtype, rounding, rounding_seed, key, start))
