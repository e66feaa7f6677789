"""Interleaved timing of a run's CPU techniques (docs/timing.md).

A CPU can change speed for tens of seconds at a time (this project's 2-core VM runs the same
step at one of two speeds 1.5x apart), so techniques timed one after another can disagree
with the next run on their ratios by a third, each timing steady on its own. Here every
technique's trainer is built again after the memory measurements, and one block of steps of
each technique, and of each DiffusionBlocks block, is timed in turn, round after round, as
torch.utils.benchmark times a block: every technique sees every speed state in the same
proportion, and its time and IQR come from its own blocks.

The rounds go on until every unit has at least four blocks and ``--steps`` steps and every
technique MIN_TIME_S of timed steps (as in the sequential protocol,
dbprofile.measure.steps.time_unit), then until every technique's ratio to the first is known
to RATIO_PRECISION or MAX_TIME_S per technique has passed.

The trainers must all fit in memory together: when the measured peaks add up to more than
half the free host memory, each technique is timed alone instead (``protocol: sequential``).
A technique whose rebuild or step fails here keeps its memory measurement; the failure is
recorded as ``extra['timing_error']``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dbprofile import progress
from dbprofile.measure.steps import (
    MAX_TIME_S,
    MIN_TIME_S,
    SEED,
    TIMING_THRESHOLD,
    PhaseClock,
)
from dbprofile.measure.summary import UnitResult, record_losses, summarise_times
from dbprofile.measure.timing import time_block
from dbprofile.methods.factory import make_trainer
from dbprofile.results import Measurement
from dbprofile.spec import ModelSpec
from dbprofile.spread import iqr, paired_ratios, relative_iqr
from dbprofile.techniques import Technique

BLOCK_TARGET_S = 0.025
"""A technique's share of one round (its units' blocks together): long against the timer's own
cost, short against a speed state (tens of seconds), so every technique sees every state."""
MIN_BLOCKS = 4
RATIO_PRECISION = 0.02
"""Rounds go on until each technique's median ratio to the first is known to 2% (95% interval)."""
TRIM = 0.1
"""Share of blocks left out at each end of a unit's trimmed mean."""
HOST_SHARE = 0.5
"""Interleave only while the measured peaks add up to at most this share of the free host memory."""


@dataclass
class _Unit:
    """One timed unit: a technique's whole step, or one DiffusionBlocks block-step."""

    m: Measurement
    unit: int | None
    one_step: Callable[[], None]
    result: UnitResult
    losses: list[torch.Tensor] = field(default_factory=list)
    number: int = 1
    raw: list[float] = field(default_factory=list)

    @property
    def timed_s(self) -> float:
        return sum(self.raw)

    @property
    def step_times(self) -> list[float]:
        """Per-step time of each block."""
        return [t / self.number for t in self.raw]


def time_interleaved(
    spec: ModelSpec, entries: list[tuple[Measurement, Technique]], batch_size: int, min_steps: int
) -> None:
    """Time the ok measurements of ``entries`` (one batch size, all on the CPU) interleaved, or
    one at a time where they would not fit in memory together; fills in their step times."""
    entries = [(m, tech) for m, tech in entries if m.ok]
    if not entries:
        return
    needed = sum(m.peak_bytes or 0 for m, _ in entries)
    free = _free_host_bytes()
    if len(entries) > 1 and free is not None and needed <= HOST_SHARE * free:
        _time_together(spec, entries, batch_size, min_steps, "interleaved")
    else:
        for entry in entries:
            _time_together(spec, [entry], batch_size, min_steps, "sequential")


def _time_together(
    spec: ModelSpec, entries: list[tuple[Measurement, Technique]], batch_size: int, min_steps: int, protocol: str
) -> None:
    units: list[_Unit] = []
    for m, tech in entries:
        progress.stage(f"{m.technique} @ batch {batch_size}: building again for the {protocol} timing")
        try:
            units.extend(_build_units(spec, m, tech, batch_size))
        except Exception as err:  # noqa: BLE001 - a timing failure must not lose the memory measurement
            m.extra["timing_error"] = f"{type(err).__name__}: {err}"
    if not units:
        return
    try:
        progress.stage(f"timing {', '.join(m.technique for m, _ in entries)} @ batch {batch_size} ({protocol})")
        time_rounds(units, min_steps)
    except Exception as err:  # noqa: BLE001 - as above: the memory figures stand without times
        for m, _ in entries:
            m.extra["timing_error"] = f"{type(err).__name__}: {err}"
        return
    for m, _ in entries:
        own = [u for u in units if u.m is m]
        if own:
            _summarise(m, own, protocol, len(entries))


def _build_units(spec: ModelSpec, m: Measurement, tech: Technique, batch_size: int) -> list[_Unit]:
    """One timed unit per unit of the technique's trainer (built as the memory measurement built
    it, warmed up with one step per unit), each with a fixed batch; the units' steps hold the
    trainer, which goes when they do."""
    start = time.perf_counter()
    torch.manual_seed(SEED)
    trainer = make_trainer(tech, spec, torch.device("cpu"), precision=m.precision, optimizer=m.optimizer)
    timing = m.extra.setdefault("timing", {})
    timing["build_s"] = timing.get("build_s", 0.0) + time.perf_counter() - start
    units = []
    for unit in trainer.units:
        torch.manual_seed(SEED + 1)
        batch = spec.batch(batch_size, "cpu")
        clock = PhaseClock(None, torch.device("cpu"), False)
        result = UnitResult()
        timed = _Unit(m=m, unit=unit, one_step=lambda: None, result=result)

        def one_step(batch=batch, unit=unit, clock=clock, timed=timed) -> None:
            timed.losses.append(trainer.step(batch, unit, clock.mark))
            timed.result.transfer_times.append(clock.finish())
            clock.transfer_s = 0.0

        timed.one_step = one_step
        warm = time.perf_counter()
        one_step()  # warm-up: optimizer state, lazy initialisation
        _count_steps(m, [time.perf_counter() - warm])
        timed.losses.clear()
        timed.result.transfer_times.clear()
        units.append(timed)
    return units


def time_rounds(units: list[_Unit], min_steps: int) -> None:
    """Round after round, one block of steps of every unit in turn, until the stopping rules
    (module doc) hold. A block is timed as torch.utils.benchmark times one (``time_block``: gc off,
    CUDA synchronised), without the two warm-up steps its ``Timer.timeit`` runs before every
    block, which would triple the cost of blocks of one or two steps; each unit keeps its blocks'
    raw times, and ``_summarise`` makes the statistics from them."""
    cpu = torch.device("cpu")
    per_technique: dict[int, list[_Unit]] = {}
    for u in units:
        per_technique.setdefault(id(u.m), []).append(u)
    for group in per_technique.values():
        # block sizes from one timed step: a technique's blocks of one round take BLOCK_TARGET_S
        # together, so every technique gets the same share of each round (DiffusionBlocks' B
        # blocks split theirs, as the sequential protocol splits MIN_TIME_S)
        for u in group:
            one = time_block(u.one_step, 1, cpu)
            u.number = max(1, round(BLOCK_TARGET_S / (len(group) * max(one, 1e-9))))
    start = time.perf_counter()
    limit = MAX_TIME_S * len(per_technique)
    while True:
        for u in units:
            u.raw.append(time_block(u.one_step, u.number, cpu))
        enough = all(len(u.raw) >= MIN_BLOCKS and len(u.raw) * u.number >= min_steps for u in units) and all(
            sum(u.timed_s for u in group) >= MIN_TIME_S for group in per_technique.values()
        )
        if enough and (_settled(list(per_technique.values())) or time.perf_counter() - start >= limit):
            return


def _settled(groups: list[list[_Unit]]) -> bool:
    """Timed alone: every unit's IQR under TIMING_THRESHOLD of its median (the sequential rule).
    Timed together: every technique's median round-by-round ratio to the first technique (e2e
    in a default run) is known to RATIO_PRECISION (the median's 95% interval, 1.57 * IQR /
    sqrt(rounds), relative to it). Rounds give many small blocks, each noisier than the
    sequential protocol's, so their own IQRs would rarely settle; what the run reports is the
    ratios, and those narrow with every round."""
    if len(groups) == 1:
        return all(_steady(u) for u in groups[0])
    reference = _round_times(groups[0])
    for group in groups[1:]:
        ratios = paired_ratios(_round_times(group), reference)
        if len(ratios) < MIN_BLOCKS or 1.57 * relative_iqr(ratios) / math.sqrt(len(ratios)) > RATIO_PRECISION:
            return False
    return True


def _round_times(group: list[_Unit]) -> list[float]:
    """A technique's step per round (DiffusionBlocks: its B block-steps)."""
    per_unit = [u.step_times for u in group]
    return [sum(times) for times in zip(*per_unit)]


def _steady(u: _Unit) -> bool:
    return relative_iqr(u.step_times) <= TIMING_THRESHOLD


def _summarise(m: Measurement, units: list[_Unit], protocol: str, together: int) -> None:
    results = {}
    for u in units:
        u.result.times = u.step_times
        # The "median" the tables show is a trimmed mean here (the step_time_s field keeps its name):
        # on a machine with two speeds the blocks are a mixture of both, the same mixture for every
        # technique timed in these rounds, so means keep their ratios while a median jumps from one
        # speed to the other as the mixture passes one half (docs/timing.md).
        u.result.median, u.result.iqr = trimmed_mean(u.step_times), iqr(u.step_times)
        results[u.unit] = u.result
        record_losses(m, u.losses, u.unit)
        _count_steps(m, [t for t in u.step_times for _ in range(u.number)])
    keys = [u.unit for u in units]
    worst = m.peak_block if m.peak_block is not None else keys[0]
    summarise_times(m, keys, results, worst)
    timing = m.extra.setdefault("timing", {})
    timing["timed_steps_s"] = timing.get("timed_steps_s", 0.0) + sum(u.timed_s for u in units)
    timing["protocol"] = protocol
    timing["rounds"] = min((len(u.raw) for u in units), default=0)
    timing["timed_together"] = together
    # One figure per round: the technique's step (DiffusionBlocks: its B block-steps) in that round.
    # Rounds are shared by the techniques timed together, so two of them pair round by round
    # (dbprofile.verdict.reasons.paired_ratio_noise): the speed state cancels from each pair.
    timing["round_step_times_s"] = _round_times(units)


def trimmed_mean(values: list[float], cut: float = TRIM) -> float:
    """The mean of ``values`` without the lowest and highest ``cut`` share (a stray slow block,
    another process's burst, must not move it)."""
    ordered = sorted(values)
    drop = int(cut * len(ordered))
    kept = ordered[drop : len(ordered) - drop] or ordered
    return sum(kept) / len(kept)


def _count_steps(m: Measurement, times: list[float]) -> None:
    timing = m.extra.setdefault("timing", {})
    timing["all_steps_s"] = timing.get("all_steps_s", 0.0) + sum(times)
    timing["steps_run"] = timing.get("steps_run", 0) + len(times)


def _free_host_bytes() -> int | None:
    """Free physical memory (not counting reclaimable caches), or None where the OS does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
