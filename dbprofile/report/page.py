"""The pieces every HTML page and fragment shares: the stylesheet, escaping (``esc``: every
string that came from the user or the run goes through it before it touches a page), the page
frame, sections, byte cells with exact bytes on hover, the labels of measurements and the
verdict box. Pages need no network and no JavaScript: CSS is inline and charts are inline SVG
from ``dbprofile.report.charts``."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from typing import Any

from dbprofile.report.experts import experts_summary, moe_memory
from dbprofile.results import Measurement, RunResult, Verdict
from dbprofile.units import UNIT_BYTES, format_bytes
from dbprofile.vocabulary import CATEGORIES

DECISION_TITLES = {
    "adopt": "Adopt DiffusionBlocks",
    "not-worth-it": "Not worth it",
    "not-needed": "Not needed",
    "inconclusive": "Inconclusive",
}


CSS = """
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


def esc(value: Any) -> str:
    """HTML-escape anything (quotes too, so the result is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def technique_label(m: Measurement, result: RunResult) -> str:
    """A measurement's name on the page: the technique, plus the batch size when the run
    holds several batch sizes, plus the rank for a distributed run (a row per rank)."""
    label = m.technique
    if len({x.batch_size for x in result.measurements}) > 1:
        label += f" @ batch {m.batch_size}"
    if "rank" in m.extra:
        label += f" rank {m.extra['rank']}"
    return label


def e2e_baseline(m: Measurement, result: RunResult) -> Measurement | None:
    """The e2e measurement at the same batch size, when it completed."""
    base = result.get("e2e", m.batch_size)
    return base if base is not None and base.ok else None


def show_bytes(n: int, unit: str) -> str:
    """``n`` in the table's ``unit``; amounts too small to show there (below 0.01 of the unit,
    zero included) get their own unit, so 3112 bytes reads '3.04 KiB', not '0.00 MiB'."""
    scale = UNIT_BYTES.get(unit, 1)
    return format_bytes(n, unit) if abs(n) >= scale / 100 else format_bytes(n)


def bytes_cell(n: int | None, unit: str) -> str:
    if n is None:
        return '<td class="num">n/a</td>'
    return f'<td class="num" data-bytes="{int(n)}" title="{int(n):,} bytes">{esc(show_bytes(int(n), unit))}</td>'


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "n/a"


def change_vs(new: float, old: float) -> str:
    """'-42%' / '+8%' relative to old."""
    if not old:
        return "n/a"
    return f"{100 * (new - old) / old:+.0f}%"


def milliseconds(seconds: float | None) -> str:
    """A duration: milliseconds below a second, seconds above."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "n/a"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def comparable_step_s(m: Measurement) -> float | None:
    """The time to set beside other techniques': one e2e (or ckpt) step, or DiffusionBlocks' B
    block-steps, which train every layer once as one e2e step does. A single block-step beside
    an e2e step would read as DiffusionBlocks being B times faster than it is."""
    return m.block_steps_time_s if m.block_steps_time_s is not None else m.step_time_s


def largest_share(m: Measurement) -> tuple[str, float]:
    if not m.peak_bytes:
        return "n/a", 0.0
    cat = max(CATEGORIES, key=lambda c: m.shares.get(c, 0))
    return cat, m.share_fraction(cat)


def humanise(key: str) -> str:
    return key.replace("_", " ")


def section_html(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}">\n<h2>{esc(title)}</h2>\n{body}\n</section>'


def chart_html(svg: str) -> str:
    return f'<div class="chart">{svg}</div>'


def page_html(title: str, subtitle: str, sections: Iterable[str]) -> str:
    from dbprofile.version import __version__

    body = "\n".join(s for s in sections if s)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f'<h1>{esc(title)}</h1>\n<p class="sub">{subtitle}</p>\n{body}\n'
        f'<p class="muted">Report written by dbprofile {esc(__version__)}. Sizes use IEC units '
        "(1 MiB = 1024<sup>2</sup> bytes); hover a number for its exact bytes.</p>\n</body>\n</html>\n"
    )


def verdict_html(verdict: Any) -> str:
    decision = str(getattr(verdict, "decision", "inconclusive"))
    css = decision if decision in DECISION_TITLES else "inconclusive"
    items = []
    for reason in getattr(verdict, "reasons", []) or []:
        rule = getattr(reason, "rule", "")
        sentence = getattr(reason, "sentence", str(reason))
        items.append(f'<li>{esc(sentence)} <span class="rule">[{esc(rule)}]</span></li>')
    reasons = f"<ul>{''.join(items)}</ul>" if items else ""
    return (
        f'<div class="verdict {css}"><div class="decision">{esc(DECISION_TITLES.get(decision, decision))}</div>'
        f'<div class="headline">{esc(getattr(verdict, "headline", ""))}</div>{reasons}</div>'
    )


def verdict_line(verdict: Any) -> str:
    """The headline, prefixed with the decision unless the headline already starts with it."""
    decision = str(getattr(verdict, "decision", ""))
    title = DECISION_TITLES.get(decision, decision)
    headline = str(getattr(verdict, "headline", ""))
    return headline if headline.lower().startswith(title.lower()) else f"{title}: {headline}"


def incomplete_note(result: RunResult) -> str:
    if result.complete:
        return ""
    return f"<div><strong>incomplete:</strong> {esc(result.incomplete_reason or 'reason not recorded')}</div>"


def subtitle(result: RunResult) -> str:
    info = dict(result.model_info)
    parts = [esc(info.pop("description"))] if info.get("description") else []
    for key in ("family", "task"):
        if info.get(key):
            parts.append(esc(info.pop(key)))
    if info.get("num_layers") is not None:
        parts.append(f"{esc(info.pop('num_layers'))} residual layers")
    if isinstance(info.get("parameters"), int):
        parts.append(f"{info.pop('parameters'):,} parameters")
    parts += [f"{esc(humanise(k))} {esc(v)}" for k, v in info.items() if not isinstance(v, (dict, list))]
    if isinstance(info.get("experts"), dict):
        parts.append(esc(experts_summary(info["experts"])))
        parts += [esc(line) for line in moe_memory(result.measurements)]
    devices = sorted({m.device for m in result.measurements})
    batches = sorted({m.batch_size for m in result.measurements})
    if devices:
        parts.append("on " + esc(", ".join(devices)))
    if batches:
        parts.append("batch " + esc(", ".join(str(b) for b in batches)))
    if any(m.fake for m in result.measurements):
        parts.append("fake tensors (predicted, nothing allocated)")
    return " · ".join(parts)


def stored_verdict(result: RunResult) -> tuple[Verdict | None, str | None]:
    """(the verdict stored with the run, None), or (None, why there is none). The verdict is
    computed once when a run ends (dbprofile.measure.runner.run); pages only show it."""
    if result.verdict is not None:
        return result.verdict, None
    if result.verdict_error:
        return None, result.verdict_error
    return None, (
        "none was stored with this run (it is still measuring, or it was written by an older "
        "dbprofile: `dbprofile report` judges such files)"
    )
