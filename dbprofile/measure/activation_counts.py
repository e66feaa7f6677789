"""DiffusionBlocks' activation ratios (one block's layers against the same sigma-conditioned layers at
full depth and against the plain model's; dbprofile.methods.diffusion_blocks.activations), counted on
shallow copies of a model whose residual layers are identical.

Counting at full depth runs the plain model, every block and the conditioned model at full depth: 3L
layer forwards per db:B technique, repeated for each B. But a block of q layers saves what the
conditioned model cut to q layers saves (``saved_layer_bytes``), and each of two counts is affine in
the depth (each identical layer saves the same bytes, plus a constant: the shared sigma embedding, a
first layer's input), so both are counted at depths 1, 2 and 3, extrapolated along the line through
the first two and checked at the third to the byte; then the full depth, and the longest block
(ceil(L / B) layers), are read off the lines. The counts do not depend on B, so every db:B of a plan
shares them. Off the line, not identical layers or a model of three layers or fewer: the direct
full-depth count (``layer_activation_bytes``). tests/test_activation_counts.py checks the two ways
agree on presets (Llama in both sequence layouts, GPT-2, ViT, DiT).
"""

from __future__ import annotations

from typing import Any

import torch

from dbprofile.measure.stack import identical_layers, spec_at_depth
from dbprofile.methods.checkpointing import split_contiguous
from dbprofile.methods.diffusion_blocks.activations import (
    activation_ratios_of,
    layer_activation_bytes,
    saved_layer_bytes,
)
from dbprofile.spec import ModelSpec

COUNT_DEPTHS = (1, 2, 3)
"""Depths of the shallow counts: two for the line, the third to check it."""

_KEPT_SPECS = 4
_lines: dict[int, tuple[ModelSpec, dict[tuple, Any]]] = {}
"""Per spec (by identity, the spec kept alive so its id is not reused): its lines, per batch size,
device and layout; None where the shallow counts are not exact. A plan's db:B techniques share one."""


def activation_ratios(
    spec: ModelSpec, blocks: int, batch_size: int, device: torch.device | str = "cpu", lm_layout: str = "concatenated"
) -> dict[str, float | int]:
    """``layer_activation_bytes(spec, blocks, batch_size, device, lm_layout)``, from shallow counts
    where exact (module docstring). Call it inside fake mode: only shapes are needed."""
    lines = _shallow_lines(spec, batch_size, device, lm_layout)
    if lines is None:
        return layer_activation_bytes(spec, blocks, batch_size, device, lm_layout=lm_layout)
    layers, plain, conditioned = lines
    longest = max(len(part) for part in split_contiguous(layers, blocks))
    return activation_ratios_of(conditioned(longest), conditioned(layers), plain(layers))


def _shallow_lines(spec: ModelSpec, batch_size: int, device: torch.device | str, lm_layout: str) -> Any:
    kept = _lines.get(id(spec))
    if kept is None or kept[0] is not spec:
        while len(_lines) >= _KEPT_SPECS:
            del _lines[next(iter(_lines))]
        kept = _lines[id(spec)] = (spec, {})
    key = (batch_size, str(device), lm_layout)
    if key not in kept[1]:
        kept[1][key] = _count_lines(spec, batch_size, device, lm_layout)
    return kept[1][key]


def _count_lines(spec: ModelSpec, batch_size: int, device: torch.device | str, lm_layout: str) -> Any:
    """(layers, plain bytes at depth d, conditioned bytes at depth d), or None (count in full)."""
    layers, difference = identical_layers(spec)
    if layers <= COUNT_DEPTHS[-1] or difference is not None:
        return None
    counts = [saved_layer_bytes(spec_at_depth(spec, d), batch_size, device, lm_layout) for d in COUNT_DEPTHS]
    first, second, third = counts  # one layer apart
    if any(c - b != b - a for a, b, c in zip(first, second, third)):
        return None

    def line(index: int):
        return lambda depth: first[index] + (second[index] - first[index]) * (depth - COUNT_DEPTHS[0])

    return layers, line(0), line(1)
