"""Charts of the comparison page: peaks per technique across runs, and a sweep's lines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dbprofile.report.charts import (
    SERIES_COLOURS,
    chart_style,
    new_figure,
    svg_from_figure,
)
from dbprofile.results import Measurement
from dbprofile.units import UNIT_BYTES, pick_unit


def _mark_failure(ax: Any, x: float, top: float, status: str) -> None:
    """A technique that did not finish: its status, upright on the axis where its bar or point would be."""
    ax.text(
        x,
        top * 0.02,
        status.upper(),
        rotation=90,
        ha="center",
        va="bottom",
        color="#B00020",
        fontweight="bold",
        fontsize=8,
    )


def comparison_peaks(techniques: Sequence[str], series: Sequence[tuple[str, dict[str, Measurement]]]) -> str:
    """Grouped bars: for each technique, one bar per series (a run at one batch size) with
    its peak; a series that ran out of memory or failed shows its status instead of a bar."""
    with chart_style():
        fig = new_figure(max(6.0, 1.0 + 1.1 * len(techniques) * max(1, len(series)) ** 0.5), 3.4)
        ax = fig.add_subplot()
        peaks = [m.peak_bytes for _, ms in series for m in ms.values() if m.ok]
        unit = pick_unit(max(peaks, default=0))
        scale = UNIT_BYTES[unit]
        top = max(peaks, default=0) / scale or 1.0
        width = 0.8 / max(1, len(series))
        for s, (label, ms) in enumerate(series):
            colour = SERIES_COLOURS[s % len(SERIES_COLOURS)]
            for t, tech in enumerate(techniques):
                x = t - 0.4 + width * (s + 0.5)
                m = ms.get(tech)
                if m is None:
                    continue
                if m.ok:
                    bars = ax.bar([x], [m.peak_bytes / scale], width=width * 0.92, color=colour)
                    bars[0].set_gid(f"cmp-bar-{s}-{t}")
                else:
                    _mark_failure(ax, x, top, m.status)
            ax.bar([0], [0], color=colour, label=label)  # legend entry
        ax.set_xticks(range(len(techniques)), list(techniques))
        ax.set_ylabel(f"peak memory ({unit})")
        ax.set_ylim(0, top * 1.1)
        ax.grid(axis="y", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        return svg_from_figure(fig, "comparison-peaks")


def sweep_lines(xlabel: str, series: Sequence[tuple[str, Sequence[tuple[int, Measurement]]]]) -> str:
    """Peak memory against a swept shape (sequence length, image size): one line per technique
    through its measurements; a value where the technique failed (OOM, error) is marked on the
    axis with its status instead of a point."""
    with chart_style():
        fig = new_figure(7.0, 3.4)
        ax = fig.add_subplot()
        peaks = [m.peak_bytes for _, points in series for _, m in points if m.ok]
        unit = pick_unit(max(peaks, default=0))
        scale = UNIT_BYTES[unit]
        top = max(peaks, default=0) / scale or 1.0
        for s, (technique, points) in enumerate(series):
            colour = SERIES_COLOURS[s % len(SERIES_COLOURS)]
            ok = [(x, m.peak_bytes / scale) for x, m in points if m.ok]
            if ok:
                ax.plot([p[0] for p in ok], [p[1] for p in ok], marker="o", color=colour, label=technique)
            for x, m in points:
                if not m.ok:
                    _mark_failure(ax, x, top, m.status)
        xs = sorted({x for _, points in series for x, _ in points})
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"peak memory ({unit})")
        ax.set_ylim(0, top * 1.1)
        ax.grid(color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        return svg_from_figure(fig, "sweep-lines")
