"""DiffusionBlocks at every B from one set of one-block traces (dbprofile.measure.depth's fast path
for db:B): a block-step is the same program whatever B is, so it is traced once per depth, not
once per B.

A block-step of db:B on L identical layers runs the stem, the k layers of its block, the head, the
gradient clip and AdamW's update of the parameters that received gradients (the block's and the
shared ones). The other L - k layers only sit there: their parameters and optimizer state are
resident and untouched for the whole step, and they hold no gradients. Which block it is changes
only values (its noise range), never a shape. So the block-step of a k-layer block is db:1's step
on the model cut to k layers, with every tracked point raised by the resident bytes of L - k more
layers; the peak is at the same instant, in the same phase. db:1 is traced at the depth
extrapolation's depths (2, 3, 4; and 1 when a block has one layer), each block length k is read
off those traces (exactly at a traced depth, else on the line through them, checked at the third:
``step_extrapolation.extrapolate_step``), and the resident bytes of one layer are the step's first
point at one depth minus the same point one layer shallower (checked to be the same at the next
depth). db:2, db:3 and db:4 of one plan then share three traces instead of tracing 6, 9 and 12
block-layers each; blocks of unequal length (L = B * q + r) read two lengths off the same traces.

The allocator replay's reserved bytes come in whole segments and depend on the order of every
allocation, so they are not on a line: on a CUDA target db:1 is traced at depth 5 as well and db:B's
replay is built from db:1's recorded replays (dbprofile.measure.block_replay). Where that cannot be
done (db:1's first step makes a tensor the model keeps), db:B is traced itself (its own shallow traces'
sequences extended, else in full): reserved bytes are never estimated. Offloading (db:B+offload keeps the other blocks on the host, and
moves a block in per step) is traced as before. tests/test_shared_blocks.py compares every derived figure with the full trace's, to the
byte, on vit, gpt, llama and dit presets, with equal and unequal blocks, on the CPU and a CUDA target.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

from dbprofile.measure.block_replay import EVENT_DEPTHS, block_replay, builds_blocks
from dbprofile.measure.event_extrapolation import without_allocator_figures
from dbprofile.measure.step_extrapolation import NotAffine, extrapolate_step, extrapolate_value
from dbprofile.measure.summary import UnitResult, summarise
from dbprofile.measure.tracking import StepRecord, state_bytes
from dbprofile.methods.checkpointing import split_contiguous
from dbprofile.results import Measurement
from dbprofile.techniques import Technique
from dbprofile.vocabulary import CATEGORIES

Traced = tuple[Measurement, dict]
"""A measurement and its units' tracked steps with every point kept (runner ``traces``)."""

LINE_DEPTHS = (2, 3, 4)
"""The one-block traces that give each block length's line (dbprofile.measure.depth.TRACE_DEPTHS)."""

PARALLEL_LINE_DEPTHS = (1, 2, 3)
"""The db:1+parallel ranks whose line gives a block-parallel plan's whole-model figures (its parameter
counts) and nothing else: every rank's step is traced at its own block's length, so no step is
extrapolated and the line may start at one layer; the shallowest three cost least (issue 28: a
llama-70b rank of 4 layers took as long as those of 1 and 2 together)."""


def shares_block_traces(tech: Technique, layers: int, not_identical: str | None, full_trace: bool) -> bool:
    """Whether ``tech`` is derived from one-block traces: plain DiffusionBlocks (with +ckpt or a token
    layout) on one device, B >= 2, identical layers, deeper than the traces together."""
    return (
        tech.is_diffusion_blocks
        and not tech.offload
        and not tech.parallel
        and (tech.blocks or 1) >= 2
        and not full_trace
        and not_identical is None
        and sum(LINE_DEPTHS) < layers
    )


def one_block(tech: Technique) -> Technique:
    """db:1 with ``tech``'s variants: the program every block-step of ``tech`` runs."""
    return dataclasses.replace(tech, blocks=1)


def traced_depths(tech: Technique, layers: int) -> list[int]:
    """The depths db:1 is traced at for ``tech`` on ``layers`` layers: the line's, and any block length
    below it (a line is not extrapolated backwards)."""
    lengths = {len(part) for part in split_contiguous(layers, tech.blocks or 1)}
    return sorted(set(LINE_DEPTHS) | {k for k in lengths if k < LINE_DEPTHS[0]})


def _values(record: StepRecord, index: int) -> list[int]:
    """Bytes per category at one tracked point of a kept trace."""
    assert record.trace is not None
    return list(record.trace[index][1][1:])


def resident_per_layer(records: list[StepRecord]) -> list[int]:
    """Bytes per category that one more layer keeps resident through a step: the first tracked point
    (the same op at every depth) one layer deeper minus the same point, equal at both steps of depth."""
    firsts = [_values(r, 0) for r in records]
    ops = {r.trace[0][0] if r.trace else None for r in records}
    if len(ops) != 1:
        raise NotAffine("the one-block steps start with different ops")
    slopes = [[b - a for a, b in zip(x, y)] for x, y in zip(firsts, firsts[1:])]
    if any(s != slopes[0] for s in slopes) or min(slopes[0]) < 0:
        raise NotAffine("one layer's resident bytes differ between depths")
    return slopes[0]


def _step_at(traced: dict[int, Traced], k: int) -> tuple[StepRecord, int | None, list[str]]:
    """(db:1's tracked step at depth ``k``, its FLOPs, figures found off the line)."""
    if k in traced:
        m, units = traced[k]
        return units[0], m.training_flops, []
    line = [traced[d] for d in LINE_DEPTHS]
    record = extrapolate_step([units[0] for _, units in line], LINE_DEPTHS, k)
    a, b, c = (m.training_flops for m, _ in line)
    not_affine: list[str] = []
    return record, extrapolate_value(a, b, c, k - LINE_DEPTHS[0], "training_flops", not_affine), not_affine


def _raised(record: StepRecord, per_layer: list[int], layers: int) -> StepRecord:
    """``record`` with ``layers`` more resident layers: every point, so the peak, raised alike."""
    shares: dict[str, int] = {c: record.shares.get(c, 0) + per_layer[i] * layers for i, c in enumerate(CATEGORIES)}
    return StepRecord(
        peak_bytes=record.peak_bytes + sum(per_layer) * layers,
        shares=shares,
        peak_phase=record.peak_phase,
        tagged_shares=dict(record.tagged_shares),
        state_peak=None if record.state_peak is None else record.state_peak + state_bytes(per_layer) * layers,
    )


def _block_extra(traced: dict[int, Traced], k: int, not_affine: list[str]) -> dict[str, Any]:
    """The block-step's ``extra`` at ``k`` layers (MoE bytes at the peak and the like: figures of the
    step, not of the whole model), exact at a traced depth, else on the line."""
    if k in traced:
        return copy.deepcopy(traced[k][0].extra)
    a, b, c = (traced[d][0].extra for d in LINE_DEPTHS)
    return extrapolate_value(a, b, c, k - LINE_DEPTHS[0], "extra", not_affine)


def _summed_over_blocks(traced: dict[int, Traced], lengths: list[int], key: str) -> dict[str, int | None]:
    """A figure the tracker sums over every tracked step (one per block), per name: each block's at its
    length, added up (None where a block's is not on the line)."""
    per_length = {k: _block_extra(traced, k, []).get(key) or {} for k in set(lengths)}
    names = {name for figures in per_length.values() for name in figures}
    out: dict[str, int | None] = {}
    for name in sorted(names):
        values = [per_length[k].get(name) for k in lengths]
        out[name] = sum(v for v in values if isinstance(v, int)) if all(isinstance(v, int) for v in values) else None
    return out


def _traced(trace_at: Callable[[int], Traced], depths: list[int]) -> dict[int, Traced]:
    """db:1's run (or rank) at each depth, each one block's; NotAffine when one failed."""
    traced = {d: trace_at(d) for d in depths}
    for m, units in traced.values():
        if not m.ok:
            raise NotAffine(f"a one-block trace failed ({m.status}: {m.error})")
        if len(units) != 1:
            raise NotAffine("a one-block trace did not run one block")
    return traced


def _of_whole_model(
    traced: dict[int, Traced], tech: Technique, layers: int, not_affine: list[str], depths: tuple = LINE_DEPTHS
) -> Measurement:
    """The derived measurement's frame: the middle trace of the line through ``depths`` renamed, with the
    parameter counts of the whole model (every layer counts, resident or elsewhere) on that line to
    ``layers``."""
    line = [traced[d][0] for d in depths]
    m = copy.deepcopy(line[1])
    m.technique = tech.name
    m.blocks, m.timeline = [], {}
    for name in ("num_parameters", "extra_parameters"):
        a, b, c = (getattr(x, name) for x in line)
        setattr(m, name, extrapolate_value(a, b, c, layers - depths[0], name, not_affine))
    return m


def _replayed_blocks(traced: dict[int, Traced], parts: list[list[int]], layers: int) -> dict:
    """db:B's allocator figures replayed exactly from db:1's recorded replays (block_replay); NotAffine
    where they do not build it (the caller traces db:B itself: reserved bytes are never estimated,
    dbprofile.measure.depth._allocator_figures)."""
    try:
        return block_replay({d: units for d, (_, units) in traced.items()}, [len(p) for p in parts], layers)
    except NotAffine as err:
        raise NotAffine(f"db:1's allocator replays do not build db:B's: {err}") from err


def _records_allocator(traced: dict[int, Traced]) -> bool:
    """Whether db:1's traces recorded allocator replays that db:B's is built from (a CUDA target, the
    state made without steps)."""
    return all(builds_blocks(units) for _, units in traced.values())


def derive_blocks(trace_at: Callable[[int], Traced], tech: Technique, layers: int) -> tuple[Measurement, list, list]:
    """db:B (``tech``) on ``layers`` identical layers from db:1's traces (module docstring):
    (the measurement, the depths traced, figures not affine). ``trace_at(depth)`` runs db:1 with
    ``tech``'s variants on the model cut to ``depth`` layers, keeping every point. Raises NotAffine
    when the traces do not line up (the caller traces db:B itself)."""
    parts = [list(r) for r in split_contiguous(layers, tech.blocks or 1)]
    depths = traced_depths(tech, layers)
    traced = _traced(trace_at, depths)
    if _records_allocator(traced):  # the allocator's replay is extended from one depth more
        depths = sorted(set(depths) | set(EVENT_DEPTHS))
        traced.update(_traced(trace_at, [d for d in depths if d not in traced]))
    per_layer = resident_per_layer([traced[d][1][0] for d in LINE_DEPTHS])
    not_affine: list[str] = []
    steps: dict[int, tuple[StepRecord, int | None]] = {}
    for k in sorted({len(p) for p in parts}):
        record, flops, off_line = _step_at(traced, k)
        not_affine += off_line
        steps[k] = (_raised(record, per_layer, layers - k), flops)
    results = {}
    for unit, part in enumerate(parts):
        r = UnitResult()
        record, r.flops = steps[len(part)]
        r.records.append(record)
        results[unit] = r
    m = _of_whole_model(traced, tech, layers, not_affine)
    worst = max(results, key=lambda unit: results[unit].peak.peak_bytes)  # the first, as summarise picks
    worst_k = len(parts[worst])
    m.extra = _block_extra(traced, worst_k, not_affine)
    if "collective_bytes" in m.extra:  # a simulated rank's collectives, summed over its tracked steps
        m.extra["collective_bytes"] = _summed_over_blocks(traced, [len(p) for p in parts], "collective_bytes")
    summarise(m, list(range(len(parts))), results, True, parts)
    # How db:1's traces made their state: not a way db:B's own runs must learn (depth.measure_fake).
    m.extra["warmup"] = f"{one_block(tech).name} traces"
    if isinstance(m.extra.get("allocator_model"), dict):  # a CUDA target: replayed, none of it off a line
        m.extra["allocator_model"] = _replayed_blocks(traced, parts, layers)
        not_affine = without_allocator_figures(not_affine)
    return m, depths, sorted(set(not_affine))


def derive_parallel(trace_at: Callable[[int], Traced], tech: Technique, layers: int) -> tuple[Measurement, list, list]:
    """db:B+parallel's ranks (``tech``: B ranks, one block each) on ``layers`` identical layers from
    db:1+parallel's rank: a rank holds its own block and the shared parts (every other block's layers
    are on ``meta``, no memory), all-reduces the shared gradients in place and steps what it holds, so
    rank r is db:1+parallel's one rank on the model cut to its block's k layers, with nothing else
    resident; only the noise range (values) tells the ranks apart. Each block length is traced as it is,
    so every figure is a traced one. (The measurement, the depths traced, figures not affine): the worst
    rank, the first of the longest blocks, with every rank's peak in ``extra['rank_peaks']`` and FLOPs
    in ``extra['rank_step_flops']``, as simulate_rank gives them."""
    parts = [list(r) for r in split_contiguous(layers, tech.blocks or 1)]
    # Each block length traced as it is (one rank of k layers costs less than the representative ranks'
    # builds of the whole model); the line's depths for the parameter counts of the whole model.
    depths = sorted(set(PARALLEL_LINE_DEPTHS) | {len(p) for p in parts})
    traced = _traced(trace_at, depths)
    not_affine: list[str] = []
    steps = {d: (next(iter(units.values())), m.training_flops) for d, (m, units) in traced.items()}
    peaks = [steps[len(p)][0].peak_bytes for p in parts]
    worst = peaks.index(max(peaks))  # the first rank with the largest peak, as simulate_rank picks
    k = len(parts[worst])
    m = _of_whole_model(traced, tech, layers, not_affine, PARALLEL_LINE_DEPTHS)
    m.extra = _block_extra(traced, k, not_affine)
    r = UnitResult()
    record, r.flops = steps[k]
    r.records.append(record)
    summarise(m, [worst], {worst: r}, True, parts)
    flops = [steps[len(p)][1] for p in parts]
    m.extra.update(rank=worst, world_size=len(parts), rank_peaks=peaks, warmup=f"{one_block(tech).name} ranks")
    if all(isinstance(f, int) for f in flops):
        m.extra["rank_step_flops"] = flops
        m.training_flops = sum(f for f in flops if isinstance(f, int))
    return m, depths, sorted(set(not_affine))
