"""Stochastic rounding: unbiased, at most one ulp, identical across backends; contract 3's
integer stochastic rounding bit-identical in the torch reference, C++ (both SIMD paths) and
Triton."""

import math

import pytest
import torch

import zokernels
from zokernels.backends.torch.rounding import (round_stochastic, round_stochastic_integer,
                                               rounding_bits)
from zokernels.ops.undo import implementation

from helpers import (assert_bits_equal, assert_close, assert_same_in_both_simd_modes, interpreted,
                     ulp)

LOW_PRECISION = [torch.bfloat16, torch.float16]


def _sub_ulp_update(backend, device, dtype, n, rounding, rounding_seed, contract=2):
    """theta in [1, 2) plus 0.3 ulp * z (rademacher): the size of a typical ZO-SGD update."""
    generator = torch.Generator().manual_seed(3)
    theta = (1 + torch.rand(n, generator=generator)).to(dtype)
    step = 0.3 * ulp(torch.tensor(1.5), dtype).item()
    z = zokernels.noise(n, 42, 0, dist="rademacher")
    exact = theta.float() + step * z  # exact in float32
    t = theta.to(device)
    zokernels.perturb_(t, 42, step, dist="rademacher", rounding=rounding,
                       rounding_seed=rounding_seed, backend=backend, contract=contract)
    return t.cpu(), exact, z, step


@pytest.mark.parametrize("contract", [2, 3])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_unbiased_and_within_one_ulp(any_case, dtype, contract):
    backend, device = any_case
    n = 8192 if interpreted(backend, device) else 1 << 20
    trials = 4
    signed_error_sum = 0.0
    for rounding_seed in range(trials):
        result, exact, z, step = _sub_ulp_update(backend, device, dtype, n, "stochastic",
                                                 rounding_seed, contract)
        error = result.double() - exact.double()
        assert (error.abs() < ulp(exact, dtype)).all(), "moved by one ulp or more"
        signed_error_sum += (error * z.double()).sum().item()
    # Each error has |e| < 1 ulp (2^-7 or 2^-10 here, 2^-8 / 2^-11 just below 1.0).
    spacing = ulp(torch.tensor(1.5), dtype).item()
    bound = 5 * (spacing / 2) / math.sqrt(n * trials)
    assert abs(signed_error_sum / (n * trials)) < bound, "stochastic rounding is biased"
    # Round-to-nearest drops the sub-ulp update entirely: a bias of -step along z.
    nearest, exact, z, step = _sub_ulp_update(backend, device, dtype, n, "nearest", 0)
    assert abs(((nearest.double() - exact.double()) * z.double()).mean().item() + step) < 0.05 * step


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_matches_reference_on_edge_values(fast_case, dtype):
    backend, device = fast_case
    info = torch.finfo(dtype)
    edge = torch.tensor([0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, -info.tiny / 8, info.max,
                         -info.max, info.max * 0.999, 1.0, -1.0, 3.0, 65000.0, -2.5e-6, 1e-30,
                         float("inf"), float("-inf")])
    generator = torch.Generator().manual_seed(5)
    values = torch.cat([edge, torch.randn(4000, generator=generator) * 100]).to(dtype)
    for dist, scale in [("rademacher", info.tiny), ("gaussian", 1e-3), ("rademacher", 3e-3)]:
        got = values.to(device).clone()
        expected = values.clone()
        for t, b in ((got, backend), (expected, "torch")):
            zokernels.perturb_(t, [11, 12], [scale, scale / 3], dist=dist, rounding="stochastic",
                               rounding_seed=99, backend=b)
        what = f"{backend} {dtype} {dist} stochastic"
        if dist == "rademacher" and device == "cpu":
            assert_bits_equal(got.cpu(), expected, what)
        else:  # z differs by a few ulp: a decision may flip near p, still within one ulp
            assert_close(got.cpu(), expected, atol=1e-5 * scale, ulps=1.0, dtype=dtype, what=what)


def test_float32_ignores_stochastic_rounding(any_case):
    backend, device = any_case
    a = torch.randn(1000, device=device)
    b = a.clone()
    zokernels.perturb_(a, 1, 1e-3, rounding="stochastic", rounding_seed=5, backend=backend)
    zokernels.perturb_(b, 1, 1e-3, rounding="nearest", backend=backend)
    assert_bits_equal(a, b, "fp32 stochastic == nearest")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_reference_rounding_picks_a_neighbour(dtype):
    """The reference rule on edge values, with the extreme uniforms 0 and just below 1."""
    info = torch.finfo(dtype)
    acc = torch.tensor([1.0 + 1e-4, -1.0 - 1e-4, info.tiny * 0.3, -info.tiny * 0.7, info.max * 1.0001,
                        float(info.max) + 1e30, 0.0, 2.0 ** -30, float("nan"), float("inf")])
    nearest = acc.to(dtype).float()
    for u in (0.0, 1.0 - 2 ** -24):
        result = round_stochastic(acc, dtype, torch.full_like(acc, u)).float()
        finite = torch.isfinite(nearest)
        assert torch.equal(result[~finite].isnan(), nearest[~finite].isnan())
        close = (result[finite].double() - acc[finite].double()).abs() < ulp(acc[finite], dtype)
        assert close.all(), (u, result, acc)
    # u = 0 always takes the far neighbour when acc is not representable, u ~ 1 never does.
    up = round_stochastic(acc[:2], dtype, torch.zeros(2)).float()
    assert (up.abs() > acc[:2].abs()).all()
    down = round_stochastic(acc[:2], dtype, torch.full((2,), 1 - 2 ** -24)).float()
    assert (down.abs() < acc[:2].abs()).all()


# ---- contract 3: integer stochastic rounding -----------------------------------------------

def _edge_values(dtype: torch.dtype, n_random: int) -> torch.Tensor:
    info = torch.finfo(dtype)
    edge = torch.tensor([0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, -info.tiny / 8,
                         info.max, -info.max, info.max * 0.999, 1.0, -1.0, 3.0, -2.5e-6, 1e-30,
                         float("inf"), float("-inf"), float("nan")])
    generator = torch.Generator().manual_seed(5)
    return torch.cat([edge, torch.randn(n_random, generator=generator) * 0.05,
                      torch.randn(n_random // 4, generator=generator) * 1e-6]).to(dtype)


def _same_bits_or_both_nan(actual, expected, what):
    """Bit-identical, except that NaN payloads are not part of the contract."""
    nan = actual.isnan() & expected.isnan()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    assert_bits_equal(actual[~nan], expected[~nan], what)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_integer_rounding_bit_identical_across_backends(fast_case, dtype):
    """perturb_ with contract=3: the same bits on every backend (K = 1, so that the noise sum
    has one rounding whatever a compiler contracts; v2 normals and rademacher are bit-exact),
    and not the contract-2 values."""
    backend, device = fast_case
    values = _edge_values(dtype, 1000 if interpreted(backend, device) else 100_000)
    info = torch.finfo(dtype)
    for dist, scale in [("gaussian", 1e-3), ("rademacher", 3e-4), ("rademacher", info.tiny)]:
        got = values.to(device).clone()
        expected = values.clone()
        for t, b in ((got, backend), (expected, "torch")):
            zokernels.perturb_(t, 11, scale, dist=dist, rounding="stochastic", rounding_seed=99,
                               backend=b, contract=3, check_finite=False)
        _same_bits_or_both_nan(got.cpu(), expected, f"{backend} {dtype} {dist} contract 3")
        v2 = values.clone()
        zokernels.perturb_(v2, 11, scale, dist=dist, rounding="stochastic", rounding_seed=99,
                           backend="torch", contract=2, check_finite=False)
        if scale > info.tiny:
            assert not torch.equal(v2, expected), "contract 3 rounds as contract 2 does"


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_integer_rounding_sharded_and_scatter_match_the_dense_pass(fast_case, dtype):
    """A shard (index map) draws the bits of its contract indices, and the undo log's scatter
    rewrites an element as the dense pass rounds it, both bit for bit with the reference."""
    backend, device = fast_case
    # (dist, columns, shard's first column, shard's width): grain 4 (gaussian's grouped path),
    # grain 128 (rademacher's grouped path), grain 1 (one Philox call per element)
    for dist, cols, first, width in [("gaussian", 40, 12, 20), ("rademacher", 256, 128, 128),
                                     ("gaussian", 40, 3, 19)]:
        rows = 3
        whole = _edge_values(dtype, rows * cols)[:rows * cols].view(rows, cols)
        whole = torch.where(whole.isnan(), torch.zeros_like(whole), whole)
        dense = whole.clone()
        zokernels.perturb_(dense, 3, 1e-3, keys=[7], dist=dist, rounding="stochastic",
                           rounding_seed=5, backend="torch", contract=3, check_finite=False)
        shard = whole[:, first:first + width].contiguous().to(device)
        zokernels.perturb_(shard, 3, 1e-3, keys=[7], dist=dist, rounding="stochastic",
                           rounding_seed=5, index_maps=[(first, width, cols)], backend=backend,
                           contract=3, check_finite=False)
        _same_bits_or_both_nan(shard.cpu(), dense[:, first:first + width].contiguous(),
                               f"{backend} {dist} shard {first}:{first + width} of {cols}")
    rows, cols = 6, 40
    whole = _edge_values(dtype, rows * cols)[:rows * cols].view(rows, cols)
    whole = torch.where(whole.isnan(), torch.zeros_like(whole), whole)
    dense = whole.clone()
    zokernels.perturb_(dense, 3, 1e-3, keys=[7], rounding="stochastic", rounding_seed=5,
                       backend="torch", contract=3, check_finite=False)
    # scatter: entries at every 3rd element, values = the weights before the pass
    flat = whole.reshape(-1)
    index = torch.arange(0, flat.numel(), 3, dtype=torch.int64)
    target = torch.zeros_like(flat).to(device)
    implementation(backend, "scatter_perturb")(
        [target], [7], index.to(device), flat[index].to(device),
        torch.tensor([index.numel()], dtype=torch.int64, device=device), [3],
        torch.tensor([1e-3], device=device), torch.ones(1, device=device), "gaussian",
        "stochastic", 5, contract=3)
    _same_bits_or_both_nan(target.cpu()[index], dense.reshape(-1)[index], f"{backend} scatter")


def test_integer_rounding_same_in_both_simd_modes(tmp_path):
    script = (
        "import sys, torch, zokernels\n"
        "from zokernels.backends.cpu import build_info\n"
        "out = {'simd': build_info()['simd']}\n"
        "for dtype in (torch.bfloat16, torch.float16):\n"
        "    for dist in ('gaussian', 'rademacher'):\n"
        "        t = (torch.linspace(-3, 3, 5003) * torch.logspace(-9, 0, 5003)).to(dtype)\n"
        "        zokernels.perturb_(t, [1, 2], [1e-3, 1e-4], dist=dist, rounding='stochastic',\n"
        "                           backend='cpu', contract=3)\n"
        "        out[f'{dtype} {dist}'] = t\n"
        "torch.save(out, sys.argv[1])\n"
    )
    assert_same_in_both_simd_modes(script, tmp_path)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_integer_rounding_rule(dtype):
    """The reference rule: bits 0 truncate toward zero, all-ones bits round away from zero
    unless acc is representable; always one of acc's two neighbours; nearest at and above the
    largest finite value and for inf / NaN; subnormal results included."""
    info = torch.finfo(dtype)
    acc = torch.tensor([1.0 + 1e-4, -1.0 - 1e-4, info.tiny * 0.3, -info.tiny * 0.7,
                        info.tiny * 2 ** -9 * 1.5, 2.0 ** -30, 0.0, -0.0, 1.0,
                        float(info.max) * 0.9999, float(info.max), float(info.max) * 1.001,
                        float("inf"), float("-inf"), float("nan")])
    nearest = acc.to(dtype)
    big = ~(acc.abs() < float(info.max))
    for r in (0, 1, 0x7FFF, 0xFFFF):
        result = round_stochastic_integer(acc, dtype, torch.full(acc.shape, r, dtype=torch.int64))
        _same_bits_or_both_nan(result[big], nearest[big], f"r={r}: at or above max")
        small = ~big
        error = result[small].double() - acc[small].double()
        assert (error.abs() < ulp(acc[small], dtype)).all(), (r, result, acc)
        if r == 0:  # truncation toward zero
            assert (result[small].double().abs() <= acc[small].double().abs()).all()
    exact = acc.to(dtype).double() == acc.double()
    up = round_stochastic_integer(acc, dtype, torch.full(acc.shape, 0xFFFF, dtype=torch.int64))
    away = ~exact & ~big
    assert (up[away].double().abs() > acc[away].double().abs()).all()
    assert_bits_equal(up[exact & ~big], acc[exact & ~big].to(dtype), "representable: unchanged")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_integer_rounding_unbiased_per_value(dtype):
    """For single values (normal, subnormal, negative, just below the largest finite), the mean
    of 2^16 roundings with distinct bits is acc within the resolution of 16 random bits
    (2^-16 ulp; fp16: 2^-13 ulp, its drop of 13 bits) plus, for fp16 subnormals, the prescale's
    rounding to a multiple of 2^-37 (half of it at most): the roundings are exhaustive over the
    16 bits, so this is exact, not statistical."""
    info = torch.finfo(dtype)
    values = [1.0 + 0.3 * 2 ** -7, -3.1e-6, info.tiny * 0.37, -info.tiny * 2 ** -5 * 1.3,
              float(info.max) * 0.99991]
    bits = torch.arange(1 << 16, dtype=torch.int64)
    for v in values:
        acc = torch.full((1 << 16,), v, dtype=torch.float32)
        result = round_stochastic_integer(acc, dtype, bits).double()
        step = ulp(acc[:1], dtype).item()
        resolution = step * (2.0 ** -13 if dtype == torch.float16 else 2.0 ** -16)
        if dtype == torch.float16 and abs(v) < info.tiny:
            resolution += 2.0 ** -38
        mean = result.mean().item()
        assert abs(mean - acc[0].double().item()) <= resolution, (v, mean)
        lo, hi = result.min().item(), result.max().item()
        assert hi - lo <= step, (v, lo, hi)


def test_integer_rounding_bits_layout():
    """16 bits per element: half i % 2 (low first) of word (i % 8) // 2 of stream-1 call i // 8."""
    from zokernels.backends.torch.philox import philox_torch

    i = torch.arange(64, 80, dtype=torch.int64)
    got = rounding_bits(77, torch.full_like(i, 4), i)
    words = philox_torch(77, torch.tensor([8, 9]), torch.tensor([0, 0]), torch.tensor([4, 4]),
                         torch.tensor([1, 1]))
    expected = []
    for q in range(2):
        for w in range(4):
            expected += [int(words[w][q]) & 0xFFFF, int(words[w][q]) >> 16]
    assert got.tolist() == expected
