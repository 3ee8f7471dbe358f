"""Backend selection: which implementation runs a call, and which ones work in this process."""

from __future__ import annotations

import functools
import importlib
import os

import torch

from ._warn import warn

BACKENDS = ("torch", "cpu", "triton")
BACKEND_CHOICES = ("auto",) + BACKENDS
# Overrides "auto" for every call, e.g. ZOKERNELS_BACKEND=torch to debug against the reference.
BACKEND_ENV = "ZOKERNELS_BACKEND"


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("zokernels.backends.triton")
    except Exception as exc:  # ImportError, or a triton install that fails to initialize
        return f"{type(exc).__name__}: {exc}"
    return None


_cpu_loaded = False  # once the extension loaded, it stays: resolve_backend runs in every op


def _cpu_available() -> bool:
    global _cpu_loaded
    if not _cpu_loaded:
        from .backends.cpu import cpu_backend_available  # never raises: the load error is kept

        _cpu_loaded = cpu_backend_available()
    return _cpu_loaded


def backend_supports(backend: str, device: torch.device) -> str | None:
    """None if `backend` can run on tensors of `device`, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend='cpu' runs on CPU tensors only, got device {device}"
        if not _cpu_available():
            from .backends.cpu import load_cpu_extension

            load_cpu_extension()  # raises with the build diagnostics
        return None
    if backend == "triton":
        error = _triton_import_error()
        if error is not None:
            return f"backend='triton' is not available: {error}"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _triton_interpreted():
            return None
        return (f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
                f"before import), got device {device}")
    raise ValueError(f"backend must be one of {list(BACKEND_CHOICES)}, got {backend!r}")


def available_backends() -> list[str]:
    """The backends that work in this process.

    "torch" always; "cpu" when the C++ extension loaded; "triton" when triton imports and either a
    CUDA device is present or TRITON_INTERPRET=1 (CPU tensors, interpreted).
    """
    names = ["torch"]
    if _cpu_available():
        names.append("cpu")
    if _triton_import_error() is None and (torch.cuda.is_available() or _triton_interpreted()):
        names.append("triton")
    return names


_warned_cpu_fallback = False


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on `device`; raises if it cannot run there."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {list(BACKEND_CHOICES)}, got {backend!r}")
    if backend == "auto":
        override = os.environ.get(BACKEND_ENV, "").strip()
        if override:
            if override not in BACKEND_CHOICES:
                raise ValueError(f"{BACKEND_ENV} must be one of {list(BACKEND_CHOICES)}, "
                                 f"got {override!r}")
            backend = override
    if backend == "auto":
        if device.type == "cuda" and _triton_import_error() is None:
            return "triton"
        if device.type == "cpu":
            if _cpu_available():
                return "cpu"
            global _warned_cpu_fallback
            if not _warned_cpu_fallback:
                _warned_cpu_fallback = True
                warn("zokernels: the C++ CPU extension is not available; falling back to the "
                     "slow torch reference. backend='cpu' raises with the build error.")
        return "torch"
    reason = backend_supports(backend, device)
    if reason is not None:
        raise ValueError(reason)
    return backend


def implementation(backend: str, op: str):
    """The function implementing `op` ("philox", "noise", "perturb", "lowrank_perturb")."""
    module = importlib.import_module(f"zokernels.backends.{backend}")
    return getattr(module, f"{op}_{backend}")
