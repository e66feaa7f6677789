"""The plan's first fake runs in worker processes (dbprofile.planner.workers): the same bytes as in
one process, and no worker left behind."""

from __future__ import annotations

import multiprocessing

from dbprofile.models import get_preset
from dbprofile.planner import plan


def _figures(p):
    return [(e.technique, e.peak_bytes, e.shares, e.training_flops, e.corrections, e.peak_block) for e in p.entries]


def test_workers_give_the_same_plan_as_one_process_and_leave_none_behind():
    spec = get_preset("llama-tiny").at_depth(4)
    kwargs = dict(device="H100-80GB", techniques=["e2e", "ckpt", "db:2"], search_max_batch=False, cache=False)
    alone = plan(spec, 2, workers=1, **kwargs)
    side_by_side = plan(spec, 2, workers=2, **kwargs)
    assert _figures(side_by_side) == _figures(alone)
    assert multiprocessing.active_children() == []


class _SlowPlanner:
    """Stands in for an EntryPlanner whose runs take far longer than the test."""

    def run_first(self, run):
        import time

        time.sleep(60)


def test_ctrl_c_during_the_workers_ends_them_all():
    import signal

    import pytest

    from dbprofile.planner.workers import prefetch

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            prefetch(_SlowPlanner(), [object(), object()], 2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert multiprocessing.active_children() == []
