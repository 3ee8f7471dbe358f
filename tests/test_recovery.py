"""perturb_(applied=...): moving between perturbed states through the recovered weight."""

import pytest
import torch

import zokernels
from helpers import assert_bits_equal, assert_close, interpreted


def _weights(n, dtype, device, scale=0.02, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=generator) * scale).to(dtype).to(device)


def _mezo_lr0_step(t, seed, eps, backend, recover):
    """+eps z, then -eps z, then back to theta (a MeZO step with lr = 0), in place."""
    zokernels.perturb_(t, seed, eps, backend=backend)
    if recover:
        zokernels.perturb_(t, seed, -eps, applied=eps, backend=backend)
        zokernels.perturb_(t, seed, 0.0, applied=-eps, backend=backend)
    else:
        zokernels.perturb_(t, seed, -2 * eps, backend=backend)
        zokernels.perturb_(t, seed, eps, backend=backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("eps", [1e-3, 1e-4])
def test_step_restores_most_weights(any_case, dtype, eps):
    backend, device = any_case
    n = 4096 if interpreted(backend, device) else 1 << 18
    start = _weights(n, dtype, device)
    plain, recovered = start.clone(), start.clone()
    _mezo_lr0_step(plain, 7, eps, backend, recover=False)
    _mezo_lr0_step(recovered, 7, eps, backend, recover=True)
    plain_off = (plain != start).double().mean().item()
    recovered_off = (recovered != start).double().mean().item()
    # Measured with the torch reference on N(0, 0.02) weights (1M elements, gaussian z), not
    # restored after the step, plain -> recovered: bf16 46.2% -> 8.3% (eps 1e-3), 49.0% -> 1.5%
    # (1e-4); fp16 46.1% -> 8.2%, 49.2% -> 1.3%; fp32 45.7% -> 11.2%, 48.8% -> 2.0%. The rest are
    # weights smaller than eps * z: several of them round to the same perturbed value, so no
    # rule can tell them apart. The bound for the 16-bit dtypes is the project's target (10%);
    # fp32, whose grid is finer, has more such collisions at eps = 1e-3.
    bound = {1e-3: 0.10 if dtype != torch.float32 else 0.13, 1e-4: 0.03}[eps]
    assert recovered_off <= bound, f"{recovered_off:.3%} of the weights not restored"
    assert recovered_off < plain_off / 3 or plain_off == 0, (plain_off, recovered_off)
    if dtype == torch.bfloat16:
        assert plain_off > 0.30  # the problem being solved: MeZO's +eps, -2eps, +eps


def test_exact_where_the_perturbation_is_invertible(any_case):
    """Weights and perturbed weights in one binade, [1, 2), and a rademacher perturbation that is
    never a half-integer number of ulps (no rounding ties): every weight is the only one that rounds
    to its perturbed value, so recovery is bit-exact. (With gaussian z, round-half-even ties make
    about 1 in 4000 fp32 weights share their perturbed value with a neighbour.)"""
    backend, device = any_case
    n = 4096 if interpreted(backend, device) else 100_000
    generator = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        start = (1.01 + 0.98 * torch.rand(n, generator=generator)).to(dtype).to(device)
        t = start.clone()
        for seeds, eps in (([3], [1e-3]), ([3, 4], [1e-3, -2e-3])):
            zokernels.perturb_(t, seeds, eps, dist="rademacher", backend=backend)
            zokernels.perturb_(t, seeds, [0.0] * len(seeds), applied=eps, dist="rademacher",
                               backend=backend)
            assert_bits_equal(t, start, f"{backend} {dtype} K={len(seeds)} recovered")


def test_applied_zero_is_plain_perturb(any_case):
    backend, device = any_case
    start = _weights(3000, torch.bfloat16, device)
    a, b = start.clone(), start.clone()
    zokernels.perturb_(a, [1, 2], [1e-2, 3e-3], backend=backend)
    zokernels.perturb_(b, [1, 2], [1e-2, 3e-3], applied=[0.0, 0.0], backend=backend)
    assert_bits_equal(a, b, "applied = 0")


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_applied_matches_reference(fast_case, dist):
    backend, device = fast_case
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        start = _weights(5003, dtype, "cpu", seed=2)
        zokernels.perturb_(start, [5, 6], [1e-3, 2e-3], dist=dist, backend="torch")
        got, expected = start.to(device), start.clone()
        for t, b in ((got, backend), (expected, "torch")):
            zokernels.perturb_(t, [5, 6], [-1e-3, 4e-4], applied=[1e-3, 2e-3], decay=0.999,
                               dist=dist, backend=b)
        if dist == "rademacher" and device == "cpu":
            assert_bits_equal(got.cpu(), expected, f"{backend} {dtype}")
        elif dtype == torch.float32:  # z within 1e-5 * |coefficients| (~5e-9 here), plus a rounding
            assert_close(got.cpu(), expected, atol=1e-5 * 3e-3, ulps=1.0, dtype=dtype,
                         what=f"{backend} {dtype}")
        else:  # gaussian z differs by a few ulp: a candidate test or a rounding may flip rarely
            assert (got.cpu() != expected).double().mean().item() < 0.01
            assert_close(got.cpu(), expected, atol=1e-5 * 3e-3, ulps=1.0, dtype=dtype,
                         what=f"{backend} {dtype}")


def test_applied_validation():
    t = torch.randn(10)
    before = t.clone()
    with pytest.raises(ValueError, match="applied"):
        zokernels.perturb_(t, [1, 2], [0.1, 0.2], applied=[0.1])
    with pytest.raises(ValueError, match="applied"):
        zokernels.perturb_(t, 1, 0.1, applied=float("nan"))
    assert torch.equal(t, before)
