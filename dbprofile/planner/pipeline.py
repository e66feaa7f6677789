"""Pipeline parallelism in a plan: P stages of contiguous residual layers, a schedule, and per stage
the bytes it holds at its peak. Pure arithmetic over measured inputs (dbprofile.planner.layout makes
them from fake runs); nothing here traces or prints.

A stage holds its own layers' parameters, gradients and optimizer state (the first stage also the
parameters registered before the residual layers, e.g. the embeddings; the last stage those after
them, e.g. the final norm and the head), plus the activations of every micro-batch it has run the
forward of and not yet the backward: the micro-batches **in flight**. PyTorch's own schedules fix
that count (``torch/distributed/pipelining/schedules.py``):

- ``ScheduleGPipe`` runs all M forwards, then all M backwards: every stage holds M micro-batches;
- ``Schedule1F1B`` runs ``min(M, P - s)`` warm-up forwards on stage s (0-based), then alternates one
  backward and one forward: stage s never holds more than ``min(M, P - s)``; the first stage holds
  the most, the last one a single micro-batch.

Both leave the same bubble: of the ``M + P - 1`` forward-backward slots of a step a stage is idle
in ``P - 1``, a fraction ``(P - 1) / (M + P - 1)`` (Huang et al., 2019, GPipe; Narayanan et al., 2021,
PipeDream-Flush / 1F1B).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEDULES = ("1f1b", "gpipe")


def in_flight(schedule: str, stages: int, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations stage ``stage`` (0-based) of ``stages`` holds at once."""
    if schedule == "gpipe":
        return micro_batches
    if schedule == "1f1b":
        return min(micro_batches, stages - stage)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}.")


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """The share of a step each stage waits idle: (P - 1) / (M + P - 1), for GPipe and 1F1B alike."""
    return (stages - 1) / (micro_batches + stages - 1)


@dataclass(kw_only=True)
class StageInputs:
    """What one micro-batch costs on the model, measured on fake runs at the micro-batch size."""

    layer_parameter_bytes: list[int]
    """Parameters of each residual layer (one device's share: after tensor parallelism, if any)."""
    before_bytes: int
    """Parameters registered before the residual layers (embeddings, stem): on the first stage."""
    after_bytes: int
    """Parameters registered after them (final norm, head): on the last stage."""
    gradient_per_parameter: float
    """Gradient bytes per parameter byte at the peak (1.0 for fp32 gradients of fp32 parameters)."""
    optimizer_per_parameter: float
    """Optimizer-state bytes per parameter byte (2.0 for AdamW's two fp32 moments)."""
    activation_bytes_per_layer: int
    """Bytes one residual layer saves for backward, for one micro-batch."""
    head_activation_bytes: int
    """Bytes the parts outside the residual layers save for one micro-batch (logits, loss): last stage."""
    temporary_bytes: int
    """The largest temporaries of one micro-batch's forward or backward (one layer's, or the head's)."""
    boundary_bytes: int
    """The hidden state passed between stages, for one micro-batch (sent forward, its gradient back)."""


@dataclass(kw_only=True)
class Stage:
    """One pipeline stage's layers and bytes at its peak (the shares sum to ``peak_bytes``)."""

    index: int
    layers: list[int]
    in_flight: int
    shares: dict[str, int] = field(default_factory=dict)
    peak_bytes: int = 0
    activations_per_micro_batch_bytes: int = 0
    sent_bytes_per_step: int = 0


def split_layers(num_layers: int, stages: int) -> list[list[int]]:
    """Contiguous layer groups, the first ``num_layers % stages`` one layer longer (the split
    DiffusionBlocks' blocks use, so that --pp B puts block b on stage b)."""
    per, rest = divmod(num_layers, stages)
    out, start = [], 0
    for s in range(stages):
        size = per + (1 if s < rest else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def plan_stages(
    inputs: StageInputs, stages: int, schedule: str, micro_batches: int, layer_groups: list[list[int]] | None = None
) -> list[Stage]:
    """Every stage's peak: its state, plus in-flight micro-batches' activations, plus one micro-batch's
    temporaries. ``layer_groups`` (default ``split_layers``) are the layers of each stage."""
    groups = layer_groups or split_layers(len(inputs.layer_parameter_bytes), stages)
    out = []
    for s, layers in enumerate(groups):
        params = sum(inputs.layer_parameter_bytes[i] for i in layers)
        params += (inputs.before_bytes if s == 0 else 0) + (inputs.after_bytes if s == stages - 1 else 0)
        per_micro = inputs.activation_bytes_per_layer * len(layers)
        per_micro += inputs.head_activation_bytes if s == stages - 1 else 0
        held = in_flight(schedule, stages, s, micro_batches)
        shares = {
            "parameters": params,
            "gradients": int(params * inputs.gradient_per_parameter),
            "optimizer_state": int(params * inputs.optimizer_per_parameter),
            "activations": per_micro * held,
            "temporaries": inputs.temporary_bytes,
        }
        # Per micro-batch a stage sends its output forward (not the last) and its input's gradient back
        # (not the first): point-to-point, once each.
        sends = (s < stages - 1) + (s > 0)
        out.append(
            Stage(
                index=s,
                layers=layers,
                in_flight=held,
                shares=shares,
                peak_bytes=sum(shares.values()),
                activations_per_micro_batch_bytes=per_micro,
                sent_bytes_per_step=sends * micro_batches * inputs.boundary_bytes,
            )
        )
    return out


def summary(stages: list[Stage], schedule: str, micro_batches: int, micro_batch_size: int) -> dict[str, Any]:
    """The JSON-ready account of one technique's pipeline: every stage, the worst, the bubble."""
    worst = max(stages, key=lambda st: st.peak_bytes)
    return {
        "schedule": schedule,
        "stages": len(stages),
        "micro_batches": micro_batches,
        "micro_batch_size": micro_batch_size,
        "bubble_fraction": bubble_fraction(len(stages), micro_batches),
        "worst_stage": worst.index,
        "peak_bytes": worst.peak_bytes,
        "per_stage": [asdict(st) for st in stages],
    }
