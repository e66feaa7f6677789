"""Depth extrapolation: a fake-tensor measurement of a deep model from traces of two shallow copies.

A fake trace runs every op of every layer, so its cost grows with depth (90 s for a Llama-2-70B
plan). When the residual layers are identical (same class, same module tree, same parameter and
buffer shapes and dtypes), a training step's stream of tracked points is, phase by phase, a prefix,
the same run of points once per layer (or per block of layers), and a suffix, and the bytes at any
point are affine in the depth. So the step is traced at three small depths m1 < m2 < m3 (m counts
layers, or layers per block / checkpointed segment: ``granularity``), and:

- the deeper traces are the shallowest with runs of points inserted, one per loop over the layers
  (dbprofile.measure.step_extrapolation); the bytes of a loop's k-th run are affine in k, so the peak
  at any depth is an aligned point or a loop's first or last run;
- each aligned point's bytes per category are extrapolated along the line through m1 and m2, and
  the line is checked against m3: every aligned point must land on it to the byte, or the technique
  is traced at full depth instead (``extra['depth']['path']`` says which, and why);
- every other integer figure of the measurement (parameter counts, integer leaves of ``extra`` such
  as FLOPs) is extrapolated the same way and checked at m3; a figure that is not affine is dropped
  (None) and named in ``extra['depth']['not_affine']``;
- the CUDA caching allocator's replay (reserved bytes come in whole segments, so they are not on a
  line) is replayed at the target depth from the shallow traces' allocation sequences extended to it
  (dbprofile.measure.event_extrapolation); where they do not extend, the technique is traced in full.

One term is not affine on a CUDA target: gradient clipping stacks one 4-byte norm per parameter
tensor, and the tracker counts that vector in 512-byte blocks (a few KiB for a 70B model); the
extrapolation keeps the shallow copies' rounding, under by at most one block per 128 tensors
(docs/planner.md). Non-identical stacks, and models whose three shallow traces would together be as
deep as the model (cost grows with depth), are traced at full depth. Blocks or segments of unequal
length (L = B * q + r: r parts of q + 1 layers) are traced at depths B * m + r, unequal the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dbprofile.measure.cuda_attention import announce, recorded_calls
from dbprofile.measure.event_extrapolation import extrapolate_events, replayed, without_allocator_figures
from dbprofile.measure.shared_blocks import derive_blocks, derive_parallel, one_block, shares_block_traces
from dbprofile.measure.stack import identical_layers, spec_at_depth, stack_difference
from dbprofile.measure.step_extrapolation import NotAffine, extrapolate_step, extrapolate_value
from dbprofile.measure.tracking import UnitTraces
from dbprofile.methods.checkpointing import split_contiguous
from dbprofile.results import Measurement
from dbprofile.spec import ModelSpec
from dbprofile.techniques import PARALLEL_SUFFIX, Technique

__all__ = [
    "PATH_EXTRAPOLATED",
    "PATH_FULL",
    "TRACE_DEPTHS",
    "by_depth",
    "granularity",
    "identical_layers",
    "measure_fake",
    "simulate_fake",
    "spec_at_depth",
    "stack_difference",
]

TRACE_DEPTHS = (2, 3, 4)
"""Layers (or layers per block / segment) of the three shallow traces: two for the line, one to check it.
Two is the least that shows a first and a last layer apart on both sides of the inserted one."""

PATH_EXTRAPOLATED = "extrapolated"
PATH_FULL = "full-trace"
NOT_EXTRAPOLATED = "the shallow traces did not extrapolate exactly"
"""How a full trace's reason starts when the shallow traces were tried and did not line up."""

Traced = tuple[Measurement, dict]
"""A measurement and its units' tracked steps with every point kept (runner ``traces``)."""


@dataclass
class DepthInfo:
    """Which path a measurement took, recorded as ``extra['depth']``."""

    path: str
    layers: int
    reason: str
    depths: list[int] = field(default_factory=list)
    not_affine: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "layers": self.layers,
            "reason": self.reason,
            "traced_depths": self.depths,
            "not_affine": self.not_affine,
        }


def granularity(tech: Technique) -> int:
    """How many parts the layers are split into, each growing by one layer per step of depth: B
    DiffusionBlocks blocks, k checkpointed segments, else 1 (the whole stack)."""
    if tech.kind == "db":
        return tech.blocks or 1
    if tech.kind == "ckpt" and tech.segments:
        return tech.segments
    return 1


def _allocator_figures(m: Measurement, traced: list[Traced], steps: int, not_affine: list[str]) -> None:
    """The allocator model's figures at the target depth, ``steps`` steps of depth past the first trace:
    the shallow traces' allocation sequences extended to it and replayed, exactly as the full trace
    replays them (dbprofile.measure.event_extrapolation). NotAffine where they do not extend: the
    reserved bytes come in whole segments, off any line, and an estimate of them was measured under the
    full replay's by 4.8% (llama-1b, Adafactor's foreach step on an H100: a largest batch of 9 where 8
    fit), so the technique is traced in full instead."""
    if not isinstance(m.extra.get("allocator_model"), dict):
        return
    recorded = [getattr(getattr(units, "allocator", None), "events", None) for _, units in traced]
    events = [e for e in recorded if isinstance(e, list)]
    if len(events) != len(traced):
        raise NotAffine("the shallow traces recorded no allocation sequences to replay at full depth")
    try:
        m.extra["allocator_model"] = replayed(extrapolate_events(events, steps))
    except NotAffine as err:
        raise NotAffine(f"the allocator's allocation sequences do not extend to full depth: {err}") from err
    not_affine[:] = without_allocator_figures(not_affine)


def _extrapolate_measurement(
    traced: list[Traced], target: int, block_layers: list[list[int]] | None, not_affine: list[str]
) -> Measurement:
    """One rank's measurement at ``target`` layers per unit from its three shallow traces."""
    from dbprofile.measure.summary import UnitResult, summarise

    (m1, t1), (m2, t2), (m3, t3) = traced
    if not (t1.keys() == t2.keys() == t3.keys()):
        raise NotAffine("the DiffusionBlocks units differ between depths")
    grow = target - TRACE_DEPTHS[0]
    m = copy.deepcopy(m2)
    m.blocks, m.timeline = [], {}
    for name in ("num_parameters", "extra_parameters"):
        setattr(
            m, name, extrapolate_value(getattr(m1, name), getattr(m2, name), getattr(m3, name), grow, name, not_affine)
        )
    m.extra = extrapolate_value(m1.extra, m2.extra, m3.extra, grow, "extra", not_affine)
    units = list(t2)
    results = {}
    for unit in units:
        r = UnitResult()
        r.records.append(extrapolate_step([t1[unit], t2[unit], t3[unit]], TRACE_DEPTHS, target))
        # Each unit's FLOPs (matmuls and attention per layer) on the same line, checked at m3.
        f1, f2, f3 = (_unit_flops(x).get(unit) for x in (m1, m2, m3))
        r.flops = extrapolate_value(f1, f2, f3, grow, f"training_flops[{unit}]", not_affine)
        results[unit] = r
    summarise(m, units, results, True, block_layers)
    _allocator_figures(m, traced, grow, not_affine)
    return m


def _unit_flops(m: Measurement) -> dict[int | None, int | None]:
    """The FLOPs of each unit's tracked step: DiffusionBlocks' block-steps, else the one step."""
    return {b.block: b.step_flops for b in m.blocks} if m.blocks else {None: m.training_flops}


def by_depth(
    trace: Callable[[int | None, bool], list[Traced]],
    tech: Technique,
    layers: int,
    not_identical: str | None,
    *,
    group: int | None = None,
    full_trace: bool = False,
    full_trace_reason: str | None = None,
) -> list[Measurement]:
    """Each simulated rank's measurement of ``tech`` at ``layers`` layers, extrapolated from three
    shallow traces where that is exact, else traced in full; ``extra['depth']`` says which and why.

    ``trace(depth, keep)`` runs the technique on the model cut to ``depth`` layers (None: the full
    model) and returns (measurement, unit traces) per rank, keeping every point when ``keep``.
    ``group``: layers that grow together (B for DiffusionBlocks and block-parallel, k for ckpt:k).
    ``full_trace_reason``: why the full trace was forced, where the caller decided it (the plan's
    small-model rule), instead of "asked for a full trace".
    """
    group = group or granularity(tech)
    # Uneven parts (split_contiguous gives the first `rest` parts one layer more) stay uneven the same
    # way at every depth group * m + rest, each part one layer longer per step of m.
    per_part, rest = divmod(layers, group)
    depths = [group * m + rest for m in TRACE_DEPTHS]
    if full_trace:
        reason = full_trace_reason or "asked for a full trace"
    elif not_identical is not None:
        reason = f"the residual layers are not identical: {not_identical}"
    elif sum(depths) >= layers:
        # A trace costs about its depth, so three shallow ones must add up to less than the model.
        reason = f"tracing all {layers} layers costs less than traces at {', '.join(map(str, depths))}"
    else:
        not_affine: list[str] = []
        try:
            runs = [trace(d, True) for d in depths]
            failed = [m for per_rank in runs for m, _ in per_rank if not m.ok]
            if failed:
                raise NotAffine(f"a shallow trace failed ({failed[0].status}: {failed[0].error})")
            if len({len(per_rank) for per_rank in runs}) != 1:
                raise NotAffine("the simulated ranks differ between depths")
            block_layers = [list(r) for r in split_contiguous(layers, tech.blocks)] if tech.blocks is not None else None
            out = [
                _extrapolate_measurement(
                    [runs[0][rank], runs[1][rank], runs[2][rank]], per_part, block_layers, not_affine
                )
                for rank in range(len(runs[0]))
            ]
        except NotAffine as err:
            reason = f"{NOT_EXTRAPOLATED} ({err})"
        else:
            info = DepthInfo(
                PATH_EXTRAPOLATED,
                layers,
                f"{layers} identical layers, traced at {', '.join(map(str, depths))}",
                depths,
                sorted(set(not_affine)),
            )
            for m in out:
                m.extra["depth"] = info.as_dict()
            return out
    out = [m for m, _ in trace(None, False)]
    for m in out:
        m.extra["depth"] = DepthInfo(PATH_FULL, layers, reason).as_dict()
    return out


def measure_fake(
    spec: ModelSpec,
    tech: Technique,
    batch_size: int,
    *,
    layers: int,
    not_identical: str | None,
    full_trace: bool = False,
    full_trace_reason: str | None = None,
    precision: str = "fp32",
    optimizer: str = "adamw",
    round_to: int | None = None,
    emulate_cuda: bool = False,
    micro_batches: int = 1,
    compute_capability: tuple[int, int] = (9, 0),
    state_warmup: str = "off",
    block_traces: dict | None = None,
) -> Measurement:
    """The runner's fake-tensor measurement of ``tech`` (one warm-up, one tracked step) at the model's
    full depth, extrapolated from shallow traces where exact (``by_depth``). ``full_trace`` forces the
    full trace: the function to call for any figure the extrapolation does not carry.
    ``micro_batches``: the step accumulates gradients over that many micro-batches of ``batch_size``.
    ``state_warmup``: RunSettings.state_warmup for the first trace; the later ones start where it
    succeeded (``learned_state_warmup``; ``extra['warmup']`` is 'steps' once one had to warm up by steps).
    DiffusionBlocks on one device is derived from db:1's traces (dbprofile.measure.shared_blocks);
    ``block_traces``, a dict kept by the caller, holds them, so every B of one plan reads the same traces."""
    from dbprofile.measure.runner import activation_ratios, measure
    from dbprofile.measure.warmup import WARMUP_BY_STEPS, learned_state_warmup

    warmup = [state_warmup]

    def tracer(traced_tech: Technique, warmup: list[str]) -> Callable[[int | None, bool], list[Traced]]:
        def trace(depth: int | None, keep: bool) -> list[Traced]:
            traces = UnitTraces() if keep else None
            m = measure(
                spec if depth is None else spec_at_depth(spec, depth),
                traced_tech,
                batch_size,
                device="cpu",
                precision=precision,
                optimizer=optimizer,
                fake=True,
                layers=depth or layers,
                round_to=round_to,
                warmup_steps=1,
                steps=1,
                traces=traces,
                emulate_cuda=emulate_cuda,
                micro_batches=micro_batches,
                compute_capability=compute_capability,
                # DiffusionBlocks' activation ratios are counted once, at full depth, not per shallow trace.
                count_activations=depth is None and micro_batches == 1,
                state_warmup=warmup[0],
            )
            warmup[0] = learned_state_warmup(m.extra.get("warmup"), warmup[0])
            return [(m, traces or {})]

        return trace

    m = None
    if shares_block_traces(tech, layers, not_identical, full_trace):
        one = one_block(tech)
        kept = block_traces if block_traces is not None else {}
        # db:1's own way of making its state, learned once for all its traces (one unit: a model that
        # keeps what its first step makes warms it up by steps).
        trace_one = tracer(one, kept.setdefault(("state warmup", one.name), [state_warmup]))
        setting = (precision, optimizer, round_to, emulate_cuda, compute_capability)

        def trace_at(depth: int) -> Traced:
            key = (one.name, batch_size, micro_batches, setting, depth)
            return kept_trace(kept, key, lambda: trace_one(depth, True)[0])

        m = derived_blocks(trace_at, tech, layers)
    if m is None:
        m = by_depth(
            tracer(tech, warmup),
            tech,
            layers,
            not_identical,
            full_trace=full_trace,
            full_trace_reason=full_trace_reason,
        )[0]
    if m.ok and tech.is_diffusion_blocks and micro_batches == 1 and m.extra["depth"]["path"] == PATH_EXTRAPOLATED:
        activation_ratios(m, spec, tech, batch_size)
    if m.ok and warmup[0] == "off" and state_warmup != "off":
        m.extra["warmup"] = WARMUP_BY_STEPS
    return m


def kept_trace(kept: dict, key: Any, make: Callable[[], Traced]) -> Traced:
    """``kept[key]``, made by ``make()`` the first time. The attention calls made then are kept beside
    it and counted again at every read (``cuda_attention.announce``): the technique that reads a trace
    another one made runs those calls' program too, and the trace cache shares a run between GPUs by
    them (``cuda_attention.recorded_calls``)."""
    if key not in kept:
        with recorded_calls() as calls:
            made = make()
        kept[key] = (made, frozenset(calls))
    made, calls = kept[key]
    announce(calls)
    return made


def derived_blocks(
    trace_at: Callable[[int], Traced], tech: Technique, layers: int, parallel: bool = False
) -> Measurement | None:
    """db:B (``parallel``: db:B+parallel's ranks) derived from db:1's traces (dbprofile.measure.shared_blocks),
    its ``extra['depth']`` saying so; None when they do not line up (the caller traces db:B itself)."""
    try:
        derive = derive_parallel if parallel else derive_blocks
        m, depths, not_affine = derive(trace_at, tech, layers)
    except NotAffine:
        return None
    traced_at = ", ".join(map(str, depths))
    reason = (
        f"{layers} identical layers; every rank is db:1+parallel's one rank traced at {traced_at} layers"
        if parallel
        else f"{layers} identical layers; every block-step is db:1's step traced at {traced_at} layers plus the "
        "other layers' resident bytes"
    )
    m.extra["depth"] = DepthInfo(PATH_EXTRAPOLATED, layers, reason, depths, not_affine).as_dict()
    return m


def simulate_fake(
    spec: ModelSpec,
    name: str,
    tech: Technique,
    batch_size: int,
    world_size: int,
    *,
    layers: int,
    not_identical: str | None,
    parallel: bool,
    full_trace: bool = False,
    full_trace_reason: str | None = None,
    precision: str = "fp32",
    optimizer: str = "adamw",
    round_to: int | None = None,
    tp: int = 1,
    fsdp: bool = True,
    block_traces: dict | None = None,
) -> Measurement:
    """dbprofile.measure.distributed.simulate_rank (one FSDP rank, or every block-parallel rank) at the
    model's full depth, extrapolated from shallow traces where exact; the worst rank, with each
    rank's peak in ``extra['rank_peaks']``. DiffusionBlocks' FSDP ranks are derived from db:1's ranks
    (dbprofile.measure.shared_blocks), kept in ``block_traces`` as in ``measure_fake``."""
    from dbprofile.measure.distributed import representative_ranks, simulate_rank
    from dbprofile.measure.warmup import learned_state_warmup

    # What every simulated rank of this technique shares, at any depth.
    same: dict[str, Any] = {
        "precision": precision,
        "optimizer": optimizer,
        "round_to": round_to,
        "tp": tp,
        "fsdp": fsdp,
    }

    # A rank's state is made without warm-up steps where that is checked to be the warmed-up rank
    # (dbprofile.measure.warmup), learned from the runs so far as in measure_fake.
    warmup = ["all"]

    def tracer(traced: str, world: int) -> Callable[[int | None, bool], list[Traced]]:
        def trace(depth: int | None, keep: bool) -> list[Traced]:
            if not keep:  # the full trace: simulate_rank's own worst rank and rank_peaks
                m = simulate_rank(spec, traced, batch_size, world, state_warmup=warmup[0], **same)
                warmup[0] = learned_state_warmup(m.extra.get("warmup"), warmup[0])
                return [(m, {})]
            rows: list = []
            at_depth = spec_at_depth(spec, depth or layers)
            simulate_rank(at_depth, traced, batch_size, world, per_rank=rows, state_warmup=warmup[0], **same)
            for m, _ in rows:
                m.extra.pop("rank_peaks", None)  # set on that depth's worst rank only; recomputed below
                warmup[0] = learned_state_warmup(m.extra.get("warmup"), warmup[0])
            return rows

        return trace

    if shares_block_traces(tech, layers, not_identical, full_trace):
        # FSDP: db:1's rank of the same world; block-parallel: db:1+parallel's one rank (nothing else resident).
        one, ranks = (f"{one_block(tech).name}{PARALLEL_SUFFIX}", 1) if parallel else (one_block(tech).name, world_size)
        trace_one = tracer(one, ranks)
        kept = block_traces if block_traces is not None else {}

        def one_rank(depth: int) -> Traced:
            rows = trace_one(depth, True)
            if len(rows) != 1:
                raise NotAffine("db:1 simulated more than one rank")
            return rows[0]

        def trace_at(depth: int) -> Traced:
            key = ("rank", one, batch_size, ranks, tuple(sorted(same.items())), depth)
            return kept_trace(kept, key, lambda: one_rank(depth))

        derived = derived_blocks(trace_at, tech, layers, parallel)
        if derived is not None:
            derived.technique = name
            if not parallel:
                derived.extra["rank_peaks"] = [derived.peak_bytes]  # FSDP: rank 0 stands for every rank
            return derived
    # Block-parallel: B ranks, one block each, so the blocks grow by one layer per step of depth.
    rows = by_depth(
        tracer(name, world_size),
        tech,
        layers,
        not_identical,
        group=world_size if parallel else None,
        full_trace=full_trace,
        full_trace_reason=full_trace_reason,
    )
    if rows[0].extra["depth"]["path"] == PATH_FULL:
        return rows[0]
    worst = max(rows, key=lambda row: row.peak_bytes)
    peaks = {row.extra["rank"]: row.peak_bytes for row in rows}
    stands_for = representative_ranks(layers, world_size) if parallel else [0]
    worst.extra["rank_peaks"] = [peaks[rank] for rank in stands_for]
    return worst
