"""The HTML reports: ``render_run`` turns one ``RunResult`` into a self-contained page that a
team lead reads in two minutes (verdict first, then the evidence), and ``render_comparison``
puts several runs side by side. Pages need no network and no JavaScript: CSS is inline and
charts are inline SVG from ``dbprofile.report.charts``. Every string that came from the user
or the run (model and technique names, commands, error messages, environment values) goes
through ``esc`` (HTML escaping) before it touches the page.

The verdict is the one stored with the run (computed once when the run ended); a page
without one leads with the measured facts and says why there is no verdict. The shared page
pieces are in ``dbprofile.report.page``, the comparison page in ``dbprofile.report.comparison``."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dbprofile.files import write_atomic
from dbprofile.report import charts
from dbprofile.report.page import (
    bytes_cell,
    change_vs,
    chart_html,
    e2e_baseline,
    esc,
    humanise,
    largest_share,
    milliseconds,
    page_html,
    percent,
    section_html,
    stored_verdict,
    subtitle,
    technique_label,
    verdict_html,
)
from dbprofile.report.tradeoff import run_tradeoff_svg
from dbprofile.results import Measurement, RunResult
from dbprofile.units import format_bytes
from dbprofile.vocabulary import CATEGORIES

CUDA_GAP_EXPLANATION = (
    "Reserved is larger than allocated because PyTorch's caching allocator keeps freed blocks for reuse; "
    "NVML (what nvidia-smi shows) is larger still because it also counts the CUDA context and the libraries "
    "(cuBLAS, cuDNN workspaces) that PyTorch's allocator does not see."
)

TRACKER_TOLERANCE = 0.02
"""DESIGN.md: the tracker's peak must match max_memory_allocated within 2%; beyond it the page warns."""

PHASE_MEANING = {
    "forward": "activations saved for backward are piling up",
    "backward": "saved activations and the new gradients are live together",
    "optimizer": "the optimizer is writing its state and updating parameters",
    "transfer": "parameters or optimizer state are moving between host and device",
}


# ----------------------------------------------------------------------------- helpers


# ----------------------------------------------------------------------------- verdict


def _facts(result: RunResult) -> list[str]:
    """Plain sentences of what was measured, for pages without a verdict."""
    facts: list[str] = []
    for m in result.measurements:
        label = technique_label(m, result)
        if not m.ok:
            reason = f": {m.error}" if m.error else ""
            facts.append(f"{label} did not complete at batch {m.batch_size} ({m.status.upper()}{reason}).")
            continue
        base = e2e_baseline(m, result)
        cat, frac = largest_share(m)
        if m.technique == "e2e" or base is None:
            resident = sum(m.shares.get(c, 0) for c in ("parameters", "gradients", "optimizer_state"))
            facts.append(
                f"{label} peaks at {format_bytes(m.peak_bytes)} at batch {m.batch_size}: activations are "
                f"{percent(m.shares.get('activations', 0), m.peak_bytes)} of it, parameters, gradients and "
                f"optimizer state together {percent(resident, m.peak_bytes)}."
            )
            continue
        text = (f"{label} peaks at {format_bytes(m.peak_bytes)} ({change_vs(m.peak_bytes, base.peak_bytes)} vs e2e); "
                f"its largest share is {charts.category_label(cat)} ({frac:.0%})")
        if base.step_time_s and m.step_time_s:
            unit = "one block-step" if m.blocks or m.block_steps_time_s else "a step"
            text += f"; {unit} takes {m.step_time_s / base.step_time_s:.2f}x an e2e step"
            if m.block_steps_time_s:
                text += f", all {len(m.blocks) or 'B'} block-steps {m.block_steps_time_s / base.step_time_s:.2f}x"
        facts.append(text + ".")
    ok = [m for m in result.measurements if m.ok]
    if len(ok) > 1:
        best = min(ok, key=lambda m: m.peak_bytes)
        facts.append(f"The smallest peak is {technique_label(best, result)} at {format_bytes(best.peak_bytes)}.")
    return facts


def _incomplete_html(result: RunResult) -> str:
    """An interrupted or killed run says so first: its verdict, if any, covers only what finished."""
    return (f'<div class="verdict incomplete"><div class="decision">Incomplete run</div>'
            f'<div class="headline">This run did not finish: {esc(result.incomplete_reason or "the reason was not recorded")}.'
            f'</div><p>The page shows the {len(result.measurements)} measurement(s) that finished; '
            "run the command below again for the rest.</p></div>")


def _verdict_section(result: RunResult) -> str:
    verdict, missing = stored_verdict(result)
    if not result.complete:
        body = _incomplete_html(result)
        if verdict is not None and getattr(verdict, "decision", None) != "inconclusive":
            body += "<p>On the measurements that finished:</p>" + verdict_html(verdict)
        else:
            facts = "".join(f"<li>{esc(f)}</li>" for f in _facts(result)) or "<li>Nothing finished.</li>"
            body += f'<p>What finished:</p><ul class="facts">{facts}</ul>'
        return section_html("verdict", "Verdict", body)
    if verdict is not None:
        return section_html("verdict", "Verdict", verdict_html(verdict))
    facts = "".join(f"<li>{esc(f)}</li>" for f in _facts(result)) or "<li>No measurements in this run.</li>"
    body = (f'<div class="verdict inconclusive"><div class="decision">No verdict available</div>'
            f'<div class="headline">No verdict: {esc(missing)}. The measured facts:</div>'
            f'<ul class="facts">{facts}</ul></div>')
    return section_html("verdict", "Verdict", body)


def _tradeoff_section(result: RunResult) -> str:
    """Memory against compute per trained sample, the capacity, and the recommendation."""
    verdict, _ = stored_verdict(result)
    ok = [m for m in result.measurements if m.ok]
    if not ok or not any(m.training_flops for m in ok):
        return ""
    batch = getattr(verdict, "batch_size", None) or max(m.batch_size for m in ok)
    svg = run_tradeoff_svg(result, batch, getattr(verdict, "capacity_bytes", None),
                           getattr(verdict, "recommended", None))
    if svg is None:
        return ""
    e2e = next((m for m in ok if m.technique == "e2e" and m.batch_size == batch), None)
    rows = []
    for m in ok:
        if m.batch_size != batch or m.flops_per_sample is None:
            continue
        ratio = f"{m.flops_per_sample / e2e.flops_per_sample:.2f}x" if e2e and e2e.flops_per_sample else "n/a"
        time_s = m.block_steps_time_s if m.block_steps_time_s is not None else m.step_time_s
        rows.append(f"<tr><td>{esc(technique_label(m, result))}</td><td class=\"num\">{m.flops_per_sample / 1e9:,.2f}</td>"
                    f"<td class=\"num\">{esc(ratio)}</td><td class=\"num\">{esc(milliseconds(time_s))}</td></tr>")
    note = ('<p class="muted">Each point is a technique at batch size ' + esc(batch) + ': the memory it needs '
            "against the FLOPs that train every layer once on one sample (PyTorch's FlopCounterMode formulas: "
            "matmuls, convolutions, attention; checkpointing's recomputation included; DiffusionBlocks over its B "
            "block-steps). The dashed line is the device's capacity where it is known; the ringed point is the "
            "verdict's recommendation.</p>")
    table = ("<table><tr><th>technique</th><th>GFLOP per sample</th><th>vs e2e</th>"
             f"<th>measured time (step, or B block-steps)</th></tr>{''.join(rows)}</table>")
    return section_html("tradeoff", "Memory and compute", note + chart_html(svg) + table)


# ----------------------------------------------------------------------------- run sections


def _peaks_section(result: RunResult, labels: list[str]) -> str:
    svg = charts.peak_bars(result.measurements, labels)
    note = ('<p class="muted">Each bar is the largest total of live tensor bytes during a measured training step, '
            "split by what the bytes are at that instant; for DiffusionBlocks, the worst block.</p>")
    if any(m.cuda for m in result.measurements):
        note += ('<p class="muted">On CUDA the device needs more than these tensor bytes: the allocator\'s reserved '
                 'memory and NVML\'s figure are in the CUDA section below.</p>')
    return section_html("peaks", "Peak memory per technique", note + chart_html(svg))


def _phase_section(result: RunResult, labels: list[str]) -> str:
    rows = []
    for m, label in zip(result.measurements, labels):
        if not m.ok:
            rows.append(f"<tr><td>{esc(label)}</td><td class=\"bad\" colspan=\"3\">{esc(m.status.upper())}</td></tr>")
            continue
        phase = m.peak_phase or "n/a"
        where = esc(phase)
        if m.peak_block is not None:
            block = next((b for b in m.blocks if b.block == m.peak_block), None)
            layers = f" (layers {charts._span(block.layers)})" if block else ""
            where += f" of block {esc(m.peak_block)}{esc(layers)}"
        cat, frac = largest_share(m)
        swatch = f'<span class="swatch" style="background:{charts.CATEGORY_COLOURS.get(cat, "#ffffff")}"></span>'
        rows.append(f"<tr><td>{esc(label)}</td><td>{where}</td><td>{esc(PHASE_MEANING.get(phase, ''))}</td>"
                    f"<td>{swatch}{esc(charts.category_label(cat))} {frac:.0%}</td></tr>")
    table = ("<table><tr><th>technique</th><th>peak happens in</th><th>what is live then</th>"
             f"<th>largest share at the peak</th></tr>{''.join(rows)}</table>")
    return section_html("phase", "When the peak happens", table)


def _timeline_section(result: RunResult, labels: list[str]) -> str:
    svg = charts.timelines(result.measurements, labels)
    if svg is None:
        return section_html("timelines", "Memory through one step",
                        '<p class="muted">This run recorded no per-step timelines.</p>')
    note = '<p class="muted">Live bytes by category as one measured step runs; shading marks the phases.</p>'
    return section_html("timelines", "Memory through one step", note + chart_html(svg))


def _blocks_section(result: RunResult, labels: list[str]) -> str:
    parts = []
    for m, label in zip(result.measurements, labels):
        if not (m.ok and m.blocks):
            continue
        parts.append(chart_html(charts.block_bars(m, label)))
        cats = [c for c in CATEGORIES if any(b.shares.get(c, 0) for b in m.blocks)]
        head = "".join(f"<th>{esc(charts.category_label(c))}</th>" for c in cats)
        unit = charts.pick_unit(max(b.peak_bytes for b in m.blocks))
        rows = []
        for b in m.blocks:
            cells = "".join(bytes_cell(b.shares.get(c, 0), unit) for c in cats)
            rows.append(f"<tr><td>{esc(b.block)}</td><td>{esc(charts._span(b.layers))}</td>{bytes_cell(b.peak_bytes, unit)}"
                        f"{cells}<td>{esc(b.peak_phase)}</td><td class=\"num\">{esc(milliseconds(b.step_time_s))}</td></tr>")
        parts.append(f"<table><tr><th>block</th><th>layers</th><th>peak</th>{head}<th>phase</th>"
                     f"<th>step time</th></tr>{''.join(rows)}</table>")
    if not parts:
        return ""
    note = ('<p class="muted">Each block trains on its own; the outlined bar is the block with the largest peak, '
            "the one reported above. The first and last blocks also hold the embeddings and the head.</p>")
    return section_html("blocks", "DiffusionBlocks per block", note + "\n".join(parts))


def _times_section(result: RunResult, labels: list[str]) -> str:
    rows: list[tuple[str, float, list[float] | None]] = []
    table = []
    for m, label in zip(result.measurements, labels):
        if not m.ok or m.step_time_s is None or not math.isfinite(m.step_time_s):
            continue
        base = e2e_baseline(m, result)
        base_t = base.step_time_s if base else None
        is_db = bool(m.blocks) or m.block_steps_time_s is not None
        step_label = f"{label} (one block-step)" if is_db else label
        rows.append((step_label, m.step_time_s, m.step_time_spread_s))
        base_iqr = base.step_time_iqr_s if base else None
        table.append(_time_row(step_label, m.step_time_s, m.step_time_iqr_s, base_t, base_iqr))
        if m.block_steps_time_s is not None and math.isfinite(m.block_steps_time_s):
            b = len(m.blocks) or "B"
            bl = f"{label} ({b} block-steps)"
            rows.append((bl, m.block_steps_time_s, None))
            table.append(_time_row(bl, m.block_steps_time_s, m.block_steps_time_iqr_s, base_t, base_iqr))
        if m.transfer_time_s is not None:
            table.append(f"<tr><td>{esc(label)} (host-device transfer per step)</td>"
                         f"<td class=\"num\">{esc(milliseconds(m.transfer_time_s))}</td><td></td><td class=\"num\"></td></tr>")
    if not rows:
        return section_html("times", "Step time", '<p class="muted">No step times were measured.</p>')
    try:
        from dbprofile.verdict import MAX_RATIO_NOISE
        noisy = (f"; a ratio is marked noisy when the two timings' IQRs, relative to their medians, add up to "
                 f"more than {MAX_RATIO_NOISE:.0%}")
    except ImportError:
        noisy = ""
    e2e_times = {m.batch_size: m.step_time_s for m in result.measurements if m.technique == "e2e" and m.ok}
    baseline = next(iter(e2e_times.values())) if len(e2e_times) == 1 else None
    note = ('<p class="muted">A DiffusionBlocks step trains one block; B block-steps update every layer once, '
            "the fair unit against one e2e step. Times are medians of untracked steps timed by "
            "torch.utils.benchmark (at least 1 s per technique, until the interquartile range is under 10% of "
            f"the median or 10 s per unit){noisy}.</p>")
    tab = (f"<table><tr><th>what</th><th>median time</th><th>IQR</th><th>vs e2e step</th></tr>"
           f"{''.join(table)}</table>")
    return section_html("times", "Step time", note + chart_html(charts.step_times(rows, baseline)) + tab)


def _time_row(label: str, time_s: float, iqr_s: float | None, base_s: float | None, base_iqr_s: float | None) -> str:
    """One row of the step-time table: median, IQR (absolute and relative) and the ratio to e2e,
    marked noisy where the verdict would not quote it (dbprofile.verdict.ratio_is_clear)."""
    try:
        from dbprofile.verdict import ratio_is_clear
    except ImportError:  # the page works without the verdict module (see the module docstring)
        ratio_is_clear = None
    iqr = "n/a" if iqr_s is None else f"{milliseconds(iqr_s)} ({iqr_s / time_s:.0%})" if time_s else milliseconds(iqr_s)
    ratio = "n/a"
    if base_s:
        ratio = f"{time_s / base_s:.2f}x"
        if ratio_is_clear is not None and not ratio_is_clear(time_s, iqr_s, base_s, base_iqr_s):
            ratio += " (noisy)"
    return (f"<tr><td>{esc(label)}</td><td class=\"num\">{esc(milliseconds(time_s))}</td><td class=\"num\">{esc(iqr)}</td>"
            f"<td class=\"num\">{esc(ratio)}</td></tr>")


def _numbers_section(result: RunResult, labels: list[str]) -> str:
    ms = result.measurements
    unit = charts.pick_unit(max((m.peak_bytes for m in ms if m.ok), default=0))
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
        row("step time min-max", (text(" - ".join(milliseconds(s) for s in m.step_time_spread_s) if m.step_time_spread_s else "n/a")
                                  for m in ms))
    if any(m.block_steps_time_s is not None for m in ms):
        row("B block-steps time", (text(milliseconds(m.block_steps_time_s)) for m in ms))
        row("B block-steps IQR", (text(milliseconds(m.block_steps_time_iqr_s)) for m in ms))
    if any(m.transfer_time_s is not None for m in ms):
        row("transfer time", (text(milliseconds(m.transfer_time_s)) for m in ms))
    if any(m.num_parameters is not None for m in ms):
        row("parameter count", (text("n/a" if m.num_parameters is None else f"{m.num_parameters:,}") for m in ms))
    if any(m.extra_parameters is not None for m in ms):
        row("extra parameter count", (text("" if m.extra_parameters is None else f"{m.extra_parameters:,}") for m in ms),
            "parameters the technique adds to the model (AdaLN-Zero modulation, sigma embedder)")
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
        items = "".join(f"<li><strong>{esc(', '.join(who))}</strong>, {esc(key)}: {esc(value)}</li>"
                        for (key, value), who in notes.items())
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


def _cuda_section(result: RunResult, labels: list[str]) -> str:
    items = [(m, label) for m, label in zip(result.measurements, labels) if m.cuda]
    if not items:
        return ""
    # The unit fits the tensor figures; NVML's (context included) may read large in it, which is the point.
    unit = charts.pick_unit(max(int(m.cuda.get(k) or 0) for m, _ in items
                                for k in ("max_memory_allocated", "max_memory_reserved")))
    rows = []
    off: list[str] = []
    for m, label in items:
        c = m.cuda
        alloc, reserved, nvml = c.get("max_memory_allocated"), c.get("max_memory_reserved"), c.get("nvml_used_bytes")
        agree = f"{100 * (m.peak_bytes - alloc) / alloc:+.2f}%" if m.ok and alloc else "n/a"
        if m.ok and alloc and abs(m.peak_bytes - alloc) > TRACKER_TOLERANCE * alloc:
            off.append(label)
        rows.append(f"<tr><td>{esc(label)}</td>{bytes_cell(m.peak_bytes if m.ok else None, unit)}{bytes_cell(alloc, unit)}"
                    f"{bytes_cell(reserved, unit)}{bytes_cell(nvml, unit)}<td class=\"num\">{esc(agree)}</td></tr>")
    table = ("<table><tr><th>technique</th><th>tracked peak</th><th>max allocated</th><th>max reserved</th>"
             "<th>NVML used</th><th>tracked vs allocated</th></tr>" + "".join(rows) + "</table>")
    warning = ""
    if off:
        warning = (f'<p class="warn">The tracked peak differs from the allocator\'s max allocated by more than '
                   f"{TRACKER_TOLERANCE:.0%} for {esc(', '.join(off))}: the category shares above do not account for "
                   "all the memory on the device, so read them with care.</p>")
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


def _snapshots_section(result: RunResult, labels: list[str], html_dir: Path | None) -> str:
    """Links to the PyTorch memory snapshots of each tracked step (``--memory-snapshot``)."""
    from dbprofile.measure.snapshot import VIEWER_URL

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
    body = (f'<p>PyTorch\'s own record of every CUDA allocation and free during each tracked step, with the Python '
            f'stack that made it. Open a file at <a href="{esc(VIEWER_URL)}">{esc(VIEWER_URL)}</a> (drag it in; the '
            "page reads it locally, nothing is uploaded) to see the allocator's timeline and its segments.</p>"
            f"<ul>{''.join(items)}</ul>")
    return section_html("snapshots", "PyTorch memory snapshots", body)


def _env_value(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool) and key.endswith("bytes"):
        return f"{format_bytes(value)} ({value:,} bytes)"
    return str(value)


def _env_section(result: RunResult) -> str:
    pairs = [(k, v) for k, v in result.environment.items()]
    if result.created:
        pairs.append(("created", result.created))
    body = "".join(f"<dt>{esc(humanise(k))}</dt><dd>{esc(_env_value(k, v))}</dd>" for k, v in pairs)
    return section_html("environment", "Environment", f'<dl class="env">{body}</dl>' if body else
                    '<p class="muted">The run recorded no environment.</p>')


def _command_section(result: RunResult) -> str:
    if not result.command:
        return section_html("reproduce", "Reproduce", '<p class="muted">The run recorded no command.</p>')
    return section_html("reproduce", "Reproduce", f"<p>This command repeats the run:</p><pre><code>{esc(result.command)}</code></pre>")


# ----------------------------------------------------------------------------- public API


def render_run(result: RunResult, html_dir: Path | None = None) -> str:
    """The HTML page for one run: verdict, peaks, phases, timelines, blocks, times, every
    number, CUDA figures, memory snapshots, environment, and the command that reproduces it.
    ``html_dir``: where the page will live, so links to snapshot files can be relative."""
    labels = [technique_label(m, result) for m in result.measurements]
    sections = [_verdict_section(result)]
    if result.measurements:
        sections += [
            _tradeoff_section(result),
            _peaks_section(result, labels),
            _phase_section(result, labels),
            _timeline_section(result, labels),
            _blocks_section(result, labels),
            _times_section(result, labels),
            _numbers_section(result, labels),
            _cuda_section(result, labels),
            _snapshots_section(result, labels, html_dir),
        ]
    sections += [_env_section(result), _command_section(result)]
    return page_html(f"dbprofile: {result.model}", subtitle(result), sections)


def write_run_report(result: RunResult, path: str | Path) -> Path:
    """Render ``result`` and write it to ``path`` (folders created); returns the path."""
    return write_atomic(path, render_run(result, html_dir=Path(path).parent))


