"""perturb_: every backend against the torch reference; K seeds, decay, invariances."""

import pytest
import torch

import zokernels

from helpers import assert_bits_equal, assert_close, interpreted

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GAUSSIAN_ATOL = 1e-5  # per unit of |scale|: libm differences in z


def _shapes(backend, device):
    shapes = [(0,), (1,), (3,), (1023,), (4097,), (33, 65)]
    if not interpreted(backend, device):
        shapes += [(256, 1031), (70_001,)]
    return shapes


def _make(shapes, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator).to(dtype).to(device) for s in shapes]


def _check_against_reference(got, expected, dtype, dist, scales, what):
    """Within one rounding of the output dtype, plus the z tolerance for gaussian in fp32."""
    atol = GAUSSIAN_ATOL * sum(abs(s) for s in scales) if dist == "gaussian" else 0.0
    assert_close(got, expected, atol=atol, ulps=1.0, dtype=dtype, what=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_matches_reference(fast_case, dtype, dist):
    backend, device = fast_case
    shapes = _shapes(backend, device)
    for seeds, scales in [([3], [1e-3]), ([3, 2 ** 40 + 9], [0.5, -0.25]),
                          (list(range(100, 114)), [0.01 * (k - 7) for k in range(14)])]:
        tensors = _make(shapes, dtype, device)
        reference = [t.cpu().clone() for t in tensors]
        keys = [11 * j + 1 for j in range(len(shapes))]
        decay = [1.0 - 0.01 * j for j in range(len(shapes))]
        zokernels.perturb_(tensors, seeds, scales, keys=keys, decay=decay, dist=dist, backend=backend)
        zokernels.perturb_(reference, seeds, scales, keys=keys, decay=decay, dist=dist, backend="torch")
        for j, (got, expected) in enumerate(zip(tensors, reference)):
            what = f"{backend} {dtype} {dist} K={len(seeds)} tensor {j} {tuple(got.shape)}"
            _check_against_reference(got.cpu(), expected, dtype, dist, scales, what)
            if dist == "rademacher" and backend == "cpu":
                # No FMA and the same operation order as the reference: bit for bit.
                assert_bits_equal(got.cpu(), expected, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_k_seeds_equal_sequential_single_seed_calls(any_case, dtype):
    backend, device = any_case
    n = 1023 if interpreted(backend, device) else 10_007
    seeds, scales = [5, 6, 7], [1e-2, -3e-2, 2e-2]
    fused = _make([(n,)], dtype, device, seed=1)[0]
    start = fused.clone()
    zokernels.perturb_(fused, seeds, scales, backend=backend)
    # In fp32, K single calls differ from one fused call only by intermediate roundings.
    sequential = start.float()
    for seed, scale in zip(seeds, scales):
        zokernels.perturb_(sequential, seed, scale, backend=backend)
    atol = 4 * 2.0 ** -23 * (start.float().abs().max().item() + 1)
    assert_close(fused.float().cpu(), sequential.cpu(), atol=atol, ulps=1.0, dtype=dtype,
                 what=f"{backend} {dtype} fused vs sequential")


def test_single_seed_equals_noise(any_case):
    backend, device = any_case
    n = 4097
    t = torch.zeros(n, device=device)
    zokernels.perturb_(t, 123, 1.0, keys=[77], backend=backend)
    z = zokernels.noise(n, 123, 77, device=device, backend=backend)
    assert_bits_equal(t.cpu(), z.cpu(), "0 + 1.0 * z equals noise()")


def test_decay_and_zero_scale(any_case):
    backend, device = any_case
    tensors = _make([(100,), (7, 9)], torch.float32, device)
    start = [t.clone() for t in tensors]
    zokernels.perturb_(tensors, 1, 0.0, decay=[0.5, 1.0], backend=backend)
    assert_bits_equal(tensors[0], start[0] * 0.5, "decay 0.5")
    assert_bits_equal(tensors[1], start[1], "decay 1 and scale 0 leave the tensor alone")


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_subset_and_order_invariance(any_case, dist):
    backend, device = any_case
    shapes = [(129,), (4, 33), (1000,)]
    keys = [3, 1, 2]
    together = _make(shapes, torch.float32, device)
    alone = [t.clone() for t in together]
    zokernels.perturb_(together, [9, 10], [0.1, 0.2], keys=keys, dist=dist, backend=backend)
    for j in reversed(range(len(shapes))):
        zokernels.perturb_([alone[j]], [9, 10], [0.1, 0.2], keys=[keys[j]], dist=dist, backend=backend)
    for j in range(len(shapes)):
        assert_bits_equal(together[j], alone[j], f"{backend} tensor {j} alone vs in a list")
    reordered = _make(shapes, torch.float32, device)
    order = [2, 0, 1]
    zokernels.perturb_([reordered[j] for j in order], [9, 10], [0.1, 0.2],
                       keys=[keys[j] for j in order], dist=dist, backend=backend)
    for j in range(len(shapes)):
        assert_bits_equal(reordered[j], together[j], f"{backend} tensor {j} reordered")


def test_non_contiguous_tensors_use_logical_index(any_case):
    backend, device = any_case
    base = torch.randn(40, 30, device=device)
    view = base.t()  # non-contiguous, 30 x 40
    expected = view.contiguous()
    zokernels.perturb_(expected, 4, 0.5, keys=[0], backend=backend)
    zokernels.perturb_(view, 4, 0.5, keys=[0], backend=backend)
    assert_bits_equal(view.contiguous(), expected, "transposed view")
    assert view.data_ptr() == base.data_ptr()


def test_mixed_dtypes_are_grouped(any_case):
    backend, device = any_case
    tensors = [torch.randn(300, device=device).to(dtype) for dtype in
               (torch.bfloat16, torch.float32, torch.float16, torch.bfloat16)]
    separately = [t.clone() for t in tensors]
    zokernels.perturb_(tensors, 8, 0.1, keys=[0, 1, 2, 3], backend=backend)
    for j, t in enumerate(separately):
        zokernels.perturb_([t], 8, 0.1, keys=[j], backend=backend)
        assert_bits_equal(tensors[j], t, f"grouped tensor {j}")


def test_parameters_record_no_autograd_history(any_case):
    backend, device = any_case
    layer = torch.nn.Linear(16, 8).to(device)
    before = [p.detach().clone() for p in layer.parameters()]
    zokernels.perturb_(list(layer.parameters()), 1, 1e-2, backend=backend)
    for p, b in zip(layer.parameters(), before):
        assert p.requires_grad and p.grad_fn is None and p.is_leaf
        assert not torch.equal(p.detach(), b)
    loss = layer(torch.randn(2, 16, device=device)).sum()
    loss.backward()  # the parameters are still ordinary leaves
    assert layer.weight.grad is not None


def test_empty_inputs_are_no_ops(any_case):
    backend, device = any_case
    zokernels.perturb_([], 1, 1.0, backend=backend)
    empty = torch.empty(0, 5, device=device)
    zokernels.perturb_([empty], 1, 1.0, backend=backend)
    assert empty.shape == (0, 5)


def test_scales_and_decay_as_tensors(any_case):
    backend, device = any_case
    a = torch.randn(500, device=device)
    b = a.clone()
    zokernels.perturb_(a, [1, 2], torch.tensor([0.1, -0.2], device=device),
                       decay=torch.tensor(0.9, device=device), backend=backend)
    zokernels.perturb_(b, [1, 2], [0.1, -0.2], decay=0.9, backend=backend)
    assert_bits_equal(a, b, "tensor vs number scalars")
