"""Selector logs on the Triton backend (zokernels/backends/triton/selector_log.py) against the
torch reference (zokernels/backends/torch/selector_log.py): the per-element classes, the logs
bit for bit, exact restores, count-only, pool overflow, garbage logs, sharded tensors, and
MeZO's exact restore on backend="triton" (docs/undo-log.md)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from helpers import (assert_bits_equal, assert_same, assert_selector_checks,
                     record_perturb_launches, selector_checks, selector_pool_offset, snapshot)

from zokernels.backends.torch.noise import contract_values
from zokernels.backends.torch.perturb import perturb_torch
from zokernels.backends.torch.rounding import recover
from zokernels.backends.torch.selector_log import (BLOCK, classes, flags, key_of, n_blocks,
                                                   row_header)
from zokernels.backends.triton._common import SOFT_BF16
from zokernels.backends.triton.perturb import perturb_triton
from zokernels.backends.triton.selector_log import element_classes
from zokernels.backends.undo_buffers import SelectorBuffers
from zokernels.ops.undo import SelectorLog
from zokernels.optim import MeZO

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
WORDS = {torch.bfloat16: 6, torch.float16: 6, torch.float32: 8}
EPS = 1e-3
_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


# ---- the classes of one element, against the reference --------------------------------------

@triton.jit
def _classes_kernel(y_ptr, d_ptr, out_ptr, N: tl.constexpr, OUT_DTYPE: tl.constexpr,
                    SOFT: tl.constexpr, RECOVERY: tl.constexpr):
    """out[0..4, i]: F, N, side, key(r) and the key recovery alone gives, of y[i] perturbed by
    d[i] (element_classes)."""
    i = tl.arange(0, N)
    f, n, side, kr, back = element_classes(tl.load(y_ptr + i), tl.load(d_ptr + i), i >= 0,
                                           OUT_DTYPE, SOFT, RECOVERY)
    tl.store(out_ptr + i, f.to(tl.int64))
    tl.store(out_ptr + N + i, n.to(tl.int64))
    tl.store(out_ptr + 2 * N + i, side.to(tl.int64))
    tl.store(out_ptr + 3 * N + i, kr.to(tl.int64))
    tl.store(out_ptr + 4 * N + i, back.to(tl.int64))


def _adversarial_pairs(dtype: torch.dtype, n: int):
    """(theta, d): binade edges, zeros, -0.0, subnormals, the largest values, ties (d = half an
    ulp of theta), overflowing images, NaN / inf weights, tiny and zero d, N(0, 0.02) weights
    with d = 1e-3 z; every 16-bit pattern (random float32 patterns) with d = 1e-2 |theta| z,
    1e-3 z and 5 z."""
    g = torch.Generator().manual_seed(1)
    info = torch.finfo(dtype)
    special = [0.0, info.tiny, info.tiny * 2, info.smallest_normal, 1.0, 0.5, 2.0, 3.0, 1e-5,
               info.max, 0.02, 1e-30]
    values = []
    for v in special:
        t = torch.tensor(v, dtype=dtype)
        up = (t.view(_INT[dtype]) + 1).view(dtype)
        down = (t.view(_INT[dtype]) - 1).view(dtype) if v != 0.0 else t
        values += [t, up, down]
    values = torch.stack(values).to(dtype)
    values = torch.cat([values, -values, torch.tensor([-0.0, float("nan"), float("inf"),
                                                       -float("inf")], dtype=dtype)])
    ds = torch.tensor([0.0, -0.0, 1e-3, -1e-3, 1e-4, 3e-7, -3e-7, 1e-30, 1e-40, 1e3, -1e3,
                       float(info.max) / 2, -float(info.max) / 2, float(info.max),
                       float(info.tiny) / 2], dtype=torch.float32)
    theta = values.repeat_interleave(ds.numel())
    d = ds.repeat(values.numel())
    # ties: theta in [0.5, 1) (either sign), d = +-half an ulp of theta
    m = 256
    tie_theta = (0.5 + 0.5 * torch.rand(m, generator=g)).to(dtype)
    ulp = (tie_theta.view(_INT[dtype]) + 1).view(dtype).float() - tie_theta.float()
    sign = torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0)
    tie_theta = (tie_theta.float() * sign).to(dtype)
    tie_d = ulp * 0.5 * torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.cat([theta, tie_theta])
    d = torch.cat([d, tie_d])
    if dtype != torch.float32:
        every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    else:
        every = torch.randint(-(1 << 31), 1 << 31, (1 << 14,), generator=g,
                              dtype=torch.int64).to(torch.int32).view(dtype)
    size = every.float().abs()
    size = torch.where(torch.isfinite(size), size, 1.0)
    for scale in (1e-2 * size, 1e-3, 5.0):  # an ulp or so in every binade; absolute
        theta = torch.cat([theta, every])
        d = torch.cat([d, scale * torch.randn(every.numel(), generator=g)])
    rest = n - theta.numel()
    theta = torch.cat([theta, (0.02 * torch.randn(rest, generator=g)).to(dtype)])
    d = torch.cat([d, 1e-3 * torch.randn(rest, generator=g)])
    return theta, d


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_classes_match_reference(dtype):
    """F, N, side and r per element equal the reference's ``classes`` (whose F goes through
    ``flags``' single-candidate test; the kernel tests r's neighbours for every element, which
    the single-candidate proof makes equivalent), and the fallback of lost blocks equals
    recovery alone (rounding.recover), on adversarial pairs."""
    n = 1 << 18 if dtype != torch.float32 else 1 << 16
    theta, d = _adversarial_pairs(dtype, n)
    y = (theta.float() + d).to(dtype)
    # and (y, d) no weight gives: r = +-0 not mapping (y an odd multiple of the smallest
    # subnormal, d half of it off y), where recovery alone tests +-tiny, not the other zero
    tiny = float(torch.tensor(1, dtype=_INT[dtype]).view(dtype).float())
    odd = torch.arange(-15, 16, 2, dtype=torch.float32) * tiny
    y[-4 * odd.numel():] = odd.repeat(4).to(dtype)
    d[-4 * odd.numel():] = odd.repeat(4) + torch.tensor([0.5, -0.5, 0.5, -0.5]).repeat_interleave(
        odd.numel()) * tiny
    f, n_el, side, r = classes(y, d)
    flagged, _, _ = flags(y, d)
    assert not (f & ~flagged).any()  # F is a subset of the reference's flagged elements
    for recovery in (False, True):  # the writer's test, the reader's (with the fallback)
        out = torch.empty(5, n, dtype=torch.int64, device=DEVICE)
        _classes_kernel[(1,)](y.to(DEVICE), d.to(DEVICE), out, N=n, OUT_DTYPE=_TL[dtype],
                              SOFT=SOFT_BF16, RECOVERY=recovery)
        out = out.cpu()
        back = recover(y.float(), d, dtype).to(dtype) if recovery else r
        for what, got, want in (("F", out[0] == 1, f), ("N", out[1] == 1, n_el),
                                ("side", out[2], side), ("key(r)", out[3], key_of(r)),
                                ("recovery", out[4], key_of(back))):
            bad = got != want
            assert not bad.any(), (what, recovery, theta[bad][:5], d[bad][:5], got[bad][:5],
                                   want[bad][:5])
    # the classes are not vacuous: each kind occurs
    assert f.any() and n_el.any() and (side == 1).any() and (side == -1).any()
    tail = slice(n - 1024, n)  # N(0, 0.02) at eps 1e-3: a minority is F
    assert 0.0 < f[tail].float().mean() < 0.3


# ---- whole passes against the torch reference -----------------------------------------------

def _weights(dtype: torch.dtype) -> list[torch.Tensor]:
    """N(0, 0.02) tensors of sizes 0, 1, 3, 1023, 1025, 4097 and the worst cases: zeros, -0.0,
    subnormal-sized values, NaN, infinities, a mix in one block."""
    g = torch.Generator().manual_seed(3)
    tensors = [(0.02 * torch.randn(n, generator=g)).to(dtype) for n in (0, 1, 3, 1023, 1025, 4097)]
    tensors += [torch.zeros(100, dtype=dtype), torch.full((50,), -0.0, dtype=dtype),
                (1e-7 * torch.randn(300, generator=g)).to(dtype),
                torch.full((7,), float("nan"), dtype=dtype)]
    mix = (0.02 * torch.randn(BLOCK + 5, generator=g)).to(dtype)
    mix[::7] = 0.0
    mix[1::11] = -0.0
    mix[2::13] = float("nan")
    mix[3::17] = float("inf")
    mix[4::19] = 1e-30
    mix[5::23] = torch.finfo(dtype).max
    mix[6::29] = torch.finfo(dtype).tiny
    tensors.append(mix)
    return tensors


def _buffers(tensors, dtype, capacity: int = 1 << 14, device=DEVICE,
             words: int | None = None) -> SelectorBuffers:
    rows = sum(n_blocks(t.numel()) for t in tensors)
    return SelectorBuffers(torch.full((rows, words or WORDS[dtype]), 12345, dtype=torch.int32,
                                      device=device),
                           torch.full((capacity,), 777, dtype=torch.int32, device=device),
                           torch.zeros(1, dtype=torch.int64, device=device))


def _streams(log: SelectorBuffers, reference: SelectorBuffers) -> list:
    """Per block what the format guarantees: the row when the bits are in it, else the block's
    pool words (their place depends on the order of the atomic adds; the reference places them
    in block order, so its headers give each spilled block's word count), or "lost". Without
    the checks (a spilled block's word 1, the header of a stream in the row): they are of what
    each backend stored, and a NaN a pass computes may carry another payload there
    (assert_selector_checks compares them with the stored weights)."""
    ref_offsets = [selector_pool_offset(h) for h in reference.regions[:, 0].tolist()]
    spilled = sorted(o for o in ref_offsets if o is not None)
    ends = dict(zip(spilled, spilled[1:] + [int(reference.count)]))
    out = []
    for row, ref_o in zip(log.regions.cpu().tolist(), ref_offsets):
        offset = selector_pool_offset(row[0])
        if row[0] == -1:
            out.append("lost")
        elif offset is None:
            out.append(["row"] + row[1:])
        else:
            size = ends[ref_o] - ref_o if ref_o is not None else 0
            out.append(["pool"] + log.pool[offset:offset + size].cpu().tolist())
    return out


def _passes(fn, tensors, dtype, dist, capacity=1 << 14, device="cpu", seeds=(11, 12)):
    """+eps z logged into L1; -eps z from the exact theta (reading L1) logged into L2; then a
    restore (scale 0) reading L2; K = 2 seeds. The weights after each pass and the logs."""
    keys = list(range(len(tensors)))
    ones = torch.ones(len(tensors), device=device)
    seeds = list(seeds)
    plus_s = torch.tensor([EPS, -0.5 * EPS], device=device)
    l1 = _buffers(tensors, dtype, capacity, device)
    l2 = _buffers(tensors, dtype, capacity, device)
    fn(tensors, keys, seeds, plus_s, ones, dist, "nearest", 5, selector_log=l1)
    plus = [t.clone() for t in tensors]
    fn(tensors, keys, seeds, -plus_s, ones, dist, "nearest", 5, applied=plus_s, held_log=l1,
       selector_log=l2)
    minus = [t.clone() for t in tensors]
    fn(tensors, keys, seeds, torch.zeros(2, device=device), ones, dist, "nearest", 5,
       applied=-plus_s, held_log=l2)
    return plus, minus, l1, l2


def test_wide_rows_match_reference():
    """SelectorLog(words=16): rows holding up to 15 words (packed by the atomic path) and
    spilled blocks, as the reference lays them out."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(6)
    original = [(0.02 * torch.randn(3 * BLOCK, generator=g)).to(dtype)]
    original[0][:10] = 0.0  # far elements, ~14 payload bits each: 12 words in block 0's row
    original[0][BLOCK:BLOCK + 200] = 0.0  # block 1 spills
    keys, ones, scale = [0], torch.ones(1), torch.tensor([EPS])
    ref = _buffers(original, dtype, device="cpu", words=16)
    perturb_torch([t.clone() for t in original], keys, [3], scale, ones, "gaussian", "nearest", 3,
                  selector_log=ref)
    tri = _buffers(original, dtype, words=16)
    perturb_triton([t.clone().to(DEVICE) for t in original], keys, [3], scale.to(DEVICE),
                   ones.to(DEVICE), "gaussian", "nearest", 3, selector_log=tri)
    assert int(tri.count) == int(ref.count) > 0
    assert 8 < int(ref.regions[0, 1:].ne(12345).sum()) < 16  # block 0's row holds > 8 words
    assert _streams(tri, ref) == _streams(ref, ref)


def _assert_same_or_both_nan(a, b, what):
    """Bit-identical, except that a NaN a pass computed may carry any payload (the backends'
    float32 adds differ there; the log keeps theta's own pattern, checked by the restores)."""
    nan = torch.isnan(a.float())
    assert torch.equal(nan, torch.isnan(b.float())), what
    assert torch.equal(a.view(_INT[a.dtype])[~nan], b.view(_INT[b.dtype])[~nan]), what


def _bits_list(tensors):
    return [t.cpu().contiguous().view(_INT[t.dtype]) for t in tensors]


@pytest.mark.parametrize("dtype,dist", [(torch.bfloat16, "gaussian"), (torch.float16, "gaussian"),
                                        (torch.float32, "gaussian"),
                                        (torch.bfloat16, "rademacher")], ids=str)
def test_logged_step_matches_reference_and_restores_exactly(dtype, dist):
    original = _weights(dtype)
    ref = _passes(perturb_torch, [t.clone() for t in original], dtype, dist)
    tensors = [t.clone().to(DEVICE) for t in original]
    tri = _passes(perturb_triton, tensors, dtype, dist, device=DEVICE)
    for name, a, b in (("+eps", ref[0], tri[0]), ("-eps", ref[1], tri[1])):
        for j, (x, z) in enumerate(zip(a, b)):
            _assert_same_or_both_nan(x, z.cpu(), f"{name} tensor {j}")
    for name, lr, lt, stored in (("L1", ref[2], tri[2], tri[0]), ("L2", ref[3], tri[3], tri[1])):
        assert int(lt.count) == int(lr.count), name
        assert _streams(lt, lr) == _streams(lr, lr), name
        assert_selector_checks(lt, stored, name)
    assert int(ref[2].count) > 0  # the worst cases spill
    for j, (a, b) in enumerate(zip(tensors, original)):
        assert_bits_equal(a.cpu(), b, f"restored tensor {j}")


TIE_EPS = {torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -12, torch.float32: 2.0 ** -25}
HUGE = {torch.bfloat16: 2e38, torch.float16: 4e4, torch.float32: 2e38}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["ties", "overflow"])
def test_ties_and_overflowing_images(dtype, case):
    """ties: weights in [0.5, 1) of either sign moved by half their ulp (rademacher), every sum a
    rounding tie; overflow: N(0, 1) weights moved by a scale whose images overflow to +-inf (their
    raw patterns are logged), next to binade edges (powers of two and their neighbours). The
    log equals the reference's, and a restore reading it gives back every bit."""
    g = torch.Generator().manual_seed(5)
    if case == "ties":
        t = 0.5 + 0.5 * torch.rand(1500, generator=g)
        original = [t.to(dtype), (-t[:700]).to(dtype)]
        dist, scale = "rademacher", TIE_EPS[dtype]
    else:
        edges = torch.tensor([2.0 ** e for e in range(-12, 4)])
        edges = torch.cat([edges, -edges]).to(dtype)
        up = (edges.view(_INT[dtype]) + 1).view(dtype)
        down = (edges.view(_INT[dtype]) - 1).view(dtype)
        original = [torch.randn(1025, generator=g).to(dtype), torch.cat([edges, up, down])]
        dist, scale = "gaussian", HUGE[dtype]
    keys, ones, scales = [0, 1], torch.ones(2), torch.tensor([scale])
    ref = _buffers(original, dtype, device="cpu")
    ref_t = [t.clone() for t in original]
    perturb_torch(ref_t, keys, [2], scales, ones, dist, "nearest", 2, selector_log=ref)
    tri = _buffers(original, dtype)
    tensors = [t.clone().to(DEVICE) for t in original]
    perturb_triton(tensors, keys, [2], scales.to(DEVICE), ones.to(DEVICE), dist, "nearest", 2,
                   selector_log=tri)
    for j, (a, b) in enumerate(zip(ref_t, tensors)):
        _assert_same_or_both_nan(a, b.cpu(), f"{case} tensor {j}")
    if case == "overflow":
        assert bool(torch.isinf(ref_t[0].float()).any())
    assert int(tri.count) == int(ref.count)
    assert _streams(tri, ref) == _streams(ref, ref)
    perturb_triton(tensors, keys, [2], torch.zeros(1, device=DEVICE), ones.to(DEVICE), dist,
                   "nearest", 2, applied=scales.to(DEVICE), held_log=tri)
    for j, (a, b) in enumerate(zip(tensors, original)):
        assert_bits_equal(a.cpu(), b, f"{case} restored tensor {j}")


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("contract", [2, 3])
def test_update_reading_the_log_matches_reference(dist, contract):
    """An update (decays, stochastic rounding: contract 2's uniforms, contract 3's integer bits)
    recovering from the -eps pass's log writes what the reference writes, bit for bit: the
    selector pass's rounding tiles are in the selector's layout."""
    dtype = torch.bfloat16
    original = _weights(dtype)[3:6]
    keys = list(range(len(original)))
    decays = torch.tensor([0.9, 1.0, 0.5])
    scales = torch.tensor([EPS])
    results = []
    for fn, device in ((perturb_torch, "cpu"), (perturb_triton, DEVICE)):
        tensors = [t.clone().to(device) for t in original]
        log = _buffers(tensors, dtype, device=device)
        ones = torch.ones(len(tensors), device=device)
        fn(tensors, keys, [5], scales.to(device), ones, dist, "nearest", 5, selector_log=log,
           contract=contract)
        fn(tensors, keys, [5, 6], torch.tensor([0.0, 0.25], device=device), decays.to(device),
           dist, "stochastic", 9, applied=torch.tensor([EPS, 0.0], device=device), held_log=log,
           contract=contract)
        results.append([t.cpu() for t in tensors])
    for j, (a, b) in enumerate(zip(*results)):
        assert_bits_equal(b, a, f"update of tensor {j}")


def test_count_only_counts_and_writes_nothing():
    dtype = torch.bfloat16
    original = _weights(dtype)
    keys, ones = list(range(len(original))), torch.ones(len(original), device=DEVICE)
    scale = torch.tensor([EPS], device=DEVICE)
    full = _buffers(original, dtype)
    perturb_triton([t.clone().to(DEVICE) for t in original], keys, [4], scale, ones, "gaussian",
                   "nearest", 4, selector_log=full)
    probe = _buffers(original, dtype, capacity=0)
    tensors = [t.clone().to(DEVICE) for t in original]
    perturb_triton(tensors, keys, [4], scale, ones, "gaussian", "nearest", 4, selector_log=probe,
                   count_only=True)
    assert int(probe.count) == int(full.count) > 0
    assert bool((probe.regions == 12345).all())  # no row written
    for j, (a, b) in enumerate(zip(tensors, original)):
        assert_bits_equal(a.cpu(), b, f"tensor {j}")
    ref = _buffers(original, dtype, capacity=0, device="cpu")
    perturb_torch([t.clone() for t in original], keys, [4], scale.cpu(), ones.cpu(), "gaussian",
                  "nearest", 4, selector_log=ref, count_only=True)
    assert int(ref.count) == int(probe.count)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_far_and_non_finite_elements_match_reference(dtype):
    """Blocks whose streams hold far elements (zeros, -0.0 and tiny weights next to |D|: W and
    payloads) and N elements (NaN, infinities, and the largest values pushed past them: raw
    patterns), next to ordinary weights: the log equals the reference's, and a restore reading
    it gives back every bit (NaN payloads included)."""
    g = torch.Generator().manual_seed(12)
    info = torch.finfo(dtype)
    block = (0.02 * torch.randn(2 * BLOCK + 100, generator=g)).to(dtype)
    block[::5] = 0.0
    block[1::9] = -0.0
    block[2::11] = (1e-7 * torch.randn(block[2::11].numel(), generator=g)).to(dtype)
    block[3::13] = info.tiny
    block[BLOCK::17] = float("nan")
    block[BLOCK + 1::19] = float("inf")
    block[BLOCK + 2::23] = -float("inf")
    block[BLOCK + 3::29] = info.max
    block[BLOCK + 4::31] = -info.max
    nan_bits = block.view(_INT[dtype])
    nan_bits[2 * BLOCK + 1] = 0x7FC1 if dtype != torch.float32 else 0x7FC00123  # a payload
    original = [block]
    keys, ones = [0], torch.ones(1)
    scales = torch.tensor([EPS, float(info.max) / 4])  # the second seed overflows the largest
    ref = _buffers(original, dtype, device="cpu")
    ref_t = [t.clone() for t in original]
    perturb_torch(ref_t, keys, [6, 7], scales, ones, "rademacher", "nearest", 6, selector_log=ref)
    tri = _buffers(original, dtype)
    tensors = [t.clone().to(DEVICE) for t in original]
    perturb_triton(tensors, keys, [6, 7], scales.to(DEVICE), ones.to(DEVICE), "rademacher",
                   "nearest", 6, selector_log=tri)
    _assert_same_or_both_nan(ref_t[0], tensors[0].cpu(), "perturbed")
    assert int(tri.count) == int(ref.count)
    assert _streams(tri, ref) == _streams(ref, ref)
    # the streams do hold far and N elements
    d = torch.zeros(block.numel())
    for seed, scale in zip([6, 7], scales.tolist()):
        d = d + scale * contract_values(seed, 0, 0, block.numel(), "rademacher", "cpu")
    f, n, _, r = classes(ref_t[0], d)
    far = f & ((key_of(block) - key_of(r)).abs() >= 2)
    assert bool(n.any()) and bool(far[:BLOCK].any()) and bool(far[BLOCK:2 * BLOCK].any())
    perturb_triton(tensors, keys, [6, 7], torch.zeros(2, device=DEVICE), ones.to(DEVICE),
                   "rademacher", "nearest", 6, applied=scales.to(DEVICE), held_log=tri)
    assert_bits_equal(tensors[0].cpu(), original[0], "restored")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_garbage_logs_are_read_within_bounds(dtype):
    """A held log full of garbage (headers: in the row, -1, offsets at the start, at the end of
    and past a small pool, a check that does not match, the int32 extremes; random words and
    pool): reading it loads nothing outside the rows' words 1.. and the pool (the interpreter
    raises on an out-of-bounds load) and decodes what the reference decodes from the same words,
    bit for bit."""
    g = torch.Generator().manual_seed(13)
    original = [(0.02 * torch.randn(6 * BLOCK + 50, generator=g)).to(dtype),
                torch.zeros(BLOCK, dtype=dtype)]
    keys, ones = [0, 1], torch.ones(2)
    scale = torch.tensor([EPS])
    rows = sum(n_blocks(t.numel()) for t in original)
    capacity = 40
    regions = torch.randint(-(1 << 31), 1 << 31, (rows, WORDS[dtype]), generator=g,
                            dtype=torch.int64).to(torch.int32)
    pool = torch.randint(-(1 << 31), 1 << 31, (capacity,), generator=g,
                         dtype=torch.int64).to(torch.int32)
    perturbed = [t.clone() for t in original]
    perturb_torch(perturbed, keys, [8], scale, ones, "gaussian", "nearest", 8)
    checks = selector_checks(perturbed)
    regions[:, 1] = torch.tensor(checks, dtype=torch.int32)  # beside the pool offsets
    regions[:, 0] = torch.tensor([row_header(checks[0]), -1, -2, -2 - (capacity - 1),
                                  -2 - capacity, row_header(checks[5] + 1), -(1 << 31),
                                  (1 << 31) - 1], dtype=torch.int32)
    results = []
    for fn, device in ((perturb_torch, "cpu"), (perturb_triton, DEVICE)):
        held = SelectorBuffers(regions.clone().to(device), pool.clone().to(device),
                               torch.zeros(1, dtype=torch.int64, device=device))
        tensors = [t.clone().to(device) for t in perturbed]
        fn(tensors, keys, [8], torch.zeros(1, device=device), ones.to(device), "gaussian",
           "nearest", 8, applied=scale.to(device), held_log=held)
        results.append([t.cpu() for t in tensors])
        assert torch.equal(held.regions.cpu(), regions) and torch.equal(held.pool.cpu(), pool)
    for j, (a, b) in enumerate(zip(*results)):
        assert_bits_equal(b, a, f"tensor {j}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_weights_written_between_the_passes_recover_as_lost_blocks(dtype):
    """Weights written by someone else between the logging pass and the reading one (blocks 1,
    its stream in its row, and 2, spilled; one weight of block 3 one ulp up) do not match their
    blocks' checks, so those blocks are recovered as applied= alone recovers them, as the
    reference does, whatever the buffers held before the logging pass; blocks 0 and 4 stay
    exact."""
    g = torch.Generator().manual_seed(22)
    original = (0.02 * torch.randn(4 * BLOCK + 77, generator=g)).to(dtype)
    original[2 * BLOCK:2 * BLOCK + 300] = 0.0  # far elements: block 2's stream spills
    keys, ones, scale = [0], torch.ones(1, device=DEVICE), torch.tensor([EPS], device=DEVICE)
    zero = torch.zeros(1, device=DEVICE)
    reference = None
    for fill in ("constant", "random"):
        log = _buffers([original], dtype, words=16)
        if fill == "random":
            log.regions.copy_(torch.randint(-(1 << 31), 1 << 31, log.regions.shape, generator=g))
            log.pool.copy_(torch.randint(-(1 << 31), 1 << 31, log.pool.shape, generator=g))
        w = original.clone().to(DEVICE)
        perturb_triton([w], keys, [4], scale, ones, "gaussian", "nearest", 4, selector_log=log)
        assert int(log.regions[2, 0]) <= -2 and int(log.regions[1, 0]) >= 0
        w[BLOCK:3 * BLOCK].clamp_(-0.01, 0.01)
        w.view(_INT[dtype])[3 * BLOCK + 5] += 1
        noise = torch.zeros(original.numel())
        perturb_torch([noise], keys, [4], scale.cpu(), ones.cpu(), "gaussian", "nearest", 4)
        alone = recover(w.cpu().float(), noise, dtype).to(dtype)  # recovery without a log
        perturb_triton([w], keys, [4], zero, ones, "gaussian", "nearest", 4, applied=scale,
                       held_log=log)
        expected = torch.cat([original[:BLOCK], alone[BLOCK:4 * BLOCK], original[4 * BLOCK:]])
        assert_bits_equal(w.cpu(), expected, f"{fill} fill")
        if reference is None:  # the torch reference, same passes
            ref_log = _buffers([original], dtype, device="cpu", words=16)
            reference = original.clone()
            perturb_torch([reference], keys, [4], scale.cpu(), ones.cpu(), "gaussian", "nearest",
                          4, selector_log=ref_log)
            reference[BLOCK:3 * BLOCK].clamp_(-0.01, 0.01)
            reference.view(_INT[dtype])[3 * BLOCK + 5] += 1
            perturb_torch([reference], keys, [4], zero.cpu(), ones.cpu(), "gaussian", "nearest",
                          4, applied=scale.cpu(), held_log=ref_log)
        assert_bits_equal(w.cpu(), reference, f"{fill} fill vs the reference")


def test_pool_overflow_loses_whole_blocks_to_recovery():
    """A pool too small for the spilled blocks: the blocks that did not get room are marked
    lost and restored as applied= alone restores them; every other block stays exact, and the
    count says how many words were asked for."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(8)
    original = [torch.zeros(3 * BLOCK, dtype=dtype), (0.02 * torch.randn(2 * BLOCK, generator=g)).to(dtype),
                (1e-7 * torch.randn(BLOCK + 7, generator=g)).to(dtype)]
    keys, ones = [0, 1, 2], torch.ones(3, device=DEVICE)
    scale = torch.tensor([EPS], device=DEVICE)
    ample = _buffers(original, dtype, device="cpu")
    perturb_torch([t.clone() for t in original], keys, [9], scale.cpu(), ones.cpu(), "gaussian",
                  "nearest", 9, selector_log=ample)
    small = _buffers(original, dtype, capacity=int(ample.count) // 2)
    tensors = [t.clone().to(DEVICE) for t in original]
    perturb_triton(tensors, keys, [9], scale, ones, "gaussian", "nearest", 9, selector_log=small)
    assert int(small.count) == int(ample.count)
    streams, expected = _streams(small, ample), _streams(ample, ample)
    lost = [s == "lost" for s in streams]
    assert any(lost) and not all(lost)
    assert all(s == e for s, e in zip(streams, expected) if s != "lost")
    # recovery alone: the reference reading a log whose every block is lost
    all_lost = _buffers(original, dtype, device="cpu")
    all_lost.regions[:, 0] = -1
    recovered = [t.cpu().clone() for t in tensors]
    perturb_torch(recovered, keys, [9], torch.zeros(1), ones.cpu(), "gaussian", "nearest", 9,
                  applied=scale.cpu(), held_log=all_lost)
    perturb_triton(tensors, keys, [9], torch.zeros(1, device=DEVICE), ones, "gaussian", "nearest",
                   9, applied=scale, held_log=small)
    row = 0
    for j, (t, o, r) in enumerate(zip(tensors, original, recovered)):
        for b in range(n_blocks(o.numel())):
            part = slice(b * BLOCK, (b + 1) * BLOCK)
            want = r[part] if lost[row] else o[part]
            assert_bits_equal(t.cpu()[part], want, f"tensor {j} block {b} lost={lost[row]}")
            row += 1
    assert not torch.equal(_bits_list(recovered)[0], _bits_list(original)[0])  # loss is visible


@pytest.mark.parametrize("shards", ["columns", "row-blocks", "inside-blocks", "split"])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_sharded_tensors_match_reference(dist, shards, monkeypatch):
    """Shards with index maps (an aligned one: grouped Philox; an odd one: per element; rows at
    block boundaries, and chunks at whole Philox calls inside a block: the plain kernel at
    shifted counters; both kinds in one call, split into a shifted and a mapped launch that
    write and read one log at the whole call's rows) log and restore as the reference does
    (rademacher: its noise moved into the selector's layout)."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(4)
    if shards == "columns":  # two column shards of a [40, 51] weight
        sizes, maps = [40 * 24, 40 * 27], [(0, 24, 51), (24, 27, 51)]
    elif shards == "row-blocks":  # rows [1, 2) and [2, 4) of a [4, 1024] weight: 1, 2 blocks
        sizes, maps = [1024, 2048], [(1024, 1024, 1024), (2048, 2048, 2048)]
    elif shards == "inside-blocks":  # chunks at 384, 1408 of a 1-D tensor: no log block
        sizes, maps = [1024, 600], [(384, 1024, 1024), (1408, 600, 600)]
    else:  # a column shard, a chunk at 384 (3 rademacher calls), another column shard
        sizes, maps = [40 * 24, 1500, 40 * 27], [(0, 24, 51), (384, 1500, 1500), (24, 27, 51)]
        from zokernels.backends.triton import perturb as module
        monkeypatch.setattr(module, "SPLIT_MIN_ELEMENTS", 0)
    original = [(0.02 * torch.randn(n, generator=g)).to(dtype) for n in sizes]
    ref = _passes_mapped(perturb_torch, [t.clone() for t in original], maps, "cpu", dist)
    launched = record_perturb_launches(monkeypatch, "MAPPED", "SHIFTED")
    tri = _passes_mapped(perturb_triton, [t.clone().to(DEVICE) for t in original], maps, DEVICE,
                         dist)
    if shards == "split":
        assert launched == [(False, True), (True, False)] * 2
    else:
        assert launched == [(shards == "columns", shards != "columns")] * 2
    for j, (a, b) in enumerate(zip(ref[0], tri[0])):
        _assert_same_or_both_nan(a, b.cpu(), f"shard {j}")
    assert int(tri[1].count) == int(ref[1].count)
    assert _streams(tri[1], ref[1]) == _streams(ref[1], ref[1])
    for j, (a, b) in enumerate(zip(tri[2], original)):
        assert_bits_equal(a.cpu(), b, f"shard {j}")


def _passes_mapped(fn, tensors, maps, device, dist):
    keys, ones = [7] * len(tensors), torch.ones(len(tensors), device=device)
    scale = torch.tensor([EPS], device=device)
    log = _buffers(tensors, torch.bfloat16, device=device)
    fn(tensors, keys, [2], scale, ones, dist, "nearest", 2, selector_log=log, index_maps=maps)
    plus = [t.clone() for t in tensors]
    fn(tensors, keys, [2], torch.zeros(1, device=device), ones, dist, "nearest", 2,
       applied=scale, held_log=log, index_maps=maps)
    return plus, log, tensors


def test_bad_arguments_are_refused_before_anything_is_written():
    t = [torch.randn(10, device=DEVICE).to(torch.bfloat16)]
    before = t[0].clone()
    one = torch.ones(1, device=DEVICE)
    log = _buffers(t, torch.bfloat16)
    with pytest.raises(ValueError, match="held_log"):
        perturb_triton(t, [0], [1], one, one, "gaussian", "nearest", 1, held_log=log)
    with pytest.raises(ValueError, match="selector_log"):
        perturb_triton(t, [0], [1], one, one, "gaussian", "stochastic", 1, selector_log=log)
    # rows of one word: no room for a spilled block's check (it would land in the next row)
    narrow = SelectorBuffers(log.regions[:, :1].contiguous(), log.pool, log.count)
    for fn in (perturb_triton, perturb_torch):
        with pytest.raises(ValueError, match="selector_log.regions must be int32 rows of >= 2"):
            fn(t, [0], [1], one, one, "gaussian", "nearest", 1, selector_log=narrow)
        with pytest.raises(ValueError, match="held_log.regions must be int32 rows of >= 2"):
            fn(t, [0], [1], one, one, "gaussian", "nearest", 1, applied=one, held_log=narrow)
    assert torch.equal(t[0], before)


# ---- the optimizer ---------------------------------------------------------------------------

def _mezo_net(in_features: int, out_features: int, device) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(in_features, in_features), torch.nn.Tanh(),
                              torch.nn.Linear(in_features, out_features))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.02)
        net[2].bias.zero_()
        net[2].bias[::3] = -0.0
    return net.to(torch.bfloat16).to(device)


def _mezo_run(backend: str, device, steps: int = 2, size=(64, 32)):
    net = _mezo_net(*size, device)
    opt = MeZO(net.parameters(), lr=0.0, eps=EPS, backend=backend, exact_restore=True,
               probe="inplace")
    x = torch.randn(4, size[0], generator=torch.Generator().manual_seed(1)).to(device)
    before = snapshot(net)
    for _ in range(steps):
        opt.step(lambda: net(x.to(torch.bfloat16)).float().pow(2).mean())
        assert_same(snapshot(net), before, f"{backend} lr=0 step")
    return net, opt


def test_mezo_on_triton_uses_selector_logs_and_restores_exactly():
    """MeZO, backend="triton", exact_restore=True: selector logs; an lr = 0 step leaves every
    weight bit-identical (zeros, -0.0 included), and the logs take the memory the cpu
    backend's take on the same model (same sizing, same counts)."""
    net, opt = _mezo_run("triton", DEVICE)
    assert all(type(log) is SelectorLog for pair in opt._logs for log in pair)
    assert opt.zo_state["undo_overflows"] == 0
    _, cpu_opt = _mezo_run("cpu", "cpu")
    assert opt.extra_memory_bytes == cpu_opt.extra_memory_bytes > 0


@pytest.mark.skipif(DEVICE != "cuda", reason="a model large enough for the rows to dominate the "
                    "pool's fixed slack is too slow for the interpreter")
def test_mezo_on_triton_extra_memory_is_at_most_5_percent():
    net, opt = _mezo_run("triton", DEVICE, steps=3, size=(512, 512))
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    assert 0 < opt.extra_memory_bytes <= 0.05 * params, (opt.extra_memory_bytes, params)
    assert opt.zo_state["undo_overflows"] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_a_pass_that_keeps_a_weight_logs_what_it_stores(dtype):
    """Scale 0 reading L1 and writing L2 keeps -0.0 as -0.0 (D == 0, decay 1) and logs that
    value, as the reference does; a restore reading L2 gives back every pattern."""
    n = BLOCK + 77
    g = torch.Generator().manual_seed(4)
    theta = (0.02 * torch.randn(n, generator=g)).to(dtype)
    theta[::3] = -0.0
    ones = torch.ones(1, device=DEVICE)
    logs = {}
    for name, fn in (("torch", perturb_torch), ("triton", perturb_triton)):
        t = theta.clone().to(DEVICE)
        l1, l2 = _buffers([t], dtype), _buffers([t], dtype)
        eps, zero = torch.tensor([EPS], device=DEVICE), torch.tensor([0.0], device=DEVICE)
        fn([t], [0], [9], eps, ones, "gaussian", "nearest", 1, selector_log=l1)
        fn([t], [0], [9], zero, ones, "gaussian", "nearest", 1, applied=eps, held_log=l1,
           selector_log=l2)
        fn([t], [0], [9], zero, ones, "gaussian", "nearest", 1, applied=zero, held_log=l2)
        assert_bits_equal(t.cpu(), theta, f"{name}: restore from the scale-0 pass's log")
        logs[name] = l2
    assert _streams(logs["triton"], logs["torch"]) == _streams(logs["torch"], logs["torch"])
