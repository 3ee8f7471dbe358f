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

    def forward(weights):  # in the weights' dtype (the float64 reference too)
        return torch.tanh(proj.to(weights.dtype) @ weights).reshape(2, 5)

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
    # requires grad through another tensor only (was autograd's RuntimeError)
    (lambda o: (torch.ones(1, requires_grad=True) * 2.0).sum(), ValueError,
     "does not depend on the output"),
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
    (torch.arange(4), TypeError, "torch.int64"),
    (torch.zeros(0), ValueError, "empty"),
    # no CPU reductions: every step failed with NotImplementedError
    (torch.zeros(4).to(torch.float8_e4m3fn), TypeError, "float8_e4m3fn"),
])
def test_bad_forward_is_refused(output, exc, match):
    w, _, loss = _problem()
    opt = PseuZO([("w", w)], lr=0.01)
    before = w.clone()
    with pytest.raises(exc, match=match):
        opt.step(lambda: output, loss)
    assert_bits_equal(w, before, what="after a refused forward")


def test_an_output_of_another_rank_is_refused_before_the_step_whatever_beta():
    """A beta = 0 step (one-sided) used only its own entry, so an output of another rank went
    into the window unchecked: the optimizer's own state_dict was then refused by
    load_state_dict, and every later step raised. Now refused before the step writes
    anything, on every beta."""
    w, forward, loss = _problem()
    opt = PseuZO([("w", w)], lr=0.01, window=4, beta=lambda epoch: [0.9, 0.0][epoch % 2])
    opt.step(lambda: forward(w), loss)  # step 0, beta 0.9: a 2-D entry
    before, window = w.clone(), list(opt._window)
    with pytest.raises(ValueError, match=r"3-D output \(1, 2, 5\), the window's entry of step "
                                         r"0 is 2-D"):
        opt.step(lambda: forward(w).reshape(1, 2, 5), loss)  # step 1, beta 0
    assert_bits_equal(w, before, what="after the refused output")
    assert opt._window == window and opt.zo_state["step"] == 1
    opt.step(lambda: forward(w), loss)  # the same rank: taken
    PseuZO([("w", w.clone())], lr=0.01, window=4,
           beta=lambda epoch: [0.9, 0.0][epoch % 2]).load_state_dict(opt.state_dict())


def test_inference_mode_is_refused_and_changes_nothing():
    """torch.enable_grad() cannot lift inference mode: the loss looked output-independent."""
    w, forward, loss = _problem()
    opt = PseuZO([("w", w)], lr=0.01)
    before = w.clone()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        opt.step(lambda: forward(w), loss)
    assert_bits_equal(w, before, what="after the refused step")
    assert opt.zo_state["step"] == 0


def test_float8_store_dtype_is_refused():
    with pytest.raises(ValueError, match="store_dtype must be one of"):
        PseuZO([("w", torch.zeros(3))], lr=0.01, store_dtype=torch.float8_e4m3fn)


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
    # the counter adopted (zo_state), not only its copy in extra: ages t - k stay positive
    "step beyond zo_state's counter": (
        lambda s: (s["extra"].pop("step"), _window_field(s, 1, "step", 100)),
        r"\[1\]\['step'\] = 100 is not below .*\['zo_state'\]\['step'\] = 2"),
    "steps out of order": (lambda s: _window_field(s, 1, "step", 0), r"\[1\]\['step'\]"),
    "step not an int": (lambda s: _window_field(s, 0, "step", 0.0), r"\[0\]\['step'\]"),
    "negative seed": (lambda s: _window_field(s, 0, "seed", -1), r"\[0\]\['seed'\]"),
    "seed of 65 bits": (lambda s: _window_field(s, 0, "seed", 1 << 64), r"\[0\]\['seed'\]"),
    "integer delta": (lambda s: _window_field(s, 0, "delta", torch.zeros(2, 5, dtype=torch.int64)),
                      r"\[0\]\['delta'\] must be a floating"),
    "delta ranks differ": (lambda s: _window_field(s, 1, "delta", torch.zeros(3)),
                           r"\[1\]\['delta'\] has shape \(3,\)"),
    "delta dtypes differ": (lambda s: _window_field(s, 1, "delta", torch.zeros(2, 5).double()),
                            r"\[1\]\['delta'\] has shape \(2, 5\) \(torch.float64"),
    # finite, but every projection overflows float32 and a skipped step keeps its window:
    # every later step was skipped
    "delta near float32's max": (lambda s: _window_field(s, 0, "delta", torch.full((2, 5), 3e38)),
                                 r"\[0\]\['delta'\] must hold values finite in float32, with a "
                                 "finite float32 sum of squares"),
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


def test_resume_with_outputs_of_several_lengths_is_bit_identical():
    """Batches padded to different lengths give outputs of different shapes (aligned_dot lines
    them up at their last positions): the window then holds deltas of several lengths, and the
    optimizer resumes from its own state_dict as from any other."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    batches = [(torch.randn(1, rows, 8), torch.randn(1, rows, 3)) for rows in (5, 4, 6, 3, 7)]

    def run(opt, net, chosen):
        for x, y in chosen:
            opt.step(lambda: net(x), lambda o: ((o - y) ** 2).mean())

    opt = PseuZO(model.named_parameters(), lr=1e-2, window=4, beta=0.9, seed=3)
    run(opt, model, batches[:3])
    assert {tuple(d.shape) for _, _, d in opt._window} == {(1, 5, 3), (1, 4, 3), (1, 6, 3)}
    saved_model, saved = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    run(opt, model, batches[3:])
    resumed = PseuZO(saved_model.named_parameters(), lr=1e-2, window=4, beta=0.9, seed=0)
    resumed.load_state_dict(saved)
    run(resumed, saved_model, batches[3:])
    for a, b in zip(saved_model.parameters(), model.parameters()):
        assert_bits_equal(a, b, what="resumed PseuZO with outputs of several lengths")


# -- beta schedules, as PseuZO's reference runs them ---------------------------------------------

import collections  # noqa: E402

import zokernels  # noqa: E402
from zokernels.optim.pseuzo import reference_beta  # noqa: E402


def _hyperbola(epoch, cycle):
    """The reference's beta for an epoch (pzo_trainer.py's cyclic hyperbola, one cycle of
    `cycle` epochs): 1 / (1 + 10 t) for the t-th epoch of the cycle up to t = 10, then 0."""
    t = epoch % cycle
    return 1 / (1 + 10 * t) if t <= 10 else 0.0


class ReferencePseuZO:
    """The update rule of PseuZO's reference (pzo_trainer.py), sequential, in float64, with
    zokernels' z (same seed, same key) instead of torch.normal. At each epoch start it takes the
    epoch's beta: 0 switches to MeZO steps; 1 switches to PseuZO steps and clears the window; the
    window is a deque of the last `size` (seed, dO) pairs; the coefficient of the entry k places
    before the newest is beta^k (the current beta: a change re-weights the whole window). A
    PseuZO step: o0 = f(theta), e = dL/do0, o1 = f(theta + eps z), dO = o1 - o0 appended; then,
    one entry at a time (oldest first), theta <- theta - lr (c_k z_k + wd theta) with
    c_k = beta^(K-1-k) <dO_k, e> / eps. A MeZO step: g = (L(theta + eps z) - L(theta - eps z)) /
    (2 eps), theta <- theta - lr (g z + wd theta)."""

    def __init__(self, w, forward, loss, *, key, base_seed, lr, eps, wd, size, beta_of_epoch,
                 epoch_steps):
        self.theta = w.double().clone()
        self.forward, self.loss, self.key = forward, loss, key
        self.base_seed, self.lr, self.eps, self.wd = base_seed, lr, eps, wd
        self.size, self.beta_of_epoch, self.epoch_steps = size, beta_of_epoch, epoch_steps
        self.window = collections.deque(maxlen=size)
        self.beta, self.mode = 1.0, "pzo"

    def z(self, seed):
        return zokernels.noise(self.theta.numel(), seed, self.key).double()

    def step(self, t):
        """Step t; returns what it applied: (seeds, effective coefficient per seed, decay), the
        update being theta <- decay * theta + sum_k coef_k z_k."""
        if t % self.epoch_steps == 0:
            self.beta = self.beta_of_epoch(t // self.epoch_steps)
            if self.beta == 0:
                self.mode = "zo"
            elif self.beta == 1:
                self.mode = "pzo"
                self.window = collections.deque(maxlen=self.size)
        seed = step_seed(self.base_seed, t)
        z = self.z(seed)
        d = 1 - self.lr * self.wd
        if self.mode == "zo":
            plus = float(self.loss(self.forward(self.theta + self.eps * z)))
            minus = float(self.loss(self.forward(self.theta - self.eps * z)))
            g = (plus - minus) / (2 * self.eps)
            self.theta = self.theta - self.lr * (g * z + self.wd * self.theta)
            return [seed], [-self.lr * g], d
        o0 = self.forward(self.theta).detach().requires_grad_(True)
        (e,) = torch.autograd.grad(self.loss(o0), o0)
        self.window.append((seed, self.forward(self.theta + self.eps * z) - o0.detach()))
        seeds, coefs, count = [], [], len(self.window)
        for k, (s, delta) in enumerate(self.window):
            c = self.beta ** (count - 1 - k) * float((delta * e).sum()) / self.eps
            self.theta = self.theta - self.lr * (c * self.z(s) + self.wd * self.theta)
            seeds.append(s)
            coefs.append(-self.lr * c * d ** (count - 1 - k))
        return seeds, coefs, d ** count


def _run_against_reference(steps, *, opt_beta, beta_of_epoch, epoch_steps=1, size=4, wd=0.1,
                           **options):
    """epoch_steps: the reference's steps per epoch (the optimizer's go in `options`)."""
    """The optimizer (float32) and the reference (float64) side by side from the same weights:
    per step the same seeds, the same decay and the same coefficients, to the float32 rounding
    of the outputs and losses the coefficients come from (|o| < 1, |dL/do| < 3, 10 outputs:
    < 2^-18 in <dO, e> and in L+ - L-, times lr / eps) plus 1e-3 relative for the two runs'
    drift (observed: 7e-7 absolute, 10x below); the final weights within 1e-4 of the distance
    travelled (observed: 8e-6). Returns the list of (mode, number of seeds) per step."""
    w, forward, loss = _problem()
    lr, eps, base = 0.02, 1e-2, 4
    opt = PseuZO([("w", w)], lr=lr, eps=eps, weight_decay=wd, seed=base, window=size,
                 beta=opt_beta, decay_per_entry=True, backend="torch", **options)
    ref = ReferencePseuZO(w, forward, loss, key=opt.spaces[0].keys[0], base_seed=base, lr=lr,
                          eps=eps, wd=wd, size=size, beta_of_epoch=beta_of_epoch,
                          epoch_steps=epoch_steps)
    start = w.clone()
    shape = []
    for t in range(steps):
        seeds, coefs, decay = ref.step(t)
        opt.step(lambda: forward(w), loss)
        _, got_seeds, got_coefs, got_decays, _ = list(opt.trajectory.records())[-1]
        assert got_seeds == seeds, f"step {t}"
        assert got_decays[0] == pytest.approx(decay, rel=1e-12), f"step {t}"
        assert got_coefs[0] == pytest.approx(coefs, rel=1e-3, abs=lr / eps * 2.0**-18), \
            f"step {t}"
        shape.append((ref.mode, len(seeds)))
    travelled = float((ref.theta - start.double()).abs().max())
    assert travelled > 0.05
    replayed = start.clone()  # the records (MeZO steps, per-entry decays) rebuild the run
    opt.trajectory.replay([("w", replayed)], backend="torch")
    assert_bits_equal(replayed, w, what="trajectory replay")
    assert_close(w, ref.theta.float(), atol=1e-4 * travelled, what="weights after the run")
    return shape


def test_reference_schedule_matches_the_sequential_reference():
    """beta="reference", 2 steps per epoch, cycles of 12 epochs, window 4, wd 0.1 once per
    entry: beta 1 (window cleared) for 2 steps, then 1/11 ... 1/101, then MeZO steps in the
    cycle's 12th epoch, then a new cycle from an empty window."""
    cycle, epoch_steps = 12, 2
    shape = _run_against_reference(2 * cycle * epoch_steps + 4, opt_beta="reference",
                                   beta_of_epoch=lambda epoch: _hyperbola(epoch, cycle),
                                   epoch_steps=epoch_steps, beta_cycle=cycle,
                                   beta_epoch_steps=epoch_steps)
    per_cycle = cycle * epoch_steps
    expected = [("pzo", min(t + 1, 4)) for t in range(per_cycle - 2)] + [("zo", 1)] * 2
    assert shape == expected * 2 + [("pzo", 1), ("pzo", 2), ("pzo", 3), ("pzo", 4)]


def test_callable_schedule_and_constant_beta_one_match_the_sequential_reference():
    """A callable of the epoch: one step per epoch (every epoch with beta 1 clears the window),
    then two steps per epoch, with a MeZO epoch (beta_zero="mezo"); a constant beta = 1 (uniform
    weights, never cleared: the reference with one epoch for the whole run)."""
    values = [1.0, 0.5, 0.25, 1.0, 0.5, 0.5, 1.0, 1.0, 0.3]
    shape = _run_against_reference(len(values), opt_beta=lambda t: values[t],
                                   beta_of_epoch=lambda t: values[t])
    assert [n for _, n in shape] == [1, 2, 3, 1, 2, 3, 1, 1, 2]
    values = [1.0, 0.3, 0.0, 1.0, 0.6, 0.9]
    shape = _run_against_reference(2 * len(values), opt_beta=lambda t: values[t],
                                   beta_of_epoch=lambda t: values[t], epoch_steps=2,
                                   beta_epoch_steps=2, beta_zero="mezo")
    assert shape == [("pzo", 1), ("pzo", 2), ("pzo", 3), ("pzo", 4), ("zo", 1), ("zo", 1),
                     ("pzo", 1), ("pzo", 2), ("pzo", 3), ("pzo", 4), ("pzo", 4), ("pzo", 4)]
    shape = _run_against_reference(7, opt_beta=1.0, beta_of_epoch=lambda t: 1.0,
                                   epoch_steps=1000)
    assert [n for _, n in shape] == [1, 2, 3, 4, 4, 4, 4]


def test_reference_beta_values_and_window_resets():
    assert [reference_beta(t, 13) for t in (0, 1, 10, 11, 12, 13, 14)] == [
        1.0, 1 / 11, 1 / 101, 0.0, 0.0, 1.0, 1 / 11]
    assert [reference_beta(t, 3, epoch_steps=2) for t in range(7)] == [
        1.0, 1.0, 1 / 11, 1 / 11, 1 / 21, 1 / 21, 1.0]
    w, _, _ = _problem()
    opt = PseuZO([("w", w)], beta="reference", beta_cycle=3, beta_epoch_steps=2)
    assert [opt.resets_window(t) for t in range(8)] == [True] + [False] * 5 + [True, False]
    assert opt.beta_zero == "mezo" and opt.capacity == 14
    ones = PseuZO([("w", w)], beta=lambda t: [1.0, 1.0, 0.2, 1.0][t])
    assert [ones.resets_window(t) for t in range(4)] == [True, True, False, True]
    per_two = PseuZO([("w", w)], beta=lambda epoch: [1.0, 0.2, 1.0][epoch], beta_epoch_steps=2)
    assert [per_two.beta_at(t) for t in range(6)] == [1.0, 1.0, 0.2, 0.2, 1.0, 1.0]
    assert [per_two.resets_window(t) for t in range(6)] == [True, False, False, False, True,
                                                            False]
    assert ones.beta_zero == "one_sided"
    assert not PseuZO([("w", w)], beta=1.0).resets_window(0)


def test_decay_once_per_step_by_default():
    """decay_per_entry=False: one (1 - lr wd) per step whatever the window."""
    w, forward, loss = _problem()
    opt = PseuZO([("w", w)], lr=0.02, weight_decay=0.1, window=3, beta=0.5)
    for _ in range(4):
        opt.step(lambda: forward(w), loss)
    assert [r[3][0] for r in opt.trajectory.records()] == pytest.approx([0.998] * 4, rel=1e-12)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(beta=1.5), ValueError, "beta must be <= 1.0"),
    (dict(beta=-0.1), ValueError, "beta must be >= 0.0"),
    (dict(beta="cyclic"), ValueError, "'reference' or a callable"),
    (dict(beta="reference"), ValueError, "needs beta_cycle"),
    (dict(beta=lambda t: 0.5, beta_epoch_steps=1.5), ValueError, "needs beta_epoch_steps"),
    (dict(beta="reference", beta_cycle=4, beta_epoch_steps=0), ValueError, "beta_epoch_steps"),
    (dict(beta=0.5, beta_zero="two_sided"), ValueError, "beta_zero"),
    (dict(beta=0.5, beta_cycle=4), ValueError, "beta_cycle is for beta='reference' only"),
    (dict(beta=0.5, beta_epoch_steps=2), ValueError, "beta_epoch_steps is for a beta schedule"),
])
def test_bad_beta_settings_are_refused(kwargs, exc, match):
    w, _, _ = _problem()
    with pytest.raises(exc, match=match):
        PseuZO([("w", w)], **kwargs)


def test_callable_beta_out_of_range_is_refused_and_changes_nothing():
    w, forward, loss = _problem()
    opt = PseuZO([("w", w)], lr=0.01, beta=lambda t: 0.5 if t == 0 else 2.0)
    opt.step(lambda: forward(w), loss)
    before, window = w.clone(), list(opt._window)
    with pytest.raises(ValueError, match=r"beta\(1\) must be <= 1.0"):
        opt.step(lambda: forward(w), loss)
    assert_bits_equal(w, before, what="after a refused beta")
    assert opt._window == window and opt.zo_state["step"] == 1


@pytest.mark.parametrize("beta", ["reference", "callable"])
def test_resume_inside_a_schedule_is_bit_identical(beta):
    """Saved mid-cycle (reference: inside the 1/11 epoch, before a MeZO epoch and a reset;
    callable: before a return to 1), resumed into a fresh optimizer built with the same
    settings (the same callable), through torch.save / weights_only load."""
    values = [1.0, 0.5, 0.5, 0.0, 1.0, 0.2, 0.2]
    settings = (dict(beta="reference", beta_cycle=12, beta_epoch_steps=1)
                if beta == "reference" else dict(beta=lambda t: values[t % len(values)]))

    def build(w, seed):
        return PseuZO([("w", w)], lr=0.05, weight_decay=0.1, window=4, seed=seed,
                      decay_per_entry=True, **settings)

    w, forward, loss = _problem()
    opt = build(w, 2)
    for _ in range(3):
        opt.step(lambda: forward(w), loss)
    buffer = io.BytesIO()
    torch.save({"w": w.clone(), "opt": opt.state_dict()}, buffer)
    for _ in range(12):
        opt.step(lambda: forward(w), loss)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["opt"]["extra"]["schedule"]["beta"] == ("reference" if beta == "reference"
                                                         else "callable")
    w2 = saved["w"]
    opt2 = build(w2, 0)
    opt2.load_state_dict(saved["opt"])
    for _ in range(12):
        opt2.step(lambda: forward(w2), loss)
    assert_bits_equal(w2, w, what=f"resumed PseuZO ({beta})")
    assert [(k, s) for k, s, _ in opt2._window] == [(k, s) for k, s, _ in opt._window]


@pytest.mark.parametrize("other,field", [
    (dict(beta=0.8), "beta"),
    (dict(beta="reference", beta_cycle=5), "beta_cycle"),
    (dict(beta="reference", beta_cycle=4, beta_epoch_steps=2), "beta_epoch_steps"),
    (dict(beta="reference", beta_cycle=4, beta_zero="one_sided"), "beta_zero"),
    (dict(beta="reference", beta_cycle=4, decay_per_entry=True), "decay_per_entry"),
])
def test_loading_other_schedule_settings_is_refused(other, field):
    _, _, _, source = _trained(steps=2)
    w, forward, loss = _problem()
    src = PseuZO([("w", w)], lr=0.05, window=4, beta="reference", beta_cycle=4)
    src.step(lambda: forward(w), loss)
    opt = PseuZO([("w", w.clone())], lr=0.05, window=4, **other)
    before = opt.state_dict()
    with pytest.raises(ValueError, match=rf"\['schedule'\]\['{field}'\]"):
        opt.load_state_dict(src.state_dict())
    assert opt.state_dict()["zo_state"] == before["zo_state"] and opt._window == []
    callable_state = PseuZO([("w", w)], window=4, beta=lambda t: 0.5).state_dict()
    with pytest.raises(ValueError, match=r"\['beta'\] is 'callable'"):
        PseuZO([("w", w)], window=4, beta=0.5).load_state_dict(callable_state)
    old = copy.deepcopy(source.state_dict())
    del old["extra"]["schedule"]  # saved before the schedule settings existed: accepted
    PseuZO([("w", w.clone())], lr=0.05, window=4, beta=0.8).load_state_dict(old)
    # tensors in place of the values: ValueError (a tensor's != raised RuntimeError)
    for value in (torch.tensor([0.8, 0.8]), torch.empty(1, device="meta")):
        tampered = copy.deepcopy(source.state_dict())
        tampered["extra"]["schedule"]["beta"] = value
        with pytest.raises(ValueError, match=r"\['schedule'\]\['beta'\] is tensor"):
            PseuZO([("w", w.clone())], lr=0.05, window=4, beta=0.8).check_state_dict(tampered)


def test_beta_zero_mezo_is_mezo_bit_for_bit():
    """A constant beta = 0 with beta_zero="mezo": every step is MeZO's (the same seeds, losses at
    theta +- eps z, decay once), so the weights equal zokernels' MeZO bit for bit, and step()
    returns MeZO's loss at theta + eps z."""
    from zokernels.optim import MeZO

    w, forward, loss = _problem()
    w2 = w.clone()
    opt = PseuZO([("w", w)], lr=0.05, eps=1e-3, weight_decay=0.1, seed=6, beta=0.0,
                 beta_zero="mezo")
    mezo = MeZO([("w", w2)], lr=0.05, eps=1e-3, weight_decay=0.1, seed=6)
    for step in range(5):
        got = opt.step(lambda: forward(w), loss)
        expected = mezo.step(lambda: loss(forward(w2)))
        assert_bits_equal(w, w2, what=f"step {step}")
        assert float(got) == float(expected)
    assert opt._window == [] and len(list(opt.trajectory.records())) == 5
