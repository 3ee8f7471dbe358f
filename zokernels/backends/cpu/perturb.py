"""perturb_ on the CPU: all tensors of one dtype and all K seeds in one fused pass."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..._contract import DEFAULT_CONTRACT
from .. import check_sources, one_dtype
from ..undo_buffers import SelectorBuffers, UndoBuffers
from ._codes import DIST_CODES, DTYPE_CODES, native_contract
from ._loader import load_cpu_extension

# _C.perturb's log_mode codes.
_NO_LOG, _LOG, _COUNT_ONLY = 0, 1, 2


def index_map_kwargs(tensors: list[Tensor], index_maps: list | None) -> dict:
    """The index maps as _C's trailing keyword arguments: three lists of uint64 (index_offsets,
    index_local_spans, index_global_spans), one value each per tensor, (0, numel, numel) for an
    identity entry; {} (the unmapped kernels) when no tensor is mapped. A map (offset,
    local_span, global_span) sends local element i to contract index
    g(i) = offset + (i // local_span) * global_span + i % local_span."""
    if index_maps is None:
        return {}
    offsets, local_spans, global_spans = [], [], []
    any_mapped = False
    for tensor, index_map in zip(tensors, index_maps, strict=True):
        numel = tensor.numel()
        offset, local_span, global_span = (0, numel, numel) if index_map is None else index_map
        # g(i) = i: offset 0 and one run, or runs that follow each other without a gap.
        identity = offset == 0 and (local_span == numel or local_span == global_span)
        any_mapped = any_mapped or not identity
        offsets.append(int(offset))
        local_spans.append(int(local_span))
        global_spans.append(int(global_span))
    if not any_mapped:
        return {}
    return dict(index_offsets=offsets, index_local_spans=local_spans,
                index_global_spans=global_spans)


def perturb_cpu(tensors: list[Tensor], keys: list[int], seeds: list[int], scales: Tensor,
                decays: Tensor, dist: str, rounding: str, rounding_seed: int,
                applied: Tensor | None = None, log: UndoBuffers | None = None,
                count_only: bool = False, index_maps: list | None = None,
                table_cache: dict | None = None, selector_log: SelectorBuffers | None = None,
                held_log: SelectorBuffers | None = None,
                contract: int = DEFAULT_CONTRACT, sources: list[Tensor] | None = None) -> None:
    """In place: t[i] = round(decays[j] * t[i] + D),
    D = sum_k scales[k] * z(seeds[k], keys[j], g(i)) summed from 0 in seed order. With `applied`
    (float32 [K]), the perturbation sum_k applied[k] * z that t holds now is undone first
    (docs/noise-contract.md, "Recovery").

    `index_maps`: None (g(i) = i for every tensor), or one entry per tensor, None or
    (offset, local_span, global_span): the tensor is a shard of a bigger one and its element i is
    element g(i) = offset + (i // local_span) * global_span + i % local_span of the whole tensor,
    where its noise and stochastic-rounding uniform are drawn (docs/backends.md).

    With `log`, the elements a later recovery could not give back are appended to it (in no
    particular order, local group-flat indices) and log.count grows by their number, also past the
    capacity; `count_only` writes nothing but log.count (docs/undo-log.md).

    `table_cache`: a dict the caller keeps for exactly this list of tensors (same objects, same
    storage; ParameterSpace makes a new one when a storage changes): the per-tensor lists handed
    to _C (addresses, sizes, keys, maps) are built once into it instead of on every call, which
    is most of the host time for thousands of tiny tensors (LoRA).

    `selector_log` / `held_log` (SelectorBuffers): the selector log this pass writes (nearest
    rounding, decays 1; with `count_only`, only the pool words it needs are counted) / the one
    it reads, with `applied`, to recover every weight exactly (docs/undo-log.md).
    `contract`: 1, 2 or 3 (docs/noise-contract.md): the gaussian normals and the stochastic
    rounding. `sources` (None, or one contiguous tensor per tensor, same dtype and numel; without
    `applied` and the logs): out of place, t[i] = round(decays[j] * s[i] + D), s only read."""
    check_sources(tensors, sources, applied, log, selector_log, held_log, "perturb_cpu")
    if count_only and log is None and selector_log is None:
        raise ValueError("perturb_cpu: count_only needs a log")
    ext = load_cpu_extension()
    native_args = {}
    if log is not None:
        native_args = dict(log_index_ptr=log.index.data_ptr(),
                           log_values_ptr=log.values.data_ptr(),
                           log_capacity=min(log.index.numel(), log.values.numel()),
                           log_count_ptr=log.count.data_ptr(),
                           log_mode=_COUNT_ONLY if count_only else _LOG)
    static = None if table_cache is None else table_cache.get("cpu")
    if static is None:
        static = ([t.data_ptr() for t in tensors], [t.numel() for t in tensors], list(keys),
                  index_map_kwargs(tensors, index_maps),
                  DTYPE_CODES[one_dtype(tensors, "perturb_cpu")])
        if table_cache is not None:
            table_cache["cpu"] = static
    ptrs, numels, key_list, map_args, dtype_code = static
    if selector_log is not None:
        native_args["selector_out"] = [
            selector_log.regions.data_ptr(), selector_log.regions.shape[1],
            selector_log.pool.data_ptr(), selector_log.pool.numel(),
            selector_log.count.data_ptr(), int(count_only)]
    if held_log is not None:
        native_args["selector_in"] = [held_log.regions.data_ptr(), held_log.regions.shape[1],
                                   held_log.pool.data_ptr(), held_log.pool.numel()]
    if sources is not None:
        native_args["source_ptrs"] = [s.data_ptr() for s in sources]
    codes = native_contract(rounding, contract)
    ext.perturb(ptrs, numels, key_list, decays.tolist(), dtype_code,
                list(seeds), scales.tolist(), [] if applied is None else applied.tolist(),
                DIST_CODES[dist], codes["rounding"], rounding_seed, torch.get_num_threads(),
                **native_args, **map_args, contract=codes["contract"])


def perturb_pieces_cpu(seeds: list[int], scales: list[float], dist: str, rounding: str,
                       rounding_seed: int, contract: int = DEFAULT_CONTRACT
                       ) -> Callable[..., None]:
    """perturb_cpu for many small passes of one perturbation (decays 1, no logs, no recovery),
    its constant arguments bound once. The returned call(pointers, numels, dtype, keys, starts,
    sources=None) writes piece k (numels[k] contiguous elements of `dtype` at address
    pointers[k]) as piece[i] = round(s[i] + sum_j scales[j] * z(seeds[j], keys[k],
    starts[k] + i)), s the piece itself or the contiguous elements at sources[k] (addresses):
    CPU memory the caller owns and keeps alive (not validated here). The virtual dense probes
    draw ~45 chunks per forward on `small`: binding saves 1.4-2.5 ms of a step at 1 thread
    (benchmarks/dense_probe_calls.py, docs/dense-probes.md); addresses let an embedding's rows
    be drawn without a tensor per row."""
    ext = load_cpu_extension()
    codes = native_contract(rounding, contract)
    seeds, scales, dist_code = list(seeds), list(scales), DIST_CODES[dist]

    def call(pointers: list[int], numels: list[int], dtype: torch.dtype, keys: list[int],
             starts: list[int], sources: list[int] | None = None) -> None:
        extra: dict = {}
        if any(starts):  # element i of piece k is element starts[k] + i of its tensor
            extra = dict(index_offsets=list(starts), index_local_spans=numels,
                         index_global_spans=numels)
        if sources is not None:
            extra["source_ptrs"] = sources
        ext.perturb(pointers, numels, list(keys), [1.0] * len(pointers), DTYPE_CODES[dtype],
                    seeds, scales, [], dist_code, codes["rounding"], rounding_seed,
                    torch.get_num_threads(), contract=codes["contract"], **extra)
    return call
