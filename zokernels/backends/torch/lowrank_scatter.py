"""lowrank_scatter reference: rewrite the elements of a low-rank pass's undo log."""

import torch

from ..._contract import DEFAULT_CONTRACT
from .lowrank import scaled_factor_t
from .rounding import round_at


def lowrank_scatter_torch(weights, us, vs, taus, index, values, count, scale, decays, keys,
                          rounding, rounding_seed, contract=DEFAULT_CONTRACT) -> None:
    """For the first min(count, capacity) entries e of a log over `weights` (group-flat indices,
    in list order), element i = row * n + col of weight j:

        taus None:  W_j[i] = values[e]                                    (bit copy: restore)
        else:       W_j[i] = round(decays[j] * values[e] + scale * P(tau_j)[row, col])

    with lowrank_perturb_torch's P (k in order, unfused) and rounding at (keys[j], i) (`contract`
    picks the stochastic rounding), so an entry ends bit for bit as the dense pass from values[e]
    would leave it."""
    used = min(int(count.item()), index.numel())
    index, values = index[:used], values[:used]
    start = 0
    for j, (weight, u, v, decay, key) in enumerate(zip(weights, us, vs, decays, keys)):
        m, n = weight.shape
        mine = (index >= start) & (index < start + m * n)
        if mine.any():
            local = index[mine] - start
            flat = weight.view(-1)
            if taus is None:
                flat[local] = values[mine]
            else:
                row, col = local // n, local % n
                vt_tau = scaled_factor_t(v, taus[j])
                prod = u[row, 0] * vt_tau[0, col]
                for k in range(1, vt_tau.shape[0]):
                    prod = prod + u[row, k] * vt_tau[k, col]
                acc = values[mine].to(torch.float32) * decay + scale * prod
                flat[local] = round_at(acc, weight.dtype, rounding, rounding_seed,
                                       torch.full_like(local, key), local, contract)
        start += m * n
