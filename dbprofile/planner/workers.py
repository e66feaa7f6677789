"""The plan's independent fake runs side by side, in worker processes.

Every technique's run at the plan's batch size depends on nothing but the model and the settings,
so ``prefetch`` runs them in a pool of forked workers (the model spec, with its closures, is already
in the forked memory; nothing is pickled but the measurements coming back) and keeps each as the
planner would have (in memory and in the trace cache). The searches that follow (largest batch,
accumulation) depend on those results and stay in the plan's process. The workers run the same
functions on the same inputs, so no byte of any result changes (tests/test_workers.py).

Workers ignore Ctrl-C: the plan's process gets it, terminates the pool and waits for it, so no
worker outlives an interrupted plan. Where ``fork`` is not available (Windows, or macOS where it is
unsafe), or with one core, the runs stay in the plan's process.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from typing import Any

from dbprofile import progress
from dbprofile.planner.entries import EntryPlanner, FirstRun
from dbprofile.results import Measurement
from dbprofile.spec import SpecError

POLL_S = 0.2
"""How often the plan's process looks up from waiting for its workers (so that Ctrl-C reaches it)."""

_job: tuple[EntryPlanner, list[FirstRun]] | None = None
"""The planner and its runs, set before the workers fork (they read it from their copy)."""


MIN_CORES = 4
"""Fewer cores than this: no workers by default. On the 2-core development machine two workers took
more CPU than one process (each worker learns on its own which warm-up a model needs, so each tries
once where one process tries once per plan) and more wall time: llama-7b 51.0 s against 41.3 s
(load average 1.1-1.2), llama-70b 77.6 s against 71.0 s (load 1.2-2.6; docs/planner.md)."""


def default_workers() -> int:
    """``$DBPROFILE_WORKERS`` if set, else one worker per core this process may use when it has at
    least MIN_CORES of them, else 1 (no workers)."""
    explicit = os.environ.get("DBPROFILE_WORKERS", "").strip()
    if explicit.isdigit() and int(explicit) >= 1:
        return int(explicit)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return cores if cores >= MIN_CORES else 1


def _start_worker() -> None:
    # Ctrl-C is the plan's to handle; the pool's terminate() (SIGTERM) ends a worker quietly; the
    # plan's progress display (drawn by a thread of the plan's process) is not the worker's.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    progress.detach()


def _run(index: int) -> Measurement | None:
    assert _job is not None
    planner, runs = _job
    try:
        return planner.run_first(runs[index])
    except SpecError:
        return None  # bad input: the plan's own process meets it again and says so


def prefetch(planner: EntryPlanner, runs: list[FirstRun], workers: int) -> int:
    """Run ``runs`` in up to ``workers`` processes and keep their measurements in ``planner``; the
    number of worker processes used (0: none, the runs are left to the plan)."""
    global _job
    count = min(workers, len(runs))
    if count < 2 or sys.platform != "linux" or "fork" not in multiprocessing.get_all_start_methods():
        return 0
    _job = (planner, runs)
    pool: Any = multiprocessing.get_context("fork").Pool(count, initializer=_start_worker)
    try:
        pending = pool.map_async(_run, range(len(runs)), chunksize=1)
        while not pending.ready():
            pending.wait(POLL_S)  # a wait with no timeout would not see Ctrl-C
        results = pending.get()
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        _job = None
    for run, m in zip(runs, results):
        if m is not None:
            planner.keep_first(run, m)
    return count
