"""Selector logs on the Triton backend: the v2 stream, bit-identical to the torch reference
(zokernels/backends/torch/selector_log.py is the spec: flags, classes, block_fields, read_block;
docs/undo-log.md).

One program owns one block of SELECTOR_BLOCK = 1024 elements, the log's block, as a [4, 256]
tile whose columns hold consecutive elements (``element_tile``): it writes or reads one row, with
one atomic add per block that spills to the pool.

Classes (``element_classes``): both sides compute, from (y, D) alone, r = round(y - D) and the
images of r and of its two key neighbours; F = finite y and r not proven to be theta (r does not
map to y, or a neighbour maps too), N = y not finite, side = where theta must lie when exactly
one neighbour maps. The reference tests the neighbours only where its single-candidate test
(``flags``) fails; that test proves that no neighbour maps, so testing every element's
neighbours gives its F exactly, and a GPU block pays for its slowest lane anyway
(tests/test_selector_triton.py compares them on every 16-bit pattern and adversarial pairs).

Every field of a block's stream starts at an exclusive prefix sum of per-element counts in
element order (``_prefix``: in-thread sums down a column, one cumsum across the columns; several
counts packed in one int32):

- writing: all counts are known: two scans (F and N; step widths and far elements) and an OR
  reduction for W. A column's moved bits, steps and (in typical blocks, where they fit 32 bits)
  payloads are consecutive in the stream, so each is ORed in as one run with two atomics, into
  the stream zeroed first (one program is one CTA: a barrier orders the zeros before the ORs;
  OR is commutative, so the words do not depend on the order). Words past the stream are never
  written, as in the reference.
- reading: three dependent gathers: the moved bits (at F's ranks), the steps (at the moved
  elements' step widths), then W and the payloads (at the far elements' ranks and N's). Every
  load is masked to the row's words 1.. or to the pool's capacity: any content of the words
  (garbage, stale data) reads as bits, never as memory outside the log. A lost block reads no
  bits; its r is replaced by what recovery alone gives, found from the classes' images. So is a
  block whose weights do not match the check its writer stored (``block_check``: someone wrote
  them between the passes).

Keys are uint32: key(p) = p ^ (SIGN | (negative ? SIGN - 1 : 0)), -0.0 just below +0.0, taken
modulo 2^BITS as in the reference (a neighbour of key 0 or of the last key wraps).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import flat, round_nearest, tile_lanes, to_float32

SELECTOR_BLOCK = 1024


@triton.jit
def pattern(v, OUT_DTYPE: tl.constexpr):
    """uint32 bit pattern of an OUT_DTYPE tensor."""
    if OUT_DTYPE == tl.float32:
        p = v.to(tl.uint32, bitcast=True)
    else:
        p = v.to(tl.uint16, bitcast=True).to(tl.uint32)
    return p


@triton.jit
def from_pattern(p, OUT_DTYPE: tl.constexpr):
    """The OUT_DTYPE tensor of uint32 patterns."""
    if OUT_DTYPE == tl.float32:
        v = p.to(tl.float32, bitcast=True)
    else:
        v = p.to(tl.uint16).to(OUT_DTYPE, bitcast=True)
    return v


@triton.jit
def key_of(p, OUT_DTYPE: tl.constexpr):
    """Monotone uint32 key of a pattern (-0.0 one below +0.0)."""
    BITS: tl.constexpr = 32 if OUT_DTYPE == tl.float32 else 16
    SIGN: tl.constexpr = 1 << (BITS - 1)
    negative = 0 - (p >> (BITS - 1))  # all ones for a negative pattern
    return p ^ (SIGN | (negative & (SIGN - 1)))


@triton.jit
def from_key(k, OUT_DTYPE: tl.constexpr):
    """The pattern of key k modulo 2^BITS (a uint32 sum or difference of keys may wrap)."""
    BITS: tl.constexpr = 32 if OUT_DTYPE == tl.float32 else 16
    SIGN: tl.constexpr = 1 << (BITS - 1)
    if OUT_DTYPE != tl.float32:
        k = k & 0xFFFF
    negative = (k >> (BITS - 1)) - 1  # all ones below SIGN
    return k ^ (SIGN | (negative & (SIGN - 1)))


@triton.jit
def _image(k, d, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """round_nearest(c + d) as float32, c the weight of key k (NaN for the NaN keys)."""
    if OUT_DTYPE == tl.bfloat16:  # the key in the high half is the float32 pattern's key
        hk = k << 16
        c = (hk ^ tl.where(hk >= 0x80000000, 0x80000000, 0xFFFF0000)).to(tl.float32, bitcast=True)
    else:
        c = to_float32(from_pattern(from_key(k, OUT_DTYPE), OUT_DTYPE), SOFT_BF16)
    return to_float32(round_nearest(c + d, OUT_DTYPE, SOFT_BF16), SOFT_BF16)


@triton.jit
def element_classes(y, d, valid, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr,
                    RECOVERY: tl.constexpr):
    """(f, n, side, kr, back) per element of y = round(theta + d) (OUT_DTYPE tensor; reference:
    selector_log.classes): f = finite y and theta not proven to be r = round(y - d), n = y not
    finite, side (int32) = +1 / -1 where only r and its upper / lower key neighbour map to y, else
    0; kr = key(r). RECOVERY (the reader, for lost blocks): back = the key recovery alone gives
    (``recover_unperturbed``: r where it maps or is not finite, else its neighbour on y's side
    where that maps, else r), else kr. Lanes not ``valid`` are neither F nor N."""
    yv = to_float32(y, SOFT_BF16)
    r = round_nearest(yv - d, OUT_DTYPE, SOFT_BF16)
    rv = to_float32(r, SOFT_BF16)
    kr = key_of(pattern(r, OUT_DTYPE), OUT_DTYPE)
    image = to_float32(round_nearest(rv + d, OUT_DTYPE, SOFT_BF16), SOFT_BF16)
    maps = image == yv
    below = _image(kr - 1, d, OUT_DTYPE, SOFT_BF16) == yv
    above = _image(kr + 1, d, OUT_DTYPE, SOFT_BF16) == yv
    back = kr
    if RECOVERY:
        # where r does not map, at most one neighbour does (the one on y's side: monotone). Across
        # zero recovery tests +-tiny, not the other zero; neither maps there: r = +-0 not mapping
        # needs |y - d| = tiny / 2 with y's ulp tiny and y odd, and d +- tiny rounds off y too
        back = tl.where(maps | (tl.abs(rv) > 3.4028234663852886e38), kr,
                        tl.where(below, kr - 1, tl.where(above, kr + 1, kr)))
    finite = tl.abs(yv) <= 3.4028234663852886e38
    f = valid & finite & ~(maps & ~below & ~above)
    side = (maps & above & ~below).to(tl.int32) - (maps & below & ~above).to(tl.int32)
    return f, valid & ~finite, side, kr, back


@triton.jit
def _bit_or(a, b):
    """tl.reduce's combine for an OR (REDUX.OR on sm_80+)."""
    return a | b


@triton.jit
def bit_length(v):
    """Bits of uint32 v (0 for 0): the exponent of float32(v), exact below 2^24."""
    big = v >= (1 << 24)
    u = tl.where(big, v >> 8, v)
    e = (u.to(tl.float32).to(tl.uint32, bitcast=True) >> 23).to(tl.int32) - 126
    return tl.where(u == 0, 0, e + tl.where(big, 8, 0))


@triton.jit
def block_check(y, valid, OUT_DTYPE: tl.constexpr):
    """The check word (int32) of a block's values y (OUT_DTYPE, a [4, BLOCK // 4] tile;
    reference: selector_log.block_check): the sum of mix(pattern ^ i * 0x9E3779B9) over the valid
    elements i, mix(v) = u ^ (u >> 15) with u = v * 0x85EBCA6B, all modulo 2^32. Row header of a
    stream in the row: its low 31 bits; beside a pool offset: row word 1."""
    BLOCK: tl.constexpr = y.shape[0] * y.shape[1]
    i = tile_lanes(0, BLOCK).to(tl.uint32)
    u = (pattern(y, OUT_DTYPE) ^ (i * 0x9E3779B9)) * 0x85EBCA6B
    return tl.sum(tl.where(valid, u ^ (u >> 15), 0)).to(tl.int32, bitcast=True)


@triton.jit
def _prefix(w):
    """Exclusive prefix sums of the int32 [4, N] tile w in element order, in two parts: the
    columns' starts ([N]: one cumsum across the columns) and the offsets inside the columns
    ([4, N], in-thread); and their total. Several counts travel packed in one int32 (each field
    wide enough for its block total), one scan for all."""
    per_column = tl.sum(w, axis=0)
    return (tl.cumsum(per_column, axis=0) - per_column, tl.cumsum(w, axis=0) - w,
            tl.sum(per_column, axis=0))


@triton.jit
def element_tile(x, DIST: tl.constexpr, BLOCK: tl.constexpr):
    """A tile of the perturb kernel's layout (``_common.tile_lanes``) in the selector's, DIST 0's
    [4, BLOCK // 4] (element 4 j + m at [m, j]: a column holds consecutive elements, so the
    stream's short fields of a column are one run)."""
    if DIST == 1:
        x = tl.trans(tl.reshape(flat(x, DIST, BLOCK), [BLOCK // 4, 4]))
    return x


@triton.jit
def _or_bits(dst, pos, value, live):
    """OR ``value`` (uint32, 0 where there is no field) into the stream at dst from bit ``pos``,
    continuing into the next word where it must. ORing zero changes nothing: only nonzero parts
    are sent."""
    value = tl.where(live, value, 0)
    word = pos >> 5
    shift = (pos & 31).to(tl.uint32)
    low = value << shift
    tl.atomic_or(dst + word, low.to(tl.int32, bitcast=True), mask=low != 0, sem="relaxed")
    high = tl.where(shift == 0, 0, value >> (32 - shift))
    tl.atomic_or(dst + word + 1, high.to(tl.int32, bitcast=True), mask=high != 0, sem="relaxed")


@triton.jit
def write_block(regions_ptr, words, pool_ptr, capacity, count_ptr, row, theta, y, d, valid,
                COUNT_ONLY: tl.constexpr, BLOCK: tl.constexpr, OUT_DTYPE: tl.constexpr,
                SOFT_BF16: tl.constexpr):
    """Store the stream of one block (theta: uint32 patterns, y = round(theta + d) OUT_DTYPE,
    tiles) in row ``row`` of the regions or in the pool (reference: selector_log.block_fields,
    write_block); COUNT_ONLY: only add the pool words a spilling block needs to the count."""
    BITS: tl.constexpr = 32 if OUT_DTYPE == tl.float32 else 16
    COUNT: tl.constexpr = 11  # n_f's bits
    WIDTH: tl.constexpr = 6   # W's bits
    f, n, side, kr, _ = element_classes(y, d, valid, OUT_DTYPE, SOFT_BF16, False)
    kt = key_of(theta, OUT_DTYPE)
    up = kt > kr
    magnitude = tl.where(up, kt - kr, kr - kt)  # |delta|, uint32
    moved = f & (magnitude != 0)
    far = moved & (magnitude >= 2)
    # W = bit_length(the largest |delta| - 2 of a far element) = bit_length of their OR
    w = bit_length(tl.reduce(tl.where(far, magnitude - 2, 0), None, _bit_or))
    known = side != 0  # the side of r is known: the step is the far bit alone
    step_width = tl.where(moved, tl.where(known, 1, 2), 0)
    step = tl.where(known, far.to(tl.uint32), (~up).to(tl.uint32) | (far.to(tl.uint32) << 1))
    payload = tl.where(n, theta, tl.where(far, magnitude - 2, 0))
    payload_width = tl.where(far, w, tl.where(n, BITS, 0))
    # one scan for F's and N's ranks, one for the steps' offsets and the far elements' ranks;
    # each column's runs of moved bits and steps (and payloads) are built first, so that only
    # they, not the elements' classes, are held through the scans
    kept, kept_in, kept_total = _prefix(f.to(tl.int32) | (n.to(tl.int32) << 11))
    steps, steps_in, steps_total = _prefix(step_width | (far.to(tl.int32) << 12))
    moved_run = tl.sum(moved.to(tl.uint32) << (kept_in & 0x7FF).to(tl.uint32), axis=0)
    step_run = tl.sum(tl.where(moved, step, 0) << (steps_in & 0xFFF).to(tl.uint32), axis=0)
    payload_in = tl.cumsum(payload_width, axis=0) - payload_width
    payload_run = tl.sum(payload << payload_in.to(tl.uint32), axis=0)
    # typical blocks: every column's payloads fit one 32-bit run (at most one far or N element
    # in the column, or short ones)
    one_run = tl.max(tl.sum(payload_width, axis=0)) <= 32
    n_f = kept_total & 0x7FF
    has_far = ((steps_total >> 12) > 0).to(tl.int32)
    steps_at = COUNT + n_f
    w_at = steps_at + (steps_total & 0xFFF)
    payload_at = w_at + WIDTH * has_far
    total = payload_at + w * (steps_total >> 12) + BITS * (kept_total >> 11)
    n_words = ((total + 31) >> 5) * (kept_total != 0)  # no F and no N element: empty
    spill = n_words + 1 > words
    if COUNT_ONLY:
        if spill:
            tl.atomic_add(count_ptr, n_words.to(tl.int64), sem="relaxed")
    else:
        row_ptr = regions_ptr + row * words
        check = block_check(y, valid, OUT_DTYPE)
        dst = row_ptr + 1
        header = check & 0x7FFFFFFF  # in the row: the check's low 31 bits
        if spill:
            first = tl.atomic_add(count_ptr, n_words.to(tl.int64), sem="relaxed")
            fits = (first + n_words <= capacity) & (first < 2147483646)
            header = tl.where(fits, -2 - first, -1).to(tl.int32)
            tl.store(row_ptr + 1, check, mask=fits)  # the whole check beside the offset
            dst = pool_ptr + tl.where(fits, first, 0)
            n_words = tl.where(fits, n_words, 0)  # a lost block writes no bits
        tl.store(row_ptr, header)
        lane = tl.arange(0, BLOCK)  # the stream zeroed, then its fields ORed in
        tl.store(dst + lane, tl.zeros([BLOCK], tl.int32), mask=lane < n_words)
        if BITS == 32:  # up to 1121 words: n_f, 1024 x (1 + 2 + 32) bits, W
            tl.store(dst + BLOCK + lane, tl.zeros([BLOCK], tl.int32), mask=lane + BLOCK < n_words)
        tl.debug_barrier()  # one program is one CTA: the zeros land before any OR
        live = n_words > 0
        _or_bits(dst, n_f * 0, n_f.to(tl.uint32), live)  # at bit 0
        _or_bits(dst, w_at, w.to(tl.uint32), live)  # 0 without a far element
        _or_bits(dst, COUNT + (kept & 0x7FF), moved_run, live)
        _or_bits(dst, steps_at + (steps & 0xFFF), step_run, live)
        column_pos = payload_at + w * (steps >> 12) + BITS * (kept >> 11)
        if one_run:
            _or_bits(dst, column_pos, payload_run, live)
        else:
            _or_bits(dst, column_pos[None, :] + payload_in, payload, live)


@triton.jit
def _window(src, limit, pos, width, present):
    """32 bits of the stream at src from bit ``pos`` (a field of ``width`` <= 32 bits at its
    low end, bits above it unmasked), as uint32: only the words the field touches are loaded,
    only words [0, limit) (bits past them read as 0), and only where ``present``."""
    word = pos >> 5
    shift = (pos & 31).to(tl.uint32)
    low = tl.load(src + word, mask=present & (word < limit), other=0).to(tl.uint32, bitcast=True)
    high = tl.load(src + word + 1, mask=present & ((pos & 31) + width > 32) & (word + 1 < limit),
                   other=0).to(tl.uint32, bitcast=True)
    return (low >> shift) | tl.where(shift == 0, 0, high << (32 - shift))


@triton.jit
def _take_runs(src, limit, column_pos, inner, width):
    """The short fields (width <= 2, [4, N] tiles) at bit ``column_pos`` + ``inner``: a column's
    fields are one run (as the writer ORs them), read with two loads instead of two per
    element."""
    run_width = tl.sum(width, axis=0)
    run = _window(src, limit, column_pos, run_width, run_width > 0)
    return (run[None, :] >> inner.to(tl.uint32)) & ((1 << width.to(tl.uint32)) - 1)


@triton.jit
def stored_value(y, theta, d, decay, SEL_IN: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """What a pass stores: y = round(...), except that a pass recovering from a held log keeps
    theta's exact pattern (uint32) where it leaves the element at its value (D == 0, decay 1:
    -0.0, NaN payloads)."""
    written = y
    if SEL_IN:
        keep = (d == 0.0) & (decay == 1.0 + 0.0 * d)  # tensor & tensor
        written = tl.where(keep, from_pattern(theta, OUT_DTYPE), y)
    return written


@triton.jit
def log_stored(regions_ptr, words, pool_ptr, capacity, count_ptr, row, theta, w, x, written, d,
               valid, COUNT_ONLY: tl.constexpr, SEL_IN: tl.constexpr, HAS_APPLIED: tl.constexpr,
               BLOCK: tl.constexpr, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """write_block for what a pass stored (``written``: a kept -0.0 is not round(-0.0 + 0)), as
    the reference does, since a reader computes its classes from that. The weight held before
    the pass: theta (the held log's pattern) with SEL_IN, else x (recovered by applied=, a value
    of the dtype) with HAS_APPLIED, else w as read."""
    if SEL_IN:
        theta_bits = theta
    elif HAS_APPLIED:
        theta_bits = pattern(round_nearest(x, OUT_DTYPE, SOFT_BF16), OUT_DTYPE)
    else:
        theta_bits = pattern(w, OUT_DTYPE)
    write_block(regions_ptr, words, pool_ptr, capacity, count_ptr, row, theta_bits, written, d,
                valid, COUNT_ONLY, BLOCK, OUT_DTYPE, SOFT_BF16)


@triton.jit
def held_theta(y, d1, valid, regions_ptr, words, pool_ptr, capacity, row,
               OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """theta's exact pattern (uint32, tile) for the weights holding y = round(theta + d1), read
    from the held log's row ``row`` (reference: selector_log.read_block, recover_tensor); a lost
    block (header -1, or an offset outside the pool) or one whose y does not match its check
    recovers its F and N elements as ``applied=`` alone recovers them (recover_unperturbed), the
    others as r."""
    BITS: tl.constexpr = 32 if OUT_DTYPE == tl.float32 else 16
    COUNT: tl.constexpr = 11  # n_f's bits
    WIDTH: tl.constexpr = 6   # W's bits
    RAW_MASK: tl.constexpr = 0xFFFFFFFF if OUT_DTYPE == tl.float32 else 0xFFFF
    # the block's check against the writer's (the weights are what it stored: otherwise the
    # classes, and so every field's position, would differ): the header itself for a stream in
    # the row, word 1 beside a pool offset
    check = block_check(y, valid, OUT_DTYPE)
    f, n, side, kr, back = element_classes(y, d1, valid, OUT_DTYPE, SOFT_BF16, True)
    row_ptr = regions_ptr + row * words
    header = tl.load(row_ptr)
    offset = -2 - header  # header <= -2: the stream's offset in the pool
    in_pool = (header <= -2) & (offset < capacity)
    in_pool = in_pool & (tl.load(row_ptr + 1, mask=in_pool, other=0) == check)
    lost = ~in_pool & (header != (check & 0x7FFFFFFF))
    if in_pool:
        src = pool_ptr + offset
    else:
        src = row_ptr + 1
    limit = tl.where(lost, 0, tl.where(in_pool, capacity - offset, words - 1))
    # a lost block reads no bits, so nothing moves from r: r becomes what recovery alone gives
    kr = tl.where(lost, back, kr)
    # 1: the moved bits, at the F elements' ranks
    kept, kept_in, kept_total = _prefix(f.to(tl.int32) | (n.to(tl.int32) << 11))
    steps_at = COUNT + (kept_total & 0x7FF)
    moved = f & (_take_runs(src, limit, COUNT + (kept & 0x7FF), kept_in & 0x7FF,
                            f.to(tl.int32)) != 0)
    # 2: the steps of the moved elements: the far bit, and the sign where the side is unknown
    known = side != 0
    step_width = tl.where(moved, tl.where(known, 1, 2), 0)
    steps, steps_in, _ = _prefix(step_width)
    step = _take_runs(src, limit, steps_at + steps, steps_in, step_width)
    negative = moved & tl.where(known, side < 0, (step & 1) != 0)
    far = moved & (tl.where(known, step, step >> 1) != 0)
    # 3: W (when the block has a far element) and the payloads; this scan's total also gives
    # the steps' (the second scan's is not taken)
    far_before, _, totals = _prefix(far.to(tl.int32) | (step_width << 11))
    has_far = ((totals & 0x7FF) > 0).to(tl.int32)
    w_at = steps_at + (totals >> 11)
    w = tl.minimum(_window(src, limit, w_at, WIDTH + 0 * has_far, has_far != 0) & 63, 32)
    w = w.to(tl.int32) * has_far
    w_mask = tl.where(w >= 32, -1, (1 << w) - 1).to(tl.uint32)
    payload_width = tl.where(far, w, tl.where(n, BITS, 0))
    payload_in = tl.cumsum(payload_width, axis=0) - payload_width
    column_pos = w_at + WIDTH * has_far + w * (far_before & 0x7FF) + BITS * (kept >> 11)
    payload = _window(src, limit, column_pos[None, :] + payload_in, payload_width, far | n)
    payload = payload & tl.where(n, RAW_MASK, w_mask)
    magnitude = tl.where(far, 2 + payload, moved.to(tl.uint32))
    theta = tl.where(n & ~lost, payload,
                     from_key(tl.where(negative, kr - magnitude, kr + magnitude), OUT_DTYPE))
    return theta
