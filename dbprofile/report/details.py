"""The evidence sections of a run report, after the verdict and the charts: every number
behind them (exact bytes on hover), the CUDA allocator's figures beside the tracker's, the
memory snapshots, the environment and the command that reproduces the run."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dbprofile.report import charts
from dbprofile.report.page import (
    bytes_cell,
    change_vs,
    e2e_baseline,
    esc,
    humanise,
    milliseconds,
    section_html,
)
from dbprofile.results import Measurement, RunResult
from dbprofile.units import format_bytes, pick_unit
from dbprofile.vocabulary import CATEGORIES

CUDA_GAP_EXPLANATION = (
    "Reserved is larger than allocated because PyTorch's caching allocator keeps freed blocks for reuse; "
    "NVML (what nvidia-smi shows) is larger still because it also counts the CUDA context and the libraries "
    "(cuBLAS, cuDNN workspaces) that PyTorch's allocator does not see."
)


TRACKER_TOLERANCE = 0.02
"""DESIGN.md: the tracker's peak must match max_memory_allocated within 2%; beyond it the page warns."""


def numbers_section(result: RunResult, labels: list[str]) -> str:
    ms = result.measurements
    unit = pick_unit(max((m.peak_bytes for m in ms if m.ok), default=0))
    head = "".join(f"<th>{esc(label)}</th>" for label in labels)
    rows: list[str] = []

    def row(name: str, cells: Iterable[str], title: str = "") -> None:
        attr = f' title="{esc(title)}"' if title else ""
        rows.append(f"<tr><th{attr}>{esc(name)}</th>{''.join(cells)}</tr>")

    def text(value: Any, bad: bool = False) -> str:
        # Short figures align right like numbers; long prose (error messages) wraps.
        css = "bad" if bad else ("num" if len(str(value)) <= 40 else "long")
        return f'<td class="{css}">{esc(value)}</td>'

    row("status", (text(m.status, bad=not m.ok) for m in ms))
    row("batch size", (text(m.batch_size) for m in ms))
    row("peak", (bytes_cell(m.peak_bytes if m.ok else None, unit) for m in ms))
    for cat in CATEGORIES:
        if any(m.shares.get(cat, 0) for m in ms):
            row(charts.category_label(cat), (bytes_cell(m.shares.get(cat, 0) if m.ok else None, unit) for m in ms))
    row("peak vs e2e", (text(_peak_vs_e2e(m, result)) for m in ms))
    row("peak phase", (text(m.peak_phase or "n/a") for m in ms))
    if any(m.peak_block is not None for m in ms):
        row("peak block", (text("" if m.peak_block is None else m.peak_block) for m in ms))
    row("step time", (text(milliseconds(m.step_time_s)) for m in ms))
    if any(m.step_time_iqr_s is not None for m in ms):
        row("step time IQR", (text(milliseconds(m.step_time_iqr_s)) for m in ms))
    if any(m.step_time_spread_s for m in ms):
        row(
            "step time min-max",
            (
                text(" - ".join(milliseconds(s) for s in m.step_time_spread_s) if m.step_time_spread_s else "n/a")
                for m in ms
            ),
        )
    if any(m.block_steps_time_s is not None for m in ms):
        row("B block-steps time", (text(milliseconds(m.block_steps_time_s)) for m in ms))
        row("B block-steps IQR", (text(milliseconds(m.block_steps_time_iqr_s)) for m in ms))
    if any(m.transfer_time_s is not None for m in ms):
        row("transfer time", (text(milliseconds(m.transfer_time_s)) for m in ms))
    if any(m.num_parameters is not None for m in ms):
        row("parameter count", (text("n/a" if m.num_parameters is None else f"{m.num_parameters:,}") for m in ms))
    if any(m.extra_parameters is not None for m in ms):
        row(
            "extra parameter count",
            (text("" if m.extra_parameters is None else f"{m.extra_parameters:,}") for m in ms),
            "parameters the technique adds to the model (AdaLN-Zero modulation, sigma embedder)",
        )
    for key in ("precision", "optimizer", "device"):
        row(key, (text(getattr(m, key)) for m in ms))
    if any(m.fake for m in ms):
        row("fake tensors", (text("yes" if m.fake else "no") for m in ms))
    # Technique facts: short values become rows; prose (messages) goes below the table, once
    # per distinct text, so one long message does not stretch every column.
    flat = [_flatten(m.extra) for m in ms]
    notes: dict[tuple[str, str], list[str]] = {}
    for key in dict.fromkeys(k for f in flat for k in f):
        values = [_extra_value(key, f.get(key)) for f in flat]
        if not any(values):
            continue
        if all(len(v) <= 40 for v in values):
            row(humanise(key), (text(v) for v in values))
            continue
        for label, v in zip(labels, values):
            if v:
                notes.setdefault((humanise(key), v), []).append(label)
    for label, m in zip(labels, ms):
        if m.error:
            notes.setdefault(("error", m.error), []).append(label)
    table = f'<div class="wide"><table class="numbers"><tr><th></th>{head}</tr>{"".join(rows)}</table></div>'
    if notes:
        items = "".join(
            f"<li><strong>{esc(', '.join(who))}</strong>, {esc(key)}: {esc(value)}</li>"
            for (key, value), who in notes.items()
        )
        table += f'<ul class="notes">{items}</ul>'

    return section_html("numbers", "Every number", table)


def _flatten(extra: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Technique facts as one level of rows: {'activation_ratios': {'vs_plain_e2e': 0.4}}
    becomes {'activation_ratios vs_plain_e2e': 0.4}; lists are shown as text."""
    out: dict[str, Any] = {}
    for key, value in extra.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, prefix=f"{name}: "))
        else:
            out[name] = value
    return out


def _peak_vs_e2e(m: Measurement, result: RunResult) -> str:
    base = e2e_baseline(m, result)
    if not m.ok or base is None:
        return "n/a"
    return "baseline" if base is m else change_vs(m.peak_bytes, base.peak_bytes)


def _extra_value(key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and key.endswith("_s"):
        return milliseconds(float(value))
    if isinstance(value, float) and "ratio" in key:
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and key.endswith("bytes"):
        return format_bytes(value)
    return str(value)


def cuda_section(result: RunResult, labels: list[str]) -> str:
    items = [(m, label) for m, label in zip(result.measurements, labels) if m.cuda]
    if not items:
        return ""
    # The unit fits the tensor figures; NVML's (context included) may read large in it, which is the point.
    unit = pick_unit(
        max(int((m.cuda or {}).get(k) or 0) for m, _ in items for k in ("max_memory_allocated", "max_memory_reserved"))
    )
    rows = []
    off: list[str] = []
    for m, label in items:
        c = m.cuda or {}
        alloc, reserved, nvml = c.get("max_memory_allocated"), c.get("max_memory_reserved"), c.get("nvml_used_bytes")
        agree = f"{100 * (m.peak_bytes - alloc) / alloc:+.2f}%" if m.ok and alloc else "n/a"
        if m.ok and alloc and abs(m.peak_bytes - alloc) > TRACKER_TOLERANCE * alloc:
            off.append(label)
        rows.append(
            f"<tr><td>{esc(label)}</td>{bytes_cell(m.peak_bytes if m.ok else None, unit)}{bytes_cell(alloc, unit)}"
            f'{bytes_cell(reserved, unit)}{bytes_cell(nvml, unit)}<td class="num">{esc(agree)}</td></tr>'
        )
    table = (
        "<table><tr><th>technique</th><th>tracked peak</th><th>max allocated</th><th>max reserved</th>"
        "<th>NVML used</th><th>tracked vs allocated</th></tr>" + "".join(rows) + "</table>"
    )
    warning = ""
    if off:
        warning = (
            f'<p class="warn">The tracked peak differs from the allocator\'s max allocated by more than '
            f"{TRACKER_TOLERANCE:.0%} for {esc(', '.join(off))}: the category shares above do not account for "
            "all the memory on the device, so read them with care.</p>"
        )
    return section_html("cuda", "CUDA allocator and NVML", f"<p>{esc(CUDA_GAP_EXPLANATION)}</p>" + table + warning)


def _snapshot_href(path: str, html_dir: Path | None) -> str:
    """A link that works when the report and the snapshots are moved together: relative to the
    report's folder when both are on one drive, else a file URI."""
    if html_dir is not None:
        try:
            return Path(os.path.relpath(Path(path).resolve(), html_dir.resolve())).as_posix()
        except ValueError:  # another drive (Windows)
            pass
    return Path(path).resolve().as_uri()


def snapshots_section(result: RunResult, labels: list[str], html_dir: Path | None) -> str:
    """Links to the PyTorch memory snapshots of each tracked step (``--memory-snapshot``)."""
    from dbprofile.files import MEMORY_VIEWER_URL

    items = []
    for label, m in zip(labels, result.measurements):
        links = []
        for i, path in enumerate(m.memory_snapshots):
            name = f"block {i}" if len(m.memory_snapshots) > 1 else Path(path).name
            worst = " (the reported peak)" if len(m.memory_snapshots) > 1 and m.peak_block == i else ""
            links.append(f'<a href="{esc(_snapshot_href(path, html_dir))}">{esc(name)}</a>{esc(worst)}')
        if links:
            items.append(f"<li><strong>{esc(label)}</strong>: {', '.join(links)}</li>")
    if not items:
        return ""
    body = (
        f"<p>PyTorch's own record of every CUDA allocation and free during each tracked step, with the Python "
        f'stack that made it. Open a file at <a href="{esc(MEMORY_VIEWER_URL)}">{esc(MEMORY_VIEWER_URL)}</a> (drag it in; the '
        "page reads it locally, nothing is uploaded) to see the allocator's timeline and its segments.</p>"
        f"<ul>{''.join(items)}</ul>"
    )
    return section_html("snapshots", "PyTorch memory snapshots", body)


def _env_value(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool) and key.endswith("bytes"):
        return f"{format_bytes(value)} ({value:,} bytes)"
    return str(value)


def env_section(result: RunResult) -> str:
    pairs = [(k, v) for k, v in result.environment.items()]
    if result.created:
        pairs.append(("created", result.created))
    body = "".join(f"<dt>{esc(humanise(k))}</dt><dd>{esc(_env_value(k, v))}</dd>" for k, v in pairs)
    return section_html(
        "environment",
        "Environment",
        f'<dl class="env">{body}</dl>' if body else '<p class="muted">The run recorded no environment.</p>',
    )


def command_section(result: RunResult) -> str:
    if not result.command:
        return section_html("reproduce", "Reproduce", '<p class="muted">The run recorded no command.</p>')
    return section_html(
        "reproduce", "Reproduce", f"<p>This command repeats the run:</p><pre><code>{esc(result.command)}</code></pre>"
    )
