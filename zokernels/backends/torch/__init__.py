"""Pure-PyTorch reference backend: the noise contract written as tensor code.

Short and obviously correct rather than fast; runs on any device. Every fast path is tested
against it.
"""

from .lowrank import lowrank_perturb_torch
from .lowrank_scatter import lowrank_scatter_torch
from .lowrank_term import lowrank_linear_term_torch
from .noise import noise_torch
from .perturb import perturb_torch
from .philox import philox_torch
from .scatter import scatter_perturb_torch

__all__ = ["philox_torch", "noise_torch", "perturb_torch", "lowrank_perturb_torch",
           "lowrank_scatter_torch", "lowrank_linear_term_torch",
           "scatter_perturb_torch"]
