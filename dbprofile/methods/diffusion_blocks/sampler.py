"""Inference with a DiffusionBlocks model: the Euler chain over blocks (METHOD.md).

Starting from pure noise at sigma_max, each level's block runs alone and gives D(z, sigma);
the chain steps z_next = (s_next/s)*z + (1 - s_next/s)*D. The reference uses N = B levels
equally spaced in the truncated CDF (B=3: 80, 0.3012, 0.002), so each block runs once; a
sigma on a block boundary runs the higher-noise block (``schedule.block_for_sigma``).

Classification follows the authors' code: z starts as N(0, 1) * sqrt(1 + sigma_max^2), D at
an intermediate level is softmax(logits) @ the label-embedding table, and the prediction is
the argmax of the logits at the last level. One departure, by default: the table's rows are
L2-normalised (``table="normalised"``), the targets every block was trained to denoise
towards; the authors' sampler mixes the RAW rows (``table="raw"``), whose norms (about 0.02 *
sqrt(d) at init, 0.35-0.55 after the learning check's training) put z off the training
distribution of the next block. At B=2 the two agree (the last level reads the class off z);
at B=3 the raw table cost 13 points on seed 1 of the learning check (80.3% against 93.6%):
docs/diffusion_blocks.md#learning-check. Denoising starts from
sigma_max * N(0, 1) as EDM does (its data have std sigma_data, not 1) and returns D at the
last level.
Masked diffusion LMs sample with MD4's ancestral steps from the fully masked sequence, each
step's block chosen by its time t (``sample_masked``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import cast

import torch
import torch.nn.functional as F

from dbprofile.masked_diffusion import alpha
from dbprofile.methods.diffusion_blocks.blockwise import BlockwiseModel
from dbprofile.methods.diffusion_blocks.masked import block_for_time
from dbprofile.methods.diffusion_blocks.schedule import (
    block_for_sigma,
    inference_sigmas,
)


def _levels(model: BlockwiseModel, steps: int | None) -> list[float]:
    return inference_sigmas(steps or model.num_blocks)


def _block_at(model: BlockwiseModel, sigma: float) -> int:
    return block_for_sigma(sigma, model.num_blocks, model.partition)


TABLES = ("normalised", "raw")


@torch.no_grad()
def predict_classes(
    model: BlockwiseModel,
    inputs: torch.Tensor,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
    table: str = "normalised",
) -> torch.Tensor:
    """Predicted class ids (N,) for ``inputs`` through the Euler chain (``steps`` levels,
    default B); ``table`` is the label table D is read from (module doc)."""
    if model.task != "classification":
        raise ValueError(f"predict_classes needs a classification model; this one is {model.task!r}.")
    if table not in TABLES:
        raise ValueError(f"predict_classes: table must be one of {', '.join(TABLES)}; got {table!r}.")
    was_training = model.training
    model.eval()
    try:
        n, device = inputs.shape[0], inputs.device
        labels = model.label_embedding if table == "raw" else F.normalize(model.label_embedding, dim=-1)
        levels = _levels(model, steps)
        z = math.sqrt(1.0 + levels[0] ** 2) * _randn((n, labels.shape[1]), generator, device)
        for i, s in enumerate(levels):  # inference_sigmas gives at least two levels, so logits is set
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
    """Samples of ``shape`` from a denoising model (``steps`` Euler levels, default B); each
    level runs the block whose range holds it."""
    if model.task != "denoising":
        raise ValueError(f"sample needs a denoising model; this one is {model.task!r}.")

    def denoise(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        block = _block_at(model, float(sigma[0]))
        with model.block_residency(block):
            return model.denoise(z, sigma, model.block_layers[block], labels)

    was_training = model.training
    model.eval()
    try:
        return euler_sample(denoise, shape, _levels(model, steps), generator, device)
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_masked(
    model: BlockwiseModel,
    batch_size: int,
    length: int,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Token sequences (N, length) from a masked diffusion LM's blocks: MD4's ancestral sampler
    from the fully masked sequence (t = 1) to the clean one (t = 0) over ``steps`` equal time
    steps (default: ``length``, one token unmasked per step on average). Each step from t to s
    runs the block whose range holds t alone; every still-masked token is unmasked with
    probability (alpha_s - alpha_t) / (1 - alpha_t), drawn from the block's prediction over the
    data tokens; unmasked tokens stay (the mask is absorbing). At s = 0 every token is unmasked."""
    if model.task != "masked-diffusion-lm":
        raise ValueError(f"sample_masked needs a masked diffusion LM; this one is {model.task!r}.")
    mask_id = cast(int, model.spec.mask_token_id)
    steps = steps or length
    was_training = model.training
    model.eval()
    try:
        z = torch.full((batch_size, length), mask_id, dtype=torch.long, device=device)
        for i in range(steps):
            t, s = 1 - i / steps, 1 - (i + 1) / steps
            block = block_for_time(t, model.num_blocks)
            t_vec = torch.full((batch_size,), t, device=device)
            with model.block_residency(block):
                logits = model.masked_logits(z, t_vec, model.block_layers[block]).float()
            a_t, a_s = alpha(torch.tensor([t, s]), model.spec.masking_schedule)
            reveal = (_rand(z.shape, generator, device) < (a_s - a_t) / (1 - a_t)) & (z == mask_id)
            drawn = torch.multinomial(logits[..., :mask_id].softmax(-1).flatten(0, 1), 1, generator=generator)
            z = torch.where(reveal, drawn.view_as(z).to(device), z)
        return z
    finally:
        model.train(was_training)


def _rand(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def euler_sample(
    denoise,
    shape: tuple[int, ...],
    levels: list[float],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The Euler chain over ``levels`` (descending sigmas) for any denoiser ``denoise(z, sigma)
    -> D``: z starts at levels[0] * N(0, 1), z_next = (s_next/s)*z + (1 - s_next/s)*D, and D
    at the last level is the sample. ``sample`` runs it block by block; an end-to-end model's
    denoiser runs it whole (examples/generation_check.py)."""
    z = levels[0] * _randn(shape, generator, device)
    d = z
    for i, s in enumerate(levels):
        d = denoise(z, torch.full((shape[0],), s, device=device))
        if i + 1 < len(levels):
            ratio = levels[i + 1] / s
            z = ratio * z + (1 - ratio) * d
    return d


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
        for param in clone.layers[i].get_submodule("modulation").parameters():
            param.data = torch.zeros_like(param.data)
    return clone


@torch.no_grad()
def held_out_block_losses(
    model: BlockwiseModel, batch: dict, seed: int = 0, draws: int = 1
) -> list[tuple[float, float]]:
    """Per block, the unweighted held-out loss at sigmas drawn from its own range: (trained,
    zero-initialised block). A block that learned nothing shows as trained >= zero-init.
    Both see the same sigmas and noise (a paired comparison); ``draws`` > 1 repeats the batch
    with fresh draws, which the lowest-noise block needs: its loss comes from the few
    samples near the top of its range, where the noisy label is ambiguous."""
    if draws > 1:
        batch = {key: value.repeat(draws, *([1] * (value.dim() - 1))) for key, value in batch.items()}
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
