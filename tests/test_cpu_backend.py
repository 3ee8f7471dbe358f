"""C++ backend specifics: results independent of the thread count and of how work is split."""

import pytest
import torch

import zokernels
from helpers import assert_bits_equal, assert_same_in_both_simd_modes

pytestmark = pytest.mark.skipif("cpu" not in zokernels.available_backends(),
                                reason="C++ extension not built")


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_thread_count_does_not_change_results(restore_threads, dist):
    shapes = [(1,), (130,), (3, 1000), (100_003,), (2, 2)]
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=generator).to(torch.bfloat16) for s in shapes]
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        tensors = [t.clone() for t in start]
        zokernels.perturb_(tensors, [1, 2, 3], [0.1, -0.2, 0.05], dist=dist, rounding="stochastic",
                           backend="cpu")
        noise = zokernels.noise(50_001, 9, 4, offset=7, dist=dist, backend="cpu")
        results.append((tensors, noise))
    for tensors, noise in results[1:]:
        for j, (a, b) in enumerate(zip(tensors, results[0][0])):
            assert_bits_equal(a, b, f"tensor {j} with another thread count")
        assert_bits_equal(noise, results[0][1], "noise with another thread count")


def test_build_info():
    from zokernels.backends.cpu import build_info

    info = build_info()
    assert isinstance(info, dict) and info, info


def test_generic_path_matches_simd_path(tmp_path):
    """ZOKERNELS_CPU_SIMD=generic forces the portable kernels: same bits as the dispatched path."""
    script = (
        "import sys, torch, zokernels\n"
        "from zokernels.backends.cpu import build_info\n"
        "out = {'simd': build_info()['simd']}\n"
        "for dist in ('gaussian', 'rademacher', 'uniform'):\n"
        "    out[dist] = zokernels.noise(10_007, 5, 3, offset=9, dist=dist, backend='cpu')\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    t = torch.linspace(-3, 3, 5003).to(dtype)\n"
        "    zokernels.perturb_(t, [1, 2], [0.1, 0.01], rounding='stochastic', backend='cpu')\n"
        "    out[str(dtype)] = t\n"
        "torch.save(out, sys.argv[1])\n"
    )
    assert_same_in_both_simd_modes(script, tmp_path)
