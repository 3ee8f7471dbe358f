"""C++ CPU backend: vectorized (AVX2 when available) OpenMP kernels in ``zokernels._C``.

The extension is loaded lazily (see _loader.py), so importing this package always works; the
op functions raise a RuntimeError with build diagnostics if the extension is missing.
"""

from ._loader import build_info, cpu_backend_available, load_cpu_extension
from .lowrank import lowrank_perturb_cpu
from .lowrank_scatter import lowrank_scatter_cpu
from .lowrank_term import lowrank_linear_term_cpu
from .noise import noise_cpu
from .perturb import perturb_cpu
from .philox import philox_cpu
from .scatter import scatter_perturb_cpu

__all__ = ["cpu_backend_available", "load_cpu_extension", "build_info", "philox_cpu", "noise_cpu",
           "perturb_cpu", "scatter_perturb_cpu", "lowrank_perturb_cpu",
           "lowrank_scatter_cpu", "lowrank_linear_term_cpu"]
