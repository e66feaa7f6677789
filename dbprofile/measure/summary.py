"""The figures of a measurement from its units' tracked and timed steps: the worst unit's peak and
shares, every DiffusionBlocks block's, the training FLOPs, and the step times (dbprofile.measure.steps
fills the units; depth extrapolation and the interleaved CPU timing summarise theirs the same way), and
what a step adds to the measurement as it runs (its losses, an offloading step's host-link bytes)."""

from __future__ import annotations

import math
import statistics
from typing import Any

from dbprofile.measure.tracking import StepRecord
from dbprofile.results import BlockMeasurement, Measurement
from dbprofile.spread import iqr


class UnitResult:
    """The measured steps of one unit (the whole model, or one block)."""

    def __init__(self) -> None:
        self.records: list[StepRecord] = []
        self.times: list[float] = []
        self.transfer_times: list[float] = []
        self.tracked_times: list[float] = []
        """Wall time of the tracked steps: against ``median``, the tracker's own cost."""
        self.iqr: float | None = None
        """Interquartile range of the timed steps (torch.utils.benchmark's blocks)."""
        self.median: float | None = None
        self.flops: int | None = None  # FLOPs of the tracked step (deterministic: one count suffices)

    @property
    def peak(self) -> StepRecord:
        return max(self.records, key=lambda r: r.peak_bytes)


def worst_figures(per_unit: list[dict]) -> dict:
    """Allocator peaks over every unit (the worst block for DiffusionBlocks); NVML from the last."""
    worst = dict(per_unit[-1])
    for key in ("max_memory_allocated", "max_memory_reserved"):
        worst[key] = max(f[key] for f in per_unit)
    return worst


def summarise(
    m: Measurement, units: list, results: dict, fake: bool, block_layers: list | None, tagged: bool = False
) -> None:
    worst_unit = max(units, key=lambda u: results[u].peak.peak_bytes)
    worst = results[worst_unit]
    peak = worst.peak
    m.peak_bytes = peak.peak_bytes
    m.shares = dict(peak.shares)
    m.peak_phase = peak.peak_phase
    m.timeline = peak.timeline
    if tagged:
        # Bytes at the peak made inside a mixture-of-experts model's routed blocks (dbprofile.measure.regions).
        m.extra["moe_at_peak"] = {cat: peak.tagged_shares.get(cat, 0) for cat in ("activations", "temporaries")}
    state_peaks = [results[u].peak.state_peak for u in units]
    if all(isinstance(v, int) for v in state_peaks):
        # The floor under every batch size's peak (dbprofile.planner.fit.state_floor): each unit steps.
        m.extra["state_peak_bytes"] = max(v for v in state_peaks if isinstance(v, int))
    unit_flops = [results[u].flops for u in units]
    if all(f is not None for f in unit_flops):
        # One step per unit trains every layer once: e2e's one step, DiffusionBlocks' B block-steps.
        m.training_flops = sum(unit_flops)
    if units != [None]:
        m.peak_block = int(worst_unit)
        for unit in units:
            r = results[unit]
            p = r.peak
            m.blocks.append(
                BlockMeasurement(
                    block=int(unit),
                    layers=list(block_layers[unit]) if block_layers else [],
                    peak_bytes=p.peak_bytes,
                    shares=dict(p.shares),
                    peak_phase=p.peak_phase,
                    step_flops=r.flops,
                )
            )
    summarise_times(m, units, results, worst_unit)


def _median_and_iqr(r: UnitResult) -> tuple[float, float]:
    """A unit's timing figures: the timer's own where it made them (torch.utils.benchmark's median
    and IQR, or the interleaved rounds' trimmed mean), else the median and IQR of its step times."""
    median = r.median if r.median is not None else statistics.median(r.times)
    return median, r.iqr if r.iqr is not None else iqr(r.times)


def summarise_times(m: Measurement, units: list, results: dict, worst_unit: int | None) -> None:
    """The timed steps' medians and IQRs into ``m``: the worst unit's as the step time, and for
    DiffusionBlocks each block's and their sum (``m.blocks`` already holds one entry per unit)."""
    worst = results[worst_unit]
    if worst.times:
        m.step_time_s, m.step_time_iqr_s = _median_and_iqr(worst)
        m.step_time_spread_s = [min(worst.times), max(worst.times)]
    if units == [None]:
        return
    for block, unit in zip(m.blocks, units):
        r = results[unit]
        block.step_time_s, block.step_time_iqr_s = _median_and_iqr(r) if r.times else (None, None)
        block.transfer_time_s = statistics.median(r.transfer_times) if any(r.transfer_times) else None
    block_times = [b.step_time_s for b in m.blocks if b.step_time_s is not None]
    if len(block_times) == len(m.blocks):
        m.block_steps_time_s = sum(block_times)
        # The blocks are timed apart; summing their IQRs is the spread if their noise moved
        # together, an upper bound for independent noise.
        m.block_steps_time_iqr_s = sum(b.step_time_iqr_s or 0.0 for b in m.blocks)
        transfers = [t for u in units for t in results[u].transfer_times]
        if any(transfers):
            m.transfer_time_s = statistics.median(transfers)


def record_transfer(m: Measurement, trainer: Any) -> None:
    """An offloading trainer's host-link bytes in its tracked step (the largest over the units):
    ``extra['host_transfer']`` = {'to_host_bytes', 'to_device_bytes'}."""
    moved = getattr(trainer, "last_step_transfer", None)
    if not moved:
        return
    kept = m.extra.setdefault("host_transfer", {})
    for key, value in moved.items():
        kept[key] = max(int(value), kept.get(key, 0))


def record_losses(m: Measurement, losses: list[Any], unit: int | None, when: str = "in a timed step") -> None:
    """Append the steps' losses to ``m``; a non-finite one makes the measurement ``nan``."""
    for value in (float(loss.detach().float()) for loss in losses):
        m.losses.append(value)
        if not math.isfinite(value) and m.status == "ok":
            m.status = "nan"
            where = f" (block {unit})" if unit is not None else ""
            m.error = f"{m.technique}: the loss was {value} {when}{where}; training diverged or the model produces NaN."
            break
