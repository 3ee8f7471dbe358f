"""Sections that must run to their end once begun: the writes of an update or a restore and the
bookkeeping that says they happened (a step's update, its trajectory record and step counter).

Python raises KeyboardInterrupt from its SIGINT handler between any two bytecodes, so a Ctrl-C in
such a section would leave some weights updated and others still perturbed, or the weights
updated under a step counter that says they were not. Inside `interrupts_deferred()` a SIGINT
is only noted; the handler that was installed runs once the section is over (the default one
then raises KeyboardInterrupt there). The sections run no user code and take one weight pass."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Run the body with SIGINT held back until it ends (reentrant: an inner section hands a
    signal it held to the outer one). Outside the main thread there is nothing to defer: Python
    runs signal handlers in the main thread only. A handler that is not a Python callable
    (SIG_IGN, SIG_DFL, one installed from C) is left in place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    held: list[tuple[int, FrameType | None]] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            previous(*held[0])
