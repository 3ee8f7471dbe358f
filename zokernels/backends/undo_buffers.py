"""The buffers of one undo log, as backends see them (docs/undo-log.md)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class UndoBuffers(NamedTuple):
    """One (device, dtype) group's log: all three tensors on the group's device.

    index:  int64 [capacity], group-flat element indices (start_j + i, start_j = elements of the
            tensors before j in the call's list).
    values: [capacity] in the tensors' dtype, the value each logged element held before the pass.
    count:  int64 [1], incremented by every lost element (also past the capacity).
    """

    index: torch.Tensor
    values: torch.Tensor
    count: torch.Tensor

    @property
    def capacity(self) -> int:
        return self.index.numel()


class SelectorBuffers(NamedTuple):
    """One (device, dtype) group's selector log (zokernels/backends/torch/selector_log.py).

    regions: int32 [blocks, words], one row per block of 1024 elements of each tensor (in the
             call's order): word 0 the header (>= 0: the bits follow in the row, and the header
             is the block's check's low 31 bits; <= -2: the bits are in the pool at offset
             -2 - header, word 1 is the check; -1: lost), then the block's selector bits.
    pool:    int32 [capacity] words for the blocks whose bits do not fit their row.
    count:   int64 [1] pool words asked for, also past the capacity.
    """

    regions: torch.Tensor
    pool: torch.Tensor
    count: torch.Tensor

    @property
    def capacity(self) -> int:
        return self.pool.numel()
