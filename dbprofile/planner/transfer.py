"""Host-link time in a plan: does an offloading technique's copy traffic hide behind its compute on
the target, or add to the step?

Measured, per step (the runner's ``extra['host_transfer']``): the bytes copied to host memory and
back. The link is the card's host interface at its datasheet rate per direction (dbprofile.gpus:
PCIe Gen3/4/5 x16; a peak, pinned copies reach about 80-90% of it). Compute time is the step's
counted FLOPs at ASSUMED_UTILISATION of the card's peak (dbprofile.planner.targets).

- ``offload`` (activations): the copies to the host run during the forward, the copies back during
  the backward, each on a copy stream beside the compute. The forward is about a third of a
  training step's FLOPs (a layer's backward costs twice its forward), so the copies out hide when
  they take at most a third of the step's compute time and the copies in when they take at most two
  thirds; what exceeds that is exposed (added to the step).
- ``db:B+offload`` (a block's parameters and optimizer state): dbprofile's trainer copies the block
  in before its step and out after it, with no prefetch of the next block, so the whole transfer is
  exposed. A prefetching implementation could hide the copy in behind the previous block-step.

The exposed seconds per trained sample are what the verdict adds to the technique's compute."""

from __future__ import annotations

from dbprofile.gpus import GPU
from dbprofile.results import PlanEntry
from dbprofile.techniques import parse_technique

FORWARD_SHARE = 1 / 3
"""The forward's share of a training step's FLOPs (backward = 2 x forward for matmul layers)."""


def estimate_link_time(entry: PlanEntry, gpu: GPU | None, peak_flops: int | None, utilisation: float) -> None:
    """Set ``entry.extra['host_link']`` and ``entry.exposed_transfer_s_per_sample`` for an entry that
    moves bytes over the host link, when the target's link rate (and, for overlap, its peak) is known."""
    moved = entry.extra.get("host_transfer")
    if not moved or gpu is None or not gpu.host_link_bytes_per_s or not entry.ok:
        return
    link = gpu.host_link_bytes_per_s
    out_s = moved.get("to_host_bytes", 0) / link
    in_s = moved.get("to_device_bytes", 0) / link
    tech = parse_technique(entry.technique.removesuffix("+parallel"))
    blockwise = tech.is_diffusion_blocks
    step_flops = max(entry.block_step_flops) if blockwise and entry.block_step_flops else entry.training_flops
    compute_s = step_flops / (peak_flops * utilisation) if step_flops and peak_flops else None
    if blockwise:
        exposed: float | None = out_s + in_s
        rule = "copied before and after each block-step, not overlapped"
    elif compute_s is not None:
        exposed = max(0.0, out_s - FORWARD_SHARE * compute_s) + max(0.0, in_s - (1 - FORWARD_SHARE) * compute_s)
        rule = "out during the forward (1/3 of the step's compute), back during the backward (2/3), overlapped"
    else:
        exposed, rule = None, "overlap unknown: the target has no peak FLOPS in the table"
    steps_per_batch = (tech.blocks or 1) if blockwise else 1  # B block-steps train every layer once
    per_sample = exposed * steps_per_batch / entry.batch_size if exposed is not None else None
    entry.exposed_transfer_s_per_sample = per_sample
    entry.extra["host_link"] = {
        "link": gpu.host_link,
        "bytes_per_s": link,
        "to_host_s": out_s,
        "to_device_s": in_s,
        "compute_s": compute_s,
        "exposed_s": exposed,
        "hidden": exposed == 0.0 if exposed is not None else None,
        "rule": rule,
    }
