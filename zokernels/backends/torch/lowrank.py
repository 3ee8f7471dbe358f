"""Low-rank perturbation reference: W = round(decay * W + scale * U diag(tau) V^T)."""

import torch

from .rounding import round_to

# Rows per chunk: the m x n product is never materialized whole.
_ROW_ELEMENTS = 1 << 22


def lowrank_perturb_torch(weights, us, vs, taus, scale, decays, keys, rounding, rounding_seed) -> None:
    """In place, fp32 accumulation, one rounding per element (reference)."""
    for weight, u, v, tau, decay, key in zip(weights, us, vs, taus, decays, keys):
        m, n = weight.shape
        rows = max(1, _ROW_ELEMENTS // max(n, 1))
        scaled_v = (v * tau).T  # r x n; the scale multiplies the product, as in the kernels
        for row in range(0, m, rows):
            block = weight[row:row + rows]
            acc = block.to(torch.float32) * decay + scale * (u[row:row + rows] @ scaled_v)
            block.copy_(round_to(acc, weight.dtype, rounding, rounding_seed, key, row * n))
