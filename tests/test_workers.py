"""The plan's techniques in worker processes (dbprofile.planner.workers): the same bytes as in one
process, the DiffusionBlocks techniques that share db:1's traces in one group, and no worker left behind."""

from __future__ import annotations

import dataclasses
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


def test_the_dispatch_cache_is_filled_by_the_shallowest_run_and_nothing_of_it_is_kept(monkeypatch, tmp_path):
    """Before the workers fork, one run of the model cut to its fewest layers fills the fake-tensor
    dispatch cache they inherit; it is dropped: no run, trace or cache entry of the plan comes of it."""
    from dbprofile.measure import depth
    from dbprofile.planner.trace_cache import TraceCache
    from dbprofile.techniques import parse_technique

    runs: list = []
    original = depth.measure_fake

    def spy(spec, tech, b, **kwargs):
        runs.append((tech.name, kwargs["layers"], depth.identical_layers(spec)[0]))
        return original(spec, tech, b, **kwargs)

    monkeypatch.setattr(depth, "measure_fake", spy)
    spec = get_preset("llama-tiny").at_depth(12)
    planner = _planner(spec, cache=TraceCache(spec, tmp_path))
    wanted = {n: (n, parse_technique(n), False) for n in ["db:2", "ckpt:2", "e2e", "sac", "db:8"]}
    # the one-layer runs (e2e, sac), the last of them (the lightest group comes last)
    planner.fill_dispatch_cache([wanted[n] for n in ["db:2", "ckpt:2", "e2e", "sac"]], 2)
    assert runs == [("sac", 1, 1)]
    assert planner.runs == {} and planner.block_traces == {} and planner.simulated == {}
    assert list(tmp_path.rglob("*")) == []
    # a split into two parts needs two layers; eight parts, more than a fill is worth: none
    planner.fill_dispatch_cache([wanted["db:2"]], 2)
    planner.fill_dispatch_cache([wanted["db:8"]], 2)
    assert runs == [("sac", 1, 1), ("db:2", 2, 2)]
    # a model whose own at_depth refuses the cut, or that fails at one layer: nothing, and no error
    refusing = dataclasses.replace(spec, at_depth=_refuse)
    _planner(refusing).fill_dispatch_cache([wanted["e2e"]], 2)
    assert len(runs) == 2


def _refuse(layers):
    raise ValueError(f"this model is not built with {layers} layers")


class _SlowPlanner:
    """Stands in for an EntryPlanner whose techniques take far longer than the test in a worker."""

    def __init__(self) -> None:
        import os

        self.parent = os.getpid()

    def first_run_known(self, wanted, b):
        return False

    def fill_dispatch_cache(self, candidates, b):
        pass

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
