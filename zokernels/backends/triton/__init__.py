"""Triton backend: one fused kernel per op, one launch per call (see docs/backends.md)."""

from ._common import launch_count, reset_launch_count
from .lowrank import lowrank_perturb_triton
from .lowrank_scatter import lowrank_scatter_triton
from .noise import noise_triton
from .perturb import perturb_triton
from .philox import philox_triton
from .scatter import scatter_perturb_triton

__all__ = ["philox_triton", "noise_triton", "perturb_triton", "lowrank_perturb_triton",
           "lowrank_scatter_triton",
           "scatter_perturb_triton", "launch_count", "reset_launch_count"]
