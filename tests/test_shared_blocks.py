"""DiffusionBlocks at every B from one set of one-block traces (dbprofile.measure.shared_blocks): each
derived measurement must equal db:B's own full-depth trace to the byte (peak, shares, phase, every
block, FLOPs, parameter counts), on vit, gpt, llama and dit, with equal and unequal blocks, blocks of
one layer, on the CPU and under CUDA emulation; and the B values of one plan must share the traces."""

from __future__ import annotations

import pytest

from dbprofile.measure.depth import PATH_EXTRAPOLATED, PATH_FULL, derived_blocks, measure_fake, simulate_fake
from dbprofile.measure.shared_blocks import resident_per_layer, shares_block_traces
from dbprofile.measure.step_extrapolation import NotAffine
from dbprofile.measure.tracking import StepRecord
from dbprofile.models import get_preset
from dbprofile.results import Measurement
from dbprofile.techniques import parse_technique

CUDA = dict(round_to=512, emulate_cuda=True, optimizer="adamw-foreach")


def _measure(spec, technique, layers, kept=None, full=False, **settings):
    return measure_fake(
        spec,
        parse_technique(technique),
        2,
        layers=layers,
        not_identical=None,
        full_trace=full,
        state_warmup="all",
        block_traces=kept,
        **settings,
    )


NOT_COMPARED = ("timing", "depth", "allocator_model", "warmup")
"""How long it took, which path, the allocator replay (compared on its own where it is replayed), how
the state was made."""


def _figures(m):
    blocks = [(b.block, b.layers, b.peak_bytes, b.shares, b.peak_phase, b.step_flops) for b in m.blocks]
    extra = {k: v for k, v in m.extra.items() if k not in NOT_COMPARED}
    return (
        m.technique,
        extra,
        m.peak_bytes,
        m.shares,
        m.peak_phase,
        m.peak_block,
        m.training_flops,
        m.num_parameters,
        m.extra_parameters,
        blocks,
    )


def test_every_b_of_a_plan_reads_one_set_of_traces_and_equals_its_full_trace_to_the_byte():
    # 12 layers: db:2 (6 + 6), db:5 (3, 3, 2, 2, 2: unequal), db:12 (blocks of one layer, below the line).
    spec = get_preset("llama-tiny").at_depth(12)
    kept: dict = {}
    for technique in ("db:2", "db:5", "db:12"):
        derived = _measure(spec, technique, 12, kept, **CUDA)
        full = _measure(spec, technique, 12, full=True, **CUDA)
        assert derived.extra["depth"]["path"] == PATH_EXTRAPOLATED, technique
        assert "db:1's step traced at" in derived.extra["depth"]["reason"]
        assert full.extra["depth"]["path"] == PATH_FULL
        assert _figures(derived) == _figures(full), technique
        # the allocator replayed from db:1's replays (block_replay): reserved bytes and segments exact
        assert derived.extra["allocator_model"] == full.extra["allocator_model"], technique
        assert not [n for n in derived.extra["depth"]["not_affine"] if "allocator_model" in n]
        assert derived.extra["activation_ratios"] == full.extra["activation_ratios"]
    traced = sorted(key[-1] for key in kept if key[0] == "db:1")
    # one trace per depth for all three B (5: the allocator's events checked one depth further); 1 for db:12
    assert traced == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("preset", "technique"),
    [("gpt-tiny", "db:3+ckpt"), ("vit-tiny", "db:3"), ("dit-tiny", "db:4")],
)
def test_derived_blocks_equal_the_full_trace_on_other_families(preset, technique):
    # 10 layers: db:3 is 4 + 3 + 3, db:4 is 3 + 3 + 2 + 2 (CPU: no rounding, no CUDA emulation).
    spec = get_preset(preset).at_depth(10)
    derived = _measure(spec, technique, 10)
    full = _measure(spec, technique, 10, full=True)
    assert derived.extra["depth"]["path"] == PATH_EXTRAPOLATED
    assert _figures(derived) == _figures(full)


def test_a_zero3_rank_of_every_b_is_derived_from_db1s_rank_and_equals_its_full_trace():
    # One FSDP rank of four (ZeRO-3): the other layers' resident bytes are their shards; the collectives
    # are summed over the block-steps as the tracker sums them.
    spec = get_preset("llama-tiny").at_depth(12)
    kept: dict = {}
    settings = dict(layers=12, not_identical=None, parallel=False, precision="fp32", round_to=512)
    for technique in ("db:2", "db:5"):
        tech = parse_technique(technique)
        derived = simulate_fake(spec, technique, tech, 2, 4, block_traces=kept, optimizer="adamw-foreach", **settings)
        full = simulate_fake(spec, technique, tech, 2, 4, full_trace=True, optimizer="adamw-foreach", **settings)
        assert derived.extra["depth"]["path"] == PATH_EXTRAPOLATED
        assert _figures(derived) == _figures(full), technique
        assert derived.extra["rank_peaks"] == full.extra["rank_peaks"] == [full.peak_bytes]
    assert sorted(key[-1] for key in kept if key[0] == "rank") == [2, 3, 4]


def test_every_block_parallel_rank_is_db1_parallels_rank_at_its_blocks_depth():
    # 12 layers on B ranks, one block each, nothing else resident: db:5+parallel (3, 3, 2, 2, 2), db:12
    # (one layer each) and db:2 (6 + 6, traced at 6 as it is).
    spec = get_preset("llama-tiny").at_depth(12)
    kept: dict = {}
    settings = dict(layers=12, not_identical=None, parallel=True, precision="fp32", round_to=512)
    for technique in ("db:5", "db:12", "db:2"):
        tech = parse_technique(technique)
        name = f"{technique}+parallel"
        derived = simulate_fake(
            spec, name, tech, 2, tech.blocks, block_traces=kept, optimizer="adamw-foreach", **settings
        )
        full = simulate_fake(spec, name, tech, 2, tech.blocks, full_trace=True, optimizer="adamw-foreach", **settings)
        assert derived.extra["depth"]["path"] == PATH_EXTRAPOLATED
        assert "db:1+parallel's one rank" in derived.extra["depth"]["reason"]
        assert _figures(derived) == _figures(full), technique  # rank_peaks, rank_step_flops, collectives too
    # The line for the parameter counts at 1, 2, 3 layers (PARALLEL_LINE_DEPTHS), and db:2's blocks at 6.
    assert sorted(key[-1] for key in kept if key[:2] == ("rank", "db:1+parallel")) == [1, 2, 3, 6]


def test_which_techniques_are_derived():
    assert shares_block_traces(parse_technique("db:4"), 32, None, False)
    assert shares_block_traces(parse_technique("db:4+ckpt"), 32, None, False)
    assert not shares_block_traces(parse_technique("db:4+offload"), 32, None, False)  # blocks live on the host
    assert not shares_block_traces(parse_technique("db:1"), 32, None, False)
    assert not shares_block_traces(parse_technique("db:4"), 32, "layer 3 differs", False)
    assert not shares_block_traces(parse_technique("db:4"), 32, None, True)  # --full-trace
    assert not shares_block_traces(parse_technique("db:4"), 9, None, False)  # 2 + 3 + 4 layers: no cheaper


def _record(first: list[int], op: str = "aten.embedding") -> StepRecord:
    return StepRecord(peak_bytes=sum(first), shares={}, peak_phase="forward", trace=[(op, [0, *first])])


def test_one_layers_resident_bytes_must_be_the_same_at_every_depth():
    assert resident_per_layer([_record([10, 4]), _record([13, 6]), _record([16, 8])]) == [3, 2]
    with pytest.raises(NotAffine, match="resident bytes differ"):
        resident_per_layer([_record([10, 4]), _record([13, 6]), _record([17, 8])])
    with pytest.raises(NotAffine, match="different ops"):
        resident_per_layer([_record([10, 4]), _record([13, 6], op="aten.mm"), _record([16, 8])])


def test_a_failed_one_block_trace_is_not_derived_from():
    failed = Measurement.failed("db:1", 2, "RuntimeError: no", fake=True)
    assert derived_blocks(lambda depth: (failed, {}), parse_technique("db:4"), 32) is None
