"""DiffusionBlocks' allocator replay built from db:1's replays (dbprofile.measure.block_replay): on a CUDA
target a derived db:B's reserved bytes and segments equal db:B's own full-depth replay, on GPT (with
checkpointing), DiT and Llama (tests/test_shared_blocks.py) presets, equal and unequal blocks; where
db:1's state was made by a real step the estimate stays, and says so."""

from __future__ import annotations

import pytest

from dbprofile.measure.block_replay import EVENT_DEPTHS, _layer_state, _OneBlockReplay
from dbprofile.measure.depth import PATH_EXTRAPOLATED, measure_fake
from dbprofile.measure.step_extrapolation import NotAffine
from dbprofile.models import get_preset
from dbprofile.techniques import parse_technique

CUDA = dict(round_to=512, emulate_cuda=True, optimizer="adamw-foreach", state_warmup="all")


def _pair(preset, technique, layers=10, batch=2):
    spec = get_preset(preset).at_depth(layers)
    tech = parse_technique(technique)
    derived = measure_fake(spec, tech, batch, layers=layers, not_identical=None, block_traces={}, **CUDA)
    full = measure_fake(spec, tech, batch, layers=layers, not_identical=None, full_trace=True, **CUDA)
    return derived, full


@pytest.mark.parametrize(("preset", "technique"), [("gpt-tiny", "db:3+ckpt"), ("dit-tiny", "db:4")])
def test_a_derived_db_b_replays_the_allocator_as_its_full_trace(preset, technique):
    # 10 layers: db:3 is 4 + 3 + 3, db:4 is 3 + 3 + 2 + 2 (every length extended from depths 2-5 or read off)
    derived, full = _pair(preset, technique)
    assert derived.extra["depth"]["path"] == PATH_EXTRAPOLATED
    assert derived.extra["depth"]["traced_depths"] == list(EVENT_DEPTHS)
    assert derived.extra["allocator_model"] == full.extra["allocator_model"]
    assert "extrapolated" not in derived.extra["allocator_model"]
    assert derived.peak_bytes == full.peak_bytes


def test_a_replayed_row_is_not_named_estimated_where_db1s_reserved_bytes_are_off_the_line():
    # llama-tiny at batch 8: db:1's reserved bytes at depths 2, 3, 4 are 20, 26 and 34 MiB, off any line,
    # so the extras extrapolated to a block of 6 layers name them; the replay replaces them, and the plan
    # must not say "estimated".
    derived, full = _pair("llama-tiny", "db:2", layers=12, batch=8)
    assert derived.extra["allocator_model"] == full.extra["allocator_model"]
    assert derived.extra["depth"]["not_affine"] == []


def test_state_made_by_a_real_step_keeps_the_estimate_and_says_so():
    # A ViT's DiffusionBlocks makes its state after one real step (its class token gets no gradient).
    derived, full = _pair("vit-tiny", "db:3")
    assert derived.extra["allocator_model"]["extrapolated"] is True
    assert "extra.allocator_model.segments" in derived.extra["depth"]["not_affine"]
    assert derived.extra["depth"]["traced_depths"] == [2, 3, 4]  # no fifth depth traced for nothing
    # estimated (the block-step's overhead in proportion), not passed off as the replay: 20% over here
    assert (
        derived.extra["allocator_model"]["peak_reserved_bytes"] != full.extra["allocator_model"]["peak_reserved_bytes"]
    )


def _replay(depth, labels_of_layer, before=(None,), after=(None, None)):
    labels = list(before) + [i for i in range(depth) for _ in labels_of_layer] + list(after)
    sizes = [512] * len(before) + [1024, 2048] * depth + [4096] * len(after)
    return _OneBlockReplay([], [], 0, sizes, labels)


def test_layer_state_is_the_same_tensors_per_layer_in_layer_order():
    replays = {d: _replay(d, (0, 0)) for d in EVENT_DEPTHS}
    assert _layer_state(replays) == ([512], [1024, 2048], [4096, 4096])
    # a layer's state interleaved with another's is not a block's state
    mixed = {d: _replay(d, (0, 0)) for d in EVENT_DEPTHS}
    mixed[3].state_layers[1], mixed[3].state_layers[3] = 1, 0
    with pytest.raises(NotAffine):
        _layer_state(mixed)
