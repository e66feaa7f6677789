"""The HTML reports: ``render_run`` turns one ``RunResult`` into a self-contained page that a
team lead reads in two minutes (verdict first, then the evidence), and ``render_comparison``
puts several runs side by side. Pages need no network and no JavaScript: CSS is inline and
charts are inline SVG from ``dbprofile.report.charts``. Every string that came from the user
or the run (model and technique names, commands, error messages, environment values) goes
through ``_e`` (HTML escaping) before it touches the page.

The verdict comes from ``dbprofile.verdict.judge``, imported lazily: without that module the
page leads with the measured facts and says that no verdict is available."""

from __future__ import annotations

import html
import importlib
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dbprofile.report import charts
from dbprofile.report.tradeoff import run_tradeoff_svg
from dbprofile.results import CATEGORIES, UNIT_BYTES, Measurement, RunResult, format_bytes, write_atomic

DECISION_TITLES = {
    "adopt": "Adopt DiffusionBlocks",
    "not-worth-it": "Not worth it",
    "not-needed": "Not needed",
    "inconclusive": "Inconclusive",
}

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

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;color:#1d1d1f;
 max-width:1040px;margin:0 auto;padding:24px 28px 60px;line-height:1.45;background:#fff}
h1{font-size:1.55em;margin:0 0 4px}h2{font-size:1.15em;margin:34px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:1em;margin:18px 0 6px}
.sub{color:#555;margin:0 0 18px}.muted{color:#666;font-size:.9em}
.verdict{border-radius:8px;padding:14px 18px;border-left:6px solid #888;background:#f5f5f7}
.verdict.adopt{border-color:#1a7f37;background:#eef8f0}.verdict.not-worth-it{border-color:#b00020;background:#fcf0f1}
.verdict.not-needed{border-color:#0969da;background:#eef4fc}.verdict.inconclusive{border-color:#9a6700;background:#fdf8ea}
.verdict.incomplete{border-color:#6e40c9;background:#f5f0fd;margin-bottom:10px}
.decision{font-size:.8em;font-weight:700;text-transform:uppercase;letter-spacing:.05em;color:#444}
.headline{font-size:1.25em;font-weight:600;margin:4px 0 8px}
.verdict ul{margin:6px 0 0 0;padding-left:20px}.rule{color:#666;font-size:.8em;font-family:monospace}
.chart{margin:8px 0;overflow-x:auto}.chart svg{max-width:100%;height:auto}
table{border-collapse:collapse;font-size:.88em;margin:6px 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f7;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.bad{color:#b00020;font-weight:600}td.nw{white-space:nowrap}td.long{min-width:16em;max-width:30em;font-size:.92em}
.wide{overflow-x:auto}table.numbers th:first-child{white-space:nowrap}td[title]{cursor:help}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;vertical-align:baseline}
pre{background:#f5f5f7;padding:10px 12px;border-radius:6px;overflow-x:auto;white-space:pre-wrap;word-break:break-all}
dl.env{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;font-size:.9em}
dl.env dt{color:#555}dl.env dd{margin:0;font-family:monospace;word-break:break-all}
.facts li{margin:3px 0}.warn{color:#9a3b00;background:#fff4e5;padding:6px 10px;border-radius:4px}.notes{font-size:.88em;color:#333}
"""


def _e(value: Any) -> str:
    """HTML-escape anything (quotes too, so the result is safe inside attributes)."""
    return html.escape(str(value), quote=True)


# ----------------------------------------------------------------------------- helpers


def _label(m: Measurement, result: RunResult) -> str:
    """A measurement's name on the page: the technique, plus the batch size when the run
    holds several batch sizes, plus the rank for a distributed run (a row per rank)."""
    label = m.technique
    if len({x.batch_size for x in result.measurements}) > 1:
        label += f" @ batch {m.batch_size}"
    if "rank" in m.extra:
        label += f" rank {m.extra['rank']}"
    return label


def _baseline(m: Measurement, result: RunResult) -> Measurement | None:
    """The e2e measurement at the same batch size, when it completed."""
    base = result.get("e2e", m.batch_size)
    return base if base is not None and base.ok else None


def show_bytes(n: int, unit: str) -> str:
    """``n`` in the table's ``unit``; amounts too small to show there (below 0.01 of the unit,
    zero included) get their own unit, so 3112 bytes reads '3.04 KiB', not '0.00 MiB'."""
    scale = UNIT_BYTES.get(unit, 1)
    return format_bytes(n, unit) if abs(n) >= scale / 100 else format_bytes(n)


def _bytes_cell(n: int | None, unit: str) -> str:
    if n is None:
        return '<td class="num">n/a</td>'
    return f'<td class="num" data-bytes="{int(n)}" title="{int(n):,} bytes">{_e(show_bytes(int(n), unit))}</td>'


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "n/a"


def _change(new: float, old: float) -> str:
    """'-42%' / '+8%' relative to old."""
    if not old:
        return "n/a"
    return f"{100 * (new - old) / old:+.0f}%"


def _ms(seconds: float | None) -> str:
    """A duration: milliseconds below a second, seconds above."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "n/a"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _largest_share(m: Measurement) -> tuple[str, float]:
    if not m.peak_bytes:
        return "n/a", 0.0
    cat = max(CATEGORIES, key=lambda c: m.shares.get(c, 0))
    return cat, m.share_fraction(cat)


def _humanise(key: str) -> str:
    return key.replace("_", " ")


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}">\n<h2>{_e(title)}</h2>\n{body}\n</section>'


def _chart(svg: str) -> str:
    return f'<div class="chart">{svg}</div>'


def _page(title: str, subtitle: str, sections: Iterable[str]) -> str:
    from dbprofile import __version__

    body = "\n".join(s for s in sections if s)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n<p class=\"sub\">{subtitle}</p>\n{body}\n"
        f"<p class=\"muted\">Report written by dbprofile {_e(__version__)}. Sizes use IEC units "
        "(1 MiB = 1024<sup>2</sup> bytes); hover a number for its exact bytes.</p>\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------- verdict


def _judge(result: RunResult) -> tuple[Any | None, str | None]:
    """(verdict, None), or (None, why there is none). The verdict module is optional."""
    try:
        verdict_module = importlib.import_module("dbprofile.verdict")
    except ModuleNotFoundError as err:
        if err.name != "dbprofile.verdict":  # the module exists but one of its imports is missing
            raise
        return None, "this dbprofile has no verdict module (dbprofile.verdict)"
    try:
        return verdict_module.judge(result), None
    except Exception as err:  # a report must still show the measurements
        return None, f"the verdict could not be computed ({type(err).__name__}: {err})"


def _verdict_html(verdict: Any) -> str:
    decision = str(getattr(verdict, "decision", "inconclusive"))
    css = decision if decision in DECISION_TITLES else "inconclusive"
    items = []
    for reason in getattr(verdict, "reasons", []) or []:
        rule = getattr(reason, "rule", "")
        sentence = getattr(reason, "sentence", str(reason))
        items.append(f'<li>{_e(sentence)} <span class="rule">[{_e(rule)}]</span></li>')
    reasons = f"<ul>{''.join(items)}</ul>" if items else ""
    return (
        f'<div class="verdict {css}"><div class="decision">{_e(DECISION_TITLES.get(decision, decision))}</div>'
        f'<div class="headline">{_e(getattr(verdict, "headline", ""))}</div>{reasons}</div>'
    )


def _verdict_line(verdict: Any) -> str:
    """The headline, prefixed with the decision unless the headline already starts with it."""
    decision = str(getattr(verdict, "decision", ""))
    title = DECISION_TITLES.get(decision, decision)
    headline = str(getattr(verdict, "headline", ""))
    return headline if headline.lower().startswith(title.lower()) else f"{title}: {headline}"


def _facts(result: RunResult) -> list[str]:
    """Plain sentences of what was measured, for pages without a verdict."""
    facts: list[str] = []
    for m in result.measurements:
        label = _label(m, result)
        if not m.ok:
            reason = f": {m.error}" if m.error else ""
            facts.append(f"{label} did not complete at batch {m.batch_size} ({m.status.upper()}{reason}).")
            continue
        base = _baseline(m, result)
        cat, frac = _largest_share(m)
        if m.technique == "e2e" or base is None:
            resident = sum(m.shares.get(c, 0) for c in ("parameters", "gradients", "optimizer_state"))
            facts.append(
                f"{label} peaks at {format_bytes(m.peak_bytes)} at batch {m.batch_size}: activations are "
                f"{_pct(m.shares.get('activations', 0), m.peak_bytes)} of it, parameters, gradients and "
                f"optimizer state together {_pct(resident, m.peak_bytes)}."
            )
            continue
        text = (f"{label} peaks at {format_bytes(m.peak_bytes)} ({_change(m.peak_bytes, base.peak_bytes)} vs e2e); "
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
        facts.append(f"The smallest peak is {_label(best, result)} at {format_bytes(best.peak_bytes)}.")
    return facts


def _incomplete_html(result: RunResult) -> str:
    """An interrupted or killed run says so first: its verdict, if any, covers only what finished."""
    return (f'<div class="verdict incomplete"><div class="decision">Incomplete run</div>'
            f'<div class="headline">This run did not finish: {_e(result.incomplete_reason or "the reason was not recorded")}.'
            f'</div><p>The page shows the {len(result.measurements)} measurement(s) that finished; '
            "run the command below again for the rest.</p></div>")


def _incomplete_note(result: RunResult) -> str:
    if result.complete:
        return ""
    return f'<div><strong>incomplete:</strong> {_e(result.incomplete_reason or "reason not recorded")}</div>'


def _verdict_section(result: RunResult) -> str:
    verdict, missing = _judge(result)
    if not result.complete:
        body = _incomplete_html(result)
        if verdict is not None and getattr(verdict, "decision", None) != "inconclusive":
            body += "<p>On the measurements that finished:</p>" + _verdict_html(verdict)
        else:
            facts = "".join(f"<li>{_e(f)}</li>" for f in _facts(result)) or "<li>Nothing finished.</li>"
            body += f'<p>What finished:</p><ul class="facts">{facts}</ul>'
        return _section("verdict", "Verdict", body)
    if verdict is not None:
        return _section("verdict", "Verdict", _verdict_html(verdict))
    facts = "".join(f"<li>{_e(f)}</li>" for f in _facts(result)) or "<li>No measurements in this run.</li>"
    body = (f'<div class="verdict inconclusive"><div class="decision">No verdict available</div>'
            f'<div class="headline">No verdict: {_e(missing)}. The measured facts:</div>'
            f'<ul class="facts">{facts}</ul></div>')
    return _section("verdict", "Verdict", body)


def _tradeoff_section(result: RunResult) -> str:
    """Memory against compute per trained sample, the capacity, and the recommendation."""
    verdict, _ = _judge(result)
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
        rows.append(f"<tr><td>{_e(_label(m, result))}</td><td class=\"num\">{m.flops_per_sample / 1e9:,.2f}</td>"
                    f"<td class=\"num\">{_e(ratio)}</td><td class=\"num\">{_e(_ms(time_s))}</td></tr>")
    note = ('<p class="muted">Each point is a technique at batch size ' + _e(batch) + ': the memory it needs '
            "against the FLOPs that train every layer once on one sample (PyTorch's FlopCounterMode formulas: "
            "matmuls, convolutions, attention; checkpointing's recomputation included; DiffusionBlocks over its B "
            "block-steps). The dashed line is the device's capacity where it is known; the ringed point is the "
            "verdict's recommendation.</p>")
    table = ("<table><tr><th>technique</th><th>GFLOP per sample</th><th>vs e2e</th>"
             f"<th>measured time (step, or B block-steps)</th></tr>{''.join(rows)}</table>")
    return _section("tradeoff", "Memory and compute", note + _chart(svg) + table)


# ----------------------------------------------------------------------------- run sections


def _peaks_section(result: RunResult, labels: list[str]) -> str:
    svg = charts.peak_bars(result.measurements, labels)
    note = ('<p class="muted">Each bar is the largest total of live tensor bytes during a measured training step, '
            "split by what the bytes are at that instant; for DiffusionBlocks, the worst block.</p>")
    if any(m.cuda for m in result.measurements):
        note += ('<p class="muted">On CUDA the device needs more than these tensor bytes: the allocator\'s reserved '
                 'memory and NVML\'s figure are in the CUDA section below.</p>')
    return _section("peaks", "Peak memory per technique", note + _chart(svg))


def _phase_section(result: RunResult, labels: list[str]) -> str:
    rows = []
    for m, label in zip(result.measurements, labels):
        if not m.ok:
            rows.append(f"<tr><td>{_e(label)}</td><td class=\"bad\" colspan=\"3\">{_e(m.status.upper())}</td></tr>")
            continue
        phase = m.peak_phase or "n/a"
        where = _e(phase)
        if m.peak_block is not None:
            block = next((b for b in m.blocks if b.block == m.peak_block), None)
            layers = f" (layers {charts._span(block.layers)})" if block else ""
            where += f" of block {_e(m.peak_block)}{_e(layers)}"
        cat, frac = _largest_share(m)
        swatch = f'<span class="swatch" style="background:{charts.CATEGORY_COLOURS.get(cat, "#ffffff")}"></span>'
        rows.append(f"<tr><td>{_e(label)}</td><td>{where}</td><td>{_e(PHASE_MEANING.get(phase, ''))}</td>"
                    f"<td>{swatch}{_e(charts.category_label(cat))} {frac:.0%}</td></tr>")
    table = ("<table><tr><th>technique</th><th>peak happens in</th><th>what is live then</th>"
             f"<th>largest share at the peak</th></tr>{''.join(rows)}</table>")
    return _section("phase", "When the peak happens", table)


def _timeline_section(result: RunResult, labels: list[str]) -> str:
    svg = charts.timelines(result.measurements, labels)
    if svg is None:
        return _section("timelines", "Memory through one step",
                        '<p class="muted">This run recorded no per-step timelines.</p>')
    note = '<p class="muted">Live bytes by category as one measured step runs; shading marks the phases.</p>'
    return _section("timelines", "Memory through one step", note + _chart(svg))


def _blocks_section(result: RunResult, labels: list[str]) -> str:
    parts = []
    for m, label in zip(result.measurements, labels):
        if not (m.ok and m.blocks):
            continue
        parts.append(_chart(charts.block_bars(m, label)))
        cats = [c for c in CATEGORIES if any(b.shares.get(c, 0) for b in m.blocks)]
        head = "".join(f"<th>{_e(charts.category_label(c))}</th>" for c in cats)
        unit = charts.pick_unit(max(b.peak_bytes for b in m.blocks))
        rows = []
        for b in m.blocks:
            cells = "".join(_bytes_cell(b.shares.get(c, 0), unit) for c in cats)
            rows.append(f"<tr><td>{_e(b.block)}</td><td>{_e(charts._span(b.layers))}</td>{_bytes_cell(b.peak_bytes, unit)}"
                        f"{cells}<td>{_e(b.peak_phase)}</td><td class=\"num\">{_e(_ms(b.step_time_s))}</td></tr>")
        parts.append(f"<table><tr><th>block</th><th>layers</th><th>peak</th>{head}<th>phase</th>"
                     f"<th>step time</th></tr>{''.join(rows)}</table>")
    if not parts:
        return ""
    note = ('<p class="muted">Each block trains on its own; the outlined bar is the block with the largest peak, '
            "the one reported above. The first and last blocks also hold the embeddings and the head.</p>")
    return _section("blocks", "DiffusionBlocks per block", note + "\n".join(parts))


def _times_section(result: RunResult, labels: list[str]) -> str:
    rows: list[tuple[str, float, list[float] | None]] = []
    table = []
    for m, label in zip(result.measurements, labels):
        if not m.ok or m.step_time_s is None or not math.isfinite(m.step_time_s):
            continue
        base = _baseline(m, result)
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
            table.append(f"<tr><td>{_e(label)} (host-device transfer per step)</td>"
                         f"<td class=\"num\">{_e(_ms(m.transfer_time_s))}</td><td></td><td class=\"num\"></td></tr>")
    if not rows:
        return _section("times", "Step time", '<p class="muted">No step times were measured.</p>')
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
    return _section("times", "Step time", note + _chart(charts.step_times(rows, baseline)) + tab)


def _time_row(label: str, time_s: float, iqr_s: float | None, base_s: float | None, base_iqr_s: float | None) -> str:
    """One row of the step-time table: median, IQR (absolute and relative) and the ratio to e2e,
    marked noisy where the verdict would not quote it (dbprofile.verdict.ratio_is_clear)."""
    try:
        from dbprofile.verdict import ratio_is_clear
    except ImportError:  # the page works without the verdict module (see the module docstring)
        ratio_is_clear = None
    iqr = "n/a" if iqr_s is None else f"{_ms(iqr_s)} ({iqr_s / time_s:.0%})" if time_s else _ms(iqr_s)
    ratio = "n/a"
    if base_s:
        ratio = f"{time_s / base_s:.2f}x"
        if ratio_is_clear is not None and not ratio_is_clear(time_s, iqr_s, base_s, base_iqr_s):
            ratio += " (noisy)"
    return (f"<tr><td>{_e(label)}</td><td class=\"num\">{_e(_ms(time_s))}</td><td class=\"num\">{_e(iqr)}</td>"
            f"<td class=\"num\">{_e(ratio)}</td></tr>")


def _numbers_section(result: RunResult, labels: list[str]) -> str:
    ms = result.measurements
    unit = charts.pick_unit(max((m.peak_bytes for m in ms if m.ok), default=0))
    head = "".join(f"<th>{_e(label)}</th>" for label in labels)
    rows: list[str] = []

    def row(name: str, cells: Iterable[str], title: str = "") -> None:
        attr = f' title="{_e(title)}"' if title else ""
        rows.append(f"<tr><th{attr}>{_e(name)}</th>{''.join(cells)}</tr>")

    def text(value: Any, bad: bool = False) -> str:
        # Short figures align right like numbers; long prose (error messages) wraps.
        css = "bad" if bad else ("num" if len(str(value)) <= 40 else "long")
        return f'<td class="{css}">{_e(value)}</td>'

    row("status", (text(m.status, bad=not m.ok) for m in ms))
    row("batch size", (text(m.batch_size) for m in ms))
    row("peak", (_bytes_cell(m.peak_bytes if m.ok else None, unit) for m in ms))
    for cat in CATEGORIES:
        if any(m.shares.get(cat, 0) for m in ms):
            row(charts.category_label(cat), (_bytes_cell(m.shares.get(cat, 0) if m.ok else None, unit) for m in ms))
    row("peak vs e2e", (text(_peak_vs_e2e(m, result)) for m in ms))
    row("peak phase", (text(m.peak_phase or "n/a") for m in ms))
    if any(m.peak_block is not None for m in ms):
        row("peak block", (text("" if m.peak_block is None else m.peak_block) for m in ms))
    row("step time", (text(_ms(m.step_time_s)) for m in ms))
    if any(m.step_time_iqr_s is not None for m in ms):
        row("step time IQR", (text(_ms(m.step_time_iqr_s)) for m in ms))
    if any(m.step_time_spread_s for m in ms):
        row("step time min-max", (text(" - ".join(_ms(s) for s in m.step_time_spread_s) if m.step_time_spread_s else "n/a")
                                  for m in ms))
    if any(m.block_steps_time_s is not None for m in ms):
        row("B block-steps time", (text(_ms(m.block_steps_time_s)) for m in ms))
        row("B block-steps IQR", (text(_ms(m.block_steps_time_iqr_s)) for m in ms))
    if any(m.transfer_time_s is not None for m in ms):
        row("transfer time", (text(_ms(m.transfer_time_s)) for m in ms))
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
            row(_humanise(key), (text(v) for v in values))
            continue
        for label, v in zip(labels, values):
            if v:
                notes.setdefault((_humanise(key), v), []).append(label)
    for label, m in zip(labels, ms):
        if m.error:
            notes.setdefault(("error", m.error), []).append(label)
    table = f'<div class="wide"><table class="numbers"><tr><th></th>{head}</tr>{"".join(rows)}</table></div>'
    if notes:
        items = "".join(f"<li><strong>{_e(', '.join(who))}</strong>, {_e(key)}: {_e(value)}</li>"
                        for (key, value), who in notes.items())
        table += f'<ul class="notes">{items}</ul>'

    return _section("numbers", "Every number", table)


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
    base = _baseline(m, result)
    if not m.ok or base is None:
        return "n/a"
    return "baseline" if base is m else _change(m.peak_bytes, base.peak_bytes)


def _extra_value(key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and key.endswith("_s"):
        return _ms(float(value))
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
        rows.append(f"<tr><td>{_e(label)}</td>{_bytes_cell(m.peak_bytes if m.ok else None, unit)}{_bytes_cell(alloc, unit)}"
                    f"{_bytes_cell(reserved, unit)}{_bytes_cell(nvml, unit)}<td class=\"num\">{_e(agree)}</td></tr>")
    table = ("<table><tr><th>technique</th><th>tracked peak</th><th>max allocated</th><th>max reserved</th>"
             "<th>NVML used</th><th>tracked vs allocated</th></tr>" + "".join(rows) + "</table>")
    warning = ""
    if off:
        warning = (f'<p class="warn">The tracked peak differs from the allocator\'s max allocated by more than '
                   f"{TRACKER_TOLERANCE:.0%} for {_e(', '.join(off))}: the category shares above do not account for "
                   "all the memory on the device, so read them with care.</p>")
    return _section("cuda", "CUDA allocator and NVML", f"<p>{_e(CUDA_GAP_EXPLANATION)}</p>" + table + warning)


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
            links.append(f'<a href="{_e(_snapshot_href(path, html_dir))}">{_e(name)}</a>{_e(worst)}')
        if links:
            items.append(f"<li><strong>{_e(label)}</strong>: {', '.join(links)}</li>")
    if not items:
        return ""
    body = (f'<p>PyTorch\'s own record of every CUDA allocation and free during each tracked step, with the Python '
            f'stack that made it. Open a file at <a href="{_e(VIEWER_URL)}">{_e(VIEWER_URL)}</a> (drag it in; the '
            "page reads it locally, nothing is uploaded) to see the allocator's timeline and its segments.</p>"
            f"<ul>{''.join(items)}</ul>")
    return _section("snapshots", "PyTorch memory snapshots", body)


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
    body = "".join(f"<dt>{_e(_humanise(k))}</dt><dd>{_e(_env_value(k, v))}</dd>" for k, v in pairs)
    return _section("environment", "Environment", f'<dl class="env">{body}</dl>' if body else
                    '<p class="muted">The run recorded no environment.</p>')


def _command_section(result: RunResult) -> str:
    if not result.command:
        return _section("reproduce", "Reproduce", '<p class="muted">The run recorded no command.</p>')
    return _section("reproduce", "Reproduce", f"<p>This command repeats the run:</p><pre><code>{_e(result.command)}</code></pre>")


def _subtitle(result: RunResult) -> str:
    info = dict(result.model_info)
    parts = [_e(info.pop("description"))] if info.get("description") else []
    for key in ("family", "task"):
        if info.get(key):
            parts.append(_e(info.pop(key)))
    if info.get("num_layers") is not None:
        parts.append(f"{_e(info.pop('num_layers'))} residual layers")
    if isinstance(info.get("parameters"), int):
        parts.append(f"{info.pop('parameters'):,} parameters")
    parts += [f"{_e(_humanise(k))} {_e(v)}" for k, v in info.items() if not isinstance(v, (dict, list))]
    devices = sorted({m.device for m in result.measurements})
    batches = sorted({m.batch_size for m in result.measurements})
    if devices:
        parts.append("on " + _e(", ".join(devices)))
    if batches:
        parts.append("batch " + _e(", ".join(str(b) for b in batches)))
    if any(m.fake for m in result.measurements):
        parts.append("fake tensors (predicted, nothing allocated)")
    return " · ".join(parts)


# ----------------------------------------------------------------------------- public API


def render_run(result: RunResult, html_dir: Path | None = None) -> str:
    """The HTML page for one run: verdict, peaks, phases, timelines, blocks, times, every
    number, CUDA figures, memory snapshots, environment, and the command that reproduces it.
    ``html_dir``: where the page will live, so links to snapshot files can be relative."""
    labels = [_label(m, result) for m in result.measurements]
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
    return _page(f"dbprofile: {result.model}", _subtitle(result), sections)


# Shapes a run may be made at (``--seq-len``, ``--image-size``), as the run's model_info names
# them, with the axis label of a sweep over them.
SHAPES = {"sequence_length": "sequence length (tokens)", "image_size": "image size (pixels)",
          "latent_size": "latent size (latent pixels)"}


def swept_shape(results: Sequence[RunResult]) -> str | None:
    """The model_info shape key whose value differs between runs of one model (a sweep made
    with several --seq-len or --image-size values), or None."""
    if len(results) < 2 or len({r.model for r in results}) > 1:
        return None
    for key in SHAPES:
        values = [r.model_info.get(key) for r in results]
        if all(isinstance(v, int) for v in values) and len(set(values)) > 1:
            return key
    return None


def _sweep_section(results: Sequence[RunResult], key: str) -> str:
    techniques = sorted(dict.fromkeys(m.technique for r in results for m in r.measurements), key=_technique_order)
    ordered = sorted(results, key=lambda r: r.model_info[key])
    batches = sorted({m.batch_size for r in results for m in r.measurements})
    charts_html = []
    for bs in batches:
        series = [(tech, [(r.model_info[key], m) for r in ordered for m in r.measurements
                          if m.technique == tech and m.batch_size == bs]) for tech in techniques]
        title = f"<h3>batch {bs}</h3>" if len(batches) > 1 else ""
        charts_html.append(title + _chart(charts.sweep_lines(SHAPES[key], series)))
    note = (f'<p class="muted">Peak memory of each technique against the {_e(_humanise(key))}; each point is '
            "the run at that value (the table below has every number).</p>")
    return _section("sweep", f"Peak against {_e(_humanise(key))}", note + "".join(charts_html))


def _series(results: Sequence[RunResult]) -> list[tuple[str, RunResult, int, dict[str, Measurement]]]:
    """One series per (run, batch size): (label, run, batch size, {technique: measurement}).
    Labels name only what differs between the series (model, shape, device, precision, batch)."""
    raw = []
    for i, r in enumerate(results):
        shape = " ".join(f"{_humanise(k)} {r.model_info[k]}" for k in SHAPES if k in r.model_info)
        for bs in dict.fromkeys(m.batch_size for m in r.measurements):
            ms = {m.technique: m for m in r.measurements if m.batch_size == bs}
            first = next(iter(ms.values()))
            raw.append((i, r, bs, ms, {"model": r.model, "shape": shape, "device": first.device,
                                         "precision": first.precision, "batch": f"batch {bs}"}))
    varying = [k for k in ("model", "shape", "device", "precision", "batch") if len({s[4][k] for s in raw}) > 1]
    out = []
    for i, r, bs, ms, keys in raw:
        label = " · ".join(keys[k] for k in varying) or f"run {i + 1}"
        out.append((label, r, bs, ms))
    # Two runs can still coincide on every field (a rerun): number them to keep labels distinct.
    if len({s[0] for s in out}) < len(out):
        out = [(f"{label} (run {results.index(r) + 1})", r, bs, ms) for label, r, bs, ms in out]
    return out


def _technique_order(name: str) -> tuple[int, int, str]:
    """e2e, then ckpt variants, then db:B by B; unrecognised names last (sort is stable)."""
    match = re.match(r"^(e2e|ckpt|db)(?::(\d+))?", name)
    if not match:
        return (3, 0, "")
    kind = ("e2e", "ckpt", "db").index(match.group(1))
    return (kind, int(match.group(2) or 0), name)


def render_comparison(results: list[RunResult], command: str | None = None) -> str:
    """The HTML page comparing runs: one series per run and batch size, a grouped chart of
    peaks per technique, a table of every peak and step time, and each run's details.
    Runs with different technique sets, or holding failed measurements, are fine.
    ``command`` (e.g. the `dbprofile compare ...` line) is shown as the way to rebuild it."""
    if not results:
        raise ValueError("render_comparison needs at least one RunResult")
    series = _series([r for r in results if r.measurements])
    techniques = sorted(dict.fromkeys(m.technique for r in results for m in r.measurements), key=_technique_order)
    sections = []

    summary = []
    for label, r, bs, ms in series:
        verdict, _ = _judge(r)
        ok = [m for m in ms.values() if m.ok]
        bad = [m for m in ms.values() if not m.ok]
        text = f"{label}: "
        base = ms.get("e2e")
        if ok:
            best = min(ok, key=lambda m: m.peak_bytes)
            text += f"smallest peak {format_bytes(best.peak_bytes)} with {best.technique}"
            if base is not None and base.ok and best is not base:
                text += f" ({_change(best.peak_bytes, base.peak_bytes)} vs e2e at {format_bytes(base.peak_bytes)})"
        else:
            text += "no technique completed"
        if bad:
            text += "; did not complete: " + ", ".join(f"{m.technique} ({m.status.upper()})" for m in bad)
        item = _e(text + ".")
        if verdict is not None:
            item += f" <strong>Verdict:</strong> {_e(_verdict_line(verdict))}"
        summary.append(f"<li>{item}</li>")
    sections.append(_section("summary", "Summary", f'<ul class="facts">{"".join(summary)}</ul>'))

    swept = swept_shape([r for r in results if r.measurements])
    if swept:
        sections.append(_sweep_section([r for r in results if r.measurements], swept))
    if series:
        svg = charts.comparison_peaks(techniques, [(label, ms) for label, _, _, ms in series])
        sections.append(_section("peaks", "Peak memory per technique", _chart(svg)))

    unit = charts.pick_unit(max((m.peak_bytes for _, _, _, ms in series for m in ms.values() if m.ok), default=0))
    head = "".join(f"<th>{_e(label)}</th>" for label, _, _, _ in series)
    rows = []
    for tech in techniques:
        cells = []
        for _, _, _, ms in series:
            m = ms.get(tech)
            if m is None:
                cells.append('<td class="muted">not run</td>')
            elif not m.ok:
                cells.append(f'<td class="bad" title="{_e(m.error or "")}">{_e(m.status.upper())}</td>')
            else:
                cells.append(_bytes_cell(m.peak_bytes, unit))
        rows.append(f"<tr><th>{_e(tech)}</th>{''.join(cells)}</tr>")
    peaks_table = f"<h3>Peak</h3><table><tr><th>technique</th>{head}</tr>{''.join(rows)}</table>"
    rows = []
    for tech in techniques:
        cells = []
        for _, _, _, ms in series:
            m = ms.get(tech)
            if m is None:
                cells.append('<td class="muted">not run</td>')
            elif not m.ok:
                cells.append(f'<td class="bad">{_e(m.status.upper())}</td>')
            else:
                cells.append(f'<td class="num">{_e(_ms(m.step_time_s))}</td>')
        rows.append(f"<tr><th>{_e(tech)}</th>{''.join(cells)}</tr>")
    times_table = f"<h3>Step time</h3><table><tr><th>technique</th>{head}</tr>{''.join(rows)}</table>"
    sections.append(_section("numbers", "Every peak and step time", peaks_table + times_table))

    run_rows = []
    for i, r in enumerate(results):
        env = r.environment
        devices = ", ".join(sorted({m.device for m in r.measurements}))
        batches = ", ".join(str(b) for b in sorted({m.batch_size for m in r.measurements}))
        run_rows.append(
            f"<tr><td>{i + 1}</td><td class=\"nw\">{_e(r.model)}</td><td class=\"nw\">{_e(devices)}</td>"
            f"<td>{_e(batches)}</td><td>{_e(env.get('device_name', env.get('device', '')))}</td>"
            f"<td class=\"nw\">{_e(env.get('torch', ''))}</td><td class=\"nw\">{_e(r.created)}</td>"
            f"<td><code>{_e(r.command)}</code>{_incomplete_note(r)}</td></tr>")
    runs = ("<table><tr><th>run</th><th>model</th><th>device</th><th>batch</th><th>device name</th><th>torch</th>"
            f"<th>created</th><th>command</th></tr>{''.join(run_rows)}</table>")
    sections.append(_section("runs", "The runs", runs))
    if command:
        sections.append(_section("reproduce", "Reproduce",
                                 f"<p>This command rebuilds the comparison:</p><pre><code>{_e(command)}</code></pre>"))
    models = ", ".join(dict.fromkeys(r.model for r in results))
    return _page(f"dbprofile comparison: {models}", f"{len(results)} runs, {len(series)} series", sections)


def render_run_summary(result: RunResult) -> str:
    """A compact HTML fragment for notebooks (``RunResult._repr_html_``): the verdict's headline
    and reasons, and one row per measurement with its peak, largest share, phase and step time."""
    verdict, missing = _judge(result)
    out = [f"<div class='dbprofile-run'><p><b>{_e(result.model)}</b>: {_subtitle(result)}</p>"]
    unit = charts.pick_unit(max((m.peak_bytes for m in result.measurements if m.ok), default=0))
    head = ["technique", "batch", "status", "peak", "largest share", "peak phase", "step time"]
    out.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
    for label, m in zip((_label(m, result) for m in result.measurements), result.measurements):
        cat, frac = _largest_share(m)
        share = f"{charts.category_label(cat)} {frac:.0%}" if m.ok else ""
        phase = (m.peak_phase or "") + (f" (block {m.peak_block})" if m.peak_block is not None else "")
        out.append(
            f"<tr><td>{_e(label)}</td><td class='num'>{m.batch_size}</td><td>{_e(m.status)}</td>"
            f"{_bytes_cell(m.peak_bytes if m.ok else None, unit)}<td>{_e(share)}</td><td>{_e(phase)}</td>"
            f"<td class='num'>{_e(_ms(m.step_time_s))}</td></tr>"
        )
    out.append("</table>")
    if verdict is not None:
        out.append(f"<p><b>{_e(_verdict_line(verdict))}</b></p><ul>")
        out += [f"<li>{_e(getattr(r, 'sentence', r))}</li>" for r in getattr(verdict, "reasons", []) or []]
        out.append("</ul>")
    else:
        out.append(f"<p>No verdict: {_e(missing)}.</p>")
    out.append("</div>")
    return "\n".join(out)


def write_run_report(result: RunResult, path: str | Path) -> Path:
    """Render ``result`` and write it to ``path`` (folders created); returns the path."""
    return write_atomic(path, render_run(result, html_dir=Path(path).parent))


def write_comparison(results: list[RunResult], path: str | Path, command: str | None = None) -> Path:
    """Render the comparison of ``results`` and write it to ``path``; returns the path."""
    return write_atomic(path, render_comparison(results, command=command))



