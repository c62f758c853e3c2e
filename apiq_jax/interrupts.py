"""Ctrl-C that is never lost: a SIGINT handler that also remembers, and checks at safe points.

Python delivers SIGINT as a ``KeyboardInterrupt`` raised wherever the main thread happens
to be. When that is a garbage-collection callback or a ``__del__`` (JAX runs one after
every collection), the exception is printed as "Exception ignored in ..." and swallowed,
and a long run would go on as if nothing had been pressed. :func:`catch_sigint` installs a
handler that records the request before raising; the long loops (calibration blocks,
finetuning steps, evaluation batches) call :func:`check` between units of work, so a
swallowed interrupt still stops the run at the next boundary, after that unit was saved.

Example:
    >>> from apiq_jax import interrupts
    >>> interrupts.requested()
    False
    >>> interrupts.check()  # nothing pending: returns
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["catch_sigint", "check", "requested"]

_pending = threading.Event()


def requested() -> bool:
    """Whether Ctrl-C was pressed since :func:`catch_sigint` was entered.

    Returns:
        True once a SIGINT arrived (even one whose exception was swallowed).
    """
    return _pending.is_set()


def check() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed; call between units of work.

    Returns:
        None when no interrupt is pending.

    Raises:
        KeyboardInterrupt: a SIGINT arrived (its first exception may have been swallowed).
    """
    if _pending.is_set():
        raise KeyboardInterrupt


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _pending.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def catch_sigint() -> Iterator[None]:
    """Within the block, SIGINT is remembered as well as raised (main thread only).

    A ``KeyboardInterrupt`` swallowed by Python (reported through ``sys.unraisablehook``) is
    not printed: it is remembered, and :func:`check` raises it again.

    Yields:
        None; on exit the previous handler and hook are restored and the request cleared.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _pending.clear()
    previous = signal.signal(signal.SIGINT, _on_sigint)
    previous_hook = sys.unraisablehook

    def quiet_swallowed_interrupt(unraisable: sys.UnraisableHookArgs) -> None:
        # the swallowed KeyboardInterrupt is remembered (check() raises it again): no
        # "Exception ignored ... Traceback" on stderr for it; anything else as before
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and _pending.is_set():
            return
        previous_hook(unraisable)

    sys.unraisablehook = quiet_swallowed_interrupt
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if sys.unraisablehook is quiet_swallowed_interrupt:
            sys.unraisablehook = previous_hook
        _pending.clear()
