"""EDM's noise and preconditioning math (Karras et al. 2022), shared by the end-to-end DiT
loss (``models/dit.py``) and the DiffusionBlocks method (``methods/diffusion_blocks``): the
truncated log-normal over sigma, the preconditioning coefficients and the loss weight.

Plain tensor arithmetic with no module state, in a module of its own so that ``models/``
and ``methods/`` share one definition of each formula without importing each other.
"""

from __future__ import annotations

import math

import torch

from dbprofile.spec import SpecError

P_MEAN = -1.2
"""Mean of log sigma (EDM default)."""
P_STD = 1.2
"""Standard deviation of log sigma (EDM default)."""
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5


def normal_cdf(x: float) -> float:
    """Standard normal CDF."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def normal_quantile(q: float) -> float:
    return float(torch.special.ndtri(torch.tensor(q, dtype=torch.float64)))


def standardised_log_sigma(sigma: float) -> float:
    return (math.log(sigma) - P_MEAN) / P_STD


def sample_sigma(
    n: int,
    lo: float = SIGMA_MIN,
    hi: float = SIGMA_MAX,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """n sigmas from the log-normal (P_MEAN, P_STD) truncated to [lo, hi], by the CDF method:
    u ~ U(Phi(std(lo)), Phi(std(hi))), sigma = exp(P_MEAN + P_STD * Phi^-1(u)). float32, shape (n,)."""
    if not (0 < lo <= hi):
        raise SpecError(f"sample_sigma needs 0 < lo <= hi; got lo={lo}, hi={hi}.")
    q_lo, q_hi = normal_cdf(standardised_log_sigma(lo)), normal_cdf(standardised_log_sigma(hi))
    # Draw in float64 on the generator's device so a seeded generator gives the same sigmas on
    # every device; the tail probabilities (about 1e-5 at sigma_min) need the precision.
    gen_device = generator.device if generator is not None else (device or "cpu")
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=gen_device)
    q = q_lo + u * (q_hi - q_lo)
    sigma = torch.exp(P_MEAN + P_STD * torch.special.ndtri(q)).clamp(lo, hi)
    return sigma.to(device=device if device is not None else gen_device, dtype=torch.float32)


def truncated_cdf(sigma: torch.Tensor | float, lo: float = SIGMA_MIN, hi: float = SIGMA_MAX) -> torch.Tensor:
    """CDF of the truncated log-normal on [lo, hi] (used by the statistical test of sampling)."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    q_lo, q_hi = normal_cdf(standardised_log_sigma(lo)), normal_cdf(standardised_log_sigma(hi))
    q = torch.special.ndtr((torch.log(s) - P_MEAN) / P_STD)
    return ((q - q_lo) / (q_hi - q_lo)).clamp(0.0, 1.0)


def edm_preconditioning(
    sigma: torch.Tensor, sigma_data: float = SIGMA_DATA
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM's (c_skip, c_out, c_in, c_noise) for D = c_skip*z + c_out*F(c_in*z, c_noise)."""
    sd2 = sigma_data**2
    s2 = sigma**2
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * sigma_data / torch.sqrt(s2 + sd2)
    c_in = 1.0 / torch.sqrt(s2 + sd2)
    c_noise = torch.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2 (4.0 at sigma=80, 2.5e5 at 0.002)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
