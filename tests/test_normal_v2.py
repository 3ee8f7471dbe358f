"""Contract v2 normals (docs/noise-contract.md, "v2 normals"): bit-identical on every backend.

The words go straight into each backend's v2 Box-Muller (no Philox in between), so edge words
can be chosen: 0, 0xffffffff, the smallest u, quadrant boundaries, the ends of the residual angle.
"""

import math
import os

import numpy as np
import pytest
import torch

from zokernels._contract import NORMAL_V2_U_OFFSET, NORMAL_V2_U_SCALE, float32_from_bits
from zokernels.backends.torch.noise import fma32, normal_pair_v2, sqrt32

from helpers import assert_bits_equal

try:
    import triton
    import triton.language as tl

    from zokernels.backends.triton._normal import normal_pair_v2 as normal_pair_v2_triton
except ImportError:  # no triton: the triton tests skip
    triton = None
else:
    @triton.jit
    def _pair_kernel(a_ptr, b_ptr, n0_ptr, n1_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        n0, n1 = normal_pair_v2_triton(tl.load(a_ptr + i, mask=mask), tl.load(b_ptr + i, mask=mask))
        tl.store(n0_ptr + i, n0, mask=mask)
        tl.store(n1_ptr + i, n1, mask=mask)

EDGE_WORDS = [0, 1, 2, 3, 255, 256, 257, (1 << 24) - 1, 1 << 24, (1 << 24) + 1, 0x007FFFFF,
              0x00800000, 0x00800001, 0x3FFFFFFF, 0x40000000, 0x40000001, 0x7FFFFFFF, 0x80000000,
              0x80000001, 0xBFFFFFFF, 0xC0000000, 0xC07FFFFF, 0xFFFFFF00, 0xFFFFFF7F, 0xFFFFFF80,
              0xFFFFFFFE, 0xFFFFFFFF]


def _word_pairs(n_random: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (edge, edge) pair, then n_random random pairs; int64 tensors of uint32 values."""
    edge = torch.tensor(EDGE_WORDS, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(0, 1 << 32, (2, n_random), generator=g, dtype=torch.int64)
    return (torch.cat([edge.repeat_interleave(len(edge)), rand[0]]),
            torch.cat([edge.repeat(len(edge)), rand[1]]))


def test_fma32_is_correctly_rounded():
    """Against exact rational arithmetic, including products that need the round-to-odd step."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(1)
    a = torch.randn(3000, generator=g)
    b = torch.randn(3000, generator=g)
    c = torch.randn(3000, generator=g) * torch.pow(2.0, torch.randint(-30, 5, (3000,), generator=g))
    # cases where a * b + c sits next to a float32 midpoint: c = -(a * b) rounded, plus tiny bits
    c[:500] = -(a[:500].double() * b[:500].double()).float() + torch.randn(500, generator=g) * 1e-9
    got = fma32(a, b, c)
    for x, y, z, r in zip(a.tolist(), b.tolist(), c.tolist(), got.tolist()):
        exact = Fraction(x) * Fraction(y) + Fraction(z)
        lo = np.float32(float(exact))
        cands = [np.nextafter(lo, np.float32(-np.inf)), lo, np.nextafter(lo, np.float32(np.inf))]
        best = min(cands, key=lambda q: (abs(Fraction(float(q)) - exact),
                                         int(np.array(q).view(np.int32)) & 1))
        assert r == float(best), (x, y, z, r, float(best))


def test_sqrt32_is_correctly_rounded():
    g = torch.Generator().manual_seed(2)
    y = torch.cat([torch.rand(200_000, generator=g) * 50, torch.rand(10_000, generator=g) * 1e-6,
                   torch.tensor([0.0, 1.0, 2.0, 4.0, 1e-7, 46.0])])
    assert_bits_equal(sqrt32(y), torch.from_numpy(np.sqrt(y.numpy())), "sqrt32 vs numpy sqrt")


def test_accuracy_against_float64_box_muller():
    """Against float64 Box-Muller of the same float32 u and the same angle (what the polynomials
    and roundings cost): relative error of r and of (cos, sin), absolute error of z."""
    wa, wb = _word_pairs(200_000)
    n0, n1 = normal_pair_v2(wa, wb)
    u = fma32(wa.double().float(), torch.tensor(float32_from_bits(NORMAL_V2_U_SCALE)).expand(wa.shape),
              torch.tensor(float32_from_bits(NORMAL_V2_U_OFFSET)).expand(wa.shape)).double()
    assert u.min() >= 2.0 ** -33 and u.max() <= 1 - 2.0 ** -24
    r = torch.sqrt(-2 * torch.log(u))
    v = ((wb & 0x7FFFFF) | 1).double() * 2.0 ** -22 - 1  # (2h + 1) 2^-22 - 1
    th = (wb >> 30).double() * (math.pi / 2) + v * (math.pi / 4)
    z0, z1 = r * torch.cos(th), r * torch.sin(th)
    err = torch.maximum((n0.double() - z0).abs(), (n1.double() - z1).abs())
    assert err.max() < 1e-6, err.max()  # measured 6.9e-7 over 2M random pairs
    rel = err / r
    assert rel.max() < 4e-7, rel.max()  # measured 2.9e-7 (about 5 float32 ulp)
    assert torch.hypot(n0.double(), n1.double()).max() <= math.sqrt(-2 * math.log(2.0 ** -33)) + 1e-5


def test_tails():
    """The smallest u is 2^-33 (word 0): |z| reaches 6.7637; the largest u is 1 - 2^-24."""
    n0, n1 = normal_pair_v2(torch.tensor([0, 0, 0xFFFFFFFF]), torch.tensor([0x00400000, 0x40400000, 0]))
    assert abs(n0[0].item() - 6.7637) < 1e-4 and abs(n1[1].item() - 6.7637) < 1e-4
    assert 0 < n0[2].item() < 1e-3


def test_torch_reference_matches_triton_interpreter():
    if triton is None or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs triton under the interpreter (CPU tensors)")
    wa, wb = _word_pairs(100_000)
    n = wa.numel()
    got0, got1 = torch.empty(n), torch.empty(n)
    _pair_kernel[(triton.cdiv(n, 4096),)](wa.to(torch.uint32), wb.to(torch.uint32), got0, got1, n,
                                          BLOCK=4096)
    want0, want1 = normal_pair_v2(wa, wb)
    assert_bits_equal(got0, want0, "triton n0 vs torch")
    assert_bits_equal(got1, want1, "triton n1 vs torch")


_CPU_SCRIPT = """
import sys, torch
from zokernels.backends.cpu import build_info, load_cpu_extension
wa, wb = torch.load(sys.argv[1])
ra, rb = wa.to(torch.int32).contiguous(), wb.to(torch.int32).contiguous()  # uint32 bit patterns
out = torch.empty(wa.numel(), 2)
load_cpu_extension().normal_pairs_v2(ra.data_ptr(), rb.data_ptr(), out.data_ptr(), wa.numel())
torch.save({"simd": build_info()["simd"], "out": out}, sys.argv[2])
"""


def test_torch_reference_matches_cpu_avx2_and_generic(tmp_path):
    """The C++ Box-Muller alone on the same words, in fresh interpreters with the default SIMD
    path (AVX2 here) and with ZOKERNELS_CPU_SIMD=generic (the exact double-emulated fma)."""
    import pathlib
    import subprocess
    import sys

    import zokernels

    wa, wb = _word_pairs(200_000, seed=3)
    want0, want1 = normal_pair_v2(wa, wb)
    torch.save((wa, wb), tmp_path / "words.pt")
    package_parent = str(pathlib.Path(zokernels.__file__).resolve().parents[1])
    seen = set()
    for simd in ("", "generic"):
        env = dict(os.environ, ZOKERNELS_CPU_SIMD=simd, PYTHONPATH=package_parent)
        out_path = tmp_path / f"out{simd}.pt"
        subprocess.run([sys.executable, "-c", _CPU_SCRIPT, str(tmp_path / "words.pt"),
                        str(out_path)], check=True, env=env, cwd=tmp_path, timeout=300)
        result = torch.load(out_path)
        seen.add(result["simd"])
        assert_bits_equal(result["out"][:, 0].contiguous(), want0, f"cpu {result['simd']} n0")
        assert_bits_equal(result["out"][:, 1].contiguous(), want1, f"cpu {result['simd']} n1")
    assert "generic" in seen


_SASS_SCRIPT = """
import json, os, re, subprocess, sys, tempfile
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from zokernels.backends.triton._normal import normal_pair_v2


@triton.jit
def copy_kernel(a_ptr, b_ptr, n0_ptr, n1_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(n0_ptr + i, tl.load(a_ptr + i).to(tl.float32, bitcast=True))
    tl.store(n1_ptr + i, tl.load(b_ptr + i).to(tl.float32, bitcast=True))


@triton.jit
def pair_kernel(a_ptr, b_ptr, n0_ptr, n1_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    n0, n1 = normal_pair_v2(tl.load(a_ptr + i), tl.load(b_ptr + i))
    tl.store(n0_ptr + i, n0)
    tl.store(n1_ptr + i, n1)


def opcodes(fn):
    sig = {"a_ptr": "*u32", "b_ptr": "*u32", "n0_ptr": "*fp32", "n1_ptr": "*fp32",
           "BLOCK": "constexpr"}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs={"BLOCK": 32}),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([tool, "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    ops = re.findall(r"/\\*[0-9a-f]{4,}\\*/\\s+(?:@!?P\\w+\\s+)?([A-Z][A-Z0-9_.]*)", sass)
    return [op for op in ops if op != "NOP"]


print(json.dumps({"copy": opcodes(copy_kernel), "pair": opcodes(pair_kernel)}))
"""


def test_sm90_instruction_count(tmp_path):
    """One pair per thread, compiled offline for sm_90 (Triton's ptxas and nvdisasm, no GPU):
    the Box-Muller adds 45 instructions to a kernel that only loads two words and stores them
    (40 of arithmetic + 5 constant moves that a loop hoists): about 20 per normal. No branch and
    no call (no libdevice slow paths), one MUFU (the rsqrt of the square root)."""
    import json
    import pathlib
    import subprocess
    import sys

    import zokernels

    if triton is None:
        pytest.skip("needs triton")
    script = tmp_path / "sass_count.py"  # a file: @triton.jit reads the source
    script.write_text(_SASS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(pathlib.Path(zokernels.__file__).resolve().parents[1])
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    try:
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("offline sm_90 compile timed out")
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("this triton has no bundled ptxas")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    copy, pair = result["copy"], result["pair"]
    added = len(pair) - len(copy)
    assert added <= 45, (added, pair)
    assert sum(op.startswith("MUFU") for op in pair) == 1, pair
    assert not any(op.startswith(("CALL", "BSSY", "BSYNC")) for op in pair), pair
    assert sum(op.startswith("BRA") for op in pair) == sum(op.startswith("BRA") for op in copy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_v2_bit_identical_across_backends(dtype):
    """With v2 normals, perturb_ (K = 3 gaussian seeds, fp32 arithmetic, one rounding) gives the
    same bits on the C++ backend as on the torch reference; contract=1 stays available and
    differs."""
    import zokernels

    if "cpu" not in zokernels.available_backends():
        pytest.skip("no C++ extension")
    g = torch.Generator().manual_seed(4)
    base = [(torch.randn(37, 129, generator=g) * 0.02).to(dtype), torch.randn(4097, generator=g).to(dtype)]
    results = {}
    for backend in ("torch", "cpu"):
        for contract in (1, 2):
            tensors = [t.clone() for t in base]
            zokernels.perturb_(tensors, [1, 2 ** 64 - 1, 12345], [1e-3, -2e-3, 5e-4], keys=[7, 8],
                               backend=backend, contract=contract)
            results[backend, contract] = tensors
    for j in range(len(base)):
        assert_bits_equal(results["cpu", 2][j], results["torch", 2][j], f"tensor {j}: cpu vs torch")
    assert not torch.equal(results["torch", 1][0], results["torch", 2][0])


def test_parameter_space_takes_the_contract():
    """ParameterSpace.perturb / apply pass the contract down: v1 and v2 differ, v2 equals noise()
    with v2, and a bad version is refused naming the argument."""
    import zokernels
    from zokernels import ParameterSpace

    w = torch.nn.Parameter(torch.zeros(64, 3))
    space = ParameterSpace([("w", w)])
    space.perturb(9, 1.0, contract=1)
    v1 = w.detach().clone()
    w.data.zero_()
    space.perturb(9, 1.0)
    assert not torch.equal(v1, w.detach())
    key = space.keys[0]
    assert_bits_equal(w.detach().view(-1), zokernels.noise(w.numel(), 9, key, contract=2), "v2")
    w.data.zero_()
    space.perturb(9, 1.0, contract=3)  # v2 normals (3 changes stochastic rounding only)
    assert_bits_equal(w.detach().view(-1), zokernels.noise(w.numel(), 9, key, contract=2), "v3")
    for bad in (0, 4, "v2"):
        with pytest.raises(ValueError, match="contract"):
            space.apply(9, 1.0, contract=bad)
