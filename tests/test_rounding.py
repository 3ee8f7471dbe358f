"""Stochastic rounding: unbiased, at most one ulp, identical across backends."""

import math

import pytest
import torch

import zokernels
from zokernels.backends.torch.rounding import round_stochastic

from helpers import assert_bits_equal, assert_close, interpreted, ulp

LOW_PRECISION = [torch.bfloat16, torch.float16]


def _sub_ulp_update(backend, device, dtype, n, rounding, rounding_seed):
    """theta in [1, 2) plus 0.3 ulp * z (rademacher): the size of a typical ZO-SGD update."""
    generator = torch.Generator().manual_seed(3)
    theta = (1 + torch.rand(n, generator=generator)).to(dtype)
    step = 0.3 * ulp(torch.tensor(1.5), dtype).item()
    z = zokernels.noise(n, 42, 0, dist="rademacher")
    exact = theta.float() + step * z  # exact in float32
    t = theta.to(device)
    zokernels.perturb_(t, 42, step, dist="rademacher", rounding=rounding,
                       rounding_seed=rounding_seed, backend=backend)
    return t.cpu(), exact, z, step


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_unbiased_and_within_one_ulp(any_case, dtype):
    backend, device = any_case
    n = 8192 if interpreted(backend, device) else 1 << 20
    trials = 4
    signed_error_sum = 0.0
    for rounding_seed in range(trials):
        result, exact, z, step = _sub_ulp_update(backend, device, dtype, n, "stochastic", rounding_seed)
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
