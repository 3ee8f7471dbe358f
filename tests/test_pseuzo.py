"""PseuZO: the fused K-seed window update against a sequential reference written here from the
algorithm's formulas, beta = 0 (one-sided ZO-SGD, one window entry), window memory, input
checks, loaded-window validation and mid-window resume. CPU, small tensors."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from zokernels import perturb_
from zokernels.optim import PseuZO
from zokernels.optim._seeds import step_seed

from helpers import assert_bits_equal, assert_close

N = 300


def _problem(seed=5):
    """A weight vector, forward(w) -> a 2x5 output, loss(o) -> scalar (autograd through o)."""
    torch.manual_seed(seed)
    w = torch.randn(N) * 0.5
    proj = torch.randn(10, N) / math.sqrt(N)

    def forward(weights):
        return torch.tanh(proj @ weights).reshape(2, 5)

    def loss(o):
        return ((o - 0.3) ** 2).sum()
    return w, forward, loss


def _reference_step(w, forward, loss, window, *, step, base_seed, key, lr, eps, beta, size,
                    nan=False):
    """One PseuZO step by its definition, one seed at a time: returns the new weights and the
    coefficients (float32) the update applied."""
    o0 = forward(w)
    leaf = o0.clone().requires_grad_(True)
    (e,) = torch.autograd.grad(loss(leaf), leaf)
    seed = step_seed(base_seed, step)
    perturbed = w.clone()
    perturb_(perturbed, seed, eps, keys=[key], backend="torch")
    delta = forward(perturbed) - o0
    if nan:
        return w, None
    window.append((step, seed, delta))
    del window[:-size]
    new = w.clone()
    coefs = []
    for k, s, d in window:
        c = torch.tensor(-(lr / eps) * beta ** (step - k), dtype=torch.float32) * (d * e).sum()
        coefs.append(float(c))
        perturb_(new, s, c, keys=[key], backend="torch")  # one rounding per seed
    return new, coefs


def test_fused_window_update_equals_the_sequential_reference():
    """window 3, beta 0.7, 7 steps, step 3 skipped (NaN output: the ages jump over it). Each
    step starts the reference from the optimizer's weights: the coefficients then agree to
    float32 rounding and the weights to the K - 1 extra roundings of the sequential sum, at most
    K ulp of max|w| (K <= 3)."""
    w, forward, loss = _problem()
    lr, eps, beta, size = 0.05, 1e-3, 0.7, 3
    opt = PseuZO([("w", w)], lr=lr, eps=eps, seed=2, window=size, beta=beta, backend="torch")
    key = opt.spaces[0].keys[0]
    window: list = []
    for step in range(7):
        start = w.clone()
        nan = step == 3
        expected, coefs = _reference_step(start, forward, loss, window, step=step, base_seed=2,
                                          key=key, lr=lr, eps=eps, beta=beta, size=size,
                                          nan=nan)
        calls = {"n": 0}

        def fwd():
            calls["n"] += 1
            out = forward(w)
            return out * float("nan") if nan and calls["n"] == 2 else out
        if nan:
            with pytest.warns(RuntimeWarning, match="non-finite"):
                opt.step(fwd, loss)
            assert_bits_equal(w, start, what="skipped step")
            continue
        opt.step(fwd, loss)
        *_, recorded, _, _ = list(opt.trajectory.records())[-1]
        assert recorded[0] == pytest.approx(coefs, rel=1e-5, abs=1e-12)
        bound = len(coefs) * 2.0 ** -23 * float(expected.abs().max())
        assert_close(w, expected, atol=bound, what=f"step {step}")
        assert not torch.equal(w, start)
    assert len(window) == size and [k for k, _, _ in opt._window] == [k for k, _, _ in window]
    assert opt.zo_state["skipped_steps"] == 1


def test_beta_zero_is_one_sided_zo_sgd_with_one_window_entry():
    """theta -= lr * <o(theta + eps z) - o(theta), dL/do> / eps * z, the window one entry: the
    same bits as the reference (one seed, one rounding, the same float32 coefficient)."""
    w, forward, loss = _problem(6)
    reference = w.clone()
    lr, eps = 0.05, 1e-3
    opt = PseuZO([("w", w)], lr=lr, eps=eps, seed=3, window=5, beta=0.0, backend="torch")
    key = opt.spaces[0].keys[0]
    for step in range(4):
        o0 = forward(reference)
        leaf = o0.clone().requires_grad_(True)
        (e,) = torch.autograd.grad(loss(leaf), leaf)
        seed = step_seed(3, step)
        perturbed = reference.clone()
        perturb_(perturbed, seed, eps, keys=[key], backend="torch")
        g = ((forward(perturbed) - o0) * e).sum()
        perturb_(reference, seed, -(lr / eps) * g.reshape(1), keys=[key], backend="torch")
        opt.step(lambda: forward(w), loss)
        assert_bits_equal(w, reference, what=f"beta=0 step {step}")
        assert len(opt._window) == 1 and opt._window[0][0] == step
        assert opt.window_bytes == 10 * 4
        _, seeds, coefs, _, _ = list(opt.trajectory.records())[-1]
        assert seeds == [seed] and len(coefs[0]) == 1


@pytest.mark.parametrize("store_dtype,itemsize", [(None, 4), (torch.bfloat16, 2)])
def test_window_bytes_count_the_stored_differences(store_dtype, itemsize):
    w, forward, loss = _problem()
    opt = PseuZO([("w", w)], lr=0.01, window=3, beta=0.5, store_dtype=store_dtype)
    assert opt.window_bytes == 0
    for step in range(5):
        opt.step(lambda: forward(w), loss)
        assert opt.window_bytes == min(step + 1, 3) * 10 * itemsize
    assert all(d.dtype == (store_dtype or torch.float32) for _, _, d in opt._window)


# -- input checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_fn,exc,match", [
    (lambda o: o.sum(dim=1), ValueError, r"scalar loss, got shape \(2,\)"),
    (lambda o: float(o.detach().sum()), TypeError, "float"),
    (lambda o: torch.tensor(1.0), ValueError, "does not depend on the output"),
])
def test_bad_loss_fn_is_refused_and_changes_nothing(loss_fn, exc, match):
    w, forward, loss = _problem()
    opt = PseuZO([("w", w)], lr=0.01, window=3)
    opt.step(lambda: forward(w), loss)
    before, window = w.clone(), list(opt._window)
    with pytest.raises(exc, match=match):
        opt.step(lambda: forward(w), loss_fn)
    assert_bits_equal(w, before, what="after a refused loss_fn")
    assert opt._window == window and opt.zo_state["step"] == 1


@pytest.mark.parametrize("output,exc,match", [
    ([1.0, 2.0], TypeError, "must return a tensor.*list"),
    (torch.arange(4), TypeError, "floating-point"),
    (torch.zeros(0), ValueError, "empty"),
])
def test_bad_forward_is_refused(output, exc, match):
    w, _, loss = _problem()
    opt = PseuZO([("w", w)], lr=0.01)
    before = w.clone()
    with pytest.raises(exc, match=match):
        opt.step(lambda: output, loss)
    assert_bits_equal(w, before, what="after a refused forward")


# -- state ---------------------------------------------------------------------------------------

def _trained(steps=2, window=4, seed=2):
    w, forward, loss = _problem()
    opt = PseuZO([("w", w)], lr=0.05, window=window, beta=0.8, seed=seed)
    for _ in range(steps):
        opt.step(lambda: forward(w), loss)
    return w, forward, loss, opt


def _window_field(state, j, field, value):
    state["extra"]["window"][j][field] = value


BAD_WINDOWS = {
    "not a list": (lambda s: s["extra"].__setitem__("window", "x"), r"\['window'\] must be a list"),
    "entry not a dict": (lambda s: s["extra"]["window"].__setitem__(0, (0, 1)),
                         r"\[0\] must be a dict"),
    "missing delta": (lambda s: s["extra"]["window"][1].pop("delta"), r"\[1\] lacks \['delta'\]"),
    "step beyond the counter": (lambda s: _window_field(s, 1, "step", 2), r"\[1\]\['step'\] = 2"),
    "steps out of order": (lambda s: _window_field(s, 1, "step", 0), r"\[1\]\['step'\]"),
    "step not an int": (lambda s: _window_field(s, 0, "step", 0.0), r"\[0\]\['step'\]"),
    "negative seed": (lambda s: _window_field(s, 0, "seed", -1), r"\[0\]\['seed'\]"),
    "seed of 65 bits": (lambda s: _window_field(s, 0, "seed", 1 << 64), r"\[0\]\['seed'\]"),
    "integer delta": (lambda s: _window_field(s, 0, "delta", torch.zeros(2, 5, dtype=torch.int64)),
                      r"\[0\]\['delta'\] must be a floating"),
    "delta shapes differ": (lambda s: _window_field(s, 1, "delta", torch.zeros(3)),
                            r"\[1\]\['delta'\] has shape \(3,\)"),
    "too many entries": (lambda s: s["extra"]["window"].extend(
        copy.deepcopy(s["extra"]["window"][:1]) * 3), "has 5 entries, .* at most 4"),
}


@pytest.mark.parametrize("case", list(BAD_WINDOWS))
def test_bad_loaded_window_is_refused_and_changes_nothing(case):
    corrupt, match = BAD_WINDOWS[case]
    _, _, _, source = _trained(steps=2)
    state = copy.deepcopy(source.state_dict())
    corrupt(state)
    w, forward, loss, opt = _trained(steps=3, seed=9)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    after = opt.state_dict()
    assert after["zo_state"] == before["zo_state"] and after["base_seed"] == 9
    assert len(after["extra"]["window"]) == len(before["extra"]["window"]) == 3
    for a, b in zip(after["extra"]["window"], before["extra"]["window"]):
        assert (a["step"], a["seed"]) == (b["step"], b["seed"])
        assert_bits_equal(a["delta"], b["delta"], what="window delta")


def test_resume_mid_window_is_bit_identical():
    """Saved with 2 of 4 entries (through torch.save / weights_only load): the resumed run fills
    and slides the window exactly as the uninterrupted one."""
    w, forward, loss, opt = _trained(steps=2)
    buffer = io.BytesIO()
    torch.save({"w": w.clone(), "opt": opt.state_dict()}, buffer)
    for _ in range(4):
        opt.step(lambda: forward(w), loss)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    w2 = saved["w"]
    opt2 = PseuZO([("w", w2)], lr=0.05, window=4, beta=0.8, seed=0)
    opt2.load_state_dict(saved["opt"])
    assert len(opt2._window) == 2
    for _ in range(4):
        opt2.step(lambda: forward(w2), loss)
    assert_bits_equal(w2, w, what="resumed PseuZO")
    assert [(k, s) for k, s, _ in opt2._window] == [(k, s) for k, s, _ in opt._window]
    assert list(opt2.trajectory.records())[-1][2] == list(opt.trajectory.records())[-1][2]
