"""Lazy import of the compiled extension ``zokernels._C``.

Importing zokernels never fails because the extension is missing or broken: the import error is
kept and only raised (with diagnostics) when the cpu backend is actually used.
"""

from __future__ import annotations

import importlib
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType

_lock = threading.Lock()
_module: ModuleType | None = None
_error: BaseException | None = None
_tried = False


def _try_import() -> None:
    global _module, _error, _tried
    with _lock:
        if _tried:
            return
        try:
            _module = importlib.import_module("zokernels._C")
        except Exception as exc:  # ImportError, or an OSError/undefined symbol from the loader
            _error = exc
        _tried = True


def cpu_backend_available() -> bool:
    """True if the C++ extension imports in this process. Never raises."""
    _try_import()
    return _module is not None


def _diagnostics() -> str:
    package_dir = Path(__file__).resolve().parents[2]
    candidates = sorted(p.name for p in package_dir.glob("_C*"))
    return "\n".join([
        f"  original error: {type(_error).__name__}: {_error}",
        f"  python: {sys.version.split()[0]} ({sys.executable})",
        f"  platform: {platform.platform()} ({platform.machine()})",
        f"  searched: {package_dir} (found: {', '.join(candidates) or 'no _C* file'})",
        "  rebuild: `pip install .` in the zokernels checkout (or "
        "`python setup.py build_ext --inplace` for a development tree); set "
        "ZOKERNELS_NO_OPENMP=1 if the compiler has no OpenMP.",
    ])


def load_cpu_extension() -> ModuleType:
    """The ``zokernels._C`` module; raises RuntimeError with build diagnostics if unavailable."""
    _try_import()
    if _module is None:
        raise RuntimeError("zokernels: the C++ CPU backend (zokernels._C) could not be loaded.\n"
                           + _diagnostics()) from _error
    return _module


def build_info() -> dict:
    """How the extension was built and what it runs: compiler, OpenMP, SIMD level chosen at
    runtime ("avx512": the AVX2 kernels and the AVX-512 Linear term, "avx2" or "generic";
    ZOKERNELS_CPU_SIMD=avx2 / generic forces those), machine."""
    return dict(load_cpu_extension().build_info())
