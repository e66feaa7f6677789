"""``dbprofile report`` (re-render one run's HTML) and ``dbprofile compare`` (several runs side by
side)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dbprofile.cli.app import (
    UserError,
    check_outputs,
    exit_code,
    friendly_errors,
    main,
    output_options,
    reproduce_command,
)
from dbprofile.console import Output
from dbprofile.results import RunResult


def _sourced_frame(sources: tuple[str, ...], runs: list[RunResult]):
    """Every run's measurement rows, each with the result file it came from as the first column."""
    import pandas as pd

    frames = [r.to_dataframe() for r in runs]
    for source, frame in zip(sources, frames):
        frame.insert(0, "source", source)
    return pd.concat(frames, ignore_index=True)


def _check_result_files(paths) -> None:
    """Each result file to read exists and is a file: said before anything else about it."""
    for path in paths:
        if not Path(path).is_file():
            what = "is a folder" if Path(path).is_dir() else "does not exist"
            raise UserError(f"Result file {path!r} {what}; give the JSON file that `dbprofile run` wrote.")


def _outputs(page: tuple[str, Path], console: Output) -> list[tuple[str, Path]]:
    return [page] + ([("--csv", console.csv_path)] if console.csv_path else [])


def _load_result(path: str):
    """Read a result file (schema-checked); an incomplete run is said so on stderr."""
    from dbprofile.results import RunResult

    result = RunResult.load(path)
    if not result.complete:
        click.echo(
            f"note: {path} is an incomplete run ({result.incomplete_reason or 'reason not recorded'}); "
            "the report covers the measurements that finished.",
            err=True,
        )
    return result


@main.command()
@click.argument("result", type=click.Path(dir_okay=False))
@click.option(
    "--output", "-o", default=None, type=click.Path(dir_okay=False), help="HTML path (default: beside the JSON)."
)
@output_options
@friendly_errors
def report(result, output, console: Output) -> None:
    """Re-render the HTML report of RESULT (a JSON written by `dbprofile run`).

    --json prints the result with its verdict; --csv writes its measurements as a table."""
    from dbprofile.report import write_run_report
    from dbprofile.verdict import judge_into

    _check_result_files([result])
    if output is None and Path(result).suffix.lower() == ".html":
        raise UserError(
            f"{result!r} is a report page; `dbprofile report` reads the result JSON a run wrote "
            f"(e.g. {str(Path(result).with_suffix('.json'))!r}) and writes the page beside it."
        )
    html_path = Path(output) if output else Path(result).with_suffix(".html")
    check_outputs(_outputs(("--output", html_path), console), [("its own result file RESULT", Path(result))])
    run_result = _load_result(result)
    if run_result.verdict is None:  # written before verdicts were stored with runs
        judge_into(run_result)
    path = write_run_report(run_result, html_path)
    console.text(f"report: {path}")
    console.emit_json({**run_result.to_dict(), "files": {"json": result, "html": str(path)}})
    console.write_csv(run_result.to_dataframe)
    sys.exit(exit_code(run_result))


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--output", "-o", default="reports/comparison.html", show_default=True, type=click.Path(dir_okay=False))
@output_options
@friendly_errors
def compare(results, output, console: Output) -> None:
    """Put several runs side by side (batch sizes, devices or models) in one HTML file.

    --json prints every run (with its source file and verdict); --csv writes all their
    measurements, one row each, with a leading ``source`` column."""
    from dbprofile.report import write_comparison
    from dbprofile.verdict import judge_into

    _check_result_files(results)
    inputs = [(f"the result file {r!r}", Path(r)) for r in results]
    check_outputs(_outputs(("--output", Path(output)), console), inputs)
    runs = [_load_result(path) for path in results]
    for run_result in runs:
        if run_result.verdict is None:  # written before verdicts were stored with runs
            judge_into(run_result)
    path = write_comparison(runs, Path(output), command=reproduce_command())
    console.text(f"comparison: {path}")
    console.emit_json(
        {"runs": [{"source": source, **r.to_dict()} for source, r in zip(results, runs)], "files": {"html": str(path)}}
    )
    console.write_csv(lambda: _sourced_frame(results, runs))
    sys.exit(exit_code(runs))
