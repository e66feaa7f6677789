"""The memory-versus-compute view of a run or a plan: every technique that succeeded and had its
FLOPs counted, as (name, device memory it needs, compute per trained sample), the compute
relative to e2e when e2e is among them (else in GFLOP per sample), drawn by
``charts.memory_vs_compute`` with the target's capacity and the verdict's recommendation."""

from __future__ import annotations

from dbprofile.report import charts
from dbprofile.results import Plan, RunResult


def tradeoff_points(rows: list[tuple[str, int, float | None]]) -> tuple[list[tuple[str, int, float]], str]:
    """(points, x-axis label) from (technique, bytes, FLOPs per sample or None) rows."""
    counted = [(name, nbytes, flops) for name, nbytes, flops in rows if flops]
    e2e = next((flops for name, _, flops in counted if name == "e2e"), None)
    if e2e:
        return ([(name, nbytes, flops / e2e) for name, nbytes, flops in counted],
                "training FLOPs per sample, relative to e2e (DiffusionBlocks: its B block-steps)")
    return ([(name, nbytes, flops / 1e9) for name, nbytes, flops in counted],
            "training GFLOP per sample (DiffusionBlocks: its B block-steps)")


def plan_tradeoff_svg(plan: Plan) -> str | None:
    """The chart for a plan (None when no entry has counted FLOPs)."""
    rows = [(e.technique, e.peak_bytes, e.flops_per_sample) for e in plan.entries if e.ok]
    points, label = tradeoff_points(rows)
    if not points:
        return None
    recommended = getattr(plan.verdict, "recommended", None)
    return charts.memory_vs_compute(points, plan.capacity_bytes, recommended, label)


def run_tradeoff_svg(result: RunResult, batch_size: int, capacity_bytes: int | None,
                     recommended: str | None) -> str | None:
    """The chart for the measurements of one batch size (None when no FLOPs were counted)."""
    rows = [(m.technique, m.peak_bytes, m.flops_per_sample) for m in result.measurements
            if m.ok and m.batch_size == batch_size]
    points, label = tradeoff_points(rows)
    if not points:
        return None
    return charts.memory_vs_compute(points, capacity_bytes, recommended, label)
