"""Issue 29, the pages: a time set beside another technique's is in the fair unit (DiffusionBlocks'
B block-steps against one e2e step), labels of points at one place do not overlap, small FLOP
counts keep their digits, and plan --html is a page styled like the others."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from dbprofile.cli import main
from dbprofile.report.comparison import render_comparison
from dbprofile.report.html import render_run
from dbprofile.report.notebook import render_run_summary
from dbprofile.report.page import milliseconds
from dbprofile.report.tradeoff import label_groups
from dbprofile.results import RunResult

SAMPLE = Path(__file__).resolve().parents[1] / "reports" / "vit-tiny.json"


def _sample() -> RunResult:
    return RunResult.load(SAMPLE)


def test_the_comparison_page_sets_db_block_steps_beside_an_e2e_step():
    result = _sample()
    page = render_comparison([result, result])
    for m in result.measurements:
        if m.block_steps_time_s is not None:
            fair, single = milliseconds(m.block_steps_time_s), milliseconds(m.step_time_s)
            assert f'<td class="num">{fair}</td>' in page
            assert f'<td class="num">{single}</td>' not in page


def test_the_notebook_summary_uses_the_fair_unit_too():
    result = _sample()
    summary = render_run_summary(result)
    db = next(m for m in result.measurements if m.block_steps_time_s is not None)
    assert milliseconds(db.block_steps_time_s) in summary and "B block-steps" in summary


def test_points_at_one_place_share_one_label():
    points = [("e2e", 100, 1.0), ("ckpt", 100, 1.33), ("db:3", 60, 1.01), ("db:4", 59, 1.012), ("db:2", 70, 1.0)]
    assert [label for label, _, _ in label_groups(points)] == ["e2e", "ckpt", "db:3, db:4", "db:2"]
    assert label_groups([("e2e", 5, 0.0)]) == [("e2e", 0.0, 5)]


def test_the_flop_table_keeps_the_digits_of_a_small_model():
    page = render_run(_sample())
    cells = re.findall(r'<td class="num">(0\.0\d+)</td>', page)
    assert cells and all(len(c) > len("0.03") for c in cells)


def test_plan_html_is_a_styled_page_like_the_others(tmp_path):
    page = tmp_path / "p.html"
    result = CliRunner().invoke(main, ["plan", "gpt-tiny", "-b", "1", "-t", "e2e", "--gpu", "L4", "--html", str(page)])
    assert result.exit_code == 0, result.output
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html and "font-family" in html
    run_page = render_run(_sample())
    assert run_page[: run_page.index("</style>")].split("<style>")[1] in html  # the same stylesheet
