"""Philox4x32-10 on int64 tensors holding uint32 values (reference)."""

import torch

from ..._contract import PHILOX_KEY_A, PHILOX_KEY_B, PHILOX_ROUND_A, PHILOX_ROUND_B, PHILOX_ROUNDS

MASK32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a constant a < 2^32 and b in [0, 2^32).

    b is split into 16-bit halves so every intermediate stays below 2^49 and int64 never
    overflows.
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low_part = a * b_lo  # < 2^48
    high_part = a * b_hi  # < 2^48
    hi = (high_part + (low_part >> 16)) >> 16
    lo = ((high_part & 0xFFFF) << 16) + low_part
    return hi & MASK32, lo & MASK32


def philox_torch(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor):
    """Philox4x32-10 words for counters (c0, c1, c2, c3) and key (seed mod 2^32, seed >> 32).

    Inputs and outputs are int64 tensors holding uint32 values; tested against the Random123
    known-answer vectors.
    """
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    c0, c1, c2, c3 = (c.to(torch.int64) for c in (c0, c1, c2, c3))
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo32(PHILOX_ROUND_A, c0)
        hi1, lo1 = _mulhilo32(PHILOX_ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3
