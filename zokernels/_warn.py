"""Warnings attributed to the user's line: the first frame outside zokernels and the wrappers
around its calls (torch.optim's step hooks, contextlib), not the library's own line."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch.optim
import torch.utils._contextlib

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_OPTIM = os.path.dirname(os.path.abspath(torch.optim.__file__)) + os.sep
_WRAPPER_FILES = frozenset(os.path.abspath(m.__file__)
                           for m in (contextlib, torch.utils._contextlib))


def _internal(frame) -> bool:
    """A frame of zokernels or of a wrapper around its calls. A script run from inside the
    package (`python -m zokernels.bench.cli`) is the user's code; pseudo-files (`<string>`,
    `<frozen runpy>`) are not zokernels', and importlib's frames pass a warning raised while a
    module is imported on to the line that imported it."""
    name = frame.f_code.co_filename
    if "importlib" in name and "_bootstrap" in name:  # an import zokernels' code runs under
        return True
    if name.startswith("<") or frame.f_globals.get("__name__") == "__main__":
        return False
    path = os.path.abspath(name)
    return path.startswith((_PACKAGE, _OPTIM)) or path in _WRAPPER_FILES


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """warnings.warn(message, category) at the first calling frame outside zokernels (the
    outermost frame if every one is inside). Issued for that frame explicitly rather than by a
    stacklevel, which the warnings module counts skipping importlib's frames."""
    frame = sys._getframe(1)
    while frame.f_back is not None and _internal(frame):
        frame = frame.f_back
    # no module_globals (as warnings.warn): a `python -c` script's loader cannot give source
    module_globals = frame.f_globals
    warnings.warn_explicit(message, category, frame.f_code.co_filename, frame.f_lineno,
                           module=module_globals.get("__name__", "<unknown>"),
                           registry=module_globals.setdefault("__warningregistry__", {}))
