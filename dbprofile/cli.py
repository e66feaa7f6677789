"""The ``dbprofile`` command: parse options, call the API, render. No logic lives here.

Every user mistake surfaces as one paragraph on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import gc
import re
import shlex
import sys
from pathlib import Path

import click

from dbprofile import __version__
from dbprofile.spec import SpecError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
          "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}


class UserError(click.ClickException):
    """A mistake in the input: printed as one paragraph, exit code 2."""

    exit_code = 2

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


FROM_CHECKPOINT_HELP = ("The team must continue from an existing end-to-end checkpoint: the verdict rules "
                        "DiffusionBlocks out (it trains from scratch). Default: training from scratch.")


def reproduce_command() -> str:
    return "dbprofile " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="dbprofile")
def main() -> None:
    """Measure whether DiffusionBlocks block-wise training saves memory that matters."""


@main.command()
@friendly_errors
def models() -> None:
    """List the built-in model presets with parameter counts, family and task."""
    from dbprofile.models import preset_table

    rows = preset_table()
    click.echo(f"{'name':<14} {'family':<6} {'task':<15} {'layers':>6} {'hidden':>6} {'parameters':>14}  description")
    for row in rows:
        click.echo(
            f"{row['name']:<14} {row['family']:<6} {row['task']:<15} {row['layers']:>6} {row['hidden_size']:>6} "
            f"{row['parameters']:>14,}  {row['description']}"
        )


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
              help="Comma-separated: e2e, ckpt, ckpt:K, db:B, db:B+ckpt, db:B+offload. "
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
@click.option("--fsdp", is_flag=True,
              help="Shard with FSDP2 (fully_shard per layer) across the ranks of a torchrun launch.")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Launch N processes with torchrun on this machine (for --fsdp and db:B+parallel).")
@click.option("--timeout", "timeout_s", default=300.0, show_default=True, type=float,
              help="Seconds a rank waits for the others in a collective before it gives up.")
@click.option("--from-checkpoint", is_flag=True, help=FROM_CHECKPOINT_HELP)
@friendly_errors
def run(model, batch_size, device, techniques, blocks, steps, precision, optimizer, fake, memory_limit, out,
        no_report, dry_run, fsdp, nproc, timeout_s, from_checkpoint) -> None:
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
    if fsdp or nproc is not None or any(n.strip().endswith("+parallel") for n in names):
        _run_distributed(model, names, batch_sizes, device, steps, precision, optimizer, out, no_report,
                         fsdp, nproc, timeout_s)
        return
    techs = parse_techniques(names)
    spec = load_spec(model)
    facts = validate_spec(spec)
    if not techniques and not blocks:
        # The default set adapts to shallow models; techniques asked for by name never do.
        dropped = [t.name for t in techs if t.is_diffusion_blocks and t.blocks > facts["num_layers"]]
        techs = [t for t in techs if t.name not in dropped]
        if dropped:
            click.echo(f"skipping {', '.join(dropped)}: the model has only {facts['num_layers']} layers", err=True)
    for tech in techs:
        check_technique_fits(tech, facts["num_layers"])
    click.echo(
        f"{spec.name}: {spec.family} {spec.task}, {facts['num_layers']} residual layers at {spec.layers!r}, "
        f"hidden {facts['hidden_size']}, {facts['parameters']:,} parameters"
    )
    click.echo(f"techniques: {', '.join(t.name for t in techs)}; batch sizes: {', '.join(map(str, batch_sizes))}; "
               f"device {device}{' (fake tensors)' if fake else ''}, {precision}, {optimizer}")
    if dry_run:
        return

    from dbprofile.measure.runner import format_table, run as run_profile

    freeze_startup_objects()

    out_path = Path(out) if out else Path("reports") / f"{_safe_name(spec.name)}.json"

    def progress(measurement) -> None:
        state = format_bytes(measurement.peak_bytes) if measurement.ok else measurement.status.upper()
        click.echo(f"  measured {measurement.technique} @ batch {measurement.batch_size}: {state}", err=True)

    result = run_profile(
        spec, techs, batch_sizes, device=device, precision=precision, optimizer=optimizer, steps=steps,
        fake=fake, memory_limit=limit, out=out_path, on_measurement=progress, command=reproduce_command(),
        from_checkpoint=from_checkpoint,
    )
    click.echo(format_table(result))
    click.echo(f"results: {out_path}")
    if not no_report:
        from dbprofile.report import write_run_report

        html_path = write_run_report(result, out_path.with_suffix(".html"))
        click.echo(f"report:  {html_path}")


def _load_result(path: str):
    from dbprofile.results import RunResult

    return RunResult.load(path)


@main.command()
@click.argument("result", type=click.Path(dir_okay=False))
@click.option("--output", "-o", default=None, type=click.Path(dir_okay=False),
              help="HTML path (default: beside the JSON).")
@friendly_errors
def report(result, output) -> None:
    """Re-render the HTML report of RESULT (a JSON written by `dbprofile run`)."""
    from dbprofile.report import write_run_report

    run_result = _load_result(result)
    path = write_run_report(run_result, Path(output) if output else Path(result).with_suffix(".html"))
    click.echo(f"report: {path}")


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--output", "-o", default="reports/comparison.html", show_default=True,
              type=click.Path(dir_okay=False))
@friendly_errors
def compare(results, output) -> None:
    """Put several runs side by side (batch sizes, devices or models) in one HTML file."""
    from dbprofile.report import write_comparison

    runs = [_load_result(path) for path in results]
    path = write_comparison(runs, Path(output), command=reproduce_command())
    click.echo(f"comparison: {path}")


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
@click.option("--html", default=None, type=click.Path(dir_okay=False), help="Also write the plan as HTML.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout (the table goes to stderr).")
@friendly_errors
def plan(model, gpu, batch_size, techniques, precision, optimizer, zero_stage, world_size, from_checkpoint, html,
         as_json) -> None:
    """Predict each technique's peak on a target GPU without one (fake tensors), with a verdict."""
    from dbprofile.plan import format_plan, format_plan_html, plan as make_plan
    from dbprofile.spec import load_spec

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1; got {batch_size}.")
    target = gpu
    if gpu and gpu[0].isdigit():
        target = parse_size(gpu)
    result = make_plan(load_spec(model), batch_size, device=target, techniques=techniques, precision=precision,
                       optimizer=optimizer, zero_stage=zero_stage, world_size=world_size,
                       from_checkpoint=from_checkpoint)
    click.echo(format_plan(result), err=as_json)
    if as_json:
        click.echo(result.to_json())
    if html:
        path = Path(html)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(format_plan_html(result))
        click.echo(f"plan: {path}", err=as_json)


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
@friendly_errors
def validate(cases, techniques, precisions, device, steps, time_budget, out) -> None:
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
    click.echo(header)
    click.echo(v.TABLE_HEADER)
    rows = v.validate(case_list, techs, precision_list, device=device, steps=steps, time_budget_s=time_budget,
                      on_row=lambda row: click.echo(v.format_row(row)))
    summary = v.summarise(rows)
    click.echo("")
    click.echo(summary)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = "\n".join([v.TABLE_HEADER, *(v.format_row(r) for r in rows)])
        path.write_text(f"# {header}\n\nCommand: `{reproduce_command()}`\n\n{table}\n\n```\n{summary}\n```\n")
        path.with_suffix(".json").write_text(json.dumps(
            {"environment": env, "command": reproduce_command(), "rows": [r.to_dict() for r in rows]}, indent=1))
        click.echo(f"written: {path}")


def _run_distributed(model, names, batch_sizes, device, steps, precision, optimizer, out, no_report,
                     fsdp, nproc, timeout_s) -> None:
    """Per-rank profiling under torchrun: relaunch with --nproc, or measure on this rank."""
    from dbprofile.measure.distributed import format_ranks, in_torchrun, launch, run_distributed
    from dbprofile.methods.sharding import parse_distributed_technique
    from dbprofile.spec import load_spec, validate_spec

    for name in names:
        parse_distributed_technique(name)  # a bad name fails here, before any process starts
    if not in_torchrun() and nproc is not None:
        sys.exit(launch(nproc, sys.argv[1:]))
    spec = load_spec(model)
    validate_spec(spec)
    out_path = Path(out) if out else Path("reports") / f"{_safe_name(spec.name)}-distributed.json"
    result = run_distributed(spec, names, batch_sizes, fsdp=fsdp, device=device,
                             precision=precision, optimizer=optimizer, steps=steps, out=out_path,
                             command=reproduce_command(), timeout_s=timeout_s)
    if result is None:  # ranks other than 0 report through rank 0
        return
    click.echo(format_ranks(result))
    click.echo(f"results: {out_path}")
    if not no_report:
        from dbprofile.report import write_run_report

        click.echo(f"report:  {write_run_report(result, out_path.with_suffix('.html'))}")
