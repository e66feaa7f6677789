"""The parallel layout of a plan (``--tp``, ``--pp`` beside ``--world-size`` and ``--zero``): its
checks, the techniques it plans, and the pipeline's stages measured from fake runs at the micro-batch
size (the arithmetic is dbprofile.planner.pipeline, tensor parallelism's dbprofile.planner.tensor_parallel).

The pipeline comparison: e2e / ckpt / sac split into P stages run the schedule's micro-batches; the
block-parallel DiffusionBlocks layout ``db:P+parallel`` on the same P devices is planned beside them
(its own simulated ranks: one block per device, no activation crossing devices, no bubble). Stage
boundaries are DiffusionBlocks' block boundaries (the same contiguous split), so ``db:B`` under
``--pp B`` puts block b on stage b: it is then ``db:B+parallel`` itself, which the plan shows.
"""

from __future__ import annotations

from typing import Any

import torch

from dbprofile.planner.pipeline import SCHEDULES, StageInputs, plan_stages, split_layers, summary
from dbprofile.planner.zero import shard_zero
from dbprofile.spec import ModelSpec, SpecError, get_layers
from dbprofile.techniques import PARALLEL_SUFFIX, Technique, parse_technique
from dbprofile.vocabulary import CATEGORIES, PHASES

ACTIVATIONS, TEMPORARIES = CATEGORIES.index("activations"), CATEGORIES.index("temporaries")

PIPELINED_KINDS = ("e2e", "ckpt", "sac")
"""Techniques whose layers a pipeline splits into stages (DiffusionBlocks is compared block-parallel)."""


def check_layout(
    world_size: int, tp: int, pp: int, schedule: str, micro_batches: int | None, batch_size: int = 1
) -> None:
    """The mesh and schedule, each refused in one paragraph naming it (exit 2 in the CLI)."""
    from dbprofile.measure.distributed.mesh import check_mesh

    check_mesh(world_size, tp, pp)
    if schedule not in SCHEDULES:
        raise SpecError(f"The pipeline schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}.")
    if micro_batches is not None and (isinstance(micro_batches, bool) or micro_batches < 1):
        raise SpecError(f"--micro-batches must be a positive integer; got {micro_batches!r}.")
    if pp > 1 and batch_size % (micro_batches or batch_size):
        raise SpecError(
            f"The batch of {batch_size} cannot be split into {micro_batches} equal micro-batches (--micro-batches); "
            f"pass a divisor of {batch_size}."
        )
    if tp > 1 and pp > 1:
        raise SpecError(
            f"Tensor and pipeline parallelism together (--tp {tp} --pp {pp}) are not planned yet: a pipeline "
            "stage's figures are measured without tensor parallelism. Plan --tp and --pp separately."
        )


def layout_techniques(
    wanted: list[tuple[str, Technique, bool]], default: bool, tp: int, pp: int, num_layers: int, spec: ModelSpec
) -> list[tuple[str, Technique, bool]]:
    """The plan's techniques under the layout: offload left out (default set) or refused (named) under
    tensor parallelism, and ``db:P+parallel`` added beside a pipeline of P stages."""
    if pp > num_layers:
        raise SpecError(
            f"A pipeline of {pp} stages (--pp) needs at least {pp} residual layers, one per stage; "
            f"{spec.name!r} has {num_layers}. Pass --pp {num_layers} or fewer."
        )
    if tp > 1:
        from dbprofile.measure.fake import fake_mode
        from dbprofile.methods.tensor_parallel import check_tensor_parallel

        with fake_mode():
            check_tensor_parallel(spec, spec.build(), tp)
        offloading = [name for name, tech, _ in wanted if tech.kind == "offload" or tech.offload]
        if offloading and not default:
            raise SpecError(
                f"{', '.join(offloading)} with tensor parallelism (--tp {tp}) is not planned: offloading copies "
                "saved tensors to the host with plain copies, and under tensor parallelism some are DTensors "
                "(aten.copy_ refuses to mix them). Plan ckpt or sac with --tp, or offload without it."
            )
        wanted = [w for w in wanted if w[0] not in offloading]
    if pp > 1 and not any(parallel and (tech.blocks or 0) == pp for _, tech, parallel in wanted):
        name = f"db:{pp}{PARALLEL_SUFFIX}"
        wanted = [*wanted, (name, parse_technique(name).on_one_device(), True)]
    return wanted


def stage_inputs(planner: Any, tech: Technique, micro_batch_size: int) -> StageInputs:
    """One micro-batch's costs, from fake runs of the model cut to 2 and 3 layers at the micro-batch
    size: the activations live at the end of the forward (what a micro-batch in flight holds) differ by
    one layer's; the rest is the head's and stem's. Temporaries: the most the step held at once."""
    from dbprofile.measure.depth import spec_at_depth
    from dbprofile.measure.runner import measure

    spec, facts = planner.spec, planner.facts
    held, temps, optimizer_ratio = [], [], 0.0
    for depth in (2, 3):
        traces: dict = {}
        m = measure(
            spec_at_depth(spec, depth),
            tech,
            micro_batch_size,
            device="cpu",
            fake=True,
            precision=planner.precision,
            optimizer=planner.optimizer,
            round_to=planner.round_to,
            warmup_steps=1,
            steps=1,
            traces=traces,
        )
        record = traces.get(None)
        if not m.ok or record is None or not record.trace:
            raise SpecError(f"{tech.name} at micro-batch {micro_batch_size}, {depth} layers: {m.error or 'no trace'}")
        forward = PHASES.index("forward")
        points = [point for _, point in record.trace]
        held.append(max(p[1 + ACTIVATIONS] for p in points if p[0] == forward))
        temps.append(max(p[1 + TEMPORARIES] for p in points))
        optimizer_ratio = m.shares.get("optimizer_state", 0) / (m.shares.get("parameters", 0) or 1)
    per_layer = held[1] - held[0]
    before, boundary = _before_and_boundary(spec, micro_batch_size)
    return StageInputs(
        layer_parameter_bytes=list(facts.layer_bytes),
        before_bytes=before,
        after_bytes=facts.rest_bytes - before,
        gradient_per_parameter=1.0,
        optimizer_per_parameter=optimizer_ratio,
        activation_bytes_per_layer=per_layer,
        head_activation_bytes=max(held[0] - 2 * per_layer, 0),
        temporary_bytes=max(temps),
        boundary_bytes=boundary,
    )


def _before_and_boundary(spec: ModelSpec, micro_batch_size: int) -> tuple[int, int]:
    """Parameter bytes registered before the residual layers (the first stage's), and the bytes of the
    hidden state a stage passes on for one micro-batch (the first layer's input, from a fake forward)."""
    from dbprofile.measure.depth import spec_at_depth
    from dbprofile.measure.fake import fake_mode

    prefix = spec.layers + "."
    seen: list[int] = []
    with fake_mode(), torch.no_grad():
        model = spec_at_depth(spec, 1).build()
        before = 0
        for name, p in model.named_parameters():
            if name.startswith(prefix):
                break
            before += p.numel() * p.element_size()
        layer = get_layers(model, spec.layers, spec.name)[0]
        hook = layer.register_forward_pre_hook(
            lambda _m, args: seen.append(args[0].numel() * args[0].element_size()) if args else None
        )
        try:
            spec.loss(model, spec.batch(micro_batch_size, "cpu"))
        finally:
            hook.remove()
    return before, (seen[0] if seen else 0)


def plan_pipeline(planner: Any, plan: Any, pp: int, schedule: str, micro_batches: int | None) -> dict[str, Any]:
    """Every pipelined technique's stages (``summary``), and ``db:P+parallel``'s figures beside them."""
    m_count = micro_batches or plan.batch_size  # torchtitan's default: micro-batches of one sample
    micro = plan.batch_size // m_count
    dp = plan.world_size // pp
    unit = max(max(planner.facts.layer_bytes), planner.facts.rest_bytes)
    groups = split_layers(planner.facts.num_layers, pp)
    out: dict[str, Any] = {"stages": pp, "schedule": schedule, "micro_batches": m_count, "data_parallel": dp}
    techniques: dict[str, Any] = {}
    for entry in plan.entries:
        tech = parse_technique(entry.technique)
        if tech.kind not in PIPELINED_KINDS or not entry.ok:
            continue
        stages = plan_stages(stage_inputs(planner, tech, micro), pp, schedule, m_count, groups)
        if plan.zero_stage and dp > 1:
            for st in stages:
                st.shares = shard_zero(st.shares, plan.zero_stage, dp, unit, "backward")
                st.peak_bytes = sum(st.shares.values())
        fixed = sum(v for k, v in entry.corrections.items() if k != "allocator_segments")
        info = summary(stages, schedule, m_count, micro)
        info["device_peak_bytes"] = info["peak_bytes"] + fixed
        info["flops_per_sample"] = entry.flops_per_sample
        info["sent_bytes_per_step"] = max(st.sent_bytes_per_step for st in stages)
        techniques[entry.technique] = info
    for entry in plan.entries:
        tech = parse_technique(entry.technique)
        if entry.ok and tech.parallel and tech.blocks == pp:
            comm = entry.extra.get("communication") or {}
            out["block_parallel"] = {
                "technique": entry.technique,
                "devices": pp,
                "peak_bytes": entry.peak_bytes,
                "rank_peaks": entry.extra.get("rank_peaks"),
                "in_flight": 1,
                "bubble_fraction": 0.0,
                "flops_per_sample": entry.flops_per_sample,
                "sent_bytes_per_step": comm.get("bytes_per_step"),
                "max_batch_size": entry.max_batch_size,
            }
    out["techniques"] = techniques
    out["layer_groups"] = groups
    return out
