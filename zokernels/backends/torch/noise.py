"""z(seed, key, i) for a range of element indices (reference)."""

import torch

from ..._contract import (
    BOX_MULLER_MIN_U,
    GAUSSIAN_GROUP,
    RADEMACHER_GROUP,
    STREAM_NOISE,
    TWO_PI,
    UNIFORM_SCALE,
)
from .philox import MASK32, philox_torch

# Philox blocks generated at once; bounds the reference's temporary memory (~100 MB).
_BLOCKS_PER_CHUNK = 1 << 20


def words_to_uniform(words: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: int64 tensor of uint32 words -> float32 in [0, 1).

    As int32, negative words are complemented (~x), giving x in [0, 2^31 - 1]; then one float32
    multiply by the scale. x ^ 0xFFFFFFFF equals ~x on the uint32 pattern of a negative int32.
    """
    x = torch.where(words >= (1 << 31), words ^ MASK32, words)
    scale = torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=words.device)
    return x.to(torch.float32) * scale


def pair_uniform_to_normal(a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's Box-Muller, all in float32."""
    a = torch.clamp_min(a, BOX_MULLER_MIN_U)
    theta = torch.tensor(TWO_PI, dtype=torch.float32, device=a.device) * c
    radius = torch.sqrt(-2.0 * torch.log(a))
    return radius * torch.cos(theta), radius * torch.sin(theta)


def _philox_blocks(seed: int, key: int, first_block: int, n_blocks: int, stream: int, device):
    """Words of Philox blocks first_block .. first_block + n_blocks - 1, as [n_blocks, 4]."""
    blocks = first_block + torch.arange(n_blocks, dtype=torch.int64, device=device)
    c2 = torch.full_like(blocks, key)
    c3 = torch.full_like(blocks, stream)
    words = philox_torch(seed, blocks & MASK32, blocks >> 32, c2, c3)
    return torch.stack(words, dim=1)


def _block_values(seed, key, first_block, n_blocks, dist, stream, device) -> torch.Tensor:
    """The values of whole Philox blocks, flattened in element order."""
    words = _philox_blocks(seed, key, first_block, n_blocks, stream, device)
    if dist == "rademacher":
        # Element 32*w + bit of a block reads bit `bit` of word w.
        bits = (words.unsqueeze(-1) >> torch.arange(32, device=device)) & 1
        return (bits.to(torch.float32) * 2 - 1).reshape(-1)
    uniforms = words_to_uniform(words)
    if dist == "uniform":
        return uniforms.reshape(-1)
    n0, n1 = pair_uniform_to_normal(uniforms[:, 0], uniforms[:, 1])
    n2, n3 = pair_uniform_to_normal(uniforms[:, 2], uniforms[:, 3])
    return torch.stack((n0, n1, n2, n3), dim=1).reshape(-1)


def contract_values(seed: int, key: int, start: int, count: int, dist: str, device,
                    stream: int = STREAM_NOISE) -> torch.Tensor:
    """float32 values for elements start .. start + count - 1 of stream `stream`.

    dist "gaussian", "rademacher" or "uniform" (uniform is the gaussian layout's uniforms; stream 1
    with dist "uniform" gives the stochastic-rounding uniforms).
    """
    group = RADEMACHER_GROUP if dist == "rademacher" else GAUSSIAN_GROUP
    out = torch.empty(count, dtype=torch.float32, device=device)
    done = 0
    while done < count:
        first = start + done
        first_block = first // group
        last_block = min((start + count - 1) // group, first_block + _BLOCKS_PER_CHUNK - 1)
        values = _block_values(seed, key, first_block, last_block - first_block + 1, dist, stream, device)
        skip = first - first_block * group
        take = min(count - done, values.numel() - skip)
        out[done:done + take] = values[skip:skip + take]
        done += take
    return out


def noise_torch(numel: int, seed: int, key: int, offset: int, dist: str, device) -> torch.Tensor:
    """z(seed, key, offset + j) for j in [0, numel) as a new float32 tensor (reference)."""
    return contract_values(seed, key, offset, numel, dist, torch.device(device))


def contract_values_at(seed: int, keys: torch.Tensor, indices: torch.Tensor, dist: str,
                       stream: int = STREAM_NOISE) -> torch.Tensor:
    """float32 z(seed, keys[e], indices[e]) for arbitrary (key, element index) pairs.

    keys, indices: int64 tensors of one shape (keys in [0, 2^32)). Each entry runs its own Philox
    call; the value equals contract_values' for that element bit for bit (same words, same
    Box-Muller pair)."""
    group = RADEMACHER_GROUP if dist == "rademacher" else GAUSSIAN_GROUP
    blocks = indices // group
    words = torch.stack(philox_torch(seed, blocks & MASK32, blocks >> 32, keys,
                                     torch.full_like(keys, stream)), dim=-1)
    lane = indices % group
    if dist == "rademacher":
        word = words.gather(-1, (lane // 32).unsqueeze(-1)).squeeze(-1)
        return (((word >> (lane % 32)) & 1).to(torch.float32) * 2 - 1)
    uniforms = words_to_uniform(words)
    if dist == "uniform":
        return uniforms.gather(-1, lane.unsqueeze(-1)).squeeze(-1)
    n0, n1 = pair_uniform_to_normal(uniforms[..., 0], uniforms[..., 1])
    n2, n3 = pair_uniform_to_normal(uniforms[..., 2], uniforms[..., 3])
    normals = torch.stack((n0, n1, n2, n3), dim=-1)
    return normals.gather(-1, lane.unsqueeze(-1)).squeeze(-1)
