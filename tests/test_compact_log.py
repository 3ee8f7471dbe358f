"""The selector log (docs/undo-log.md): a pass that logs keeps the few bits a later pass needs to
recover every weight exactly; the C++ kernel against the torch reference, the overflow policy,
and the optimizers' exact restore at a few % of the parameters' memory."""

from __future__ import annotations

import pytest
import torch
from helpers import (assert_bits_equal, assert_interrupted_step_leaves_weights, assert_same,
                     assert_same_in_both_simd_modes, assert_selector_checks, selector_checks,
                     selector_pool_offset, snapshot)

from zokernels.backends.cpu.perturb import perturb_cpu
from zokernels.backends.torch.perturb import perturb_torch
from zokernels.backends.torch.rounding import recover
from zokernels.backends.torch.selector_log import (BLOCK, block_fields, log_tensor, n_blocks,
                                                   row_header)
from zokernels.backends.undo_buffers import SelectorBuffers
from zokernels.ops.undo import SelectorLog, UndoLog
from zokernels.optim import LeZO, MeZO, PseuZO
from zokernels.space import ParameterSpace

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BACKENDS = {"torch": perturb_torch, "cpu": perturb_cpu}
EPS = 1e-3


def _weights(dtype: torch.dtype) -> list[torch.Tensor]:
    """N(0, 0.02) tensors of odd sizes, and the worst cases: zeros, -0.0, tiny values, NaN,
    infinities, a mix in one block."""
    g = torch.Generator().manual_seed(3)
    tensors = [(0.02 * torch.randn(n, generator=g)).to(dtype) for n in (0, 1, 3, 1023, 4097)]
    tensors += [torch.zeros(100, dtype=dtype), torch.full((50,), -0.0, dtype=dtype),
                (1e-7 * torch.randn(300, generator=g)).to(dtype),
                torch.full((7,), float("nan"), dtype=dtype)]
    tensors.append(_mix(dtype, 2 * BLOCK + 5, g))
    return tensors


def _mix(dtype: torch.dtype, n: int, g: torch.Generator) -> torch.Tensor:
    """N(0, 0.02) weights with zeros, -0.0, NaN, infinities and tiny values in every block."""
    mix = (0.02 * torch.randn(n, generator=g)).to(dtype)
    mix[::7] = 0.0
    mix[1::11] = -0.0
    mix[2::13] = float("nan")
    mix[3::17] = float("inf")
    mix[4::19] = 1e-30
    return mix


def _buffers(tensors, words: int = 6, capacity: int = 1 << 16) -> SelectorBuffers:
    rows = sum(n_blocks(t.numel()) for t in tensors)
    return SelectorBuffers(torch.full((rows, words), 12345, dtype=torch.int32),
                           torch.zeros(capacity, dtype=torch.int32),
                           torch.zeros(1, dtype=torch.int64))


def _streams(log: SelectorBuffers) -> list[list[int]]:
    """Each block's row, a spilled block's replaced by its pool words (the pool's order of
    blocks depends on the threads); without the checks (the header of a stream in the row):
    they are of what each backend stored, and a NaN a pass computes may carry another payload
    there (assert_selector_checks compares them with the stored weights)."""
    out = []
    words = log.regions.shape[1]
    for row in log.regions.tolist():
        offset = selector_pool_offset(row[0])
        if offset is not None:
            out.append(["pool"] + log.pool[offset:offset + 64].tolist())
        else:
            out.append(["lost"] + [None] * (words - 1) if row[0] == -1 else ["row"] + row[1:])
    return out


def _step_passes(fn, tensors, dist: str, seed: int = 11, words: int = 6,
                 capacity: int = 1 << 16, index_maps=None):
    """+eps z logged into L1; -eps z from the exact theta (reading L1) logged into L2; then a
    restore (scale 0) reading L2. Returns the weights after each pass and the logs."""
    keys = list(range(len(tensors)))
    ones = torch.ones(len(tensors))
    extra = {} if index_maps is None else {"index_maps": index_maps}
    l1, l2 = _buffers(tensors, words, capacity), _buffers(tensors, words, capacity)
    fn(tensors, keys, [seed], torch.tensor([EPS]), ones, dist, "nearest", seed, selector_log=l1,
       **extra)
    plus = [t.clone() for t in tensors]
    fn(tensors, keys, [seed], torch.tensor([-EPS]), ones, dist, "nearest", seed,
       applied=torch.tensor([EPS]), held_log=l1, selector_log=l2, **extra)
    minus = [t.clone() for t in tensors]
    fn(tensors, keys, [seed], torch.tensor([0.0]), ones, dist, "nearest", seed,
       applied=torch.tensor([-EPS]), held_log=l2, **extra)
    return plus, minus, l1, l2


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minus_pass_and_restore_are_exact(backend, dist, dtype):
    """The -eps pass writes round(theta - eps z) exactly (not from a recovered theta), and the
    restore gives back every pattern: zeros, -0.0, tiny values, NaN payloads, infinities."""
    fn = BACKENDS[backend]
    original = _weights(dtype)
    tensors = [t.clone() for t in original]
    _, minus, _, l2 = _step_passes(fn, tensors, dist)
    direct = [t.clone() for t in original]
    fn(direct, list(range(len(direct))), [11], torch.tensor([-EPS]), torch.ones(len(direct)),
       dist, "nearest", 11)
    for j, (a, b) in enumerate(zip(minus, direct)):
        finite = torch.isfinite(b.float())  # a NaN's payload: the direct pass canonicalizes it
        assert_bits_equal(a[finite], b[finite], f"{backend} -eps tensor {j}")
    for j, (a, b) in enumerate(zip(tensors, original)):
        assert_bits_equal(a, b, f"{backend} restore tensor {j}")
    assert int(l2.count) <= l2.pool.numel()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_log_equals_reference(dtype):
    """Rademacher noise is bit-identical on both backends, so are the logs: the same rows, the
    same bits in the pool, the same weights after every pass."""
    runs = {name: _step_passes(fn, _weights(dtype), "rademacher") for name, fn in BACKENDS.items()}
    (p_ref, m_ref, l1_ref, l2_ref), (p_cpu, m_cpu, l1_cpu, l2_cpu) = runs["torch"], runs["cpu"]
    for j, (a, b) in enumerate(zip(p_cpu, p_ref)):
        finite = torch.isfinite(b.float())
        assert_bits_equal(a[finite], b[finite], f"+eps tensor {j}")
    for j, (a, b) in enumerate(zip(m_cpu, m_ref)):
        finite = torch.isfinite(b.float())
        assert_bits_equal(a[finite], b[finite], f"-eps tensor {j}")
    assert _streams(l1_cpu) == _streams(l1_ref)
    assert _streams(l2_cpu) == _streams(l2_ref)
    assert int(l1_cpu.count) == int(l1_ref.count) and int(l2_cpu.count) == int(l2_ref.count)
    for name, (p, m, l1, l2) in runs.items():
        assert_selector_checks(l1, p, f"{name} L1")
        assert_selector_checks(l2, m, f"{name} L2")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_reads_the_reference_log(dtype):
    """A log written by one backend restores on the other (rademacher: the same D)."""
    original = _weights(dtype)
    tensors = [t.clone() for t in original]
    keys, ones = list(range(len(tensors))), torch.ones(len(tensors))
    log = _buffers(tensors)
    perturb_torch(tensors, keys, [5], torch.tensor([EPS]), ones, "rademacher", "nearest", 5,
                  selector_log=log)
    perturb_cpu(tensors, keys, [5], torch.tensor([0.0]), ones, "rademacher", "nearest", 5,
                applied=torch.tensor([EPS]), held_log=log)
    for j, (a, b) in enumerate(zip(tensors, original)):
        assert_bits_equal(a, b, f"tensor {j}")


# Shards whose runs are shorter than a block (and unaligned on the contract index): a block of
# the log spans several tiles, down to one element each (local_span 1).
SHARD_MAPS = [(5, 100, 333), (1000, 1, 3), (7, 1250, 2000)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sharded_blocks_spanning_several_tiles_equal_the_reference(dtype):
    """Mapped tensors, whose blocks the C++ pass gathers tile by tile: the same logs (far and N
    elements included), the same weights after every pass, an exact restore."""
    g = torch.Generator().manual_seed(4)
    original = [_mix(dtype, 3000, g), _mix(dtype, 2100, g),
                (0.02 * torch.randn(2500, generator=g)).to(dtype)]
    runs = {name: _step_passes(fn, [t.clone() for t in original], "rademacher",
                               index_maps=SHARD_MAPS, capacity=1 << 18)
            for name, fn in BACKENDS.items()}
    for k in (0, 1):  # after +eps, after -eps
        for j, (a, b) in enumerate(zip(runs["cpu"][k], runs["torch"][k])):
            finite = torch.isfinite(b.float())
            assert_bits_equal(a[finite], b[finite], f"pass {k} tensor {j}")
    for k in (2, 3):
        assert _streams(runs["cpu"][k]) == _streams(runs["torch"][k])
        assert int(runs["cpu"][k].count) == int(runs["torch"][k].count) > 0
    for name in BACKENDS:  # _step_passes restored its clones in place: rerun to read them
        tensors = [t.clone() for t in original]
        _step_passes(BACKENDS[name], tensors, "rademacher", index_maps=SHARD_MAPS,
                     capacity=1 << 18)
        for j, (a, b) in enumerate(zip(tensors, original)):
            assert_bits_equal(a, b, f"{name} restore tensor {j}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gaussian_log_of_many_blocks_equals_the_reference(dtype):
    """N(0, 0.02) weights over many blocks under gaussian noise (elements two or more keys from
    r with no known side): the C++ log equals the reference's for the same D (the C++ pass's
    own noise), and the restore is exact."""
    g = torch.Generator().manual_seed(6)
    theta = torch.cat([(0.02 * torch.randn(40 * BLOCK, generator=g)).to(dtype),
                       _mix(dtype, 3 * BLOCK + 17, g)])
    d = torch.zeros(theta.numel())
    perturb_cpu([d], [0], [13], torch.tensor([EPS]), torch.ones(1), "gaussian", "nearest", 13)
    t = theta.clone()
    cpu = _buffers([t], words=6, capacity=1 << 18)
    perturb_cpu([t], [0], [13], torch.tensor([EPS]), torch.ones(1), "gaussian", "nearest", 13,
                selector_log=cpu)
    ref = _buffers([t], words=6, capacity=1 << 18)
    log_tensor(ref.regions, ref.pool, ref.count, 0, theta, t, d)
    assert _streams(cpu) == _streams(ref)
    assert int(cpu.count) == int(ref.count)
    perturb_cpu([t], [0], [13], torch.tensor([0.0]), torch.ones(1), "gaussian", "nearest", 13,
                applied=torch.tensor([EPS]), held_log=cpu)
    assert_bits_equal(t, theta, "restore")


def test_generic_path_writes_and_reads_the_simd_paths_logs(tmp_path):
    """ZOKERNELS_CPU_SIMD=generic (another flag compaction, other loop shapes): the same weights
    after every pass and the same streams as the dispatched path, for every dtype, both
    distributions, dense and sharded tensors with zeros, -0.0, NaN, infinities and tiny weights."""
    script = (
        "import sys, torch\n"
        "from zokernels.backends.cpu import build_info, perturb_cpu\n"
        "from zokernels.backends.undo_buffers import SelectorBuffers\n"
        "torch.set_num_threads(1)\n"
        "out = {'simd': build_info()['simd']}\n"
        "def buffers(rows):\n"
        "    return SelectorBuffers(torch.zeros(rows, 6, dtype=torch.int32),\n"
        "                           torch.zeros(1 << 18, dtype=torch.int32),\n"
        "                           torch.zeros(1, dtype=torch.int64))\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    g = torch.Generator().manual_seed(2)\n"
        "    mix = (0.02 * torch.randn(3000, generator=g)).to(dtype)\n"
        "    mix[::7], mix[1::11], mix[2::13], mix[3::17], mix[4::19] = (\n"
        "        0.0, -0.0, float('nan'), float('inf'), 1e-30)\n"
        "    base = [mix, (0.02 * torch.randn(9 * 1024 + 5, generator=g)).to(dtype),\n"
        "            (1e-7 * torch.randn(2500, generator=g)).to(dtype)]\n"
        "    for dist in ('gaussian', 'rademacher'):\n"
        "        for maps in (None, [(5, 100, 333), (1000, 1, 3), (7, 1250, 2000)]):\n"
        "            ts = [t.clone() for t in base]\n"
        "            extra = {} if maps is None else {'index_maps': maps}\n"
        "            keys, ones = [0, 1, 2], torch.ones(3)\n"
        "            rows = sum(-(-t.numel() // 1024) for t in ts)\n"
        "            l1, l2 = buffers(rows), buffers(rows)\n"
        "            name = f'{dtype} {dist} {maps is None}'\n"
        "            perturb_cpu(ts, keys, [9], torch.tensor([1e-3]), ones, dist, 'nearest', 9,\n"
        "                        selector_log=l1, **extra)\n"
        "            out[name + ' +eps'] = torch.cat(ts)\n"
        "            perturb_cpu(ts, keys, [9], torch.tensor([-1e-3]), ones, dist, 'nearest', 9,\n"
        "                        applied=torch.tensor([1e-3]), held_log=l1, selector_log=l2, **extra)\n"
        "            out[name + ' -eps'] = torch.cat(ts)\n"
        "            perturb_cpu(ts, keys, [9], torch.tensor([0.0]), ones, dist, 'nearest', 9,\n"
        "                        applied=torch.tensor([-1e-3]), held_log=l2, **extra)\n"
        "            out[name + ' restored'] = torch.cat(ts)\n"
        "            for k, log in (('l1', l1), ('l2', l2)):\n"
        "                out[f'{name} {k} rows'] = log.regions.clone()\n"
        "                out[f'{name} {k} pool'] = log.pool[:int(log.count)].clone()\n"
        "torch.save(out, sys.argv[1])\n"
    )
    assert_same_in_both_simd_modes(script, tmp_path)


def _garbage_log(tensors, words: int, capacity: int, checks: list[int],
                 g: torch.Generator) -> tuple[SelectorBuffers, torch.Tensor]:
    """Rows and a pool of random words (so n_F up to 2047, W up to 63, any step and payload
    bits) with headers of every kind: in the row, into the pool (also near its end), past the
    pool (also at the extremes of int32), lost; the checks those of the weights read (`checks`), so that their streams are
    decoded, except in about a sixth of the rows. Both sit at the start of larger buffers of
    random words, so that a read past a row or past the pool would see words the reference
    reads as 0. Also the rows a reader must take as lost."""
    rows = sum(n_blocks(t.numel()) for t in tensors)
    spare = torch.randint(-(1 << 31), 1 << 31, (rows * words + 4096,), generator=g,
                          dtype=torch.int64).to(torch.int32)
    pool_spare = torch.randint(-(1 << 31), 1 << 31, (capacity + 4096,), generator=g,
                               dtype=torch.int64).to(torch.int32)
    regions = spare[:rows * words].view(rows, words)
    check = torch.tensor(checks, dtype=torch.int64)
    check = torch.where(torch.randint(0, 6, (rows,), generator=g) == 0, check + 1, check)
    kinds = torch.randint(0, 5, (rows,), generator=g)
    offset = torch.randint(0, capacity, (rows,), generator=g)
    offset = torch.where(kinds == 1, capacity - torch.randint(1, 4, (rows,), generator=g), offset)
    offset = torch.where(kinds == 2, capacity + torch.randint(0, 9, (rows,), generator=g), offset)
    header = torch.where(kinds == 0, row_header(check), -2 - offset)
    header = torch.where(kinds == 3, -1, header)
    in_pool = (kinds != 0) & (kinds != 3)
    regions[:, 1] = torch.where(in_pool, check.to(torch.int32), regions[:, 1])
    lost = (kinds == 2) | (kinds == 3) | (check != torch.tensor(checks))
    # the extremes: offsets 2^31 - 2 and far past the pool, the largest in-row header
    header[:3] = torch.tensor([-(1 << 31), -2 - (capacity + (1 << 20)), (1 << 31) - 1])
    lost[:2] = True
    lost[2] = row_header(checks[2]) != (1 << 31) - 1
    regions[:, 0] = header.to(torch.int32)
    return SelectorBuffers(regions, pool_spare[:capacity], torch.zeros(1, dtype=torch.int64)), lost


@pytest.mark.parametrize("mapped", [False, True], ids=["dense", "sharded"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_log_of_garbage_is_read_inside_its_buffers(dtype, mapped):
    """A recovering pass reading a log that no pass wrote neither crashes nor reads outside each
    row (words 1..) or the pool (bits past their end read as 0): it gives back exactly what the
    reference reads from the same words (in lost blocks, for their header or their check,
    recovery's NaNs as NaNs: torch's conversions do not keep one NaN pattern)."""
    g = torch.Generator().manual_seed(9 + mapped)
    original = [_mix(dtype, 3000, g), (1e-7 * torch.randn(2100, generator=g)).to(dtype),
                (0.02 * torch.randn(2500, generator=g)).to(dtype)]
    extra = {"index_maps": SHARD_MAPS} if mapped else {}
    keys, ones = list(range(len(original))), torch.ones(len(original))
    perturbed = [t.clone() for t in original]
    perturb_torch(perturbed, keys, [3], torch.tensor([EPS]), ones, "rademacher", "nearest", 3,
                  **extra)
    for words in (2, 6):
        log, lost_rows = _garbage_log(original, words, 300, selector_checks(perturbed), g)
        assert not bool(lost_rows.all()) and bool(lost_rows.any())
        outs = {}
        for name, fn in BACKENDS.items():
            tensors = [t.clone() for t in perturbed]
            fn(tensors, keys, [3], torch.tensor([0.0]), ones, "rademacher", "nearest", 3,
               applied=torch.tensor([EPS]), held_log=log, **extra)
            outs[name] = tensors
        row = 0
        for j, (a, b) in enumerate(zip(outs["cpu"], outs["torch"])):
            rows = n_blocks(b.numel())
            lost = lost_rows[row:row + rows].repeat_interleave(BLOCK)[:b.numel()]
            row += rows
            exact = torch.isfinite(b.float()) | ~lost
            assert_bits_equal(a[exact], b[exact], f"words {words} tensor {j}")
            assert torch.equal(a.float().isnan(), b.float().isnan()), f"words {words} tensor {j}"


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_count_only_writes_nothing_and_counts_the_pool_words(backend, dtype):
    fn = BACKENDS[backend]
    tensors = _weights(dtype)
    before = [t.clone() for t in tensors]
    keys, ones = list(range(len(tensors))), torch.ones(len(tensors))
    probe = _buffers(tensors, capacity=0)
    fn(tensors, keys, [7], torch.tensor([EPS]), ones, "gaussian", "nearest", 7,
       selector_log=probe, count_only=True)
    for a, b in zip(tensors, before):
        assert_bits_equal(a, b, "count-only pass")
    assert (probe.regions == 12345).all()
    real = _buffers(tensors)
    fn(tensors, keys, [7], torch.tensor([EPS]), ones, "gaussian", "nearest", 7, selector_log=real)
    assert int(probe.count) == int(real.count) > 0  # the zeros and tiny values spill


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_overflow_loses_whole_blocks_to_recovery(backend, dtype):
    """The one overflow policy: a block whose bits fit neither its row nor the pool is marked
    lost (header -1) and recovered as applied= alone would; every other block stays exact, and
    count says how many pool words the pass wanted."""
    fn = BACKENDS[backend]
    original = _weights(dtype)
    tensors = [t.clone() for t in original]
    keys, ones = list(range(len(tensors))), torch.ones(len(tensors))
    log = _buffers(tensors, capacity=0)
    fn(tensors, keys, [9], torch.tensor([EPS]), ones, "rademacher", "nearest", 9,
       selector_log=log)
    perturbed = [t.clone() for t in tensors]
    fn(tensors, keys, [9], torch.tensor([0.0]), ones, "rademacher", "nearest", 9,
       applied=torch.tensor([EPS]), held_log=log)
    assert int(log.count) > 0
    row = 0
    for j, (t, theta, y) in enumerate(zip(tensors, original, perturbed)):
        noise = torch.zeros(y.numel())
        perturb_torch([noise], [keys[j]], [9], torch.tensor([EPS]), torch.ones(1), "rademacher",
                      "nearest", 9)
        recovered = recover(y.float(), noise, dtype).to(dtype)
        for b in range(n_blocks(t.numel())):
            part = slice(b * BLOCK, (b + 1) * BLOCK)
            lost = int(log.regions[row, 0]) == -1
            expected = recovered[part] if lost else theta[part]
            finite = torch.isfinite(expected.float()) | ~torch.tensor(lost)
            assert_bits_equal(t[part][finite], expected[finite], f"tensor {j} block {b}")
            row += 1
    assert (log.regions[:, 0] == -1).any()


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weights_written_between_the_passes_recover_as_lost_blocks(backend, dtype):
    """Blocks whose weights someone else wrote between the logging pass and the reading one (a
    forward that clamps them in place: block 1, its stream in its row, block 2, spilled; block
    3: one weight one ulp up) do not match their check, so they are recovered as applied= alone
    recovers them, whatever the log's buffers held before the logging pass; blocks 0 and 4 stay
    exact. Before the check, such a block decoded its stream at shifted positions, into words
    the logging pass had not written: its values changed from run to run."""
    fn = BACKENDS[backend]
    g = torch.Generator().manual_seed(21)
    original = [(0.02 * torch.randn(4 * BLOCK + 77, generator=g)).to(dtype)]
    original[0][2 * BLOCK:2 * BLOCK + 300] = 0.0  # far elements: block 2's stream spills
    keys, ones, scale = [0], torch.ones(1), torch.tensor([EPS])
    outs = []
    for fill in ("constant", "random"):
        rows = n_blocks(original[0].numel())
        log = _buffers(original, words=16, capacity=1 << 12)
        if fill == "random":  # stale words, as a log's buffers hold after earlier passes
            log.regions.copy_(torch.randint(-(1 << 31), 1 << 31, (rows, 16), generator=g))
            log.pool.copy_(torch.randint(-(1 << 31), 1 << 31, (1 << 12,), generator=g))
        tensors = [t.clone() for t in original]
        fn(tensors, keys, [4], scale, ones, "gaussian", "nearest", 4, selector_log=log)
        assert int(log.regions[2, 0]) <= -2 and int(log.regions[1, 0]) >= 0
        tensors[0][BLOCK:3 * BLOCK].clamp_(-0.01, 0.01)  # the forward's writes
        tensors[0].view(torch.int32 if dtype == torch.float32 else torch.int16)[
            3 * BLOCK + 5] += 1
        written = [t.clone() for t in tensors]
        fn(tensors, keys, [4], torch.tensor([0.0]), ones, "gaussian", "nearest", 4,
           applied=scale, held_log=log)
        noise = torch.zeros(original[0].numel())
        perturb_torch([noise], keys, [4], scale, ones, "gaussian", "nearest", 4)
        alone = recover(written[0].float(), noise, dtype).to(dtype)  # recovery without a log
        for b in range(rows):
            part = slice(b * BLOCK, (b + 1) * BLOCK)
            expected = alone[part] if b in (1, 2, 3) else original[0][part]
            assert_bits_equal(tensors[0][part], expected, f"{fill} fill, block {b}")
        outs.append(tensors[0])
    assert not torch.equal(outs[0][BLOCK:3 * BLOCK], original[0][BLOCK:3 * BLOCK])


def test_selector_log_arguments_are_checked_before_any_write():
    tensors = [(0.02 * torch.randn(300)).to(torch.bfloat16)]
    before = tensors[0].clone()
    space = ParameterSpace([("w", tensors[0])], backend="cpu")
    log = SelectorLog()
    space.apply(3, EPS, log=log)
    perturbed = tensors[0].clone()
    with pytest.raises(ValueError, match="applied"):
        space.apply(3, 0.0, held_log=log)
    other = ParameterSpace([("v", torch.zeros(10, dtype=torch.bfloat16))], backend="cpu")
    with pytest.raises(ValueError, match="not written by a pass over these tensors"):
        other.apply(3, 0.0, applied=EPS, held_log=log)
    with pytest.raises(TypeError, match="SelectorLog"):
        space.apply(3, 0.0, applied=EPS, held_log=UndoLog())
    assert_bits_equal(tensors[0], perturbed, "after refused calls")
    space.apply(3, 0.0, applied=EPS, held_log=log)
    assert_bits_equal(tensors[0], before, "restored")


def _net(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64),
                              torch.nn.Linear(64, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.02)
        net[0].bias.zero_()                 # zeros, like LayerNorm biases and LoRA's B
        net[2].bias[::2] = -0.0
        net[2].bias[1::4] = 1e-30
    return net.to(dtype)


def _closure(net, dtype):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 64, generator=g).to(dtype), torch.randn(8, 3, generator=g).to(dtype)
    return lambda: torch.nn.functional.mse_loss(net(x).float(), y.float())


def _step(opt, net, closure) -> None:
    """One step; PseuZO takes forward() and loss_fn(output): the closure is its forward."""
    if isinstance(opt, PseuZO):
        opt.step(lambda: closure().reshape(1), lambda out: out.sum())
    else:
        opt.step(closure)


OPTIMIZERS = {
    "mezo": lambda net, **kw: MeZO(net.named_parameters(), eps=EPS, backend="cpu", **kw),
    "lezo": lambda net, **kw: LeZO(net.named_parameters(), layers=[net[0], net[2], net[3]],
                                   n_active=2, eps=EPS, backend="cpu", **kw),
    "pseuzo": lambda net, **kw: PseuZO(net.named_parameters(), eps=EPS, backend="cpu", **kw),
    "pseuzo-inplace": lambda net, **kw: PseuZO(net.named_parameters(), eps=EPS, backend="cpu",
                                               probe="inplace", **kw)}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lr_zero_steps_leave_every_weight_bit_identical(name, dtype):
    net = _net(dtype)
    opt = OPTIMIZERS[name](net, lr=0.0)
    assert all(isinstance(log, SelectorLog) for pair in opt._logs for log in pair)
    before = snapshot(net)
    closure = _closure(net, dtype)
    for _ in range(3):
        _step(opt, net, closure)
    assert_same(snapshot(net), before, f"{name} lr=0")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_failing_closure_leaves_every_weight_bit_identical(name, dtype, fail_at):
    net = _net(dtype)
    opt = OPTIMIZERS[name](net, lr=1e-3)
    closure = _closure(net, dtype)
    _step(opt, net, closure)  # weights of any pattern after an update (the zeros are now tiny)
    assert_interrupted_step_leaves_weights(lambda c: _step(opt, net, c), net, closure, fail_at,
                                           name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_update_equals_the_update_of_the_unperturbed_weights(dtype):
    """Bit for bit what one dense update pass from the exact theta writes."""
    net = _net(dtype)
    opt = MeZO(net.named_parameters(), lr=1e-2, eps=EPS, backend="cpu", record_trajectory=True)
    before = snapshot(net)
    opt.step(_closure(net, dtype))
    replayed = _net(dtype)
    opt.trajectory.replay(list(replayed.named_parameters()), backend="cpu")
    assert_same(snapshot(net), snapshot(replayed), "step vs replay")
    assert any(not torch.equal(a, b) for a, b in zip(before.values(), snapshot(net).values()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extra_memory_is_at_most_5_percent_of_the_parameters(dtype):
    """N(0, 0.02) weights, eps = 1e-3, default settings: the selector logs (rows and pools,
    both passes' logs) stay under 5% of the parameters' bytes."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.02)
    net = net.to(dtype)
    opt = MeZO(net.parameters(), lr=1e-4, eps=EPS, backend="cpu", probe="inplace")
    x = torch.randn(4, 512).to(dtype)
    for _ in range(3):
        opt.step(lambda: net(x).float().pow(2).mean())
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    assert 0 < opt.extra_memory_bytes <= 0.05 * params, (opt.extra_memory_bytes, params)
    assert opt.extra_memory_bytes >= opt.undo_log_bytes
    assert opt.zo_state["undo_overflows"] == 0


def test_triton_groups_keep_selector_logs_and_restore_exactly():
    """The triton backend has selector logs too (tests/test_selector_triton.py): its groups keep
    them, and an lr = 0 step leaves every weight bit-identical, -0.0 included."""
    net = _net(torch.bfloat16)
    opt = MeZO(net.named_parameters(), lr=0.0, eps=EPS, backend="triton", probe="inplace")
    assert all(type(log) is SelectorLog for pair in opt._logs for log in pair)
    before = snapshot(net)
    opt.step(_closure(net, torch.bfloat16))
    assert_same(snapshot(net), before, "triton lr=0")


TIE_EPS = {torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -12, torch.float32: 2.0 ** -25}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rounding_ties(dtype):
    """Weights in [0.5, 1) moved by half their ulp (rademacher, eps = ulp / 2): every sum is a
    rounding tie, where two weights round to the same value (ties to even). Both backends keep
    the same bits and restore exactly."""
    g = torch.Generator().manual_seed(5)
    original = [(0.5 + 0.5 * torch.rand(3000, generator=g)).to(dtype),
                -(0.5 + 0.5 * torch.rand(1500, generator=g)).to(dtype)]
    keys, ones = [0, 1], torch.ones(2)
    logs = {}
    for name, fn in BACKENDS.items():
        tensors = [t.clone() for t in original]
        log = _buffers(tensors)
        fn(tensors, keys, [2], torch.tensor([TIE_EPS[dtype]]), ones, "rademacher", "nearest", 2,
           selector_log=log)
        fn(tensors, keys, [2], torch.tensor([0.0]), ones, "rademacher", "nearest", 2,
           applied=torch.tensor([TIE_EPS[dtype]]), held_log=log)
        for j, (a, b) in enumerate(zip(tensors, original)):
            assert_bits_equal(a, b, f"{name} tensor {j}")
        logs[name] = _streams(log)
    assert logs["cpu"] == logs["torch"]
    assert any(row[0] == "pool" or any(w not in (0, None, 12345) for w in row[1:])
               for row in logs["cpu"])  # the ties were logged


def _block_words(log: SelectorBuffers, n_words: list[int]) -> list[tuple[bool, list[int]]]:
    """Each block's own words (n_words[b] of them), wherever they are: in its row or the pool
    (whose order of blocks depends on the threads, which large calls use)."""
    out = []
    for b, (header, n) in enumerate(zip(log.regions[:, 0].tolist(), n_words)):
        offset = selector_pool_offset(header)
        words = log.regions[b, 1:1 + n] if offset is None else log.pool[offset:offset + n]
        out.append((offset is None, words.tolist()))
    return out


def _every_pattern(dtype: torch.dtype) -> torch.Tensor:
    """Every 16-bit pattern (NaNs, infinities, zeros, subnormals, every binade's edges); for
    float32 a sample: random bit patterns, and weights of a few binades whose sums with the
    scales of _CRAFTED_SCALES are exact rounding ties."""
    if dtype != torch.float32:
        return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    g = torch.Generator().manual_seed(8)
    raw = torch.randint(-(1 << 31), 1 << 31, (1 << 14,), generator=g, dtype=torch.int64)
    exponent = torch.randint(-8, 2, (3 << 14,), generator=g).float()
    binades = (1 + torch.rand(3 << 14, generator=g)) * torch.exp2(exponent)
    binades[::2] = -binades[::2]
    binades[1::3] = binades[1::3].view(torch.int32).bitwise_and(~0x3FF).view(torch.float32)
    return torch.cat([raw.to(torch.int32).view(torch.float32), binades])


def _crafted_scales(dtype: torch.dtype) -> list[list[float]]:
    """Rademacher scales (d = sum of +-scale per seed): half an ulp of many binades (ties), odd
    multiples of it, the smallest subnormals, N(0, 1)-sized eps, values that flip signs and send
    the largest weights to infinity, and two-seed sums."""
    mantissa = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[dtype]
    exponents = range(-16, 2, 3) if dtype != torch.float16 else range(-14, 16, 3)
    scales = [[2.0 ** (e - mantissa)] for e in exponents]
    scales += [[3 * 2.0 ** (e - mantissa)] for e in exponents[::2]]
    scales += [[2.0 ** -149], [1e-40], [1e-7], [1e-3], [0.7], [3e4], [2.0 ** 127 * 1.5],
               [1e-3, 2.0 ** (-8 - mantissa)], [0.02, 1e-3]]
    return scales


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefilter_is_conservative_on_every_pattern(dtype):
    """The C++ passes prove most bf16 / fp16 elements single candidates from bit patterns alone
    and test only the others exactly (selector_log.h, Keys::single_candidate; float32 tests the
    key neighbours); a test that called an element with several candidates single would write
    fewer bits than the reference (writer) or read the wrong ones (reader). Every 16-bit pattern
    (float32: a sample built around ties) against crafted noise: the C++ log equals the torch
    reference's bit for bit, and a C++ recovering pass reading the reference's log gives back
    every pattern."""
    theta = _every_pattern(dtype)
    rows = n_blocks(theta.numel())
    # a pool for the longest streams (every element far, 32-bit payloads): no block is lost, so
    # the pool's order of blocks (threads) does not decide which are
    capacity = rows * -(-(11 + 3 * BLOCK + 6 + 32 * BLOCK) // 32)
    for k, scales in enumerate(_crafted_scales(dtype)):
        seeds = [100 + k + j for j in range(len(scales))]
        logs, outs = {}, {}
        for name, fn in BACKENDS.items():
            t = theta.clone()
            log = _buffers([t], words=6, capacity=capacity)
            fn([t], [3], seeds, torch.tensor(scales), torch.ones(1), "rademacher", "nearest", 1,
               selector_log=log)
            logs[name], outs[name] = log, t
        finite = torch.isfinite(outs["torch"].float())
        assert_bits_equal(outs["cpu"][finite], outs["torch"][finite], f"{scales}: +d")
        d = torch.zeros(theta.numel())
        perturb_torch([d], [3], seeds, torch.tensor(scales), torch.ones(1), "rademacher",
                      "nearest", 1)
        part = [slice(b * BLOCK, (b + 1) * BLOCK) for b in range(rows)]
        n_words = [-(-int(block_fields(theta[p], outs["torch"][p], d[p])[0].sum()) // 32)
                   for p in part]
        assert _block_words(logs["cpu"], n_words) == _block_words(logs["torch"], n_words), \
            f"{scales}: logs differ"
        assert int(logs["cpu"].count) == int(logs["torch"].count) <= capacity
        back = outs["torch"].clone()
        perturb_cpu([back], [3], seeds, torch.zeros(len(scales)), torch.ones(1), "rademacher",
                    "nearest", 1, applied=torch.tensor(scales), held_log=logs["torch"])
        assert_bits_equal(back, theta, f"{scales}: restore")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_pass_that_keeps_a_weight_logs_what_it_stores(dtype):
    """A pass that reads one log and writes the next with D == 0 (scale 0, decay 1) stores theta's
    exact pattern (-0.0 stays -0.0, not round(-0.0 + 0) = +0.0) and must log that value: its
    reader sees -0.0, whose recovery candidate is -0.0. The chain +eps (L1), scale 0 reading L1
    writing L2, restore reading L2 gives back every pattern, and cpu == torch bit for bit."""
    n = 3 * BLOCK + 17
    g = torch.Generator().manual_seed(3)
    theta = (0.02 * torch.randn(n, generator=g)).to(dtype)
    theta[::3] = -0.0
    theta[1::7] = 0.0
    ones = torch.ones(1)
    runs = {}
    for name, fn in BACKENDS.items():
        t = theta.clone()
        l1, l2 = _buffers([t], words=8), _buffers([t], words=8)
        fn([t], [0], [9], torch.tensor([EPS]), ones, "gaussian", "nearest", 1, selector_log=l1)
        fn([t], [0], [9], torch.tensor([0.0]), ones, "gaussian", "nearest", 1,
           applied=torch.tensor([EPS]), held_log=l1, selector_log=l2)
        assert_bits_equal(t, theta, f"{name}: the scale-0 pass keeps every pattern")
        fn([t], [0], [9], torch.tensor([0.0]), ones, "gaussian", "nearest", 1,
           applied=torch.tensor([0.0]), held_log=l2)
        assert_bits_equal(t, theta, f"{name}: restore from the scale-0 pass's log")
        runs[name] = l2
    assert _streams(runs["cpu"]) == _streams(runs["torch"])
