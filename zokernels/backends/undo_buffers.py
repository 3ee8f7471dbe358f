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
