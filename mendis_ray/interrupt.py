"""Ctrl-C that is never lost.

Python's default SIGINT handler raises ``KeyboardInterrupt`` wherever the main thread is.
When that is inside a callback whose exceptions Python ignores (the ``logging`` module's
at-fork hook while Ray starts its processes, a ``__del__``), the exception is printed as
"Exception ignored in ..." and the run goes on as if nothing had been pressed: measured,
``mendis score`` then finished and exited 0.  :func:`catching` installs a handler that
also *records* the interrupt, so the command checks :func:`pending` at its end (and where
it commits results) and stops there instead.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["catching", "pending"]

_PENDING = threading.Event()


def _handler(signum, frame) -> None:
    _PENDING.set()
    raise KeyboardInterrupt


def pending() -> bool:
    """True once Ctrl-C was pressed in the current :func:`catching` body (whether or not
    the ``KeyboardInterrupt`` reached the command)."""
    return _PENDING.is_set()


@contextlib.contextmanager
def catching() -> Iterator[None]:
    """Record Ctrl-C for the body (main thread only; elsewhere a no-op); the previous
    handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _PENDING.clear()
    previous = signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _PENDING.clear()  # read inside the body only
