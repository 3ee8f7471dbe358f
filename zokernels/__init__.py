"""zokernels: fused Philox-noise kernels for zeroth-order (ZO) fine-tuning.

Public ops:
    noise(numel, seed, key=0, *, offset=0, dist="gaussian", device=None, backend="auto")
    perturb_(tensors, seeds, scales, *, keys=None, decay=1.0, dist="gaussian",
             rounding="nearest", backend="auto")
    lowrank_perturb_(weights, us, vs, taus, *, scale=1.0, decay=1.0, ..., draw=None)
    FactorDraw(seed, u_offsets, v_offsets)     factors the low-rank pass draws from the noise
    available_backends()
    ParameterSpace(params, layers=None, ...)   parameters registered once: .perturb / .update
    UndoLog                                    exact restore of perturbed weights
    Trajectory                                 record / save / load / replay a fine-tune
Optimizers: zokernels.optim (MeZO, LeZO, TeZO, PseuZO).
Sharded parameters (FSDP2 / DTensor / manual): zokernels.sharding (index maps, mark_shard).

The noise contract (docs/noise-contract.md) makes z a pure function of (seed, key, element index),
identical on the triton, cpu and torch backends.
"""

from ._dispatch import available_backends
from ._version import __version__
from .ops import FactorDraw, lowrank_perturb_, noise, perturb_
from .ops.undo import UndoLog
from .space import ParameterSpace
from .trajectory import Trajectory

__all__ = ["noise", "perturb_", "lowrank_perturb_", "FactorDraw", "available_backends",
           "ParameterSpace", "UndoLog", "Trajectory", "__version__"]
