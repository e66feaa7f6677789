"""Writing result files safely: standard JSON (non-finite floats become ``null``), atomic
writes (a temporary file of this process's own, then ``os.replace``), and a lock so that two
runs never write the same output; and where the memory snapshot files are opened."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MEMORY_VIEWER_URL = "https://pytorch.org/memory_viz"
"""PyTorch's viewer for the memory snapshot files --memory-snapshot writes (measure.snapshot) and
the run report links (report.details)."""


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf) replaced by None: standard JSON has
    no NaN, and strict parsers (jq, JavaScript, Go) reject Python's bare ``NaN``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_standard_json(data: Any, indent: int | None = 1) -> str:
    """Standard JSON: non-finite floats become null (``allow_nan=False`` proves none is left)."""
    return json.dumps(json_safe(data), indent=indent, allow_nan=False)


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never a
    part: the text goes to a temporary file of this process's own in the same folder (a
    unique name, so concurrent writers never share one), is flushed to disk, then
    ``os.replace``-d over ``path``. The temporary file is removed if anything fails."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:  # name the file the caller asked for, not a temporary one
        raise OSError(err.errno, err.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp_name, _new_file_mode(path))
        os.replace(tmp_name, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(err, OSError):
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    return path


def _new_file_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


class OutputBusyError(ValueError):
    """Another process holds the lock on this output path."""


@contextlib.contextmanager
def output_lock(path: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on a run's output for as long as the run writes it, so two runs
    given the same ``--out`` never interleave their saves: the second stops at once with
    ``OutputBusyError``. The lock is ``flock`` on ``<path>.lock``, which the kernel releases if
    the process dies, so a killed run never leaves a stale lock; the lock file is removed when
    the run ends. (On platforms without ``fcntl`` no lock is taken.)"""
    try:
        import fcntl
    except ImportError:  # Windows: atomic saves still hold, but concurrent runs are not detected
        yield Path(path)
        return
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputBusyError(
                f"Another dbprofile run (process {holder}) is writing {str(path)!r} right now. Two runs on "
                "one output would overwrite each other's results: wait for it to finish, or give this run "
                "another --out."
            ) from None
        # The holder before us may have removed the lock file between our open and our flock:
        # then we hold a lock on a file nobody else can see, so take the lock again.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield Path(path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)
