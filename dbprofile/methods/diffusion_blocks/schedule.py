"""The noise schedule of DiffusionBlocks (METHOD.md): the equi-probability partition of the
truncated log-normal over sigma into B block ranges (and the uniform log-space split kept
for the paper's ablation), the gamma overlap, the three ways of applying EDM's loss weight,
and the noise levels of the Euler chain used at inference. The EDM formulas themselves
(sampling sigma, preconditioning, loss weight) live in ``dbprofile.edm``, shared with the
end-to-end DiT loss.
"""

from __future__ import annotations

import math

import torch

from dbprofile.edm import (
    P_MEAN,
    P_STD,
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    loss_weight,
    normal_cdf,
    normal_quantile,
    standardised_log_sigma,
)
from dbprofile.spec import SpecError

DEFAULT_GAMMA = 0.05

PARTITIONS = ("equiprobable", "uniform-log")
WEIGHTINGS = ("reference", "per-sample", "none")
DEFAULT_WEIGHTING = "reference"
"""Default loss weighting of the classification and language-model tasks. ``reference``
reproduces the authors' classification code (mean(w) * mean(loss)), which is what produced
the published numbers; see docs/diffusion_blocks.md for the measured comparison with
``none`` and ``per-sample``."""
TASK_WEIGHTINGS = {
    "classification": DEFAULT_WEIGHTING,
    "causal-lm": DEFAULT_WEIGHTING,
    "denoising": "per-sample",
    "masked-diffusion-lm": "per-sample",
}
"""Default weighting per task: denoising (DiT) trains with EDM's per-sample weights, as its
end-to-end baseline (``models.dit.edm_loss``) and the paper's DiT runs do, and a masked diffusion
LM's blocks with MD4's ELBO weight per sequence, as its end-to-end loss does; the batch-scalar
quirk belongs to the authors' classification code only."""


def default_weighting(task: str) -> str:
    """The loss weighting a task trains with unless one is chosen (``TASK_WEIGHTINGS``)."""
    return TASK_WEIGHTINGS.get(task, DEFAULT_WEIGHTING)


def _sigma_at(q: float) -> float:
    return math.exp(P_MEAN + P_STD * normal_quantile(q))


def _check_blocks(blocks: int) -> None:
    if not isinstance(blocks, int) or blocks < 1:
        raise SpecError(f"DiffusionBlocks needs B >= 1 blocks; got B={blocks!r}. Use db:B with B a positive integer.")


def equiprobable_boundaries(blocks: int, lo: float = SIGMA_MIN, hi: float = SIGMA_MAX) -> list[float]:
    """B+1 ascending sigma boundaries, each range holding 1/B of the truncated log-normal mass."""
    _check_blocks(blocks)
    q_min, q_max = normal_cdf(standardised_log_sigma(lo)), normal_cdf(standardised_log_sigma(hi))
    inner = [_sigma_at(q_min + (b / blocks) * (q_max - q_min)) for b in range(1, blocks)]
    return [lo, *inner, hi]


def uniform_log_boundaries(blocks: int, lo: float = SIGMA_MIN, hi: float = SIGMA_MAX) -> list[float]:
    """B+1 ascending boundaries equally spaced in log sigma (the paper's ablation baseline)."""
    _check_blocks(blocks)
    step = (math.log(hi) - math.log(lo)) / blocks
    inner = [math.exp(math.log(lo) + b * step) for b in range(1, blocks)]
    return [lo, *inner, hi]


def noise_ranges(
    blocks: int, gamma: float = DEFAULT_GAMMA, partition: str = "equiprobable"
) -> list[tuple[float, float]]:
    """Ascending (lo, hi) ranges, each widened in log space by gamma times its log width at
    both ends and clipped to [SIGMA_MIN, SIGMA_MAX]. Index 0 is the LOWEST noise range."""
    if not (isinstance(gamma, (int, float)) and 0.0 <= gamma < 0.5):
        raise SpecError(
            f"The overlap gamma must lie in [0, 0.5); got {gamma!r}. gamma widens each block's noise "
            "range by that fraction of its log width at both ends (paper: 0.05, 0.1 for text, 0 in ablations)."
        )
    if partition == "equiprobable":
        bounds = equiprobable_boundaries(blocks)
    elif partition == "uniform-log":
        bounds = uniform_log_boundaries(blocks)
    else:
        raise SpecError(f"Unknown partition {partition!r}; choose one of {', '.join(PARTITIONS)}.")
    ranges = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        pad = gamma * (math.log(hi) - math.log(lo))
        ranges.append((max(SIGMA_MIN, lo * math.exp(-pad)), min(SIGMA_MAX, hi * math.exp(pad))))
    return ranges


def block_ranges(
    blocks: int, gamma: float = DEFAULT_GAMMA, partition: str = "equiprobable"
) -> list[tuple[float, float]]:
    """The (lo, hi) sigma range trained by each block, indexed by block: block 0 (next to the
    input) gets the HIGHEST noise range, the last block (next to the output) the lowest."""
    return list(reversed(noise_ranges(blocks, gamma, partition)))


def weighted_loss(
    per_sample: torch.Tensor, sigma: torch.Tensor, mode: str = DEFAULT_WEIGHTING, sigma_data: float = SIGMA_DATA
) -> torch.Tensor:
    """Reduce a (N,) per-sample loss to a scalar with the chosen weighting:

    - ``reference``: mean(w) * mean(loss), what the authors' code computes (a (bsz,) loss
      broadcast against a (bsz, 1) weight);
    - ``per-sample``: mean(w_i * loss_i), the paper's equation;
    - ``none``: mean(loss).
    """
    if mode not in WEIGHTINGS:
        raise SpecError(f"Unknown loss weighting {mode!r}; choose one of {', '.join(WEIGHTINGS)}.")
    per_sample = per_sample.reshape(per_sample.shape[0], -1).mean(dim=1)
    if mode == "none":
        return per_sample.mean()
    w = loss_weight(sigma.reshape(-1).to(per_sample.dtype), sigma_data)
    if mode == "per-sample":
        return (w * per_sample).mean()
    return w.mean() * per_sample.mean()


def inference_sigmas(levels: int, lo: float = SIGMA_MIN, hi: float = SIGMA_MAX) -> list[float]:
    """``levels`` noise levels from hi down to lo, equally spaced in the truncated CDF
    (the reference uses levels = B; B=3 gives [80, 0.3012, 0.002]). At least two levels."""
    levels = max(int(levels), 2)
    q_min, q_max = normal_cdf(standardised_log_sigma(lo)), normal_cdf(standardised_log_sigma(hi))
    out = []
    for i in range(levels):
        if i == 0:
            out.append(hi)
        elif i == levels - 1:
            out.append(lo)
        else:
            out.append(_sigma_at(q_max - (i / (levels - 1)) * (q_max - q_min)))
    return out


def block_for_sigma(sigma: float, blocks: int, partition: str = "equiprobable") -> int:
    """The block whose (non-overlapping) range holds sigma. A sigma exactly on a boundary goes
    to the higher-noise block, as the authors' ``bucketize(..., right=True)`` does; sigma_max
    goes to block 0 and sigma_min to the last block."""
    bounds = equiprobable_boundaries(blocks) if partition == "equiprobable" else uniform_log_boundaries(blocks)
    # ascending range a is [bounds[a], bounds[a+1]); block index = blocks - 1 - a
    for a in range(blocks):
        if sigma < bounds[a + 1]:
            return blocks - 1 - a
    return 0
