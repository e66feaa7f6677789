"""The ``dbprofile`` command: parse options, call the API, render. No logic lives here.

Every user mistake surfaces as one paragraph on stderr and exit code 2, never a traceback.
``exit_code`` is the one place that maps what happened to the exit status (README, "Exit
codes"); ``dbprofile.console`` decides where output goes (stdout, stderr, JSON, CSV, progress).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from dbprofile import units
from dbprofile.console import NORMAL, QUIET, VERBOSE, Output
from dbprofile.results import Plan, RunResult
from dbprofile.spec import SpecError
from dbprofile.version import __version__

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NOTHING_FITS = 3
"""The question was answered (table and report written), but nothing fits or every technique failed."""
EXIT_INTERRUPTED = 130
"""128 + SIGINT, the shell's convention for Ctrl-C."""


def exit_code(answer: Any = None, *, interrupted: bool = False) -> int:
    """The exit status for what happened: EXIT_INTERRUPTED after Ctrl-C; EXIT_NOTHING_FITS when the
    answer holds nothing usable (a plan where no technique fits the target or none ran, a run or
    runs where every measurement failed, validation rows that all failed); EXIT_OK otherwise.
    ``answer``: a Plan, a RunResult, validation rows, or a list of those. Bad input never gets
    here: it is a UserError, which carries EXIT_BAD_INPUT."""
    if interrupted:
        return EXIT_INTERRUPTED
    if answer is None:
        return EXIT_OK
    return EXIT_OK if _usable(answer) else EXIT_NOTHING_FITS


def _usable(answer: Any) -> bool:
    if isinstance(answer, Plan):
        from dbprofile.planner import nothing_fits

        return not nothing_fits(answer)
    if isinstance(answer, RunResult):
        return any(m.ok for m in answer.measurements)
    if isinstance(answer, (list, tuple)):
        return any(_usable(item) for item in answer)
    return getattr(answer, "status", None) == "ok"  # a validation row



class UserError(click.ClickException):
    """A mistake in the input: printed as one paragraph, exit code 2."""

    exit_code = EXIT_BAD_INPUT

    def show(self, file=None) -> None:
        click.echo(f"Error: {self.message}", err=True)


EXIT_INTERRUPTED = 130
"""Ctrl-C, as shells report a process ended by SIGINT (128 + 2)."""
EXIT_TERMINATED = 143
"""SIGTERM (128 + 15)."""
EXIT_BROKEN_PIPE = 141
"""The reader of stdout closed it (128 + SIGPIPE), as shells report for `yes | head`."""


def friendly_errors(func):
    """Turn SpecError / ValueError from the API into UserError (no traceback), a file that
    cannot be read or written into one paragraph, and Ctrl-C / SIGTERM into exit 130 / 143."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from dbprofile.measure.limits import Terminated, sigterm_as_interrupt

        try:
            with sigterm_as_interrupt():
                return func(*args, **kwargs)
        except (SpecError, ValueError) as err:
            raise UserError(str(err)) from None
        except BrokenPipeError:
            # The reader went away (`dbprofile models | head -1`): stop quietly, as `yes | head` does,
            # and keep Python from complaining again when it flushes stdout at exit.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_BROKEN_PIPE)
        except OSError as err:
            where = f" {str(err.filename)!r}" if err.filename else ""
            raise UserError(
                f"Cannot use{where}: {err.strerror or err}. Check that the path exists, is a file where a file is "
                "expected, and that you may read or write it."
            ) from None
        except KeyboardInterrupt as err:
            what = f" {err}" if str(err) else ""
            click.echo(f"Interrupted{what}. A run's result JSON keeps every measurement that finished.", err=True)
            sys.exit(EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED)

    return wrapper


def check_writable(path: Path, option: str) -> None:
    """Fail before any work, not after it: the folder exists or can be made (its nearest
    existing ancestor is a writable folder), and an existing file there may be replaced.
    Creates nothing, so --dry-run leaves no trace."""
    if path.is_dir():
        raise UserError(f"{option} {str(path)!r} is a folder; give a file path such as {path / 'result.json'}.")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"Cannot write {option} {str(path)!r}: {str(ancestor)!r} is a file, not a folder. "
                        f"Choose another {option}.")
    try:
        if ancestor == path.parent:  # it exists: try it for real (permissions, read-only mounts, /proc)
            fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".dbprofile-write-check-")
            os.close(fd)
            os.unlink(probe)
        elif not os.access(ancestor, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
    except OSError as err:
        raise UserError(f"Cannot write {option} {str(path)!r}: the folder {str(ancestor)!r} is not writable "
                        f"({err.strerror or err}). Choose another {option}.") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(
            f"Cannot write {option} {str(path)!r}: the file exists and may not be changed (read-only or immutable). "
            f"Choose another {option}, or make the file writable."
        )


def parse_size(text: str | None) -> int | None:
    """A size the user wrote (dbprofile.units.parse_size), or None when not given."""
    if text is None:
        return None
    try:
        return units.parse_size(text)
    except ValueError as err:
        raise UserError(str(err)) from None


def parse_int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers such as 32 or 16,32,64; got {text!r}.") from None
    if not values:
        raise UserError(f"{option} needs at least one value.")
    return values


def freeze_startup_objects() -> None:
    """Move every object alive now (torch's modules, the model registry) out of the garbage
    collector's reach. The runner collects garbage between techniques, because trainers leave
    reference cycles that hold tensors; without this each collection walks torch's hundreds of
    thousands of long-lived objects (0.16 s a time, measured), which was half the wall time
    of the default run. Only this command's own process is affected."""
    gc.collect()
    gc.freeze()


FROM_CHECKPOINT_HELP = ("The team must continue from an existing end-to-end checkpoint: the verdict rules "
                        "DiffusionBlocks out (it trains from scratch). Default: training from scratch.")


def reproduce_command() -> str:
    return "dbprofile " + " ".join(shlex.quote(a) for a in sys.argv[1:])


class _Commands(click.Group):
    """The command group; Ctrl-C anywhere in a command exits EXIT_INTERRUPTED with one line, not
    click's "Aborted!" and exit 1. A run has already saved every measurement that finished."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("Interrupted. A run's result JSON keeps every measurement that finished.", err=True)
            ctx.exit(exit_code(interrupted=True))


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="dbprofile")
def main() -> None:
    """Measure whether DiffusionBlocks block-wise training saves memory that matters.

    Exit codes: 0 success; 2 bad input; 3 answered, but nothing fits or every technique failed
    (the table and the report are still written); 130 interrupted."""


def output_options(func):
    """--json, --csv FILE, -q and -v for a command; it receives ``console`` (a console.Output) and
    runs with the ``dbprofile`` logger routed to stderr at the chosen level."""

    @click.option("--json", "json_mode", is_flag=True,
                  help="Print the full answer as JSON on stdout; the human-readable text goes to stderr.")
    @click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False),
                  help="Also write the flat table (one row per measurement or technique) as CSV to this file.")
    @click.option("--quiet", "-q", is_flag=True, help="No progress display and no notes, warnings only.")
    @click.option("--verbose", "-v", is_flag=True, help="Log every stage of the work (builds, warm-ups, steps).")
    @functools.wraps(func)
    def wrapper(*args, json_mode: bool, csv_path: str | None, quiet: bool, verbose: bool, **kwargs):
        if quiet and verbose:
            raise UserError("--quiet and --verbose contradict each other; pass one of them.")
        console = Output(json_mode=json_mode, csv_path=Path(csv_path) if csv_path else None,
                         verbosity=QUIET if quiet else VERBOSE if verbose else NORMAL)
        with console.logging_configured():
            return func(*args, console=console, **kwargs)

    return wrapper


@main.command()
@output_options
@friendly_errors
def models(console: Output) -> None:
    """List the built-in model presets with parameter counts, family and task."""
    from dbprofile.models import preset_table
    from dbprofile.report.text import preset_list

    rows = preset_table()
    console.text(preset_list(rows))
    console.emit_json({"models": rows})
    console.write_csv(lambda: _frame(rows))


def _techniques_option(techniques: str | None, blocks: str | None) -> list[str]:
    """--techniques wins; otherwise e2e, ckpt and db:B for each B of --blocks (default 2,3,4)."""
    from dbprofile.techniques import DEFAULT_TECHNIQUES

    if techniques:
        return [t.strip() for t in techniques.split(",") if t.strip()]
    if blocks:
        return ["e2e", "ckpt"] + [f"db:{b}" for b in parse_int_list(blocks, "--blocks")]
    return list(DEFAULT_TECHNIQUES)


def model_options(func):
    """--set, --seq-len and --image-size: the model's config and shapes, for run and plan."""
    func = click.option("--image-size", default=None,
                        help="Image side of a vision model (a DiT's latent side); several comma-separated "
                             "values sweep it (run).")(func)
    func = click.option("--seq-len", default=None,
                        help="Sequence length of a language model; several comma-separated values sweep it "
                             "(run), e.g. 256,512,1024.")(func)
    func = click.option("--set", "set_options", multiple=True, metavar="KEY=VALUE",
                        help="Override a config field of an hf:, diffusers: or timm: model (repeatable), "
                             "e.g. --set num_hidden_layers=4.")(func)
    return func


def _load_models(model, set_options, seq_len, image_size):
    """(swept shape or None, specs) for MODEL with the --set / --seq-len / --image-size options."""
    from dbprofile.loading import load_sweep
    from dbprofile.models.overrides import parse_set_options

    seq_lens = parse_int_list(seq_len, "--seq-len") if seq_len else None
    image_sizes = parse_int_list(image_size, "--image-size") if image_size else None
    return load_sweep(model, parse_set_options(set_options), seq_lens, image_sizes)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


@main.command()
@click.argument("model", required=False)
@click.option("--batch-size", "-b", default="8", show_default=True,
              help="Batch size, or several comma-separated (16,32,64).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--techniques", "-t", default=None,
              help="Comma-separated: e2e, ckpt, ckpt:K, db:B, db:B+ckpt, db:B+offload, db:B+interleaved (causal LMs). "
                   "Default: e2e,ckpt,db:2,db:3,db:4.")
@click.option("--blocks", default=None, help="Shortcut: e2e, ckpt and db:B for each B given (e.g. 2,4,6).")
@click.option("--steps", default=5, show_default=True, type=int,
              help="Fewest timed steps per technique (per block); timing also runs at least 1 s and until "
                   "the spread is small (torch.utils.benchmark adaptive_autorange).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd", "adafactor"]), default="adamw", show_default=True)
@click.option("--fake", is_flag=True, help="Fake tensors: shapes and bytes only, no real allocation or timing.")
@click.option("--memory-limit", default=None, help="Treat a technique whose live bytes pass this (e.g. 2GiB) as OOM.")
@click.option("--out", "-o", default=None, type=click.Path(dir_okay=False),
              help="Result JSON path (default reports/<model>.json); the HTML report is written beside it.")
@click.option("--no-report", is_flag=True, help="Write only the JSON, no HTML report.")
@click.option("--dry-run", is_flag=True, help="Validate the model and print what would be measured.")
@click.option("--memory-snapshot", default=None, type=click.Path(file_okay=False),
              help="CUDA only: write PyTorch's memory snapshot of each technique's tracked step to this folder "
                   "(open at pytorch.org/memory_viz); the report links them.")
@click.option("--fsdp", is_flag=True,
              help="Shard with FSDP2 (fully_shard per layer) across the ranks of a torchrun launch.")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Launch N processes with torchrun on this machine (for --fsdp and db:B+parallel).")
@click.option("--timeout", "timeout_s", default=600.0, show_default=True, type=float,
              help="Seconds one technique may run (build, warm-up, steps) before it is recorded as timed out "
                   "and the run moves on; also bounds loading and checking the model. 0: no limit. Under "
                   "--fsdp/--nproc, also how long a rank waits for the others in a collective.")
@click.option("--from-checkpoint", is_flag=True, help=FROM_CHECKPOINT_HELP)
@model_options
@output_options
@friendly_errors
def run(model, batch_size, device, techniques, blocks, steps, precision, optimizer, fake, memory_limit, out,
        no_report, dry_run, memory_snapshot, fsdp, nproc, timeout_s, from_checkpoint, set_options,
        seq_len, image_size, console: Output) -> None:
    """Profile MODEL (a preset name, file.py or file.py:name, hf:NAME, diffusers:DiT, timm:NAME;
    default: a tiny built-in ViT)."""
    from dbprofile.measure.device import resolve_device
    from dbprofile.techniques import parse_techniques

    batch_sizes = parse_int_list(batch_size, "--batch-size")
    if any(b < 1 for b in batch_sizes):
        raise UserError(f"--batch-size must be at least 1; got {batch_size}.")
    if steps < 1:
        raise UserError(f"--steps must be at least 1; got {steps}.")
    if not timeout_s >= 0:  # also refuses nan
        raise UserError(f"--timeout is seconds, 0 or more (0: no limit); got {timeout_s}.")
    if math.isinf(timeout_s):
        timeout_s = 0.0
    limit = parse_size(memory_limit)
    if limit is not None and limit < 1:
        raise UserError(f"--memory-limit must be at least 1 byte; got {memory_limit!r}.")
    if out is not None and Path(out).suffix.lower() == ".html":
        raise UserError(f"--out names the result JSON (the HTML report is written beside it); got {out!r}. "
                        "Give a .json path.")
    names = _techniques_option(techniques, blocks)
    resolve_device(device)
    distributed = fsdp or nproc is not None or any(n.strip().endswith("+parallel") for n in names)
    if memory_snapshot is not None:
        if distributed:
            raise UserError("--memory-snapshot records one process's CUDA allocator and is not available for "
                            "distributed runs (--fsdp, --nproc, db:B+parallel) yet; profile one device with it.")
        import torch

        from dbprofile.measure.snapshot import check_snapshot_device

        check_snapshot_device(torch.device(device), fake)
    if distributed:
        # A process group needs a finite timeout: "no limit" becomes a week.
        _run_distributed(model, names, batch_sizes, device, steps, precision, optimizer, out, no_report,
                         fsdp, nproc, timeout_s or 7 * 24 * 3600.0, console, (set_options, seq_len, image_size))
        return
    techs = parse_techniques(names)
    per_technique_s = timeout_s or None
    with _loading_limit(per_technique_s):
        swept, specs = _load_models(model, set_options, seq_len, image_size)
    results, codes = [], []
    for spec in specs:
        answered = _run_one(spec, techs, not techniques and not blocks, batch_sizes, device, steps, precision,
                            optimizer, fake, limit, out, no_report, dry_run, swept, memory_snapshot,
                            per_technique_s, from_checkpoint, console)
        if answered is not None:
            results.append(answered[0])
            codes.append(answered[1])
    if swept and results and not no_report:
        from dbprofile.report import write_comparison

        # The comparison of the runs draws peak memory against the swept value.
        base = Path(out).with_suffix("") if out else Path("reports") / _safe_name(specs[0].name)
        path = write_comparison(results, Path(f"{base}-{swept}-sweep.html"), command=reproduce_command())
        console.text(f"sweep:   {path}")
    if codes:
        # A sweep answered if any of its runs did (exit 3 only when every run had nothing to show).
        sys.exit(min(codes))


@contextlib.contextmanager
def _loading_limit(seconds: float | None):
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


def _run_one(spec, techs, drop_deeper, batch_sizes, device, steps, precision, optimizer, fake, limit, out,
             no_report, dry_run, swept, memory_snapshot, per_technique_s, from_checkpoint, console: Output):
    """Check, measure and answer for one model spec (one value of a sweep): (result, exit code), or None
    for a dry run."""
    from dbprofile.loading import shape_value
    from dbprofile.measure.runner import prepare
    from dbprofile.units import format_bytes

    asked = techs
    with _loading_limit(per_technique_s):
        # The default set adapts to shallow models; techniques asked for by name never do.
        spec, techs, facts = prepare(spec, asked, precision, optimizer, drop_deeper=drop_deeper)
    dropped = [t.name for t in asked if t not in techs]
    if dropped:
        console.info(f"skipping {', '.join(dropped)}: the model has only {facts['num_layers']} layers")
    console.text(
        f"{spec.name}: {spec.family} {spec.task}, {facts['num_layers']} residual layers at {spec.layers!r}, "
        f"hidden {facts['hidden_size']}, {facts['parameters']:,} parameters\n"
        f"techniques: {', '.join(t.name for t in techs)}; batch sizes: {', '.join(map(str, batch_sizes))}; "
        f"device {device}{' (fake tensors)' if fake else ''}, {precision}, {optimizer}"
    )
    if facts["not_residual"]:
        console.info(f"note: {facts['not_residual']}")
    out_path = Path(out) if out else Path("reports") / f"{_safe_name(spec.name)}.json"
    if swept:
        out_path = out_path.with_name(f"{out_path.stem}-{swept}-{shape_value(spec, swept)}{out_path.suffix}")
    check_writable(out_path, "--out")
    if not no_report:
        check_writable(out_path.with_suffix(".html"), "the HTML report beside --out")
    if dry_run:
        console.emit_json({"model": spec.name, "model_info": facts, "techniques": [t.name for t in techs],
                           "batch_sizes": batch_sizes, "device": device, "fake": fake, "precision": precision,
                           "optimizer": optimizer, "dry_run": True})
        return None

    from dbprofile.files import output_lock
    from dbprofile.measure.runner import run as run_profile
    from dbprofile.report.text import run_table

    freeze_startup_objects()
    with output_lock(out_path):
        _note_replaced(out_path, console)
        with console.progress(f"{spec.name}", total=len(techs) * len(batch_sizes)) as advance:

            def measured(measurement) -> None:
                state = format_bytes(measurement.peak_bytes) if measurement.ok else measurement.status.upper()
                console.info(f"  measured {measurement.technique} @ batch {measurement.batch_size}: {state}")
                advance()

            try:
                result = run_profile(
                    spec, techs, batch_sizes, device=device, precision=precision, optimizer=optimizer,
                    steps=steps, fake=fake, memory_limit=limit, out=out_path, on_measurement=measured,
                    command=reproduce_command(), memory_snapshot=memory_snapshot,
                    time_limit_s=per_technique_s, facts=facts, from_checkpoint=from_checkpoint,
                )
            except KeyboardInterrupt:
                click.echo(f"The measurements that finished are in {out_path}, marked incomplete; "
                           f"`dbprofile report {shlex.quote(str(out_path))}` renders them.", err=True)
                raise
        code = _answer_run(result, out_path, no_report, run_table(result), console)
    return result, code


def _answer_run(result: RunResult, out_path: Path, no_report: bool, table: str, console: Output) -> int:
    """Print the table, write the HTML report and the JSON / CSV answers; returns the exit code."""
    files = {"json": str(out_path)}
    lines = [table, f"results: {out_path}"]
    if not no_report:
        from dbprofile.report import write_run_report

        files["html"] = str(write_run_report(result, out_path.with_suffix(".html")))
        lines.append(f"report:  {files['html']}")
    console.text("\n".join(lines))
    console.emit_json({**result.to_dict(), "files": files})
    console.write_csv(result.to_dataframe)
    return exit_code(result)


def _concat_frames(frames: list):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def _frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows)


def _sourced_frame(sources: tuple[str, ...], runs: list[RunResult]):
    """Every run's measurement rows, each with the result file it came from as the first column."""
    import pandas as pd

    frames = [r.to_dataframe() for r in runs]
    for source, frame in zip(sources, frames):
        frame.insert(0, "source", source)
    return pd.concat(frames, ignore_index=True)


def _note_replaced(path: Path, console: Output) -> None:
    """Replacing an earlier result is normal (a rerun), but never silent: say whose it was (a note,
    which -q silences)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(old, dict):
        console.info(f"replacing {path} (a run of {old.get('model')!r} from {old.get('created') or 'an unknown time'})")



def _load_result(path: str):
    """Read a result file (schema-checked); an incomplete run is said so on stderr."""
    from dbprofile.results import RunResult

    result = RunResult.load(path)
    if not result.complete:
        click.echo(f"note: {path} is an incomplete run ({result.incomplete_reason or 'reason not recorded'}); "
                   "the report covers the measurements that finished.", err=True)
    return result


@main.command()
@click.argument("result", type=click.Path(dir_okay=False))
@click.option("--output", "-o", default=None, type=click.Path(dir_okay=False),
              help="HTML path (default: beside the JSON).")
@output_options
@friendly_errors
def report(result, output, console: Output) -> None:
    """Re-render the HTML report of RESULT (a JSON written by `dbprofile run`).

    --json prints the result with its verdict; --csv writes its measurements as a table."""
    from dbprofile.report import write_run_report
    from dbprofile.verdict import judge_into

    html_path = Path(output) if output else Path(result).with_suffix(".html")
    if html_path.resolve() == Path(result).resolve():
        raise UserError(f"The report would overwrite its own result file {result!r}; give --output a .html path.")
    check_writable(html_path, "--output")
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
@click.option("--output", "-o", default="reports/comparison.html", show_default=True,
              type=click.Path(dir_okay=False))
@output_options
@friendly_errors
def compare(results, output, console: Output) -> None:
    """Put several runs side by side (batch sizes, devices or models) in one HTML file.

    --json prints every run (with its source file and verdict); --csv writes all their
    measurements, one row each, with a leading ``source`` column."""
    from dbprofile.report import write_comparison
    from dbprofile.verdict import judge_into

    if any(Path(output).resolve() == Path(r).resolve() for r in results):
        raise UserError(f"--output {output!r} is one of the result files being compared; give another path.")
    check_writable(Path(output), "--output")
    runs = [_load_result(path) for path in results]
    for run_result in runs:
        if run_result.verdict is None:  # written before verdicts were stored with runs
            judge_into(run_result)
    path = write_comparison(runs, Path(output), command=reproduce_command())
    console.text(f"comparison: {path}")
    console.emit_json({"runs": [{"source": source, **r.to_dict()} for source, r in zip(results, runs)],
                       "files": {"html": str(path)}})
    console.write_csv(lambda: _sourced_frame(results, runs))
    sys.exit(exit_code(runs))


@main.command()
@click.argument("model", required=False)
@click.option("--gpu", "gpu", default="H100-80GB", show_default=True,
              help="Target: a GPU name (H100-80GB, A100-40GB, L4, ...), a capacity such as 24GiB, or cpu.")
@click.option("--batch-size", "-b", default=8, show_default=True, type=int, help="Batch size per device.")
@click.option("--techniques", "-t", default=None, help="Comma-separated techniques (default e2e,ckpt,db:2,db:3,db:4).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd", "adafactor"]), default="adamw", show_default=True)
@click.option("--zero", "zero_stage", type=click.IntRange(0, 3), default=0, show_default=True,
              help="ZeRO / FSDP stage (1: optimizer state, 2: + gradients, 3: + parameters sharded).")
@click.option("--world-size", type=int, default=1, show_default=True,
              help="Devices available: the state is sharded over them (--zero), or db:B+parallel uses B of them.")
@click.option("--from-checkpoint", is_flag=True, help=FROM_CHECKPOINT_HELP)
@click.option("--html", default=None, type=click.Path(dir_okay=False),
              help="Also write the plan as HTML (also when nothing fits).")
@click.option("--full-trace", is_flag=True, default=False,
              help="Trace every layer instead of extrapolating identical layers from shallow copies.")
@model_options
@output_options
@friendly_errors
def plan(model, gpu, batch_size, techniques, precision, optimizer, zero_stage, world_size, from_checkpoint, html,
         full_trace, set_options, seq_len, image_size, console: Output) -> None:
    """Predict each technique's peak on a target GPU without one (fake tensors), with a verdict.

    When nothing fits, the table, the HTML and the JSON still come, each technique with the bytes it
    misses by (``shortfall_bytes``), and the exit code is 3. Several --seq-len / --image-size values
    plan each shape (the JSON is then a list)."""
    from dbprofile.files import write_atomic
    from dbprofile.loading import shape_value
    from dbprofile.models.common import build_on_meta, count_parameters
    from dbprofile.planner import plan as make_plan
    from dbprofile.report.notebook import format_plan_html
    from dbprofile.report.text import format_plan

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1; got {batch_size}.")
    if html:
        check_writable(Path(html), "--html")
    target = gpu
    if gpu and gpu[0].isdigit():
        target = parse_size(gpu)
    swept, specs = _load_models(model, set_options, seq_len, image_size)
    answers, results, codes = [], [], []
    for spec in specs:
        with console.progress(f"planning {spec.name}"):
            # plan() checks the model first (build, loss, sys.exit), so counting after it is safe.
            result = make_plan(spec, batch_size, device=target, techniques=techniques, precision=precision,
                               optimizer=optimizer, zero_stage=zero_stage, world_size=world_size,
                               full_trace=full_trace, from_checkpoint=from_checkpoint)
        # Counted on the meta device: the model as the user's code builds it, at no memory cost.
        console.text(f"{spec.name} ({spec.description}): {count_parameters(build_on_meta(spec.build)):,} parameters")
        if swept:
            console.text(f"{swept} = {shape_value(spec, swept)}:")
        console.text(format_plan(result))
        files = {}
        if html:
            path = Path(html)
            if swept:
                path = path.with_name(f"{path.stem}-{swept}-{shape_value(spec, swept)}{path.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            files["html"] = str(write_atomic(path, format_plan_html(result)))
            console.text(f"plan: {files['html']}")
        answers.append({**result.to_dict(), "files": files})
        results.append(result)
        codes.append(exit_code(result))
    console.emit_json(answers[0] if len(answers) == 1 else answers)
    console.write_csv(results[0].to_dataframe if len(results) == 1 else
                      lambda: _concat_frames([r.to_dataframe() for r in results]))
    sys.exit(min(codes))


def _parse_cases(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """'vit-b16:32,64;gpt2-small:4' -> [('vit-b16', (32, 64)), ('gpt2-small', (4,))]."""
    cases = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, sizes = part.partition(":")
        if not sep:
            raise UserError(f"--cases entries look like MODEL:B1,B2 separated by ';'; got {part!r}.")
        cases.append((name, tuple(parse_int_list(sizes, "--cases"))))
    return cases


@main.command()
@click.option("--cases", default=None,
              help="MODEL:BATCH,BATCH;... (default vit-b16:32,64;dit-b2:32,64;gpt2-small:4,8).")
@click.option("--techniques", "-t", default=None, help="Default e2e,ckpt,db:2,db:4,db:4+offload.")
@click.option("--precisions", default="fp32,bf16", show_default=True)
@click.option("--device", default="cuda", show_default=True)
@click.option("--steps", default=2, show_default=True, type=int)
@click.option("--time-budget", default=None, type=float, help="Seconds after which no new case starts.")
@click.option("--out", "-o", default=None, type=click.Path(dir_okay=False),
              help="Also write the table as Markdown here (and the rows as JSON beside it).")
@output_options
@friendly_errors
def validate(cases, techniques, precisions, device, steps, time_budget, out, console: Output) -> None:
    """Check the tracker against the CUDA allocator and the planner against real runs."""
    from dbprofile import validate as v
    from dbprofile.files import to_standard_json, write_atomic
    from dbprofile.measure.device import environment, resolve_device
    from dbprofile.techniques import parse_techniques
    from dbprofile.methods.base import PRECISIONS
    from dbprofile.report import text

    if steps < 1:
        raise UserError(f"--steps must be at least 1; got {steps}.")
    if time_budget is not None and not time_budget >= 0:
        raise UserError(f"--time-budget is seconds, 0 or more; got {time_budget}.")
    resolve_device(device)
    if out:
        check_writable(Path(out), "--out")
    case_list = _parse_cases(cases) if cases else list(v.DEFAULT_CASES)
    techs = [t.name for t in parse_techniques(techniques)] if techniques else list(v.DEFAULT_TECHNIQUES)
    precision_list = [p.strip() for p in precisions.split(",") if p.strip()]
    if not precision_list or any(p not in PRECISIONS for p in precision_list):
        raise UserError(f"--precisions takes a comma-separated list of {', '.join(PRECISIONS)}; got {precisions!r}.")
    env = environment(device)
    header = (f"dbprofile validate on {env.get('device_name')} (driver {env.get('driver')}, CUDA {env.get('cuda_runtime')}, "
              f"torch {env.get('torch')}, dbprofile {__version__})")
    console.text(header)
    console.text(text.VALIDATION_HEADER)
    total = sum(len(sizes) for _, sizes in case_list) * len(techs) * len(precision_list)
    with console.progress("validating", total=total) as advance:

        def on_row(row) -> None:
            console.text(text.validation_row(row))
            advance()

        rows = v.validate(case_list, techs, precision_list, device=device, steps=steps, time_budget_s=time_budget,
                          on_row=on_row)
    summary = text.validation_summary(rows)
    console.text("")
    console.text(summary)
    if out:
        path = Path(out)
        table = "\n".join([text.VALIDATION_HEADER, *(text.validation_row(r) for r in rows)])
        write_atomic(path, f"# {header}\n\nCommand: `{reproduce_command()}`\n\n{table}\n\n```\n{summary}\n```\n")
        write_atomic(path.with_suffix(".json"), to_standard_json(
            {"environment": env, "command": reproduce_command(), "rows": [r.to_dict() for r in rows]}))
        console.text(f"written: {path}")
    console.emit_json({"environment": env, "command": reproduce_command(), "rows": [r.to_dict() for r in rows],
                       "summary": summary})
    console.write_csv(lambda: _frame([r.to_dict() for r in rows]))
    sys.exit(exit_code(rows))


def _run_distributed(model, names, batch_sizes, device, steps, precision, optimizer, out, no_report,
                     fsdp, nproc, timeout_s, console: Output, model_opts=(None, None, None)) -> None:
    """Per-rank profiling under torchrun: relaunch with --nproc, or measure on this rank.

    Rank 0 prints the answer (and the JSON / CSV). torchrun turns any rank's non-zero exit into its
    own failure, so the ranks exit 0 and the --nproc launcher reads rank 0's result file to exit
    with the outcome."""
    from dbprofile.loading import validate_spec
    from dbprofile.measure.distributed import in_torchrun, launch, run_distributed
    from dbprofile.techniques import parse_technique
    from dbprofile.report.text import ranks_table

    for name in names:
        parse_technique(name)  # a bad name fails here, before any process starts
    swept, specs = _load_models(model, *model_opts)
    if swept:
        raise UserError(f"A distributed run measures one shape; give --{swept.replace('_', '-')} one value.")
    spec = specs[0]
    out_path = Path(out) if out else Path("reports") / f"{_safe_name(spec.name)}-distributed.json"
    if not in_torchrun() and nproc is not None:
        code = launch(nproc, sys.argv[1:])
        sys.exit(code if code != EXIT_OK or not out_path.exists() else exit_code(RunResult.load(out_path)))
    validate_spec(spec)
    check_writable(out_path, "--out")
    if os.environ.get("RANK", "0") != "0":  # one display and one set of notes: rank 0's
        console = dataclasses.replace(console, verbosity=QUIET)
    with console.progress(f"{spec.name} on every rank"):
        result = run_distributed(spec, names, batch_sizes, fsdp=fsdp, device=device,
                                 precision=precision, optimizer=optimizer, steps=steps, out=out_path,
                                 command=reproduce_command(), timeout_s=timeout_s)
    if result is None:  # ranks other than 0 report through rank 0
        return
    code = _answer_run(result, out_path, no_report, ranks_table(result), console)
    if not in_torchrun():
        sys.exit(code)
