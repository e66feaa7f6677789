"""``plan()``: run the real training code of every technique in fake-tensor mode, shard the
shares, add the CUDA corrections, and say what fits (the package docstring has the method)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from dbprofile.gpus import (
    GPU,
)
from dbprofile.loading import checked_spec, load_spec
from dbprofile.measure.stack import spec_at_depth
from dbprofile.measure.tracking import CUDA_BLOCK_BYTES  # the allocator's 512-byte blocks, one definition
from dbprofile.planner.entries import EntryPlanner, MeasureFn
from dbprofile.planner.layout import check_layout, layout_techniques, plan_pipeline
from dbprofile.planner.targets import (
    ASSUMED_UTILISATION,
    UNKNOWN_GPU_COMPUTE_CAPABILITY,
    Target,
    resolve_target,
)
from dbprofile.planner.trace_cache import TraceCache, cache_dir
from dbprofile.planner.workers import default_workers, plan_jobs
from dbprofile.planner.zero import ModelFacts, model_facts
from dbprofile.results import Plan, PlanEntry
from dbprofile.settings import resolve_optimizer
from dbprofile.spec import ModelSpec, SpecError
from dbprofile.techniques import (
    PARALLEL_SUFFIX,
    PLAN_DEFAULT_TECHNIQUES,
    Technique,
    check_technique_fits,
    parse_technique,
)
from dbprofile.units import GiB, format_bytes
from dbprofile.verdict.evidence import DB_NOT_APPLICABLE

FULL_TRACE_BELOW_PARAMETER_BYTES = 4 * GiB
"""For a CUDA target, models with less parameter memory than this (about 1B fp32 parameters) are
traced at full depth: the full trace costs seconds, and replays every layer through the allocator model.
Larger models are extrapolated (dbprofile.measure.depth), their allocation sequences extended to full
depth and replayed, or traced in full where they do not extend."""


def parse_requested(
    names: list[str] | str | None, world_size: int, num_layers: int, zero_stage: int = 0
) -> list[tuple[str, Technique, bool]]:
    """(display name, technique to run, block-parallel?) per requested technique."""
    if names is None:
        # The default set adapts to the model's depth, as a run's does; named techniques never do. Offload
        # is not planned under ZeRO-3 (plan() says why when it is asked for).
        names = [
            n
            for n in PLAN_DEFAULT_TECHNIQUES
            if (parse_technique(n).blocks or 0) <= num_layers and not (zero_stage == 3 and n == "offload")
        ]
        if world_size > 1 and 2 <= world_size <= num_layers:
            names.append(f"db:{world_size}{PARALLEL_SUFFIX}")
    elif isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    elif not isinstance(names, (list, tuple)):
        raise SpecError(f"techniques are a list of names or one comma-separated string; got {names!r}.")
    out: dict[str, tuple[str, Technique, bool]] = {}
    for raw in names:
        tech = parse_technique(str(raw))
        check_technique_fits(tech, num_layers)
        if tech.parallel and (tech.blocks or 1) > world_size:
            raise SpecError(
                f"{tech.name} trains one block per device, on {tech.blocks} devices, but the plan has "
                f"{world_size} (world_size, --world-size). Pass a world size of at least {tech.blocks}, "
                f"or db:B+parallel with B <= {world_size}."
            )
        out.setdefault(tech.name, (tech.name, tech.on_one_device(), tech.parallel))
    if not out:
        raise SpecError("No technique given; pass e.g. techniques=['e2e', 'ckpt', 'db:4'].")
    return list(out.values())


def attention_backends(entries: list[PlanEntry]) -> dict[str, dict[str, str]]:
    """The attention kernel each call site runs on the target, once per model: taken out of every
    entry's ``extra`` (each technique's fake run saw the same sites) into ``{'attention_backends':
    {site: backend}}``, empty when the model calls no scaled_dot_product_attention or the target is
    the CPU."""
    sites: dict[str, str] = {}
    for entry in entries:
        for site, backend in (entry.extra.pop("attention_backends", None) or {}).items():
            seen = set(sites.get(site, "").split(", ")) | set(backend.split(", "))
            sites[site] = ", ".join(sorted(seen - {""}))
    return {"attention_backends": sites} if sites else {}


def check_arguments(batch_size: int, world_size: int, min_micro_batch: int, zero_stage: int) -> None:
    """The plan's numbers, each refused in one sentence naming it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SpecError(f"batch_size must be a positive integer; got {batch_size!r}.")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise SpecError(f"world_size must be an integer >= 1 (the number of devices); got {world_size!r}.")
    if isinstance(min_micro_batch, bool) or not isinstance(min_micro_batch, int) or min_micro_batch < 1:
        raise SpecError(f"min_micro_batch must be a positive integer (samples); got {min_micro_batch!r}.")
    if zero_stage not in (0, 1, 2, 3):
        raise SpecError(f"zero_stage must be 0, 1, 2 or 3; got {zero_stage!r}.")
    if zero_stage > 0 and world_size == 1:
        raise SpecError(
            f"ZeRO stage {zero_stage} shards state over several devices, but world_size is 1. "
            "Pass world_size > 1 (e.g. --world-size 8), or zero_stage=0 for one device."
        )


def depth_path(target: Target, facts: ModelFacts, full_trace: bool) -> tuple[bool, str | None]:
    """Whether to trace every layer, and why when the planner chose it: reserved memory (the allocator
    replay) extrapolates only approximately in the depth, and a small model traces in full in seconds."""
    if target.cuda and facts.total_bytes < FULL_TRACE_BELOW_PARAMETER_BYTES and not full_trace:
        return True, (
            f"parameter memory under {format_bytes(FULL_TRACE_BELOW_PARAMETER_BYTES)} on a GPU "
            "target: traced in full so the allocator replay covers every layer"
        )
    return full_trace, None


CHECKED_DEPTH = 2
"""Layers of the copy a plan checks the model on when its layers are identical."""


def checked_model(spec: ModelSpec) -> tuple[ModelSpec, dict[str, Any], ModelFacts]:
    """The checks a run makes (the model builds, its loss runs and is a loss; the hidden width; whether
    the layers are residual: ``loading.checked_spec``) and the plan's facts of the model. Where the
    layers are identical the loss runs on a copy cut to CHECKED_DEPTH layers, the code every layer runs
    and the copy the depth extrapolation traces anyway (a 70B forward on fake tensors costs seconds);
    otherwise, and where the copy fails (its error then names the model as built), on the whole model."""
    try:
        facts = model_facts(spec)
    except (Exception, SystemExit):  # the checks below say what is wrong in one paragraph
        facts = None
    if facts is not None and facts.not_identical is None and facts.num_layers > CHECKED_DEPTH:
        try:
            shallow, checked = checked_spec(spec_at_depth(spec, CHECKED_DEPTH), require_residual=False)
        except SpecError:
            pass
        else:
            if spec.hidden_size is None and shallow.hidden_size is not None:
                spec = dataclasses.replace(spec, hidden_size=shallow.hidden_size)
            return spec, checked, facts
    spec, checked = checked_spec(spec, require_residual=False)
    return spec, checked, facts if facts is not None else model_facts(spec)


def planned_techniques(
    spec: ModelSpec,
    techniques: list[str] | str | None,
    num_layers: int,
    zero_stage: int,
    world_size: int,
    tp: int,
    pp: int,
) -> list[tuple[str, Technique, bool]]:
    """The techniques a plan runs: the requested (or default) set, adapted to the parallel layout;
    one paragraph for a combination that is not planned."""
    wanted = parse_requested(techniques, world_size, num_layers, zero_stage)
    wanted = layout_techniques(wanted, techniques is None, tp, pp, num_layers, spec)
    if zero_stage == 3 and any(tech.kind == "offload" for _, tech, _ in wanted):
        raise SpecError(
            "Technique 'offload' copies each layer's saved tensors to host memory, and under ZeRO-3 / FSDP a layer "
            "saves the full parameters gathered for it, which it would copy too; that combination is not planned. "
            "Plan offload without --zero 3 (ZeRO-1/2 shard only state), or use sac or ckpt with --zero 3."
        )
    return wanted


def predicted_entries(
    planner: EntryPlanner,
    wanted: list[tuple[str, Technique, bool]],
    batch_size: int,
    left_out: str | None,
    default_set: bool,
    searched: tuple[bool, int] | None,
    workers: int | None,
) -> tuple[list[PlanEntry], str | None]:
    """(each technique's entry at ``batch_size``, why DiffusionBlocks was left out or None), planned
    side by side in worker processes where there are cores for them (dbprofile.planner.workers);
    ``searched`` = (confirm_max_batch, min_micro_batch) also searches each entry's largest batch and
    micro-batch. In the default set a DiffusionBlocks technique its fake step refuses is left out,
    with the reason; named, it raises (the first in the requested order)."""
    runnable = [w for w in wanted if not (w[1].is_diffusion_blocks and left_out)]
    planned = plan_jobs(planner, planner.jobs(runnable, batch_size), batch_size, searched, workers or default_workers())
    entries = []
    for name, tech, _ in runnable:
        if tech.is_diffusion_blocks and left_out:
            continue
        entry = planned[name]
        if isinstance(entry, SpecError):
            if not default_set or not tech.is_diffusion_blocks:
                raise entry
            left_out = str(entry)
            continue
        entries.append(entry)
    return entries, left_out


def plan_model_info(
    spec: ModelSpec, facts: ModelFacts, entries: list[PlanEntry], left_out: str | None
) -> dict[str, object]:
    """What a plan records of its model (``Plan.model_info``), with why DiffusionBlocks was left out."""
    return {
        **({DB_NOT_APPLICABLE: left_out} if left_out else {}),
        "family": spec.family,
        "task": spec.task,
        "num_layers": facts.num_layers,
        "parameter_bytes": facts.total_bytes,
        "parameters": facts.num_parameters,
        "batch_statistics": facts.batch_statistics,
        **attention_backends(entries),
    }


def judge_plan(result: Plan) -> None:
    """The plan's verdict, with the pipeline-against-block-parallel sentence where a pipeline was planned."""
    from dbprofile.verdict import judge
    from dbprofile.verdict.layouts import reason_pipeline

    result.verdict = judge(result)
    if result.pipeline and (said := reason_pipeline(result.pipeline)) is not None:
        result.verdict.reasons.append(said)


def plan(
    spec: ModelSpec | str,
    batch_size: int,
    device: str | int | GPU = "H100-80GB",
    techniques: list[str] | str | None = None,
    precision: str = "fp32",
    optimizer: str = "adamw",
    zero_stage: int = 0,
    world_size: int = 1,
    *,
    search_max_batch: bool = True,
    confirm_max_batch: bool = True,
    measure_fn: MeasureFn | None = None,
    full_trace: bool = False,
    from_checkpoint: bool = False,
    min_micro_batch: int = 1,
    tp: int = 1,
    pp: int = 1,
    schedule: str = "1f1b",
    pp_micro_batches: int | None = None,
    cache: bool = True,
    workers: int | None = None,
) -> Plan:
    """Predict, per technique, the peak per device, its shares, whether it fits ``device`` and the
    largest batch size that does. Fake-tensor runs only: no GPU and almost no memory needed.

    ``device``: a GPU name from dbprofile.gpus ('H100-80GB'), a capacity in bytes, or 'cpu' (no
    CUDA corrections, no capacity). ``zero_stage`` 1-3 shards over ``world_size`` ranks;
    'db:B+parallel' plans one DiffusionBlocks block per device (B devices).
    ``search_max_batch`` finds the largest batch size that fits; ``confirm_max_batch=False``
    takes it from the linear model alone (no extra fake runs: use it for multi-billion-parameter
    models, whose fake runs take 10-20 s each on a laptop CPU).
    ``full_trace``: trace every layer instead of extrapolating identical layers from shallow copies
    (dbprofile.measure.depth; each entry's ``extra['depth']`` says which path it took and why).
    ``min_micro_batch``: the smallest micro-batch gradient accumulation may use (a smaller one leaves
    the GPU's matmuls too small to keep it busy: docs/verdict.md gives the rule); every technique that
    does not fit at ``batch_size`` gets the largest micro-batch that does and its accumulation steps.
    ``from_checkpoint``: the team must continue from an existing end-to-end checkpoint (the verdict
    then rules DiffusionBlocks out: it trains from scratch); the default is training from scratch.
    ``cache``: read and keep the fake runs in the trace cache (dbprofile.planner.trace_cache: under
    $DBPROFILE_CACHE_DIR, else $XDG_CACHE_HOME/dbprofile or ~/.cache/dbprofile), so a repeated plan or
    the largest-batch search of the next one reads what was traced; False neither reads nor writes it.
    ``workers``: processes that plan the techniques side by side, each with its searches (None:
    $DBPROFILE_WORKERS, else one per core; dbprofile.planner.workers); the figures are the same either way.
    Each entry carries its training FLOPs per sample (counted on the same fake step as its memory)
    and, for a GPU with a known peak, an estimated time per million samples at ASSUMED_UTILISATION.
    ``tp``: tensor parallelism over a (world_size / tp) x tp mesh (dbprofile.planner.tensor_parallel);
    ``pp``: pipeline stages, with ``schedule`` ('1f1b' or 'gpipe') and ``pp_micro_batches`` micro-batches
    per batch (default 2 x pp), planned beside db:pp+parallel (dbprofile.planner.pipeline).
    """
    started = time.perf_counter()
    spec = load_spec(spec) if not isinstance(spec, ModelSpec) else spec
    check_arguments(batch_size, world_size, min_micro_batch, zero_stage)
    check_layout(world_size, tp, pp, schedule, pp_micro_batches, batch_size)
    target = resolve_target(device)
    # The step the user runs on the target: PyTorch's default implementation there (foreach on CUDA)
    # unless the name says which; the fake run on the CPU would otherwise take the CPU's default.
    optimizer = resolve_optimizer(optimizer, target.cuda)
    # A plan asked before is read whole (the model then needs no check); the checks below are a
    # function of the spec, which the key holds. The key is every argument that shapes the answer.
    cache_of_traces = TraceCache(spec, cache_dir() if cache and measure_fn is None else None)
    asked = {
        "run": "plan",
        "batch": batch_size,
        "target": (target.name, target.capacity_bytes, target.compute_capability, target.cuda),
        "techniques": techniques,
        "precision": precision,
        "optimizer": optimizer,
        "zero_stage": zero_stage,
        "world_size": world_size,
        "search": (search_max_batch, confirm_max_batch),
        "full_trace": full_trace,
        "from_checkpoint": from_checkpoint,
        "min_micro_batch": min_micro_batch,
        "layout": (tp, pp, schedule, pp_micro_batches),
    }
    answered = cache_of_traces.get(asked, Plan)
    if answered is not None:
        answered.elapsed_s = time.perf_counter() - started
        return answered
    # The same checks as a run's (loss, build, hidden width); db:B's own need for residual layers
    # surfaces in its fake run.
    spec, checked, facts = checked_model(spec)
    peak_flops = target.gpu.peak_flops(precision) if target.gpu is not None else None
    full_trace, full_trace_reason = depth_path(target, facts, full_trace)
    wanted = planned_techniques(spec, techniques, facts.num_layers, zero_stage, world_size, tp, pp)
    planner = EntryPlanner(
        spec=spec,
        facts=facts,
        target=target,
        precision=precision,
        optimizer=optimizer,
        zero_stage=zero_stage,
        world_size=world_size,
        full_trace=full_trace,
        full_trace_reason=full_trace_reason,
        # A CUDA target's tracker counts each storage in 512-byte blocks, as the caching allocator does.
        round_to=CUDA_BLOCK_BYTES if target.cuda else None,
        capability=target.compute_capability or UNKNOWN_GPU_COMPUTE_CAPABILITY,
        peak_flops=peak_flops,
        measure_fn=measure_fn,
        tp=tp,
        cache=cache_of_traces,
    )
    # As in a run, the default set leaves DiffusionBlocks out where it cannot train the model (layers
    # not residual here; a convention its fake step refuses below) and the verdict says why.
    left_out = checked["not_residual"] if techniques is None else None
    searched = (confirm_max_batch, min_micro_batch) if search_max_batch else None
    entries, left_out = predicted_entries(planner, wanted, batch_size, left_out, techniques is None, searched, workers)
    result = Plan(
        model=spec.name,
        model_info=plan_model_info(spec, facts, entries, left_out),
        device=target.name,
        capacity_bytes=target.capacity_bytes,
        batch_size=batch_size,
        precision=precision,
        optimizer=optimizer,
        zero_stage=zero_stage,
        world_size=world_size,
        cuda_corrections=target.cuda,
        entries=entries,
        from_checkpoint=from_checkpoint,
        min_micro_batch=min_micro_batch,
        peak_flops=peak_flops,
        peak_flops_source=target.gpu.flops_source if target.gpu is not None else None,
        utilisation=ASSUMED_UTILISATION,
        tensor_parallel=tp,
    )
    if pp > 1:
        result.pipeline = plan_pipeline(planner, result, pp, schedule, pp_micro_batches)
    judge_plan(result)
    if all(e.ok for e in entries):
        cache_of_traces.put(asked, result)
    result.elapsed_s = time.perf_counter() - started
    return result
