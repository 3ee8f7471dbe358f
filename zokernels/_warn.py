"""Warnings attributed to the user's line: the first frame outside zokernels and the wrappers
around its calls (torch.optim's step hooks, contextlib), not the library's own line."""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_WRAPPERS = (os.sep + os.path.join("torch", "optim") + os.sep, os.sep + "contextlib.py",
             os.sep + os.path.join("torch", "utils", "_contextlib.py"))


def _internal(filename: str) -> bool:
    return filename.startswith(_PACKAGE) or any(w in filename for w in _WRAPPERS)


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """warnings.warn(message, category) at the first calling frame outside zokernels."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and _internal(os.path.abspath(frame.f_code.co_filename)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
