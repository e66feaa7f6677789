"""DiffusionBlocks for masked diffusion LMs (METHOD.md, "Casting each task as denoising"): the
masking time t is partitioned across the blocks instead of sigma.

- Partition: MD4 trains on t ~ U(0, 1) under any schedule, so the equi-probability partition of
  the paper (each block 1/B of the training distribution's mass) is the equal split of t,
  t_b = b/B, for the linear schedule and for any other: the schedule changes which masking
  rates 1 - alpha_t a range covers (cosine, B=2: block 0 t in [0.5, 1] is masking rates
  [0.71, 1], block 1 [0, 0.71]), not where the boundaries in t lie.
- Overlap: each range is widened by gamma times its width at both ends, clipped to [0, 1] (the
  paper widens log-sigma ranges; t is the linear axis here).
- Mapping: block 0, next to the input, gets the highest t (the most masked sequences), the last
  block the lowest, as for sigma; a t on a boundary belongs to the higher-t block.
- One step on block b: t drawn stratified in its range, the tokens masked at rate 1 - alpha_t,
  the model's own embedding, ONLY block b's layers (AdaLN-Zero conditioned on t) and the model's
  own head give the logits; the loss is MD4's ELBO term for those t (weight -alpha'/(1-alpha)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dbprofile.masked_diffusion import DEFAULT_SCHEDULE, elbo_loss, elbo_weight
from dbprofile.spec import SpecError

MASKED_WEIGHTINGS = ("per-sample", "reference", "none")
"""How a block reduces its per-sequence masked cross-entropy: ``per-sample`` is MD4's ELBO
(mean of w(t_i) * ce_i, the default), ``reference`` the authors' batch scalar mean(w) * mean(ce),
``none`` the unweighted mean."""


def time_boundaries(blocks: int) -> list[float]:
    """B+1 ascending boundaries of t: b/B."""
    if not isinstance(blocks, int) or blocks < 1:
        raise SpecError(f"DiffusionBlocks needs B >= 1 blocks; got B={blocks!r}.")
    return [b / blocks for b in range(blocks + 1)]


def time_ranges(blocks: int, gamma: float) -> list[tuple[float, float]]:
    """The (lo, hi) range of t trained by each block, indexed by block (block 0: the highest t)."""
    if not (isinstance(gamma, (int, float)) and 0.0 <= gamma < 0.5):
        raise SpecError(f"The overlap gamma must lie in [0, 0.5); got {gamma!r}.")
    bounds = time_boundaries(blocks)
    ranges = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        pad = gamma * (hi - lo)
        ranges.append((max(0.0, lo - pad), min(1.0, hi + pad)))
    return list(reversed(ranges))


def block_for_time(t: float, blocks: int) -> int:
    """The block whose (non-overlapping) range holds t; a boundary goes to the higher-t block."""
    bounds = time_boundaries(blocks)
    for a in range(blocks):
        if t < bounds[a + 1]:
            return blocks - 1 - a
    return 0


def block_loss(
    logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    mask_id: int,
    time_range: tuple[float, float],
    weighting: str,
    generator: torch.Generator | None = None,
    schedule: str = DEFAULT_SCHEDULE,
) -> torch.Tensor:
    """One block's loss: MD4's ELBO term at t drawn in ``time_range``, reduced by ``weighting``."""
    if weighting not in MASKED_WEIGHTINGS:
        raise SpecError(f"Unknown loss weighting {weighting!r}; choose one of {', '.join(MASKED_WEIGHTINGS)}.")
    lo, hi = time_range
    ce, t = elbo_loss(logits_of, tokens, mask_id, schedule, lo, hi, generator)
    if weighting == "none":
        return ce.mean()
    w = elbo_weight(t, schedule)
    return (w * ce).mean() if weighting == "per-sample" else w.mean() * ce.mean()
