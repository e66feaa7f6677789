"""Depth extrapolation (dbprofile.measure.depth): shallow traces extrapolated to full depth must equal
the full-depth fake trace to the byte, and anything that cannot be extrapolated exactly is traced in
full and says why."""

from __future__ import annotations

import pytest
import torch
from _toy import toy_spec
from torch import nn

from dbprofile.measure.depth import (
    PATH_EXTRAPOLATED,
    PATH_FULL,
    identical_layers,
    measure_fake,
    simulate_fake,
    spec_at_depth,
)
from dbprofile.measure.step_extrapolation import NotAffine, extrapolate_step, extrapolate_value
from dbprofile.measure.tracking import StepRecord
from dbprofile.models import get_preset
from dbprofile.planner import plan
from dbprofile.report.text import format_plan
from dbprofile.techniques import parse_techniques
from dbprofile.vocabulary import CATEGORIES, PHASES

CUDA_BLOCK = 512


def _both(spec, technique, batch_size=2, round_to=None):
    layers, different = identical_layers(spec)
    tech = parse_techniques([technique])[0]
    fast = measure_fake(spec, tech, batch_size, layers=layers, not_identical=different, round_to=round_to)
    full = measure_fake(
        spec, tech, batch_size, layers=layers, not_identical=different, round_to=round_to, full_trace=True
    )
    return fast, full


def _assert_same(fast, full):
    assert fast.ok and full.ok
    assert fast.peak_bytes == full.peak_bytes
    assert fast.shares == full.shares
    assert (fast.peak_phase, fast.peak_block) == (full.peak_phase, full.peak_block)
    assert (fast.num_parameters, fast.extra_parameters) == (full.num_parameters, full.extra_parameters)
    assert [(b.block, b.layers, b.peak_bytes, b.shares, b.step_flops) for b in fast.blocks] == [
        (b.block, b.layers, b.peak_bytes, b.shares, b.step_flops) for b in full.blocks
    ]
    # the FLOPs grow with the depth too (they were the second depth's before)
    assert fast.training_flops == full.training_flops
    # and so does the most state live at one instant (the planner's floor under every batch size)
    assert fast.extra["state_peak_bytes"] == full.extra["state_peak_bytes"]


@pytest.mark.parametrize(
    "technique",
    ["e2e", "db:2", pytest.param("ckpt", marks=pytest.mark.slow), pytest.param("db:2+ckpt", marks=pytest.mark.slow)],
)
def test_extrapolated_llama_equals_the_full_trace_to_the_byte(technique):
    fast, full = _both(get_preset("llama-tiny").at_depth(20), technique, round_to=CUDA_BLOCK)
    assert fast.extra["depth"]["path"] == PATH_EXTRAPOLATED
    # DiffusionBlocks: db:1's block-step traced at 2, 3, 4 layers (dbprofile.measure.shared_blocks)
    assert fast.extra["depth"]["traced_depths"] == [2, 3, 4]
    assert full.extra["depth"]["path"] == PATH_FULL and full.extra["depth"]["reason"] == "asked for a full trace"
    _assert_same(fast, full)
    if technique.startswith("db:"):
        assert fast.extra["activation_ratios"] == full.extra["activation_ratios"]


@pytest.mark.parametrize("technique", ["ckpt", "sac"])
def test_bf16_steps_extrapolate_though_autocast_frees_its_cache_in_no_fixed_order(technique):
    """Autocast empties its cache of bf16 weights in hash order; those frees used to come in another
    order at each depth and send ckpt ("not affine") and sac ("not the shallow step with runs
    inserted") to the full trace. The tracker makes a run of frees one point, so they extrapolate,
    equal to the full trace to the byte, the allocator's replay included."""
    spec = get_preset("llama-tiny").at_depth(12)
    tech = parse_techniques([technique])[0]
    kwargs = dict(layers=12, not_identical=None, precision="bf16", round_to=CUDA_BLOCK, emulate_cuda=True)
    fast = measure_fake(spec, tech, 2, state_warmup="all", **kwargs)
    full = measure_fake(spec, tech, 2, full_trace=True, **kwargs)
    assert fast.extra["depth"]["path"] == PATH_EXTRAPOLATED, fast.extra["depth"]
    _assert_same(fast, full)
    assert "extrapolated" not in fast.extra["allocator_model"]  # replayed at full depth, not estimated
    assert fast.extra["allocator_model"] == full.extra["allocator_model"]


def test_extrapolated_vit_equals_the_full_trace_on_the_cpu():
    fast, full = _both(get_preset("vit-tiny").at_depth(10), "e2e", batch_size=3)
    assert fast.extra["depth"]["path"] == PATH_EXTRAPOLATED
    _assert_same(fast, full)


def test_a_model_without_at_depth_is_cut_from_a_full_build_and_still_exact():
    spec = toy_spec(depth=12)
    assert spec.at_depth is None
    with torch.device("meta"):
        assert len(spec_at_depth(spec, 3).build().blocks) == 3
    fast, full = _both(spec, "e2e")
    assert fast.extra["depth"]["path"] == PATH_EXTRAPOLATED
    _assert_same(fast, full)


def test_zero3_simulated_rank_extrapolates_exactly():
    spec = get_preset("llama-tiny").at_depth(10)
    layers, different = identical_layers(spec)
    tech = parse_techniques(["e2e"])[0]
    kwargs = dict(layers=layers, not_identical=different, parallel=False, round_to=CUDA_BLOCK)
    fast = simulate_fake(spec, "e2e", tech, 1, 4, **kwargs)
    full = simulate_fake(spec, "e2e", tech, 1, 4, full_trace=True, **kwargs)
    assert fast.extra["depth"]["path"] == PATH_EXTRAPOLATED
    assert (fast.peak_bytes, fast.shares, fast.peak_phase) == (full.peak_bytes, full.shares, full.peak_phase)
    assert fast.shares["communication"] > 0


def test_layers_that_differ_are_traced_in_full_and_say_which_layer():
    spec = toy_spec(depth=6)
    plain = spec.build

    def build() -> nn.Module:
        model = plain()
        model.blocks[4].extra = nn.Identity()  # same parameters, another module tree
        return model

    spec.build = build
    layers, different = identical_layers(spec)
    assert (layers, different) == (6, "layer 4 differs from layer 0 (module tree, parameter or buffer shapes)")
    assert identical_layers(toy_spec(depth=6)) == (6, None)
    m = measure_fake(spec, parse_techniques(["e2e"])[0], 2, layers=layers, not_identical=different)
    assert m.extra["depth"]["path"] == PATH_FULL
    assert m.extra["depth"]["reason"] == "the residual layers are not identical: " + different


def test_uneven_blocks_are_read_off_one_block_traces():
    # 23 layers in 2 blocks: 12 + 11, both on the line of db:1's step through 2, 3, 4 layers.
    fast, full = _both(get_preset("llama-tiny").at_depth(23), "db:2", round_to=CUDA_BLOCK)
    assert fast.extra["depth"]["path"] == PATH_EXTRAPOLATED and fast.extra["depth"]["traced_depths"] == [2, 3, 4]
    _assert_same(fast, full)


def test_a_model_shallower_than_the_three_traces_together_is_traced_in_full():
    m = measure_fake(
        get_preset("llama-tiny").at_depth(9), parse_techniques(["db:4"])[0], 2, layers=9, not_identical=None
    )
    assert m.extra["depth"]["path"] == PATH_FULL
    assert m.extra["depth"]["reason"] == "tracing all 9 layers costs less than traces at 9, 13, 17"


def test_integer_figures_extrapolate_and_a_non_affine_one_is_named_and_dropped():
    not_affine: list[str] = []
    # depths 2, 3, 4 -> target 2 + 10 = 12: flops 100 + 10 * depth is affine, "allocator" is not.
    out = extrapolate_value(
        {"flops": 120, "allocator": 4096, "name": "x"},
        {"flops": 130, "allocator": 4096, "name": "y"},
        {"flops": 140, "allocator": 6144, "name": "z"},
        10,
        "extra",
        not_affine,
    )
    assert out == {"flops": 220, "allocator": None, "name": "y"}
    assert not_affine == ["extra.allocator"]


def _moving_a_block_in(layers: int, loops_apart: bool) -> StepRecord:
    """A tracked step that copies each layer's parameters (two tensors) and optimizer state (four) onto
    the device, one ``copy`` op each, as temporaries that a rescan then files by role. ``loops_apart``:
    every layer's parameters are filed, then every layer's state (the rescan's order); otherwise layer by
    layer. The last point frees most of the state, so the peak lies inside the loops."""
    size = {"parameters": (100, 30), "optimizer_state": (100, 100, 30, 30)}
    phase = PHASES.index("transfer")
    value = [0] * len(CATEGORIES)
    value[CATEGORIES.index("parameters")] = value[CATEGORIES.index("optimizer_state")] = 10**6
    trace = [("mark", [phase, *value])]

    def add(category: str, nbytes: int, taken_from: str | None = None) -> None:
        nonlocal value
        value = list(value)
        value[CATEGORIES.index(category)] += nbytes
        if taken_from:
            value[CATEGORIES.index(taken_from)] -= nbytes
        trace.append(("copy", [phase, *value]))

    for _ in range(layers):
        for nbytes in size["parameters"] + size["optimizer_state"]:
            add("temporaries", nbytes)
    order = (
        [(c, n) for c in size for _ in range(layers) for n in size[c]]
        if loops_apart
        else [(c, n) for _ in range(layers) for c in size for n in size[c]]
    )
    for category, nbytes in order:
        add(category, nbytes, taken_from="temporaries")
    add("optimizer_state", -900_000)
    peak = max(trace, key=lambda point: sum(point[1][1:]))[1][1:]
    return StepRecord(peak_bytes=sum(peak), shares=dict(zip(CATEGORIES, peak)), peak_phase="transfer", trace=trace)


def test_runs_of_identical_ops_extrapolate_only_where_each_inserted_run_repeats():
    # Layer by layer: each layer adds one run, and the depth-12 step is read off exactly.
    depths = (2, 3, 4)
    step = extrapolate_step([_moving_a_block_in(m, loops_apart=False) for m in depths], depths, 12)
    truth = _moving_a_block_in(12, loops_apart=False)
    assert (step.peak_bytes, step.shares) == (truth.peak_bytes, truth.shares)
    # Two loops side by side (db:B+offload's rescan): the tags alone match one run inserted where they
    # meet, which the third depth does not repeat point by point: refused, not read from the wrong stretch.
    with pytest.raises(NotAffine, match="do not repeat at the third depth"):
        extrapolate_step([_moving_a_block_in(m, loops_apart=True) for m in depths], depths, 12)


def test_plan_says_which_path_each_technique_took():
    p = plan(get_preset("llama-tiny").at_depth(10), 2, device="cpu", techniques=["e2e", "db:4"], search_max_batch=False)
    text = format_plan(p)
    assert "Depth: e2e extrapolated from shallow traces (10 identical layers, traced at 2, 3, 4" in text
    assert (
        "Depth: db:4 extrapolated from shallow traces (10 identical layers; every block-step is db:1's step traced "
        "at 2, 3, 4 layers plus the other layers' resident bytes; checked to the byte at the deepest)" in text
    )


def test_a_full_trace_forced_by_the_small_model_rule_says_so_not_asked_for():
    p = plan(get_preset("llama-tiny").at_depth(4), 2, device="H100-80GB", techniques=["e2e"], search_max_batch=False)
    assert p.entries[0].extra["depth"]["path"] == PATH_FULL
    assert (
        "Depth: e2e traced every layer (parameter memory under 4.00 GiB on a GPU target: traced in full so the "
        "allocator replay covers every layer)." in format_plan(p)
    )
    asked = plan(
        get_preset("llama-tiny").at_depth(4),
        2,
        device="H100-80GB",
        techniques=["e2e"],
        search_max_batch=False,
        full_trace=True,
    )
    assert asked.entries[0].extra["depth"]["reason"] == "asked for a full trace"


@pytest.mark.parametrize("sharding", [{}, {"zero_stage": 3, "world_size": 4}], ids=["one device", "zero-3 rank"])
def test_a_technique_whose_shallow_traces_failed_once_is_traced_in_full_at_every_later_batch(monkeypatch, sharding):
    import dbprofile.measure.depth as depth_module
    import dbprofile.planner.predict as predict_module

    tried: list[int] = []

    def refuse(traced, target, block_layers, not_affine):
        tried.append(traced[0][0].batch_size)
        raise NotAffine("not one repeating structure")

    monkeypatch.setattr(depth_module, "_extrapolate_measurement", refuse)
    monkeypatch.setattr(predict_module, "FULL_TRACE_BELOW_PARAMETER_BYTES", 0)  # a GPU target extrapolates
    spec = get_preset("llama-tiny").at_depth(12)
    p = plan(spec, 2, device="H100-80GB", techniques=["e2e"], cache=False, workers=1, **sharding)
    entry = p.entries[0]
    assert entry.ok and entry.max_batch_size > 2 and len(entry.linear_fit["points"]) > 1  # confirming runs
    assert tried == [2]  # the shallow traces at the plan's batch only: the confirming runs go straight to full
    assert entry.extra["depth"]["reason"] == (
        "the shallow traces did not extrapolate exactly (not one repeating structure)"
    )


def test_block_parallel_simulates_one_rank_per_distinct_block_and_it_stands_for_the_others(monkeypatch):
    from dbprofile.measure import distributed

    assert distributed.representative_ranks(12, 5) == [0, 1, 2, 2, 4]  # blocks of 3, 3, 2, 2, 2 layers
    assert distributed.representative_ranks(80, 64) == [0] + [1] * 15 + [16] * 47 + [63]
    spec = get_preset("llama-tiny").at_depth(12)
    chosen = distributed.simulate_rank(spec, "db:5+parallel", 1, 5)
    monkeypatch.setattr(distributed, "representative_ranks", lambda layers, blocks: list(range(blocks)))
    every = distributed.simulate_rank(spec, "db:5+parallel", 1, 5)
    assert chosen.extra["rank_peaks"] == every.extra["rank_peaks"]
    assert chosen.extra["rank_peaks"][3] == chosen.extra["rank_peaks"][2]
