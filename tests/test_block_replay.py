"""DiffusionBlocks' allocator replay built from db:1's replays (dbprofile.measure.block_replay): on a CUDA
target a derived db:B's reserved bytes and segments equal db:B's own full-depth replay, on GPT (with
checkpointing), DiT, ViT and Llama (tests/test_shared_blocks.py) presets, equal and unequal blocks, with
the state made without steps or by a real step (SGD, a ViT); where db:1's first step makes more than its
state the estimate stays, and says so."""

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


@pytest.mark.parametrize(
    ("preset", "technique", "optimizer"),
    [("vit-tiny", "db:3", "adamw"), ("llama-tiny", "db:2", "sgd"), ("gpt-tiny", "db:3", "adamw-loop")],
)
def test_state_made_by_a_real_step_is_replayed_as_well(preset, technique, optimizer):
    # db:1 warms up by a real step (a ViT's class token gets no gradient; SGD makes its momentum inside
    # its update): the state it made is found where its events first differ from the tracked step's.
    spec = get_preset(preset).at_depth(10)
    settings = dict(layers=10, not_identical=None, **{**CUDA, "optimizer": optimizer})
    derived = measure_fake(spec, parse_technique(technique), 2, block_traces={}, **settings)
    full = measure_fake(spec, parse_technique(technique), 2, full_trace=True, **settings)
    assert derived.extra["allocator_model"] == full.extra["allocator_model"]
    assert derived.extra["depth"]["not_affine"] == []


def test_bf16_autocast_frees_its_cast_weights_in_its_own_order_and_is_replayed_all_the_same():
    # Leaving autocast empties its cache of bf16 weights in the cache's order, which does not repeat with
    # the depth; the runs of frees are taken in allocation order (the allocator cannot tell them apart).
    spec = get_preset("llama-tiny").at_depth(12)
    settings = dict(layers=12, not_identical=None, precision="bf16", **CUDA)
    derived = measure_fake(spec, parse_technique("db:3"), 2, block_traces={}, **settings)
    full = measure_fake(spec, parse_technique("db:3"), 2, full_trace=True, **settings)
    assert derived.extra["allocator_model"] == full.extra["allocator_model"]
    assert derived.extra["depth"]["not_affine"] == []


def test_a_first_step_that_keeps_what_it_makes_has_db_b_traced_itself_not_estimated():
    # db:1's warm-up step makes a tensor the model keeps (a table cached on first use), which its tracked
    # step does not: db:B's warm-up steps are not db:1's, so db:1's replays do not build db:B's, and db:B
    # is traced itself (its own shallow traces' sequences extended, or in full): replayed all the same.
    from test_warmup import _keeping_spec

    spec = _keeping_spec(12)
    settings = dict(layers=12, not_identical=None, **CUDA)
    derived = measure_fake(spec, parse_technique("db:2"), 2, block_traces={}, **settings)
    full = measure_fake(spec, parse_technique("db:2"), 2, full_trace=True, **settings)
    assert "db:1's step" not in derived.extra["depth"]["reason"]
    assert derived.extra["allocator_model"] == full.extra["allocator_model"]
    assert derived.peak_bytes == full.peak_bytes and derived.shares == full.shares


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
