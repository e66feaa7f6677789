"""Pins the DiffusionBlocks noise schedule to METHOD.md: boundaries, overlap, sampling,
preconditioning, loss weights and the inference levels."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from dbprofile import edm
from dbprofile.methods.diffusion_blocks import schedule
from dbprofile.spec import SpecError

PAPER_BOUNDARIES = {
    2: [0.002, 0.3012, 80],
    3: [0.002, 0.1796, 0.505, 80],
    4: [0.002, 0.1341, 0.3012, 0.6766, 80],
    6: [0.002, 0.0943, 0.1796, 0.3012, 0.505, 0.9617, 80],
    8: [0.002, 0.0757, 0.1341, 0.2055, 0.3012, 0.4415, 0.6766, 1.1977, 80],
}


@pytest.mark.parametrize("blocks", sorted(PAPER_BOUNDARIES))
def test_equiprobable_boundaries_match_paper(blocks):
    got = [round(b, 4) for b in schedule.equiprobable_boundaries(blocks)]
    assert got == PAPER_BOUNDARIES[blocks]


def test_equiprobable_ranges_hold_equal_mass():
    bounds = schedule.equiprobable_boundaries(5)
    masses = torch.diff(edm.truncated_cdf(torch.tensor(bounds, dtype=torch.float64)))
    assert torch.allclose(masses, torch.full((5,), 0.2, dtype=torch.float64), atol=1e-9)


def test_uniform_log_split_has_equal_log_widths():
    bounds = schedule.uniform_log_boundaries(4)
    widths = [math.log(b) - math.log(a) for a, b in zip(bounds[:-1], bounds[1:])]
    assert bounds[0] == 0.002 and bounds[-1] == 80.0
    assert widths == pytest.approx([math.log(80 / 0.002) / 4] * 4)
    # and it differs from the equi-probability split (the paper's ablation compares the two)
    assert round(bounds[2], 4) == round(math.sqrt(0.002 * 80), 4) != 0.3012


def test_overlap_ranges_for_three_blocks_match_paper():
    ranges = schedule.noise_ranges(3, gamma=0.05)
    got = [(round(lo, 4), round(hi, 4)) for lo, hi in ranges]
    assert got == [(0.002, 0.2249), (0.1706, 0.5318), (0.392, 80.0)]


def test_block_zero_gets_the_highest_noise_range():
    ranges = schedule.block_ranges(3, gamma=0.0)
    assert [(round(lo, 4), round(hi, 4)) for lo, hi in ranges] == [(0.505, 80.0), (0.1796, 0.505), (0.002, 0.1796)]


def test_zero_gamma_gives_the_plain_partition():
    ranges = schedule.noise_ranges(4, gamma=0.0)
    bounds = schedule.equiprobable_boundaries(4)
    assert ranges == list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("gamma", [-0.01, 0.5, 0.7])
def test_gamma_outside_range_is_rejected(gamma):
    with pytest.raises(SpecError, match=r"gamma must lie in \[0, 0.5\)"):
        schedule.noise_ranges(3, gamma=gamma)


@pytest.mark.parametrize("blocks", [0, -2])
def test_block_count_below_one_is_rejected(blocks):
    with pytest.raises(SpecError, match="B >= 1"):
        schedule.equiprobable_boundaries(blocks)


def test_sampled_sigmas_follow_the_truncated_lognormal():
    gen = torch.Generator().manual_seed(1234)
    sigma = edm.sample_sigma(20000, generator=gen)
    assert sigma.shape == (20000,) and sigma.dtype == torch.float32
    assert float(sigma.min()) >= 0.002 and float(sigma.max()) <= 80.0
    result = stats.kstest(sigma.double().numpy(), lambda s: edm.truncated_cdf(torch.from_numpy(s)).numpy())
    assert result.pvalue > 0.01
    # the test has power: the same sigmas are rejected as uniform in log space on [lo, hi]
    wrong = lambda s: (torch.log(torch.from_numpy(s) / 0.002) / math.log(80 / 0.002)).numpy()  # noqa: E731
    assert stats.kstest(sigma.double().numpy(), wrong).pvalue < 1e-6
    # log sigma of the (barely truncated) distribution has mean about P_mean and std about P_std
    logs = sigma.double().log()
    assert abs(float(logs.mean()) - (-1.2)) < 0.03
    assert abs(float(logs.std()) - 1.2) < 0.03


def test_sampled_sigmas_stay_inside_a_block_range_and_follow_its_cdf():
    lo, hi = schedule.noise_ranges(3)[1]
    sigma = edm.sample_sigma(5000, lo, hi, generator=torch.Generator().manual_seed(7))
    assert float(sigma.min()) >= lo * (1 - 1e-6) and float(sigma.max()) <= hi * (1 + 1e-6)
    cdf = lambda s: edm.truncated_cdf(torch.from_numpy(s), lo, hi).numpy()  # noqa: E731
    assert stats.kstest(sigma.double().numpy(), cdf).pvalue > 0.01


def test_sampling_is_reproducible_with_a_seeded_generator():
    a = edm.sample_sigma(8, generator=torch.Generator().manual_seed(3))
    b = edm.sample_sigma(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_edm_preconditioning_values():
    sigma = torch.tensor([0.5, 80.0, 0.002])
    c_skip, c_out, c_in, c_noise = edm.edm_preconditioning(sigma)
    assert c_skip[0] == pytest.approx(0.5) and c_out[0] == pytest.approx(0.5 * 0.5 / math.sqrt(0.5))
    assert c_in[0] == pytest.approx(1 / math.sqrt(0.5))
    assert c_noise.tolist() == pytest.approx([math.log(0.5) / 4, math.log(80) / 4, math.log(0.002) / 4])
    # at tiny sigma D ~ z (c_skip ~ 1, c_out ~ sigma); at huge sigma D ~ sd * F
    assert c_skip[2] == pytest.approx(1.0, abs=2e-5) and c_out[2] == pytest.approx(0.002, rel=1e-4)
    assert c_out[1] == pytest.approx(0.5, rel=1e-4)
    # c_skip^2 s^2 + c_out^2 ... EDM's unit-variance property: var(c_in * z) = 1 for var(x0) = sd^2
    assert (c_in**2 * (sigma**2 + 0.25)).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_loss_weight_matches_method_md():
    w = edm.loss_weight(torch.tensor([80.0, 0.002, 0.5]))
    assert float(w[0]) == pytest.approx(4.0, rel=1e-3)
    assert float(w[1]) == pytest.approx(2.5e5, rel=1e-3)
    assert float(w[2]) == pytest.approx(8.0)


def test_weighting_modes_on_a_hand_made_batch():
    # sigma = 0.5 gives w = 8; sigma = 1 gives w = (1 + 0.25) / 0.25 = 5
    sigma = torch.tensor([0.5, 1.0])
    per_sample = torch.tensor([1.0, 3.0])
    ref = schedule.weighted_loss(per_sample, sigma, "reference")
    per = schedule.weighted_loss(per_sample, sigma, "per-sample")
    none = schedule.weighted_loss(per_sample, sigma, "none")
    assert float(ref) == pytest.approx(6.5 * 2.0)  # mean(w) * mean(loss)
    assert float(per) == pytest.approx((8 * 1 + 5 * 3) / 2)  # mean(w_i * loss_i) = 11.5
    assert float(none) == pytest.approx(2.0)


def test_weighting_reduces_elementwise_losses_per_sample_first():
    sigma = torch.tensor([0.5, 1.0])
    per_element = torch.tensor([[0.0, 2.0], [3.0, 3.0]])  # per-sample means 1 and 3
    assert float(schedule.weighted_loss(per_element, sigma, "per-sample")) == pytest.approx(11.5)


def test_unknown_weighting_is_rejected():
    with pytest.raises(SpecError, match="reference, per-sample, none"):
        schedule.weighted_loss(torch.ones(2), torch.ones(2), "edm")


def test_default_weighting_is_the_reference_codes_except_for_denoising():
    assert schedule.DEFAULT_WEIGHTING == "reference"
    assert schedule.default_weighting("classification") == "reference"
    assert schedule.default_weighting("causal-lm") == "reference"
    # DiT trains with EDM's per-sample weights end-to-end; its DiffusionBlocks run does too
    assert schedule.default_weighting("denoising") == "per-sample"


def test_a_sigma_on_a_block_boundary_runs_the_higher_noise_block():
    bounds = schedule.equiprobable_boundaries(4)  # ascending; block 0 has the highest range
    assert schedule.block_for_sigma(bounds[2], 4) == 1  # [bounds[2], bounds[3]) is block 1
    assert schedule.block_for_sigma(bounds[2] * 0.999, 4) == 2
    assert schedule.block_for_sigma(edm.SIGMA_MAX, 4) == 0
    assert schedule.block_for_sigma(edm.SIGMA_MIN, 4) == 3


def test_inference_levels_match_the_reference():
    assert [round(s, 4) for s in schedule.inference_sigmas(3)] == [80.0, 0.3012, 0.002]
    assert schedule.inference_sigmas(2) == [80.0, 0.002]
    # each level of the B-level chain falls in a different block, in order
    for blocks in (2, 3, 4, 6, 8):
        levels = schedule.inference_sigmas(blocks)
        assert [schedule.block_for_sigma(s, blocks) for s in levels] == list(range(blocks))
