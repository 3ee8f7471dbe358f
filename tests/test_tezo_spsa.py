"""TeZO as the SPSA estimator over a low-rank target (zokernels.held): n_spsa probes per step
and perturbation_parallel come from MeZO's step, as for the dense optimizers.

Probe k of step t uses the dense seed seed_for(t, k) and tau_seed(base, t, k) (k = 0: the seeds
TeZO always drew); the 2-D weights move by -lr U diag((1/n) sum_k g_k tau_k / sqrt(r)) V^T.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import assert_states_equal, finish_process_group
from test_distributed import STEPS, WORLD, _algorithm_state, _init, _losses, _net
from test_optim import _task, make, pretrained
from zokernels.ops.noise import noise
from zokernels.optim._seeds import step_seed
from zokernels.optim.tezo import factor_seed, tau_seed
from zokernels.space import key_from_name
from zokernels.trajectory import Trajectory


def _bits(net):
    return [p.detach().clone() for p in net.parameters()]


def _same_bits(a, b, what):
    for x, y in zip(a, b):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32)), what


def _reference_step(net, base, lr, eps, n_spsa, rank, x, y):
    """One TeZO step (sgd, fp32, no weight decay) written out with torch: the probes'
    losses at theta +- eps Z_k, the projected gradients g_k, and the updated parameters."""
    named = dict(net.named_parameters())
    noises = []
    for k in range(n_spsa):
        z = {}
        for name, p in named.items():
            key = key_from_name(name)
            if p.dim() == 2:
                m, n = p.shape
                r = min(rank, m, n)
                u = noise(m * r, factor_seed(base), key).view(m, r)
                v = noise(n * r, factor_seed(base), key, offset=m * r).view(n, r)
                tau = noise(r, tau_seed(base, 0, k), key)
                z[name] = ("lowrank", u, v, tau, r)
            else:
                seed = step_seed(base, 0, k, purpose="z")  # TeZO.seed_for(0, k)
                z[name] = ("dense", noise(p.numel(), seed, key).view(p.shape))
        noises.append(z)

    def value(entry, scale):
        if entry[0] == "dense":
            return scale * entry[1]
        _, u, v, tau, r = entry
        return scale * (u * (tau / math.sqrt(r))) @ v.T

    theta = {name: p.detach().clone() for name, p in named.items()}
    grads = []
    for z in noises:
        losses = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for name, p in named.items():
                    p.copy_(theta[name] + value(z[name], sign * eps))
                losses.append(float(torch.nn.functional.mse_loss(net(x), y)))
        grads.append((losses[0] - losses[1]) / (2 * eps))
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(theta[name] - sum(value(z[name], lr * g / n_spsa)
                                      for z, g in zip(noises, grads)))
    return grads


@pytest.mark.parametrize("probe", ["inplace", "virtual"])
@pytest.mark.parametrize("n_spsa", [1, 3])
def test_n_spsa_matches_the_estimator_written_out(probe, n_spsa):
    x, y = _task(0.5, seed=2)
    lr, eps, base, rank = 1e-2, 1e-3, 5, 4
    net = pretrained()
    opt = make("tezo", net, lr=lr, eps=eps, seed=base, n_spsa=n_spsa, probe=probe)
    closure, _, _ = _losses(net, x, y)
    calls = {"n": 0}

    def counted():
        calls["n"] += 1
        return closure()
    opt.step(counted)
    assert calls["n"] == 2 * n_spsa  # the virtual probes' first step confirms, no retrack
    reference = pretrained()
    grads = _reference_step(reference, base, lr, eps, n_spsa, rank, x, y)
    recorded = [opt.trajectory.extra["grad0" + (f"_{k}" if k else "")][0]
                for k in range(n_spsa)]
    assert recorded == pytest.approx(grads, rel=1e-3, abs=1e-4)
    seeds = list(next(opt.trajectory.records())[1])
    assert seeds == [opt.seed_for(0, k) for k in range(n_spsa)]
    # g_k to float32 rounding of the losses (the virtual probes see theta + eps Z unrounded,
    # docs/tezo.md), times lr |Z|: about 1e-6 on weights of size 1, against updates of ~1e-2
    for (name, a), b in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=2e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("variant", ["sgd", "adam"])
def test_n_spsa_replays_bit_for_bit_and_a_failing_probe_restores(variant, tmp_path):
    x, y = _task(0.5, seed=2)
    net = pretrained()
    opt = make("tezo", net, n_spsa=3, variant=variant, weight_decay=0.1)
    closure, _, _ = _losses(net, x, y)
    for _ in range(3):
        opt.step(closure)
    trained, state = _bits(net), _algorithm_state(opt)
    calls = {"n": 0}

    def failing():
        calls["n"] += 1
        if calls["n"] == 4:  # probe 1's -eps: probe 0 restored, probe 1 held with both logs
            raise RuntimeError("fails mid-step")
        return closure()
    with pytest.raises(RuntimeError, match="mid-step"):
        opt.step(failing)
    _same_bits(_bits(net), trained, "a failing probe must restore exactly")
    assert_states_equal(_algorithm_state(opt), state, "optimizer state")
    opt.step(closure)
    opt.trajectory.save(tmp_path / "run.pt")
    replayed = pretrained()
    Trajectory.load(tmp_path / "run.pt").replay(replayed)
    _same_bits(_bits(replayed), _bits(net), "replay of an n_spsa run")


def test_n_spsa_lr_zero_leaves_every_weight_bit_identical():
    x, y = _task(0.5, seed=2)
    for probe in ("inplace", "virtual"):
        net = pretrained(torch.bfloat16)
        before = [p.detach().clone() for p in net.parameters()]
        opt = make("tezo", net, lr=0.0, n_spsa=2, probe=probe)
        closure, _, _ = _losses(net, x.bfloat16(), y.bfloat16())
        for _ in range(2):
            opt.step(closure)
        for p, b in zip(net.parameters(), before):
            assert torch.equal(p.detach().view(torch.int16), b.view(torch.int16)), probe


def test_argument_checks():
    net = pretrained()
    with pytest.raises(ValueError, match="n_spsa"):
        make("tezo", net, n_spsa=0)
    with pytest.raises(ValueError, match="process_group"):
        make("tezo", net, perturbation_parallel=True)


# -- two processes (gloo) -----------------------------------------------------------------------

def _pair_worker(rank, init_file, state, out_dir):
    """perturbation_parallel (both ranks see the whole batch; rank 0 evaluates theta + eps Z,
    rank 1 theta - eps Z), and plain data parallel with n_spsa = 2 (half the batch each), with
    the all-reduces counted per step."""
    _init(rank, init_file)
    counts = {"all_reduce": 0}
    original = dist.all_reduce

    def counted_all_reduce(*args, **kwargs):
        counts["all_reduce"] += 1
        return original(*args, **kwargs)
    dist.all_reduce = counted_all_reduce
    results = {}
    x, y = _task(0.5, seed=2)
    for n_spsa in (1, 2):
        net = _net(state)
        opt = make("tezo", net, process_group=dist.group.WORLD, perturbation_parallel=True,
                   n_spsa=n_spsa)
        closure, _, _ = _losses(net, x, y)
        calls = {"n": 0}

        def counted():
            calls["n"] += 1
            return closure()
        losses = [float(opt.step(counted)) for _ in range(STEPS)]
        results[n_spsa] = {"params": [p.detach() for p in net.parameters()],
                           "calls": calls["n"], "losses": losses}
    net = _net(state)
    opt = make("tezo", net, process_group=dist.group.WORLD, n_spsa=2)
    rows = slice(rank * (x.shape[0] // WORLD), (rank + 1) * (x.shape[0] // WORLD))
    closure, _, _ = _losses(net, x[rows], y[rows])
    per_step = []
    for _ in range(STEPS):
        before = counts["all_reduce"]
        opt.step(closure)
        per_step.append(counts["all_reduce"] - before)
    results["data_parallel"] = {"params": [p.detach() for p in net.parameters()],
                                "all_reduce_per_step": per_step}
    torch.save(results, os.path.join(out_dir, f"pair{rank}.pt"))
    finish_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_perturbation_parallel_and_one_all_reduce_per_step(tmp_path):
    state = pretrained().state_dict()
    mp.spawn(_pair_worker, args=(str(tmp_path / "init"), state, str(tmp_path)), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"pair{r}.pt", weights_only=True) for r in range(WORLD)]
    x, y = _task(0.5, seed=2)
    for n_spsa in (1, 2):
        pair = [rank[n_spsa] for rank in ranks]
        assert pair[0]["calls"] == pair[1]["calls"] == n_spsa * STEPS  # one forward per probe
        _same_bits(pair[0]["params"], pair[1]["params"], "the pair diverged")
        net = pretrained()
        opt = make("tezo", net, n_spsa=n_spsa)
        closure, _, _ = _losses(net, x, y)
        expected = [float(opt.step(closure)) for _ in range(STEPS)]
        assert pair[0]["losses"] == pytest.approx(expected, rel=1e-5)
        for a, p in zip(pair[0]["params"], net.parameters()):
            torch.testing.assert_close(a, p.detach(), rtol=0, atol=1e-5)
    data = [rank["data_parallel"] for rank in ranks]
    assert data[0]["all_reduce_per_step"] == data[1]["all_reduce_per_step"] == [1] * STEPS
    _same_bits(data[0]["params"], data[1]["params"], "data-parallel replicas diverged")
    net = pretrained()
    opt = make("tezo", net, n_spsa=2)
    closure, _, _ = _losses(net, x, y)
    for _ in range(STEPS):
        opt.step(closure)
    for a, p in zip(data[0]["params"], net.parameters()):
        torch.testing.assert_close(a, p.detach(), rtol=0, atol=1e-5)
