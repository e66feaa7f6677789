"""``dbprofile run``: check the model, measure each technique (one device, or every rank under
torchrun), write the JSON and the HTML report, and print the table and the verdict."""

from __future__ import annotations

import math
import shlex
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
    freeze_startup_objects,
    friendly_errors,
    load_models,
    main,
    model_inputs,
    model_options,
    output_options,
    parse_int_list,
    parse_size,
    reproduce_command,
)
from dbprofile.cli.run_support import loading_limit, note_replaced, run_distributed_command, safe_name, show_run
from dbprofile.console import Output
from dbprofile.results import RunResult
from dbprofile.settings import RunSettings
from dbprofile.spec import ModelSpec
from dbprofile.techniques import Technique


def _techniques_option(techniques: str | None, blocks: str | None) -> list[str]:
    """--techniques, or e2e, ckpt and db:B for each B of --blocks (default 2,3,4); not both."""
    from dbprofile.techniques import DEFAULT_TECHNIQUES, HELP

    if techniques is not None and blocks is not None:
        raise UserError(
            "--blocks is a shortcut for -t e2e,ckpt,db:B,...; with --techniques it would be ignored. Give one of them."
        )
    if techniques is not None:
        names = [t.strip() for t in techniques.split(",") if t.strip()]
        if not names:
            raise UserError(f"--techniques is empty; give one or more of: {HELP}.")
        return names
    if blocks:
        return ["e2e", "ckpt"] + [f"db:{b}" for b in parse_int_list(blocks, "--blocks")]
    return list(DEFAULT_TECHNIQUES)


@main.command()
@click.argument("model", required=False)
@click.option(
    "--batch-size", "-b", default="8", show_default=True, help="Batch size, or several comma-separated (16,32,64)."
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option(
    "--techniques",
    "-t",
    default=None,
    help="Comma-separated: e2e, ckpt, ckpt:K, sac, sac:alt, offload, db:B, db:B+ckpt, db:B+offload, "
    "db:B+interleaved (causal LMs). Default: e2e,ckpt,db:2,db:3,db:4.",
)
@click.option("--blocks", default=None, help="Shortcut: e2e, ckpt and db:B for each B given (e.g. 2,4,6).")
@click.option(
    "--steps",
    default=5,
    show_default=True,
    type=int,
    help="Fewest timed steps per technique (per block); timing also runs at least 1 s and until "
    "the spread is small (torch.utils.benchmark adaptive_autorange).",
)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--optimizer", default="adamw", show_default=True, help=OPTIMIZER_HELP)
@click.option("--fake", is_flag=True, help="Fake tensors: shapes and bytes only, no real allocation or timing.")
@click.option("--memory-limit", default=None, help="Treat a technique whose live bytes pass this (e.g. 2GiB) as OOM.")
@click.option(
    "--out",
    "-o",
    default=None,
    type=click.Path(dir_okay=False),
    help="Result JSON path (default reports/<model>.json); the HTML report is written beside it.",
)
@click.option("--no-report", is_flag=True, help="Write only the JSON, no HTML report.")
@click.option("--dry-run", is_flag=True, help="Validate the model and print what would be measured.")
@click.option(
    "--memory-snapshot",
    default=None,
    type=click.Path(file_okay=False),
    help="CUDA only: write PyTorch's memory snapshot of each technique's tracked step to this folder "
    "(open at pytorch.org/memory_viz); the report links them.",
)
@click.option(
    "--fsdp", is_flag=True, help="Shard with FSDP2 (fully_shard per layer) across the ranks of a torchrun launch."
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=None,
    help="Launch N processes with torchrun on this machine (for --fsdp and db:B+parallel).",
)
@click.option(
    "--timeout",
    "timeout_s",
    default=600.0,
    show_default=True,
    type=float,
    help="Seconds one technique may run (build, warm-up, steps) before it is recorded as timed out "
    "and the run moves on; also bounds loading and checking the model. 0: no limit. Under "
    "--fsdp/--nproc, also how long a rank waits for the others in a collective.",
)
@click.option("--from-checkpoint", is_flag=True, help=FROM_CHECKPOINT_HELP)
@click.option(
    "--micro-batches",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Gradient accumulation: forward and backward passes per optimizer step, each on a batch of "
    "--batch-size (one device only).",
)
@model_options
@output_options
@friendly_errors
def run(
    model,
    batch_size,
    device,
    techniques,
    blocks,
    steps,
    precision,
    optimizer,
    fake,
    memory_limit,
    out,
    no_report,
    dry_run,
    memory_snapshot,
    fsdp,
    nproc,
    timeout_s,
    from_checkpoint,
    micro_batches,
    set_options,
    seq_len,
    image_size,
    masking_schedule,
    console: Output,
) -> None:
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
        raise UserError(
            f"--out names the result JSON (the HTML report is written beside it); got {out!r}. Give a .json path."
        )
    names = _techniques_option(techniques, blocks)
    resolve_device(device)
    distributed = fsdp or nproc is not None or any(n.strip().endswith("+parallel") for n in names)
    if memory_snapshot is not None:
        if distributed:
            raise UserError(
                "--memory-snapshot records one process's CUDA allocator and is not available for "
                "distributed runs (--fsdp, --nproc, db:B+parallel) yet; profile one device with it."
            )
        import torch

        from dbprofile.measure.snapshot import check_snapshot_device

        check_snapshot_device(torch.device(device), fake)
    settings = RunSettings(
        device=device,
        precision=precision,
        optimizer=optimizer,
        steps=steps,
        fake=fake,
        memory_limit=limit,
        time_limit_s=timeout_s or None,
        memory_snapshot=memory_snapshot,
        micro_batches=micro_batches,
    )
    if distributed and micro_batches > 1:
        raise UserError(
            "--micro-batches is measured on one device only; the distributed runs (--fsdp, --nproc, db:B+parallel) "
            "step once per batch. Drop --micro-batches, or profile one device."
        )
    if distributed:
        # A process group needs a finite timeout: "no limit" becomes a week.
        run_distributed_command(
            (model, set_options, seq_len, image_size, masking_schedule),
            names,
            batch_sizes,
            settings,
            out=out,
            no_report=no_report,
            fsdp=fsdp,
            nproc=nproc,
            timeout_s=timeout_s or 7 * 24 * 3600.0,
            console=console,
        )
        return
    techs = parse_techniques(names)
    with loading_limit(settings.time_limit_s):
        swept, specs = load_models(model, set_options, seq_len, image_size, masking_schedule)
    out_paths = [_out_path(spec, out, swept) for spec in specs]
    sweep_page = None if not swept or no_report or dry_run else _sweep_page(out, specs[0], swept)
    check_outputs(_run_outputs(out_paths, no_report, sweep_page, console), inputs=model_inputs(model))
    answers, results, codes = [], [], []
    for spec, out_path in zip(specs, out_paths):
        answer, result = _run_one(
            spec,
            techs,
            settings,
            batch_sizes=batch_sizes,
            default_set=not techniques and not blocks,
            out_path=out_path,
            no_report=no_report,
            dry_run=dry_run,
            from_checkpoint=from_checkpoint,
            console=console,
        )
        answers.append(answer)
        if result is not None:
            results.append(result)
            codes.append(exit_code(result))
    # One answer for the whole command: a sweep's JSON is a list of its runs, its CSV all their rows.
    console.emit_json(answers[0] if len(answers) == 1 else answers)
    if results:
        console.write_csv(lambda: concat_frames([r.to_dataframe() for r in results]))
    if sweep_page is not None and results:
        from dbprofile.report import write_comparison

        # The comparison of the runs draws peak memory against the swept value.
        path = write_comparison(results, sweep_page, command=reproduce_command())
        console.text(f"sweep:   {path}")
    if codes:
        # A sweep answered if any of its runs did (exit 3 only when every run had nothing to show).
        sys.exit(min(codes))


def _out_path(spec: ModelSpec, out: str | None, swept: str | None) -> Path:
    """The result JSON of one run (one value of a sweep)."""
    from dbprofile.loading import shape_value

    out_path = Path(out) if out else Path("reports") / f"{safe_name(spec.name)}.json"
    if swept:
        out_path = out_path.with_name(f"{out_path.stem}-{swept}-{shape_value(spec, swept)}{out_path.suffix}")
    return out_path


def _sweep_page(out: str | None, spec: ModelSpec, swept: str) -> Path:
    """The sweep's comparison page, beside the runs' JSON: ``<out>-<shape>-sweep.html``."""
    base = Path(out).with_suffix("") if out else Path("reports") / safe_name(spec.name)
    return Path(f"{base}-{swept}-sweep.html")


def _run_outputs(
    out_paths: list[Path], no_report: bool, sweep_page: Path | None, console: Output
) -> list[tuple[str, Path]]:
    """Every file the run writes, for ``check_outputs``: each value's JSON (and HTML report), the
    sweep page, the CSV."""
    files = []
    for path in out_paths:
        files.append(("--out", path))
        if not no_report:
            files.append(("the HTML report beside --out", path.with_suffix(".html")))
    if sweep_page is not None:
        files.append(("the sweep page", sweep_page))
    if console.csv_path is not None:
        files.append(("--csv", console.csv_path))
    return files


def _run_one(
    spec: ModelSpec,
    techs: list[Technique],
    settings: RunSettings,
    *,
    batch_sizes: list[int],
    default_set: bool,
    out_path: Path,
    no_report: bool,
    dry_run: bool,
    from_checkpoint: bool,
    console: Output,
) -> tuple[dict, RunResult | None]:
    """Check, measure and answer for one model spec (one value of a sweep): (its JSON answer, the
    result), the result None for a dry run."""
    device, precision, optimizer, fake = settings.device, settings.precision, settings.optimizer, settings.fake
    from dbprofile.measure.runner import prepare
    from dbprofile.units import format_bytes
    from dbprofile.verdict.evidence import DB_NOT_APPLICABLE

    asked = techs
    with loading_limit(settings.time_limit_s):
        # The default set adapts to the model (its depth, whether DiffusionBlocks applies);
        # techniques asked for by name never do.
        spec, techs, facts = prepare(spec, asked, precision, optimizer, default_set=default_set, fake=fake)
    deeper = [t.name for t in asked if t not in techs and t.is_diffusion_blocks and t.blocks > facts["num_layers"]]
    if deeper:
        console.info(f"skipping {', '.join(deeper)}: the model has only {facts['num_layers']} layers")
    not_applicable = [t.name for t in asked if t not in techs and t.name not in deeper]
    if not_applicable:
        console.info(f"skipping {', '.join(not_applicable)}: {facts[DB_NOT_APPLICABLE]}")
    console.text(
        f"{spec.name}: {spec.family} {spec.task}, {facts['num_layers']} residual layers at {spec.layers!r}, "
        f"hidden {facts['hidden_size']}, {facts['parameters']:,} parameters\n"
        f"techniques: {', '.join(t.name for t in techs)}; batch sizes: {', '.join(map(str, batch_sizes))}; "
        f"device {device}{' (fake tensors)' if fake else ''}, {precision}, {optimizer}"
    )
    if facts["not_residual"] and not not_applicable:  # said once: as the reason DiffusionBlocks was left out
        console.info(f"note: {facts['not_residual']}")
    if dry_run:
        plan = {
            "model": spec.name,
            "model_info": facts,
            "techniques": [t.name for t in techs],
            "batch_sizes": batch_sizes,
            "device": device,
            "fake": fake,
            "precision": precision,
            "optimizer": optimizer,
            "dry_run": True,
        }
        return plan, None

    from dbprofile.files import output_lock
    from dbprofile.measure.runner import run as run_profile
    from dbprofile.report.text import run_table

    freeze_startup_objects()
    with output_lock(out_path):
        note_replaced(out_path, console)
        with console.progress(f"{spec.name}", total=len(techs) * len(batch_sizes)) as advance:

            def measured(measurement) -> None:
                state = format_bytes(measurement.peak_bytes) if measurement.ok else measurement.status.upper()
                console.info(f"  measured {measurement.technique} @ batch {measurement.batch_size}: {state}")
                advance()

            try:
                result = run_profile(
                    spec,
                    techs,
                    batch_sizes,
                    settings,
                    out=out_path,
                    on_measurement=measured,
                    command=reproduce_command(),
                    facts=facts,
                    from_checkpoint=from_checkpoint,
                )
            except KeyboardInterrupt:
                click.echo(
                    f"The measurements that finished are in {out_path}, marked incomplete; "
                    f"`dbprofile report {shlex.quote(str(out_path))}` renders them.",
                    err=True,
                )
                raise
        files = show_run(result, out_path, no_report, run_table(result), console)
    return {**result.to_dict(), "files": files}, result
