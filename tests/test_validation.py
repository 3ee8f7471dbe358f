"""Bad input raises a clear error naming the argument, and no tensor is modified."""

import math

import pytest
import torch

import zokernels

from helpers import ALL_BACKEND_CASES


def _fresh(device):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(64, generator=generator).to(device),
            torch.randn(8, 8, generator=generator).to(torch.bfloat16).to(device)]


def _bits(tensors):
    return [t.detach().cpu().clone().view({4: torch.int32, 2: torch.int16}[t.element_size()])
            for t in tensors]


BAD_PERTURB_CALLS = [
    # (id, kwargs builder (tensors -> kwargs), error type, words the message must contain)
    ("int tensor", lambda ts: dict(tensors=ts + [torch.zeros(3, dtype=torch.int32)]), TypeError, "tensors[2]"),
    ("bool tensor", lambda ts: dict(tensors=ts + [torch.zeros(3, dtype=torch.bool)]), TypeError, "tensors[2]"),
    ("float64 tensor", lambda ts: dict(tensors=ts + [torch.zeros(3, dtype=torch.float64)]), TypeError, "float64"),
    ("not a tensor", lambda ts: dict(tensors=ts + [[1.0, 2.0]]), TypeError, "tensors[2]"),
    ("not a list", lambda ts: dict(tensors=3.0), TypeError, "tensors"),
    ("aliased", lambda ts: dict(tensors=ts + [ts[0]]), ValueError, "share memory"),
    ("overlapping view", lambda ts: dict(tensors=ts + [ts[0][10:20]]), ValueError, "share memory"),
    ("expanded", lambda ts: dict(tensors=ts + [torch.zeros(1).expand(5)]), ValueError, "overlap"),
    ("negative seed", lambda ts: dict(seeds=-1), ValueError, "seeds[0]"),
    ("seed too large", lambda ts: dict(seeds=[1, 2 ** 64]), ValueError, "seeds[1]"),
    ("float seed", lambda ts: dict(seeds=1.5), TypeError, "seeds[0]"),
    ("bool seed", lambda ts: dict(seeds=True), TypeError, "seeds[0]"),
    ("no seeds", lambda ts: dict(seeds=[], scales=[]), ValueError, "seeds"),
    ("key too large", lambda ts: dict(keys=[0, 2 ** 32]), ValueError, "keys[1]"),
    ("negative key", lambda ts: dict(keys=[-1, 0]), ValueError, "keys[0]"),
    ("keys length", lambda ts: dict(keys=[0]), ValueError, "keys"),
    ("scales length", lambda ts: dict(seeds=[1, 2], scales=[1.0]), ValueError, "scales"),
    ("scales tensor length", lambda ts: dict(scales=torch.ones(2)), ValueError, "scales"),
    ("nan scale", lambda ts: dict(scales=float("nan")), ValueError, "scales"),
    ("inf scale", lambda ts: dict(scales=torch.tensor([math.inf])), ValueError, "scales"),
    ("scale overflows float32", lambda ts: dict(scales=1e300), ValueError, "scales[0]"),
    ("decay overflows float32", lambda ts: dict(decay=[1.0, -1e39]), ValueError, "decay[1]"),
    ("string scale", lambda ts: dict(scales="1"), TypeError, "scales"),
    ("nan decay", lambda ts: dict(decay=float("nan")), ValueError, "decay"),
    ("inf decay in list", lambda ts: dict(decay=[1.0, math.inf]), ValueError, "decay[1]"),
    ("decay length", lambda ts: dict(decay=[1.0, 1.0, 1.0]), ValueError, "decay"),
    ("unknown dist", lambda ts: dict(dist="uniform"), ValueError, "dist"),
    ("unknown rounding", lambda ts: dict(rounding="up"), ValueError, "rounding"),
    ("unknown backend", lambda ts: dict(backend="cuda"), ValueError, "backend"),
    ("bad rounding seed", lambda ts: dict(rounding_seed=2 ** 64), ValueError, "rounding_seed"),
]


@pytest.mark.parametrize("case", ALL_BACKEND_CASES, ids=[f"{b}-{d}" for b, d in ALL_BACKEND_CASES])
@pytest.mark.parametrize("bad", BAD_PERTURB_CALLS, ids=[b[0] for b in BAD_PERTURB_CALLS])
def test_perturb_rejects_and_leaves_tensors_untouched(case, bad):
    backend, device = case
    _, build, error, words = bad
    tensors = _fresh(device)
    before = _bits(tensors)
    kwargs = dict(tensors=tensors, seeds=1, scales=1.0, backend=backend)
    kwargs.update(build(tensors))
    with pytest.raises(error) as info:
        zokernels.perturb_(**kwargs)
    assert words in str(info.value), str(info.value)
    for j, (t, b) in enumerate(zip(_bits(tensors), before)):
        assert torch.equal(t, b), f"tensor {j} was modified by a refused call"


def test_unavailable_backend_is_refused_before_writing(monkeypatch):
    tensors = _fresh("cpu")
    before = _bits(tensors)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton'"):
        zokernels.perturb_(tensors, 1, 1.0, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(_bits(tensors), before))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_devices_cpu_backend_refused_before_writing():
    tensors = [torch.randn(10), torch.randn(10, device="cuda")]
    before = _bits(tensors)
    with pytest.raises(ValueError, match="CPU tensors only"):
        zokernels.perturb_(tensors, 1, 1.0, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(_bits(tensors), before))


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(numel=-1), ValueError, "numel"),
    (dict(numel=2.0), TypeError, "numel"),
    (dict(seed=2 ** 64), ValueError, "seed"),
    (dict(key=2 ** 32), ValueError, "key"),
    (dict(offset=-5), ValueError, "offset"),
    (dict(offset=2 ** 64 - 2, numel=5), ValueError, "offset + numel"),
    (dict(dist="normal"), ValueError, "dist"),
    (dict(backend="gpu"), ValueError, "backend"),
])
def test_noise_rejects(kwargs, error, words):
    call = dict(numel=10, seed=1, key=0)
    call.update(kwargs)
    with pytest.raises(error, match=words.replace("+", r"\+")):
        zokernels.noise(**call)


def test_noise_zero_elements():
    for backend in zokernels.available_backends():
        device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
        z = zokernels.noise(0, 1, device=device, backend=backend)
        assert z.shape == (0,) and z.dtype == torch.float32


def _lowrank_problem():
    w = [torch.randn(6, 5), torch.randn(4, 5).to(torch.float16)]
    u = [torch.randn(6, 2), torch.randn(4, 3)]
    v = [torch.randn(5, 2), torch.randn(5, 3)]
    tau = [torch.randn(2), torch.randn(3)]
    return w, u, v, tau


BAD_LOWRANK_CALLS = [
    ("1-D weight", lambda w, u, v, t: dict(weights=[w[0].view(-1), w[1]]), ValueError, "weights[0]"),
    ("U shape", lambda w, u, v, t: dict(us=[u[0][:, :1], u[1]]), ValueError, "us[0]"),
    ("V shape", lambda w, u, v, t: dict(vs=[v[0], v[1][:4]]), ValueError, "vs[1]"),
    ("tau 2-D", lambda w, u, v, t: dict(taus=[t[0].view(1, 2), t[1]]), ValueError, "taus[0]"),
    ("factor count", lambda w, u, v, t: dict(us=u[:1]), ValueError, "us"),
    ("factor aliases weight", lambda w, u, v, t: dict(us=[w[0][:, :2], u[1]]), ValueError, "shares memory"),
    ("nan scale", lambda w, u, v, t: dict(scale=float("nan")), ValueError, "scale"),
    ("decay length", lambda w, u, v, t: dict(decay=[1.0]), ValueError, "decay"),
    ("stochastic without seed", lambda w, u, v, t: dict(rounding="stochastic"), ValueError, "rounding_seed"),
    ("int factor", lambda w, u, v, t: dict(taus=[t[0].long(), t[1]]), TypeError, "taus[0]"),
]


@pytest.mark.parametrize("bad", BAD_LOWRANK_CALLS, ids=[b[0] for b in BAD_LOWRANK_CALLS])
def test_lowrank_rejects_and_leaves_weights_untouched(bad):
    _, build, error, words = bad
    w, u, v, tau = _lowrank_problem()
    before = _bits(w)
    kwargs = dict(weights=w, us=u, vs=v, taus=tau)
    kwargs.update(build(w, u, v, tau))
    with pytest.raises(error) as info:
        zokernels.lowrank_perturb_(**kwargs)
    assert words in str(info.value), str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(_bits(w), before))


def test_available_backends():
    names = zokernels.available_backends()
    assert names[0] == "torch" and set(names) <= {"torch", "cpu", "triton"}


def test_scale_tensor_aliasing_a_written_tensor_is_refused(any_case):
    backend, device = any_case
    a, c = torch.zeros(3, device=device), torch.zeros(3, device=device)
    a[0] = 1.0
    for kwargs in (dict(scales=a[0:1]), dict(scales=1.0, decay=c[1]),
                   dict(scales=1.0, applied=a[2:3])):
        with pytest.raises(ValueError, match="shares memory"):
            zokernels.perturb_([a, c], 1, backend=backend, **kwargs)
    assert a.tolist() == [1.0, 0.0, 0.0] and c.tolist() == [0.0, 0.0, 0.0]


def test_inference_and_misaligned_tensors_are_refused():
    with torch.inference_mode():
        frozen = torch.randn(4)
    live = torch.randn(4)
    before = live.clone()
    with pytest.raises(ValueError, match="inference tensor"):
        zokernels.perturb_([live, frozen], 1, 0.1)
    assert torch.equal(live, before)
    with torch.inference_mode():  # inside inference mode the update is allowed, as in torch
        zokernels.perturb_([frozen], 1, 0.1)
    # the low-rank op only reads its factors: inference tensors are fine there, not as weights
    with torch.inference_mode():
        u, v, tau, frozen_w = torch.randn(4, 2), torch.randn(3, 2), torch.randn(2), torch.zeros(4, 3)
    w = torch.zeros(4, 3)
    zokernels.lowrank_perturb_([w], [u], [v], [tau], scale=1.0)
    assert torch.allclose(w, u @ (v * tau).t(), atol=1e-6)
    with pytest.raises(ValueError, match="inference tensor"):
        zokernels.lowrank_perturb_([frozen_w], [u], [v], [tau], scale=1.0)
    raw = bytearray(4 * 5)
    shifted = torch.frombuffer(raw, dtype=torch.float32, offset=1, count=4)
    with pytest.raises(ValueError, match="aligned"):
        zokernels.perturb_(shifted, 1, 0.1)


def test_fast_backends_bump_the_version_counter(any_case):
    """A tensor saved for backward and perturbed since must be reported by autograd."""
    backend, device = any_case
    weight = torch.randn(3, device=device, requires_grad=True)
    x = torch.randn(3, device=device, requires_grad=True)
    loss = (x * weight).sum()  # saves weight for x's gradient
    zokernels.perturb_(weight, 1, 0.1, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_huge_integer_scale_is_a_value_error():
    with pytest.raises(ValueError, match="scales"):
        zokernels.perturb_(torch.zeros(2), 1, 10 ** 400)


def test_meta_tensors_are_not_taken_for_aliases():
    zokernels.perturb_([torch.empty(3, device="meta"), torch.empty(4, device="meta")], 1, 0.1,
                       backend="torch")


# -- found by fuzzing the public ops -----------------------------------------------------------

@pytest.mark.parametrize("case", ["us rows", "vs rows", "taus rank", "us dtype", "count",
                                  "decays"])
def test_run_lowrank_scatter_checks_its_factors_against_the_logged_weights(case):
    """The kernels index the factors by the logged weights' rows and columns (the cpu one read
    a (1, r) U for a 4M-row weight far past its end): refused by name before any write."""
    from zokernels.ops import lowrank_perturb_
    from zokernels.ops.lowrank import run_lowrank_scatter
    from zokernels.ops.undo import UndoLog

    m, n, r = 64, 3, 4
    w = (torch.rand(m, n) * 1e-6).to(torch.bfloat16)
    log = UndoLog()
    lowrank_perturb_([w], torch.ones(m, r), torch.ones(n, r), torch.ones(r), scale=1.0, log=log,
                     backend="cpu")
    before = w.clone()
    us, vs, taus, decays = [torch.ones(m, r)], [torch.ones(n, r)], [torch.ones(r)], \
        torch.ones(1)
    if case == "us rows":
        us = [torch.ones(1, r)]
    elif case == "vs rows":
        vs = [torch.ones(n + 1, r)]
    elif case == "taus rank":
        taus = [torch.ones(r + 1)]
    elif case == "us dtype":
        us = [torch.ones(m, r, dtype=torch.float64)]
    elif case == "count":
        us = []
    else:
        decays = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"(us|vs|taus|decays)"):
        run_lowrank_scatter(log, us, vs, taus, torch.tensor([1.0]), decays)
    assert torch.equal(w.view(torch.int16), before.view(torch.int16))
    run_lowrank_scatter(log, [torch.ones(m, r)], [torch.ones(n, r)], None, torch.tensor([0.0]),
                        torch.ones(1))  # the right factors: accepted (the restore)


def test_noise_of_2_to_the_63_elements_is_refused_by_name():
    with pytest.raises(ValueError, match="numel must be below 2\\^63"):
        zokernels.noise(1 << 63, 1)


def test_numpy_integers_are_taken_where_python_ints_are():
    np = pytest.importorskip("numpy")
    t = torch.zeros(8)
    zokernels.perturb_(t, np.uint64(3), 1e-3, contract=np.int64(2), backend="torch")
    expected = torch.zeros(8)
    zokernels.perturb_(expected, 3, 1e-3, contract=2, backend="torch")
    assert torch.equal(t, expected)
    space = zokernels.ParameterSpace([("t", t)], backend="torch")
    log = zokernels.ops.undo.UndoLog()
    space.apply(np.uint64(5), 1e-3, log=log)
    space.apply_logged(log, np.uint64(5), [1e-3])  # seeds as apply takes them
