"""Masked diffusion for discrete tokens as MD4 defines it (Shi et al., 2024, "Simplified and
Generalized Masked Diffusion for Discrete Data"; METHOD.md): shared by the end-to-end loss of
masked diffusion LMs (``models/masked_lm``, ``models/hf_masked``) and DiffusionBlocks' blocks
(``methods/diffusion_blocks/masked``), as ``edm`` is shared by DiT and its blocks.

- Absorbing state: one [MASK] token, by dbprofile's convention the LAST id of the vocabulary
  (``vocab_size - 1``); data tokens are the ids below it.
- Continuous time t in [0, 1]; at time t each token is masked independently with probability
  1 - alpha_t. Schedules: ``linear`` alpha_t = 1 - t (MD4's default and the paper's text8 runs)
  and ``cosine`` alpha_t = 1 - cos(pi/2 * (1 - t)).
- The continuous-time ELBO (negative, in nats per token) is
  E_t [ w(t) * sum over masked positions of -log p(x_n | z_t) ] / T with
  w(t) = -alpha'_t / (1 - alpha_t): 1/t for the linear schedule, (pi/2) tan(pi/2 (1 - t)) for
  the cosine one. Divided by ln 2 it is bits per token (bits per character on text8).
- t is drawn stratified over the batch (one uniform offset, the batch spread evenly over the
  range; MD4's antithetic sampling), which lowers the variance of the ELBO estimate, and kept
  above ``T_MIN`` where w(t) is finite.
- The prediction never puts mass on [MASK]: the loss reads the logits of the data tokens only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dbprofile.vocabulary import MASKING_SCHEDULES

SCHEDULES = MASKING_SCHEDULES
DEFAULT_SCHEDULE = MASKING_SCHEDULES[0]

T_MIN = 1e-4
"""Smallest time drawn: w(t) = 1/t grows without bound at t = 0, where nothing is masked."""

BITS_PER_NAT = 1 / math.log(2)


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown masking schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")


def alpha(t: torch.Tensor, schedule: str = DEFAULT_SCHEDULE) -> torch.Tensor:
    """The probability that a token is still clean at time t."""
    check_schedule(schedule)
    if schedule == "linear":
        return 1 - t
    return 1 - torch.cos(math.pi / 2 * (1 - t))


def elbo_weight(t: torch.Tensor, schedule: str = DEFAULT_SCHEDULE) -> torch.Tensor:
    """w(t) = -alpha'_t / (1 - alpha_t), the weight of a masked token's cross-entropy in the ELBO."""
    check_schedule(schedule)
    if schedule == "linear":
        return 1 / t
    return math.pi / 2 * torch.tan(math.pi / 2 * (1 - t))


def sample_times(
    n: int, lo: float = 0.0, hi: float = 1.0, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """(n,) times in [lo, hi], stratified: one uniform offset, the n samples spread evenly over the range."""
    offset = torch.rand((1,), generator=generator, device=generator.device if generator else None)
    u = (offset.to(device) + torch.arange(n, device=device) / n) % 1
    return (lo + (hi - lo) * u).clamp(min=T_MIN)


def mask_tokens(
    tokens: torch.Tensor,
    t: torch.Tensor,
    mask_id: int,
    schedule: str = DEFAULT_SCHEDULE,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t, masked): each token replaced by ``mask_id`` with probability 1 - alpha_t of its row's t."""
    u = torch.rand(tokens.shape, generator=generator, device=generator.device if generator else None)
    masked = u.to(tokens.device) < (1 - alpha(t, schedule))[:, None]
    return torch.where(masked, torch.full_like(tokens, mask_id), tokens), masked


def masked_cross_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor, mask_id: int
) -> torch.Tensor:
    """(N,) sum over each sequence's masked positions of -log p(x_n | z_t), over the data tokens
    (ids below ``mask_id``, the last id) only, divided by the sequence length."""
    data_logits = logits[..., :mask_id].float()
    ce = F.cross_entropy(data_logits.flatten(0, 1), tokens.flatten(), reduction="none").view(tokens.shape)
    return (ce * masked).sum(dim=1) / tokens.shape[1]


def elbo_loss(
    logits_of,
    tokens: torch.Tensor,
    mask_id: int,
    schedule: str = DEFAULT_SCHEDULE,
    lo: float = 0.0,
    hi: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sequence masked cross-entropy (N,), t (N,)) for ``logits_of(z_t, t) -> (N, T, V)`` at
    times drawn in [lo, hi]; ``(elbo_weight(t) * ce).mean()`` is MD4's loss in nats per token."""
    t = sample_times(tokens.shape[0], lo, hi, generator, tokens.device)
    z, masked = mask_tokens(tokens, t, mask_id, schedule, generator)
    return masked_cross_entropy(logits_of(z, t), tokens, masked, mask_id), t
