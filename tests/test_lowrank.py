"""lowrank_perturb_ against decay * W + scale * U @ diag(tau) @ V.T."""

import pytest
import torch

import zokernels

from helpers import assert_close, assert_same_in_both_simd_modes, interpreted

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


def _drawn_problem(backend, device, dtype, seed=7):
    """Weights, taus and a FactorDraw with the factors it describes drawn by noise()."""
    shapes = [(1, 1, 1), (3, 5, 2), (17, 33, 8)]
    if not interpreted(backend, device):
        shapes += [(300, 257, 16), (1024, 96, 3)]
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(m, n, generator=generator).to(dtype).to(device) for m, n, _ in shapes]
    taus = [torch.randn(r, generator=generator).to(device) for _, _, r in shapes]
    keys = [5, 2 ** 32 - 1, 0, 77, 1234][:len(shapes)]
    u_offsets = [3, 2 ** 40 + 1, 0, 9, 2 ** 64 - 1024 * 3 - 96 * 3][:len(shapes)]
    v_offsets = [u + m * r + j for j, (u, (m, _, r)) in enumerate(zip(u_offsets, shapes))]
    v_offsets[-1] = 2 ** 64 - shapes[-1][1] * shapes[-1][2]  # a factor ending at 2^64
    draw = zokernels.FactorDraw(2 ** 63 + 11, u_offsets, v_offsets)
    us = [zokernels.noise(m * r, draw.seed, key, offset=offset, device=device,
                          backend=backend).view(m, r)
          for (m, _, r), key, offset in zip(shapes, keys, u_offsets)]
    vs = [zokernels.noise(n * r, draw.seed, key, offset=offset, device=device,
                          backend=backend).view(n, r)
          for (_, n, r), key, offset in zip(shapes, keys, v_offsets)]
    return weights, taus, keys, draw, us, vs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_drawn_factors_are_the_noise_they_describe(any_case, dtype):
    """A FactorDraw: the pass (plain with decay, and recovering from applied taus) gives the
    bits of the same pass given noise()'s factors, with every weight drawn or some of them
    (us / vs entries None), offsets up to the end of the stream."""
    backend, device = any_case
    weights, taus, keys, draw, us, vs = _drawn_problem(backend, device, dtype)
    mixed_u = [None if j % 2 else u for j, u in enumerate(us)]
    mixed_v = [None if j % 2 else v for j, v in enumerate(vs)]
    for factors in ((None, None), (mixed_u, mixed_v)):
        given, drawn = [w.clone() for w in weights], [w.clone() for w in weights]
        for ws, (u_list, v_list), extra in ((given, (us, vs), {}),
                                            (drawn, factors, {"draw": draw})):
            common = dict(keys=keys, backend=backend, **extra)
            zokernels.lowrank_perturb_(ws, u_list, v_list, taus, scale=0.3, decay=0.9, **common)
            zokernels.lowrank_perturb_(ws, u_list, v_list, taus, scale=-0.6, applied_scale=0.3,
                                       applied_taus=taus, **common)
        for j, (a, b, w) in enumerate(zip(given, drawn, weights)):
            assert torch.equal(a, b), f"weight {j}, {backend}-{device} {dtype}"
        assert not all(torch.equal(a, w) for a, w in zip(given, weights))


@pytest.mark.parametrize("change, error, match", [
    ({"draw": (1, [0], [0])}, TypeError, "FactorDraw"),
    ({"u_offsets": [0]}, ValueError, "one offset per weight"),
    ({"v_offsets": [0, -1, 0]}, ValueError, r"draw.v_offsets\[1\]"),
    ({"seed": 2 ** 64}, ValueError, "draw.seed"),
    ({"u_offsets": [0, 2 ** 64 - 11, 0]}, ValueError, "past index 2\\^64"),
    ({"us": "half"}, ValueError, r"us\[1\] and vs\[1\]"),
    ({"us": [None]}, ValueError, "one entry per weight"),
])
def test_drawn_factors_refused_before_any_write(fast_case, change, error, match):
    """A malformed FactorDraw or factor list: the error names it and no weight is written."""
    backend, device = fast_case
    weights = [torch.randn(m, n).to(device) for m, n in ((4, 3), (6, 5), (2, 2))]
    before = [w.clone() for w in weights]
    taus = [torch.randn(2).to(device) for _ in weights]
    fields = {"seed": 1, "u_offsets": [0, 0, 0], "v_offsets": [8, 12, 4]}
    fields.update({k: v for k, v in change.items() if k in fields})
    draw = change.get("draw", zokernels.FactorDraw(**fields))
    us = vs = None
    if change.get("us") == "half":  # weight 1 given U but not V
        us = [None, torch.randn(6, 2).to(device), None]
        vs = [None, None, None]
    elif "us" in change:
        us = change["us"]
    with pytest.raises(error, match=match):
        zokernels.lowrank_perturb_(weights, us, vs, taus, keys=[1, 2, 3], backend=backend,
                                   draw=draw)
    for w, b in zip(weights, before):
        assert torch.equal(w, b)


def test_cpu_backend_skips_empty_weights_beside_drawn_factors():
    """lowrank_perturb_cpu with a 0 x 5 weight and its given (empty) U: the empty U's data_ptr
    is 0, the kernel's mark of drawn factors, which made the call fail; the empty weight is left
    out and the others get the torch backend's bits."""
    from zokernels.backends.cpu.lowrank import lowrank_perturb_cpu
    from zokernels.backends.torch.lowrank import lowrank_perturb_torch
    torch.manual_seed(5)
    weights = [torch.empty(0, 5), torch.randn(3, 4)]
    us, vs = [torch.empty(0, 2), torch.randn(3, 2)], [torch.randn(5, 2), torch.randn(4, 2)]
    taus = [torch.randn(2), torch.randn(2)]
    assert us[0].data_ptr() == 0
    before = weights[1].clone()
    args = (taus, torch.tensor([0.5]), torch.tensor([1.0, 0.9]), [1, 2], "nearest", 0)
    expected = [w.clone() for w in weights]
    lowrank_perturb_torch(expected, us, vs, *args)
    lowrank_perturb_cpu(weights, us, vs, *args)
    assert torch.equal(weights[1], expected[1]) and not torch.equal(weights[1], before)


def test_plain_pass_simd_matches_generic(tmp_path):
    """The plain pass (no recovery, no log: updates, merges) of the AVX2 build (row products
    summed in registers, lowrank.h) and of ZOKERNELS_CPU_SIMD=generic: the same bits in every
    dtype, rounding to nearest: rows shorter and longer than a tile, widths off the 8- and
    64-column blocks, decays, a scale that overflows, NaN / inf / huge weights, drawn factors,
    several weights in one call (tiles spanning rows of two weights)."""
    script = (
        "import sys, torch, zokernels\n"
        "from zokernels.backends.cpu import build_info\n"
        "from zokernels.ops.lowrank import FactorDraw\n"
        "torch.manual_seed(0)\n"
        "out = {'simd': build_info()['simd']}\n"
        "shapes = [(1, 1, 1), (3, 5, 2), (17, 33, 8), (300, 257, 7), (5, 1030, 8), (2, 7, 33),\n"
        "          (3, 31, 4), (9, 64, 32), (1, 5000, 8), (7, 3, 8), (3, 1025, 5)]\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    for m, n, r in shapes:\n"
        "        w = torch.randn(m, n).mul(0.02).to(dtype)\n"
        "        if m * n > 10:\n"
        "            w.view(-1)[:4] = torch.tensor([float('nan'), float('inf'), -6e4, 1e-7])\n"
        "        u, v, tau = torch.randn(m, r), torch.randn(n, r), torch.randn(r)\n"
        "        for decay, scale in ((1.0, 1e-3), (0.9, 0.5), (1.0, 1e30)):\n"
        "            t = w.clone()\n"
        "            zokernels.lowrank_perturb_(t, [u], [v], [tau], scale=scale, decay=decay,\n"
        "                                       backend='cpu', check_finite=False)\n"
        "            out[f'{dtype} {m}x{n} r{r} {decay} {scale}'] = t\n"
        "        t = w.clone()\n"
        "        zokernels.lowrank_perturb_(t, None, None, [tau], scale=1e-3, backend='cpu',\n"
        "                                   draw=FactorDraw(7, [0], [m * r]))\n"
        "        out[f'{dtype} {m}x{n} r{r} drawn'] = t\n"
        "    ws = [torch.randn(m, n).to(dtype) for m, n, _ in shapes]\n"
        "    zokernels.lowrank_perturb_(ws, [torch.randn(m, r) for m, _, r in shapes],\n"
        "                               [torch.randn(n, r) for _, n, r in shapes],\n"
        "                               [torch.randn(r) for *_, r in shapes], scale=0.1,\n"
        "                               decay=0.99, backend='cpu')\n"
        "    for j, t in enumerate(ws):\n"
        "        out[f'{dtype} several, weight {j}'] = t\n"
        "torch.save(out, sys.argv[1])\n"
    )
    assert_same_in_both_simd_modes(script, tmp_path)
