"""What ``dbprofile run`` does around the measuring: the output file's name, the time limit on
loading a model, answering (table, HTML report, JSON, CSV, exit code), the note when a result
is replaced, and the distributed path (relaunching under torchrun, or measuring this rank)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

from dbprofile.cli.app import (
    EXIT_OK,
    UserError,
    check_outputs,
    exit_code,
    load_models,
    model_inputs,
    reproduce_command,
)
from dbprofile.console import QUIET, Output
from dbprofile.results import RunResult
from dbprofile.settings import RunSettings


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


@contextlib.contextmanager
def loading_limit(seconds: float | None):
    """The per-technique time limit around loading and checking a model, as one paragraph when hit."""
    from dbprofile.measure.limits import TimeLimitExceeded, time_limit

    try:
        with time_limit(seconds, "loading and checking the model"):
            yield
    except TimeLimitExceeded as err:
        raise UserError(
            f"{str(err).capitalize()} (--timeout): the model file, build(), batch() or loss() did not finish, "
            "perhaps an endless loop. Fix the model, or raise --timeout if it is only slow."
        ) from None


def show_run(result: RunResult, out_path: Path, no_report: bool, table: str, console: Output) -> dict[str, str]:
    """Print the table and write the HTML report; returns the files written (for the JSON answer)."""
    files = {"json": str(out_path)}
    lines = [table, f"results: {out_path}"]
    if not no_report:
        from dbprofile.report import write_run_report

        files["html"] = str(write_run_report(result, out_path.with_suffix(".html")))
        lines.append(f"report:  {files['html']}")
    console.text("\n".join(lines))
    return files


def note_replaced(path: Path, console: Output) -> None:
    """Replacing an earlier result is normal (a rerun), but never silent: say whose it was (a note,
    which -q silences)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(old, dict):
        console.info(f"replacing {path} (a run of {old.get('model')!r} from {old.get('created') or 'an unknown time'})")


def run_distributed_command(
    model_opts: tuple,
    names: list[str],
    batch_sizes: list[int],
    settings: RunSettings,
    *,
    out: str | None,
    no_report: bool,
    fsdp: bool,
    nproc: int | None,
    timeout_s: float,
    console: Output,
) -> None:
    """Per-rank profiling under torchrun: relaunch with --nproc, or measure on this rank.

    Rank 0 prints the answer (and the JSON / CSV). torchrun turns any rank's non-zero exit into its
    own failure, so the ranks exit 0 and the --nproc launcher reads rank 0's result file to exit
    with the outcome."""
    from dbprofile.loading import validate_spec
    from dbprofile.measure.distributed import in_torchrun, launch, run_distributed
    from dbprofile.report.text import ranks_table
    from dbprofile.techniques import parse_technique

    for name in names:
        parse_technique(name)  # a bad name fails here, before any process starts
    swept, specs = load_models(*model_opts)
    if swept:
        raise UserError(f"A distributed run measures one shape; give --{swept.replace('_', '-')} one value.")
    spec = specs[0]
    out_path = Path(out) if out else Path("reports") / f"{safe_name(spec.name)}-distributed.json"
    if not in_torchrun() and nproc is not None:
        code = launch(nproc, sys.argv[1:])
        sys.exit(code if code != EXIT_OK or not out_path.exists() else exit_code(RunResult.load(out_path)))
    validate_spec(spec)
    outputs = [("--out", out_path)] + (
        [] if no_report else [("the HTML report beside --out", out_path.with_suffix(".html"))]
    )
    check_outputs(
        outputs + ([("--csv", console.csv_path)] if console.csv_path else []), inputs=model_inputs(model_opts[0])
    )
    if os.environ.get("RANK", "0") != "0":  # one display and one set of notes: rank 0's
        console = dataclasses.replace(console, verbosity=QUIET)
    with console.progress(f"{spec.name} on every rank"):
        result = run_distributed(
            spec,
            names,
            batch_sizes,
            settings,
            fsdp=fsdp,
            device=settings.device,
            out=out_path,
            command=reproduce_command(),
            timeout_s=timeout_s,
        )
    if result is None:  # ranks other than 0 report through rank 0
        return
    files = show_run(result, out_path, no_report, ranks_table(result), console)
    console.emit_json({**result.to_dict(), "files": files})
    console.write_csv(result.to_dataframe)
    code = exit_code(result)
    if not in_torchrun():
        sys.exit(code)
