"""The plan's techniques side by side, in worker processes.

A technique's entry (its run at the plan's batch size, then the runs of its largest-batch and
micro-batch searches) depends on nothing but the model, the settings and its own runs, so
``plan_jobs`` plans each group of techniques that share no run (``EntryPlanner.jobs``: each technique
alone, the DiffusionBlocks techniques read off the same db:1 traces together) in a pool of forked
workers (the model spec, with its closures, is already in the forked memory; nothing is pickled but
the entries and measurements coming back). Each worker writes its runs to the trace cache itself;
the plan's process keeps them in memory too. PyTorch keeps one fake-tensor dispatch cache per
process; the workers fork after the model's check (a forward and loss of the model cut to a few
layers) and inherit the entries it made. Until round 6 of issue 28 the plan's process also filled it
with one run of the model cut to a layer, dropped, before it forked: each worker then had the
backward's and the optimizer's entries too. Its serial second bought nothing: alternating in fresh
cache directories, llama-70b was as fast or faster without it in 12 runs of 13 (median 14.8 s against
15.9 s), llama-7b the same (faster in 4 runs of 8 each way), since a worker fills the entries its
first run misses in about the time the dropped run took, and both workers do so at once.
The workers run the same functions on the same inputs, so no byte of any result changes
(tests/test_workers.py).

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
from dbprofile.planner.entries import EntryPlanner, Wanted
from dbprofile.results import PlanEntry
from dbprofile.spec import SpecError

POLL_S = 0.2
"""How often the plan's process looks up from waiting for its workers (so that Ctrl-C reaches it)."""

_job: tuple[EntryPlanner, list[list[Wanted]], int, tuple[bool, int] | None] | None = None
"""The planner, its groups of techniques, the batch size and the searches, set before the workers
fork (they read it from their copy)."""


MIN_CORES = 2
"""Fewer cores than this: no workers by default. On the 2-core development machine, idle, two workers
planned llama-70b in 29.8 s wall against 45.0 s in one process, and llama-7b in 12.7 s against 13.1 s
(docs/planner.md, "What a plan costs now"), before they inherited a filled dispatch cache (module
docstring). (When only the first runs went to workers and each learned its own warm-up, two cost more
than one: 51.0 s against 41.3 s.)"""


def default_workers() -> int:
    """``$DBPROFILE_WORKERS`` if set, else one worker per core this process may use (1, no workers, on
    one core)."""
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


Planned = dict[str, PlanEntry | SpecError]
"""Each technique's entry, or the bad input it met (EntryPlanner.plan_job)."""


def _run(index: int) -> tuple[Planned, dict, dict, dict]:
    assert _job is not None
    planner, jobs, b, searched = _job
    planned = planner.plan_job(jobs[index], b, searched)
    return planned, planner.runs, planner.simulated, planner.state_warmup


def plan_jobs(
    planner: EntryPlanner, jobs: list[list[Wanted]], b: int, searched: tuple[bool, int] | None, workers: int
) -> Planned:
    """Every group's entries (EntryPlanner.plan_job): where two or more groups have runs to make, in up
    to ``workers`` forked processes; else all in this one. Groups read from the cache cost no process."""
    global _job
    pending = [job for job in jobs if not planner.first_run_known(job[0], b)]
    count = min(workers, len(pending))
    if count < 2 or sys.platform != "linux" or "fork" not in multiprocessing.get_all_start_methods():
        return {name: entry for job in jobs for name, entry in planner.plan_job(job, b, searched).items()}
    planned: Planned = {}
    _job = (planner, pending, b, searched)
    pool: Any = multiprocessing.get_context("fork").Pool(count, initializer=_start_worker)
    try:
        results = pool.map_async(_run, range(len(pending)), chunksize=1)
        while not results.ready():
            results.wait(POLL_S)  # a wait with no timeout would not see Ctrl-C
        done = results.get()
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        _job = None
    for entries, runs, simulated, state_warmup in done:
        planned.update(entries)
        planner.keep(runs, simulated, state_warmup)
    for job in jobs:
        if not any(name in planned for name, _, _ in job):
            planned.update(planner.plan_job(job, b, searched))
    return planned
