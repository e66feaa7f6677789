"""``dbprofile models`` (the presets) and ``dbprofile validate`` (the tracker and the planner against
the CUDA allocator, on a GPU)."""

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
    parse_int_list,
    reproduce_command,
    rows_frame,
)
from dbprofile.console import Output
from dbprofile.version import __version__


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
    console.write_csv(lambda: rows_frame(rows))


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
@click.option(
    "--cases", default=None, help="MODEL:BATCH,BATCH;... (default vit-b16:32,64;dit-b2:32,64;gpt2-small:4,8)."
)
@click.option("--techniques", "-t", default=None, help="Default e2e,ckpt,db:2,db:4,db:4+offload.")
@click.option("--precisions", default="fp32,bf16", show_default=True)
@click.option("--device", default="cuda", show_default=True)
@click.option("--steps", default=2, show_default=True, type=int)
@click.option("--time-budget", default=None, type=float, help="Seconds after which no new case starts.")
@click.option(
    "--out",
    "-o",
    default=None,
    type=click.Path(dir_okay=False),
    help="Also write the table as Markdown here (and the rows as JSON beside it).",
)
@output_options
@friendly_errors
def validate(cases, techniques, precisions, device, steps, time_budget, out, console: Output) -> None:
    """Check the tracker against the CUDA allocator and the planner against real runs."""
    from dbprofile import validate as v
    from dbprofile.files import to_standard_json, write_atomic
    from dbprofile.measure.device import environment, resolve_device
    from dbprofile.report import text
    from dbprofile.techniques import parse_techniques
    from dbprofile.vocabulary import PRECISIONS

    if steps < 1:
        raise UserError(f"--steps must be at least 1; got {steps}.")
    if time_budget is not None and not time_budget >= 0:
        raise UserError(f"--time-budget is seconds, 0 or more; got {time_budget}.")
    resolve_device(device)
    outputs = [("--out", Path(out)), ("the rows' JSON beside --out", Path(out).with_suffix(".json"))] if out else []
    check_outputs(outputs + ([("--csv", console.csv_path)] if console.csv_path else []))
    case_list = _parse_cases(cases) if cases else list(v.DEFAULT_CASES)
    techs = [t.name for t in parse_techniques(techniques)] if techniques else list(v.DEFAULT_TECHNIQUES)
    precision_list = [p.strip() for p in precisions.split(",") if p.strip()]
    if not precision_list or any(p not in PRECISIONS for p in precision_list):
        raise UserError(f"--precisions takes a comma-separated list of {', '.join(PRECISIONS)}; got {precisions!r}.")
    env = environment(device)
    header = (
        f"dbprofile validate on {env.get('device_name')} (driver {env.get('driver')}, CUDA {env.get('cuda_runtime')}, "
        f"torch {env.get('torch')}, dbprofile {__version__})"
    )
    console.text(header)
    console.text(text.VALIDATION_HEADER)
    total = sum(len(sizes) for _, sizes in case_list) * len(techs) * len(precision_list)
    with console.progress("validating", total=total) as advance:

        def on_row(row) -> None:
            console.text(text.validation_row(row))
            advance()

        rows = v.validate(
            case_list, techs, precision_list, device=device, steps=steps, time_budget_s=time_budget, on_row=on_row
        )
    summary = text.validation_summary(rows)
    console.text("")
    console.text(summary)
    if out:
        path = Path(out)
        table = "\n".join([text.VALIDATION_HEADER, *(text.validation_row(r) for r in rows)])
        write_atomic(path, f"# {header}\n\nCommand: `{reproduce_command()}`\n\n{table}\n\n```\n{summary}\n```\n")
        write_atomic(
            path.with_suffix(".json"),
            to_standard_json({"environment": env, "command": reproduce_command(), "rows": [r.to_dict() for r in rows]}),
        )
        console.text(f"written: {path}")
    console.emit_json(
        {"environment": env, "command": reproduce_command(), "rows": [r.to_dict() for r in rows], "summary": summary}
    )
    console.write_csv(lambda: rows_frame([r.to_dict() for r in rows]))
    sys.exit(exit_code(rows))
