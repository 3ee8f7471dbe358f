"""The selector log (reference): what a perturbation pass must keep so that a later pass can
recover every weight exactly (docs/undo-log.md, "The selector stream").

A pass writes y = round_nearest(float32(theta) + D). A reading pass knows y and recomputes D bit
for bit, so both sides compute, from (y, D) alone, the recovery candidate r = round_nearest(y - D)
and the images round(float32(c) + D) of r and of its two key neighbours (keys: patterns in value
order, -0.0 just below +0.0). Rounding is monotone, so when r maps to y and neither neighbour
does, r is the only weight mapping to y: theta == r, nothing is kept. When r and exactly one
neighbour map, theta is r or lies on that side of r (`side`). The others with a finite y ("F"
elements: about 8% of bf16, 13% of fp32 N(0, 0.02) weights at eps = 1e-3) keep
delta = key(theta) - key(r), almost always 0 or +-1; an element whose y is not finite ("N")
keeps theta's raw pattern (NaN payloads, infinities). `flags` is a cheaper test that proves
most elements single without the neighbours' images (exact for float32, conservative for the
16-bit formats); implementations may run it first: the classes do not depend on it.

A block's stream (LSB first; empty when the block has no F or N element), fields in order:

    n_f       11 bits   the block's number of F elements
    moved     1 bit per F element, in element order: delta != 0                  ("X" elements)
    step      per X element, in element order: 1 bit (far = |delta| >= 2) when the side is
              known, else 2 bits: bit 0 = delta < 0, bit 1 = far
    width     6 bits    only when the block has a far X element: W = bit_length of the
                        block's largest |delta| - 2
    payloads  in element order: |delta| - 2 in W bits per far X element; theta's raw pattern
              (16 / 32 bits) per N element

Every field's position follows from counts a reader has before it reads the field, so a reader
can take all of a block's fields at once (Triton) or one element at a time (C++).

Storage, per (device, dtype) group of a pass, for blocks of BLOCK consecutive elements of a
tensor (a tensor's last block may be short; blocks of the group's tensors follow each other in
the call's order):

    regions: int32 [n_blocks, words]  word 0, the header: the block's stream follows in words
             1.. and the header is its check's low 31 bits (>= 0), or the stream is in the
             pool at offset -2 - header (<= -2) and word 1 is the whole check, or -1 (lost:
             the pool was full). The check: block_check of the values the pass stored.
    pool:    int32 [capacity]         streams of the blocks that do not fit their region
    count:   int64 [1]                pool words asked for (also past the capacity)

Elements of a lost block are recovered as `applied=` alone recovers them, and so are those of
a block whose weights are not what the pass stored (someone wrote them in between: a forward
that clamps them in place). The reader finds that from the check: its classes differ at the
written elements, so every later field of the stream would be read at a shifted position.
"""

from __future__ import annotations

import torch

from .rounding import recover

BLOCK = 1024
COUNT_BITS = 11  # n_f: 0 .. BLOCK
WIDTH_BITS = 6   # W: 0 .. 32
# block_check's constants: an odd multiplier per element index (Weyl sequence) and a mixer
CHECK_INDEX = 0x9E3779B9
CHECK_MIX = 0x85EBCA6B
_BITS = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 16}
_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
# mantissa bits of the 16-bit formats (Keys::single_candidate in csrc/selector_log.h)
_MANTISSA = {torch.bfloat16: 7, torch.float16: 10}
_U32 = 0xFFFFFFFF


def n_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def _pattern(values: torch.Tensor) -> torch.Tensor:
    """Unsigned bit patterns of a dtype tensor, as int64."""
    bits = _BITS[values.dtype]
    return values.contiguous().view(_INT[values.dtype]).to(torch.int64) & ((1 << bits) - 1)


def _from_pattern(patterns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bits = _BITS[dtype]
    patterns = patterns & ((1 << bits) - 1)
    signed = torch.where(patterns >= 1 << (bits - 1), patterns - (1 << bits), patterns)
    return signed.to(_INT[dtype]).view(dtype)


def key_of(values: torch.Tensor) -> torch.Tensor:
    """Monotone int64 keys of a dtype tensor's patterns: key(-0.0) + 1 == key(+0.0)."""
    sign = 1 << (_BITS[values.dtype] - 1)
    p = _pattern(values)
    return torch.where(p >= sign, (sign - 1) - (p - sign), p + sign)


def from_key(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dtype values of keys (taken modulo 2^bits: any int64 gives some pattern)."""
    sign = 1 << (_BITS[dtype] - 1)
    keys = keys & ((1 << _BITS[dtype]) - 1)
    p = torch.where(keys >= sign, keys - sign, (sign - 1 - keys) + sign)
    return _from_pattern(p, dtype)


def _image(keys: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """round_nearest(float32(c) + d) as float32, c the weight of each key."""
    return (from_key(keys, dtype).to(torch.float32) + d).to(dtype).to(torch.float32)


def flags(y: torch.Tensor, d: torch.Tensor):
    """(flagged, r, maps) per element of y (dtype) perturbed by d (float32): r = round_nearest(y - d)
    (dtype), flagged = y is not finite, or r is not proven to be the only weight c with
    round(float32(c) + d) == y. The proof (exact for float32, conservative for 16-bit formats):

    - r maps to y: round(float32(r) + d) == y as values;
    - float32: neither key neighbour of r maps to y (image compares as values);
    - 16-bit formats (csrc Keys::single_candidate, from bit patterns): y is normal with a
      mantissa field in [2, M - 2], r's exponent field (less 1 when its mantissa field is 0) is
      at least y's, and s = float32(r) + d is not half-way between two values of the format."""
    dtype = y.dtype
    yf = y.to(torch.float32)
    r = (yf - d).to(dtype)
    s = r.to(torch.float32) + d
    maps = s.to(dtype).to(torch.float32) == yf
    if dtype == torch.float32:
        k = key_of(r)
        single = (_image(k - 1, d, dtype) != yf) & (_image(k + 1, d, dtype) != yf)
    else:
        man = _MANTISSA[dtype]
        mantissa_mask, unit = (1 << man) - 1, 1 << man
        exponent_mask = 0x7FFF & ~mantissa_mask
        c, yp = _pattern(r), _pattern(y)
        e, ym = yp & exponent_mask, yp & mantissa_mask
        c_gap = ((c & exponent_mask) >> man) - ((c & mantissa_mask) == 0).to(torch.int64)
        single = c_gap >= (e >> man)
        single &= ((e - unit) & _U32) < exponent_mask - unit  # normal, not inf / NaN
        single &= ((ym - 2) & _U32) <= mantissa_mask - 3
        below = 0xFFFF if dtype == torch.bfloat16 else 0x1FFF  # float32 bits below the mantissa
        single &= ((s.view(torch.int32).to(torch.int64) & below) != (below + 1) // 2)
    return ~torch.isfinite(yf) | ~(maps & single), r, maps


def classes(y: torch.Tensor, d: torch.Tensor):
    """(f, n, side, r) per element of y (dtype) perturbed by d: f = the F elements (finite y, the
    stream keeps their delta), n = y not finite (the stream keeps theta's pattern), side = +1 /
    -1 when theta cannot lie below / above r (r and only its upper / lower key neighbour map to
    y), else 0; r = round_nearest(y - d)."""
    flagged, r, maps = flags(y, d)
    yf = y.to(torch.float32)
    finite = torch.isfinite(yf)
    k = key_of(r)
    below = _image(k - 1, d, y.dtype) == yf
    above = _image(k + 1, d, y.dtype) == yf
    f = flagged & finite & ~(maps & ~below & ~above)
    side = (maps & above & ~below).to(torch.int64) - (maps & below & ~above).to(torch.int64)
    return f, ~finite, side, r


def _bit_length(v: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(v)
    for b in range(63, -1, -1):
        out = torch.where((out == 0) & (v >> b != 0), torch.full_like(v, b + 1), out)
    return out


def block_fields(theta: torch.Tensor, y: torch.Tensor, d: torch.Tensor):
    """One block's stream as (widths, values): its fields in order (flat theta, y of one block,
    y = round(theta + d), d float32). Empty when the block has no F or N element."""
    dtype = theta.dtype
    f, n, side, r = classes(y, d)
    none = torch.zeros(0, dtype=torch.int64, device=theta.device)
    if not bool((f | n).any()):
        return none, none
    delta = key_of(theta) - key_of(r)
    moved = f & (delta != 0)
    far = moved & (delta.abs() >= 2)
    step = torch.where(side != 0, far.to(torch.int64),
                       (delta < 0).to(torch.int64) | (far.to(torch.int64) << 1))
    widths = [torch.tensor([COUNT_BITS]), torch.ones(int(f.sum()), dtype=torch.int64),
              torch.where(side != 0, 1, 2)[moved]]
    values = [f.sum().reshape(1), moved[f].to(torch.int64), step[moved]]
    w = 0
    if bool(far.any()):
        w = int(_bit_length((delta.abs() - 2)[far].max().reshape(1)))
        widths.append(torch.tensor([WIDTH_BITS]))
        values.append(torch.tensor([w]))
    payload = far | n
    widths.append(torch.where(n, _BITS[dtype], w)[payload])
    values.append(torch.where(n, _pattern(theta), delta.abs() - 2)[payload])
    return (torch.cat([x.to(theta.device) for x in widths]),
            torch.cat([x.to(theta.device) for x in values]))


def block_check(y: torch.Tensor) -> int:
    """The check (int32) of one block's stored values y (dtype, flat, <= BLOCK elements): sum
    over i of mix(pattern(y[i]) ^ (i * CHECK_INDEX)) mod 2^32, mix(v) = u ^ (u >> 15) with
    u = v * CHECK_MIX mod 2^32. mix is a bijection, so a change of any one element always changes
    the sum (its low 31 bits, kept for a stream in the row, but for a 2^-31 chance); a reader
    compares it with the check of the weights it holds."""
    i = torch.arange(y.numel(), dtype=torch.int64, device=y.device)
    v = _pattern(y) ^ ((i * CHECK_INDEX) & _U32)
    # v * CHECK_MIX mod 2^32 from two products below 2^48 (no int64 overflow)
    u = (v * (CHECK_MIX & 0xFFFF) + (((v * (CHECK_MIX >> 16)) & 0xFFFF) << 16)) & _U32
    total = int((u ^ (u >> 15)).sum()) & _U32
    return total - (1 << 32) if total >= 1 << 31 else total


def row_header(check: int) -> int:
    """The header of a block whose stream is in its row: its check's low 31 bits (>= 0)."""
    return check & 0x7FFFFFFF


def write_block(regions: torch.Tensor, pool: torch.Tensor, count: torch.Tensor, block: int,
                width: torch.Tensor, sel: torch.Tensor, check: int,
                count_only: bool = False) -> None:
    """Store one block's fields (widths, values; block_fields) in its region or the pool, and
    its check (block_check of what the pass stored); count_only: only add the pool words it
    needs to count."""
    stream = _pack(width, sel)
    room = regions.shape[1] - 1
    if count_only:
        if stream.numel() > room:
            count.add_(stream.numel())
        return
    if stream.numel() <= room:
        regions[block, 0] = row_header(check)
        regions[block, 1:1 + stream.numel()] = stream
        return
    first = int(count.item())
    count.add_(stream.numel())
    if first + stream.numel() <= pool.numel() and first < (1 << 31) - 2:  # -2 - first: int32
        regions[block, 0] = -2 - first
        regions[block, 1] = check
        pool[first:first + stream.numel()] = stream
    else:
        regions[block, 0] = -1


def block_stream(regions: torch.Tensor, pool: torch.Tensor, block: int, check: int):
    """The words a block's stream may occupy, for a reader whose weights have this check: the
    rest of its row, or the pool from its offset; None: the block is lost, or its check is not
    the reader's (the weights are not what the pass stored)."""
    header = int(regions[block, 0])
    if header >= 0:
        return regions[block, 1:] if header == row_header(check) else None
    if header <= -2 and -2 - header < pool.numel() and int(regions[block, 1]) == check:
        return pool[-2 - header:]
    return None  # -1 (lost), an offset past the pool (not written by a pass), another check


def _pack(width: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    total = int(width.sum())
    words = -(-total // 32)
    if words == 0:
        return torch.zeros(0, dtype=torch.int32, device=width.device)
    start = torch.cumsum(width, 0) - width
    owner = torch.repeat_interleave(torch.arange(width.numel(), device=width.device), width)
    bit = torch.arange(total, device=width.device) - start[owner]
    value = (sel[owner] >> bit) & 1
    position = start[owner] + bit
    acc = torch.zeros(words, dtype=torch.int64, device=width.device)
    acc.index_add_(0, position // 32, value << (position % 32))
    return torch.where(acc >= 1 << 31, acc - (1 << 32), acc).to(torch.int32)


def take(stream: torch.Tensor, position: torch.Tensor, width: torch.Tensor | int) -> torch.Tensor:
    """The fields of `width` bits (0 .. 32) at bit `position` (int64 tensors) of an int32
    stream, as int64; bits past the stream's end read as 0."""
    width = torch.as_tensor(width, dtype=torch.int64, device=stream.device).expand_as(position)
    if position.numel() == 0:
        return torch.zeros_like(position)
    need = int(position.max()) // 32 + 2
    words = torch.zeros(max(need, stream.numel()) + 1, dtype=torch.int64, device=stream.device)
    words[:stream.numel()] = stream.to(torch.int64) & _U32
    at = position // 32
    pair = words[at] | (words[at + 1] << 32)  # 64 bits from the field's first word
    return (pair >> (position % 32)) & ((1 << width) - 1)


def read_block(stream: torch.Tensor, r: torch.Tensor, f: torch.Tensor, n: torch.Tensor,
               side: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """theta (dtype) of one block's F and N elements from its stream (block_stream) and
    classes(); r elsewhere."""
    ones = f.to(torch.int64)
    moved = f & (take(stream, COUNT_BITS + torch.cumsum(ones, 0) - ones, 1) == 1)
    step_width = torch.where(moved, torch.where(side != 0, 1, 2), 0)
    base = COUNT_BITS + int(ones.sum())
    step = take(stream, base + torch.cumsum(step_width, 0) - step_width, step_width)
    negative = torch.where(side != 0, side < 0, step & 1 == 1) & moved
    far = moved & (torch.where(side != 0, step, step >> 1) == 1)
    w_at = base + int(step_width.sum())
    has_far = bool(far.any())
    w = min(int(take(stream, torch.tensor([w_at], device=stream.device), WIDTH_BITS)), 32) \
        if has_far else 0
    widths = torch.where(n, _BITS[dtype], torch.where(far, w, 0))
    payload = take(stream, w_at + WIDTH_BITS * has_far + torch.cumsum(widths, 0) - widths, widths)
    magnitude = torch.where(far, 2 + payload, moved.to(torch.int64))
    theta = from_key(key_of(r) + torch.where(negative, -magnitude, magnitude), dtype)
    return torch.where(n, _from_pattern(payload, dtype), theta)


def log_tensor(regions, pool, count, first_block: int, theta: torch.Tensor, y: torch.Tensor,
               d: torch.Tensor, count_only: bool = False) -> None:
    """Log the streams of one tensor (flat theta, y dtype; d float32), its blocks starting at
    region row first_block."""
    for b in range(n_blocks(theta.numel())):
        part = slice(b * BLOCK, (b + 1) * BLOCK)
        width, value = block_fields(theta[part], y[part], d[part])
        write_block(regions, pool, count, first_block + b, width, value, block_check(y[part]),
                    count_only)


def recover_tensor(regions, pool, first_block: int, y: torch.Tensor, d: torch.Tensor):
    """theta (dtype) of one tensor holding y = round(theta + d) with its streams logged from
    region row first_block: exact, except in lost blocks and in blocks whose check is not the
    reader's (recovery as `applied=`)."""
    dtype = y.dtype
    f, n, side, r = classes(y, d)
    kept = f | n
    theta = r.clone()
    lost = recover(y.to(torch.float32), d, dtype).to(dtype)
    for b in range(n_blocks(y.numel())):
        part = slice(b * BLOCK, (b + 1) * BLOCK)
        if not bool(kept[part].any()):
            continue
        stream = block_stream(regions, pool, first_block + b, block_check(y[part]))
        if stream is None:
            theta[part] = lost[part]
            continue
        exact = read_block(stream, r[part], f[part], n[part], side[part], dtype)
        theta[part] = torch.where(kept[part], exact, theta[part])
    return theta


def stream_stats(theta: torch.Tensor, d: torch.Tensor) -> dict:
    """For benchmarks/undo_memory.py: per block of theta perturbed by d, the stream's bits; per
    element, kept (F or N) / moved (theta != r) / what recovery alone gets wrong."""
    y = (theta.to(torch.float32) + d).to(theta.dtype)
    f, n, _, r = classes(y, d)
    bits = torch.tensor([int(block_fields(theta[b * BLOCK:(b + 1) * BLOCK],
                                          y[b * BLOCK:(b + 1) * BLOCK],
                                          d[b * BLOCK:(b + 1) * BLOCK])[0].sum())
                         for b in range(n_blocks(theta.numel()))])
    lost = recover(y.to(torch.float32), d, theta.dtype).to(theta.dtype)
    return {"block_bits": bits, "kept": f | n, "moved": key_of(theta) != key_of(r),
            "recovery_wrong": _pattern(lost) != _pattern(theta)}
