"""Self-contained HTML reports of profiling runs: ``render_run`` / ``write_run_report`` for one
run, ``render_comparison`` / ``write_comparison`` for several side by side. Charts are
matplotlib SVG inlined in the page (``dbprofile.report.charts``)."""

from dbprofile.report.html import render_comparison, render_run, write_comparison, write_run_report

__all__ = ["render_comparison", "render_run", "write_comparison", "write_run_report"]
