"""The ``dbprofile`` command: parse options, call the API, render. No logic lives here.

Every user mistake surfaces as one paragraph on stderr and exit code 2, never a traceback.
``exit_code`` is the one place that maps what happened to the exit status (README, "Exit
codes"); ``dbprofile.console`` decides where output goes (stdout, stderr, JSON, CSV, progress).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from dbprofile import __version__
from dbprofile.console import NORMAL, QUIET, VERBOSE, Output
from dbprofile.results import Plan, RunResult
from dbprofile.spec import SpecError

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
        from dbprofile.plan import nothing_fits

        return not nothing_fits(answer)
    if isinstance(answer, RunResult):
        return any(m.ok for m in answer.measurements)
    if isinstance(answer, (list, tuple)):
        return any(_usable(item) for item in answer)
    return getattr(answer, "status", None) == "ok"  # a validation row

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
          "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}


class UserError(click.ClickException):
    """A mistake in the input: printed as one paragraph, exit code 2."""

    exit_code = EXIT_BAD_INPUT

    def show(self, file=None) -> None:
        click.echo(f"Error: {self.message}", err=True)


def friendly_errors(func):
    """Turn SpecError / ValueError from the API into UserError (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (SpecError, ValueError) as err:
            raise UserError(str(err)) from None

    return wrapper


def parse_size(text: str | None) -> int | None:
    """'24GiB', '512 MiB', '8e9'-free plain integers of bytes -> bytes."""
    if text is None:
        return None
    match = _SIZE.match(text)
    if not match:
        raise UserError(f"Cannot read the size {text!r}; write it like 24GiB, 512MiB or 1073741824 (bytes).")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "b").lower()])


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

    rows = preset_table()
    lines = [f"{'name':<14} {'family':<6} {'task':<15} {'layers':>6} {'hidden':>6} {'parameters':>14}  description"]
    for row in rows:
        lines.append(
            f"{row['name']:<14} {row['family']:<6} {row['task']:<15} {row['layers']:>6} {row['hidden_size']:>6} "
            f"{row['parameters']:>14,}  {row['description']}"
        )
    console.text("\n".join(lines))
    console.emit_json({"models": rows})
    console.write_csv(lambda: _frame(rows))


def _techniques_option(techniques: str | None, blocks: str | None) -> list[str]:
    """--techniques wins; otherwise e2e, ckpt and db:B for each B of --blocks (default 2,3,4)."""
    from dbprofile.methods import DEFAULT_TECHNIQUES

    if techniques:
        return [t.strip() for t in techniques.split(",") if t.strip()]
    if blocks:
        return ["e2e", "ckpt"] + [f"db:{b}" for b in parse_int_list(blocks, "--blocks")]
    return list(DEFAULT_TECHNIQUES)


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
@click.option("--steps", default=2, show_default=True, type=int, help="Measured steps per technique (per block).")
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
@click.option("--timeout", "timeout_s", default=300.0, show_default=True, type=float,
              help="Seconds a rank waits for the others in a collective before it gives up.")
@output_options
@friendly_errors
def run(model, batch_size, device, techniques, blocks, steps, precision, optimizer, fake, memory_limit, out,
        no_report, dry_run, memory_snapshot, fsdp, nproc, timeout_s, console: Output) -> None:
    """Profile MODEL (a preset name, file.py or file.py:name; default: a tiny built-in ViT)."""
    from dbprofile.methods import check_technique_fits, parse_techniques
    from dbprofile.results import format_bytes
    from dbprofile.spec import load_spec, validate_spec

    batch_sizes = parse_int_list(batch_size, "--batch-size")
    if any(b < 1 for b in batch_sizes):
        raise UserError(f"--batch-size must be at least 1; got {batch_size}.")
    if steps < 1:
        raise UserError(f"--steps must be at least 1; got {steps}.")
    limit = parse_size(memory_limit)
    names = _techniques_option(techniques, blocks)
    distributed = fsdp or nproc is not None or any(n.strip().endswith("+parallel") for n in names)
    if memory_snapshot is not None:
        if distributed:
            raise UserError("--memory-snapshot records one process's CUDA allocator and is not available for "
                            "distributed runs (--fsdp, --nproc, db:B+parallel) yet; profile one device with it.")
        import torch

        from dbprofile.measure.snapshot import check_snapshot_device

        check_snapshot_device(torch.device(device), fake)
    if distributed:
        _run_distributed(model, names, batch_sizes, device, steps, precision, optimizer, out, no_report,
                         fsdp, nproc, timeout_s, console)
        return
    techs = parse_techniques(names)
    spec = load_spec(model)
    facts = validate_spec(spec)
    if not techniques and not blocks:
        # The default set adapts to shallow models; techniques asked for by name never do.
        dropped = [t.name for t in techs if t.is_diffusion_blocks and t.blocks > facts["num_layers"]]
        techs = [t for t in techs if t.name not in dropped]
        if dropped:
            console.info(f"skipping {', '.join(dropped)}: the model has only {facts['num_layers']} layers")
    for tech in techs:
        check_technique_fits(tech, facts["num_layers"])
    console.text(
        f"{spec.name}: {spec.family} {spec.task}, {facts['num_layers']} residual layers at {spec.layers!r}, "
        f"hidden {facts['hidden_size']}, {facts['parameters']:,} parameters\n"
        f"techniques: {', '.join(t.name for t in techs)}; batch sizes: {', '.join(map(str, batch_sizes))}; "
        f"device {device}{' (fake tensors)' if fake else ''}, {precision}, {optimizer}"
    )
    if dry_run:
        console.emit_json({"model": spec.name, "model_info": facts, "techniques": [t.name for t in techs],
                           "batch_sizes": batch_sizes, "device": device, "fake": fake, "precision": precision,
                           "optimizer": optimizer, "dry_run": True})
        return

    from dbprofile.measure.runner import format_table, run as run_profile

    freeze_startup_objects()

    out_path = Path(out) if out else Path("reports") / f"{_safe_name(spec.name)}.json"
    with console.progress(f"{spec.name}", total=len(techs) * len(batch_sizes)) as advance:

        def measured(measurement) -> None:
            state = format_bytes(measurement.peak_bytes) if measurement.ok else measurement.status.upper()
            console.info(f"  measured {measurement.technique} @ batch {measurement.batch_size}: {state}")
            advance()

        result = run_profile(
            spec, techs, batch_sizes, device=device, precision=precision, optimizer=optimizer, steps=steps,
            fake=fake, memory_limit=limit, out=out_path, on_measurement=measured, command=reproduce_command(),
            memory_snapshot=memory_snapshot,
        )
    sys.exit(_answer_run(result, out_path, no_report, format_table(result), console))


def _answer_run(result: RunResult, out_path: Path, no_report: bool, table: str, console: Output) -> int:
    """Print the table, write the HTML report and the JSON / CSV answers; returns the exit code."""
    from dbprofile.verdict import judge

    files = {"json": str(out_path)}
    lines = [table, f"results: {out_path}"]
    if not no_report:
        from dbprofile.report import write_run_report

        files["html"] = str(write_run_report(result, out_path.with_suffix(".html")))
        lines.append(f"report:  {files['html']}")
    console.text("\n".join(lines))
    console.emit_json({**result.to_dict(), "verdict": judge(result), "files": files})
    console.write_csv(result.to_dataframe)
    return exit_code(result)


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


def _load_result(path: str):
    from dbprofile.results import RunResult

    return RunResult.load(path)


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
    from dbprofile.verdict import judge

    run_result = _load_result(result)
    path = write_run_report(run_result, Path(output) if output else Path(result).with_suffix(".html"))
    console.text(f"report: {path}")
    console.emit_json({**run_result.to_dict(), "verdict": judge(run_result), "files": {"json": result, "html": str(path)}})
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
    from dbprofile.verdict import judge

    runs = [_load_result(path) for path in results]
    path = write_comparison(runs, Path(output), command=reproduce_command())
    console.text(f"comparison: {path}")
    console.emit_json({"runs": [{"source": source, **r.to_dict(), "verdict": judge(r)} for source, r in zip(results, runs)],
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
@click.option("--world-size", type=int, default=1, show_default=True, help="Devices the state is sharded over.")
@click.option("--html", default=None, type=click.Path(dir_okay=False),
              help="Also write the plan as HTML (also when nothing fits).")
@output_options
@friendly_errors
def plan(model, gpu, batch_size, techniques, precision, optimizer, zero_stage, world_size, html,
         console: Output) -> None:
    """Predict each technique's peak on a target GPU without one (fake tensors), with a verdict.

    When nothing fits, the table, the HTML and the JSON still come, each technique with the bytes it
    misses by (``shortfall_bytes``), and the exit code is 3."""
    from dbprofile.plan import format_plan, format_plan_html, plan as make_plan
    from dbprofile.spec import load_spec

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1; got {batch_size}.")
    target = gpu
    if gpu and gpu[0].isdigit():
        target = parse_size(gpu)
    spec = load_spec(model)
    with console.progress(f"planning {spec.name}"):
        result = make_plan(spec, batch_size, device=target, techniques=techniques, precision=precision,
                           optimizer=optimizer, zero_stage=zero_stage, world_size=world_size)
    console.text(format_plan(result))
    files = {}
    if html:
        path = Path(html)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(format_plan_html(result))
        files["html"] = str(path)
        console.text(f"plan: {path}")
    console.emit_json({**result.to_dict(), "files": files})
    console.write_csv(result.to_dataframe)
    sys.exit(exit_code(result))


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
    import json

    from dbprofile import validate as v
    from dbprofile.measure.device import environment
    from dbprofile.methods import parse_techniques

    case_list = _parse_cases(cases) if cases else list(v.DEFAULT_CASES)
    techs = [t.name for t in parse_techniques(techniques)] if techniques else list(v.DEFAULT_TECHNIQUES)
    precision_list = [p.strip() for p in precisions.split(",") if p.strip()]
    env = environment(device)
    header = (f"dbprofile validate on {env.get('device_name')} (driver {env.get('driver')}, CUDA {env.get('cuda_runtime')}, "
              f"torch {env.get('torch')}, dbprofile {__version__})")
    console.text(header)
    console.text(v.TABLE_HEADER)
    total = sum(len(sizes) for _, sizes in case_list) * len(techs) * len(precision_list)
    with console.progress("validating", total=total) as advance:

        def on_row(row) -> None:
            console.text(v.format_row(row))
            advance()

        rows = v.validate(case_list, techs, precision_list, device=device, steps=steps, time_budget_s=time_budget,
                          on_row=on_row)
    summary = v.summarise(rows)
    console.text("")
    console.text(summary)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = "\n".join([v.TABLE_HEADER, *(v.format_row(r) for r in rows)])
        path.write_text(f"# {header}\n\nCommand: `{reproduce_command()}`\n\n{table}\n\n```\n{summary}\n```\n")
        path.with_suffix(".json").write_text(json.dumps(
            {"environment": env, "command": reproduce_command(), "rows": [r.to_dict() for r in rows]}, indent=1))
        console.text(f"written: {path}")
    console.emit_json({"environment": env, "command": reproduce_command(), "rows": [r.to_dict() for r in rows],
                       "summary": summary})
    console.write_csv(lambda: _frame([r.to_dict() for r in rows]))
    sys.exit(exit_code(rows))


def _run_distributed(model, names, batch_sizes, device, steps, precision, optimizer, out, no_report,
                     fsdp, nproc, timeout_s, console: Output) -> None:
    """Per-rank profiling under torchrun: relaunch with --nproc, or measure on this rank.

    Rank 0 prints the answer (and the JSON / CSV). torchrun turns any rank's non-zero exit into its
    own failure, so the ranks exit 0 and the --nproc launcher reads rank 0's result file to exit
    with the outcome."""
    from dbprofile.measure.distributed import format_ranks, in_torchrun, launch, run_distributed
    from dbprofile.methods.sharding import parse_distributed_technique
    from dbprofile.spec import load_spec, validate_spec

    for name in names:
        parse_distributed_technique(name)  # a bad name fails here, before any process starts
    spec = load_spec(model)
    out_path = Path(out) if out else Path("reports") / f"{_safe_name(spec.name)}-distributed.json"
    if not in_torchrun() and nproc is not None:
        code = launch(nproc, sys.argv[1:])
        sys.exit(code if code != EXIT_OK or not out_path.exists() else exit_code(RunResult.load(out_path)))
    validate_spec(spec)
    if os.environ.get("RANK", "0") != "0":  # one display and one set of notes: rank 0's
        console = dataclasses.replace(console, verbosity=QUIET)
    with console.progress(f"{spec.name} on every rank"):
        result = run_distributed(spec, names, batch_sizes, fsdp=fsdp, device=device,
                                 precision=precision, optimizer=optimizer, steps=steps, out=out_path,
                                 command=reproduce_command(), timeout_s=timeout_s)
    if result is None:  # ranks other than 0 report through rank 0
        return
    code = _answer_run(result, out_path, no_report, format_ranks(result), console)
    if not in_torchrun():
        sys.exit(code)
