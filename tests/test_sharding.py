"""Sharded parameters: each rank perturbs its local shard with the unsharded tensor's noise.

In one process: the index map of a box (checked against brute force), and perturb_ / the undo
log / the scatter on shards equal to the unsharded op, bit for bit, on every backend. In 2 spawned
gloo processes: DTensor shards (row and column, uneven) through perturb_, and FSDP2's fully_shard
(it runs on CPU with the installed torch) for the optimizers, compared with one unsharded process;
a trajectory recorded on the sharded run replays on the unsharded model.
"""

from __future__ import annotations

import datetime
import gc
import itertools
import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import zokernels
from zokernels import ParameterSpace, Trajectory, UndoLog
from zokernels.lowrank_space import LowRankSpace
from zokernels.sharding import IndexMap, index_map_for_box, index_map_of, mark_shard

from helpers import COLLECTIVE_TIMEOUT, assert_bits_equal
from test_optim import TinyNet, _task, make, pretrained

BACKENDS = [b for b in ("torch", "cpu", "triton") if b in zokernels.available_backends()]


def _box(shape, start, size):
    return tuple(slice(o, o + n) for o, n in zip(start, size))


def _flat_box_indices(shape, start, size) -> list[int]:
    return torch.arange(math.prod(shape)).view(shape)[_box(shape, start, size)].reshape(-1).tolist()


def _one_level_runs(indices: list[int]) -> bool:
    """Brute force: can these global indices be written as runs of equal length, equally apart?"""
    n = len(indices)
    for span in range(1, n + 1):
        if n % span:
            continue
        runs = [indices[r * span:(r + 1) * span] for r in range(n // span)]
        if any(run != list(range(run[0], run[0] + span)) for run in runs):
            continue
        if len(runs) == 1:
            return True
        gap = runs[1][0] - runs[0][0]
        if all(run[0] == runs[0][0] + r * gap for r, run in enumerate(runs)):
            return True
    return False


def test_index_map_of_every_small_box_is_exact_or_refused():
    checked = 0
    for shape in itertools.product((1, 2, 3), (1, 2, 3), (1, 3)):
        for size in itertools.product(*[range(1, s + 1) for s in shape]):
            for start in itertools.product(*[range(0, s - n + 1) for s, n in zip(shape, size)]):
                expected = _flat_box_indices(shape, start, size)
                try:
                    index_map = index_map_for_box(shape, size, start)
                except ValueError:
                    assert not _one_level_runs(expected), (shape, size, start)
                    continue
                got = (list(range(len(expected))) if index_map is None
                       else [index_map.index(i) for i in range(len(expected))])
                assert got == expected, (shape, size, start, index_map)
                checked += 1
    assert checked > 500


def test_index_map_examples_and_errors():
    assert index_map_for_box((7, 5), (3, 5), (4, 0)) == IndexMap(20, 15, 15)  # FSDP's Shard(0)
    assert index_map_for_box((5, 7), (5, 3), (0, 4)) == IndexMap(4, 3, 7)  # a column shard
    assert index_map_for_box((5, 7), (5, 7), (0, 0)) is None
    assert index_map_for_box((5, 7), (0, 7), (5, 0)) is None  # an empty shard
    with pytest.raises(ValueError, match="does not fit"):
        index_map_for_box((5, 7), (3, 7), (4, 0))
    with pytest.raises(ValueError, match="one level of runs"):
        index_map_for_box((2, 4, 4), (2, 2, 2), (0, 0, 0))


def test_perturb_refuses_bad_index_maps_and_writes_nothing():
    t = torch.randn(4, 6)
    before = t.clone()
    for bad, error, words in [([(0, 0, 6)], ValueError, "local_span"),
                              ([(0, 7, 6)], ValueError, "local_span"),
                              ([(0, 5, 6)], ValueError, "divide"),
                              ([(-1, 6, 6)], ValueError, "offset"),
                              ([(0, 6)], TypeError, "index_maps\\[0\\]"),
                              ([None, None], ValueError, "one entry per tensor"),
                              ([((1 << 63) - 3, 6, 6)], ValueError, "2\\^63")]:
        with pytest.raises(error, match=words):
            zokernels.perturb_([t], 1, 0.5, index_maps=bad)
        assert_bits_equal(t, before)


# Global shapes and shard boxes (start, size): rows, uneven columns, a block, one row, one column,
# a 3-D middle-dim shard, and a 1-D tail.
CASES = [((7, 5), (4, 0), (3, 5)), ((5, 7), (0, 4), (5, 3)), ((5, 7), (0, 0), (5, 4)),
         ((33, 131), (1, 2), (3, 4)), ((33, 131), (20, 0), (1, 131)), ((9, 131), (0, 130), (9, 1)),
         ((3, 4, 5), (0, 1, 0), (3, 2, 5)), ((4097,), (1000,), (3097,))]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dist_name", ["gaussian", "rademacher"])
def test_shard_perturb_equals_the_unsharded_op(backend, dtype, dist_name):
    """K = 3 seeds, decay, stochastic rounding (bf16), recovery; shards mixed with an unsharded
    tensor in one call."""
    gen = torch.Generator().manual_seed(3)
    rounding = "stochastic" if dtype == torch.bfloat16 else "nearest"
    cases = CASES if backend != "triton" else CASES[:3]  # the interpreter is slow
    for shape, start, size in cases:
        full = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
        other = (torch.randn(37, generator=gen)).to(dtype)
        local = full[_box(shape, start, size)].contiguous()
        index_map = index_map_for_box(shape, size, start)
        shard_other = other.clone()
        kw = dict(keys=[11, 12], dist=dist_name, backend=backend)
        # held perturbation, then a recovering update with decay and stochastic rounding
        zokernels.perturb_([full, other], [5, 6, 7], [1e-3, 0.0, -2e-3], **kw)
        zokernels.perturb_([local, shard_other], [5, 6, 7], [1e-3, 0.0, -2e-3],
                           index_maps=[index_map, None], **kw)
        assert_bits_equal(local, full[_box(shape, start, size)].contiguous())
        upd = dict(decay=[0.9, 1.0], rounding=rounding, rounding_seed=99, **kw)
        zokernels.perturb_([full, other], [5, 6, 7], [0.3, -0.1, 0.2],
                           applied=[1e-3, 0.0, -2e-3], **upd)
        zokernels.perturb_([local, shard_other], [5, 6, 7], [0.3, -0.1, 0.2],
                           applied=[1e-3, 0.0, -2e-3], index_maps=[index_map, None], **upd)
        assert torch.equal(_bits(local), _bits(full[_box(shape, start, size)].contiguous())), \
            (shape, start, size)
        assert_bits_equal(shard_other, other)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shard_undo_log_restores_and_updates_like_the_unsharded_space(backend, dtype):
    """ParameterSpace over marked shards: the logged +eps pass, the exact restore (recovery +
    scatter without seeds) and the exact update (scatter with seeds) leave every shard equal to
    the unsharded space's result."""
    gen = torch.Generator().manual_seed(4)
    cases = CASES[:4] if backend != "triton" else CASES[1:3]
    fulls = [(torch.randn(shape, generator=gen) * 0.05).to(dtype) for shape, _, _ in cases]
    shards = [mark_shard(full[_box(shape, start, size)].contiguous(), shape, start)
              for full, (shape, start, size) in zip(fulls, cases)]
    names = [f"w{j}" for j in range(len(cases))]
    whole = ParameterSpace(list(zip(names, fulls)), backend=backend)
    part = ParameterSpace(list(zip(names, shards)), backend=backend)
    assert part.sharded and not whole.sharded
    originals = [s.clone() for s in shards]

    def check(what):
        for full, shard, (shape, start, size) in zip(fulls, shards, cases):
            assert torch.equal(_bits(shard), _bits(full[_box(shape, start, size)].contiguous())), what

    for space in (whole, part):  # +eps logged, then the restore
        log = UndoLog()
        space.apply(21, 1e-3, log=log)
        space.apply(21, 0.0, applied=1e-3)
        space.apply_logged(log)
    for shard, original in zip(shards, originals):
        assert_bits_equal(shard, original)
    for space in (whole, part):  # -eps logged, then the update from the exact weights
        log = UndoLog()
        space.apply(22, -1e-3, log=log)
        space.apply(22, -0.02, applied=-1e-3, weight_decay_factor=0.99)
        space.apply_logged(log, 22, -0.02, weight_decay_factor=0.99)
    check("update")


# -- 2 processes (gloo) -----------------------------------------------------------------------

STEPS = 3


# What rank 0 of the failure test waits, inside one step begun together with its peer (after a
# barrier), for the collective the failed peer never joins: the one timeout that must fire.
FAILED_PEER_TIMEOUT = 20


def _init(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
    torch.set_num_threads(1)


def _dtensor_worker(rank, world, init_file, out_dir):
    """DTensor shards on a CPU mesh through perturb_: the local results must equal the slice of the
    unsharded op's result."""
    _init(rank, world, init_file)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        mesh = init_device_mesh("cpu", (world,))
        failures = []
        for shape, dim in [((7, 5), 0), ((5, 7), 1), ((33, 131), 1), ((3, 4, 5), 1), ((9,), 0)]:
            for dtype in (torch.float32, torch.bfloat16):
                full = (torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 0.1
                        ).to(dtype)
                shard = distribute_tensor(full.clone(), mesh, [Shard(dim)])
                local = shard.to_local().clone()
                size, start = compute_local_shape_and_global_offset(shape, mesh, [Shard(dim)])
                for backend in ("torch", "cpu"):
                    expected, got = full.clone(), local.clone()
                    zokernels.perturb_(expected, [1, 2], [0.5, -0.25], keys=[9], decay=0.9,
                                       backend=backend)
                    zokernels.perturb_(got, [1, 2], [0.5, -0.25], keys=[9], decay=0.9,
                                       index_maps=[index_map_of(shard)], backend=backend)
                    if not torch.equal(got, expected[_box(shape, start, size)]):
                        failures.append((shape, dim, str(dtype), backend))
        torch.save({"failures": failures}, os.path.join(out_dir, f"dtensor{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _sharded_net(out_dir):
    """The optimizer tests' TinyNet with every submodule fully_shard-ed (FSDP2), so that calling
    net.features / net.head directly (PseuZO's split) gathers what it needs. The weights
    come from the parent process: pre-training with another thread count rounds differently."""
    from torch.distributed.fsdp import fully_shard

    net = TinyNet()
    net.load_state_dict(torch.load(os.path.join(out_dir, "initial.pt")))
    # reshard_after_forward=True on every unit, the root included: FSDP2 otherwise keeps a root's
    # gathered weights after its forward, and the next perturbation of the shards would not be
    # seen (docs/sharding.md); PseuZO's direct calls to net.features make embed such a root.
    for module in [net.embed, *net.blocks, net.head, net]:
        fully_shard(module, reshard_after_forward=True)
    return net


def _train(name, net, opt, x, y, steps):
    for _ in range(steps):
        if name == "pseuzo":
            opt.step(lambda: net.features(x),
                     lambda h: torch.nn.functional.mse_loss(net.head(h), y))
        else:
            opt.step(lambda: torch.nn.functional.mse_loss(net(x), y))


def _fsdp_run(rank, out_dir, name):
    net = _sharded_net(out_dir)
    opt = make(name, net)  # no process_group: sharded parameters default to the world
    assert opt.process_group is dist.group.WORLD
    assert all(space.sharded for space in opt.spaces)
    x, y = _task(0.5, seed=2)
    _train(name, net, opt, x, y, STEPS)
    full = {n: p.full_tensor().detach().clone() for n, p in net.named_parameters()}
    if rank == 0:
        opt.trajectory.save(os.path.join(out_dir, "trajectory.zt"))
    torch.save({"params": full, "undo_overflows": opt.zo_state["undo_overflows"]},
               os.path.join(out_dir, f"fsdp{rank}.pt"))


def _fsdp_worker(rank, world, init_file, out_dir, name):
    _init(rank, world, init_file)
    try:
        _fsdp_run(rank, out_dir, name)
        # FSDP's state (and any collective it holds) is gone with _fsdp_run's frame; both ranks
        # are past their last collective before the group is torn down
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _fsdp_failure_worker(rank, world, init_file, out_dir):
    """Rank 1's closure raises in its second call (the -eps forward); rank 0 is then stuck in that
    forward's all-gather until the collective times out and raises.

    Only that wait is timed: set-up and the first step run under the generous default, the
    failing step starts on both ranks together (a barrier), and rank 1 stays alive (outside any
    collective) until rank 0 has saved its outcome: rank 0 then always meets the timeout, never
    a peer that vanished under it."""
    _init(rank, world, init_file)
    net = _sharded_net(out_dir)
    opt = make("mezo", net)
    x, y = _task(0.5, seed=2)
    _train("mezo", net, opt, x, y, 1)
    before = [p.to_local().detach().clone() for p in net.parameters()]
    dist.barrier()
    if rank == 0:
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(datetime.timedelta(seconds=FAILED_PEER_TIMEOUT))
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        if rank == 1 and calls["n"] == 2:
            raise RuntimeError("rank failed mid-step")
        return torch.nn.functional.mse_loss(net(x), y)
    try:
        opt.step(closure)
        outcome = "ok"
    except Exception as exc:  # its own error, or the collective's timeout
        outcome = type(exc).__name__
    path = os.path.join(out_dir, f"fail{rank}.pt")
    torch.save({"shards": [p.to_local().detach() for p in net.parameters()], "before": before,
                "outcome": outcome}, path + ".tmp")
    os.replace(path + ".tmp", path)
    if rank == 1:  # until rank 0 is done (mp.spawn ends this wait if rank 0 dies)
        while not os.path.exists(os.path.join(out_dir, "fail0.pt")):
            time.sleep(0.05)
    # no destroy_process_group: the peer is gone, a barrier-like teardown could hang; and no
    # interpreter teardown either (gloo's destructors can abort a process whose peer failed)
    os._exit(0)


def _mixed_worker(rank, world, init_file, out_dir):
    """One weight sharded by hand (mark_shard, gathered in the forward) among plain parameters:
    MeZO's virtual check holds the shard in place while it compares (it used to leave it at
    theta and always fell back), and the run equals the unsharded one; a process group without
    this rank and a sharded group added to perturbation_parallel are refused."""
    _init(rank, world, init_file)
    try:
        from zokernels.optim import MeZO

        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4))
        full = net[2].weight.detach().clone()
        local = torch.nn.Parameter(full[2 * rank:2 * rank + 2].clone())
        mark_shard(local, (4, 6), (2 * rank, 0))
        x, y = _mixed_data()

        def closure():
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local.detach().contiguous())
            hidden = net[1](net[0](x))
            out = torch.nn.functional.linear(hidden, torch.cat(parts), net[2].bias)
            return torch.nn.functional.mse_loss(out, y)

        params = [("0.weight", net[0].weight), ("0.bias", net[0].bias), ("2.weight", local),
                  ("2.bias", net[2].bias)]
        opt = MeZO(params, lr=1e-2, seed=3)
        for _ in range(3):
            opt.step(closure)
        outcome = {"status": opt.dense_probe_status, "local": local.detach().clone(),
                   "plain": [p.detach().clone() for p in (net[0].weight, net[0].bias,
                                                          net[2].bias)]}
        only_zero = dist.new_group([0])  # every rank calls new_group; rank 1 is not in it
        if rank == 1:
            try:
                MeZO(net.parameters(), lr=1e-2, process_group=only_zero)
                outcome["outside"] = "accepted"
            except ValueError as exc:
                outcome["outside"] = str(exc)
        pairs = MeZO(net[0].parameters(), lr=1e-2, process_group=dist.group.WORLD,
                     perturbation_parallel=True)
        try:
            pairs.add_param_group({"params": [local]})
            outcome["pairs"] = "accepted"
        except ValueError as exc:
            outcome["pairs"] = str(exc)
        outcome["pair_groups"] = len(pairs.param_groups)
        torch.save(outcome, os.path.join(out_dir, f"mixed{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sharded_and_plain_parameters_share_the_virtual_check_and_groups_are_checked(tmp_path):
    from zokernels.optim import MeZO

    _spawn(_mixed_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"mixed{r}.pt") for r in range(2)]
    # the unsharded run, in this process
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4))
    x, y = _mixed_data()
    opt = MeZO(net.named_parameters(), lr=1e-2, seed=3, probe="inplace")
    for _ in range(3):
        opt.step(lambda: torch.nn.functional.mse_loss(net(x), y))
    for rank, got in enumerate(ranks):
        assert got["status"] == "virtual (3 of 4 parameters; the others in place)"
        assert_bits_equal(got["local"], net[2].weight.detach()[2 * rank:2 * rank + 2])
        for a, b in zip(got["plain"], (net[0].weight, net[0].bias, net[2].bias)):
            assert_bits_equal(a, b.detach())
        assert got["pairs"].startswith("perturbation_parallel does not work with sharded")
        assert got["pair_groups"] == 1  # refused before anything was added
    assert ranks[1]["outside"].startswith("process_group does not hold this rank (1)")


def _mixed_data() -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(16, 8, generator=torch.Generator().manual_seed(1)),
            torch.randn(16, 4, generator=torch.Generator().manual_seed(2)))


def _spawn(worker, tmp_path, *args):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path), *args), nprocs=2, join=True)


def test_dtensor_row_and_column_shards_equal_the_unsharded_perturb(tmp_path):
    """DTensor with a CPU mesh (distribute_tensor): Shard(0) and Shard(1), uneven splits."""
    _spawn(_dtensor_worker, tmp_path)
    for rank in range(2):
        assert torch.load(tmp_path / f"dtensor{rank}.pt")["failures"] == []


@pytest.mark.parametrize("name", ["mezo", "lezo", "tezo", "pseuzo"])
def test_fsdp2_training_equals_unsharded_and_its_trajectory_replays(name, tmp_path):
    """FSDP2 fully_shard on CPU (gloo): both ranks see the whole batch, so the sharded run must
    equal one unsharded process bit for bit (same z at every element, same averaged losses); its
    trajectory replays on the unsharded model to the same bits."""
    torch.save(pretrained().state_dict(), tmp_path / "initial.pt")
    _spawn(_fsdp_worker, tmp_path, name)
    ranks = [torch.load(tmp_path / f"fsdp{r}.pt") for r in range(2)]
    net = pretrained()
    # sharded 2-D weights take TeZO's in-place probes: the unsharded reference does too
    opt = make(name, net, **({"probe": "inplace"} if name == "tezo" else {}))
    x, y = _task(0.5, seed=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: matmul kernels round differently per thread count
    try:
        _train(name, net, opt, x, y, STEPS)
    finally:
        torch.set_num_threads(threads)
    replayed = pretrained()
    Trajectory.load(tmp_path / "trajectory.zt").replay(replayed)
    for (n, p), (_, q) in zip(net.named_parameters(), replayed.named_parameters()):
        for rank in ranks:
            assert_bits_equal(rank["params"][n], p.detach())
        assert_bits_equal(q.detach(), p.detach())
    assert not torch.equal(next(pretrained().parameters()), next(net.parameters()))


def test_fsdp2_rank_failing_mid_step_leaves_every_shard_restored(tmp_path):
    """What is recoverable: each rank's own shards, bit for bit, once its step raises (its own
    exception, or the collective reporting the peer's failure). The step is lost on every rank."""
    torch.save(pretrained().state_dict(), tmp_path / "initial.pt")
    _spawn(_fsdp_failure_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"fail{r}.pt") for r in range(2)]
    assert ranks[1]["outcome"] == "RuntimeError"
    assert ranks[0]["outcome"] != "ok"
    for rank in ranks:
        for shard, before in zip(rank["shards"], rank["before"]):
            assert_bits_equal(shard, before)


def test_marked_shards_record_the_unsharded_sizes_and_refuse_sharded_stochastic_lowrank():
    full = torch.randn(6, 4)
    shard = mark_shard(full[2:5].clone(), (6, 4), (2, 0))
    space = ParameterSpace([("w", shard)], backend="torch")
    assert space.global_numels() == [24]  # what a trajectory records: replays on the full model
    state = LowRankSpace(space.names, space.params, space.keys, space.decayable, rank=2, seed=1,
                         backend="torch", shards=space.shards)
    assert [tuple(u.shape) for u in state.us] == [(3, 2)]  # the shard's rows of U
    assert state.shapes == [(6, 4)]
    before = shard.clone()
    with pytest.raises(ValueError, match="stochastic"):
        state.apply(torch.randn(2), 1e-3, 1.0, "torch", rounding="stochastic", rounding_seed=1)
    assert_bits_equal(shard, before)
