"""``dbprofile plan``: predict each technique's peak on a target GPU (fake tensors, no GPU needed),
with the verdict; one plan per shape of a sweep. A preset's plan asked before is answered from the
trace cache before torch is imported (``warm_plan``), with the same output."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import NoReturn

import click

from dbprofile import progress
from dbprofile.cli import warm_plan
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
from dbprofile.results import Plan


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
    started = time.perf_counter()
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1; got {batch_size}.")
    # A preset's plan asked before is answered here, before torch is imported (dbprofile.cli.warm_plan).
    asked = warm_plan.question(click.get_current_context().params) if not no_cache else None
    if asked is not None and (kept := warm_plan.read(asked)) is not None:
        kept.plan.elapsed_s = time.perf_counter() - started  # as plan() says of a plan it read
        progress.stage("asked before: the answer read from the trace cache, nothing planned")
        html_path = Path(html) if html else None
        check_outputs(_output_files(console, [html_path] if html_path else []), model_inputs(model))
        _finish(console, [_show(console, kept, None, html_path)], [kept.plan])

    from dbprofile.loading import shape_value
    from dbprofile.planner import plan as make_plan
    from dbprofile.report.experts import experts_summary

    target = gpu
    if gpu and gpu[0].isdigit():
        target = parse_size(gpu)
    swept, specs = load_models(model, set_options, seq_len, image_size, masking_schedule)
    html_paths = [_html_path(html, spec, swept) for spec in specs] if html else []
    check_outputs(_output_files(console, html_paths), model_inputs(model))
    shown, answers = [], []
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
        answer = warm_plan.PlanAnswer(
            plan=result,
            # Counted on the meta device (the plan's model facts): the model as the user's code builds it.
            heading=f"{spec.name} ({spec.description}): {result.model_info['parameters']:,} parameters",
            experts=experts_summary(spec.extra["moe"]) if "moe" in spec.extra else None,
        )
        shape = f"{swept} = {shape_value(spec, swept)}:" if swept else None
        shown.append(_show(console, answer, shape, html_paths[index] if html_paths else None))
        answers.append(answer)
    if asked is not None and warm_plan.keeps(model, swept, [a.plan for a in answers]):
        warm_plan.keep(asked, answers[0])
    _finish(console, shown, [a.plan for a in answers])


def _output_files(console: Output, html_paths: list[Path]) -> list[tuple[str, Path]]:
    return [("--html", path) for path in html_paths] + ([("--csv", console.csv_path)] if console.csv_path else [])


def _show(console: Output, answer: warm_plan.PlanAnswer, shape: str | None, html: Path | None) -> dict:
    """Print one planned model (and write its --html): the same lines whether it was planned now or
    read from the trace cache; its JSON answer. ``shape``: the line naming a sweep's value."""
    from dbprofile.files import write_atomic
    from dbprofile.report.experts import moe_memory
    from dbprofile.report.notebook import render_plan_page
    from dbprofile.report.parallel_text import format_layout
    from dbprofile.report.text import format_plan
    from dbprofile.verdict.evidence import DB_NOT_APPLICABLE

    result = answer.plan
    if result.model_info.get(DB_NOT_APPLICABLE):
        console.info(f"skipping DiffusionBlocks: {result.model_info[DB_NOT_APPLICABLE]}")
    console.text(answer.heading)
    if answer.experts is not None:
        console.text(answer.experts)
        for line in moe_memory(result.entries):
            console.text(line)
    if shape:
        console.text(shape)
    console.text(format_plan(result))
    if layout := format_layout(result):
        console.text(layout)
    files = {}
    if html is not None:
        html.parent.mkdir(parents=True, exist_ok=True)
        files["html"] = str(write_atomic(html, render_plan_page(result, reproduce_command())))
        console.text(f"plan: {files['html']}")
    return {**result.to_dict(), "files": files}


def _finish(console: Output, shown: list[dict], results: list[Plan]) -> NoReturn:
    """The JSON and CSV answers, and the exit status of the best plan."""
    console.emit_json(shown[0] if len(shown) == 1 else shown)
    console.write_csv(
        results[0].to_dataframe if len(results) == 1 else lambda: concat_frames([r.to_dataframe() for r in results])
    )
    sys.exit(min(exit_code(result) for result in results))


def _html_path(html: str, spec, swept: str | None) -> Path:
    """--html, or for one value of a sweep ``<stem>-<shape>-<value>.html``."""
    from dbprofile.loading import shape_value

    path = Path(html)
    if swept:
        path = path.with_name(f"{path.stem}-{swept}-{shape_value(spec, swept)}{path.suffix}")
    return path
