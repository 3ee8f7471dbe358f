"""lowrank_perturb_ against decay * W + scale * U @ diag(tau) @ V.T."""

import pytest
import torch

import zokernels

from helpers import assert_close, interpreted

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _problem(shapes, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weights, us, vs, taus = [], [], [], []
    for m, n, r in shapes:
        weights.append(torch.randn(m, n, generator=generator).to(dtype).to(device))
        us.append((torch.randn(m, r, generator=generator) / r ** 0.5).to(device))
        vs.append((torch.randn(n, r, generator=generator) / r ** 0.5).to(device))
        taus.append(torch.randn(r, generator=generator).to(device))
    return weights, us, vs, taus


def _expected(weights, us, vs, taus, scale, decays):
    return [(w.double().cpu() * d + scale * (u.double().cpu() @ torch.diag(t.double().cpu())
                                            @ v.double().cpu().T))
            for w, u, v, t, d in zip(weights, us, vs, taus, decays)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_formula(any_case, dtype):
    backend, device = any_case
    shapes = [(1, 1, 1), (3, 5, 2), (17, 33, 8), (64, 48, 16)]
    if not interpreted(backend, device):
        shapes += [(300, 257, 64), (1024, 96, 3)]
    weights, us, vs, taus = _problem(shapes, dtype, device)
    decays = [1.0 - 0.1 * j for j in range(len(shapes))]
    expected = _expected(weights, us, vs, taus, 0.5, decays)
    zokernels.lowrank_perturb_(weights, us, vs, taus, scale=0.5, decay=decays, backend=backend)
    for j, (w, e) in enumerate(zip(weights, expected)):
        # One rounding to dtype, plus float32 accumulation of an r-term sum of O(1) values.
        atol = 1e-5 * (shapes[j][2] ** 0.5) * 4
        assert_close(w.cpu(), e.to(torch.float32), atol=atol, ulps=1.0, dtype=dtype,
                     what=f"{backend} {dtype} weight {j} {shapes[j]}")


def test_matches_reference_backend_with_stochastic_rounding(fast_case):
    backend, device = fast_case
    shapes = [(19, 40, 4), (64, 65, 16)]
    for dtype in (torch.bfloat16, torch.float16):
        weights, us, vs, taus = _problem(shapes, dtype, device, seed=1)
        reference = [w.cpu().clone() for w in weights]
        scale = 1e-3
        zokernels.lowrank_perturb_(weights, us, vs, taus, scale=scale, rounding="stochastic",
                                   rounding_seed=7, keys=[4, 5], backend=backend)
        zokernels.lowrank_perturb_(reference, [u.cpu() for u in us], [v.cpu() for v in vs],
                                   [t.cpu() for t in taus], scale=scale, rounding="stochastic",
                                   rounding_seed=7, keys=[4, 5], backend="torch")
        for j, (w, e) in enumerate(zip(weights, reference)):
            assert_close(w.cpu(), e, atol=0.0, ulps=1.0, dtype=dtype,
                         what=f"{backend} {dtype} stochastic weight {j}")
            # Summation order differs, so only a few decisions may flip.
            assert (w.cpu() != e).double().mean().item() < 0.01


def test_shared_tau_and_tensor_scale(any_case):
    backend, device = any_case
    weights, us, vs, _ = _problem([(8, 16, 4), (12, 16, 4)], torch.float32, device)
    tau = torch.randn(4, device=device)
    copies = [w.clone() for w in weights]
    zokernels.lowrank_perturb_(weights, us, vs, tau, scale=torch.tensor(0.25, device=device),
                               backend=backend)
    zokernels.lowrank_perturb_(copies, us, vs, [tau, tau], scale=0.25, backend=backend)
    for a, b in zip(weights, copies):
        assert torch.equal(a, b)


def test_non_contiguous_weight(any_case):
    backend, device = any_case
    weights, us, vs, taus = _problem([(24, 10, 4)], torch.float32, device)
    base = torch.randn(10, 24, device=device)
    view = base.t()  # 24 x 10, non-contiguous
    expected = _expected([view], us, vs, taus, 1.0, [1.0])[0]
    zokernels.lowrank_perturb_([view], us, vs, taus, backend=backend)
    assert_close(view.cpu(), expected.float(), atol=1e-5, ulps=1.0, dtype=torch.float32)
