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
from pathlib import Path

from dbprofile.files import write_atomic
from dbprofile.report import charts
from dbprofile.report.details import command_section, cuda_section, env_section, numbers_section, snapshots_section
from dbprofile.report.page import (
    bytes_cell,
    change_vs,
    chart_html,
    e2e_baseline,
    esc,
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
from dbprofile.results import RunResult
from dbprofile.units import format_bytes, format_gflop, pick_unit
from dbprofile.verdict import ratio_is_clear
from dbprofile.vocabulary import CATEGORIES

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
        text = (
            f"{label} peaks at {format_bytes(m.peak_bytes)} ({change_vs(m.peak_bytes, base.peak_bytes)} vs e2e); "
            f"its largest share is {charts.category_label(cat)} ({frac:.0%})"
        )
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
    return (
        f'<div class="verdict incomplete"><div class="decision">Incomplete run</div>'
        f'<div class="headline">This run did not finish: {esc(result.incomplete_reason or "the reason was not recorded")}.'
        f"</div><p>The page shows the {len(result.measurements)} measurement(s) that finished; "
        "run the command below again for the rest.</p></div>"
    )


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
    body = (
        f'<div class="verdict inconclusive"><div class="decision">No verdict available</div>'
        f'<div class="headline">No verdict: {esc(missing)}. The measured facts:</div>'
        f'<ul class="facts">{facts}</ul></div>'
    )
    return section_html("verdict", "Verdict", body)


def _tradeoff_section(result: RunResult) -> str:
    """Memory against compute per trained sample, the capacity, and the recommendation."""
    verdict, _ = stored_verdict(result)
    ok = [m for m in result.measurements if m.ok]
    if not ok or not any(m.training_flops for m in ok):
        return ""
    batch = getattr(verdict, "batch_size", None) or max(m.batch_size for m in ok)
    svg = run_tradeoff_svg(
        result, batch, getattr(verdict, "capacity_bytes", None), getattr(verdict, "recommended", None)
    )
    if svg is None:
        return ""
    e2e = next((m for m in ok if m.technique == "e2e" and m.batch_size == batch), None)
    rows = []
    for m in ok:
        if m.batch_size != batch or m.flops_per_sample is None:
            continue
        ratio = f"{m.flops_per_sample / e2e.flops_per_sample:.2f}x" if e2e and e2e.flops_per_sample else "n/a"
        time_s = m.block_steps_time_s if m.block_steps_time_s is not None else m.step_time_s
        rows.append(
            f'<tr><td>{esc(technique_label(m, result))}</td><td class="num">{esc(format_gflop(m.flops_per_sample))}</td>'
            f'<td class="num">{esc(ratio)}</td><td class="num">{esc(milliseconds(time_s))}</td></tr>'
        )
    note = (
        '<p class="muted">Each point is a technique at batch size ' + esc(batch) + ": the memory it needs "
        "against the FLOPs that train every layer once on one sample (PyTorch's FlopCounterMode formulas: "
        "matmuls, convolutions, attention; checkpointing's recomputation included; DiffusionBlocks over its B "
        "block-steps). The dashed line is the device's capacity where it is known; the ringed point is the "
        "verdict's recommendation.</p>"
    )
    table = (
        "<table><tr><th>technique</th><th>GFLOP per sample</th><th>vs e2e</th>"
        f"<th>measured time (step, or B block-steps)</th></tr>{''.join(rows)}</table>"
    )
    return section_html("tradeoff", "Memory and compute", note + chart_html(svg) + table)


# ----------------------------------------------------------------------------- run sections


def _peaks_section(result: RunResult, labels: list[str]) -> str:
    svg = charts.peak_bars(result.measurements, labels)
    note = (
        '<p class="muted">Each bar is the largest total of live tensor bytes during a measured training step, '
        "split by what the bytes are at that instant; for DiffusionBlocks, the worst block.</p>"
    )
    if any(m.cuda for m in result.measurements):
        note += (
            '<p class="muted">On CUDA the device needs more than these tensor bytes: the allocator\'s reserved '
            "memory and NVML's figure are in the CUDA section below.</p>"
        )
    return section_html("peaks", "Peak memory per technique", note + chart_html(svg))


def _phase_section(result: RunResult, labels: list[str]) -> str:
    rows = []
    for m, label in zip(result.measurements, labels):
        if not m.ok:
            rows.append(f'<tr><td>{esc(label)}</td><td class="bad" colspan="3">{esc(m.status.upper())}</td></tr>')
            continue
        phase = m.peak_phase or "n/a"
        where = esc(phase)
        if m.peak_block is not None:
            block = next((b for b in m.blocks if b.block == m.peak_block), None)
            layers = f" (layers {charts.layer_span(block.layers)})" if block else ""
            where += f" of block {esc(m.peak_block)}{esc(layers)}"
        cat, frac = largest_share(m)
        swatch = f'<span class="swatch" style="background:{charts.CATEGORY_COLOURS.get(cat, "#ffffff")}"></span>'
        rows.append(
            f"<tr><td>{esc(label)}</td><td>{where}</td><td>{esc(PHASE_MEANING.get(phase, ''))}</td>"
            f"<td>{swatch}{esc(charts.category_label(cat))} {frac:.0%}</td></tr>"
        )
    table = (
        "<table><tr><th>technique</th><th>peak happens in</th><th>what is live then</th>"
        f"<th>largest share at the peak</th></tr>{''.join(rows)}</table>"
    )
    return section_html("phase", "When the peak happens", table)


def _timeline_section(result: RunResult, labels: list[str]) -> str:
    svg = charts.timelines(result.measurements, labels)
    if svg is None:
        return section_html(
            "timelines", "Memory through one step", '<p class="muted">This run recorded no per-step timelines.</p>'
        )
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
        unit = pick_unit(max(b.peak_bytes for b in m.blocks))
        rows = []
        for b in m.blocks:
            cells = "".join(bytes_cell(b.shares.get(c, 0), unit) for c in cats)
            rows.append(
                f"<tr><td>{esc(b.block)}</td><td>{esc(charts.layer_span(b.layers))}</td>{bytes_cell(b.peak_bytes, unit)}"
                f'{cells}<td>{esc(b.peak_phase)}</td><td class="num">{esc(milliseconds(b.step_time_s))}</td></tr>'
            )
        parts.append(
            f"<table><tr><th>block</th><th>layers</th><th>peak</th>{head}<th>phase</th>"
            f"<th>step time</th></tr>{''.join(rows)}</table>"
        )
    if not parts:
        return ""
    note = (
        '<p class="muted">Each block trains on its own; the outlined bar is the block with the largest peak, '
        "the one reported above. The first and last blocks also hold the embeddings and the head.</p>"
    )
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
            table.append(
                f"<tr><td>{esc(label)} (host-device transfer per step)</td>"
                f'<td class="num">{esc(milliseconds(m.transfer_time_s))}</td><td></td><td class="num"></td></tr>'
            )
    if not rows:
        return section_html("times", "Step time", '<p class="muted">No step times were measured.</p>')
    try:
        from dbprofile.verdict import MAX_RATIO_NOISE

        noisy = (
            f"; a ratio is marked noisy when the two timings' IQRs, relative to their medians, add up to "
            f"more than {MAX_RATIO_NOISE:.0%}"
        )
    except ImportError:
        noisy = ""
    e2e_times = {m.batch_size: m.step_time_s for m in result.measurements if m.technique == "e2e" and m.ok}
    baseline = next(iter(e2e_times.values())) if len(e2e_times) == 1 else None
    note = (
        '<p class="muted">A DiffusionBlocks step trains one block; B block-steps update every layer once, '
        "the fair unit against one e2e step. Times are medians of untracked steps timed by "
        "torch.utils.benchmark (at least 1 s per technique, until the interquartile range is under 10% of "
        f"the median or 10 s per unit){noisy}.</p>"
    )
    tab = f"<table><tr><th>what</th><th>median time</th><th>IQR</th><th>vs e2e step</th></tr>{''.join(table)}</table>"
    return section_html("times", "Step time", note + chart_html(charts.step_times(rows, baseline)) + tab)


def _time_row(label: str, time_s: float, iqr_s: float | None, base_s: float | None, base_iqr_s: float | None) -> str:
    """One row of the step-time table: median, IQR (absolute and relative) and the ratio to e2e,
    marked noisy where the verdict would not quote it (dbprofile.verdict.ratio_is_clear)."""
    iqr = "n/a" if iqr_s is None else f"{milliseconds(iqr_s)} ({iqr_s / time_s:.0%})" if time_s else milliseconds(iqr_s)
    ratio = "n/a"
    if base_s:
        ratio = f"{time_s / base_s:.2f}x"
        if not ratio_is_clear(time_s, iqr_s, base_s, base_iqr_s):
            ratio += " (noisy)"
    return (
        f'<tr><td>{esc(label)}</td><td class="num">{esc(milliseconds(time_s))}</td><td class="num">{esc(iqr)}</td>'
        f'<td class="num">{esc(ratio)}</td></tr>'
    )


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
            numbers_section(result, labels),
            cuda_section(result, labels),
            snapshots_section(result, labels, html_dir),
        ]
    sections += [env_section(result), command_section(result)]
    return page_html(f"dbprofile: {result.model}", subtitle(result), sections)


def write_run_report(result: RunResult, path: str | Path) -> Path:
    """Render ``result`` and write it to ``path`` (folders created); returns the path."""
    return write_atomic(path, render_run(result, html_dir=Path(path).parent))
