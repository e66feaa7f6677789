"""The text of a plan's parallel layout (``--tp``, ``--pp``, ZeRO-3, block-parallel): the mesh, each
technique's communication per step, the pipeline's stages, and the pipeline against block-parallel
DiffusionBlocks on the same devices. Printed after the plan's table (dbprofile.report.text.format_plan)."""

from __future__ import annotations

from typing import Any

from dbprofile.report.text import aligned
from dbprofile.results import Plan
from dbprofile.units import format_bytes

STAGE_HEAD = ["stage", "layers", "in flight", "params", "grads", "optim", "acts", "temps", "peak", "acts/micro-batch"]


def format_layout(plan: Plan) -> str:
    """Every layout line of the plan ('' when it has none)."""
    lines = mesh_lines(plan) + communication_lines(plan) + pipeline_lines(plan.pipeline)
    return "\n".join(lines)


def mesh_lines(plan: Plan) -> list[str]:
    tp = plan.tensor_parallel
    if tp <= 1:
        return []
    dp = plan.world_size // tp
    fsdp = "FSDP (ZeRO-3) over the first" if plan.zero_stage == 3 else f"ZeRO-{plan.zero_stage} over the first"
    state = fsdp if plan.zero_stage else "data-parallel replicas on the first"
    return [
        f"Layout: {plan.world_size} devices as a {dp} x {tp} mesh, tensor parallelism over the second dimension "
        f"(each layer's attention and MLP split {tp} ways, column-wise in, row-wise out), {state} dimension; "
        f"the batch of {plan.batch_size} is one data-parallel rank's, shared by its {tp} TP devices. "
        "db:B+parallel rows use B devices without TP."
    ]


def communication_lines(plan: Plan) -> list[str]:
    parts = []
    for e in plan.entries:
        comm = e.extra.get("communication") if e.ok else None
        if not comm:
            continue
        kinds = ", ".join(f"{kind} {format_bytes(size)}" for kind, size in sorted(comm["by_kind"].items()))
        parts.append(f"{e.technique} {format_bytes(comm['bytes_per_step'])} ({kinds or 'none'})")
    if not parts:
        return []
    return [
        "Communication per device per step (ring all-reduce 2(n-1)/n, all-gather and reduce-scatter (n-1)/n of the "
        "buffers the simulated rank's collectives worked on): " + "; ".join(parts) + "."
    ]


def pipeline_lines(pipeline: dict[str, Any]) -> list[str]:
    if not pipeline:
        return []
    p, m = pipeline["stages"], pipeline["micro_batches"]
    lines = [
        "",
        f"Pipeline: {p} stages of contiguous layers (DiffusionBlocks' block boundaries), schedule "
        f"{pipeline['schedule']}, {m} micro-batches per batch, {pipeline['data_parallel']} data-parallel replica(s).",
    ]
    for name, info in pipeline["techniques"].items():
        rows: list[list[str]] = [STAGE_HEAD]
        for st in info["per_stage"]:
            sh = st["shares"]
            layers = st["layers"]
            rows.append(
                [
                    str(st["index"]),
                    f"{layers[0]}-{layers[-1]}" if layers else "-",
                    str(st["in_flight"]),
                    *[format_bytes(sh.get(c, 0)) for c in ("parameters", "gradients", "optimizer_state")],
                    format_bytes(sh.get("activations", 0)),
                    format_bytes(sh.get("temporaries", 0)),
                    format_bytes(st["peak_bytes"]),
                    format_bytes(st["activations_per_micro_batch_bytes"]),
                ]
            )
        lines += ["", f"{name} pipelined (micro-batch {info['micro_batch_size']}):", *aligned(rows, left={0, 1})]
        lines.append(
            f"{name}: worst stage {info['worst_stage']} needs {format_bytes(info['device_peak_bytes'])} with the CUDA "
            f"context and workspace; bubble {100 * info['bubble_fraction']:.1f}% of each step idle; each stage sends "
            f"up to {format_bytes(info['sent_bytes_per_step'])} of activations and their gradients per step."
        )
    lines += comparison_lines(pipeline)
    return lines


def comparison_lines(pipeline: dict[str, Any]) -> list[str]:
    block = pipeline.get("block_parallel")
    if not block:
        return []
    gflop = f"{block['flops_per_sample'] / 1e9:.3g} GFLOP/sample" if block.get("flops_per_sample") else "FLOPs unknown"
    sent = block.get("sent_bytes_per_step")
    out = [
        "",
        f"Beside it, {block['technique']} on the same {block['devices']} devices: {format_bytes(block['peak_bytes'])} "
        f"per device at its worst rank, one micro-batch (the whole batch) in flight, no bubble, {gflop}, "
        f"{format_bytes(sent) if sent is not None else 'unknown bytes'} sent per step (the shared parts' gradient "
        "all-reduce; no activation crosses devices).",
    ]
    for name, info in pipeline["techniques"].items():
        ratio = info["device_peak_bytes"] / block["peak_bytes"] if block["peak_bytes"] else 0.0
        flops = info.get("flops_per_sample")
        compute = (
            f", {flops / block['flops_per_sample']:.2f}x its FLOPs/sample"
            if flops and block.get("flops_per_sample")
            else ""
        )
        out.append(
            f"- {name} pipelined: {format_bytes(info['device_peak_bytes'])} at its worst stage ({ratio:.2f}x "
            f"{block['technique']}), {100 * info['bubble_fraction']:.1f}% bubble{compute}."
        )
    return out
