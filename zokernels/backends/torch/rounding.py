"""Rounding of float32 results to the tensor's dtype (reference)."""

import torch

from ..._contract import STREAM_ROUNDING
from .noise import contract_values

_INT16_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def round_stochastic(acc: torch.Tensor, dtype: torch.dtype, uniforms: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding of float32 `acc` to bf16/fp16 given one uniform in [0, 1) per element.

    The result is the nearest value y or its neighbour y' on acc's side, y' with probability
    (|acc| - |y|) / (|y'| - |y|): unbiased, never more than one ulp away.
    """
    nearest = acc.to(dtype)
    nearest_f = nearest.to(torch.float32)
    bits = nearest.view(torch.int16).to(torch.int32) & 0xFFFF
    # One step in the 16-bit pattern moves one ulp in magnitude, sign unchanged.
    step = torch.where(acc.abs() > nearest_f.abs(), 1, -1)
    other_bits = (bits + step) & 0xFFFF
    other_bits = torch.where(other_bits >= 1 << 15, other_bits - (1 << 16), other_bits)
    other_f = other_bits.to(torch.int16).view(dtype).to(torch.float32)
    prob = (acc.abs() - nearest_f.abs()) / (other_f.abs() - nearest_f.abs())
    take_other = (uniforms < prob) & (nearest_f != acc) & torch.isfinite(nearest_f)
    return torch.where(take_other, other_f, nearest_f).to(dtype)


def round_to(acc: torch.Tensor, dtype: torch.dtype, rounding: str, rounding_seed: int, key: int,
             start: int) -> torch.Tensor:
    """Round float32 `acc` (elements start .. start + numel - 1 of a tensor with `key`) to dtype."""
    if rounding == "nearest" or dtype == torch.float32:
        return acc.to(dtype)
    uniforms = contract_values(rounding_seed, key, start, acc.numel(), "uniform", acc.device,
                               stream=STREAM_ROUNDING)
    return round_stochastic(acc, dtype, uniforms.view_as(acc))
