"""Charts for the HTML reports, drawn with matplotlib (no pyplot, so no global figure state)
and returned as inline SVG strings: the stacked peak bar per technique, the per-step memory
timelines, the DiffusionBlocks per-block bars, the step times and the comparison's grouped
peaks. Every category has one fixed colour (``CATEGORY_COLOURS``) in every chart. Text is
kept as SVG ``<text>`` (selectable, small files); matplotlib XML-escapes it, math parsing is
off so a ``$`` in a model name stays literal, and ``svg_from_figure`` refuses any SVG that
would still carry markup it did not draw."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dbprofile.results import BlockMeasurement, Measurement
from dbprofile.units import UNIT_BYTES, pick_unit
from dbprofile.vocabulary import CATEGORIES

# matplotlib is imported where a chart is drawn, not here: importing it costs about 0.3 s, which
# every `dbprofile plan` and `import dbprofile` paid without drawing anything.
if TYPE_CHECKING:  # annotation only: matplotlib 3.6 and 3.7 (supported) have no matplotlib.typing
    from matplotlib.figure import Figure
    from matplotlib.typing import RcKeyType

# Okabe-Ito colour-blind-safe palette; one fixed colour per category, the same in every chart.
CATEGORY_COLOURS: dict[str, str] = {
    "parameters": "#0072B2",
    "buffers": "#999999",
    "gradients": "#E69F00",
    "optimizer_state": "#D55E00",
    "activations": "#009E73",
    "temporaries": "#56B4E9",
    "inputs": "#CC79A7",
    "workspace": "#F0E442",
    "communication": "#000000",
}
# Colours for series in the comparison chart (runs, not categories).
SERIES_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")
PHASE_COLOURS = {"forward": "#f2f2f2", "backward": "#e3ecf6", "optimizer": "#fbeedd", "transfer": "#efe6f5"}

# Timelines longer than this are thinned (keeping each bucket's largest point, so the peak
# survives) to keep the inline SVG small.
MAX_TIMELINE_POINTS = 160

_RC: dict[RcKeyType, Any] = {
    "svg.fonttype": "none",  # text stays text: small, selectable, and escaped by matplotlib
    "text.parse_math": False,  # a '$' in a user's model or technique name is literal
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def chart_style() -> contextlib.AbstractContextManager:
    """Matplotlib settings every chart draws under (text stays text, no math parsing)."""
    import matplotlib

    return matplotlib.rc_context(_RC)


# Markup matplotlib never draws. Text content is escaped ('<' becomes '&lt;'), so only a real
# tag can match; a model name that merely contains "onload=" as text does not.
_UNSAFE = re.compile(r"<\s*(script|foreignobject|iframe|object|embed)|<[^>]*(\son\w+\s*=|javascript:)", re.IGNORECASE)


_PATH_DATA = re.compile(r' d="([^"]*)"')
_NUMBER = re.compile(r"-?\d+\.\d+")


def _round_path(data: str) -> str:
    data = _NUMBER.sub(lambda m: f"{float(m.group(0)):.1f}".rstrip("0").rstrip("."), data)
    return " ".join(data.split())


def category_label(category: str) -> str:
    return category.replace("_", " ")


def svg_from_figure(fig: Figure, name: str) -> str:
    """Serialise ``fig`` as an ``<svg>`` element ready to inline in HTML.

    ``name`` salts matplotlib's generated element ids so that two charts on one page never
    share an id. The XML prolog and DOCTYPE are dropped (they are not allowed inside HTML),
    and so is the metadata block (it only names matplotlib and the date)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({**_RC, "svg.hashsalt": name}):
        fig.savefig(
            buf,
            format="svg",
            bbox_inches="tight",
            metadata={"Date": None, "Creator": None, "Format": None, "Type": None},
        )
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    # Path coordinates to 0.1 pt (invisible on screen) and no line breaks inside them: the
    # timelines' areas shrink from hundreds of kilobytes to tens.
    svg = _PATH_DATA.sub(lambda m: ' d="' + _round_path(m.group(1)) + '"', svg)
    if _UNSAFE.search(svg):
        raise ValueError(f"chart {name!r} produced SVG with active content; refusing to inline it")
    return svg


def new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    with chart_style():
        return Figure(figsize=(width, height), dpi=100)


def present_categories(share_dicts: Sequence[dict[str, int]]) -> list[str]:
    return [c for c in CATEGORIES if any(s.get(c, 0) for s in share_dicts)]


def category_legend(fig: Figure, categories: Sequence[str], ncol: int | None = None) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=CATEGORY_COLOURS[c], label=category_label(c)) for c in categories]
    fig.legend(
        handles=handles, loc="lower center", ncol=ncol or min(len(handles), 7), frameon=False, bbox_to_anchor=(0.5, 1.0)
    )


def peak_bars(measurements: Sequence[Measurement], labels: Sequence[str]) -> str:
    """One horizontal stacked bar per measurement: its peak split into categories.

    Each bar segment carries the SVG id ``peak-bar-<i>-<category>`` (i = the measurement's
    position), so tests and readers of the SVG can find it. Failed measurements get no bar,
    only their status written where the bar would be."""
    with chart_style():
        n = len(measurements)
        fig = new_figure(8.0, 0.9 + 0.45 * n)
        ax = fig.add_subplot()
        unit = pick_unit(max((m.peak_bytes for m in measurements if m.ok), default=0))
        scale = UNIT_BYTES[unit]
        categories = present_categories([m.shares for m in measurements if m.ok])
        rows = list(range(n))[::-1]  # first measurement at the top
        largest = max((m.peak_bytes for m in measurements if m.ok), default=0) / scale or 1.0
        for i, (m, y) in enumerate(zip(measurements, rows)):
            if not m.ok:
                ax.text(
                    0,
                    y,
                    f"  {m.status.upper()}: no peak measured",
                    va="center",
                    ha="left",
                    color="#B00020",
                    fontweight="bold",
                )
                continue
            left = 0.0
            for cat in categories:
                width = m.shares.get(cat, 0) / scale
                if width <= 0:
                    continue
                bars = ax.barh(
                    [y], [width], left=left, color=CATEGORY_COLOURS[cat], height=0.62, edgecolor="white", linewidth=0.5
                )
                bars[0].set_gid(f"peak-bar-{i}-{cat}")
                left += width
            ax.text(left + largest * 0.01, y, f"{m.peak_bytes / scale:.2f} {unit}", va="center", ha="left")
        ax.set_yticks(rows, list(labels))
        ax.set_ylim(-0.6, n - 0.4)
        ax.set_xlim(0, largest * 1.18)
        ax.set_xlabel(f"peak memory ({unit})")
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        if categories:
            category_legend(fig, categories)
        return svg_from_figure(fig, "peak-bars")


def _thin(points: list[list[float]]) -> list[list[float]]:
    if len(points) <= MAX_TIMELINE_POINTS:
        return points
    size = -(-len(points) // MAX_TIMELINE_POINTS)
    return [max(points[s : s + size], key=lambda p: sum(p[1:])) for s in range(0, len(points), size)]


def timelines(measurements: Sequence[Measurement], labels: Sequence[str]) -> str | None:
    """Small multiples, one per measurement with a timeline: live bytes by category through
    one measured step, stacked, with the step's phases shaded behind. Shared y axis so the
    panels compare at a glance. None when no measurement has a timeline."""
    items = [(m, label) for m, label in zip(measurements, labels) if m.ok and m.timeline.get("points")]
    if not items:
        return None
    with chart_style():
        cols = min(3, len(items))
        nrows = -(-len(items) // cols)
        fig = new_figure(3.0 * cols + 0.6, 2.3 * nrows + 0.3)
        axes = fig.subplots(nrows, cols, sharey=True, squeeze=False)
        top = max(max(sum(p[1:]) for p in m.timeline["points"]) for m, _ in items)
        unit = pick_unit(int(top))
        scale = UNIT_BYTES[unit]
        used: list[str] = []
        for k, (m, label) in enumerate(items):
            ax = axes[k // cols][k % cols]
            cats = list(m.timeline.get("categories", CATEGORIES))
            phases = list(m.timeline.get("phases", []))
            points = _thin(m.timeline["points"])
            xs = list(range(len(points)))
            # Shade contiguous runs of one phase behind the area.
            start = 0
            for j in range(1, len(points) + 1):
                if j == len(points) or points[j][0] != points[start][0]:
                    idx = int(points[start][0])
                    phase = phases[idx] if 0 <= idx < len(phases) else ""
                    ax.axvspan(start - 0.5, j - 0.5, color=PHASE_COLOURS.get(phase, "#f7f7f7"), lw=0)
                    if j - start >= 0.12 * len(points):  # a label on a sliver would overlap its neighbour
                        ax.text(
                            (start + j - 1) / 2,
                            1.0,
                            phase,
                            transform=ax.get_xaxis_transform(),
                            ha="center",
                            va="bottom",
                            fontsize=7,
                            color="#555555",
                            clip_on=False,
                        )
                    start = j
            order = [c for c in CATEGORIES if c in cats] + [c for c in cats if c not in CATEGORIES]
            ys, colours = [], []
            for cat in order:
                col = cats.index(cat) + 1
                series = [p[col] / scale for p in points]
                if any(series):
                    ys.append(series)
                    colours.append(CATEGORY_COLOURS.get(cat, "#444444"))
                    if cat not in used:
                        used.append(cat)
            if ys:
                ax.stackplot(xs, ys, colors=colours, linewidth=0)
            ax.set_title(label, fontsize=9, pad=12)
            ax.set_xlim(-0.5, len(points) - 0.5)
            ax.set_xticks([])
            ax.set_xlabel("events through one step")
            if k % cols == 0:
                ax.set_ylabel(f"live memory ({unit})")
        for k in range(len(items), nrows * cols):
            axes[k // cols][k % cols].set_visible(False)
        fig.tight_layout()
        category_legend(fig, [c for c in CATEGORIES if c in used])
        return svg_from_figure(fig, "timelines")


def block_bars(m: Measurement, title: str) -> str:
    """A stacked bar per DiffusionBlocks block (the block's own worst step), the reported
    (largest) block outlined."""
    blocks: list[BlockMeasurement] = m.blocks
    with chart_style():
        fig = new_figure(min(2.2 + 0.8 * len(blocks), 8.0), 2.8)
        ax = fig.add_subplot()
        unit = pick_unit(max(b.peak_bytes for b in blocks))
        scale = UNIT_BYTES[unit]
        categories = present_categories([b.shares for b in blocks])
        worst = max(blocks, key=lambda b: b.peak_bytes).block
        for i, b in enumerate(blocks):
            bottom = 0.0
            for cat in categories:
                height = b.shares.get(cat, 0) / scale
                if height <= 0:
                    continue
                bars = ax.bar(
                    [i],
                    [height],
                    bottom=bottom,
                    color=CATEGORY_COLOURS[cat],
                    width=0.6,
                    edgecolor="white",
                    linewidth=0.5,
                )
                bars[0].set_gid(f"block-bar-{i}-{cat}")
                bottom += height
            if b.block == worst:
                ax.bar([i], [bottom], width=0.6, fill=False, edgecolor="#222222", linewidth=1.4)
            ax.text(i, bottom, f"{b.peak_bytes / scale:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(blocks)), [f"block {b.block}\nlayers {layer_span(b.layers)}" for b in blocks])
        ax.set_ylabel(f"peak ({unit})")
        ax.set_title(title, fontsize=9)
        ax.margins(y=0.15)
        return svg_from_figure(fig, f"blocks-{title}")


def layer_span(layers: Sequence[int]) -> str:
    if not layers:
        return "-"
    if list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(str(x) for x in layers)


def step_times(rows: Sequence[tuple[str, float, list[float] | None]], baseline_s: float | None) -> str:
    """Horizontal bars of seconds per row (label, median, [min, max] or None); with a
    baseline (the e2e step) each bar is annotated with its ratio to it."""
    with chart_style():
        n = len(rows)
        fig = new_figure(8.0, 0.7 + 0.4 * n)
        ax = fig.add_subplot()
        ys = list(range(n))[::-1]
        largest = max(r[1] for r in rows) or 1.0
        for (label, median, spread), y in zip(rows, ys):
            xerr = None
            if spread and len(spread) == 2:
                xerr = [[max(median - spread[0], 0)], [max(spread[1] - median, 0)]]
            ax.barh(
                [y],
                [median],
                color="#4C72B0" if "block-step" not in label else "#8172B3",
                height=0.6,
                xerr=xerr,
                error_kw={"ecolor": "#333333", "capsize": 2, "lw": 0.8},
            )
            note = f"{median * 1000:.1f} ms"
            if baseline_s:
                note += f"  ({median / baseline_s:.2f}x e2e)"
            right = spread[1] if spread and len(spread) == 2 else median
            ax.text(max(right, median) + largest * 0.01, y, note, va="center", ha="left")
        ax.set_yticks(ys, [r[0] for r in rows])
        ax.set_xlim(0, largest * 1.45)
        ax.set_xlabel("seconds (median of measured steps; whiskers: min-max)")
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        return svg_from_figure(fig, "step-times")
