"""The memory-versus-compute view of a run or a plan: every technique that succeeded and had its
FLOPs counted, as (name, device memory it needs, compute per trained sample), the compute
relative to e2e when e2e is among them (else in GFLOP per sample), drawn by
``charts.memory_vs_compute`` with the target's capacity and the verdict's recommendation."""

from __future__ import annotations

from collections.abc import Sequence

from dbprofile.report.charts import chart_style, new_figure, svg_from_figure
from dbprofile.results import Plan, RunResult
from dbprofile.units import UNIT_BYTES, pick_unit


def tradeoff_points(rows: list[tuple[str, int, float | None]]) -> tuple[list[tuple[str, int, float]], str]:
    """(points, x-axis label) from (technique, bytes, FLOPs per sample or None) rows."""
    counted = [(name, nbytes, flops) for name, nbytes, flops in rows if flops]
    e2e = next((flops for name, _, flops in counted if name == "e2e"), None)
    if e2e:
        return (
            [(name, nbytes, flops / e2e) for name, nbytes, flops in counted],
            "training FLOPs per sample, relative to e2e (DiffusionBlocks: its B block-steps)",
        )
    return (
        [(name, nbytes, flops / 1e9) for name, nbytes, flops in counted],
        "training GFLOP per sample (DiffusionBlocks: its B block-steps)",
    )


def plan_tradeoff_svg(plan: Plan) -> str | None:
    """The chart for a plan (None when no entry has counted FLOPs)."""
    rows = [(e.technique, e.peak_bytes, e.flops_per_sample) for e in plan.entries if e.ok]
    points, label = tradeoff_points(rows)
    if not points:
        return None
    recommended = getattr(plan.verdict, "recommended", None)
    return memory_vs_compute(points, plan.capacity_bytes, recommended, label)


def run_tradeoff_svg(
    result: RunResult, batch_size: int, capacity_bytes: int | None, recommended: str | None
) -> str | None:
    """The chart for the measurements of one batch size (None when no FLOPs were counted)."""
    rows = [
        (m.technique, m.peak_bytes, m.flops_per_sample)
        for m in result.measurements
        if m.ok and m.batch_size == batch_size
    ]
    points, label = tradeoff_points(rows)
    if not points:
        return None
    return memory_vs_compute(points, capacity_bytes, recommended, label)


def memory_vs_compute(
    points: Sequence[tuple[str, int, float]], capacity_bytes: int | None, recommended: str | None, x_label: str
) -> str:
    """The trade-off at a glance: each technique as a point of the device memory it needs (y)
    against its compute per trained sample (x), the target's capacity as a dashed line, and the
    recommended technique ringed. ``points`` are (technique, bytes, compute); each marker carries
    the SVG id ``mc-point-<i>`` (i = its position) and the recommended one ``mc-recommended``."""
    with chart_style():
        fig = new_figure(6.4, 3.6)
        ax = fig.add_subplot()
        top = max([b for _, b, _ in points] + ([capacity_bytes] if capacity_bytes else []), default=0)
        unit = pick_unit(top)
        scale = UNIT_BYTES[unit]
        for i, (name, nbytes, compute) in enumerate(points):
            fits = capacity_bytes is None or nbytes <= capacity_bytes
            colour = "#1a7f37" if fits else "#B00020"
            marker = ax.scatter([compute], [nbytes / scale], s=36, color=colour, zorder=3)
            marker.set_gid(f"mc-point-{i}")
            if name == recommended:
                ring = ax.scatter(
                    [compute],
                    [nbytes / scale],
                    s=220,
                    facecolors="none",
                    edgecolors="#222222",
                    linewidths=1.6,
                    zorder=4,
                )
                ring.set_gid("mc-recommended")
                ax.annotate(
                    "recommended",
                    (compute, nbytes / scale),
                    textcoords="offset points",
                    xytext=(6, -12),
                    fontsize=8,
                    fontweight="bold",
                )
        for label, compute, nbytes in label_groups(points):
            ax.annotate(label, (compute, nbytes / scale), textcoords="offset points", xytext=(6, 4), fontsize=8)
        if capacity_bytes:
            line = ax.axhline(capacity_bytes / scale, color="#444444", linestyle="--", linewidth=1.0)
            line.set_gid("mc-capacity")
            ax.text(
                1.0,
                capacity_bytes / scale,
                f" capacity {capacity_bytes / scale:.2f} {unit}",
                transform=ax.get_yaxis_transform(),
                va="center",
                ha="left",
                fontsize=8,
            )
        xs = [c for _, _, c in points]
        if xs:
            span = max(xs) - min(xs) or max(xs) or 1.0
            ax.set_xlim(min(xs) - 0.12 * span, max(xs) + 0.35 * span)
        ax.set_ylim(0, top / scale * 1.15 if top else 1.0)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"device memory needed ({unit})")
        ax.grid(color="#eeeeee", linewidth=0.6)
        ax.set_axisbelow(True)
        return svg_from_figure(fig, "memory-vs-compute")


NEAR_FRACTION = 0.03
"""Points closer than this share of the chart's spans (both axes) share one label."""


def label_groups(points: Sequence[tuple[str, int, float]]) -> list[tuple[str, float, int]]:
    """(label, compute, bytes) per group of points that would draw their names over each other
    (db:3 and db:4 of a small model at the same memory and compute): one label naming them all,
    "db:3, db:4", at the group's first point."""
    xs = [c for _, _, c in points]
    ys = [b for _, b, _ in points]
    x_span = (max(xs) - min(xs)) or max(abs(x) for x in xs) or 1.0
    y_span = (max(ys) - min(ys)) or max(ys) or 1
    groups: list[tuple[list[str], float, int]] = []
    for name, nbytes, compute in points:
        near = next(
            (
                g
                for g in groups
                if abs(g[1] - compute) <= NEAR_FRACTION * x_span and abs(g[2] - nbytes) <= NEAR_FRACTION * y_span
            ),
            None,
        )
        if near is None:
            groups.append(([name], compute, nbytes))
        else:
            near[0].append(name)
    return [(", ".join(names), compute, nbytes) for names, compute, nbytes in groups]
