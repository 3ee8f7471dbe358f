"""Sharded parameters: a rank's local shard gets exactly the unsharded tensor's noise.

The noise contract indexes z by the flat row-major element index of the WHOLE tensor. A rank that
holds a box of a tensor (FSDP2 / DTensor ``Shard(d)``, a tensor-parallel row or column split,
uneven splits included) describes where its local elements sit with three integers,
``IndexMap(offset, local_span, global_span)``:

    g(i) = offset + (i // local_span) * global_span + i % local_span

is the unsharded index of local flat element i: the local tensor is a sequence of runs of
``local_span`` consecutive global elements, ``global_span`` apart. Every kernel then draws z (and
the stochastic-rounding uniform) at g(i), so perturbing the shards in place equals perturbing the
unsharded tensor, bit for bit, with no all-gather. docs/sharding.md has the details.

Where the map comes from, per parameter (``index_map_of``):
    - a DTensor (FSDP2's ``fully_shard``, ``distribute_tensor``): its placements (Shard / Replicate);
    - a plain tensor marked with ``mark_shard(tensor, global_shape, global_offset)`` (manual
      sharding, e.g. a Megatron-style column-parallel weight);
    - anything else: unsharded (None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

_INDEX_LIMIT = 1 << 63  # kernels keep contract indices in int64
_MARK = "_zokernels_index_map"


class IndexMap(NamedTuple):
    """Local flat element i of a shard is element g(i) of the unsharded tensor (module doc)."""

    offset: int
    local_span: int
    global_span: int

    def index(self, i: int) -> int:
        """g(i), the unsharded flat index of local flat element i."""
        return self.offset + (i // self.local_span) * self.global_span + i % self.local_span


def index_map_for_box(global_shape: Sequence[int], local_shape: Sequence[int],
                      global_offset: Sequence[int]) -> IndexMap | None:
    """The IndexMap of the local box ``[global_offset, global_offset + local_shape)`` of a tensor of
    ``global_shape`` (row-major), or None when the box is the whole tensor.

    The map exists when the box is one level of runs of the unsharded tensor: FSDP's Shard(0),
    Shard(d) of any tensor, row / column splits and row x column blocks of matrices. Other boxes
    (e.g. dims 1 and 2 of a 3-D tensor both split) raise ValueError.
    """
    global_shape = [int(s) for s in global_shape]
    local_shape = [int(s) for s in local_shape]
    global_offset = [int(s) for s in global_offset]
    if not len(global_shape) == len(local_shape) == len(global_offset):
        raise ValueError(f"global_shape, local_shape and global_offset must have the same length, "
                         f"got {global_shape}, {local_shape}, {global_offset}")
    for d, (g, n, o) in enumerate(zip(global_shape, local_shape, global_offset)):
        if g < 0 or n < 0 or o < 0 or o + n > g:
            raise ValueError(f"dimension {d}: the local box [{o}, {o + n}) does not fit in the "
                             f"global size {g}")
    if math.prod(local_shape) == 0:
        return None  # an empty shard: nothing is ever drawn for it
    if local_shape == global_shape:
        return None
    strides = [math.prod(global_shape[d + 1:]) for d in range(len(global_shape))]
    offset = sum(o * s for o, s in zip(global_offset, strides))
    # The box as (length, global stride) dims, single-index dims dropped (they only move the
    # offset), neighbours that are contiguous in the unsharded tensor merged, outermost first.
    merged: list[list[int]] = []
    for length, stride in ((n, s) for n, s in zip(local_shape, strides) if n > 1):
        if merged and merged[-1][1] == length * stride:
            merged[-1] = [merged[-1][0] * length, stride]
        else:
            merged.append([length, stride])
    # One level of runs: at most an outer dim (the runs) over an inner dim of stride 1.
    if not merged:
        local_span = global_span = 1
    elif len(merged) == 1:
        local_span, global_span = (merged[0][0],) * 2 if merged[0][1] == 1 else (1, merged[0][1])
    elif len(merged) == 2 and merged[1][1] == 1:
        local_span, global_span = merged[1][0], merged[0][1]
    else:
        raise ValueError(f"the local box {tuple(local_shape)} at {tuple(global_offset)} of a "
                         f"tensor of shape {tuple(global_shape)} is not one level of runs of "
                         "the unsharded tensor; shard fewer dimensions")
    numel = math.prod(local_shape)
    index_map = IndexMap(offset, local_span, global_span)
    if index_map.index(numel - 1) >= _INDEX_LIMIT:
        raise ValueError(f"the shard's last element has unsharded index >= 2^63 "
                         f"(shape {tuple(global_shape)})")
    return index_map


class Shard(NamedTuple):
    """Where a local tensor sits in its unsharded tensor: the box [global_offset, global_offset +
    local shape) of global_shape, and its IndexMap (None when the box is the whole tensor)."""

    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    index_map: IndexMap | None


def mark_shard(tensor: torch.Tensor, global_shape: Sequence[int],
               global_offset: Sequence[int]) -> torch.Tensor:
    """Declare a plain tensor to be the box ``[global_offset, global_offset + tensor.shape)`` of an
    unsharded tensor of ``global_shape`` (manual sharding). ParameterSpace and the optimizers then
    perturb it with the unsharded tensor's noise. Returns the tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    index_map = index_map_for_box(global_shape, tensor.shape, global_offset)
    setattr(tensor, _MARK, Shard(tuple(int(s) for s in global_shape),
                                 tuple(int(o) for o in global_offset), index_map))
    return tensor


def is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a rank writes into: a DTensor's local shard, else the tensor itself."""
    if is_dtensor(tensor):
        # the attribute is what to_local() returns, without its autograd function per call
        local = getattr(tensor, "_local_tensor", None)
        return local if local is not None else tensor.to_local()
    return tensor


def shard_of(tensor: torch.Tensor, name: str = "tensor") -> Shard | None:
    """A parameter's Shard: from a DTensor's placements, from ``mark_shard``, or None for a plain
    tensor."""
    mark = getattr(tensor, _MARK, None)
    if mark is not None:
        return mark
    if not is_dtensor(tensor):
        return None
    from torch.distributed.tensor import Replicate, Shard as ShardPlacement

    for placement in tensor.placements:
        # Partial holds addends, not values; _StridedShard (FSDP2 over TP) interleaves rows
        if type(placement) not in (ShardPlacement, Replicate):
            raise ValueError(f"{name}: DTensor placement {placement} is not supported (only "
                             "Shard(d) and Replicate)")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, global_offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements)
    try:
        index_map = index_map_for_box(tensor.shape, local_shape, global_offset)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return Shard(tuple(tensor.shape), tuple(int(o) for o in global_offset), index_map)


def index_map_of(tensor: torch.Tensor, name: str = "tensor") -> IndexMap | None:
    """The IndexMap of a parameter's local shard (None: unsharded, or the whole tensor)."""
    shard = shard_of(tensor, name)
    return None if shard is None else shard.index_map
