"""The contract noise ``z(seed, key, offset + j)`` for j in [0, numel), as a new float32 tensor.

Programs are laid on the GLOBAL index grid: program p covers global indices
``(offset // BLOCK + p) * BLOCK + [0, BLOCK)`` and masks what lies outside
``[offset, offset + numel)``. So the Philox blocks (4 or 128 elements) are the contract's whatever
``offset`` is (>= 2^32, odd, ...). Bytes moved: 4 bytes written per element; nothing read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._contract import DEFAULT_CONTRACT, normals_version
from ._common import (DIST_CODES, as_int64_bits, count_launch, int64_table, load_seed, noise_tile,
                      tile_lanes)

# 16 gaussians per thread (4 Philox calls) at 8 warps; rademacher is cheaper per element, so a
# bigger block amortizes the per-program setup over more stores.
BLOCK = {"gaussian": 4096, "uniform": 4096, "rademacher": 8192}
NUM_WARPS = 8


@triton.jit
def _noise_kernel(out_ptr, params_ptr, lead, numel, DIST: tl.constexpr, BLOCK: tl.constexpr,
                  NORMAL: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    seed = load_seed(params_ptr)
    key = tl.load(params_ptr + 1).to(tl.uint32)
    first_blk = tl.load(params_ptr + 2)  # offset // BLOCK (fits int64 for any uint64 offset)
    z = noise_tile(seed, key, first_blk + pid, DIST, BLOCK, NORMAL)  # Philox layout (_common.py)
    # output index of the block's elements: global index - offset
    start = pid * BLOCK - lead
    lanes = tile_lanes(DIST, BLOCK)  # int32
    ptrs = out_ptr + start + lanes
    if (start >= 0) & (start + BLOCK <= numel):
        tl.store(ptrs, z)  # interior blocks: unmasked, vectorizable when lead % 16 == 0
    else:
        idx = start + lanes
        tl.store(ptrs, z, mask=(idx >= 0) & (idx < numel))


def noise_triton(numel: int, seed: int, key: int, offset: int, dist: str,
                 device: torch.device, contract: int = DEFAULT_CONTRACT) -> torch.Tensor:
    """out[j] = z(seed, key, offset + j) for dist in gaussian / rademacher / uniform; float32
    [numel] on ``device``; ``contract`` 1 or 2: the version of the gaussian normals. One
    launch."""
    device = torch.device(device)
    block = BLOCK[dist]
    out = torch.empty(numel, dtype=torch.float32, device=device)
    lead = offset % block
    params = int64_table([as_int64_bits(seed), key, offset // block], device)
    grid = (triton.cdiv(lead + numel, block),)
    _noise_kernel[grid](out, params, lead, numel, DIST=DIST_CODES[dist], BLOCK=block,
                        NORMAL=normals_version(contract), num_warps=NUM_WARPS)
    count_launch()
    return out
