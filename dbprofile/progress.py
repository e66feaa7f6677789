"""What long work is doing now: builds, warm-ups, tracked and timed steps, fake planning runs,
rank gathering. Computing modules call ``stage("...")``; it goes to the standard ``logging``
logger ``dbprofile`` at DEBUG (``dbprofile -v`` shows it) and to the display the caller
installed with ``reporting(listener)``, if any (the CLI's progress line on stderr). Nothing
here prints: with no listener and logging left unconfigured, a stage costs one function call.

A context variable, not an argument, carries the listener: the stages happen five calls deep
(runner -> measure -> warm-up loop), and threading a callback through every signature of the
measurement code would widen APIs that have nothing to do with display.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar

log = logging.getLogger("dbprofile")

Listener = Callable[[str], None]
_listener: ContextVar[Listener | None] = ContextVar("dbprofile_progress_listener", default=None)


def stage(text: str) -> None:
    """Announce the piece of long work that starts now, e.g. 'db:4 @ batch 8: warm-up (block 2)'."""
    log.debug(text)
    listener = _listener.get()
    if listener is not None:
        listener(text)


@contextlib.contextmanager
def reporting(listener: Listener) -> Iterator[None]:
    """Send every ``stage`` inside the block to ``listener`` as well as to the log."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


def detach() -> None:
    """Stop sending stages to the listener in this context: a forked worker process's stages would
    reach the parent's display from another process (whose drawing thread did not come along)."""
    _listener.set(None)
