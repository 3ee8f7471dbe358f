"""benchmarks/sass_budget.py: the hot-path walk on synthetic SASS, the counter on a toy kernel whose
SASS is predictable, and one real variant compiled offline for sm_90 (SASS counts are
deterministic for a given triton wheel: no timing is asserted)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import sass_budget as sb  # noqa: E402


def _toolchain_available() -> bool:
    try:
        sb.nvidia_bin("ptxas")
        sb.nvidia_bin("nvdisasm")
        sb.nvidia_bin("cuobjdump")
    except FileNotFoundError:
        return False
    return True


needs_ptxas = pytest.mark.skipif(not _toolchain_available(),
                                 reason="triton's bundled ptxas / nvdisasm / cuobjdump missing")

# A listing in nvdisasm's format: a trip-count guard, a loop holding a libdevice-style slow path
# (a forward branch over an inner loop), a full / tail diamond, the final EXIT and the trap loop.
SYNTHETIC = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   ISETP.GE.AND P0, PT, R8, 0x1, PT ;
        /*0020*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   IMAD R1, R1, R2, RZ ;
        /*0040*/                   FFMA R3, R3, R4, R5 ;
        /*0050*/              @!P1 BRA `(.L_x_2) ;
.L_x_3:
        /*0060*/                   DMUL R6, R6, R6 ;
        /*0070*/                   IADD3 R9, R9, 0x1, RZ ;
        /*0080*/               @P2 BRA `(.L_x_3) ;
.L_x_2:
        /*0090*/                   MUFU.EX2 R3, R3 ;
        /*00a0*/               @P0 BRA `(.L_x_1) ;
.L_x_0:
        /*00b0*/              @!P3 BRA `(.L_x_4) ;
        /*00c0*/              @!P4 LDG.E.U16 R10, desc[UR4][R12.64] ;
        /*00d0*/              @!P5 LDG.E.U16 R11, desc[UR4][R14.64] ;
        /*00e0*/                   BRA `(.L_x_5) ;
.L_x_4:
        /*00f0*/                   LDG.E.128 R16, desc[UR4][R12.64] ;
.L_x_5:
        /*0100*/                   F2F.BF16.F32 R10, R16 ;
        /*0110*/                   STG.E.128 desc[UR4][R12.64], R16 ;
        /*0120*/                   EXIT ;
.L_x_6:
        /*0130*/                   BRA `(.L_x_6);
        /*0140*/                   NOP;
"""


def test_parse_and_blocks():
    instrs, labels = sb.parse_sass(SYNTHETIC)
    assert len(instrs) == 21
    assert labels[".L_x_1"] == 0x30 and labels[".L_x_6"] == 0x130
    assert instrs[2].pred == "@!P0" and instrs[2].target == ".L_x_0"
    starts = [instrs[b.start].addr for b in sb.basic_blocks(instrs, labels)]
    assert starts == [0x00, 0x30, 0x60, 0x90, 0xb0, 0xc0, 0xf0, 0x100, 0x130, 0x140]
    # the inner loop and the outer (source) loop; the trap BRA-to-self is not a loop
    assert sb.loops(instrs, labels) == [(6, 8), (3, 10)]
    assert sb.outermost(sb.loops(instrs, labels)) == [(3, 10)]


def test_hot_path_rules():
    instrs, labels = sb.parse_sass(SYNTHETIC)
    path = sb.hot_path(instrs, labels, has_loop=True)
    rules = [(instrs[k].addr, rule, taken) for k, rule, taken in path.decisions]
    assert rules == [(0x20, "enter-loop", "fall"), (0x50, "slow-path", "jump"),
                     (0xa0, "loop-back", "fall"), (0xb0, "full-block", "jump")]
    walked = sorted(instrs[k].addr for k in path.counts)
    # not walked: the slow path (0x60-0x80), the tail's masked loads (0xc0-0xe0), the trap
    assert walked == [0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x90, 0xa0, 0xb0, 0xf0, 0x100,
                      0x110, 0x120]
    c = sb.count_path(instrs, path)
    assert c["loop"] == {"imad": 1, "int": 0, "fp32": 1, "mufu": 1, "cvt": 0, "mem": 0,
                         "branch": 2, "other": 0}
    assert sum(c["fixed"].values()) == 8
    assert c["fixed"]["mem"] == 2 and c["fixed"]["cvt"] == 1 and c["fixed"]["branch"] == 3


# ptxas's if-converted epilogue: the full block stores unmasked and exits; the tail's masked stores
# follow. An early predicated EXIT (before any store) is not taken.
EPILOGUE = """
        /*0000*/              @P0 EXIT ;
        /*0010*/                   LDG.E.64 R2, desc[UR4][R8.64] ;
        /*0020*/              @P1 STG.E.64 desc[UR4][R8.64], R2 ;
        /*0030*/              @!P1 EXIT ;
        /*0040*/              @!P2 STG.E.U16 desc[UR4][R8.64], R2 ;
        /*0050*/              @!P3 STG.E.U16 desc[UR4][R8.64+0x2], R3 ;
        /*0060*/                   EXIT ;
"""


def test_exit_after_store():
    instrs, labels = sb.parse_sass(EPILOGUE)
    path = sb.hot_path(instrs, labels, has_loop=False)
    assert sorted(instrs[k].addr for k in path.counts) == [0x00, 0x10, 0x20, 0x30]
    assert [(instrs[k].addr, r, t) for k, r, t in path.decisions] == [
        (0x00, "exit-after-store", "fall"), (0x30, "exit-after-store", "exit")]


def test_without_source_loop_the_loops_are_slow_paths():
    instrs, labels = sb.parse_sass(SYNTHETIC)
    path = sb.hot_path(instrs, labels, has_loop=False)
    assert [(instrs[k].addr, r) for k, r, _ in path.decisions][0] == (0x20, "slow-path")
    assert sb.count_path(instrs, path)["loop"] == dict.fromkeys(sb.CLASSES, 0)


def test_op_classes():
    assert sb.op_class("IMAD.WIDE.U32") == "imad"
    assert sb.op_class("LOP3.LUT") == "int"
    assert sb.op_class("FFMA") == "fp32"
    assert sb.op_class("MUFU.LG2") == "mufu"
    assert sb.op_class("I2FP.F32.U32") == "cvt"
    assert sb.op_class("LDG.E.128") == "mem"
    assert sb.op_class("BAR.SYNC.DEFER_BLOCKING") == "branch"


def test_model():
    # the H100 model: 82 instructions per bf16 element -> 48% of a 3.0 TB/s copy
    assert sb.ceiling_pct(82, 4) == pytest.approx(48.2, abs=0.1)
    assert sb.ceiling_pct(82, 8) == 96.4
    assert sb.ceiling_pct(10, 4) == 100.0
    assert sb.ctas_per_sm(122, 8, 9216) == 2
    assert sb.ctas_per_sm(96, 8, 0) == 2  # 3072 registers per warp: 21 warps, 2 CTAs of 8
    assert sb.ctas_per_sm(80, 8, 0) == 3
    assert sb.ctas_per_sm(64, 8, 0) == 4
    assert sb.ctas_per_sm(32, 4, 200 * 1024) == 1  # shared memory bound


# Compiled kernels need a process without TRITON_INTERPRET (conftest sets it for the others): the
# toy is compiled and counted in a subprocess that prints what the test checks.
TOY = r"""
import json, sys, tempfile
sys.path.insert(0, sys.argv[1])
import triton
import triton.language as tl
import sass_budget as sb

@triton.jit(do_not_specialize=["K"])
def _toy(x_ptr, s_ptr, K, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    for k in range(K):
        x = x * tl.load(s_ptr + k) + 1.0
    tl.store(x_ptr + offs, x)

cubin, meta = sb.compile_cubin(_toy, {"x_ptr": "*fp32", "s_ptr": "*fp32", "K": "i32"},
                               {"BLOCK": 512}, {"num_warps": 4})
sass, usage = sb.disassemble(cubin, tempfile.mkdtemp(), "toy")
a = sb.analyze_sass(sass, 4, has_loop=True)
instrs = a["instrs"]
blocks = sb.block_counts(instrs, a["labels"], a["path"])
print(json.dumps({"loop": a["by_class_loop"], "fixed": a["fixed"], "loop_total": a["loop"],
                  "ops": [instrs[k].op for k in sorted(a["path"].counts)],
                  "block_sum": sum(n for _, n, _ in blocks), "regs": usage["regs"],
                  "num_warps": meta["num_warps"]}))
"""


def _compiled_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


@needs_ptxas
def test_counter_on_toy_kernel(tmp_path):
    """A kernel whose hot path is countable by hand: 4 elements per thread (512 at 4 warps), one
    16-byte load and store, and a loop of one FFMA per element and one load of the scale."""
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    proc = subprocess.run([sys.executable, str(script), os.path.join(ROOT, "benchmarks")],
                          capture_output=True, text=True, env=_compiled_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # one iteration of the loop (ptxas also builds an unrolled-by-4 copy for long trip counts,
    # which the walk skips: one seed, one trip): 4 FFMA, 1 load of the scale, the latch; the rest
    # is counter / address arithmetic
    loop = got["loop"]
    assert loop["fp32"] == 4 and loop["mem"] == 1 and loop["branch"] == 1
    assert loop["mufu"] == 0 and loop["cvt"] == 0
    # the block itself: exactly one 16-byte load and one 16-byte store on the path
    ops = got["ops"]
    assert ops.count("LDG.E.128") == 1 and ops.count("STG.E.128") == 1
    assert ops[-1] == "EXIT"
    assert got["regs"] > 0 and got["num_warps"] == 4
    # the per-block counts of --verbose add up to the totals
    assert got["block_sum"] == got["fixed"] + got["loop_total"]


@needs_ptxas
def test_tool_runs_on_one_variant(tmp_path):
    out = tmp_path / "budget.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sass_budget.py"),
                           "--only", "perturb/rademacher/fp32/nearest", "--json", str(out),
                           "--verbose"], capture_output=True, text=True, env=_compiled_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "decisions:" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["triton"] and doc["gpu_model"]["sms"] == 132 and doc["date"] and doc["command"]
    rows = doc["rows"]
    assert [r["variant"] for r in rows] == ["perturb/rademacher/fp32/nearest/K=1",
                                            "perturb/rademacher/fp32/nearest/K=2",
                                            "perturb/rademacher/fp32/nearest/K=14"]
    for r in rows:
        for key in ("variant", "dtype", "dist", "k", "regs", "spills", "instr_per_elem",
                    "instr_per_extra_seed", "ceiling_pct_copy"):
            assert key in r
        assert r["regs"] > 0 and r["instr_per_elem"] > 0 and 0 < r["ceiling_pct_copy"] <= 100
    k1, k2 = rows[0], rows[1]
    assert k2["instr_per_elem"] == pytest.approx(k1["instr_per_elem"]
                                                 + k1["instr_per_extra_seed"], abs=0.02)


@needs_ptxas
def test_budget_of_the_main_passes(tmp_path):
    """The instruction budget the kernels were rewritten to (issue 16; SASS counts are exact for a
    given triton wheel, so a change that breaks the structure shows here): no spills, <= 96
    registers, v2 gaussian bf16 K=1 <= 48 instructions per element and <= 34 per extra seed,
    rademacher <= 4 per extra seed and a K=14 ceiling >= 60% of copy (docs/gpu-performance.md
    has the full table)."""
    out = tmp_path / "budget.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sass_budget.py"),
                           "--only", "perturb/*/bf16/nearest", "--json", str(out)],
                          capture_output=True, text=True, env=_compiled_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    for r in rows.values():
        assert r["regs"] <= 96 and r["spills"] == 0, r["variant"]
    v2 = rows["perturb/gaussian-v2/bf16/nearest/K=1"]
    assert v2["instr_per_elem"] <= 48 and v2["instr_per_extra_seed"] <= 34
    assert rows["perturb/rademacher/bf16/nearest/K=1"]["instr_per_extra_seed"] <= 4.0
    assert rows["perturb/rademacher/bf16/nearest/K=14"]["ceiling_pct_copy"] >= 60.0


@needs_ptxas
def test_budget_of_rounding_and_recovery(tmp_path):
    """What contract 3's integer stochastic rounding and the one-neighbour recovery cost on top
    of a plain v2 gaussian bf16 pass (docs/gpu-performance.md; issue 16 asks <= 8 and <= 15, the
    kernels measure +7.6 (the octet tile and its tail mask: 51.62 - 44.06 = 7.56) and +14.9: the
    SR bound is the measured value), what the out-of-place draw costs on top of the in-place
    pass, and every pass of the family stays at <= 96 registers without spills."""
    out = tmp_path / "budget.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sass_budget.py"),
                           "--only", "perturb/gaussian-v2/bf16/*", "--json", str(out)],
                          capture_output=True, text=True, env=_compiled_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    for r in rows.values():
        assert r["regs"] <= 96 and r["spills"] == 0, r["variant"]
    plain = rows["perturb/gaussian-v2/bf16/nearest/K=1"]["instr_per_elem"]
    sr3 = rows["perturb/gaussian-v2/bf16/stochastic-v3/K=1"]["instr_per_elem"]
    sr1 = rows["perturb/gaussian-v2/bf16/stochastic/K=1"]["instr_per_elem"]
    applied = rows["perturb/gaussian-v2/bf16/nearest/applied/K=1"]["instr_per_elem"]
    assert sr3 - plain <= 7.6 and sr3 < sr1 - 30, (plain, sr3, sr1)
    assert applied - plain <= 21.0, (plain, applied)
    # the out-of-place draw of the virtual probes (sources=): its own source address per program
    # and nothing else (measured +1.38 per element plain, +1.25 mapped; every extra seed the same)
    for suffix in ("", "/mapped"):
        inplace = rows[f"perturb/gaussian-v2/bf16/nearest{suffix}/K=1"]
        source = rows[f"perturb/gaussian-v2/bf16/nearest/source{suffix}/K=1"]
        assert source["instr_per_elem"] - inplace["instr_per_elem"] <= 1.5, (suffix, source)
        assert source["instr_per_extra_seed"] == inplace["instr_per_extra_seed"], suffix
    # shards shifted by whole Philox calls run the plain kernel at shifted counters (measured
    # -0.31 to +0.69 per element over the unsharded pass; the mapped kernel's per-group counters
    # cost +20.2)
    for pass_ in ("nearest", "nearest/applied", "stochastic-v3", "nearest/source"):
        shifted = rows[f"perturb/gaussian-v2/bf16/{pass_}/shifted/K=1"]["instr_per_elem"]
        whole = rows[f"perturb/gaussian-v2/bf16/{pass_}/K=1"]["instr_per_elem"]
        assert shifted - whole <= 1.0, (pass_, whole, shifted)
    mapped = rows["perturb/gaussian-v2/bf16/nearest/mapped/K=1"]["instr_per_elem"]
    assert mapped - rows["perturb/gaussian-v2/bf16/nearest/shifted/K=1"]["instr_per_elem"] >= 15


@needs_ptxas
def test_out_of_place_draws_do_not_spill(tmp_path):
    """Every out-of-place pass (sources=; gaussian and rademacher, bf16 and fp32, plain, mapped
    and shifted) stays at <= 96 registers without spills: the 16-bit rademacher vector tile
    spilled 4 instructions at its in-place block of 16384 and runs at SOURCE_VEC_BLOCK (8192)
    out of place."""
    out = tmp_path / "budget.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sass_budget.py"),
                           "--only", "perturb/*/nearest/source*", "--json", str(out)],
                          capture_output=True, text=True, env=_compiled_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["dist"] for r in rows} == {"gaussian", "rademacher"} and len(rows) == 12 * 3
    for r in rows:
        assert r["regs"] <= 96 and r["spills"] == 0, r["variant"]
