"""``dbprofile plan``: predict each technique's peak on a target GPU (fake tensors, no GPU needed),
with the verdict; one plan per shape of a sweep."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dbprofile.cli.app import (
    FROM_CHECKPOINT_HELP,
    UserError,
    check_writable,
    exit_code,
    friendly_errors,
    load_models,
    main,
    model_options,
    output_options,
    parse_size,
)
from dbprofile.console import Output


def _concat_frames(frames: list):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


@main.command()
@click.argument("model", required=False)
@click.option(
    "--gpu",
    "gpu",
    default="H100-80GB",
    show_default=True,
    help="Target: a GPU name (H100-80GB, A100-40GB, L4, ...), a capacity such as 24GiB, or cpu.",
)
@click.option("--batch-size", "-b", default=8, show_default=True, type=int, help="Batch size per device.")
@click.option("--techniques", "-t", default=None, help="Comma-separated techniques (default e2e,ckpt,db:2,db:3,db:4).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd", "adafactor"]), default="adamw", show_default=True)
@click.option(
    "--zero",
    "zero_stage",
    type=click.IntRange(0, 3),
    default=0,
    show_default=True,
    help="ZeRO / FSDP stage (1: optimizer state, 2: + gradients, 3: + parameters sharded).",
)
@click.option(
    "--world-size",
    type=int,
    default=1,
    show_default=True,
    help="Devices available: the state is sharded over them (--zero), or db:B+parallel uses B of them.",
)
@click.option("--from-checkpoint", is_flag=True, help=FROM_CHECKPOINT_HELP)
@click.option(
    "--html",
    default=None,
    type=click.Path(dir_okay=False),
    help="Also write the plan as HTML (also when nothing fits).",
)
@click.option(
    "--full-trace",
    is_flag=True,
    default=False,
    help="Trace every layer instead of extrapolating identical layers from shallow copies.",
)
@model_options
@output_options
@friendly_errors
def plan(
    model,
    gpu,
    batch_size,
    techniques,
    precision,
    optimizer,
    zero_stage,
    world_size,
    from_checkpoint,
    html,
    full_trace,
    set_options,
    seq_len,
    image_size,
    console: Output,
) -> None:
    """Predict each technique's peak on a target GPU without one (fake tensors), with a verdict.

    When nothing fits, the table, the HTML and the JSON still come, each technique with the bytes it
    misses by (``shortfall_bytes``), and the exit code is 3. Several --seq-len / --image-size values
    plan each shape (the JSON is then a list)."""
    from dbprofile.files import write_atomic
    from dbprofile.loading import shape_value
    from dbprofile.models.common import build_on_meta, count_parameters
    from dbprofile.planner import plan as make_plan
    from dbprofile.report.notebook import format_plan_html
    from dbprofile.report.text import experts_summary, format_plan

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1; got {batch_size}.")
    if html:
        check_writable(Path(html), "--html")
    target = gpu
    if gpu and gpu[0].isdigit():
        target = parse_size(gpu)
    swept, specs = load_models(model, set_options, seq_len, image_size)
    answers, results, codes = [], [], []
    for spec in specs:
        with console.progress(f"planning {spec.name}"):
            # plan() checks the model first (build, loss, sys.exit), so counting after it is safe.
            result = make_plan(
                spec,
                batch_size,
                device=target,
                techniques=techniques,
                precision=precision,
                optimizer=optimizer,
                zero_stage=zero_stage,
                world_size=world_size,
                full_trace=full_trace,
                from_checkpoint=from_checkpoint,
            )
        # Counted on the meta device: the model as the user's code builds it, at no memory cost.
        console.text(f"{spec.name} ({spec.description}): {count_parameters(build_on_meta(spec.build)):,} parameters")
        if "moe" in spec.extra:
            console.text(experts_summary(spec.extra["moe"]))
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
    console.write_csv(
        results[0].to_dataframe if len(results) == 1 else lambda: _concat_frames([r.to_dataframe() for r in results])
    )
    sys.exit(min(codes))
