"""``dbprofile plan``: predict each technique's peak on a target GPU (fake tensors, no GPU needed),
with the verdict; one plan per shape of a sweep."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dbprofile.cli.app import (
    FROM_CHECKPOINT_HELP,
    OPTIMIZER_HELP,
    UserError,
    check_outputs,
    concat_frames,
    exit_code,
    friendly_errors,
    load_models,
    main,
    model_inputs,
    model_options,
    output_options,
    parse_size,
    reproduce_command,
)
from dbprofile.console import Output


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
@click.option(
    "--techniques",
    "-t",
    default=None,
    help="Comma-separated techniques (default e2e,ckpt,sac,offload,db:2,db:3,db:4; no offload with --zero 3).",
)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--optimizer", default="adamw", show_default=True, help=OPTIMIZER_HELP)
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
@click.option(
    "--tp",
    type=int,
    default=1,
    show_default=True,
    help="Tensor-parallel degree: each layer's attention and MLP split over this many devices (a "
    "world-size/tp x tp mesh; --zero 3 adds FSDP over the first dimension).",
)
@click.option(
    "--pp",
    type=int,
    default=1,
    show_default=True,
    help="Pipeline stages of contiguous layers, planned beside db:PP+parallel on the same devices.",
)
@click.option(
    "--schedule",
    type=click.Choice(["1f1b", "gpipe"]),
    default="1f1b",
    show_default=True,
    help="Pipeline schedule (with --pp): how many micro-batches each stage keeps in flight.",
)
@click.option(
    "--micro-batches",
    "pp_micro_batches",
    type=int,
    default=None,
    help="Pipeline micro-batches per batch (with --pp; default: the batch size, micro-batches of one sample).",
)
@click.option("--from-checkpoint", is_flag=True, help=FROM_CHECKPOINT_HELP)
@click.option(
    "--min-micro-batch",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Smallest micro-batch gradient accumulation may use (smaller ones leave the GPU's matmuls too small "
    "to keep it busy; docs/verdict.md gives a rule for choosing it).",
)
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
@click.option(
    "--no-cache",
    is_flag=True,
    default=False,
    help="Neither read nor keep traces in the trace cache ($DBPROFILE_CACHE_DIR, else "
    "$XDG_CACHE_HOME/dbprofile or ~/.cache/dbprofile).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Processes that trace the techniques side by side (default: $DBPROFILE_WORKERS, else one per core; 1: none).",
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
    tp,
    pp,
    schedule,
    pp_micro_batches,
    from_checkpoint,
    min_micro_batch,
    html,
    full_trace,
    no_cache,
    workers,
    set_options,
    seq_len,
    image_size,
    masking_schedule,
    console: Output,
) -> None:
    """Predict each technique's peak on a target GPU without one (fake tensors), with a verdict.

    When nothing fits, the table, the HTML and the JSON still come, each technique with the bytes it
    misses by (``shortfall_bytes``), and the exit code is 3. Several --seq-len / --image-size values
    plan each shape (the JSON is then a list)."""
    from dbprofile.files import write_atomic
    from dbprofile.loading import shape_value
    from dbprofile.planner import plan as make_plan
    from dbprofile.planner.predict import parameter_count
    from dbprofile.report.experts import experts_summary, moe_memory
    from dbprofile.report.notebook import render_plan_page
    from dbprofile.report.parallel_text import format_layout
    from dbprofile.report.text import format_plan
    from dbprofile.verdict.evidence import DB_NOT_APPLICABLE

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1; got {batch_size}.")
    target = gpu
    if gpu and gpu[0].isdigit():
        target = parse_size(gpu)
    swept, specs = load_models(model, set_options, seq_len, image_size, masking_schedule)
    html_paths = [_html_path(html, spec, swept) for spec in specs] if html else []
    outputs = [("--html", path) for path in html_paths]
    check_outputs(outputs + ([("--csv", console.csv_path)] if console.csv_path else []), model_inputs(model))
    answers, results, codes = [], [], []
    for index, spec in enumerate(specs):
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
                cache=not no_cache,
                workers=workers,
                from_checkpoint=from_checkpoint,
                min_micro_batch=min_micro_batch,
                tp=tp,
                pp=pp,
                schedule=schedule,
                pp_micro_batches=pp_micro_batches,
            )
        if result.model_info.get(DB_NOT_APPLICABLE):
            console.info(f"skipping DiffusionBlocks: {result.model_info[DB_NOT_APPLICABLE]}")
        # Counted on the meta device: the model as the user's code builds it, at no memory cost.
        console.text(f"{spec.name} ({spec.description}): {parameter_count(spec, not no_cache):,} parameters")
        if "moe" in spec.extra:
            console.text(experts_summary(spec.extra["moe"]))
            for line in moe_memory(result.entries):
                console.text(line)
        if swept:
            console.text(f"{swept} = {shape_value(spec, swept)}:")
        console.text(format_plan(result))
        if layout := format_layout(result):
            console.text(layout)
        files = {}
        if html_paths:
            path = html_paths[index]
            path.parent.mkdir(parents=True, exist_ok=True)
            files["html"] = str(write_atomic(path, render_plan_page(result, reproduce_command())))
            console.text(f"plan: {files['html']}")
        answers.append({**result.to_dict(), "files": files})
        results.append(result)
        codes.append(exit_code(result))
    console.emit_json(answers[0] if len(answers) == 1 else answers)
    console.write_csv(
        results[0].to_dataframe if len(results) == 1 else lambda: concat_frames([r.to_dataframe() for r in results])
    )
    sys.exit(min(codes))


def _html_path(html: str, spec, swept: str | None) -> Path:
    """--html, or for one value of a sweep ``<stem>-<shape>-<value>.html``."""
    from dbprofile.loading import shape_value

    path = Path(html)
    if swept:
        path = path.with_name(f"{path.stem}-{swept}-{shape_value(spec, swept)}{path.suffix}")
    return path
