"""Philox4x32-10 words for given counters (known-answer and cross-backend tests).

Computes ``(w0, w1, w2, w3) = philox(seed, (c0, c1, c2, c3))`` element-wise with
``_common.philox``, the same function every other Triton kernel of this backend uses. Bytes moved:
4 x 8 bytes read and 4 x 8 bytes written per counter (int64 in and out, uint32 values).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import as_int64_bits, count_launch, int64_table, load_seed, philox

BLOCK = 1024  # a test utility: small and simple beats fast here
NUM_WARPS = 4


@triton.jit
def _philox_kernel(seed_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, w0_ptr, w1_ptr, w2_ptr, w3_ptr,
                   n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    seed = load_seed(seed_ptr)
    # int64 -> uint32 truncates; the inputs hold values in [0, 2^32)
    c0 = tl.load(c0_ptr + offs, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(c1_ptr + offs, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(c2_ptr + offs, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(c3_ptr + offs, mask=mask, other=0).to(tl.uint32)
    w0, w1, w2, w3 = philox(seed, c0, c1, c2, c3)
    # widen, then mask: a zero extension whatever the signedness rules of the cast
    tl.store(w0_ptr + offs, w0.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(w1_ptr + offs, w1.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(w2_ptr + offs, w2.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(w3_ptr + offs, w3.to(tl.int64) & 0xFFFFFFFF, mask=mask)


def philox_triton(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
                  c3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 words for counters c0..c3 (int64 tensors of one shape holding uint32
    values) under key = seed; returns four int64 tensors of that shape holding uint32 values."""
    shape, device = c0.shape, c0.device
    cs = [c.reshape(-1).to(torch.int64).contiguous() for c in (c0, c1, c2, c3)]
    n = cs[0].numel()
    outs = [torch.empty(n, dtype=torch.int64, device=device) for _ in range(4)]
    if n == 0:
        return tuple(o.reshape(shape) for o in outs)
    seed_t = int64_table([as_int64_bits(seed)], device)
    _philox_kernel[(triton.cdiv(n, BLOCK),)](seed_t, *cs, *outs, n, BLOCK=BLOCK,
                                            num_warps=NUM_WARPS)
    count_launch()
    return tuple(o.reshape(shape) for o in outs)
