"""The verdict's sentence on a pipeline plan (``--pp P``): each pipelined technique's worst stage,
bubble and traffic against block-parallel DiffusionBlocks (``db:P+parallel``) on the same P devices.
A pure function of the plan's data (dbprofile.planner.layout fills ``Plan.pipeline``)."""

from __future__ import annotations

from typing import Any

from dbprofile.results import Reason
from dbprofile.units import format_bytes

RULE = "pipeline-vs-block-parallel"


def reason_pipeline(pipeline: dict[str, Any]) -> Reason | None:
    """None when the plan has no pipeline or no block-parallel entry to set beside it."""
    block = pipeline.get("block_parallel") if pipeline else None
    techniques = pipeline.get("techniques") if pipeline else None
    if not block or not techniques:
        return None
    p = pipeline["stages"]
    parts = []
    numbers: dict[str, Any] = {"stages": p, "block_parallel_peak_bytes": block["peak_bytes"]}
    for name, info in techniques.items():
        worst = info["per_stage"][info["worst_stage"]]
        parts.append(
            f"{name} pipelined needs {format_bytes(info['device_peak_bytes'])} on its worst stage ({worst['in_flight']} "
            f"micro-batches of {info['micro_batch_size']} in flight), idles {100 * info['bubble_fraction']:.0f}% "
            f"of each step and sends {format_bytes(info['sent_bytes_per_step'])} per step"
        )
        numbers[f"{name}_peak_bytes"] = info["device_peak_bytes"]
        numbers[f"{name}_bubble_fraction"] = info["bubble_fraction"]
    compute = ""
    base = next(iter(techniques.values())).get("flops_per_sample")
    if base and block.get("flops_per_sample"):
        compute = f" at {block['flops_per_sample'] / base:.2f}x {next(iter(techniques))}'s FLOPs per sample"
        numbers["block_parallel_flops_ratio"] = block["flops_per_sample"] / base
    sent = block.get("sent_bytes_per_step")
    sentence = (
        f"On {p} devices: " + "; ".join(parts) + f". {block['technique']} needs {format_bytes(block['peak_bytes'])} "
        f"per device with no bubble and no activation crossing devices"
        + (f", sending {format_bytes(sent)} per step (its shared parts' gradients)" if sent is not None else "")
        + f"{compute}; the DiffusionBlocks paper reports no result with pipeline parallelism, so its quality at "
        f"B = {p} is the paper's B ablation's, not this layout's."
    )
    return Reason(rule=RULE, sentence=sentence, numbers=numbers)
