"""Data-parallel ZO on torch.distributed (gloo, 2 spawned CPU processes).

Each rank evaluates its half of the batch; the losses (PseuZO: the window projections) are
averaged in ONE all-reduce per step, every rank applies the same seeded update. Checked, for every
optimizer: replicas stay bit-identical, they match one process on the whole batch within float
rounding, each step issues exactly one collective, and a rank that fails mid-step leaves both
ranks' weights and optimizer state exactly as before the step. Also: perturbation parallelism
(n_spsa 1 and 2) and manually sharded parameters (mark_shard) against an unsharded run, bit for
bit.

One spawn per optimizer serves the replica, collective-count and failure tests (spawning is most
of the cost); the pretrained weights are computed once here and handed to the workers.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import COLLECTIVE_TIMEOUT, assert_states_equal, finish_process_group
from test_optim import TinyNet, _task, make, pretrained  # the tiny models of the optimizer tests

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

STEPS = 4
WORLD = 2
# name -> (optimizer, extra arguments)
VARIANTS = {"mezo": ("mezo", {}), "mezo-n_spsa3": ("mezo", {"n_spsa": 3}),
            "lezo": ("lezo", {}), "tezo": ("tezo", {}), "pseuzo": ("pseuzo", {})}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "barrier", "reduce")


def _net(state: dict[str, torch.Tensor]) -> TinyNet:
    net = TinyNet()
    net.load_state_dict(state)
    return net


def _losses(net, x, y):
    """closure (MeZO / LeZO / TeZO) and the PseuZO pair on the given rows."""
    def closure():
        return torch.nn.functional.mse_loss(net(x), y)

    def forward():
        return net.features(x)

    def loss_fn(h):
        return torch.nn.functional.mse_loss(net.head(h), y)
    return closure, forward, loss_fn


def _one_step(algorithm, opt, closure, forward, loss_fn):
    return opt.step(forward, loss_fn) if algorithm == "pseuzo" else opt.step(closure)


def _count_collectives() -> dict[str, int]:
    """Wrap torch.distributed's collectives (in this worker process) with call counters; the
    optimizers look them up at call time. Returns the live counts."""
    counts = {name: 0 for name in COLLECTIVES}
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)
        setattr(dist, name, counted)
    return counts


def _algorithm_state(opt) -> dict:
    """What a resumed run depends on: step counter, trajectory length, the algorithm's extra
    state (TeZO's moments, PseuZO's window), without the undo logs' learned sizing."""
    extra = {k: v for k, v in opt.state_dict()["extra"].items() if "undo_logs" not in k}
    return {"step": opt.zo_state["step"], "trajectory": len(opt.trajectory), "extra": extra}


def _init(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
    torch.set_num_threads(1)


def _worker(rank, init_file, variant, state, out_dir):
    """STEPS steps on this rank's half of the batch (collectives counted per step), then a step
    in which rank 1 fails in its second closure / forward() call."""
    _init(rank, init_file)
    algorithm, kwargs = VARIANTS[variant]
    net = _net(state)
    opt = make(algorithm, net, process_group=dist.group.WORLD, **kwargs)
    x, y = _task(0.5, seed=2)
    rows = slice(rank * (x.shape[0] // WORLD), (rank + 1) * (x.shape[0] // WORLD))
    closure, forward, loss_fn = _losses(net, x[rows], y[rows])
    counts = _count_collectives()
    per_step = []
    for _ in range(STEPS):
        before = dict(counts)
        _one_step(algorithm, opt, closure, forward, loss_fn)
        per_step.append({k: counts[k] - before[k] for k in COLLECTIVES if counts[k] != before[k]})
    trained = [p.detach().clone() for p in net.parameters()]
    state_before = _algorithm_state(opt)
    calls = {"n": 0}

    def failing(fn):
        def call(*args):
            calls["n"] += 1
            if rank == 1 and calls["n"] == 2:
                raise RuntimeError("rank failed mid-step")
            return fn(*args)
        return call
    try:
        if algorithm == "pseuzo":
            opt.step(failing(forward), loss_fn)
        else:
            opt.step(failing(closure))
        outcome = "ok"
    except Exception as exc:  # the failing rank's own error, or the collective's
        outcome = type(exc).__name__
    state_after = _algorithm_state(opt)
    torch.save({"trained": trained, "after_failure": [p.detach() for p in net.parameters()],
                "outcome": outcome, "per_step": per_step,
                "state_before": state_before, "state_after": state_after},
               os.path.join(out_dir, f"rank{rank}.pt"))
    # No destroy_process_group (the peer may be gone), and no interpreter teardown either: with a
    # vanished peer, gloo's destructors can abort the process after its results were saved
    # (SIGABRT, "terminate called without an active exception", seen on a loaded 2-core machine).
    os._exit(0)


@pytest.fixture(scope="module", params=list(VARIANTS))
def run(request, tmp_path_factory):
    """Both ranks' results for one variant, and the variant's name."""
    out = tmp_path_factory.mktemp(request.param)
    state = pretrained().state_dict()
    mp.spawn(_worker, args=(str(out / "init"), request.param, state, str(out)), nprocs=WORLD,
             join=True)
    return request.param, [torch.load(out / f"rank{r}.pt", weights_only=True)
                           for r in range(WORLD)]


def test_replicas_identical_and_equal_to_the_full_batch(run):
    variant, ranks = run
    for a, b in zip(ranks[0]["trained"], ranks[1]["trained"]):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), "replicas diverged"
    algorithm, kwargs = VARIANTS[variant]
    net = pretrained()
    opt = make(algorithm, net, **kwargs)
    x, y = _task(0.5, seed=2)
    closure, forward, loss_fn = _losses(net, x, y)
    for _ in range(STEPS):
        _one_step(algorithm, opt, closure, forward, loss_fn)
    # mean of the two halves' mean losses vs the full batch's mean: rounding-level differences
    # in g, times lr * |z| over a few steps
    for a, p in zip(ranks[0]["trained"], net.parameters()):
        torch.testing.assert_close(a, p.detach(), rtol=0, atol=1e-5)


def test_one_collective_per_step(run):
    """n_spsa = 3 included: all the probes first, then one all-reduce of every loss."""
    _, ranks = run
    for rank in ranks:
        assert rank["per_step"] == [{"all_reduce": 1}] * STEPS


def test_a_failing_rank_leaves_both_restored(run):
    """Rank 1 raises in its second closure / forward() call. It restores and re-raises; rank 0
    gets the collective's error (the peer is gone) and restores too. Both keep the exact
    pre-step weights and optimizer state (step counter, trajectory, PseuZO's window): a
    checkpoint written by either after the failure resumes the run. The process group itself
    is not recoverable: the job must restart from such a checkpoint."""
    _, ranks = run
    assert ranks[1]["outcome"] == "RuntimeError"
    assert ranks[0]["outcome"] != "ok"  # the collective reported the peer's failure
    for r, rank in enumerate(ranks):
        assert_states_equal(rank["state_after"], rank["state_before"], f"rank {r} optimizer")
        for p, b in zip(rank["after_failure"], rank["trained"]):
            assert torch.equal(p.view(torch.int32), b.view(torch.int32)), f"rank {r} not restored"


# -- perturbation parallelism ---------------------------------------------------------------------

def _pair_worker(rank, init_file, state, out_dir):
    """perturbation_parallel: both ranks of the pair see the whole batch; rank 0 evaluates
    theta + eps z, rank 1 theta - eps z (every seed)."""
    _init(rank, init_file)
    results = {}
    for n_spsa in (1, 2):
        net = _net(state)
        opt = make("mezo", net, process_group=dist.group.WORLD, perturbation_parallel=True,
                   n_spsa=n_spsa)
        x, y = _task(0.5, seed=2)
        closure, _, _ = _losses(net, x, y)
        calls = {"n": 0}

        def counted():
            calls["n"] += 1
            return closure()
        losses = [float(opt.step(counted)) for _ in range(STEPS)]
        results[n_spsa] = {"params": [p.detach() for p in net.parameters()],
                           "calls": calls["n"], "losses": losses}
    torch.save(results, os.path.join(out_dir, f"pair{rank}.pt"))
    finish_process_group()


def test_perturbation_parallel_halves_the_forwards_and_matches_one_process(tmp_path):
    state = pretrained().state_dict()
    mp.spawn(_pair_worker, args=(str(tmp_path / "init"), state, str(tmp_path)), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"pair{r}.pt", weights_only=True) for r in range(WORLD)]
    for n_spsa in (1, 2):
        pair = [rank[n_spsa] for rank in ranks]
        # one forward per rank and seed, and one more in the first step (the virtual probes'
        # check evaluates its probe in place and virtually)
        assert pair[0]["calls"] == pair[1]["calls"] == n_spsa * STEPS + 1
        for a, b in zip(pair[0]["params"], pair[1]["params"]):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), "the pair diverged"
        net = pretrained()
        opt = make("mezo", net, n_spsa=n_spsa)
        x, y = _task(0.5, seed=2)
        closure, _, _ = _losses(net, x, y)
        expected = [float(opt.step(closure)) for _ in range(STEPS)]
        assert pair[0]["losses"] == pytest.approx(expected, rel=1e-5)
        # theta - eps z is reached from theta on rank 1, not by recovery from theta + eps z: the
        # losses agree to rounding, so the updates do too
        for a, p in zip(pair[0]["params"], net.parameters()):
            torch.testing.assert_close(a, p.detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["mezo", "lezo"])
def test_perturbation_parallel_argument_checks(name):
    net = pretrained()
    with pytest.raises(ValueError, match="process_group"):
        make(name, net, perturbation_parallel=True)
    with pytest.raises(ValueError, match="exact_restore"):
        make(name, net, perturbation_parallel=True, exact_restore=False)


# -- manually sharded parameters ------------------------------------------------------------------

def _functional_loss(names, x, y):
    """loss(full parameters): TinyNet's loss on (x, y) with the given unsharded tensors."""
    net = TinyNet()

    def loss(full):
        out = torch.func.functional_call(net, dict(zip(names, full)), (x,))
        return torch.nn.functional.mse_loss(out, y)
    return loss


def _shard_worker(rank, init_file, state, out_dir):
    """Each rank holds rows [rank * n / 2, (rank + 1) * n / 2) of every parameter (marked with
    mark_shard); the closure all-gathers the shards and evaluates the whole batch, so both ranks
    see the same loss. Rank 0 then runs one unsharded MeZO in this same process (same threads,
    same kernels) for the bit-exact comparison."""
    from zokernels.optim import MeZO
    from zokernels.sharding import mark_shard

    _init(rank, init_file)
    x, y = _task(0.5, seed=2)
    names = list(state)
    shards = []
    for name in names:
        full = state[name]
        rows = full.shape[0] // WORLD
        local = full[rank * rows:(rank + 1) * rows].clone()
        shards.append(mark_shard(local, full.shape, (rank * rows,) + (0,) * (full.dim() - 1)))
    loss = _functional_loss(names, x, y)

    def closure():
        full = []
        for local in shards:
            parts = [torch.empty_like(local) for _ in range(WORLD)]
            dist.all_gather(parts, local)
            full.append(torch.cat(parts))
        return loss(full)
    opt = MeZO(list(zip(names, shards)), lr=5e-3, eps=1e-3, seed=0)  # world group: sharded
    assert opt.process_group is dist.group.WORLD
    for _ in range(STEPS):
        opt.step(closure)
    gathered = []
    for local in shards:
        parts = [torch.empty_like(local) for _ in range(WORLD)]
        dist.all_gather(parts, local)
        gathered.append(torch.cat(parts))
    result = {"sharded": gathered}
    if rank == 0:
        params = [state[name].clone() for name in names]
        reference = MeZO(list(zip(names, params)), lr=5e-3, eps=1e-3, seed=0)
        for _ in range(STEPS):
            reference.step(lambda: loss(params))
        result["unsharded"] = params
    torch.save(result, os.path.join(out_dir, f"shard{rank}.pt"))
    finish_process_group()


def test_row_sharded_mezo_equals_the_unsharded_run_bit_for_bit(tmp_path):
    state = pretrained().state_dict()
    mp.spawn(_shard_worker, args=(str(tmp_path / "init"), state, str(tmp_path)), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"shard{r}.pt", weights_only=True) for r in range(WORLD)]
    start = list(state.values())
    for name, sharded, other, unsharded, initial in zip(
            state, ranks[0]["sharded"], ranks[1]["sharded"], ranks[0]["unsharded"], start):
        assert torch.equal(sharded, other)
        assert not torch.equal(sharded, initial), f"{name} was not trained"
        assert torch.equal(sharded.view(torch.int32), unsharded.view(torch.int32)), \
            f"{name}: sharded run differs from the unsharded one"
