"""Sharding arithmetic of a plan: ZeRO stages 1-3 over a world size, and DiffusionBlocks
block-parallel (one block per device), from a one-device fake measurement and the model's
facts (its largest layer, its root parameters)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dbprofile.results import Measurement
from dbprofile.spec import ModelSpec, get_layers

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
"""Layers whose training output depends on the whole batch: micro-batches then train something else."""


@dataclass(frozen=True)
class ModelFacts:
    """Parameter bytes per residual layer and outside them (FSDP's root unit), from a fake build."""

    layer_bytes: tuple[int, ...]
    rest_bytes: int
    num_layers: int
    not_identical: str | None = None
    """None when the residual layers are identical (depth extrapolation applies), else how they differ."""
    batch_statistics: bool = False
    """The loss depends on the batch as a whole (a BatchNorm layer, or ModelSpec.batch_dependent_loss):
    gradient accumulation over micro-batches is not the same training."""
    num_parameters: int | None = None
    """Parameter elements (trainable or not) of the same build: the plan's heading counts them from it
    instead of building the model once more (a 70B build on meta costs 0.35 s)."""

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes) + self.rest_bytes


def model_facts(spec: ModelSpec) -> ModelFacts:
    """The facts from a build on the ``meta`` device (shapes and dtypes only: a 70B model in a fraction of
    the time fake tensors take, which give every parameter a fake tensor of its own), or on fake tensors
    for a model that cannot be built there."""
    from dbprofile.measure.fake import fake_mode
    from dbprofile.measure.stack import stack_difference
    from dbprofile.models.common import build_on_meta, count_parameters

    try:
        model = build_on_meta(spec.build)
    except Exception:  # a build that reads a value (.item()) runs on fake tensors (and fails there, or not)
        with fake_mode():
            model = spec.build()
    layers = get_layers(model, spec.layers, spec.name)
    per_layer = tuple(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    different = stack_difference(list(layers))
    batch_norm = any(isinstance(m, BATCH_NORMS) for m in model.modules())
    return ModelFacts(
        layer_bytes=per_layer,
        rest_bytes=total - sum(per_layer),
        num_layers=len(per_layer),
        not_identical=different,
        batch_statistics=batch_norm or spec.batch_dependent_loss,
        num_parameters=count_parameters(model),
    )


def ceil_div(n: int, d: int) -> int:
    return -(-n // d)


def shard_zero(
    shares: dict[str, int], stage: int, world_size: int, unit_bytes: int, peak_phase: str | None
) -> dict[str, int]:
    """Per-device shares under ZeRO ``stage`` over ``world_size`` ranks.

    Stage 1 shards optimizer state, 2 also gradients, 3 also parameters (FSDP FULL_SHARD).
    The gathered working set is one unit (``unit_bytes``: the largest layer, or the root's own
    parameters if larger): its full parameters at stage 3, and its full gradients before the
    reduce-scatter when the peak is in the backward (stages 2 and 3).
    """
    out = dict(shares)
    if stage <= 0 or world_size <= 1:
        return out
    out["optimizer_state"] = ceil_div(shares.get("optimizer_state", 0), world_size)
    if stage >= 2:
        grads = shares.get("gradients", 0)
        gathered = min(unit_bytes, grads) if peak_phase == "backward" else 0
        out["gradients"] = ceil_div(grads, world_size) + gathered
    if stage >= 3:
        params = shares.get("parameters", 0)
        out["parameters"] = ceil_div(params, world_size) + min(unit_bytes, params)
    return out


def block_parallel(m: Measurement, facts: ModelFacts) -> tuple[dict[str, int], int | None]:
    """Per-device shares of db:B with one block per device, from the plain db:B measurement.

    Plain db:B keeps every parameter and its optimizer state resident; on its own device a
    block holds the shared parts (embeddings, head, sigma embedder) and its own layers only.
    Inactive layers hold no gradients in plain db:B already, and activations are one block's.
    AdaLN-Zero parameters are spread evenly over the layers. Returns the worst block's shares.
    """
    params_all = m.shares.get("parameters", 0)
    n_params = m.num_parameters or 0
    bytes_per_param = params_all / n_params if n_params else 0.0
    extra_per_layer = (m.extra_parameters or 0) * bytes_per_param / max(facts.num_layers, 1)
    layer_bytes = [b + extra_per_layer for b in facts.layer_bytes]
    blocks = m.blocks or []
    candidates: list[tuple[int | None, dict[str, int], set[int]]] = [
        (b.block, b.shares, set(b.layers)) for b in blocks
    ] or [(m.peak_block, m.shares, set(range(facts.num_layers)))]
    worst: tuple[dict[str, int], int | None] | None = None
    for index, shares, active in candidates:
        inactive = int(sum(b for i, b in enumerate(layer_bytes) if i not in active))
        params = shares.get("parameters", 0)
        kept = max(params - inactive, 0)
        out = dict(shares)
        out["parameters"] = kept
        out["optimizer_state"] = int(shares.get("optimizer_state", 0) * (kept / params)) if params else 0
        if worst is None or sum(out.values()) > sum(worst[0].values()):
            worst = (out, index)
    return worst  # type: ignore[return-value]
