"""How a technique's failure is kept as its measurement's result: a real out-of-memory or the
tracker's memory limit is ``oom`` (with the batch size tried), anything else the step raised is
``error`` (the technique and the model's message); and what a finished technique held is
released before the next one starts."""

from __future__ import annotations

import gc

import torch

from dbprofile.measure.tracking import MemoryLimitExceeded
from dbprofile.results import Measurement


def is_out_of_memory(err: BaseException) -> bool:
    """A real allocator OOM, or the tracker's memory limit."""
    if isinstance(err, MemoryLimitExceeded):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(err, oom_type):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def record_failure(m: Measurement, err: BaseException) -> None:
    """File a failed step in ``m``: ``oom`` (with the batch size tried) or ``error`` (the technique
    and the model's message)."""
    if is_out_of_memory(err):
        m.status, m.error = "oom", f"out of memory at batch size {m.batch_size}: {err}"
    elif isinstance(err, SystemExit):
        m.status, m.error = "error", f"{m.technique}: the model's code called sys.exit({err.code!r})"
    else:
        m.status, m.error = "error", f"{m.technique}: {type(err).__name__}: {err}"


def free_memory(dev: torch.device | str) -> None:
    """Release what a finished technique held before the next one starts."""
    gc.collect()
    if torch.device(dev).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
