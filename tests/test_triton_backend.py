"""Triton-specific properties: one launch per group, z independent of block size and grid."""

import pytest
import torch

import zokernels
from helpers import assert_bits_equal

pytestmark = pytest.mark.skipif("triton" not in zokernels.available_backends(),
                                reason="triton backend not available")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton():
    import zokernels.backends.triton as backend

    return backend


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_one_launch_per_dtype_group(dist):
    backend = _triton()
    tensors = [torch.randn(n, device=DEVICE).to(dtype) for n, dtype in
               [(5, torch.float32), (300, torch.bfloat16), (129, torch.float32), (77, torch.bfloat16),
                (1, torch.float16)]]
    backend.reset_launch_count()
    zokernels.perturb_(tensors, [1, 2, 3], [0.1, 0.2, 0.3], dist=dist, backend="triton")
    assert backend.launch_count() == 3  # float32, bfloat16, float16
    weights = [torch.randn(9, 17, device=DEVICE), torch.randn(33, 5, device=DEVICE)]
    factors = [(torch.randn(9, 4, device=DEVICE), torch.randn(17, 4, device=DEVICE)),
               (torch.randn(33, 2, device=DEVICE), torch.randn(5, 2, device=DEVICE))]
    backend.reset_launch_count()
    zokernels.lowrank_perturb_(weights, [f[0] for f in factors], [f[1] for f in factors],
                               [torch.randn(4, device=DEVICE), torch.randn(2, device=DEVICE)],
                               backend="triton")
    assert backend.launch_count() == 1


@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "uniform"])
def test_noise_independent_of_block_size(monkeypatch, dist):
    from zokernels.backends.triton import noise as noise_module

    reference = zokernels.noise(1500, 3, 9, offset=2 ** 32 + 61, dist=dist, device=DEVICE,
                                backend="triton").cpu()
    for block in (128, 256, 1024):
        monkeypatch.setitem(noise_module.BLOCK, dist, block)
        got = zokernels.noise(1500, 3, 9, offset=2 ** 32 + 61, dist=dist, device=DEVICE,
                              backend="triton").cpu()
        assert_bits_equal(got, reference, f"{dist} BLOCK={block}")


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_perturb_independent_of_block_size(monkeypatch, dist, dtype):
    """Full blocks and tails at several blocks (the plain rademacher pass's vector tile too:
    VEC_BLOCK) give the torch reference's values bit for bit."""
    from zokernels.backends.triton import perturb as perturb_module

    start = [torch.randn(n, device=DEVICE).to(dtype) for n in (1, 1000, 3000)]
    reference = [t.clone() for t in start]
    zokernels.perturb_(reference, [4, 5], [1.0, -0.5], dist=dist, backend="torch")
    for block in (128, 512, 2048, 16384):
        monkeypatch.setitem(perturb_module.BLOCK, dist, block)
        for itemsize in (2, 4):
            monkeypatch.setitem(perturb_module.VEC_BLOCK, itemsize, block)
        got = [t.clone() for t in start]
        zokernels.perturb_(got, [4, 5], [1.0, -0.5], dist=dist, backend="triton")
        for j, (g, r) in enumerate(zip(got, reference)):
            assert_bits_equal(g, r, f"{dist} BLOCK={block} tensor {j}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_plain_rademacher_full_blocks_match_reference(dtype):
    """The plain rademacher pass at its own block (VEC_BLOCK: the vector tile, weights loaded
    after the seed loop): full blocks and a tail, bit for bit against the torch reference."""
    from zokernels.backends.triton.perturb import VEC_BLOCK

    block = VEC_BLOCK[torch.empty(0, dtype=dtype).element_size()]
    start = [torch.randn(n, device=DEVICE).to(dtype) for n in (2 * block + 77, 5)]
    seeds = [2 ** 64 - 1, 3, 0x00000010_FFFFFFF0]
    got = [t.clone() for t in start]
    ref = [t.clone() for t in start]
    zokernels.perturb_(got, seeds, [0.25, -1e-3, 3.0], dist="rademacher", backend="triton",
                       decay=0.5)
    zokernels.perturb_(ref, seeds, [0.25, -1e-3, 3.0], dist="rademacher", backend="torch",
                       decay=0.5)
    for j, (g, r) in enumerate(zip(got, ref)):
        assert_bits_equal(g.cpu(), r.cpu(), f"{dtype} tensor {j}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_octet_tile_stochastic_rounding_full_blocks_match_reference(dtype):
    """Contract 3's stochastic rounding of the gaussian pass in the octet tile (``tile_lanes``
    5: a thread's 8 consecutive elements share one rounding Philox call; bf16 rounds through a
    float32 mask and one select), at its own blocks (with and without recovery): full blocks and
    tails of several tensors, an unaligned view, and sums around the largest finite value (the
    round-to-nearest guard: in range, in the band above it, overflow), bit for bit against the
    torch reference."""
    from zokernels.backends.triton.perturb import block_for

    info = torch.finfo(dtype)
    block = max(block_for("gaussian", 2, False), block_for("gaussian", 2, True))
    sizes = (2 * block + 77, block, 5)
    near_max = torch.tensor([1.0, -1.0, 1 - 2 ** -8, -(1 - 2 ** -7), 0.5, -0.75]) * info.max
    storage = torch.randn(2 * block + 80, device=DEVICE).to(dtype)
    cases = [([torch.randn(n, device=DEVICE).to(dtype) for n in sizes], [1e-2, -3e-3], 0.75),
             ([near_max.to(dtype).repeat(n // 6 + 1)[:n].to(DEVICE) for n in sizes],
              [info.max * 2 ** -8, info.max * 2 ** -10], 1.0),
             ([storage], [1e-2, -3e-3], 0.75)]  # as a view at an odd offset: ALIGN = 1
    for start, scales, decay in cases:
        for kwargs in ({}, {"applied": [0.5, -0.25]}):
            got = [t.clone() for t in start]
            ref = [t.clone() for t in start]
            if start[0] is storage:  # the same elements, contiguous for the reference
                got, ref = [got[0][1:2 * block + 78]], [storage[1:2 * block + 78].clone()]
                assert got[0].data_ptr() % 16 != 0
            for ts, b in ((got, "triton"), (ref, "torch")):
                zokernels.perturb_(ts, [2 ** 64 - 1, 7], scales, dist="gaussian",
                                   rounding="stochastic", rounding_seed=0x00000010_FFFFFFF0,
                                   contract=3, decay=decay, backend=b, check_finite=False,
                                   **kwargs)
            for j, (g, r) in enumerate(zip(got, ref)):
                assert_bits_equal(g.cpu(), r.cpu(), f"{dtype} {scales} {kwargs} tensor {j}")



@pytest.mark.parametrize("rounding_seed", ["seed0", "other"])
def test_octet_tile_tail_mask_matches_reference(rounding_seed):
    """The octet tile's tail mask (``perturb._tail_mask``: element 8 j + m written when
    m < min(rem, BLOCK) - 8 j) at remainders that end inside a column, on a column's last
    element and one past it, with the rounding seed the first seed (what the optimizers pass)
    and another one: bit for bit against the torch reference, and the elements after each
    tensor's end (the same storage) untouched."""
    from zokernels.backends.triton.perturb import block_for

    block = block_for("gaussian", 2, False)
    seeds = [0x00000010_FFFFFFF0, 7]
    rseed = seeds[0] if rounding_seed == "seed0" else 2 ** 64 - 1
    for dtype in (torch.bfloat16, torch.float16):
        for rem in (1, 7, 8, 9, block - 1):
            n = block + rem
            storage = torch.randn(n + 24, device=DEVICE).to(dtype)
            got, ref = storage.clone(), storage.clone()
            zokernels.perturb_([got[:n], got[n + 8:n + 8 + 13]], seeds, [1e-2, -3e-3],
                               dist="gaussian", rounding="stochastic", rounding_seed=rseed,
                               contract=3, decay=0.75, backend="triton")
            zokernels.perturb_([ref[:n], ref[n + 8:n + 8 + 13]], seeds, [1e-2, -3e-3],
                               dist="gaussian", rounding="stochastic", rounding_seed=rseed,
                               contract=3, decay=0.75, backend="torch")
            assert_bits_equal(got.cpu(), ref.cpu(), f"{dtype} rem {rem}")
            assert_bits_equal(got[n:n + 8].cpu(), storage[n:n + 8].cpu(), f"{dtype} rem {rem}")

def test_unaligned_views_are_correct():
    """Views at odd element offsets cannot use the 16-byte alignment hint; results must not change."""
    storage = torch.randn(5000, device=DEVICE)
    views = [storage[1:1000], storage[1003:3000], storage[3001:]]
    copies = [v.clone() for v in views]  # aligned
    zokernels.perturb_(views, 7, 0.5, backend="triton")
    zokernels.perturb_(copies, 7, 0.5, backend="triton")
    for j, (v, c) in enumerate(zip(views, copies)):
        assert_bits_equal(v, c, f"view {j}")



if "triton" in zokernels.available_backends():
    import triton
    import triton.language as tl

    from zokernels.backends.triton._common import (SOFT_BF16, _neighbour, recover_unperturbed,
                                                   round_nearest)

    @triton.jit
    def _neighbour_kernel(rf_ptr, out_ptr, grid_ptr, n, DOWN: tl.constexpr, SOFT: tl.constexpr,
                          BLOCK: tl.constexpr):
        """out = the float32 value of the grid-dtype neighbour of rf (a grid value) toward -inf
        (DOWN) or +inf."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n
        rf = tl.load(rf_ptr + offs, mask=live, other=0.0)
        r = round_nearest(rf, grid_ptr.dtype.element_ty, SOFT)
        down = tl.zeros([BLOCK], tl.int1) | DOWN
        tl.store(out_ptr + offs, _neighbour(r, rf, down, grid_ptr.dtype.element_ty, SOFT),
                 mask=live)

    @triton.jit
    def _recover_kernel(x_ptr, d1_ptr, out_ptr, grid_ptr, n, SOFT: tl.constexpr,
                        BLOCK: tl.constexpr):
        """out = recover_unperturbed(x, d1) on the grid of grid_ptr's dtype."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n
        x = tl.load(x_ptr + offs, mask=live, other=0.0)
        d1 = tl.load(d1_ptr + offs, mask=live, other=0.0)
        tl.store(out_ptr + offs, recover_unperturbed(x, d1, grid_ptr.dtype.element_ty, SOFT),
                 mask=live)


def _assert_kernel_recovers(x, d1, dtype, expected, what: str) -> None:
    """_recover_kernel's result on (x, d1) equals `expected` bit for bit (NaNs as NaNs)."""
    got = torch.empty_like(x, device=DEVICE)
    n = x.numel()
    _recover_kernel[((n + 1023) // 1024,)](x.to(DEVICE), d1.to(DEVICE), got,
                                           torch.empty(1, dtype=dtype, device=DEVICE), n,
                                           SOFT=SOFT_BF16, BLOCK=1024)
    got = got.cpu()
    nan = got.isnan() & expected.isnan()
    assert torch.equal(got.isnan(), expected.isnan()), f"{what}: NaN positions"
    assert_bits_equal(got[~nan], expected[~nan], what)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_recovery_matches_reference_where_a_neighbour_is_needed(dtype):
    """The kernel's recovery tests one neighbour (the one on x's side: round(c + d1) is
    monotonic in c) where the contract lists three candidates; its result must be the contract's
    (the torch reference) bit for bit. r = round(x - d1) itself fits almost always; a neighbour
    is needed only at binade boundaries for a few d1 (found by this sweep: x = +-2^k, the
    smallest normal, zeros, the largest finite, inf, NaN, d1 across +-3 ulp)."""
    from zokernels.backends.torch.rounding import recover

    info = torch.finfo(dtype)
    centres = [1.0, -1.0, 2.0 ** -10, -2.0, 0.5, float(info.tiny), -float(info.tiny), 0.0, -0.0,
               float(info.max), float("inf"), float("nan")]
    xs, d1s = [], []
    for c in centres:
        spacing = float(info.eps) * max(abs(c), float(info.tiny)) if abs(c) < float("inf") else 1.0
        d1 = torch.linspace(-3 * spacing, 3 * spacing, 200_001)
        xs.append(torch.full_like(d1, c).to(dtype).to(torch.float32))
        d1s.append(d1)
    x, d1 = torch.cat(xs), torch.cat(d1s)
    # keep every element that needs a neighbour, and every 97th other one (interpreter time)
    expected = recover(x, d1, dtype)
    needs = (expected != (x - d1).to(dtype).to(torch.float32)) & ~expected.isnan()
    keep = needs | (torch.arange(x.numel()) % 97 == 0)
    x, d1, expected = x[keep], d1[keep], expected[keep]
    _assert_kernel_recovers(x, d1, dtype, expected, f"{dtype} recovery")
    if dtype == torch.float16:  # the sweep holds cases that need next_up / next_down
        assert needs.sum() >= 8, int(needs.sum())


def test_key_schedule_layout():
    """With ``schedule``, the launch table's seeds are followed (16-byte aligned) by each seed's
    Philox-10 key schedule, the rounding seed's last: value r of seed k holds (k0 + r W0,
    k1 + r W1) mod 2^32, low word first; the seeds view is unchanged."""
    from zokernels.backends.triton._common import build_table, cached_table, key_schedule

    seeds = [2 ** 64 - 1, 0, 7, 0x9E3779B97F4A7C15]
    tensors = [torch.randn(300, device=DEVICE)]
    m = 0xFFFFFFFF
    for launch in (build_table(tensors, [1], seeds, 9, 4096, schedule=True),
                   cached_table({}, tensors, [1], seeds, 9, 4096, schedule=True)):
        assert launch.seeds.cpu().tolist() == [-1, 0, 7, 0x9E3779B97F4A7C15 - 2 ** 64, 9]
        assert launch.schedule.data_ptr() % 16 == 0
        got = [v & (2 ** 64 - 1) for v in launch.schedule.cpu().tolist()]
        assert len(got) == 10 * (len(seeds) + 1)  # the rounding seed's last
        for k, s in enumerate(seeds + [9]):
            for r in range(10):
                lo = ((s & m) + r * 0x9E3779B9) & m
                hi = ((s >> 32) + r * 0xBB67AE85) & m
                assert got[10 * k + r] == lo | hi << 32, (k, r)
            assert tuple(got[10 * k:10 * k + 10]) == tuple(v & (2 ** 64 - 1)
                                                           for v in key_schedule(s))
    assert build_table(tensors, [1], seeds, 9, 4096).schedule is None


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_loaded_key_schedule_matches_reference(dist, dtype):
    """Seeds whose key words wrap in the schedule (all ones, zero, a high word near 2^32): the
    kernels that load the schedule give the torch reference's values bit for bit, with and
    without recovery, for shards (index maps) and with contract 3's stochastic rounding (the
    rounding seed's schedule)."""
    seeds = [2 ** 64 - 1, 0, 0xFFFFFFF0_00000010, 0x00000010_FFFFFFF0]
    scales = [0.25, -0.5, 1.0, 0.125]
    applied = [0.5, 0.25, -1.0, 0.0]
    start = [torch.randn(n, device=DEVICE).to(dtype) for n in (1, 700, 4099)]
    for kwargs in ({}, {"applied": applied}, {"index_maps": [None, (3, 100, 300), None]},
                   {"rounding": "stochastic", "rounding_seed": 2 ** 64 - 1, "contract": 3},
                   {"rounding": "stochastic", "rounding_seed": 0x00000010_FFFFFFF0,
                    "contract": 3, "applied": applied}):
        got = [t.clone() for t in start]
        ref = [t.clone() for t in start]
        zokernels.perturb_(got, seeds, scales, dist=dist, backend="triton", **kwargs)
        zokernels.perturb_(ref, seeds, scales, dist=dist, backend="torch", **kwargs)
        for j, (g, r) in enumerate(zip(got, ref)):
            assert_bits_equal(g.cpu(), r.cpu(), f"{dist} {dtype} {kwargs} tensor {j}")


@pytest.mark.parametrize("down", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_neighbour_of_every_16bit_value(dtype, down):
    """The recovery's neighbour step (bf16: 0x10000 on the float32 pattern) against the 16-bit
    sign-magnitude step of the contract for every non-NaN pattern: +-1 away from / toward zero,
    +-tiny for +-0, max <-> inf (NaN patterns and +-inf's outward step, a NaN, are never taken:
    recovery keeps a non-finite r; nor are bf16's +0 down and -0 up)."""
    bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).to(torch.float32)
    keep = ~values.isnan()
    if dtype == torch.bfloat16:
        # bf16 steps by the sign bit: +0 down and -0 up are never taken by the recovery (r = +0
        # implies the direction up, r = -0 with up implies r fits; _neighbour's comment)
        zero_sign = bits.to(torch.int32) & 0x8000
        keep &= ~((values == 0) & ((zero_sign == 0) == down))
    bits, values = bits[keep].to(torch.int32) & 0xFFFF, values[keep]
    away = (values < 0) == down
    expected = torch.where(away, bits + 1, bits - 1)
    expected = torch.where(values == 0, 0x8001 if down else 0x0001, expected)
    expected = expected.to(torch.int16).view(dtype).to(torch.float32)
    got = torch.empty_like(values, device=DEVICE)
    n = values.numel()
    _neighbour_kernel[((n + 1023) // 1024,)](values.to(DEVICE), got,
                                             torch.empty(1, dtype=dtype, device=DEVICE), n,
                                             DOWN=down, SOFT=SOFT_BF16, BLOCK=1024)
    got = got.cpu()
    nan = expected.isnan()  # +-inf stepped outward: a NaN pattern (never taken: r is finite)
    assert torch.equal(got.isnan(), nan), "NaN positions"
    assert_bits_equal(got[~nan], expected[~nan], f"{dtype} down={down}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_recovery_matches_reference_at_exact_ties(dtype):
    """d1 at exact multiples of a quarter / half ulp of x: x - d1 lands on a midpoint of the
    16-bit grid, round-to-even picks the neighbour that does not round back, and the contract's
    neighbour candidate is needed (x = 1, d1 = -2^-8 in bf16: r = 1, the result 1 + 2^-7). Random
    d1 never hit these for bf16; the kernel's neighbour step must still give the reference's
    result there."""
    from zokernels.backends.torch.rounding import recover

    info = torch.finfo(dtype)
    xs, d1s = [], []
    for c in [1.0, -1.0, 2.0, -2.0, 0.5, 2.0 ** -10, float(info.tiny), -float(info.tiny), 0.0,
              -0.0, float(info.max), -float(info.max)]:
        ulp = float(info.eps) * max(abs(c), float(info.tiny))
        for k in range(-12, 13):
            for step in (0.25, 0.5):
                xs.append(c)
                d1s.append(k * step * ulp)
    x = torch.tensor(xs).to(dtype).to(torch.float32)
    d1 = torch.tensor(d1s)
    expected = recover(x, d1, dtype)
    needs = (expected != (x - d1).to(dtype).to(torch.float32)) & ~expected.isnan()
    assert needs.sum() >= 20, int(needs.sum())
    _assert_kernel_recovers(x, d1, dtype, expected, f"{dtype} recovery at ties")


def test_bf16_recovery_near_zero_matches_reference():
    """bf16 recovery around +-0 (r = +-0 from both signs of x - d1, x == d1, d1 = -0, exact
    ties on the subnormal grid): the neighbour step by the sign bit (no zero case) gives the
    reference's result bit for bit."""
    from zokernels.backends.torch.rounding import recover

    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(1)
    n = 60_000
    x = torch.randint(-8, 9, (n,), generator=g).float() * 2.0 ** -133  # subnormal multiples
    x = x.to(dtype).to(torch.float32)
    x[::7] = -0.0
    x[1::7] = 0.0
    d1 = torch.randint(-4096, 4097, (n,), generator=g).float() * 2.0 ** -145
    d1[::11] = x[::11]
    d1[2::13] = -0.0
    d1[3::17] = -d1[3::17] * 2.0 ** 20  # large d1: r = -round(d1), far from zero
    expected = recover(x, d1, dtype)
    assert ((x - d1).to(dtype) == 0).sum() > 1000  # r = +-0 is exercised
    _assert_kernel_recovers(x, d1, dtype, expected, "bf16 recovery near zero")


def test_bf16_recovery_keeps_an_infinite_r():
    """x = max - ulp, d1 = -3 * 2^119: r = round(x - d1) = inf, and its neighbour max does round
    back to x (a tie to even), yet the contract keeps the non-finite r: the finiteness guard."""
    from zokernels.backends.torch.rounding import recover

    dtype = torch.bfloat16
    top = torch.tensor([torch.finfo(dtype).max]).to(dtype).view(torch.int16)
    below = float((top - 1).view(dtype))  # max - ulp
    x = torch.tensor([below, -below])
    d1 = torch.tensor([-3 * 2.0 ** 119, 3 * 2.0 ** 119])
    expected = recover(x, d1, dtype)
    assert torch.isinf(expected).all()
    _assert_kernel_recovers(x, d1, dtype, expected, "bf16 recovery, infinite r")


def test_perturb_triton_rejects_no_seeds():
    """The recovering kernel assumes K >= 1 (tl.assume): the backend entry rejects K = 0 itself,
    not only the public API's seed validation."""
    backend = _triton()
    t = torch.zeros(8, dtype=torch.bfloat16, device=DEVICE)
    empty = torch.zeros(0, device=DEVICE)
    with pytest.raises(ValueError, match="at least one seed"):
        backend.perturb_triton([t], [1], [], empty, torch.ones(1, device=DEVICE), "gaussian",
                               "nearest", 0, applied=empty)
