"""Rounding of float32 results to the tensor's dtype (reference)."""

import torch

from ..._contract import STREAM_ROUNDING
from .noise import contract_values, contract_values_at



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


def round_at(acc: torch.Tensor, dtype: torch.dtype, rounding: str, rounding_seed: int,
             keys: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """round_to for scattered elements: acc[e] belongs to element indices[e] of the tensor with
    key keys[e] (the stochastic-rounding uniform is that element's)."""
    if rounding == "nearest" or dtype == torch.float32:
        return acc.to(dtype)
    uniforms = contract_values_at(rounding_seed, keys, indices, "uniform", stream=STREAM_ROUNDING)
    return round_stochastic(acc, dtype, uniforms)


def float_bits(values: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns of float32 `values` as int32 (compares -0.0 != 0.0, NaN payloads)."""
    return values.to(torch.float32).contiguous().view(torch.int32)


def lost_by_recovery(theta: torch.Tensor, written: torch.Tensor, noise_sum: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """Elements a later recovery from `written` = round(theta + noise_sum) would not give back
    bit for bit, plus NaN and -0.0 weights (docs/undo-log.md)."""
    back = recover(written.to(torch.float32), noise_sum, dtype)
    negative_zero = float_bits(theta) == torch.iinfo(torch.int32).min  # 0x80000000
    return (float_bits(back) != float_bits(theta)) | theta.isnan() | negative_zero


def recover(current: torch.Tensor, applied_noise: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight theta (dtype values, as float32) that round(theta + applied_noise) turned into
    `current` (float32 values of a dtype tensor): docs/noise-contract.md, "Recovery".

    Subtracting the noise alone is off by one ulp for about half of the bf16 elements; testing
    the rounded difference and its two neighbours against the forward rounding finds theta
    whenever it is the only weight that maps to `current`.
    """
    guess = (current - applied_noise).to(dtype)
    down = torch.nextafter(guess, torch.full_like(guess, float("-inf")))
    up = torch.nextafter(guess, torch.full_like(guess, float("inf")))
    recovered = guess
    found = (guess.to(torch.float32) + applied_noise).to(dtype).to(torch.float32) == current
    for candidate in (down, up):
        fits = (candidate.to(torch.float32) + applied_noise).to(dtype).to(torch.float32) == current
        recovered = torch.where(~found & fits, candidate, recovered)
        found = found | fits
    recovered = torch.where(torch.isfinite(guess), recovered, guess)
    return recovered.to(torch.float32)
