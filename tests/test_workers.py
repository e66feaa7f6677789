"""The plan's techniques in worker processes (dbprofile.planner.workers): the same bytes as in one
process, the DiffusionBlocks techniques that share db:1's traces in one group, and no worker left behind."""

from __future__ import annotations

import multiprocessing

from dbprofile.models import get_preset
from dbprofile.planner import plan


def _figures(p):
    return [(e.technique, e.peak_bytes, e.shares, e.training_flops, e.corrections, e.peak_block) for e in p.entries]


def test_workers_give_the_same_plan_as_one_process_and_leave_none_behind():
    spec = get_preset("llama-tiny").at_depth(4)
    # 24 GiB: e2e and ckpt fit, so each searches its largest batch in its worker
    kwargs = dict(device=24 * 2**30, techniques=["e2e", "ckpt", "db:2"], confirm_max_batch=True, cache=False)
    alone = plan(spec, 2, workers=1, **kwargs)
    side_by_side = plan(spec, 2, workers=2, **kwargs)
    assert _figures(side_by_side) == _figures(alone)
    assert [e.max_batch_size for e in side_by_side.entries] == [e.max_batch_size for e in alone.entries]
    assert multiprocessing.active_children() == []


def _planner(spec, cache=None):
    from dbprofile.planner.entries import EntryPlanner
    from dbprofile.planner.targets import resolve_target
    from dbprofile.planner.zero import model_facts

    return EntryPlanner(
        spec=spec,
        facts=model_facts(spec),
        target=resolve_target("H100-80GB"),
        precision="fp32",
        optimizer="adamw",
        zero_stage=0,
        world_size=1,
        full_trace=False,
        full_trace_reason=None,
        round_to=512,
        capability=(9, 0),
        peak_flops=None,
        cache=cache,
    )


def test_the_diffusion_blocks_techniques_that_share_traces_are_one_job():
    from dbprofile.techniques import parse_technique

    planner = _planner(get_preset("llama-tiny").at_depth(12))
    names = ["e2e", "db:2", "sac", "db:3+ckpt", "db:4", "ckpt", "db:4+ckpt", "db:2+offload"]
    wanted = [(n, parse_technique(n), False) for n in names] + [("db:4+parallel", parse_technique("db:4"), True)]
    # the heaviest first (block-parallel, then the groups, then full checkpointing, whose largest-batch
    # search confirms the most), so that two workers finish together
    assert [[name for name, _, _ in job] for job in planner.jobs(wanted, 2)] == [
        ["db:4+parallel"],
        ["db:2", "db:4"],
        ["db:3+ckpt", "db:4+ckpt"],
        ["ckpt"],
        ["e2e"],
        ["sac"],
        ["db:2+offload"],
    ]


class _SlowPlanner:
    """Stands in for an EntryPlanner whose techniques take far longer than the test in a worker."""

    def __init__(self) -> None:
        import os

        self.parent = os.getpid()

    def first_run_known(self, wanted, b):
        return False

    def plan_job(self, job, b, searched):
        import os
        import time

        if os.getpid() != self.parent:
            time.sleep(60)
        return {}


def test_ctrl_c_during_the_workers_ends_them_all():
    import signal

    import pytest

    from dbprofile.planner.workers import plan_jobs

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            plan_jobs(_SlowPlanner(), [[object()], [object()], [object()]], 2, None, 2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert multiprocessing.active_children() == []
