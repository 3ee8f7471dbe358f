"""z(seed, key, i) for a range of element indices (reference)."""

import torch

from ..._contract import (
    BOX_MULLER_MIN_U,
    DEFAULT_CONTRACT,
    GAUSSIAN_GROUP,
    NORMAL_V2_COS,
    NORMAL_V2_LOG,
    NORMAL_V2_MINUS_TWO_LN2,
    NORMAL_V2_SIN,
    NORMAL_V2_U_OFFSET,
    NORMAL_V2_U_SCALE,
    RADEMACHER_GROUP,
    STREAM_NOISE,
    TWO_PI,
    UNIFORM_SCALE,
    float32_from_bits,
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


def _f32(bits: int, like: torch.Tensor) -> torch.Tensor:
    """The float32 with this bit pattern, broadcast to like's shape and device."""
    return torch.tensor(float32_from_bits(bits), dtype=torch.float32, device=like.device).expand_as(like)


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fused multiply-add a * b + c with ONE rounding (IEEE fma), emulated in float64.

    a * b is exact in float64 (24 + 24 <= 53 bits). s = p + c rounds; TwoSum gives its error err
    exactly (s + err = p + c). Rounding s to odd (if err != 0 and s's last bit is 0, step s one
    ulp toward err) and then to float32 gives the correctly rounded p + c, because round-to-odd
    at 53 bits followed by round-to-nearest at 24 <= 53 - 2 bits equals direct round-to-nearest
    (Boldo and Melquiond, "Emulation of FMA and correctly rounded sums", IEEE TC 2008). Valid
    while p + c stays in float64's normal range, true for every use here."""
    p = a.double() * b.double()
    c = c.double()
    s = p + c
    v = s - p
    err = (p - (s - v)) + (c - v)
    bits = s.view(torch.int64)
    step = torch.where((err > 0) == (s > 0), 1, -1)
    bits = torch.where((err != 0) & ((bits & 1) == 0), bits + step, bits)
    return bits.view(torch.float64).to(torch.float32)


def sqrt32(y: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt of non-negative float32 y.

    torch.sqrt on float32 CPU tensors is not always correctly rounded (about 15% of random inputs
    end one ulp off in the build this was written with), so the candidate float32(sqrt(double y))
    is checked against the exact squares of the midpoints to its neighbours (25-bit numbers: their
    squares are exact in float64, and never equal y) and moved by one ulp where needed."""
    yd = y.double()
    r = yd.sqrt().to(torch.float32)
    up = torch.nextafter(r, torch.full_like(r, float("inf")))
    down = torch.nextafter(r, torch.zeros_like(r))
    r = torch.where(((r.double() + up.double()) * 0.5) ** 2 < yd, up, r)
    r = torch.where(((r.double() + down.double()) * 0.5) ** 2 > yd, down, r)
    return r


def _horner(coefs: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """sum_j coefs[j] x^j (float32 bit patterns) by Horner's rule with fma, highest degree first."""
    acc = fma32(_f32(coefs[-1], x), x, _f32(coefs[-2], x))
    for bits in reversed(coefs[:-2]):
        acc = fma32(acc, x, _f32(bits, x))
    return acc


def normal_pair_v2(w_radius: torch.Tensor, w_angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contract v2 Box-Muller (docs/noise-contract.md, "v2 normals") of two words (int64 tensors
    of uint32 values): (r cos th, r sin th) in float32, every operation as the spec orders it."""
    # radius: u = fma(float32(w), U_SCALE, U_OFFSET); float64 -> float32 rounds the word once
    wf = w_radius.double().to(torch.float32)
    u = fma32(wf, _f32(NORMAL_V2_U_SCALE, wf), _f32(NORMAL_V2_U_OFFSET, wf))
    ub = u.view(torch.int32)
    e = (ub - 0x3F3504F3) >> 23  # int32 arithmetic shift: floor
    f = (ub - e * 8388608).view(torch.float32) - 1.0
    e_term = e.to(torch.float32) * _f32(NORMAL_V2_MINUS_TWO_LN2, f)
    y = fma32(_horner(NORMAL_V2_LOG, f), f, e_term)  # -2 ln u
    r = sqrt32(y)
    # angle: x = 1 + (2h + 1) 2^-23 from bits 1..22, v = 2x - 3 exactly
    x = ((w_angle & 0x7FFFFF) | 0x3F800001).to(torch.int32).view(torch.float32)
    v = x * 2.0 - 3.0
    v2 = v * v
    s = _horner(NORMAL_V2_SIN, v2) * v
    c = _horner(NORMAL_V2_COS, v2)
    odd = (w_angle & 0x40000000) != 0
    sign = torch.where(w_angle >= 1 << 31, torch.iinfo(torch.int32).min, 0).to(torch.int32)
    r = (r.view(torch.int32) ^ sign).view(torch.float32)
    return r * torch.where(odd, -s, c), r * torch.where(odd, c, s)


def _philox_blocks(seed: int, key: int, first_block: int, n_blocks: int, stream: int, device):
    """Words of Philox blocks first_block .. first_block + n_blocks - 1, as [n_blocks, 4]."""
    blocks = first_block + torch.arange(n_blocks, dtype=torch.int64, device=device)
    c2 = torch.full_like(blocks, key)
    c3 = torch.full_like(blocks, stream)
    words = philox_torch(seed, blocks & MASK32, blocks >> 32, c2, c3)
    return torch.stack(words, dim=1)


def _normals(words: torch.Tensor, contract: int) -> torch.Tensor:
    """(n0, n1, n2, n3) stacked on a new last dim from words [..., 4]: pairs (w0, w1), (w2, w3)."""
    if contract == 1:
        uniforms = words_to_uniform(words)
        n0, n1 = pair_uniform_to_normal(uniforms[..., 0], uniforms[..., 1])
        n2, n3 = pair_uniform_to_normal(uniforms[..., 2], uniforms[..., 3])
    else:
        n0, n1 = normal_pair_v2(words[..., 0], words[..., 1])
        n2, n3 = normal_pair_v2(words[..., 2], words[..., 3])
    return torch.stack((n0, n1, n2, n3), dim=-1)


def _block_values(seed, key, first_block, n_blocks, dist, stream, device, contract) -> torch.Tensor:
    """The values of whole Philox blocks, flattened in element order."""
    words = _philox_blocks(seed, key, first_block, n_blocks, stream, device)
    if dist == "rademacher":
        # Element 32*w + bit of a block reads bit `bit` of word w.
        bits = (words.unsqueeze(-1) >> torch.arange(32, device=device)) & 1
        return (bits.to(torch.float32) * 2 - 1).reshape(-1)
    if dist == "uniform":
        return words_to_uniform(words).reshape(-1)
    return _normals(words, contract).reshape(-1)


def contract_values(seed: int, key: int, start: int, count: int, dist: str, device,
                    stream: int = STREAM_NOISE, contract: int = DEFAULT_CONTRACT) -> torch.Tensor:
    """float32 values for elements start .. start + count - 1 of stream `stream`.

    dist "gaussian", "rademacher" or "uniform" (uniform is the gaussian layout's uniforms; stream 1
    with dist "uniform" gives the stochastic-rounding uniforms). contract 1 or 2 picks the
    gaussian normals (docs/noise-contract.md); the other dists are the same in both.
    """
    group = RADEMACHER_GROUP if dist == "rademacher" else GAUSSIAN_GROUP
    out = torch.empty(count, dtype=torch.float32, device=device)
    done = 0
    while done < count:
        first = start + done
        first_block = first // group
        last_block = min((start + count - 1) // group, first_block + _BLOCKS_PER_CHUNK - 1)
        values = _block_values(seed, key, first_block, last_block - first_block + 1, dist, stream,
                               device, contract)
        skip = first - first_block * group
        take = min(count - done, values.numel() - skip)
        out[done:done + take] = values[skip:skip + take]
        done += take
    return out


def noise_torch(numel: int, seed: int, key: int, offset: int, dist: str, device,
                contract: int = DEFAULT_CONTRACT) -> torch.Tensor:
    """z(seed, key, offset + j) for j in [0, numel) as a new float32 tensor (reference)."""
    return contract_values(seed, key, offset, numel, dist, torch.device(device), contract=contract)


def contract_values_at(seed: int, keys: torch.Tensor, indices: torch.Tensor, dist: str,
                       stream: int = STREAM_NOISE, contract: int = DEFAULT_CONTRACT) -> torch.Tensor:
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
    values = words_to_uniform(words) if dist == "uniform" else _normals(words, contract)
    return values.gather(-1, lane.unsqueeze(-1)).squeeze(-1)
