"""perturb_(..., sources=): the out-of-place pass t = round(decay * s + D) equals the in-place pass
on a copy of s, bit for bit, on every backend; s is only read; bad input is refused first."""

import pytest
import torch

import zokernels
from zokernels._dispatch import implementation

from helpers import assert_bits_equal, interpreted

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _sources(shapes, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator).to(dtype).to(device) for s in shapes]


def _shapes(backend, device):
    shapes = [(0,), (1,), (3,), (1023,), (33, 65)]
    return shapes if interpreted(backend, device) else shapes + [(70_001,), (300, 257)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_out_of_place_equals_in_place_on_a_copy(any_case, dtype, dist, rounding):
    backend, device = any_case
    sources = _sources(_shapes(backend, device), dtype, device)
    kept = [s.clone() for s in sources]
    # targets full of NaN: every element must be written, none read
    out = [torch.full_like(s, float("nan")) for s in sources]
    expected = [s.clone() for s in sources]
    kwargs = dict(keys=[7 * j + 2 for j in range(len(sources))],
                  decay=[1.0 - 0.02 * j for j in range(len(sources))], dist=dist,
                  rounding=rounding, rounding_seed=99, backend=backend)
    seeds, scales = [11, 2 ** 40 + 3], [1e-3, -2.5e-3]
    zokernels.perturb_(out, seeds, scales, sources=sources, **kwargs)
    zokernels.perturb_(expected, seeds, scales, **kwargs)
    for j, (o, e, s, k) in enumerate(zip(out, expected, sources, kept)):
        what = f"{backend} {dtype} {dist} {rounding} tensor {j} {tuple(s.shape)}"
        assert_bits_equal(o.cpu(), e.cpu(), what)
        assert_bits_equal(s.cpu(), k.cpu(), what + ": the source is only read")


def test_out_of_place_shards_use_their_index_maps(any_case):
    """A row block drawn out of place at its offset in the whole tensor (a virtual probe's
    chunk) equals the same rows of the whole tensor perturbed in place."""
    backend, device = any_case
    rows, columns, start, stop = 40, 33, 8, 29
    for dtype in (torch.float32, torch.bfloat16):
        whole = _sources([(rows, columns)], dtype, device, seed=3)[0]
        block = torch.empty(stop - start, columns, dtype=dtype, device=device)
        zokernels.perturb_(block, 5, 1e-2, keys=[4], backend=backend,
                           sources=whole[start:stop],
                           index_maps=[(start * columns, block.numel(), block.numel())])
        expected = whole.clone()
        zokernels.perturb_(expected, 5, 1e-2, keys=[4], backend=backend)
        assert_bits_equal(block.cpu(), expected[start:stop].cpu(), f"{backend} {dtype} rows")


def test_sources_at_their_own_addresses(any_case):
    """Sources laid out unlike their targets (one buffer, in reversed order, one of them an
    element off 16-byte alignment) and targets of mixed dtypes in one call: each target reads its
    own source (a kernel addressing a source by its target's offset, or by the first source's,
    reads other values)."""
    backend, device = any_case
    sizes = [1000, 37, 513]
    buffer = torch.randn(1 + sum(sizes), device=device)
    ends = [1 + sum(sizes[j:]) for j in range(len(sizes))]  # reversed: the last one first
    sources = [buffer[end - n:end] for end, n in zip(ends, sizes)]
    assert sources[-1].data_ptr() == buffer[1:].data_ptr()  # 4 bytes past the buffer's start
    halves = [torch.randn(n, device=device).to(torch.bfloat16) for n in (300, 71)]
    sources += halves
    out = [torch.full_like(t, float("nan")) for t in sources]
    expected = [t.clone() for t in sources]
    keys = [3, 9, 27, 81, 243]
    zokernels.perturb_(out, 7, 0.01, keys=keys, backend=backend, sources=sources)
    zokernels.perturb_(expected, 7, 0.01, keys=keys, backend=backend)
    for j, (o, e) in enumerate(zip(out, expected)):
        assert_bits_equal(o.cpu(), e.cpu(), f"{backend} tensor {j}")


def test_an_inference_tensor_can_be_a_source(any_case):
    """A source is only read: an inference tensor (which may not be written outside
    inference_mode) is accepted as one, and stays as it was."""
    backend, device = any_case
    with torch.inference_mode():
        source = torch.randn(300, device=device)
    kept = source.clone()
    out = torch.empty(300, device=device)
    expected = kept.clone()
    zokernels.perturb_(out, 2, 0.5, sources=source, backend=backend)
    zokernels.perturb_(expected, 2, 0.5, backend=backend)
    assert_bits_equal(out, expected, "from an inference tensor")
    assert_bits_equal(source, kept, "the source is only read")


def test_non_contiguous_sources_and_targets(any_case):
    backend, device = any_case
    source = torch.randn(30, 40, device=device).t()  # 40 x 30, non-contiguous
    kept = source.clone()
    target = torch.zeros(30, 40, device=device).t()
    zokernels.perturb_(target, 4, 0.5, keys=[1], sources=source, backend=backend)
    expected = source.contiguous()
    zokernels.perturb_(expected, 4, 0.5, keys=[1], backend=backend)
    assert_bits_equal(target.contiguous(), expected, "transposed source and target")
    assert_bits_equal(source, kept, "the source is only read")


@pytest.mark.parametrize("case", ["count", "shape", "dtype", "overlap", "alias", "applied",
                                  "type"])
def test_bad_sources_are_refused_before_any_write(case):
    t = [torch.randn(10), torch.randn(4, 5)]
    sources = [torch.randn(10), torch.randn(4, 5)]
    kwargs = {}
    if case == "count":
        sources = sources[:1]
    elif case == "shape":
        sources[1] = torch.randn(20)
    elif case == "dtype":
        sources[1] = sources[1].to(torch.bfloat16)
    elif case == "overlap":
        sources[0] = t[1].view(-1)[:10]  # reads memory the call writes
    elif case == "alias":
        sources = t
    elif case == "applied":
        kwargs["applied"] = [1e-3]
    elif case == "type":
        sources = [sources[0], "not a tensor"]
    before = [x.clone() for x in t]
    message = {"count": "sources must have one tensor per tensor",
               "shape": r"sources\[1\] must have the shape", "dtype": r"sources\[1\] must have",
               "overlap": r"sources\[0\] shares memory", "alias": r"sources\[0\] shares memory",
               "applied": "sources and applied",
               "type": r"sources\[1\] must be a torch.Tensor"}[case]
    error = TypeError if case == "type" else ValueError
    with pytest.raises(error, match=message):
        zokernels.perturb_(t, 3, 1e-3, sources=sources, **kwargs)
    for x, b in zip(t, before):
        assert_bits_equal(x, b, f"{case}: nothing written")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_backends_refuse_sources_beside_recovery(backend):
    """The backends' own check (the public op refuses first): sources with applied, or sources
    that are not one contiguous tensor of each tensor's dtype and numel."""
    if backend not in zokernels.available_backends():
        pytest.skip("backend not built")
    perturb = implementation(backend, "perturb")
    t = [torch.zeros(8)]
    one = torch.ones(1)
    before = t[0].clone()
    with pytest.raises(ValueError, match="sources exclude applied"):
        perturb(t, [0], [1], one, one, "gaussian", "nearest", 1, applied=one,
                sources=[torch.ones(8)])
    with pytest.raises(ValueError, match="contiguous, of its tensor's dtype, numel and device"):
        perturb(t, [0], [1], one, one, "gaussian", "nearest", 1, sources=[torch.ones(9)])
    with pytest.raises(ValueError, match="contiguous"):
        perturb(t, [0], [1], one, one, "gaussian", "nearest", 1,
                sources=[torch.ones(8, 2)[:, 0]])
    assert_bits_equal(t[0], before, "nothing written")


def test_native_kernel_checks_its_source_list():
    if "cpu" not in zokernels.available_backends():
        pytest.skip("cpu backend not built")
    from zokernels.backends.cpu import load_cpu_extension
    ext = load_cpu_extension()
    t = torch.zeros(8)
    args = ([t.data_ptr()], [8], [0], [1.0], 0, [1], [1.0], [], 0, 0, 1, 1)
    with pytest.raises(ValueError, match="source_ptrs must be empty or have one per tensor"):
        ext.perturb(*args, source_ptrs=[t.data_ptr(), t.data_ptr()])
    with pytest.raises(ValueError, match="source_ptrs excludes applied and the logs"):
        ext.perturb([t.data_ptr()], [8], [0], [1.0], 0, [1], [1.0], [0.5], 0, 0, 1, 1,
                    source_ptrs=[torch.ones(8).data_ptr()])
    assert not t.any()
