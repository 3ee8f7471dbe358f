"""Public ops: validate, group by (device, dtype), dispatch to a backend."""

from .lowrank import FactorDraw, lowrank_perturb_
from .noise import noise
from .perturb import perturb_

__all__ = ["noise", "perturb_", "lowrank_perturb_", "FactorDraw"]
