"""Rounding of float32 results to the tensor's dtype (reference)."""

import torch

from ..._contract import (DEFAULT_CONTRACT, INTEGER_SR_DROP, INTEGER_SR_FP16_PRESCALE,
                          INTEGER_SR_GROUP, INTEGER_SR_LIMIT, STREAM_ROUNDING, integer_rounding)
from .noise import contract_values, contract_values_at
from .philox import MASK32, philox_torch


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


def rounding_bits(seed: int, keys: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Contract 3's 16 random bits of element indices[e] of the tensor with key keys[e] (int64
    tensors of one shape): half (i mod 2) (low half for even i) of word (i mod 8) // 2 of
    philox(seed, (b mod 2^32, b >> 32, key, 1)), b = i // 8. As int64 in [0, 2^16)."""
    blocks = indices // INTEGER_SR_GROUP
    words = torch.stack(philox_torch(seed, blocks & MASK32, blocks >> 32, keys,
                                     torch.full_like(keys, STREAM_ROUNDING)), dim=-1)
    lane = indices % INTEGER_SR_GROUP
    word = words.gather(-1, (lane // 2).unsqueeze(-1)).squeeze(-1)
    return (word >> (16 * (lane % 2))) & 0xFFFF


def round_stochastic_integer(acc: torch.Tensor, dtype: torch.dtype,
                             bits: torch.Tensor) -> torch.Tensor:
    """Contract 3 stochastic rounding of float32 `acc` to bf16 / fp16 with 16 random bits per
    element (int64 in [0, 2^16), `rounding_bits`).

    m = the float32 pattern of |acc| (bf16) or of |acc| * 2^-112 (fp16: an exact power-of-two
    scaling to fp32's subnormal range, after which the fp32 pattern shifted right by 13 is the
    fp16 magnitude pattern, subnormals included); DROP = the pattern bits the dtype does not keep
    (16, 13). The result is sign(acc) | (m + (bits >> (16 - DROP))) >> DROP: rounded away from
    zero with probability (m mod 2^DROP) / 2^DROP, exactly the position of |acc| between its two
    neighbours (fp16 below 2^-14: after the scaling's round to a multiple of 2^-37). |acc| at or
    above the dtype's largest finite value, inf and NaN are rounded to nearest."""
    name = str(dtype).split(".")[-1]
    drop = INTEGER_SR_DROP[name]
    magnitude = acc.abs()
    if dtype == torch.float16:
        magnitude = magnitude * INTEGER_SR_FP16_PRESCALE
    m = magnitude.view(torch.int32).to(torch.int64)  # non-negative: the sign bit is clear
    kept = (m + (bits >> (16 - drop))) >> drop
    sign = (acc.view(torch.int32).to(torch.int64) >> 16) & 0x8000
    pattern = kept | sign
    pattern = torch.where(pattern >= 1 << 15, pattern - (1 << 16), pattern)
    result = pattern.to(torch.int16).view(dtype)
    return torch.where(acc.abs() < INTEGER_SR_LIMIT[name], result, acc.to(dtype))


def round_to(acc: torch.Tensor, dtype: torch.dtype, rounding: str, rounding_seed: int, key: int,
             start: int, contract: int = DEFAULT_CONTRACT) -> torch.Tensor:
    """Round float32 `acc` (elements start .. start + numel - 1 of a tensor with `key`) to dtype;
    `contract` picks the stochastic rounding (docs/noise-contract.md)."""
    if rounding == "nearest" or dtype == torch.float32:
        return acc.to(dtype)
    if integer_rounding(contract):
        indices = start + torch.arange(acc.numel(), dtype=torch.int64, device=acc.device)
        return round_at(acc.reshape(-1), dtype, rounding, rounding_seed,
                        torch.full_like(indices, key), indices, contract).view_as(acc)
    uniforms = contract_values(rounding_seed, key, start, acc.numel(), "uniform", acc.device,
                               stream=STREAM_ROUNDING)
    return round_stochastic(acc, dtype, uniforms.view_as(acc))


def round_at(acc: torch.Tensor, dtype: torch.dtype, rounding: str, rounding_seed: int,
             keys: torch.Tensor, indices: torch.Tensor,
             contract: int = DEFAULT_CONTRACT) -> torch.Tensor:
    """round_to for scattered elements: acc[e] belongs to element indices[e] of the tensor with
    key keys[e] (the stochastic-rounding uniform or bits are that element's)."""
    if rounding == "nearest" or dtype == torch.float32:
        return acc.to(dtype)
    if integer_rounding(contract):
        return round_stochastic_integer(acc, dtype, rounding_bits(rounding_seed, keys, indices))
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
