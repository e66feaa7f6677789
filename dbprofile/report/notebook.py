"""Notebook views: compact HTML fragments that Jupyter shows for a cell ending in a result
(``RunResult._repr_html_``, ``Plan._repr_html_``). Importing this module installs them into
the data layer (dbprofile.results.views)."""

from __future__ import annotations

from dbprofile.report import charts
from dbprofile.report.page import (
    bytes_cell,
    comparable_step_s,
    esc,
    largest_share,
    milliseconds,
    page_html,
    section_html,
    stored_verdict,
    subtitle,
    technique_label,
    verdict_line,
)
from dbprofile.report.text import (
    PLAN_HEAD,
    depth_lines,
    format_time_estimate,
    nothing_fits_summary,
    plan_header,
    plan_rows,
)
from dbprofile.report.tradeoff import plan_tradeoff_svg
from dbprofile.results import Plan, RunResult, views
from dbprofile.units import pick_unit


def render_run_summary(result: RunResult) -> str:
    """A compact HTML fragment for notebooks (``RunResult._repr_html_``): the verdict's headline
    and reasons, and one row per measurement with its peak, largest share, phase and step time."""
    verdict, missing = stored_verdict(result)
    out = [f"<div class='dbprofile-run'><p><b>{esc(result.model)}</b>: {subtitle(result)}</p>"]
    unit = pick_unit(max((m.peak_bytes for m in result.measurements if m.ok), default=0))
    head = ["technique", "batch", "status", "peak", "largest share", "peak phase", "step time (db: B block-steps)"]
    out.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
    for label, m in zip((technique_label(m, result) for m in result.measurements), result.measurements):
        cat, frac = largest_share(m)
        share = f"{charts.category_label(cat)} {frac:.0%}" if m.ok else ""
        phase = (m.peak_phase or "") + (f" (block {m.peak_block})" if m.peak_block is not None else "")
        out.append(
            f"<tr><td>{esc(label)}</td><td class='num'>{m.batch_size}</td><td>{esc(m.status)}</td>"
            f"{bytes_cell(m.peak_bytes if m.ok else None, unit)}<td>{esc(share)}</td><td>{esc(phase)}</td>"
            f"<td class='num'>{esc(milliseconds(comparable_step_s(m)))}</td></tr>"
        )
    out.append("</table>")
    if verdict is not None:
        out.append(f"<p><b>{esc(verdict_line(verdict))}</b></p><ul>")
        out += [f"<li>{esc(getattr(r, 'sentence', r))}</li>" for r in getattr(verdict, "reasons", []) or []]
        out.append("</ul>")
    else:
        out.append(f"<p>No verdict: {esc(missing)}.</p>")
    out.append("</div>")
    return "\n".join(out)


def format_plan_html(plan: Plan) -> str:
    """A small, self-contained HTML fragment (every string escaped) for notebooks and reports."""
    out = [f"<div class='dbprofile-plan'><p><b>{esc(plan_header(plan))}</b></p>", "<table>"]
    out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in PLAN_HEAD) + "</tr>")
    for row in plan_rows(plan):
        out.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    if (summary := nothing_fits_summary(plan)) is not None:
        out.append(f"<p class='nothing-fits'><b>{esc(summary)}</b></p>")
    out += [f"<p>{esc(line)}</p>" for line in depth_lines(plan)]
    estimate = format_time_estimate(plan)
    if estimate:
        out.append(f"<p>{esc(estimate)}</p>")
    if plan.verdict is not None:
        out.append(f"<p><b>{esc(plan.verdict.decision)}</b>: {esc(plan.verdict.headline)}</p><ul>")
        out += [f"<li>{esc(r.sentence)}</li>" for r in plan.verdict.reasons]
        out.append("</ul>")
    svg = plan_tradeoff_svg(plan)
    if svg is not None:
        out.append(
            "<p><b>Memory against compute per trained sample</b> (dashed: the target's capacity; ringed: "
            "the recommendation)</p>"
        )
        out.append(svg)
    out.append("</div>")
    return "\n".join(out)


def render_plan_page(plan: Plan, command: str | None = None) -> str:
    """``plan --html``: the plan's fragment as a page styled like the run report and the comparison."""
    sections = [section_html("plan", "Predicted peak per technique", format_plan_html(plan))]
    if command:
        sections.append(section_html("command", "Command", f"<pre>{esc(command)}</pre>"))
    return page_html(f"dbprofile plan: {plan.model}", esc(plan_header(plan)), sections)


views.install_html(RunResult, render_run_summary)
views.install_html(Plan, format_plan_html)
