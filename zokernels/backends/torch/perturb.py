"""perturb_ reference: t = round(decay * t + D), D = sum_k scales[k] * z(seeds[k], key, i)."""

import torch

from .noise import contract_values
from .rounding import recover, round_to

# Elements per chunk: bounds the reference's temporaries; chunking does not change z.
_CHUNK = 1 << 22


def perturb_torch(tensors, keys, seeds, scales, decays, dist, rounding, rounding_seed,
                  applied=None) -> None:
    """In place, in float32, one rounding per element (reference for every fast path).

    The noise sum D is accumulated from 0 in seed order and added to the weight once. With
    `applied` (the coefficients of the perturbation the tensors hold now, same seeds), each
    weight is first recovered from its perturbed value (docs/noise-contract.md, "Recovery").
    """
    for tensor, key, decay in zip(tensors, keys, decays):
        flat = tensor.view(-1)
        for start in range(0, flat.numel(), _CHUNK):
            chunk = flat[start:start + _CHUNK]
            noise_sum = torch.zeros(chunk.numel(), dtype=torch.float32, device=chunk.device)
            applied_sum = torch.zeros_like(noise_sum)
            for k, (seed, scale) in enumerate(zip(seeds, scales)):
                z = contract_values(seed, key, start, chunk.numel(), dist, chunk.device)
                noise_sum = noise_sum + scale * z
                if applied is not None:
                    applied_sum = applied_sum + applied[k] * z
            theta = chunk.to(torch.float32)
            if applied is not None:
                theta = recover(theta, applied_sum, tensor.dtype)
            acc = theta * decay + noise_sum
            chunk.copy_(round_to(acc, tensor.dtype, rounding, rounding_seed, key, start))
