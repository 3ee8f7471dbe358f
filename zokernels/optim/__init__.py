"""zokernels.optim: ZO optimizers on the fused kernels (MeZO, LeZO, TeZO, PseuZO)."""

from .base import ZOOptimizer
from .lezo import LeZO
from .mezo import MeZO
from .pseuzo import PseuZO
from .tezo import TeZO

__all__ = ["ZOOptimizer", "MeZO", "LeZO", "PseuZO", "TeZO"]
