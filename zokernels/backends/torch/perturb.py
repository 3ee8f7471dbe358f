"""perturb_ reference: t = round(decay * t + D), D = sum_k scales[k] * z(seeds[k], key, i)
(out of place with sources: t = round(decay * s + D))."""

import torch

from ..._contract import DEFAULT_CONTRACT
from .. import check_selector_rows, check_sources
from .index_map import global_indices
from .noise import contract_values, contract_values_at
from .rounding import lost_by_recovery, recover, round_at, round_to
from .selector_log import BLOCK, log_tensor, recover_tensor

# Elements per chunk: bounds the reference's temporaries; chunking does not change z.
_CHUNK = 1 << 22


def perturb_torch(tensors, keys, seeds, scales, decays, dist, rounding, rounding_seed,
                  applied=None, log=None, count_only=False, index_maps=None, selector_log=None,
                  held_log=None, contract=DEFAULT_CONTRACT, sources=None) -> None:
    """In place, in float32, one rounding per element (reference for every fast path).

    The noise sum D is accumulated from 0 in seed order and added to the weight once. With
    `applied` (the coefficients of the perturbation the tensors hold now, same seeds), each
    weight is first recovered from its perturbed value (docs/noise-contract.md, "Recovery").
    With `log` (UndoBuffers), the elements recovery could not give back afterwards are appended
    to the log, in element order; `count_only` writes nothing but log.count (docs/undo-log.md).
    `index_maps` (one (offset, local_span, global_span) or None per tensor) gives a shard's local
    element i the contract index g(i) of the unsharded tensor, for z and for stochastic rounding
    (docs/sharding.md); the log keeps local indices. `contract` (1 or 2): the version of the
    gaussian normals (docs/noise-contract.md).
    `selector_log` (SelectorBuffers, nearest rounding and decay 1 only) receives the selectors
    a later pass needs to recover every weight exactly from what this pass writes; `held_log`
    (with `applied`) holds those of the perturbation the tensors hold now, read to recover them
    exactly (selector_log.py, docs/undo-log.md). `count_only` with `selector_log`: only the pool
    words the pass needs are counted, nothing is written.
    `sources` (None, or one tensor per tensor, same dtype and numel; without `applied` and the
    logs): out of place, t = round(decay * s + D), s only read.
    """
    check_sources(tensors, sources, applied, log, selector_log, held_log, "perturb_torch")
    check_selector_rows(selector_log, held_log, "perturb_torch")
    maps = index_maps if index_maps is not None else [None] * len(tensors)
    sources = sources if sources is not None else tensors
    start = 0  # group-flat index of the tensor's first element
    block = 0  # the tensor's first selector-log block
    for tensor, source, key, decay, index_map in zip(tensors, sources, keys, decays, maps):
        flat, read = tensor.view(-1), source.reshape(-1)
        for offset in range(0, flat.numel(), _CHUNK):
            chunk = flat[offset:offset + _CHUNK]
            where = None if index_map is None else global_indices(index_map, offset, chunk.numel(),
                                                                   chunk.device)
            noise_sum = torch.zeros(chunk.numel(), dtype=torch.float32, device=chunk.device)
            applied_sum = torch.zeros_like(noise_sum)
            for k, (seed, scale) in enumerate(zip(seeds, scales)):
                if where is None:
                    z = contract_values(seed, key, offset, chunk.numel(), dist, chunk.device,
                                        contract=contract)
                else:
                    z = contract_values_at(seed, torch.full_like(where, key), where, dist,
                                           contract=contract)
                noise_sum = noise_sum + scale * z
                if applied is not None:
                    applied_sum = applied_sum + applied[k] * z
            theta_in = read[offset:offset + _CHUNK]
            theta = theta_in.to(torch.float32)
            chunk_block = block + offset // BLOCK
            if applied is not None and held_log is not None:
                theta_exact = recover_tensor(held_log.regions, held_log.pool, chunk_block,
                                             chunk, applied_sum)
                theta = theta_exact.to(torch.float32)
            elif applied is not None:
                theta = recover(theta, applied_sum, tensor.dtype)
                theta_exact = theta.to(tensor.dtype)
            else:
                theta_exact = theta_in.clone()
            acc = theta * decay + noise_sum
            if where is None:
                written = round_to(acc, tensor.dtype, rounding, rounding_seed, key, offset,
                                   contract)
            else:
                written = round_at(acc, tensor.dtype, rounding, rounding_seed,
                                   torch.full_like(where, key), where, contract)
            if log is not None:
                lost = lost_by_recovery(theta, written, noise_sum, tensor.dtype)
                _append(log, start + offset + lost.nonzero().view(-1), theta[lost], count_only)
            if held_log is not None:
                # an element the pass leaves at its value keeps theta's exact pattern (-0.0,
                # NaN payloads): a restore (scale 0) gives back the bits
                keep = (noise_sum == 0) & (decay == 1)
                written = torch.where(keep, theta_exact, written)
            if selector_log is not None:  # of what is stored: a reader sees that
                log_tensor(selector_log.regions, selector_log.pool, selector_log.count,
                           chunk_block, theta_exact, written, noise_sum, count_only)
            if not count_only:
                chunk.copy_(written)
        start += flat.numel()
        block += -(-flat.numel() // BLOCK)


def _append(log, indices: torch.Tensor, values: torch.Tensor, count_only: bool) -> None:
    """Entries past the capacity are counted, not stored (docs/undo-log.md)."""
    first = int(log.count.item())
    log.count.add_(indices.numel())
    if count_only:
        return
    room = max(0, min(indices.numel(), log.capacity - first))
    log.index[first:first + room] = indices[:room]
    log.values[first:first + room] = values[:room].to(log.values.dtype)
