"""The presentation layer: every text table (``text``), the HTML run report (``html``, with
the shared page pieces in ``page``), the comparison page (``comparison``), notebook fragments
(``notebook``) and the charts (``charts``, matplotlib SVG inlined in the page). Computing
modules return data; only this package turns it into text or HTML."""

from dbprofile.report.comparison import render_comparison, write_comparison
from dbprofile.report.html import render_run, write_run_report

__all__ = ["render_comparison", "render_run", "write_comparison", "write_run_report"]
