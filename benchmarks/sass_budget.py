"""Instruction budget of the Triton kernels, counted offline from compiled sm_90 SASS.

Every kernel variant the package launches is compiled for sm_90 without a GPU
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``), its cubin disassembled
with the ``nvdisasm`` shipped in the triton wheel, and the instructions on the hot path of a FULL
(non-tail) block counted per element and by class. Usage:

    python benchmarks/sass_budget.py [--only PATTERN] [--json PATH] [--verbose] [--tree CHECKOUT]

Hot path (``hot_path``): the SASS is split into basic blocks (leaders: the entry, branch targets,
the instruction after a branch or EXIT) and walked from the entry. Unconditional branches are
followed.
At a conditional branch the walk decides, by these rules in this order (``--verbose`` prints each
decision and the per-block counts):

1. ``loop-back``: a backward branch closes a loop; its body has been counted once, the walk falls
   through. The kernel's source loops (the seed loop of perturb / scatter, the rank-chunk loop of
   the low-rank kernel, run once for r <= 64, the rank-term loop of the low-rank scatter, run
   r - 1 times) are the outermost loops of the function (loops not nested in another), and
   the instructions walked inside them are reported as the per-iteration count (``per_seed``): K
   seeds cost ``fixed + K * per_seed``. Kernels without a source loop (noise) have none.
2. ``loop-exit``: a forward branch from inside a source loop to past its latch (a rotated loop's
   exit test before an unconditional back edge) is taken once the body has been counted.
   ``enter-loop``: any other forward branch that jumps over a source loop's latch is a trip-count
   guard (K >= 1): the walk falls through, into the loop. ``choose-loop``: when another source loop
   starts at the target (the mapped kernel's two noise paths: one Philox call per 4 / 128
   elements for aligned shards, one per element for odd splits), the walk goes to the shorter loop,
   the grouped path. (ptxas's unrolled copy of a short loop, x4 for long trip counts followed by
   a single-trip loop, is the same shape: the single-trip loop is counted, one seed per trip.)
3. ``slow-path``: a forward branch that jumps over a region containing a CALL or a whole inner loop
   is a libdevice slow path's guard (the Payne-Hanek reduction of sin / cos for |x| > 105615, the
   division's slow path): never taken by the values a kernel produces (Box-Muller's angle is
   < 2 pi), so the walk jumps over the region.
4. ``full-block``: any other forward branch is a block-uniform test (full block vs tail, lost
   elements or not). The two sides are the fall-through region up to the target and, when that
   region ends with an unconditional branch past the target (if / else), the target region up to
   that join. The walk takes the side with fewer predicated global memory instructions (a tail's
   masked accesses are predicated, a full block's are not; a log append is predicated by its
   mask, so a block with no lost element is counted), the fall-through on a tie.
5. ``exit-after-store``: a predicated EXIT after the path has stored (ptxas if-converts the full
   block's unmasked store and exits, leaving the tail's masked stores after the EXIT) ends the
   walk when the code after it holds predicated global memory instructions; an early predicated
   EXIT before any store (the scatter's programs past the log's count) is not taken.

Predicated instructions on the path count as issued. Counts are per thread (one issue slot per warp
instruction), divided by the elements a thread owns in a full block.

Roofline model (H100 SXM): 132 SMs x 128 issue slots per clock x 1.755 GHz ~ 29.7 T thread-instr/s;
copy bandwidth 3.0 TB/s counting read + write; bytes moved per element: 2 x itemsize (bf16 4, fp32
8). ``ceiling_pct_copy`` = min(1, issue-limited rate / memory-limited rate) x 100.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --tree PATH: count the kernels of another checkout (an older commit: before / after tables)
if "--tree" in sys.argv[:-1]:
    ROOT = os.path.abspath(sys.argv[sys.argv.index("--tree") + 1])
    sys.path.insert(0, ROOT)
else:
    try:
        import zokernels  # noqa: F401  (installed, or already on the path)
    except ImportError:  # run from a checkout: its kernels
        sys.path.insert(0, ROOT)

SM_COUNT = 132
ISSUE_PER_CLK = 128
CLOCK_HZ = 1.755e9
COPY_BYTES_PER_S = 3.0e12
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024
GPU_MODEL = {"sms": SM_COUNT, "issue_slots_per_clk_per_sm": ISSUE_PER_CLK, "clock_hz": CLOCK_HZ,
             "copy_bytes_per_s": COPY_BYTES_PER_S, "regs_per_sm": REGS_PER_SM,
             "smem_per_sm": SMEM_PER_SM, "target": "sm_90 (Triton cuda:90)"}

CLASSES = ("imad", "int", "fp32", "mufu", "cvt", "mem", "branch", "other")
_INT_OPS = {"IADD3", "IADD", "IADD32I", "LOP3", "LOP", "LOP32I", "SHF", "SHL", "SHR", "LEA",
            "ISETP", "SEL", "PRMT", "MOV", "MOV32I", "VIADD", "VIADDMNMX", "IABS", "IMNMX",
            "VIMNMX", "POPC", "FLO", "BMSK", "SGXT", "CS2R", "S2R", "S2UR", "R2P", "P2R", "PLOP3",
            "BREV", "IDP", "IDP4A", "UMOV", "UIADD3", "ULEA", "ULOP3", "USHF", "UISETP", "USEL",
            "UPRMT", "USGXT", "UFLO", "UPOPC", "UBREV", "R2UR", "VOTEU", "UP2UR", "UPLOP3",
            "ISCADD", "BFE", "BFI", "IMNMX", "ULOP", "UIMNMX", "VOTE"}
_FP_OPS = {"FADD", "FMUL", "FFMA", "FSETP", "FSEL", "FMNMX", "FCHK", "FADD32I", "FMUL32I",
           "FFMA32I", "FSWZADD", "FSET", "HADD2", "HFMA2", "HMUL2", "HSETP2", "HMNMX2", "DADD",
           "DMUL", "DFMA", "DSETP", "FMNMX3"}
_CVT_OPS = {"F2F", "F2I", "I2F", "I2FP", "F2FP", "FRND", "I2I", "F2IP"}
_MEM_OPS = {"LDG", "STG", "LDS", "STS", "LDC", "ULDC", "LDSM", "STSM", "ATOMG", "ATOM", "RED",
            "REDG", "LDGSTS", "LDL", "STL", "ATOMS", "LD", "ST", "LDGDEPBAR", "UBLKCP", "UTMALDG",
            "CCTL"}
_BRANCH_OPS = {"BRA", "BRX", "BSSY", "BSYNC", "BAR", "EXIT", "WARPSYNC", "CALL", "RET", "NOP",
               "DEPBAR", "YIELD", "JMP", "BREAK", "KILL", "WARPGROUP", "ELECT", "MEMBAR",
               "ERRBAR", "ACQBULK", "SYNCS"}
_GLOBAL_MEM = {"LDG", "STG", "ATOMG", "RED", "REDG", "LDGSTS"}
_STORES = {"STG", "ATOMG", "RED", "REDG"}


def op_class(op: str) -> str:
    base = op.split(".")[0]
    if base.startswith("IMAD"):
        return "imad"
    for name, ops in (("int", _INT_OPS), ("fp32", _FP_OPS), ("cvt", _CVT_OPS), ("mem", _MEM_OPS),
                      ("branch", _BRANCH_OPS)):
        if base in ops:
            return name
    if base == "MUFU":
        return "mufu"
    return "other"


# ---------------------------------------------------------------------------------------------
# SASS parsing, CFG and the hot path
# ---------------------------------------------------------------------------------------------

@dataclass
class Instr:
    addr: int
    pred: str | None  # "@P0", "@!P1", ... or None
    op: str           # full opcode with modifiers, e.g. "LDG.E.128"
    text: str         # operands
    target: str | None = None  # label of a BRA / CALL

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_LABEL = re.compile(r"^\s*([.$\w]+):\s*$")
_TARGET = re.compile(r"`\(([^)]+)\)")


def parse_sass(text: str) -> tuple[list[Instr], dict[str, int]]:
    """Instructions of the (first) function in an nvdisasm listing and its labels -> addresses."""
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _LINE.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        pred = m.group(2).strip() if m.group(2) else None
        op, rest = m.group(3), m.group(4)
        t = _TARGET.search(rest)
        ins = Instr(addr, pred, op, rest, t.group(1) if t and op.split(".")[0] in
                    ("BRA", "CALL", "BSSY", "JMP") else None)
        for lab in pending:
            labels[lab] = addr
        pending = []
        instrs.append(ins)
    return instrs, labels


@dataclass
class Block:
    start: int   # index of the first instruction
    end: int     # index one past the last
    label: str | None = None


@dataclass
class Path:
    counts: dict[int, int] = field(default_factory=dict)  # instruction index -> times on path
    decisions: list[tuple[int, str, str]] = field(default_factory=list)  # (index, rule, taken?)
    loops: list[tuple[int, int]] = field(default_factory=list)  # source loops (head, latch)

    def in_loop(self, k: int) -> bool:
        return any(h <= k <= l for h, l in self.loops)


def _is_branch(ins: Instr) -> bool:
    return ins.base in ("BRA", "BRX", "JMP")


def basic_blocks(instrs: list[Instr], labels: dict[str, int]) -> list[Block]:
    """Leaders: index 0, branch targets, the instruction after a branch / EXIT / RET."""
    index = {ins.addr: k for k, ins in enumerate(instrs)}
    leaders = {0}
    for k, ins in enumerate(instrs):
        if _is_branch(ins) and ins.target in labels:
            leaders.add(index[labels[ins.target]])
        if _is_branch(ins) or ins.base in ("EXIT", "RET"):
            leaders.add(k + 1)
    by_addr = {a: lab for lab, a in labels.items() if lab.startswith((".L", "$"))}
    starts = sorted(x for x in leaders if x < len(instrs))
    return [Block(s, e, by_addr.get(instrs[s].addr))
            for s, e in zip(starts, starts[1:] + [len(instrs)])]


def loops(instrs: list[Instr], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(head, latch) instruction indices of every backward branch (not the trap ``BRA self``
    after the final EXIT)."""
    index = {ins.addr: k for k, ins in enumerate(instrs)}
    out = []
    for k, ins in enumerate(instrs):
        if _is_branch(ins) and ins.target in labels:
            head = index[labels[ins.target]]
            if head < k:
                out.append((head, k))
    return out


def outermost(all_loops: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Loops not nested in another loop: the kernel's own loops (seeds, rank chunks)."""
    return [lp for lp in all_loops
            if not any(o != lp and o[0] <= lp[0] and lp[1] <= o[1] for o in all_loops)]


def _pred_global(instrs: list[Instr], lo: int, hi: int) -> int:
    return sum(1 for ins in instrs[lo:hi] if ins.pred and ins.base in _GLOBAL_MEM)


def hot_path(instrs: list[Instr], labels: dict[str, int], has_loop: bool) -> Path:
    """Walk a full block's path from the entry (rules in the module docstring)."""
    index = {ins.addr: k for k, ins in enumerate(instrs)}
    all_loops = loops(instrs, labels)
    path = Path(loops=outermost(all_loops) if has_loop else [])
    k, steps = 0, 0
    while k < len(instrs):
        steps += 1
        if steps > 100000:
            raise RuntimeError("hot path walk does not terminate")
        ins = instrs[k]
        path.counts[k] = path.counts.get(k, 0) + 1
        if ins.base in ("EXIT", "RET") and ins.pred is None:
            break
        if ins.base == "EXIT":
            end = next((x for x in range(k + 1, len(instrs))
                        if instrs[x].base == "EXIT" and instrs[x].pred is None), len(instrs))
            stored = any(instrs[x].base in _STORES for x in path.counts if x < k)
            if stored and _pred_global(instrs, k + 1, end) > 0:
                path.decisions.append((k, "exit-after-store", "exit"))
                break
            path.decisions.append((k, "exit-after-store", "fall"))
            k += 1
            continue
        if not (_is_branch(ins) and ins.target in labels):
            k += 1
            continue
        t = index[labels[ins.target]]
        if ins.pred is None:
            if t == k:  # the trap loop after the final EXIT
                break
            if t < k and path.counts.get(t, 0) > 0:  # an unconditional back edge: loop once
                path.decisions.append((k, "loop-back", "fall"))
                k += 1
                continue
            k = t
            continue
        if t <= k:
            path.decisions.append((k, "loop-back", "fall"))
            k += 1
            continue
        if any(h <= k <= l < t for h, l in path.loops):
            path.decisions.append((k, "loop-exit", "jump"))
            k = t
            continue
        over = [lp for lp in path.loops if k < lp[1] < t]
        if over:
            after = [lp for lp in path.loops if lp[0] >= t]
            if after and after[0][1] - after[0][0] < over[0][1] - over[0][0]:
                path.decisions.append((k, "choose-loop", "jump"))
                k = t
            else:
                path.decisions.append((k, "enter-loop", "fall"))
                k += 1
            continue
        inner = any(k < h and l < t for h, l in all_loops if (h, l) not in path.loops)
        calls = any(instrs[x].base == "CALL" for x in range(k + 1, t))
        if inner or calls:
            path.decisions.append((k, "slow-path", "jump"))
            k = t
            continue
        last = instrs[t - 1]
        join = t
        if _is_branch(last) and last.pred is None and last.target in labels:
            j = index[labels[last.target]]
            if j > t:
                join = j
        fall_pred = _pred_global(instrs, k + 1, t)
        jump_pred = _pred_global(instrs, t, join)
        if jump_pred < fall_pred:
            path.decisions.append((k, "full-block", "jump"))
            k = t
        else:
            path.decisions.append((k, "full-block", "fall"))
            k += 1
    return path


def count_path(instrs: list[Instr], path: Path) -> dict:
    """Per-thread counts on the path: fixed part, source-loop part (one iteration), by class."""
    fixed = dict.fromkeys(CLASSES, 0)
    loop = dict.fromkeys(CLASSES, 0)
    for k, n in path.counts.items():
        (loop if path.in_loop(k) else fixed)[op_class(instrs[k].op)] += n
    return {"fixed": fixed, "loop": loop}


def block_counts(instrs: list[Instr], labels: dict[str, int], path: Path):
    """(block, instructions walked, by class) for each basic block on the path."""
    out = []
    for b in basic_blocks(instrs, labels):
        by = dict.fromkeys(CLASSES, 0)
        for k in range(b.start, b.end):
            by[op_class(instrs[k].op)] += path.counts.get(k, 0)
        n = sum(by.values())
        if n:
            out.append((b, n, by))
    return out


def verbose_report(instrs: list[Instr], labels: dict[str, int], path: Path) -> str:
    """One line per basic block on the path (source-loop tag, addresses, label, instructions
    walked, by class), then the branch decisions: enough to audit a count against the listing."""
    lines = []
    for b, n, by in block_counts(instrs, labels, path):
        tag = "loop" if path.in_loop(b.start) else "    "
        cls = " ".join(f"{c}={v}" for c, v in by.items() if v)
        lines.append(f"  {tag} {instrs[b.start].addr:06x}-{instrs[b.end - 1].addr:06x} "
                     f"{b.label or '':10s} {n:5d}  {cls}")
    lines.append("  decisions:")
    for k, rule, taken in path.decisions:
        ins = instrs[k]
        lines.append(f"    {ins.addr:06x} {ins.pred} {ins.op} {ins.target}: {rule} -> {taken}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------------

def nvidia_bin(tool: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{tool} not found at {path} (the triton wheel ships it)")
    return path


def compile_cubin(fn, signature: dict, constexprs: dict, options: dict) -> tuple[bytes, dict]:
    """Compile a @triton.jit function for sm_90 without a GPU; pointer arguments are marked
    16-byte aligned (what a launch with torch tensors specializes to)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {name: ("constexpr" if name in constexprs else signature[name]) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in constexprs and sig[name].startswith("*")}
    src = ASTSource(fn, sig, constexprs, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return k.asm["cubin"], {"shared": k.metadata.shared, "num_warps": k.metadata.num_warps}


def disassemble(cubin: bytes, workdir: str, name: str) -> tuple[str, dict]:
    """(SASS listing, resource usage {regs, local, shared_static}) of a cubin."""
    path = os.path.join(workdir, name + ".cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    sass = subprocess.run([nvidia_bin("nvdisasm"), "-c", path], check=True,
                          capture_output=True, text=True).stdout
    res = subprocess.run([nvidia_bin("cuobjdump"), "-res-usage", path], check=True,
                         capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", res)
    usage = {"regs": int(m.group(1)), "stack": int(m.group(2)), "shared_static": int(m.group(3)),
             "local": int(m.group(4))}
    return sass, usage


def ctas_per_sm(regs: int, num_warps: int, shared: int) -> int:
    """Occupancy on an H100 SXM: registers are allocated per warp in units of 256, shared memory
    per CTA plus 1 KB reserved."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (REGS_PER_SM // per_warp) // num_warps
    by_warps = MAX_WARPS_PER_SM // num_warps
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_CTA)
    return max(0, min(by_regs, by_warps, by_smem, MAX_CTAS_PER_SM))


def ceiling_pct(instr_per_elem: float, bytes_per_elem: int) -> float:
    issue = SM_COUNT * ISSUE_PER_CLK * CLOCK_HZ / instr_per_elem  # elements / s
    memory = COPY_BYTES_PER_S / bytes_per_elem
    return round(100.0 * min(1.0, issue / memory), 1)


# ---------------------------------------------------------------------------------------------
# The variants
# ---------------------------------------------------------------------------------------------

_DT = {"fp32": ("fp32", 4), "bf16": ("bf16", 2), "fp16": ("fp16", 2)}


@dataclass
class Variant:
    name: str
    kernel: str
    fn: object
    signature: dict
    constexprs: dict
    options: dict
    dtype: str
    dist: str
    elems: int              # elements per program (full block)
    loop: str               # "seed": K iterations; "fixed": ``iters`` iterations; "none"
    bytes_per_elem: int
    meta: dict = field(default_factory=dict)
    iters: int = 1



def _unused_selector_args(sel_out: int, sel_in: bool) -> list[str]:
    """The selector-log kernel arguments a variant does not use (passed as None: constexpr)."""
    unused = []
    if not sel_out:
        unused += ["out_regions_ptr", "out_words", "out_count_ptr"]
    if sel_out != 1:
        unused += ["out_pool_ptr", "out_capacity"]
    if not sel_in:
        unused += ["in_regions_ptr", "in_words", "in_pool_ptr", "in_capacity"]
    return unused

def perturb_variants(extra=None) -> list[Variant]:
    from zokernels.backends.triton import perturb as P
    out = []
    combos = []
    has_normal = "NORMAL" in P._perturb_kernel.arg_names
    # contract 3's integer stochastic rounding (STOCHASTIC = 2), where the tree has it
    has_integer_sr = hasattr(P, "round_stochastic_integer")
    dists = ["gaussian", "rademacher"] + (["gaussian-v2"] if has_normal else [])
    for dist in dists:
        for dt in ("bf16", "fp16", "fp32"):
            for rounding in (("nearest",) if dt == "fp32" else ("nearest", "stochastic")
                             + (("stochastic-v3",) if has_integer_sr else ())):
                for applied in (False, True):
                    for log in ("none", "log", "count"):
                        combos.append((dist, dt, rounding, applied, log, False))
                # mapped (sharded) variants: the plain update pass only
                combos.append((dist, dt, rounding, False, "none", True))
    has_source = "HAS_SOURCE" in P._perturb_kernel.arg_names
    if has_source:  # out of place (a virtual probe's draw: nearest, its chunks mapped or not)
        for dist in ("rademacher", dists[-1]):  # rademacher's plain pass: the vector tile
            for dt in ("bf16", "fp32"):
                for mapped in (False, True):
                    combos.append((dist, dt, "nearest", False, "source", mapped))
    has_shift = "SHIFTED" in P._perturb_kernel.arg_names
    if has_shift:  # shards at block boundaries: the plain kernel at shifted counters
        combos += [(dists[-1], "bf16", "nearest", False, "none", "shift"),
                   (dists[-1], "fp32", "nearest", False, "none", "shift"),
                   (dists[-1], "bf16", "nearest", True, "none", "shift"),
                   ("rademacher", "bf16", "nearest", False, "none", "shift")]
        if has_integer_sr:
            combos += [(dists[-1], "bf16", "stochastic-v3", False, "none", "shift"),
                       (dists[-1], "bf16", "stochastic-v3", True, "none", "shift")]
        combos += [(dists[-1], "bf16", "nearest", False, "log", "shift"),
                   (dists[-1], "bf16", "nearest", False, "sel_out", "shift"),
                   (dists[-1], "bf16", "nearest", True, "sel_in_out", "shift"),
                   ("rademacher", "bf16", "nearest", True, "sel_in_out", "shift")]
        if has_source:  # a virtual probe's piece at a block boundary
            combos += [(dist, dt, "nearest", False, "source", "shift")
                       for dist in ("rademacher", dists[-1]) for dt in ("bf16", "fp32")]
    has_selector = "SEL_OUT" in P._perturb_kernel.arg_names
    if has_selector:  # selector logs (nearest rounding): the passes of a step
        for dist in dists[1:]:  # rademacher and the current gaussian
            for dt in ("bf16", "fp16", "fp32"):
                for sel in ("sel_out", "sel_in_out", "sel_in") + (("sel_count",) * (dt == "bf16")):
                    combos.append((dist, dt, "nearest", sel != "sel_out" and sel != "sel_count",
                                   sel, False))
    for name_dist, dt, rounding, applied, log, mapped in combos:
        shifted, mapped = mapped == "shift", mapped is True
        dist, normal = ("gaussian", 2) if name_dist == "gaussian-v2" else (name_dist, 1)
        ty, size = _DT[dt]
        sel_out = {"sel_out": 1, "sel_in_out": 1, "sel_count": 2}.get(log, 0)
        sel_in = log in ("sel_in_out", "sel_in")
        log_mode = {"none": 0, "log": 1, "count": 2}.get(log, 0)
        source = log == "source"
        stochastic = {"nearest": 0, "stochastic": 1, "stochastic-v3": 2}[rounding]
        if sel_out or sel_in:
            block = P.block_for(dist, 0, True, selector=True)
        elif hasattr(P, "block_for"):
            block = P.block_for(dist, stochastic,
                                applied or log not in ("none", "source"), mapped, normal, size,
                                log not in ("none", "source"), **({"source": True} if source
                                                                 else {}))
        else:  # the kernels before block_for (the baseline)
            block = P.BLOCK[dist] if not applied and log == "none" else min(P.BLOCK[dist],
                                                                              P.RECOVER_BLOCK)
            if mapped:
                block = min(block, P.MAPPED_BLOCK)
        # schedule_ptr: the seeds' Philox key schedules (absent from older trees: ignored there)
        sig = {"base_ptr": "*" + ty, "table_ptr": "*i64", "seeds_ptr": "*i64",
               "schedule_ptr": "*i64", "decays_ptr": "*fp32", "scales_ptr": "*fp32",
               "applied_ptr": "*fp32", "K": "i32", "index_ptr": "*i64", "values_ptr": "*" + ty,
               "count_ptr": "*i64", "capacity": "i32"}
        const = {"LOG2_P": 3, "BLOCK": block, "DIST": P.DIST_CODES[dist],
                 "STOCHASTIC": stochastic if has_integer_sr else stochastic == 1,
                 "ALIGN": 16 // size,
                 "HAS_APPLIED": applied, "LOG_MODE": log_mode, "MAPPED": mapped,
                 "SOFT_BF16": False}
        if has_normal:
            const["NORMAL"] = normal
        if log_mode != 1:
            const.update(index_ptr=None, values_ptr=None, capacity=None)
        if log_mode == 0:
            const["count_ptr"] = None
        if has_selector:
            sig.update(sel_rows_ptr="*i64", out_regions_ptr="*i32", out_words="i32",
                       out_pool_ptr="*i32", out_capacity="i32", out_count_ptr="*i64",
                       in_regions_ptr="*i32", in_words="i32", in_pool_ptr="*i32",
                       in_capacity="i32")
            const.update(SEL_OUT=sel_out, SEL_IN=sel_in)
            unused = _unused_selector_args(sel_out, sel_in)
            if not (sel_out or sel_in):
                unused.append("sel_rows_ptr")
            const.update({k: None for k in unused})
        if has_shift:
            const["SHIFTED"] = shifted
            if shifted:
                sig["shifts_ptr"] = "*i64"
            else:
                const["shifts_ptr"] = None
        if has_source:
            const["HAS_SOURCE"] = source
            if source:
                sig.update(src_base_ptr="*" + ty, src_offsets_ptr="*i64")
            else:
                const.update(src_base_ptr=None, src_offsets_ptr=None)
        const.update({k: v for k, v in (extra or {}).items() if k in P._perturb_kernel.arg_names})
        name = (f"perturb/{name_dist}/{dt}/{rounding}" + ("/applied" if applied else "")
                + ({"none": "", "log": "/log", "count": "/count_only"}.get(log, "/" + log))
                + ("/mapped" if mapped else "") + ("/shifted" if shifted else ""))
        opts = {"num_warps": P.NUM_WARPS}
        if sel_out or sel_in:
            opts["num_warps"] = (P.SELECTOR_WARPS[dist] if isinstance(P.SELECTOR_WARPS, dict)
                                 else P.SELECTOR_WARPS)
        if hasattr(P, "MAXNREG"):
            opts["maxnreg"] = P.MAXNREG
        out.append(Variant(name, "perturb", P._perturb_kernel, sig, const,
                           opts, dt, dist, block, "seed", 2 * size,
                           {"rounding": rounding, "applied": applied, "log": log,
                            "mapped": mapped, "normal": normal if dist == "gaussian" else None}))
    return out


def noise_variants() -> list[Variant]:
    from zokernels.backends.triton import noise as N
    out = []
    has_normal = "NORMAL" in N._noise_kernel.arg_names
    for name_dist in ("gaussian", "rademacher", "uniform") + (("gaussian-v2",) if has_normal
                                                                else ()):
        dist, normal = ("gaussian", 2) if name_dist == "gaussian-v2" else (name_dist, 1)
        sig = {"out_ptr": "*fp32", "params_ptr": "*i64", "lead": "i64", "numel": "i64"}
        const = {"DIST": N.DIST_CODES[dist], "BLOCK": N.BLOCK[dist]}
        if has_normal:
            const["NORMAL"] = normal
        out.append(Variant(f"noise/{name_dist}/fp32", "noise", N._noise_kernel, sig, const,
                           {"num_warps": N.NUM_WARPS}, "fp32", dist, N.BLOCK[dist], "none", 4))
    return out


def lowrank_variants() -> list[Variant]:
    from zokernels.backends.triton import lowrank as L
    out = []
    combos = [(r, dt, "nearest", False, "none") for r in (8, 16, 64) for dt in ("bf16", "fp32")]
    combos += [(r, "bf16", "stochastic", False, "none") for r in (16, 64)]
    combos += [(r, "bf16", "nearest", True, "none") for r in (16, 64)]
    combos += [(16, "bf16", "nearest", True, "log"), (16, "bf16", "nearest", False, "count")]
    for r, dt, rounding, applied, log in combos:
        ty, size = _DT[dt]
        log_mode = {"none": 0, "log": 1, "count": 2}[log]
        sig = {"w_base_ptr": "*" + ty, "f_base_ptr": "*fp32", "table_ptr": "*i64",
               "decays_ptr": "*fp32", "scale_ptr": "*fp32", "applied_scale_ptr": "*fp32",
               "index_ptr": "*i64", "values_ptr": "*" + ty, "count_ptr": "*i64",
               "capacity": "i32"}
        rk = min(max(16, 1 << (r - 1).bit_length()), L.RK_MAX)
        const = {"LOG2_P": 3, "BM": L.BM, "BN": L.BN, "RK": rk,
                 "STOCHASTIC": rounding == "stochastic", "ROW4": True, "ROWG": True,
                 "VEC": 16 // size,
                 "UV16": True, "KFULL": r % rk == 0,
                 "PRECISION": "tf32x3" if dt == "fp32" else "tf32", "HAS_APPLIED": applied,
                 "LOG_MODE": log_mode, "SOFT_BF16": False}
        if log_mode != 1:
            const.update(index_ptr=None, values_ptr=None, capacity=None)
        if log_mode == 0:
            const["count_ptr"] = None
        const = {k: v for k, v in const.items() if k in L._lowrank_kernel.arg_names}
        name = (f"lowrank/r{r}/{dt}/{rounding}" + ("/applied" if applied else "")
                + ({"none": "", "log": "/log", "count": "/count_only"}.get(log, "/" + log)))
        opts = {"num_warps": L.NUM_WARPS, "enable_fp_fusion": False}
        if hasattr(L, "NUM_STAGES"):
            opts["num_stages"] = L.NUM_STAGES
        out.append(Variant(name, "lowrank", L._lowrank_kernel, sig, const, opts, dt,
                           f"lowrank-r{r}", L.BM * L.BN, "fixed", 2 * size,
                           {"rank": r, "rounding": rounding, "applied": applied, "log": log}))
    return out


def lowrank_selector_variants() -> list[Variant]:
    """The low-rank selector passes (one program per 1024-element log block, P in k order). The
    walk counts each outermost loop once (as the dense selector variants at K = 1): the
    selector bisection (run only by blocks with unresolved lanes) and the rank loop's single-trip
    remainder. ptxas unrolls the rank loop x4: 109 instructions per 4 terms x 4 elements per
    thread (36 LDG, 32 FMUL, 16 FADD, 20 IADD3), i.e. ~6.8 instructions per element per rank
    term, twice with recovery: add (r - 2) x 6.8 (x 2) for rank r."""
    from zokernels.backends.triton import lowrank as L
    if not hasattr(L, "_lowrank_selector_kernel"):
        return []
    out = []
    combos = [(dt, "nearest", sel) for dt in ("bf16", "fp32")
              for sel in ("sel_out", "sel_in_out", "sel_in")]
    combos += [("bf16", "nearest", "sel_count"), ("bf16", "stochastic", "sel_in")]
    for dt, rounding, sel in combos:
        ty, size = _DT[dt]
        sel_out = {"sel_out": 1, "sel_in_out": 1, "sel_count": 2}.get(sel, 0)
        sel_in = sel in ("sel_in_out", "sel_in")
        sig = {"w_base_ptr": "*" + ty, "f_base_ptr": "*fp32", "table_ptr": "*i64",
               "decays_ptr": "*fp32", "scale_ptr": "*fp32", "applied_scale_ptr": "*fp32",
               "R_MAX": "i32", "out_regions_ptr": "*i32", "out_words": "i32",
               "out_pool_ptr": "*i32", "out_capacity": "i32", "out_count_ptr": "*i64",
               "in_regions_ptr": "*i32", "in_words": "i32", "in_pool_ptr": "*i32",
               "in_capacity": "i32"}
        const = {"LOG2_P": 3, "BLOCK": L.SELECTOR_BLOCK,
                 "STOCHASTIC": rounding == "stochastic", "HAS_APPLIED": sel_in,
                 "SEL_OUT": sel_out, "SEL_IN": sel_in, "SOFT_BF16": False}
        const.update({k: None for k in _unused_selector_args(sel_out, sel_in)})
        out.append(Variant(f"lowrank_selector/{dt}/{rounding}/{sel}", "lowrank_selector",
                           L._lowrank_selector_kernel, sig, const,
                           {"num_warps": (L.SELECTOR_WARPS["read" if sel_in else "write"]
                                          if isinstance(L.SELECTOR_WARPS, dict)
                                          else L.SELECTOR_WARPS),
                            "enable_fp_fusion": False,
                            "maxnreg": L.MAXNREG}, dt,
                           "lowrank", L.SELECTOR_BLOCK, "fixed", 2 * size,
                           {"rounding": rounding, "log": sel,
                            "loop": "outermost loops once; rank terms: +6.8 instr/elem each"},
                           iters=1))
    return out


def scatter_variants() -> list[Variant]:
    from zokernels.backends.triton import lowrank_scatter as LS
    from zokernels.backends.triton import scatter as S
    out = []
    has_normal = "NORMAL" in S._scatter_perturb_kernel.arg_names
    for name_dist in ("gaussian", "rademacher") + (("gaussian-v2",) if has_normal else ()):
        dist, normal = ("gaussian", 2) if name_dist == "gaussian-v2" else (name_dist, 1)
        for dt, rounding in (("bf16", "nearest"), ("bf16", "stochastic"), ("fp32", "nearest")):
            ty, size = _DT[dt]
            sig = {"base_ptr": "*" + ty, "table_ptr": "*i64", "seeds_ptr": "*i64",
                   "index_ptr": "*i64", "values_ptr": "*" + ty, "count_ptr": "*i64",
                   "capacity": "i32", "decays_ptr": "*fp32", "scales_ptr": "*fp32", "K": "i32"}
            const = {"LOG2_P": 3, "BLOCK": S.BLOCK, "DIST": S.DIST_CODES[dist],
                     "STOCHASTIC": rounding == "stochastic", "COPY": False, "MAPPED": False,
                     "SOFT_BF16": False}
            if has_normal:
                const["NORMAL"] = normal
            # gathered: index (8 B) + value + the tensor element's write, per entry
            out.append(Variant(f"scatter/{name_dist}/{dt}/{rounding}", "scatter",
                               S._scatter_perturb_kernel, sig, const,
                               {"num_warps": S.NUM_WARPS}, dt, dist, S.BLOCK, "seed",
                               8 + 2 * size, {"rounding": rounding}))
    for dt in ("bf16", "fp32"):
        ty, size = _DT[dt]
        sig = {"w_base_ptr": "*" + ty, "f_base_ptr": "*fp32", "table_ptr": "*i64",
               "index_ptr": "*i64", "values_ptr": "*" + ty, "count_ptr": "*i64",
               "capacity": "i32", "decays_ptr": "*fp32", "scale_ptr": "*fp32", "R_MAX": "i32"}
        const = {"LOG2_P": 3, "BLOCK": LS.BLOCK, "STOCHASTIC": False, "COPY": False,
                 "SOFT_BF16": False}
        # the loop runs once per rank term after the first: r = 16 -> 15 iterations
        out.append(Variant(f"lowrank_scatter/r16/{dt}/nearest", "lowrank_scatter",
                           LS._lowrank_scatter_kernel, sig, const,
                           {"num_warps": LS.NUM_WARPS, "enable_fp_fusion": False}, dt,
                           "lowrank-r16", LS.BLOCK, "fixed", 8 + 2 * size,
                           {"rank": 16, "loop": "one iteration per rank term k = 1 .. r - 1"},
                           iters=15))
    return out


# ---- what-ifs: compiled alternatives that are not the contract, for decisions ----------------

def _whatif_kernels():
    """The rounding step alone on a bf16 block held as a gaussian tile: MODE 0 round to nearest,
    1 the uniform-based stochastic rounding of contracts 1 / 2 (stream-1 uniforms, correctly
    rounded division), 2 contract 3's integer stochastic rounding (16 random bits per element,
    one Philox call per 8 elements), 3 the same rule with 8 random bits per element (one call per
    16 elements; NOT a contract: SR probabilities quantized to 1/256 ulp). Rows' differences give
    the cost of each rounding."""
    import triton
    import triton.language as tl

    from zokernels.backends.triton._common import (load_seed, philox, quads, round_nearest,
                                                   round_stochastic, rounding_tile, tile_lanes)
    try:  # contract 3 (absent from older trees)
        from zokernels.backends.triton._common import (round_stochastic_integer,
                                                       rounding_bits_tile)
    except ImportError:
        round_stochastic_integer = rounding_bits_tile = None

    @triton.jit
    def _whatif_rounding_kernel(x_ptr, seed_ptr, scale, MODE: tl.constexpr,
                                BLOCK: tl.constexpr):
        blk = tl.program_id(0).to(tl.int64)
        ptrs = x_ptr + blk * BLOCK + tile_lanes(0, BLOCK)
        acc = tl.load(ptrs).to(tl.float32) * scale
        seed = load_seed(seed_ptr)
        key = tl.load(seed_ptr + 1).to(tl.uint32)
        if MODE == 0:
            y = round_nearest(acc, tl.bfloat16, False)
        elif MODE == 1:
            y = round_stochastic(acc, rounding_tile(seed, key, blk, 0, BLOCK), tl.bfloat16, False)
        elif MODE == 2:
            y = round_stochastic_integer(acc, rounding_bits_tile(seed, key, blk, 0, BLOCK),
                                         tl.bfloat16, False)
        else:
            g = blk.to(tl.uint64, bitcast=True) * (BLOCK // 16)
            c0 = (g & 0xFFFFFFFF).to(tl.uint32) + tl.arange(0, BLOCK // 16).to(tl.uint32)
            w0, w1, w2, w3 = philox(seed, c0, (g >> 32).to(tl.uint32), key, 1)
            w = tl.reshape(tl.join(tl.join(w0, w1), tl.join(w2, w3)), [BLOCK // 4])  # quad j
            r = quads(w << 8, w, w >> 8, w >> 16) & 0xFF00  # byte m of the quad's word
            y = round_stochastic_integer(acc, r, tl.bfloat16, False)
        tl.store(ptrs, y)

    return _whatif_rounding_kernel, round_stochastic_integer is not None


def whatif_variants() -> list[Variant]:
    try:
        fn, has_integer = _whatif_kernels()
    except ImportError:  # a checkout without these helpers (--tree of an older commit)
        return []
    out = []
    names = ("nearest", "contract-sr", "contract3-sr", "integer-sr-8bit")
    for block in (2048, 4096):
        for mode, name in enumerate(names if has_integer else names[:2]):
            out.append(Variant(f"whatif/rounding/bf16/{name}/block{block}", "whatif", fn,
                               {"x_ptr": "*bf16", "seed_ptr": "*i64", "scale": "fp32"},
                               {"MODE": mode, "BLOCK": block}, {"num_warps": 8, "maxnreg": 96},
                               "bf16", "none", block, "none", 4, {"rounding": name}))
    return out


def all_variants() -> list[Variant]:
    return (perturb_variants() + noise_variants() + lowrank_variants()
            + lowrank_selector_variants() + scatter_variants()
            + whatif_variants())


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

def analyze_sass(sass: str, elems_per_thread: int, has_loop: bool) -> dict:
    """Hot-path counts of a listing, per thread and per element."""
    instrs, labels = parse_sass(sass)
    path = hot_path(instrs, labels, has_loop)
    c = count_path(instrs, path)
    fixed = sum(c["fixed"].values())
    loop = sum(c["loop"].values())
    return {"instrs": instrs, "labels": labels, "path": path, "fixed": fixed, "loop": loop,
            "by_class_fixed": c["fixed"], "by_class_loop": c["loop"],
            "elems_per_thread": elems_per_thread}


def measure(v: Variant, workdir: str, verbose: bool = False) -> list[dict]:
    cubin, meta = compile_cubin(v.fn, v.signature, v.constexprs, v.options)
    sass, usage = disassemble(cubin, workdir, v.name.replace("/", "_"))
    num_warps = meta["num_warps"]
    ept = v.elems // (num_warps * 32)
    a = analyze_sass(sass, ept, v.loop != "none")
    shared = meta["shared"] + usage["shared_static"]
    # STL / LDL on the hot path (a libdevice slow path's local array is not a spill)
    spills = sum(n for k, n in a["path"].counts.items() if a["instrs"][k].base in ("STL", "LDL"))
    base = {"kernel": v.kernel, "dtype": v.dtype, "dist": v.dist, "regs": usage["regs"],
            "spills": spills, "stack_bytes": usage["stack"] + usage["local"],
            "shared_bytes": shared,
            "ctas_per_sm": ctas_per_sm(usage["regs"], num_warps, shared),
            "num_warps": num_warps, "elems_per_program": v.elems, "elems_per_thread": ept,
            "sass_instructions": len(a["instrs"]), **v.meta}
    if verbose:
        print(f"== {v.name}  (per thread; {ept} elements per thread)")
        print(verbose_report(a["instrs"], a["labels"], a["path"]))
    per_seed = a["loop"] / ept
    rows = []
    ks = (1, 2, 14) if v.loop == "seed" and v.kernel == "perturb" else (1,)
    for k in ks:
        trips = k if v.loop == "seed" else v.iters
        n = a["fixed"] + trips * a["loop"]
        by = {c: round((a["by_class_fixed"][c] + trips * a["by_class_loop"][c]) / ept, 2)
              for c in CLASSES}
        per_elem = n / ept
        rows.append({"variant": v.name + (f"/K={k}" if v.loop == "seed" else ""), **base,
                     "k": k, "instr_per_elem": round(per_elem, 2),
                     "instr_per_extra_seed": round(per_seed, 2) if v.loop == "seed" else None,
                     "loop_body_per_elem": round(per_seed, 2) if v.loop != "none" else None,
                     "by_class_per_elem": by,
                     "by_class_per_extra_seed": ({c: round(a["by_class_loop"][c] / ept, 2)
                                                  for c in CLASSES}
                                                 if v.loop == "seed" else None),
                     "bytes_per_elem": v.bytes_per_elem,
                     "ceiling_pct_copy": ceiling_pct(per_elem, v.bytes_per_elem)})
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'variant':58s} {'regs':>4s} {'spill':>5s} {'smem':>6s} {'cta':>3s} "
            f"{'i/elem':>7s} {'+seed':>6s} {'ceil%':>6s}  imad int fp32 mufu cvt mem br oth")
    print(head)
    for r in rows:
        b = r["by_class_per_elem"]
        seed = "" if r["instr_per_extra_seed"] is None else f"{r['instr_per_extra_seed']:.1f}"
        print(f"{r['variant']:58s} {r['regs']:4d} {r['spills']:5d} {r['shared_bytes']:6d} "
              f"{r['ctas_per_sm']:3d} {r['instr_per_elem']:7.1f} {seed:>6s} "
              f"{r['ceiling_pct_copy']:6.1f}  "
              + " ".join(f"{b[c]:.1f}" for c in CLASSES))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="*",
                    help="a variant's name, or an fnmatch pattern / substring of names")
    ap.add_argument("--json", default=None, help="write one row per variant to this path")
    ap.add_argument("--verbose", action="store_true", help="per-block counts and decisions")
    ap.add_argument("--workdir", default=None, help="keep the cubins here (default: a temp dir)")
    ap.add_argument("--tree", default=None,
                    help="import zokernels from this checkout (read before the imports)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launches' default, silenced
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("sass_budget: unset TRITON_INTERPRET (kernels must be compiled)")
    import tempfile

    import triton
    variants = all_variants()
    if any(v.name == args.only for v in variants):
        variants = [v for v in variants if v.name == args.only]
    else:
        pattern = args.only if any(ch in args.only for ch in "*?[") else f"*{args.only}*"
        variants = [v for v in variants if fnmatch.fnmatch(v.name, pattern)]
    if not variants:
        raise SystemExit(f"--only {args.only!r} matches no variant")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        for v in variants:
            rows += measure(v, workdir, args.verbose)
    print_table(rows)
    if args.json:
        doc = {"command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "triton": triton.__version__, "gpu_model": GPU_MODEL, "kernels_from": ROOT,
               "hot_path_rules": "benchmarks/sass_budget.py module docstring", "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
