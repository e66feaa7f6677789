"""The tracker's categories against independent ground truth: numel sums, an independent
saved_tensors_hooks count, torch.profiler's allocator events, and CUDA's allocator."""

from __future__ import annotations

import pytest
import torch
from _toy import toy_spec
from torch.profiler import ProfilerActivity, profile

from dbprofile.measure.tracker import Tracker
from dbprofile.measure.tracking import MemoryLimitExceeded
from dbprofile.methods import make_trainer
from dbprofile.techniques import parse_technique
from dbprofile.torch_internals import profiler_allocations
from dbprofile.vocabulary import CATEGORIES


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _tracked_trainer(tech: str, batch_size: int = 16, device: str = "cpu", **toy):
    """A trainer after one warm-up step, and the tracker already watching it."""
    spec = toy_spec(**toy)
    trainer = make_trainer(parse_technique(tech), spec, torch.device(device))
    tracker = Tracker(device, trainer=trainer)
    tracker.__enter__()
    batch = spec.batch(batch_size, device)
    tracker.set_inputs(batch)
    trainer.step(batch, None, tracker.mark)
    return spec, trainer, tracker


def _measured_step(spec, trainer, tracker, batch_size=16, device="cpu"):
    batch = spec.batch(batch_size, device)
    tracker.set_inputs(batch)
    tracker.begin_step()
    trainer.step(batch, None, tracker.mark)
    del batch
    return tracker.end_step()


def test_parameter_gradient_and_adamw_state_bytes_equal_numel_sums():
    spec, trainer, tracker = _tracked_trainer("e2e")
    try:
        _measured_step(spec, trainer, tracker)
    finally:
        tracker.__exit__(None, None, None)
    params = list(trainer.model.parameters())
    at_optimizer = dict(tracker.phase_snapshots)["optimizer"]  # all grads exist, state resident
    assert at_optimizer["parameters"] == _bytes(params)
    assert at_optimizer["gradients"] == _bytes(params)
    assert at_optimizer["buffers"] == _bytes(trainer.model.buffers())
    # AdamW: exp_avg and exp_avg_sq per parameter, plus one float32 step counter each.
    assert at_optimizer["optimizer_state"] == 2 * _bytes(params) + 4 * len(params)


def test_activation_share_equals_an_independent_saved_tensors_count():
    spec, trainer, tracker = _tracked_trainer("e2e")
    try:
        _measured_step(spec, trainer, tracker)
    finally:
        tracker.__exit__(None, None, None)
    tracked = dict(tracker.phase_snapshots)["backward"]["activations"]  # at the end of forward

    model = make_trainer(parse_technique("e2e"), spec, torch.device("cpu")).model
    batch = spec.batch(16, "cpu")
    excluded = {id(t.untyped_storage()) for t in [*model.parameters(), *model.buffers(), *batch.values()]}
    saved: dict[int, torch.Tensor] = {}

    def pack(t):
        st = t.untyped_storage()
        if id(st) not in excluded:
            saved[id(st)] = t  # keeps the storage alive so ids stay unique
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        spec.loss(model, batch)
    independent = sum(t.untyped_storage().nbytes() for t in saved.values())
    assert independent > 0
    assert tracked == independent


@pytest.mark.parametrize("tech, width", [("e2e", 32), ("ckpt", 96)])
def test_tracked_peak_agrees_with_profiler_allocator_events_within_1_percent(tech, width):
    spec, trainer, tracker = _tracked_trainer(tech, batch_size=32, width=width)
    try:
        batch = spec.batch(32, "cpu")
        tracker.set_inputs(batch)
        tracker.begin_step()
        live_at_start = tracker.total
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer.step(batch, None, tracker.mark)
        record = tracker.end_step()
    finally:
        tracker.__exit__(None, None, None)
    running = peak = 0
    for _, nbytes in profiler_allocations(prof):
        running += nbytes
        peak = max(peak, running)
    allocator_peak = live_at_start + peak
    assert abs(record.peak_bytes - allocator_peak) <= 0.01 * allocator_peak


def test_shares_sum_to_peak_exactly_and_timeline_is_bounded():
    spec, trainer, tracker = _tracked_trainer("e2e", depth=6)
    tracker.timeline_points = 50
    try:
        record = _measured_step(spec, trainer, tracker)
    finally:
        tracker.__exit__(None, None, None)
    assert set(record.shares) == set(CATEGORIES)
    assert sum(record.shares.values()) == record.peak_bytes > 0
    assert record.peak_phase == "backward"
    points = record.timeline["points"]
    assert 2 < len(points) <= 50
    assert max(sum(p[1:]) for p in points) == record.peak_bytes  # the peak survives downsampling
    assert {p[0] for p in points} >= {0, 1, 2}  # forward, backward, optimizer all drawn


def test_checkpointing_saves_fewer_activation_bytes_than_e2e():
    peaks = {}
    for tech in ("e2e", "ckpt"):
        spec, trainer, tracker = _tracked_trainer(tech, depth=6)
        try:
            peaks[tech] = _measured_step(spec, trainer, tracker)
        finally:
            tracker.__exit__(None, None, None)
    assert 0 < peaks["ckpt"].shares["activations"] < peaks["e2e"].shares["activations"] / 2
    assert peaks["ckpt"].peak_bytes < peaks["e2e"].peak_bytes


def test_memory_limit_aborts_the_step_from_inside():
    spec, trainer, tracker = _tracked_trainer("e2e")
    try:
        tracker.memory_limit = tracker.total + 1024  # room for the batch, not the activations
        with pytest.raises(MemoryLimitExceeded, match="out of memory"):
            _measured_step(spec, trainer, tracker)
    finally:
        tracker.__exit__(None, None, None)


def test_host_resident_and_other_device_tensors_are_not_counted():
    class Owner:  # stands in for an offload trainer: its float64 tensors are "host copies"
        model = torch.nn.Module()  # holds nothing, so only the tensors below are tracked
        optimizer = None

        @staticmethod
        def host_resident(t):
            return t.dtype == torch.float64

    with Tracker("cpu", trainer=Owner()) as tracker:
        kept = torch.ones(1000)
        host = torch.ones(500, dtype=torch.float64)
        other = torch.ones(300, device="meta")
        view = kept[10:]  # a view shares the storage: nothing added
        assert tracker.total == 4 * 1000
        del kept, view
        assert tracker.total == 0
    del host, other


def test_fake_metadata_queries_reach_the_mode_but_not_the_trackers_work_and_change_no_byte(monkeypatch):
    """The autograd engine asks each fake tensor's device through Python dispatch (most of a fake
    step's ops); those queries skip the tracker's per-op work, and the step's bytes are the same."""
    from dbprofile.measure import tracker_mode
    from dbprofile.measure.fake import fake_mode

    def fake_step(metadata_ops) -> tuple[list, object]:
        monkeypatch.setattr(tracker_mode, "METADATA_OPS", metadata_ops)
        seen: list = []
        with fake_mode():
            spec, trainer, tracker = _tracked_trainer("e2e")
            on_op = tracker.on_op
            monkeypatch.setattr(tracker, "on_op", lambda func, *a: seen.append(func) or on_op(func, *a))
            try:
                record = _measured_step(spec, trainer, tracker)
            finally:
                tracker.__exit__(None, None, None)
        return seen, record

    device = torch.ops.prim.device.default
    without, slow = fake_step(frozenset())
    with_fast_path, fast = fake_step(frozenset({device}))
    assert device in without and device not in with_fast_path
    assert (fast.peak_bytes, fast.shares, fast.peak_phase) == (slow.peak_bytes, slow.shares, slow.peak_phase)
    assert fast.timeline == slow.timeline


def _frees_in_order(order: list[int]):
    """A step that makes three tensors, frees them in ``order``, then makes one more."""
    with Tracker("cpu", keep_trace=True) as tracker:
        tracker.begin_step()
        made = [torch.ones(n) for n in (100, 300, 200)]
        for i in order:
            made[i] = None
        last = torch.ones(10)
        record = tracker.end_step()
    del last
    return record


def test_a_run_of_frees_is_one_point_whatever_order_they_come_in():
    """bf16 autocast empties its cache of cast weights in hash order, so the same step frees them in
    another order from run to run; a run of frees is one point (the last), so the trace is the same.
    No peak is lost: every point inside a run is below the point before it in every category."""
    forward, backward = _frees_in_order([0, 1, 2]), _frees_in_order([2, 0, 1])
    assert forward.trace == backward.trace
    totals = [sum(point[1:]) for _, point in forward.trace]
    # start, the three tensors, the run of three frees as one point, the last tensor, the end
    assert totals == [0, 400, 1600, 2400, 0, 40, 40]
    assert forward.peak_bytes == 2400 and forward.state_peak == 0
