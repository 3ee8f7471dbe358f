"""TeZO's virtual-probe term for an nn.Linear on the CPU (csrc/lowrank_term.cpp)."""

import math

import torch

from ..._validate import spans_overlap
from ._codes import DTYPE_CODES
from ._loader import load_cpu_extension


def lowrank_linear_term_cpu(out: torch.Tensor, x: torch.Tensor, u: torch.Tensor,
                            v: torch.Tensor, coef: torch.Tensor) -> None:
    """In place: out += ((x V) diag(coef)) U^T over the last dimension, as
    lowrank_linear_term_torch, in one pass over out: float32 arithmetic (fused multiply-adds on
    AVX2), out rounded to nearest once. Needs CPU tensors, out contiguous, x, U, V of out's dtype
    (float32, bfloat16, float16), U and V contiguous, coef float32 contiguous (ValueError
    otherwise; the probes' hook checks first and takes the reference when one fails)."""
    if u.dim() != 2 or v.dim() != 2 or coef.dim() != 1:
        raise ValueError(f"lowrank_linear_term_cpu: u, v must be 2-D and coef 1-D, got shapes "
                         f"{tuple(u.shape)}, {tuple(v.shape)}, {tuple(coef.shape)}")
    n, m, r = v.shape[0], u.shape[0], u.shape[1]
    dtype = out.dtype
    # is_cpu and the contiguity flags are cheap attribute reads: this runs in every probe hook
    if dtype not in DTYPE_CODES or x.dtype != dtype or u.dtype != dtype or v.dtype != dtype:
        raise ValueError(f"lowrank_linear_term_cpu: out, x, u, v must share a float dtype, got "
                         f"{dtype}, {x.dtype}, {u.dtype}, {v.dtype}")
    if not (out.is_cpu and x.is_cpu and u.is_cpu and v.is_cpu and coef.is_cpu):
        raise ValueError("lowrank_linear_term_cpu: every tensor must be on the CPU")
    if not (out.is_contiguous() and u.is_contiguous() and v.is_contiguous()
            and coef.is_contiguous() and coef.dtype == torch.float32):
        raise ValueError("lowrank_linear_term_cpu: out, u, v, coef must be contiguous (coef "
                         "float32)")
    if (v.shape[1] != r or coef.shape[0] != r or out.dim() == 0 or x.dim() == 0
            or out.shape[-1] != m or x.shape[-1] != n):
        raise ValueError(f"lowrank_linear_term_cpu: shapes do not match: out {tuple(out.shape)}, "
                         f"x {tuple(x.shape)}, u {tuple(u.shape)}, v {tuple(v.shape)}, coef "
                         f"{tuple(coef.shape)}")
    count = math.prod(x.shape[:-1])
    if count != math.prod(out.shape[:-1]):
        raise ValueError(f"lowrank_linear_term_cpu: x has {count} rows, out "
                         f"{math.prod(out.shape[:-1])}")
    if count == 0 or n == 0 or m == 0:
        return  # nothing to add (x V is zero, or out is empty)
    rows = x if x.is_contiguous() else x.reshape(-1, n)  # contiguous: read in place
    if rows is not x and (rows.stride(1) != 1 or (count > 1 and rows.stride(0) < n)):
        rows = rows.contiguous()  # e.g. expanded
    if spans_overlap(rows, out):
        rows = rows.clone()  # blocks read x's rows while others' are written: read a copy
    row_stride = n if rows.is_contiguous() or count == 1 else rows.stride(0)  # one row: any
    load_cpu_extension().lowrank_linear_term(
        out.data_ptr(), m, rows.data_ptr(), row_stride, count, n, m, r, u.data_ptr(),
        v.data_ptr(), coef.data_ptr(), DTYPE_CODES[dtype], torch.get_num_threads())
