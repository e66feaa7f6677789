"""Inference with a DiffusionBlocks model: the Euler chain over blocks (METHOD.md).

Starting from pure noise at sigma_max, each level's block runs alone and gives D(z, sigma);
the chain steps z_next = (s_next/s)*z + (1 - s_next/s)*D. The reference uses N = B levels
equally spaced in the truncated CDF (B=3: 80, 0.3012, 0.002), so each block runs once.
For classification, D at an intermediate level is softmax(logits) @ the L2-normalised
label embeddings and the prediction is the argmax of the logits at the last level; for
denoising the output at the last level is the sample.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from dbprofile.methods.diffusion_blocks.blockwise import BlockwiseModel
from dbprofile.methods.diffusion_blocks.schedule import block_for_sigma, inference_sigmas


def _levels(model: BlockwiseModel, steps: int | None) -> list[float]:
    return inference_sigmas(steps or model.num_blocks)


def _block_at(model: BlockwiseModel, sigma: float) -> int:
    return block_for_sigma(sigma, model.num_blocks)


@torch.no_grad()
def predict_classes(
    model: BlockwiseModel,
    inputs: torch.Tensor,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
) -> torch.Tensor:
    """Predicted class ids (N,) for ``inputs`` through the Euler chain (``steps`` levels, default B)."""
    if model.task != "classification":
        raise ValueError(f"predict_classes needs a classification model; this one is {model.task!r}.")
    was_training = model.training
    model.eval()
    try:
        n, device = inputs.shape[0], inputs.device
        labels = F.normalize(model.label_embedding, dim=-1)
        levels = _levels(model, steps)
        z = levels[0] * _randn((n, labels.shape[1]), generator, device)
        logits = None
        for i, s in enumerate(levels):
            block = _block_at(model, s)
            sigma = torch.full((n,), s, device=device)
            with model.block_residency(block):
                logits = model.classification_logits(inputs, z, sigma, model.block_layers[block]).float()
            if i + 1 < len(levels):
                d = logits.softmax(dim=-1) @ labels.float()
                ratio = levels[i + 1] / s
                z = ratio * z + (1 - ratio) * d
        return logits if return_logits else logits.argmax(dim=-1)
    finally:
        model.train(was_training)


@torch.no_grad()
def sample(
    model: BlockwiseModel,
    shape: tuple[int, ...],
    labels: torch.Tensor | None = None,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Samples of ``shape`` from a denoising model (``steps`` Euler levels, default B)."""
    if model.task != "denoising":
        raise ValueError(f"sample needs a denoising model; this one is {model.task!r}.")
    was_training = model.training
    model.eval()
    try:
        levels = _levels(model, steps)
        z = levels[0] * _randn(shape, generator, device)
        d = z
        for i, s in enumerate(levels):
            block = _block_at(model, s)
            sigma = torch.full((shape[0],), s, device=device)
            with model.block_residency(block):
                d = model.denoise(z, sigma, model.block_layers[block], labels)
            if i + 1 < len(levels):
                ratio = levels[i + 1] / s
                z = ratio * z + (1 - ratio) * d
        return d
    finally:
        model.train(was_training)


def _randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def identity_block_copy(model: BlockwiseModel, block: int) -> BlockwiseModel:
    """A copy of ``model`` whose block ``block`` is reset to its zero-initialised state: every
    AdaLN-Zero modulation zeroed, so each of its layers is the identity again (the baseline a
    trained block must beat). Not available for the denoising task (no wrappers there)."""
    if model.task == "denoising":
        raise ValueError("identity_block_copy needs AdaLN-Zero wrapped layers; denoising models have none.")
    clone = copy.deepcopy(model)
    clone.block_residency = contextlib.nullcontext
    for i in clone.block_layers[block]:
        for param in clone.layers[i].modulation.parameters():
            param.data = torch.zeros_like(param.data)
    return clone


@torch.no_grad()
def held_out_block_losses(model: BlockwiseModel, batch: dict, seed: int = 0) -> list[tuple[float, float]]:
    """Per block, the unweighted held-out loss at sigmas drawn from its own range: (trained,
    zero-initialised block). A block that learned nothing shows as trained >= zero-init."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for block in range(model.num_blocks):
            losses = []
            with model.block_residency(block):
                for candidate in (model, identity_block_copy(model, block)):
                    generator = torch.Generator(device=batch["inputs"].device).manual_seed(seed + block)
                    losses.append(float(candidate.loss(batch, block, generator=generator, weighting="none")))
            out.append((losses[0], losses[1]))
    finally:
        model.train(was_training)
    return out
