"""Stopping a run cleanly: a per-technique time limit, and SIGTERM treated like Ctrl-C.

A user's ``build()`` or training step can loop forever; ``time_limit`` raises
``TimeLimitExceeded`` in the main thread when the limit passes (``SIGALRM`` through
``setitimer``), so the runner records the technique as ``timeout`` and moves on. Python
delivers the signal between bytecodes, so a Python loop or a sleep is stopped at once; a
single native op (one huge matmul) is stopped when it returns. Where the exception surfaces
inside a PyTorch callback, PyTorch may re-raise it as a ``RuntimeError``; ``expired`` says
whether the limit, not the model, ended the work. POSIX main thread only: elsewhere (Windows,
a worker thread) no limit is applied.

``sigterm_as_interrupt`` makes ``kill PID`` (and a batch scheduler's stop) go down the same
path as Ctrl-C: the result file is marked incomplete before the process exits.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class TimeLimitExceeded(BaseException):
    """The work inside ``time_limit`` ran past its limit. A BaseException, like
    KeyboardInterrupt: a model's own ``except Exception`` must not swallow it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so the same clean-up runs."""


class TimeLimit:
    """Whether the limit passed (``expired``), and how long it was."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.expired = False


def _can_use_signals() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str) -> Iterator[TimeLimit]:
    """Raise ``TimeLimitExceeded("<what> took longer than N s")`` if the body runs past
    ``seconds`` (None: no limit)."""
    limit = TimeLimit(seconds)
    if seconds is None or not _can_use_signals():
        yield limit
        return

    def expire(_signum, _frame) -> None:
        limit.expired = True
        raise TimeLimitExceeded(f"{what} took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield limit
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the body, SIGTERM raises ``Terminated`` (a KeyboardInterrupt)."""
    if not _can_use_signals():
        yield
        return

    def terminate(_signum, _frame) -> None:
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
