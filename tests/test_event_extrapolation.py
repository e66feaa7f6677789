"""The caching-allocator model's events at full depth from three shallow traces
(dbprofile.measure.event_extrapolation): an extrapolated plan for a GPU replays the allocator as the
full trace does, so its reserved bytes (and the planned peak) equal the full trace's to the byte; where
the events do not follow one repeating structure, the estimate is kept and named."""

from __future__ import annotations

import pytest

from dbprofile.measure import depth
from dbprofile.measure.allocator import FREED
from dbprofile.measure.depth import PATH_EXTRAPOLATED, PATH_FULL, measure_fake
from dbprofile.measure.event_extrapolation import extrapolate_events, in_allocation_order, replayed
from dbprofile.measure.step_extrapolation import NotAffine
from dbprofile.models import get_preset
from dbprofile.techniques import parse_technique

CUDA = dict(round_to=512, emulate_cuda=True, optimizer="adamw-foreach", state_warmup="all")


class _Program:
    """A training step's allocations written out for ``depth`` layers, as the tracker would record
    them: parameters, a forward keeping one activation per layer (a temporary freed at once, the
    previous layer's input freed by the next), a gradient clip stacking one 4-byte norm per parameter
    (a size that grows with the depth), a backward freeing the activations in reverse, and AdamW's
    per-parameter temporaries."""

    def __init__(self, depth: int) -> None:
        self.events: list[tuple[int, int]] = []
        self.depth = depth

    def malloc(self, nbytes: int) -> int:
        handle = len(self.events)
        self.events.append((handle, nbytes))
        return handle

    def free(self, handle: int) -> None:
        self.events.append((handle, FREED))

    def run(self) -> list[tuple[int, int]]:
        params = [self.malloc(4 << 20) for _ in range(self.depth)]
        embedding = self.malloc(1 << 20)
        kept, x = [], self.malloc(3 << 20)
        for _ in range(self.depth):
            tmp = self.malloc(12 << 20)
            y = self.malloc(3 << 20)
            self.free(tmp)
            kept.append(x)
            x = y
        norms = [self.malloc(4) for _ in params]
        stacked = self.malloc(4 * len(norms))
        for n in norms:
            self.free(n)
        grad = self.malloc(3 << 20)
        for act in reversed(kept):
            g = self.malloc(3 << 20)
            self.free(act)
            self.free(grad)
            grad = g
        self.free(grad)
        self.free(stacked)
        for _ in params:
            t = self.malloc(4 << 20)
            self.free(t)
        self.free(x)
        self.free(embedding)
        return self.events


def test_a_step_written_out_at_any_depth_is_extended_from_three_depths_event_for_event():
    traced = [_Program(d).run() for d in (2, 3, 4)]
    for target in (5, 9, 40):
        # event for event, with each run of frees in allocation order (which replays the same)
        assert extrapolate_events(traced, target - 2) == in_allocation_order(_Program(target).run())
    full = _Program(40).run()
    assert replayed(extrapolate_events(traced, 38)) == replayed(full)


def test_frees_in_a_run_are_put_in_allocation_order_and_replay_the_same():
    # Three blocks made, then freed in an order of their own (a cache emptied in its own order) before
    # the next malloc: put in allocation order, with a run split where a state is inserted later.
    events = [(0, 3 << 20), (1, 1 << 20), (2, 5 << 20), (2, FREED), (0, FREED), (1, FREED), (3, 2 << 20)]
    ordered = in_allocation_order(events)
    assert ordered == [(0, 3 << 20), (1, 1 << 20), (2, 5 << 20), (0, FREED), (1, FREED), (2, FREED), (3, 2 << 20)]
    assert replayed(ordered) == replayed(events)
    assert in_allocation_order(events, split=5)[3:6] == [(0, FREED), (2, FREED), (1, FREED)]


def test_events_that_change_structure_with_the_depth_are_refused():
    # Freeing the middle layer's activation first, each free followed by a malloc that may reuse its
    # block: which one that is moves with the depth, not by a copy.
    def program(d):
        events = [(i, 1 << 20) for i in range(d)]
        for k, i in enumerate([d // 2] + [i for i in range(d) if i != d // 2]):
            events += [(i, FREED), (d + k, 512)]
        return events

    with pytest.raises(NotAffine):
        extrapolate_events([program(d) for d in (2, 3, 4)], 6)


@pytest.mark.parametrize(
    ("preset", "technique"),
    [
        ("llama-tiny", "e2e"),
        ("llama-tiny", "ckpt"),
        ("llama-tiny", "sac"),
        ("llama-tiny", "offload"),
        ("vit-tiny", "ckpt"),
        ("vit-tiny", "e2e"),
        ("dit-tiny", "db:1"),
    ],
)
def test_an_extrapolated_cuda_measurement_replays_the_allocator_as_the_full_trace(preset, technique):
    spec = get_preset(preset).at_depth(10)
    tech = parse_technique(technique)
    extrapolated = measure_fake(spec, tech, 2, layers=10, not_identical=None, **CUDA)
    full = measure_fake(spec, tech, 2, layers=10, not_identical=None, full_trace=True, **CUDA)
    assert extrapolated.extra["depth"]["path"] == PATH_EXTRAPOLATED
    assert full.extra["depth"]["path"] == PATH_FULL
    # peak reserved and allocated bytes and the segment count, replayed, not estimated
    assert extrapolated.extra["allocator_model"] == full.extra["allocator_model"]
    assert "extrapolated" not in extrapolated.extra["allocator_model"]
    assert not [n for n in extrapolated.extra["depth"]["not_affine"] if "allocator_model" in n]
    assert extrapolated.peak_bytes == full.peak_bytes


def test_events_that_do_not_extend_are_traced_in_full_never_estimated(monkeypatch):
    # An estimate of the reserved bytes from the shallow traces' proportion was 4.8% under the full
    # replay on llama-1b (Adafactor's foreach step, H100): a largest batch of 9 where 8 fit.
    def refuse(events, steps):
        raise NotAffine("not one repeating structure")

    monkeypatch.setattr(depth, "extrapolate_events", refuse)
    spec = get_preset("llama-tiny").at_depth(10)
    m = measure_fake(spec, parse_technique("e2e"), 2, layers=10, not_identical=None, **CUDA)
    full = measure_fake(spec, parse_technique("e2e"), 2, layers=10, not_identical=None, full_trace=True, **CUDA)
    assert m.extra["depth"]["path"] == PATH_FULL
    assert m.extra["depth"]["reason"] == (
        "the shallow traces did not extrapolate exactly (the allocator's allocation sequences do not extend "
        "to full depth: not one repeating structure)"
    )
    assert m.extra["allocator_model"] == full.extra["allocator_model"] and m.peak_bytes == full.peak_bytes
