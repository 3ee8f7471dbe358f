"""Low-rank perturbation reference: W = round(decay * W + scale * U diag(tau) V^T), with recovery
(applied_taus / applied_scale), the undo log and the selector logs (docs/undo-log.md, "Low-rank
groups")."""

import torch

from ..._contract import DEFAULT_CONTRACT
from .. import check_selector_rows
from .rounding import lost_by_recovery, recover, round_to
from .selector_log import BLOCK, log_tensor, n_blocks, recover_tensor

# Elements per chunk of a weight's flat index (a multiple of the selector log's BLOCK, so a chunk
# holds whole blocks): the m x n product is never materialized whole. The product takes 2r
# elementwise passes over a chunk: on the CPU a cache-resident chunk (64 KiB of float32) made the
# reference about 5x faster than 4M-element chunks (768 x 3072, r = 16: ~75 ms instead of
# 430-940 ms, a shared 2-core machine); on a GPU big chunks keep the kernel launches few.
_ROW_ELEMENTS = {"cpu": 1 << 14}
_ROW_ELEMENTS_DEFAULT = 1 << 22


def scaled_factor_t(v: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """(V diag(tau))^T, r x n: the float32 products V[col, k] * tau[k], formed once per call."""
    return (v * tau).T.contiguous()


def lowrank_product(u_rows: torch.Tensor, vt_tau: torch.Tensor) -> torch.Tensor:
    """P[row, col] = U[row, 0] * vt_tau[0, col] + U[row, 1] * vt_tau[1, col] + ..., in k order,
    each product and each sum rounded to float32 (no fma, no BLAS blocking): the C++ kernel's
    order, so the two agree bit for bit, and a scattered element can be given the same bits."""
    prod = u_rows[:, :1] * vt_tau[:1]
    term = torch.empty_like(prod)  # in place: r - 1 passes over the chunk, no allocations
    for k in range(1, vt_tau.shape[0]):
        torch.mul(u_rows[:, k:k + 1], vt_tau[k:k + 1], out=term)
        prod.add_(term)
    return prod


def lowrank_perturb_torch(weights, us, vs, taus, scale, decays, keys, rounding, rounding_seed,
                          applied_taus=None, applied_scale=None, log=None,
                          count_only=False, selector_log=None, held_log=None,
                          contract=DEFAULT_CONTRACT) -> None:
    """In place, fp32 arithmetic, one rounding per element (reference for every fast path):

        D     = scale * P(tau),   P(tau)[row, col] = sum_k U[row, k] * (V[col, k] * tau[k])
        theta = W, or recover(W, applied_scale * P(applied_tau)) with applied_taus
        W     = round(decay * theta + D)

    With `log` (UndoBuffers; nearest rounding, decay 1), the elements whose theta a later
    recovery with this D would not give back (or NaN, -0.0) are appended as (group-flat index,
    theta) in element order; `count_only` writes nothing but log.count (docs/undo-log.md).
    `selector_log` / `held_log` (SelectorBuffers): as perturb_torch's, over blocks of each
    weight's flat index row * n + col, the weights' blocks in list order: the selectors a later
    pass needs to recover every weight exactly / those of the perturbation held now (with
    applied_taus), read to recover it exactly; an element the pass leaves at its value (D == 0,
    decay 1) then keeps theta's exact pattern. `contract` picks the stochastic rounding
    (docs/noise-contract.md: 3 the integer one, else the uniform-based one).
    """
    check_selector_rows(selector_log, held_log, "lowrank_perturb_torch")
    start = 0  # group-flat index of the weight's first element
    first_block = 0  # the weight's first selector-log block
    for j, (weight, u, v, tau, decay, key) in enumerate(zip(weights, us, vs, taus, decays, keys)):
        m, n = weight.shape
        chunk = -(-_ROW_ELEMENTS.get(weight.device.type, _ROW_ELEMENTS_DEFAULT) // BLOCK) * BLOCK
        vt_tau = scaled_factor_t(v, tau)
        vt_held = None if applied_taus is None else scaled_factor_t(v, applied_taus[j])
        flat = weight.view(-1)
        for a in range(0, m * n, chunk):
            b = min(a + chunk, m * n)
            # the rows covering flat elements [a, b), their product cut to [a, b)
            rows = slice(a // n, -(-b // n))
            part = slice(a - rows.start * n, b - rows.start * n)
            noise_sum = scale * lowrank_product(u[rows], vt_tau).view(-1)[part]
            x = flat[a:b]
            theta = x.to(torch.float32)
            block = first_block + a // BLOCK
            if vt_held is not None:
                held = (applied_scale * lowrank_product(u[rows], vt_held)).view(-1)[part]
                if held_log is not None:
                    theta_exact = recover_tensor(held_log.regions, held_log.pool, block, x, held)
                    theta = theta_exact.to(torch.float32)
                else:
                    theta = recover(theta, held, weight.dtype)
                    theta_exact = theta.to(weight.dtype)
            else:
                theta_exact = x.clone()
            acc = theta * decay + noise_sum
            written = round_to(acc, weight.dtype, rounding, rounding_seed, key, a, contract)
            if log is not None:
                lost = lost_by_recovery(theta, written, noise_sum, weight.dtype)
                _append(log, start + a + lost.nonzero().view(-1), theta[lost], count_only)
            if held_log is not None:
                # left at its value (a restore, scale 0): theta's exact bits (-0.0, NaN payloads)
                written = torch.where((noise_sum == 0) & (decay == 1), theta_exact, written)
            if selector_log is not None:  # of what is stored: a reader sees that
                log_tensor(selector_log.regions, selector_log.pool, selector_log.count, block,
                           theta_exact, written, noise_sum, count_only)
            if not count_only:
                x.copy_(written)
        start += m * n
        first_block += n_blocks(m * n)


def _append(log, indices: torch.Tensor, values: torch.Tensor, count_only: bool) -> None:
    """Entries past the capacity are counted, not stored (docs/undo-log.md)."""
    first = int(log.count.item())
    log.count.add_(indices.numel())
    if count_only:
        return
    room = max(0, min(indices.numel(), log.capacity - first))
    log.index[first:first + room] = indices[:room]
    log.values[first:first + room] = values[:room].to(log.values.dtype)
