"""Selector logs on the Triton backend (docs/undo-log.md; reference:
zokernels/backends/torch/selector_log.py, C++: csrc/selector_log.h).

One program handles one block of SELECTOR_BLOCK = 1024 elements, the log's block, so a row is
written (or read) by one program, with one atomic add per block that spills to the pool.

Per element, with y = round_nearest(float32(c) + d) (c: theta when writing, r = round(y - d)
when reading), the key interval [lo, hi] of the weights mapping to y is found in three stages:

1. ``_single``: a conservative integer prefilter proves the interval is {c}: c and y share sign
   and a normal, non-max exponent field, c's mantissa != 0 (its lower neighbour is one ulp
   away), y's mantissa in [2, M - 2] (y +- 1.5 ulp stays in the binade), s = fl32(c + d) is not a
   half-way tie of the format and round(s) == y. Then s +- ulp rounds to y +- ulp, never y. An
   element whose interval has one member takes 0 bits, so the writer's and the reader's
   prefilters need not agree (tests/test_selector_triton.py checks them against brute force).
2. ``_edges``: the interval's edges are estimated from (y, d) alone, c_lo ~ y - d - ulp_dn / 2,
   c_hi ~ y - d + ulp_up / 2 (TwoSum keeps y - d's rounding error), and each is confirmed by
   three images around the estimate (monotone: the first key whose image is >= y, resp. > y).
3. ``_bisect``: the lanes whose estimate was off by more than one key (weights much smaller than
   |d|: zeros, subnormals; overflow at the format's ends) bisect the whole key range, a fixed
   BITS + 1 steps, under a block-uniform ``if``.

Stages 2 and 3 run only when some lane of the block needs them (SIMT: the block pays for its
slowest lane). Keys are uint32: key(p) = p ^ (SIGN | (negative ? SIGN - 1 : 0)), -0.0 just below
+0.0, and KFIRST - 1 >= 0, KLAST + 1 < 2^32 for every format, so e +- 1 never wraps.

Packing: the widths' exclusive prefix sums in element order are the bit offsets (``_prefix``,
computed in the tile layout: no reshuffle); a selector spans at most two words (offset % 32 +
width <= 63). The block's stream (at most BLOCK words) is zeroed and each selector ORed into
its one or two words with atomics (one program is one CTA: a barrier orders the zeros before the
ORs; OR is commutative, so the words do not depend on the order). Words past the stream are never
written, as in the reference. Reading gathers the same one or two words per element.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import recover_unperturbed, round_nearest, to_float32

SELECTOR_BLOCK = 1024
# largest finite magnitude patterns
_MAXF32 = tl.constexpr(0x7F7FFFFF)
_MAXBF16 = tl.constexpr(0x7F7F)
_MAXF16 = tl.constexpr(0x7BFF)


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
def _value(p, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """float32 value of an OUT_DTYPE pattern (exact)."""
    return to_float32(from_pattern(p, OUT_DTYPE), SOFT_BF16)


@triton.jit
def key_of(p, OUT_DTYPE: tl.constexpr):
    """Monotone uint32 key of a pattern (-0.0 one below +0.0)."""
    BITS: tl.constexpr = 32 if OUT_DTYPE == tl.float32 else 16
    SIGN: tl.constexpr = 1 << (BITS - 1)
    negative = 0 - (p >> (BITS - 1))  # all ones for a negative pattern
    return p ^ (SIGN | (negative & (SIGN - 1)))


@triton.jit
def from_key(k, OUT_DTYPE: tl.constexpr):
    BITS: tl.constexpr = 32 if OUT_DTYPE == tl.float32 else 16
    SIGN: tl.constexpr = 1 << (BITS - 1)
    ALL: tl.constexpr = (1 << BITS) - 1
    negative = (k >> (BITS - 1)) - 1  # all ones below SIGN
    return (k ^ (SIGN | (negative & (SIGN - 1)))) & ALL


@triton.jit
def _image(k, d, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """round_nearest(c + d) as float32, c the weight of key k (a finite key)."""
    c = _value(from_key(k, OUT_DTYPE), OUT_DTYPE, SOFT_BF16)
    return to_float32(round_nearest(c + d, OUT_DTYPE, SOFT_BF16), SOFT_BF16)


@triton.jit
def _ge(k, d, yv, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """image(k) >= y for keys in [KFIRST - 1, KLAST + 1]: the two past the finite ones are the
    infinities, whose images (-inf, +inf for a finite d) compare right with a finite y."""
    return _image(k, d, OUT_DTYPE, SOFT_BF16) >= yv


@triton.jit
def _gt(k, d, yv, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """image(k) > y, keys as ``_ge``."""
    return _image(k, d, OUT_DTYPE, SOFT_BF16) > yv


@triton.jit
def _two_sum(a, b):
    """s = fl(a + b) and its exact error (Knuth; adds only, so nothing is contracted)."""
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    return s, err


@triton.jit
def _single(c, y, cv, yv, d, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """True where the weights mapping to y (pattern, float32 yv) are provably {c} (pattern,
    float32 cv), given d: the prefilter of the module docstring (conservative)."""
    MB: tl.constexpr = 23 if OUT_DTYPE == tl.float32 else (7 if OUT_DTYPE == tl.bfloat16 else 10)
    BITS: tl.constexpr = 32 if OUT_DTYPE == tl.float32 else 16
    EMAX: tl.constexpr = (1 << (BITS - 1 - MB)) - 1
    MM: tl.constexpr = (1 << MB) - 1
    s, err = _two_sum(cv, d)
    ey = (y >> MB) & EMAX
    my = y & MM
    ok = ((((c ^ y) >> MB) == 0) & (ey != 0) & (ey != EMAX) & ((c & MM) != 0)
          & (my >= 2) & (my <= MM - 1))
    sb = s.to(tl.uint32, bitcast=True)
    if OUT_DTYPE == tl.bfloat16:
        tie = (sb & 0xFFFF) == 0x8000
    elif OUT_DTYPE == tl.float16:
        tie = (sb & 0x1FFF) == 0x1000
    else:
        # half an ulp of a normal y with exponent field ey: 2^(ey - 151) (never a tie for ey 1)
        half = tl.where(ey >= 25, (ey - 24) << 23, tl.where(ey >= 2, 1 << (ey - 2), 0x7F800000))
        tie = tl.abs(err) == half.to(tl.float32, bitcast=True)
    return ok & ~tie & (to_float32(round_nearest(s, OUT_DTYPE, SOFT_BF16), SOFT_BF16) == yv)


@triton.jit
def _edges(y, yv, d, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """(lo, hp, resolved): lo = the first key whose image is >= y, hp = the first key whose
    image is > y (the interval is [lo, hp - 1], empty when hp == lo), from an estimate and three
    images each; resolved where both estimates were within one key."""
    BITS: tl.constexpr = 32 if OUT_DTYPE == tl.float32 else 16
    MAXF: tl.constexpr = _MAXF32 if OUT_DTYPE == tl.float32 else (
        _MAXBF16 if OUT_DTYPE == tl.bfloat16 else _MAXF16)
    SIGN: tl.constexpr = 1 << (BITS - 1)
    KFIRST: tl.constexpr = SIGN - 1 - MAXF
    KLAST: tl.constexpr = SIGN + MAXF
    ky = key_of(y, OUT_DTYPE)
    zero = yv == 0.0
    # y's neighbours by value (both zeros have the neighbours -tiny, +tiny)
    v_dn = _value(from_key(tl.where(zero, SIGN - 2, ky - 1), OUT_DTYPE), OUT_DTYPE, SOFT_BF16)
    v_up = _value(from_key(tl.where(zero, SIGN + 1, ky + 1), OUT_DTYPE), OUT_DTYPE, SOFT_BF16)
    g_dn = yv - v_dn  # exact: adjacent values; infinite past the largest finite
    g_up = v_up - yv
    g_dn2 = tl.where(tl.abs(g_dn) <= 3.4028234663852886e38, g_dn, g_up)
    g_up = tl.where(tl.abs(g_up) <= 3.4028234663852886e38, g_up, g_dn)
    r, err = _two_sum(yv, -d)
    e_lo = key_of(pattern(round_nearest(r + (err - 0.5 * g_dn2), OUT_DTYPE, SOFT_BF16),
                          OUT_DTYPE), OUT_DTYPE)
    e_hi = key_of(pattern(round_nearest(r + (err + 0.5 * g_up), OUT_DTYPE, SOFT_BF16),
                          OUT_DTYPE), OUT_DTYPE)
    # onto the finite keys (NaN / infinite estimates: y - d overflowed), so that e +- 1 stays in
    # [KFIRST - 1, KLAST + 1] (``_ge``); an edge further out is bisected
    e_lo = tl.minimum(tl.maximum(e_lo, KFIRST), KLAST)
    e_hi = tl.minimum(tl.maximum(e_hi, KFIRST), KLAST)
    below = _ge(e_lo - 1, d, yv, OUT_DTYPE, SOFT_BF16)
    at = _ge(e_lo, d, yv, OUT_DTYPE, SOFT_BF16)
    above = _ge(e_lo + 1, d, yv, OUT_DTYPE, SOFT_BF16)
    lo = tl.where(at, e_lo, e_lo + 1)
    resolved = ~below & above
    below = _gt(e_hi - 1, d, yv, OUT_DTYPE, SOFT_BF16)
    at = _gt(e_hi, d, yv, OUT_DTYPE, SOFT_BF16)
    above = _gt(e_hi + 1, d, yv, OUT_DTYPE, SOFT_BF16)
    hp = tl.where(at, e_hi, e_hi + 1)
    return lo, hp, resolved & ~below & above


@triton.jit
def _bisect(yv, d, lo, hp, todo, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """lo, hp of ``_edges`` by bisection over all keys where ``todo`` (else unchanged): BITS + 1
    halvings of [KFIRST, KLAST + 1], both edges at once."""
    BITS: tl.constexpr = 32 if OUT_DTYPE == tl.float32 else 16
    MAXF: tl.constexpr = _MAXF32 if OUT_DTYPE == tl.float32 else (
        _MAXBF16 if OUT_DTYPE == tl.bfloat16 else _MAXF16)
    SIGN: tl.constexpr = 1 << (BITS - 1)
    KFIRST: tl.constexpr = SIGN - 1 - MAXF
    KLAST: tl.constexpr = SIGN + MAXF
    a_lo = tl.where(todo, KFIRST, lo)  # first key with image >= y lies in [a, b]
    b_lo = tl.where(todo, KLAST + 1, lo)
    a_hp = tl.where(todo, KFIRST, hp)
    b_hp = tl.where(todo, KLAST + 1, hp)
    for _ in range(BITS + 1):
        m = a_lo + (b_lo - a_lo) // 2
        ok = _ge(m, d, yv, OUT_DTYPE, SOFT_BF16)
        b_lo = tl.where(ok, m, b_lo)
        a_lo = tl.where(ok, a_lo, m + 1)
        m = a_hp + (b_hp - a_hp) // 2
        ok = _gt(m, d, yv, OUT_DTYPE, SOFT_BF16)
        b_hp = tl.where(ok, m, b_hp)
        a_hp = tl.where(ok, a_hp, m + 1)
    return a_lo, a_hp


@triton.jit
def candidate_interval(c, cv, y, yv, d, valid, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """(lo, hp): the weights mapping to finite y (pattern y, float32 yv) given d are the keys
    [lo, hp - 1] (empty when hp == lo), exactly; c (pattern, float32 cv): a candidate, the
    answer {c} where ``_single`` proves it. Lanes not ``valid`` or with y not finite get {c}."""
    finite = tl.abs(yv) <= 3.4028234663852886e38
    kc = key_of(c, OUT_DTYPE)
    lo = kc
    hp = kc + 1
    need = valid & finite & ~_single(c, y, cv, yv, d, OUT_DTYPE, SOFT_BF16)
    if tl.max(need.to(tl.int32)) > 0:
        e_lo, e_hp, resolved = _edges(y, yv, d, OUT_DTYPE, SOFT_BF16)
        lo = tl.where(need, e_lo, lo)
        hp = tl.where(need, e_hp, hp)
        todo = need & ~resolved
        if tl.max(todo.to(tl.int32)) > 0:
            lo, hp = _bisect(yv, d, lo, hp, todo, OUT_DTYPE, SOFT_BF16)
    return lo, hp


@triton.jit
def bit_length(v):
    """Bits of uint32 v (0 for 0): the exponent of float32(v), exact below 2^24."""
    big = v >= (1 << 24)
    u = tl.where(big, v >> 8, v)
    e = (u.to(tl.float32).to(tl.uint32, bitcast=True) >> 23).to(tl.int32) - 126
    return tl.where(u == 0, 0, e + tl.where(big, 8, 0))


@triton.jit
def selector_widths(theta, y, d, valid, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Writing side, per element: (width int32, selector uint32) of theta (pattern) holding
    y = round(theta + d) (OUT_DTYPE tensor): bit_length(hi - lo) bits of key(theta) - lo for a
    finite y, theta's raw pattern in BITS bits for a non-finite y, 0 bits where not valid."""
    BITS: tl.constexpr = 32 if OUT_DTYPE == tl.float32 else 16
    yv = to_float32(y, SOFT_BF16)
    yp = pattern(y, OUT_DTYPE)
    lo, hp = candidate_interval(theta, _value(theta, OUT_DTYPE, SOFT_BF16), yp, yv, d, valid,
                                OUT_DTYPE, SOFT_BF16)
    finite = tl.abs(yv) <= 3.4028234663852886e38
    width = tl.where(finite, bit_length(hp - 1 - lo), BITS)
    sel = tl.where(finite, key_of(theta, OUT_DTYPE) - lo, theta)
    return tl.where(valid, width, 0), sel


@triton.jit
def _prefix(w, DIST: tl.constexpr):
    """(exclusive prefix sums of the int32 tile w in element order, their total), in the tile
    layout (``_common.tile_lanes``): sums over the in-thread dimensions, one cumsum across the
    Philox calls, no reshuffle into element order."""
    if DIST == 1:  # [32, 4, N]: element 128 j + 32 m + s at [s, m, j]
        per_call_word = tl.sum(w, axis=0)  # [4, N]
        per_call = tl.sum(per_call_word, axis=0)  # [N]
        start = ((tl.cumsum(per_call, axis=0) - per_call)[None, None, :]
                 + (tl.cumsum(per_call_word, axis=0) - per_call_word)[None, :, :]
                 + (tl.cumsum(w, axis=0) - w))
    else:  # [4, N]: element 4 j + m at [m, j]
        per_call = tl.sum(w, axis=0)
        start = (tl.cumsum(per_call, axis=0) - per_call)[None, :] + (tl.cumsum(w, axis=0) - w)
    return start, tl.sum(per_call, axis=0)


@triton.jit
def write_block(regions_ptr, words, pool_ptr, capacity, count_ptr, row, width, sel,
                COUNT_ONLY: tl.constexpr, DIST: tl.constexpr, BLOCK: tl.constexpr):
    """Store one block's selectors (width int32, sel uint32, tiles) in row ``row`` of the
    regions or in the pool (reference: selector_log.write_block)."""
    start, total = _prefix(width, DIST)
    n_words = (total + 31) // 32
    row_ptr = regions_ptr + row * words
    spill = n_words + 1 > words
    if COUNT_ONLY:
        if spill:
            tl.atomic_add(count_ptr, n_words.to(tl.int64), sem="relaxed")
    else:
        dst = row_ptr + 1
        header = n_words * 0
        if spill:
            first = tl.atomic_add(count_ptr, n_words.to(tl.int64), sem="relaxed")
            fits = (first + n_words <= capacity) & (first < 2147483646)
            header = tl.where(fits, first + 1, -1).to(tl.int32)
            dst = pool_ptr + tl.where(fits, first, 0)
            n_words = tl.where(fits, n_words, 0)  # a lost block writes no bits
        tl.store(row_ptr, header)
        lane = tl.arange(0, BLOCK)  # the stream (<= BLOCK words) zeroed, then ORed into
        tl.store(dst + lane, tl.zeros([BLOCK], tl.int32), mask=lane < n_words)
        tl.debug_barrier()  # one program is one CTA: the zeros land before any OR
        shift = (start & 31).to(tl.uint32)
        word = start >> 5
        tl.atomic_or(dst + word, (sel << shift).to(tl.int32, bitcast=True),
                     mask=(width > 0) & (word < n_words), sem="relaxed")
        high = tl.where(shift == 0, 0, sel >> (32 - shift))  # the bits past the first word
        tl.atomic_or(dst + word + 1, high.to(tl.int32, bitcast=True),
                     mask=((start & 31) + width > 32) & (word + 1 < n_words), sem="relaxed")


@triton.jit
def read_block(regions_ptr, words, pool_ptr, row, width, DIST: tl.constexpr):
    """(sel uint32 tile, lost) of one block: the selectors of ``width`` (int32 tile) from row
    ``row`` or the pool (reference: selector_log.read_block)."""
    start, _ = _prefix(width, DIST)
    row_ptr = regions_ptr + row * words
    header = tl.load(row_ptr)
    word = start >> 5
    shift = (start & 31).to(tl.uint32)
    if header == 0:
        src = row_ptr + 1
    else:
        src = pool_ptr + tl.maximum(header - 1, 0)
    present = header + 0 * width >= 0  # a tensor: the interpreter refuses tensor & scalar masks
    low = tl.load(src + word, mask=(width > 0) & present, other=0).to(tl.uint32, bitcast=True)
    high = tl.load(src + word + 1, mask=((start & 31) + width > 32) & present,
                   other=0).to(tl.uint32, bitcast=True)
    sel = (low >> shift) | tl.where(shift == 0, 0, high << (32 - shift))
    one = tl.full(sel.shape, 1, tl.uint32)
    sel = tl.where(width >= 32, sel, sel & ((one << width.to(tl.uint32)) - 1))
    return sel, header < 0


@triton.jit
def held_widths(y, d1, valid, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Reading side, per element of y = round(theta + d1): (width int32, lo key, known): the
    selector width and the interval's first key where some weight maps to y (known), BITS bits
    of raw pattern for a non-finite y; 0 bits where not known or not valid."""
    BITS: tl.constexpr = 32 if OUT_DTYPE == tl.float32 else 16
    yv = to_float32(y, SOFT_BF16)
    yp = pattern(y, OUT_DTYPE)
    r = round_nearest(yv - d1, OUT_DTYPE, SOFT_BF16)
    lo, hp = candidate_interval(pattern(r, OUT_DTYPE), to_float32(r, SOFT_BF16), yp, yv, d1,
                                valid, OUT_DTYPE, SOFT_BF16)
    finite = tl.abs(yv) <= 3.4028234663852886e38
    known = valid & (~finite | (hp > lo))
    width = tl.where(finite, bit_length(hp - 1 - lo), BITS)
    return tl.where(known, width, 0), lo, known


@triton.jit
def held_theta(y, d1, valid, regions_ptr, words, pool_ptr, row, DIST: tl.constexpr,
               BLOCK: tl.constexpr, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """theta's exact pattern (uint32, tile) for the weights holding y = round(theta + d1), read
    from the held log's row ``row``; lost blocks and elements no weight maps to are recovered
    as ``applied=`` alone recovers them (recover_unperturbed)."""
    width, lo, known = held_widths(y, d1, valid, OUT_DTYPE, SOFT_BF16)
    sel, lost = read_block(regions_ptr, words, pool_ptr, row, width, DIST)
    yv = to_float32(y, SOFT_BF16)
    finite = tl.abs(yv) <= 3.4028234663852886e38
    theta = tl.where(finite, from_key(lo + sel, OUT_DTYPE), sel)
    fallback = lost | ~known
    if tl.max(fallback.to(tl.int32)) > 0:
        back = pattern(round_nearest(recover_unperturbed(yv, d1, OUT_DTYPE, SOFT_BF16),
                                     OUT_DTYPE, SOFT_BF16), OUT_DTYPE)
        theta = tl.where(fallback, back, theta)
    return theta
