"""Triton-specific properties: one launch per group, z independent of block size and grid."""

import pytest
import torch

import zokernels
from helpers import assert_bits_equal

pytestmark = pytest.mark.skipif("triton" not in zokernels.available_backends(),
                                reason="triton backend not available")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton():
    import zokernels.backends.triton as backend

    return backend


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_one_launch_per_dtype_group(dist):
    backend = _triton()
    tensors = [torch.randn(n, device=DEVICE).to(dtype) for n, dtype in
               [(5, torch.float32), (300, torch.bfloat16), (129, torch.float32), (77, torch.bfloat16),
                (1, torch.float16)]]
    backend.reset_launch_count()
    zokernels.perturb_(tensors, [1, 2, 3], [0.1, 0.2, 0.3], dist=dist, backend="triton")
    assert backend.launch_count() == 3  # float32, bfloat16, float16
    weights = [torch.randn(9, 17, device=DEVICE), torch.randn(33, 5, device=DEVICE)]
    factors = [(torch.randn(9, 4, device=DEVICE), torch.randn(17, 4, device=DEVICE)),
               (torch.randn(33, 2, device=DEVICE), torch.randn(5, 2, device=DEVICE))]
    backend.reset_launch_count()
    zokernels.lowrank_perturb_(weights, [f[0] for f in factors], [f[1] for f in factors],
                               [torch.randn(4, device=DEVICE), torch.randn(2, device=DEVICE)],
                               backend="triton")
    assert backend.launch_count() == 1


@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "uniform"])
def test_noise_independent_of_block_size(monkeypatch, dist):
    from zokernels.backends.triton import noise as noise_module

    reference = zokernels.noise(1500, 3, 9, offset=2 ** 32 + 61, dist=dist, device=DEVICE,
                                backend="triton").cpu()
    for block in (128, 256, 1024):
        monkeypatch.setitem(noise_module.BLOCK, dist, block)
        got = zokernels.noise(1500, 3, 9, offset=2 ** 32 + 61, dist=dist, device=DEVICE,
                              backend="triton").cpu()
        assert_bits_equal(got, reference, f"{dist} BLOCK={block}")


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_perturb_independent_of_block_size(monkeypatch, dist):
    from zokernels.backends.triton import perturb as perturb_module

    start = [torch.randn(n, device=DEVICE) for n in (1, 1000, 3000)]
    reference = [t.clone() for t in start]
    zokernels.perturb_(reference, [4, 5], [1.0, -0.5], dist=dist, backend="triton")
    for block in (128, 512, 2048):
        monkeypatch.setitem(perturb_module.BLOCK, dist, block)
        got = [t.clone() for t in start]
        zokernels.perturb_(got, [4, 5], [1.0, -0.5], dist=dist, backend="triton")
        for j, (g, r) in enumerate(zip(got, reference)):
            assert_bits_equal(g, r, f"{dist} BLOCK={block} tensor {j}")


def test_unaligned_views_are_correct():
    """Views at odd element offsets cannot use the 16-byte alignment hint; results must not change."""
    storage = torch.randn(5000, device=DEVICE)
    views = [storage[1:1000], storage[1003:3000], storage[3001:]]
    copies = [v.clone() for v in views]  # aligned
    zokernels.perturb_(views, 7, 0.5, backend="triton")
    zokernels.perturb_(copies, 7, 0.5, backend="triton")
    for j, (v, c) in enumerate(zip(views, copies)):
        assert_bits_equal(v, c, f"view {j}")
