"""Raw Philox4x32-10 words on the CPU (tests and cross-backend checks)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._loader import load_cpu_extension


def philox_cpu(seed: int, c0: Tensor, c1: Tensor, c2: Tensor,
               c3: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Words of the counters (c0, c1, c2, c3): int64 tensors holding uint32 values."""
    ext = load_cpu_extension()
    shape = c0.shape
    counters = torch.stack([c.reshape(-1).to(torch.int64) for c in (c0, c1, c2, c3)], dim=1)
    counters = counters.contiguous()
    out = torch.empty_like(counters)
    n = counters.shape[0]
    if n > 0:
        ext.philox_fill(seed, counters.data_ptr(), out.data_ptr(), n, torch.get_num_threads())
    return tuple(out[:, m].reshape(shape) for m in range(4))
