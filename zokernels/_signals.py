"""Sections that must run to their end once begun: the writes of an update or a restore and the
bookkeeping that says they happened (a step's update, its trajectory record and step counter).

Python raises KeyboardInterrupt from its SIGINT handler between any two bytecodes, so a Ctrl-C in
such a section would leave some weights updated and others still perturbed, or the weights
updated under a step counter that says they were not. Inside `interrupts_deferred()` a first
SIGINT is only noted; the handler that was installed runs once the section is over (the default
one then raises KeyboardInterrupt there). With the default handler a second SIGINT raises at
once: a section that takes long (a first Triton compilation, interpreted kernels) can still be
stopped by pressing twice, at the price of the state the section protects."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_depth = 0  # sections open in the main thread; only the outermost installs a handler


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Run the body with SIGINT held back until it ends. Sections nest (an inner one is part of
    the outer). Outside the main thread there is nothing to defer: Python runs signal handlers
    in the main thread only. A handler that is not a Python callable (SIG_IGN, SIG_DFL, one
    installed from C) is left in place."""
    global _depth
    if _depth or threading.current_thread() is not threading.main_thread():
        yield
        return
    # asked first: a handler installed from C reads as None, and could not be put back
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    held: list[tuple[int, FrameType | None]] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        if held and previous is signal.default_int_handler:  # pressed again: the user insists
            held.clear()
            signal.signal(signal.SIGINT, previous)
            previous(signum, frame)
        elif not held:  # (a handler of the user's runs once, after the section)
            held.append((signum, frame))

    signal.signal(signal.SIGINT, hold)
    _depth += 1
    try:
        yield
    finally:
        try:
            signal.signal(signal.SIGINT, previous)
        finally:  # a signal right after the swap raises here: the count must still drop
            _depth -= 1
        if held:
            previous(*held[0])
