"""Noise on the CPU: a new float32 tensor with out[j] = z(seed, key, offset + j)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..._contract import DEFAULT_CONTRACT, normals_version
from ._codes import DIST_CODES
from ._loader import load_cpu_extension


def noise_cpu(numel: int, seed: int, key: int, offset: int, dist: str,
              device: torch.device, contract: int = DEFAULT_CONTRACT) -> Tensor:
    ext = load_cpu_extension()
    out = torch.empty(numel, dtype=torch.float32, device=device)
    ext.noise(out.data_ptr(), numel, seed, key, offset, DIST_CODES[dist], torch.get_num_threads(),
              contract=normals_version(contract))
    return out
