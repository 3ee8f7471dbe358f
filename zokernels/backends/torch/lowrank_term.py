"""The term TeZO's virtual probes add to an nn.Linear's output, in torch (the reference)."""

import torch


def lowrank_linear_term_torch(out: torch.Tensor, x: torch.Tensor, u: torch.Tensor,
                              v: torch.Tensor, coef: torch.Tensor) -> None:
    """In place: out += ((x V) diag(coef)) U^T over the last dimension, out (..., m), x (..., n)
    with as many rows, U (m, r), V (n, r) of out's dtype, coef (r,) float32. BLAS calls in out's
    dtype: x V is rounded to it before the scaling and the addmm_ (inner size r)."""
    n, m = v.shape[0], u.shape[0]
    # (x V), N x r, as (V^T x^T)^T: CPU BLAS runs an r-row left operand 1.4-4x faster than an
    # r-column right one in fp32 (docs/tezo.md, "Time"); about even in bf16
    left = (v.t() @ x.reshape(-1, n).t()).t()
    left.mul_(coef)
    if out.is_contiguous():
        out.view(-1, m).addmm_(left, u.t())
    else:
        out.add_((left @ u.t()).view(out.shape))
