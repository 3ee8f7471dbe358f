"""The selector log (reference): what a perturbation pass must keep so that a later pass can
recover every weight exactly (docs/undo-log.md).

A pass writes y = round_nearest(float32(theta) + D). Rounding is monotone, so the weights c with
round(float32(c) + D) == y (compared as values) form one interval [lo, hi] of the dtype's
patterns in value order ("keys"; -0.0 sits just below +0.0). The interval depends on (y, D)
alone, so the writing pass (theta known) and a reading pass (only y known) both find it; the
log keeps, for every element whose interval holds more than one weight, the selector
key(theta) - lo in width(y, D) = bit_length(hi - lo) bits. An element whose y is not finite
keeps the raw pattern of theta (itemsize * 8 bits: NaN payloads, infinities).

Storage, per (device, dtype) group of a pass, for blocks of BLOCK consecutive elements of a
tensor (a tensor's last block may be short; blocks of the group's tensors follow each other in
the call's order):

    regions: int32 [n_blocks, words]  word 0: 0 (the block's bits follow in words 1..), or
             1 + the offset of its bits in the pool, or -1 (lost: the pool was full);
             words 1..: the block's selectors, concatenated in element order, LSB first
    pool:    int32 [capacity]         bit streams of the blocks that do not fit their region
    count:   int64 [1]                pool words asked for (also past the capacity)

Elements of a lost block are recovered as `applied=` alone recovers them.
"""

from __future__ import annotations

import torch

from .rounding import recover

BLOCK = 1024
_BITS = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 16}
_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
# largest finite magnitude pattern
_MAX_FINITE = {torch.float32: 0x7F7FFFFF, torch.bfloat16: 0x7F7F, torch.float16: 0x7BFF}


def n_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def _pattern(values: torch.Tensor) -> torch.Tensor:
    """Unsigned bit patterns of a dtype tensor, as int64."""
    bits = _BITS[values.dtype]
    return values.contiguous().view(_INT[values.dtype]).to(torch.int64) & ((1 << bits) - 1)


def _from_pattern(patterns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bits = _BITS[dtype]
    signed = torch.where(patterns >= 1 << (bits - 1), patterns - (1 << bits), patterns)
    return signed.to(_INT[dtype]).view(dtype)


def key_of(values: torch.Tensor) -> torch.Tensor:
    """Monotone int64 keys of a dtype tensor's patterns: key(-0.0) + 1 == key(+0.0)."""
    sign = 1 << (_BITS[values.dtype] - 1)
    p = _pattern(values)
    return torch.where(p >= sign, (sign - 1) - (p - sign), p + sign)


def from_key(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    sign = 1 << (_BITS[dtype] - 1)
    p = torch.where(keys >= sign, keys - sign, (sign - 1 - keys) + sign)
    return _from_pattern(p, dtype)


def _image(keys: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """round_nearest(float32(c) + d) as float32, c the weight of each key."""
    return (from_key(keys, dtype).to(torch.float32) + d).to(dtype).to(torch.float32)


def candidate_range(y: torch.Tensor, d: torch.Tensor, dtype: torch.dtype):
    """(lo, hi): the keys of the first and last weight c with round(c + d) == y (float32 values
    of finite dtype y, d float32), by binary search over all finite keys (exact, slow)."""
    sign = 1 << (_BITS[dtype] - 1)
    first, last = sign - 1 - _MAX_FINITE[dtype], sign + _MAX_FINITE[dtype]

    def first_key(pred):  # smallest key in [first, last + 1] where pred (monotone) holds
        low = torch.full(y.shape, first, dtype=torch.int64, device=y.device)
        high = torch.full_like(low, last + 1)
        while bool((low < high).any()):
            mid = (low + high) // 2
            ok = pred(mid.clamp(max=last))
            high = torch.where((low < high) & ok, mid, high)
            low = torch.where((low < high) & ~ok, mid + 1, low)
        return low

    lo = first_key(lambda k: _image(k, d, dtype) >= y)
    hi = first_key(lambda k: _image(k, d, dtype) > y) - 1
    return lo, hi


def widths_and_selectors(theta: torch.Tensor, y: torch.Tensor, d: torch.Tensor):
    """Per element (theta, y dtype tensors, y = round(theta + d), d float32): the selector width
    (0: theta is the only candidate) and the selector (int64)."""
    dtype = theta.dtype
    yf = y.to(torch.float32)
    finite = torch.isfinite(yf)
    k = key_of(theta)
    # exact test of "only candidate" on the neighbours (monotone: an interval)
    sign = 1 << (_BITS[dtype] - 1)
    lo_end, hi_end = sign - 1 - _MAX_FINITE[dtype], sign + _MAX_FINITE[dtype]
    below = (k > lo_end) & (_image((k - 1).clamp(lo_end, hi_end), d, dtype) == yf)
    above = (k < hi_end) & (_image((k + 1).clamp(lo_end, hi_end), d, dtype) == yf)
    ambiguous = finite & (below | above)
    width = torch.zeros_like(k)
    sel = torch.zeros_like(k)
    if bool(ambiguous.any()):
        lo, hi = candidate_range(yf[ambiguous], d[ambiguous], dtype)
        width[ambiguous] = _bit_length(hi - lo)
        sel[ambiguous] = k[ambiguous] - lo
    width = torch.where(finite, width, torch.full_like(width, _BITS[dtype]))
    sel = torch.where(finite, sel, _pattern(theta))
    return width, sel


def _bit_length(v: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(v)
    for b in range(63, -1, -1):
        out = torch.where((out == 0) & (v >> b != 0), torch.full_like(v, b + 1), out)
    return out


def widths_at_restore(y: torch.Tensor, d: torch.Tensor):
    """Per element of y (dtype): the selector width, the candidate interval's first key, and
    whether the interval is known (y not finite: the raw pattern; y finite: some weight maps to
    y, else the element was not written by a logged pass and is only recovered)."""
    dtype = y.dtype
    yf = y.to(torch.float32)
    finite = torch.isfinite(yf)
    width = torch.full(y.shape, _BITS[dtype], dtype=torch.int64, device=y.device)
    lo = torch.zeros_like(width)
    known = ~finite
    if bool(finite.any()):
        l, h = candidate_range(yf[finite], d[finite], dtype)
        width[finite] = torch.where(h >= l, _bit_length((h - l).clamp(min=0)), 0)
        lo[finite] = l
        known[finite] = h >= l
    return width, lo, known


def write_block(regions: torch.Tensor, pool: torch.Tensor, count: torch.Tensor, block: int,
                width: torch.Tensor, sel: torch.Tensor, count_only: bool = False) -> None:
    """Store one block's selectors (element order) in its region or the pool; count_only: only
    add the pool words it needs to count."""
    stream = _pack(width, sel)
    room = regions.shape[1] - 1
    if count_only:
        if stream.numel() > room:
            count.add_(stream.numel())
        return
    if stream.numel() <= room:
        regions[block, 0] = 0
        regions[block, 1:1 + stream.numel()] = stream
        return
    first = int(count.item())
    count.add_(stream.numel())
    if first + stream.numel() <= pool.numel():
        regions[block, 0] = first + 1
        pool[first:first + stream.numel()] = stream
    else:
        regions[block, 0] = -1


def read_block(regions: torch.Tensor, pool: torch.Tensor, block: int, width: torch.Tensor):
    """The selectors of one block (None: the block is lost)."""
    total = int(width.sum())
    words = -(-total // 32)
    header = int(regions[block, 0])
    if header == 0:
        stream = regions[block, 1:1 + words]
    elif header == -1:
        return None
    else:
        stream = pool[header - 1:header - 1 + words]
    return _unpack(stream, width)


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


def _unpack(stream: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    words = stream.to(torch.int64) & 0xFFFFFFFF
    start = torch.cumsum(width, 0) - width
    owner = torch.repeat_interleave(torch.arange(width.numel(), device=width.device), width)
    total = int(width.sum())
    bit = torch.arange(total, device=width.device) - start[owner]
    position = start[owner] + bit
    value = (words[position // 32] >> (position % 32)) & 1
    sel = torch.zeros(width.numel(), dtype=torch.int64, device=width.device)
    sel.index_add_(0, owner, value << bit)
    return sel


def log_tensor(regions, pool, count, first_block: int, theta: torch.Tensor, y: torch.Tensor,
               d: torch.Tensor, count_only: bool = False) -> None:
    """Log the selectors of one tensor (flat theta, y dtype; d float32), its blocks starting at
    region row first_block."""
    width, sel = widths_and_selectors(theta, y, d)
    for b in range(n_blocks(theta.numel())):
        part = slice(b * BLOCK, (b + 1) * BLOCK)
        write_block(regions, pool, count, first_block + b, width[part], sel[part], count_only)


def recover_tensor(regions, pool, first_block: int, y: torch.Tensor, d: torch.Tensor):
    """theta (dtype) of one tensor holding y = round(theta + d) with its selectors logged from
    region row first_block: exact, except in lost blocks (recovery as `applied=`)."""
    dtype = y.dtype
    theta = recover(y.to(torch.float32), d, dtype).to(dtype)
    width, lo, known = widths_at_restore(y, d)
    finite = torch.isfinite(y.to(torch.float32))
    for b in range(n_blocks(y.numel())):
        part = slice(b * BLOCK, (b + 1) * BLOCK)
        sel = read_block(regions, pool, first_block + b, width[part] * known[part])
        if sel is None:
            continue
        exact = torch.where(finite[part], from_key(lo[part] + sel, dtype),
                            _from_pattern(sel, dtype))
        theta[part] = torch.where(known[part], exact, theta[part])
    return theta


def ambiguity_stats(theta: torch.Tensor, d: torch.Tensor) -> dict:
    """For benchmarks/undo_memory.py: widths of the elements of theta perturbed by d."""
    y = (theta.to(torch.float32) + d).to(theta.dtype)
    width, _ = widths_and_selectors(theta, y, d)
    lost = recover(y.to(torch.float32), d, theta.dtype).to(theta.dtype)
    return {"width": width, "recovery_wrong": _pattern(lost) != _pattern(theta)}
