"""The README's quoted figures are the code's (scripts/readme_figures.py computes them in one place)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "readme_figures.py"


def _figures():
    spec = importlib.util.spec_from_file_location("readme_figures", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_figures"] = module
    spec.loader.exec_module(module)
    return module


def test_every_quoted_figure_is_still_in_the_readme_where_the_script_finds_it():
    figures = _figures()
    text = figures.README.read_text(encoding="utf-8")
    for figure in figures.FIGURES:
        values = figures.quoted(text, figure)
        assert values and all(v for v in values)
        assert figures.replaced(text, figure, values) == text


def test_replacing_a_figure_changes_only_its_numbers():
    figures = _figures()
    figure = figures.FIGURES[0]
    text = 'shortfalls ("ckpt by 30.49 GiB, db:4 by 80.28 GiB, ...").'
    assert (
        figures.replaced(text, figure, ("31.77", "81.00"))
        == 'shortfalls ("ckpt by 31.77 GiB, db:4 by 81.00 GiB, ...").'
    )


@pytest.mark.slow
def test_the_readme_quotes_what_the_code_computes():
    figures = _figures()
    text = figures.README.read_text(encoding="utf-8")
    for figure in figures.FIGURES:
        assert figures.quoted(text, figure) == figure.compute(), f"run `python {SCRIPT.name} --write`"
