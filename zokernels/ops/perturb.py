"""zokernels.perturb_: K seeded perturbations, decay and rounding in one pass over memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .._contract import DEFAULT_CONTRACT, PERTURB_DISTS, ROUNDINGS, as_contract
from .._dispatch import BACKEND_CHOICES, implementation, resolve_backend
from .._validate import (
    as_choice,
    as_index_maps,
    as_keys,
    as_scalar_vector,
    as_seed,
    as_seed_list,
    as_tensor_list,
    check_no_internal_overlap,
    check_no_overlap,
)
from ._groups import contiguous_views, group_indices, select as _select


def perturb_(tensors: torch.Tensor | list[torch.Tensor], seeds: int | list[int],
             scales: Any, *, keys: list[int] | None = None, decay: Any = 1.0,
             dist: str = "gaussian", rounding: str = "nearest", rounding_seed: int | None = None,
             applied: Any = None, index_maps: Any = None, backend: str = "auto",
             check_finite: bool = True, contract: int = DEFAULT_CONTRACT,
             sources: torch.Tensor | list[torch.Tensor] | None = None) -> None:
    """In place: t_j[i] = round(decay_j * t_j[i] + sum_k scales[k] * z(seeds[k], keys[j], i))
    (out of place with `sources`: s_j[i] read instead of t_j[i]).

    One read and one write of every element, whatever the number of seeds K: this is how MeZO's
    restore + update fuse into a single pass and how PseuZO applies a 14-seed window.

    Args:
        tensors: a tensor or a list of tensors (float32, bfloat16 or float16; any devices; may be
            nn.Parameters, no autograd history is recorded). Tensors on the same device and of the
            same dtype are processed by one kernel launch. Non-contiguous tensors are handled
            through a temporary contiguous copy; overlapping or aliased tensors are refused.
        seeds: K >= 1 step seeds in [0, 2^64) (an int or a sequence).
        scales: K coefficients: numbers, or a float tensor of K elements (on any device; a device
            tensor feeds the kernel without a host synchronization when check_finite=False).
        keys: one key in [0, 2^32) per tensor (default: its position in `tensors`); z depends only
            on (seed, key, element index), so a tensor's noise does not change when other tensors
            are added, removed or reordered.
        decay: a number, or one per tensor (weight decay on some tensors only); number or tensor.
        dist: "gaussian" or "rademacher".
        rounding: "nearest" or "stochastic" (bf16/fp16 only: unbiased, at most one ulp; its random
            bits come from stream 1 of `rounding_seed`, default seeds[0], independent of z).
        applied: None, or K coefficients (numbers or a tensor) of the perturbation the tensors hold
            now, with the same seeds: t = round(theta + sum_k applied[k] * z_k), nearest rounding,
            decay 1. Each weight theta is then recovered exactly (where it is the only weight that
            rounds to the perturbed value) before the new perturbation is applied, so a ZO step
            (+eps, then -eps with applied=+eps, then the update with applied=-eps) restores far
            more weights bit for bit than adding -2 eps and +eps (docs/noise-contract.md).
        index_maps: None, or one entry per tensor: None (unsharded) or an
            (offset, local_span, global_span) triple (zokernels.sharding.IndexMap) saying that
            the tensor is a shard whose local flat element i is element
            g(i) = offset + (i // local_span) * global_span + i % local_span of the unsharded
            tensor: z and the stochastic-rounding bits are drawn at g(i), so perturbing every
            shard equals perturbing the unsharded tensor bit for bit (docs/sharding.md).
        backend: "auto" (triton for CUDA tensors, cpu for CPU tensors), "triton", "cpu" or "torch".
        check_finite: refuse NaN/inf scales and decay given as device tensors (one host sync).
            Numbers and CPU tensors are always checked.
        contract: 3 (default), 2 or 1, the version of the noise contract (zokernels.noise,
            docs/noise-contract.md): 3 has v2's normals and the integer stochastic rounding (16
            random bits per element: cheaper, other rounded values than 1 and 2); 2 and 1
            replay what was recorded with them (1: the gaussian normals before v2).
        sources: None, or one tensor per tensor (same shape, dtype and device, sharing no memory
            with any tensor written): out of place, t_j[i] = round(decay_j * s_j[i] + sum_k ...),
            s_j only read. A perturbed copy of a weight in one pass (read s, write t) where a
            clone and an in-place pass take two; how virtual probes draw theta + eps z without
            writing the weights (zokernels.dense_probe). Not with `applied`.

    The arithmetic is float32: D is summed from 0 in seed order, added to the weight once, and
    the result rounds once to the tensor's dtype. Bytes moved: 2 * itemsize
    per element (read + write). Every backend is tested against the torch reference.

    Raises TypeError / ValueError naming the argument, before anything is written.
    """
    tensors = as_tensor_list(tensors, "tensors")
    seed_list = as_seed_list(seeds)
    dist = as_choice(dist, PERTURB_DISTS, "dist")
    rounding = as_choice(rounding, ROUNDINGS, "rounding")
    contract = as_contract(contract)
    backend = as_choice(backend, BACKEND_CHOICES, "backend")
    rounding_seed = seed_list[0] if rounding_seed is None else as_seed(rounding_seed, "rounding_seed")
    key_list = as_keys(keys, len(tensors))
    scale_vector = as_scalar_vector(scales, len(seed_list), "scales", check_finite=check_finite,
                                    allow_broadcast=False)
    decay_vector = as_scalar_vector(decay, len(tensors), "decay", check_finite=check_finite,
                                    allow_broadcast=True)
    applied_vector = None if applied is None else as_scalar_vector(
        applied, len(seed_list), "applied", check_finite=check_finite, allow_broadcast=False)
    maps = as_index_maps(index_maps, tensors)
    source_list = None if sources is None else as_sources(sources, tensors)
    if source_list is not None and applied is not None:
        raise ValueError("sources and applied are exclusive: recovery reads the tensors "
                         "themselves")
    for j, t in enumerate(tensors):
        check_no_internal_overlap(t, f"tensors[{j}]")
    check_no_overlap([(f"tensors[{j}]", t) for j, t in enumerate(tensors)],
                     [("scales", scales), ("decay", decay), ("applied", applied)]
                     + [(f"sources[{j}]", s) for j, s in enumerate(source_list or [])])
    # Resolve every group's backend before writing anything: a refusal leaves all tensors as they were.
    plan = plan_groups(tensors, key_list, backend, maps)
    run_perturb(plan, seed_list, scale_vector, decay_vector, applied_vector, dist, rounding,
                rounding_seed, contract=contract, sources=source_list)


def as_sources(sources: Any, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """perturb_'s `sources`: one tensor per tensor, of its shape, dtype and device."""
    source_list = as_tensor_list(sources, "sources", read_only=True)
    if len(source_list) != len(tensors):
        raise ValueError(f"sources must have one tensor per tensor ({len(tensors)}), "
                         f"got {len(source_list)}")
    for j, (s, t) in enumerate(zip(source_list, tensors)):
        if s.shape != t.shape or s.dtype != t.dtype or s.device != t.device:
            raise ValueError(f"sources[{j}] must have the shape, dtype and device of tensors[{j}] "
                             f"({tuple(t.shape)}, {t.dtype}, {t.device}), got "
                             f"({tuple(s.shape)}, {s.dtype}, {s.device})")
    return source_list


@dataclass
class PerturbGroup:
    """One backend call: the tensors of one (device, dtype), with their keys."""

    backend: str
    device: torch.device
    tensors: list[torch.Tensor]
    keys: list[int]
    indices: list[int]  # positions in the caller's list, to pick per-tensor decays
    # per tensor (offset, local_span, global_span) or None; None when no tensor is a shard
    index_maps: list[tuple[int, int, int] | None] | None = None
    # backend-owned reusable launch data (the Triton launch table) for this fixed tensor list
    cache: dict = field(default_factory=dict)


def group_index_maps(maps: list[tuple[int, int, int] | None] | None,
                     indices: list[int]) -> list[tuple[int, int, int] | None] | None:
    """The maps of a group's tensors, or None when none of them is a shard (the plain kernels)."""
    if maps is None:
        return None
    chosen = [maps[j] for j in indices]
    return chosen if any(m is not None for m in chosen) else None


def plan_groups(tensors: list[torch.Tensor], keys: list[int], backend: str,
                maps: list[tuple[int, int, int] | None] | None = None) -> list[PerturbGroup]:
    """Group validated tensors by (device, dtype) and resolve each group's backend (may raise)."""
    return [PerturbGroup(resolve_backend(backend, device), device, [tensors[j] for j in indices],
                         [keys[j] for j in indices], indices, group_index_maps(maps, indices))
            for (device, _), indices in group_indices(tensors).items()]


# Backends whose perturb takes table_cache= (launch data reused across calls on one tensor list).
_CACHING_BACKENDS = ("cpu", "triton")


def run_perturb(plan: list[PerturbGroup], seeds: list[int], scales: torch.Tensor,
                decays: torch.Tensor, applied: torch.Tensor | None, dist: str, rounding: str,
                rounding_seed: int, logs: list | None = None, count_only: bool = False,
                selector_logs: list | None = None, held_logs: list | None = None,
                contract: int = DEFAULT_CONTRACT, sources: list | None = None) -> None:
    """Apply validated arguments group by group (shared by perturb_ and ParameterSpace).

    logs: None, or one UndoBuffers per group (docs/undo-log.md); count_only: only count.
    selector_logs / held_logs: None, or one SelectorBuffers per group, written / read;
    contract: the version of the gaussian normals; sources: None, or one tensor per tensor of
    the caller's list, read instead of the tensor (out of place)."""
    for g, group in enumerate(plan):
        device = group.device
        extra = {} if logs is None else {"log": logs[g], "count_only": count_only}
        if selector_logs is not None:
            extra.update(selector_log=selector_logs[g], count_only=count_only)
        if held_logs is not None:
            extra["held_log"] = held_logs[g]
        if group.index_maps is not None:
            extra["index_maps"] = group.index_maps
        if sources is not None:  # read only: a non-contiguous one is read through a copy
            extra["sources"] = [sources[j].detach().contiguous() for j in group.indices]
        with torch.no_grad(), contiguous_views(group.tensors, write_back=not count_only) as work:
            if work is group.tensors and group.backend in _CACHING_BACKENDS:
                # the group's own tensors (no temporary copies): their launch data can be reused
                extra["table_cache"] = group.cache
            implementation(group.backend, "perturb")(
                work,
                group.keys,
                seeds,
                scales.to(device, non_blocking=True),
                _select(decays, group.indices).to(device, non_blocking=True),
                dist,
                rounding,
                rounding_seed,
                applied=None if applied is None else applied.to(device, non_blocking=True),
                contract=contract,
                **extra,
            )
