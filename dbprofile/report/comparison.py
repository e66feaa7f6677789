"""The comparison page: several runs side by side (``dbprofile compare``, a shape sweep), their
peaks per technique, the sweep's lines, and each run's verdict."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from dbprofile.files import write_atomic
from dbprofile.report.comparison_charts import comparison_peaks, sweep_lines
from dbprofile.report.page import (
    bytes_cell,
    change_vs,
    chart_html,
    comparable_step_s,
    esc,
    humanise,
    incomplete_note,
    milliseconds,
    page_html,
    section_html,
    stored_verdict,
    verdict_line,
)
from dbprofile.results import Measurement, RunResult
from dbprofile.spec import SpecError
from dbprofile.techniques import parse_technique
from dbprofile.units import format_bytes, pick_unit

# Shapes a run may be made at (``--seq-len``, ``--image-size``), as the run's model_info names
# them, with the axis label of a sweep over them.
SHAPES = {
    "sequence_length": "sequence length (tokens)",
    "image_size": "image size (pixels)",
    "latent_size": "latent size (latent pixels)",
}


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
        series = [
            (
                tech,
                [
                    (r.model_info[key], m)
                    for r in ordered
                    for m in r.measurements
                    if m.technique == tech and m.batch_size == bs
                ],
            )
            for tech in techniques
        ]
        title = f"<h3>batch {bs}</h3>" if len(batches) > 1 else ""
        charts_html.append(title + chart_html(sweep_lines(SHAPES[key], series)))
    note = (
        f'<p class="muted">Peak memory of each technique against the {esc(humanise(key))}; each point is '
        "the run at that value (the table below has every number).</p>"
    )
    return section_html("sweep", f"Peak against {esc(humanise(key))}", note + "".join(charts_html))


def _series(results: Sequence[RunResult]) -> list[tuple[str, RunResult, int, dict[str, Measurement]]]:
    """One series per (run, batch size): (label, run, batch size, {technique: measurement}).
    Labels name only what differs between the series (model, shape, device, precision, batch)."""
    raw = []
    for i, r in enumerate(results):
        shape = " ".join(f"{humanise(k)} {r.model_info[k]}" for k in SHAPES if k in r.model_info)
        for bs in dict.fromkeys(m.batch_size for m in r.measurements):
            ms = {m.technique: m for m in r.measurements if m.batch_size == bs}
            first = next(iter(ms.values()))
            raw.append(
                (
                    i,
                    r,
                    bs,
                    ms,
                    {
                        "model": r.model,
                        "shape": shape,
                        "device": first.device,
                        "precision": first.precision,
                        "batch": f"batch {bs}",
                    },
                )
            )
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
    """e2e, offload, sac, the ckpt variants, then db:B by B; unrecognised names last (sort is stable)."""
    kinds = ("e2e", "offload", "sac", "ckpt", "db")
    try:
        tech = parse_technique(name)
    except SpecError:  # a name from another dbprofile version
        return (len(kinds), 0, "")
    return (kinds.index(tech.kind), tech.blocks or tech.segments or 0, name)


def _technique_table(
    title: str,
    head: str,
    techniques: Sequence[str],
    series: list[tuple[str, RunResult, int, dict[str, Measurement]]],
    ok_cell: Callable[[Measurement], str],
    failure_title: bool = False,
) -> str:
    """One row per technique, one column per run: ``ok_cell`` of a finished measurement, its status
    where it failed (with its error on hover where ``failure_title``), "not run" where it is absent."""
    rows = []
    for tech in techniques:
        cells = []
        for _, _, _, ms in series:
            m = ms.get(tech)
            if m is None:
                cells.append('<td class="muted">not run</td>')
            elif not m.ok:
                hover = f' title="{esc(m.error or "")}"' if failure_title else ""
                cells.append(f'<td class="bad"{hover}>{esc(m.status.upper())}</td>')
            else:
                cells.append(ok_cell(m))
        rows.append(f"<tr><th>{esc(tech)}</th>{''.join(cells)}</tr>")
    return f"<h3>{title}</h3><table><tr><th>technique</th>{head}</tr>{''.join(rows)}</table>"


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
    for label, r, _batch_size, ms in series:
        verdict, _ = stored_verdict(r)
        ok = [m for m in ms.values() if m.ok]
        bad = [m for m in ms.values() if not m.ok]
        text = f"{label}: "
        base = ms.get("e2e")
        if ok:
            best = min(ok, key=lambda m: m.peak_bytes)
            text += f"smallest peak {format_bytes(best.peak_bytes)} with {best.technique}"
            if base is not None and base.ok and best is not base:
                text += f" ({change_vs(best.peak_bytes, base.peak_bytes)} vs e2e at {format_bytes(base.peak_bytes)})"
        else:
            text += "no technique completed"
        if bad:
            text += "; did not complete: " + ", ".join(f"{m.technique} ({m.status.upper()})" for m in bad)
        item = esc(text + ".")
        if verdict is not None:
            item += f" <strong>Verdict:</strong> {esc(verdict_line(verdict))}"
        summary.append(f"<li>{item}</li>")
    sections.append(section_html("summary", "Summary", f'<ul class="facts">{"".join(summary)}</ul>'))

    swept = swept_shape([r for r in results if r.measurements])
    if swept:
        sections.append(_sweep_section([r for r in results if r.measurements], swept))
    if series:
        svg = comparison_peaks(techniques, [(label, ms) for label, _, _, ms in series])
        sections.append(section_html("peaks", "Peak memory per technique", chart_html(svg)))

    unit = pick_unit(max((m.peak_bytes for _, _, _, ms in series for m in ms.values() if m.ok), default=0))
    head = "".join(f"<th>{esc(label)}</th>" for label, _, _, _ in series)
    peaks_table = _technique_table(
        "Peak", head, techniques, series, lambda m: bytes_cell(m.peak_bytes, unit), failure_title=True
    )
    times_table = _technique_table(
        "Step time (DiffusionBlocks: its B block-steps, one pass over every layer like an e2e step)",
        head,
        techniques,
        series,
        lambda m: f'<td class="num">{esc(milliseconds(comparable_step_s(m)))}</td>',
    )
    sections.append(section_html("numbers", "Every peak and step time", peaks_table + times_table))

    run_rows = []
    for i, r in enumerate(results):
        env = r.environment
        devices = ", ".join(sorted({m.device for m in r.measurements}))
        batches = ", ".join(str(b) for b in sorted({m.batch_size for m in r.measurements}))
        run_rows.append(
            f'<tr><td>{i + 1}</td><td class="nw">{esc(r.model)}</td><td class="nw">{esc(devices)}</td>'
            f"<td>{esc(batches)}</td><td>{esc(env.get('device_name', env.get('device', '')))}</td>"
            f'<td class="nw">{esc(env.get("torch", ""))}</td><td class="nw">{esc(r.created)}</td>'
            f"<td><code>{esc(r.command)}</code>{incomplete_note(r)}</td></tr>"
        )
    runs = (
        "<table><tr><th>run</th><th>model</th><th>device</th><th>batch</th><th>device name</th><th>torch</th>"
        f"<th>created</th><th>command</th></tr>{''.join(run_rows)}</table>"
    )
    sections.append(section_html("runs", "The runs", runs))
    if command:
        sections.append(
            section_html(
                "reproduce",
                "Reproduce",
                f"<p>This command rebuilds the comparison:</p><pre><code>{esc(command)}</code></pre>",
            )
        )
    models = ", ".join(dict.fromkeys(r.model for r in results))
    return page_html(f"dbprofile comparison: {models}", f"{len(results)} runs, {len(series)} series", sections)


def write_comparison(results: list[RunResult], path: str | Path, command: str | None = None) -> Path:
    """Render the comparison of ``results`` and write it to ``path``; returns the path."""
    return write_atomic(path, render_comparison(results, command=command))
