"""How results show themselves (a plan's text in a terminal, a run's or a plan's HTML in a
notebook) and how a plan answers "would it fit on that card?". The data classes delegate
here; the layers above install the functions when they are imported (``dbprofile.report.text``
and ``dbprofile.report.notebook`` the views, ``dbprofile.planner`` the refit), so the data layer
imports nothing above it. ``import dbprofile`` imports all of them, so a user never meets an
empty table; without them a result still shows its type and size."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_text: dict[str, Callable[[Any], str]] = {}
_html: dict[str, Callable[[Any], str]] = {}
_fits: list[Callable[..., bool]] = []


def install_text(kind: type, render: Callable[[Any], str]) -> None:
    """Show objects of ``kind`` as text with ``render`` (``repr`` in a terminal)."""
    _text[kind.__name__] = render


def install_html(kind: type, render: Callable[[Any], str]) -> None:
    """Show objects of ``kind`` in a notebook with ``render`` (``_repr_html_``)."""
    _html[kind.__name__] = render


def install_fits(refit: Callable[..., bool]) -> None:
    """Answer ``Plan.fits(gpu, technique)`` with ``refit(plan, gpu, technique)``."""
    _fits[:] = [refit]


def _bare(obj: Any) -> str:
    size = len(getattr(obj, "entries", None) or getattr(obj, "measurements", None) or [])
    return f"{type(obj).__name__}({getattr(obj, 'model', '')!r}, {size} rows)"


def show_text(obj: Any) -> str:
    render = _text.get(type(obj).__name__)
    return render(obj) if render else _bare(obj)


def show_html(obj: Any) -> str:
    render = _html.get(type(obj).__name__)
    return render(obj) if render else f"<pre>{_bare(obj)}</pre>"


def fits(plan: Any, gpu: Any, technique: str | None) -> bool:
    if not _fits:
        raise RuntimeError("Plan.fits needs the planner: `import dbprofile.planner` (or `import dbprofile`) first.")
    return _fits[0](plan, gpu, technique)
