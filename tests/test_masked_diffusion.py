"""Masked diffusion LMs (MD4) and DiffusionBlocks for them: the masking schedule, its ELBO
weight and the partition of t across blocks, fake bytes equal to real bytes for the preset and
for hf: encoders (which run this task, not next-token loss), the sampler chaining the blocks, and
a tiny learner whose every block beats its zero-initialised self."""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from _cli import assert_refused, invoke

from dbprofile.loading import load_model
from dbprofile.masked_diffusion import alpha, elbo_loss, elbo_weight, mask_tokens
from dbprofile.measure.runner import measure
from dbprofile.methods.diffusion_blocks.blockwise import BlockwiseModel
from dbprofile.methods.diffusion_blocks.masked import block_for_time, block_loss, time_boundaries, time_ranges
from dbprofile.methods.diffusion_blocks.sampler import sample_masked
from dbprofile.models.masked_lm import md4_loss
from dbprofile.models.registry import PRESETS
from dbprofile.results.run import model_info_of
from dbprofile.spec import SpecError


def test_time_is_partitioned_in_equal_ranges_block_zero_most_masked():
    assert time_boundaries(2) == [0.0, 0.5, 1.0]
    assert time_boundaries(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert time_ranges(4, 0.0) == [(0.75, 1.0), (0.5, 0.75), (0.25, 0.5), (0.0, 0.25)]
    # gamma widens each range by gamma x its width at both ends, clipped to [0, 1]
    assert time_ranges(2, 0.05) == [(0.475, 1.0), (0.0, 0.525)]
    assert [block_for_time(t, 2) for t in (1.0, 0.75, 0.5, 0.4999, 0.0)] == [0, 0, 0, 1, 1]
    with pytest.raises(SpecError):
        time_ranges(2, 0.5)


def test_schedules_and_their_elbo_weights():
    t = torch.tensor([0.25, 0.5, 0.8])
    assert torch.allclose(alpha(t, "linear"), 1 - t)
    assert torch.allclose(elbo_weight(t, "linear"), 1 / t)  # -alpha'/(1 - alpha) = 1/t
    assert alpha(torch.tensor([0.0, 1.0]), "cosine").tolist() == pytest.approx([1.0, 0.0], abs=1e-7)
    # the cosine weight against -alpha'/(1 - alpha) by autograd
    tt = t.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(alpha(tt, "cosine").sum(), tt)
    assert torch.allclose(elbo_weight(t, "cosine"), -grad / (1 - alpha(t, "cosine")))
    assert float(elbo_weight(torch.tensor(0.5), "cosine")) == pytest.approx(math.pi / 2)


def test_masking_rate_and_the_elbo_of_a_uniform_guess():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 27, (64, 512), generator=gen)
    z, masked = mask_tokens(tokens, torch.full((64,), 0.3), 27, generator=gen)
    assert float(masked.float().mean()) == pytest.approx(0.3, abs=0.01)
    assert bool((z[masked] == 27).all() and (z[~masked] == tokens[~masked]).all())
    # A model that guesses uniformly over the 27 data tokens: w(t) * (t of the tokens masked) *
    # ln 27 averages to ln 27 nats per token whatever t, the bound of knowing nothing.
    ce, t = elbo_loss(lambda z, _t: torch.zeros(*z.shape, 28), tokens, 27, generator=gen)
    assert float((elbo_weight(t) * ce).mean()) == pytest.approx(math.log(27), rel=0.02)


def test_preset_measures_every_technique_and_fake_bytes_equal_real():
    spec = PRESETS["md4-tiny"]()
    assert (spec.task, spec.num_classes, spec.mask_token_id) == ("masked-diffusion-lm", 28, 27)
    for tech in ("e2e", "ckpt", "db:2", "db:4"):
        real = measure(spec, tech, 2, steps=1, timed=False, count_activations=False)
        fake = measure(spec, tech, 2, steps=1, fake=True, count_activations=False)
        assert real.ok and fake.ok, (tech, real.error, fake.error)
        assert (real.peak_bytes, real.shares) == (fake.peak_bytes, fake.shares), tech


TINY_BERT = {
    "num_hidden_layers": "2",
    "hidden_size": "32",
    "intermediate_size": "64",
    "num_attention_heads": "4",
    "vocab_size": "100",
}


def test_hf_bert_is_a_masked_diffusion_lm_not_a_causal_one():
    pytest.importorskip("transformers")
    spec = load_model("hf:bert", TINY_BERT, seq_len=16)
    assert (spec.task, spec.mask_token_id, spec.layers) == ("masked-diffusion-lm", 99, "model.bert.encoder.layer")
    batch = spec.batch(2, "cpu")
    assert set(batch) == {"inputs"} and int(batch["inputs"].max()) < 99  # no next-token targets
    cosine = load_model("hf:bert", TINY_BERT, seq_len=16, masking_schedule="cosine")
    assert (cosine.masking_schedule, cosine.shapes["seq_len"](8).masking_schedule) == ("cosine", "cosine")
    for tech in ("e2e", "db:2"):
        real = measure(spec, tech, 2, steps=1, timed=False, count_activations=False)
        fake = measure(spec, tech, 2, steps=1, fake=True, count_activations=False)
        assert real.ok and fake.ok, (tech, real.error, fake.error)
        assert (real.peak_bytes, real.shares) == (fake.peak_bytes, fake.shares), tech


def test_sampler_chains_the_blocks_from_fully_masked_to_clean():
    spec = PRESETS["md4-tiny"]()
    model = BlockwiseModel(spec, spec.build(), 2)
    ran = []
    for index in (0, 2):  # the first layer of each block
        model.layers[index].register_forward_hook(lambda *_a, index=index: ran.append(index // 2))
    tokens = sample_masked(model, 2, 16, steps=4, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 16) and int(tokens.max()) < 27 and int(tokens.min()) >= 0
    # steps from t = 1, 0.75, 0.5 (the boundary belongs to the higher-t block) and 0.25
    assert ran == [0, 0, 0, 1]


def test_masking_schedule_reaches_the_loss_the_blocks_and_every_derived_spec():
    linear, cosine = PRESETS["md4-tiny"](), load_model("md4-tiny", masking_schedule="cosine")
    assert (linear.masking_schedule, cosine.masking_schedule) == ("linear", "cosine")
    assert cosine.shapes["seq_len"](32).masking_schedule == "cosine"
    assert cosine.at_depth is not None and cosine.at_depth(2).masking_schedule == "cosine"
    model, batch = cosine.build(), cosine.batch(4, "cpu")

    def seeded_loss(loss, *args):
        torch.manual_seed(0)
        return loss(*args)

    on_cosine = seeded_loss(cosine.loss, model, batch)
    assert torch.equal(on_cosine, seeded_loss(md4_loss, model, batch["inputs"], 27, "cosine"))
    assert not torch.equal(on_cosine, seeded_loss(linear.loss, model, batch))
    # DiffusionBlocks' block loss: the same draws of t, weighted by cosine's ELBO weight
    blocks = BlockwiseModel(cosine, cosine.build(), 2)
    draws = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    block = blocks.loss(batch, 1, draws())
    logits_of = functools.partial(blocks.masked_logits, indices=blocks.block_layers[1])
    want = block_loss(logits_of, batch["inputs"], 27, blocks.ranges[1], blocks.weighting, draws(), schedule="cosine")
    assert torch.equal(block, want)
    assert model_info_of(cosine, 4)["masking_schedule"] == "cosine"


def test_masking_schedule_is_refused_where_it_cannot_apply():
    assert_refused(invoke("run", "vit-tiny", "--fake", "--masking-schedule", "cosine"), "masked diffusion")
    assert_refused(invoke("plan", "md4-tiny", "--masking-schedule", "quadratic"), "quadratic")


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_a_tiny_masked_diffusion_learner_learns_in_every_block():
    """examples/masked_diffusion_check.py, short: every DiffusionBlocks block beats its
    zero-initialised self on held-out text at times of its own range, and the chained model's
    ELBO beats the untrained one's."""
    loaded = importlib.util.spec_from_file_location("masked_diffusion_check", EXAMPLES / "masked_diffusion_check.py")
    check = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(check)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_ids, test = check.split(check.text8_like(), 64)
        untrained, spec, _ = check.train("db:2", 0, 0, train_ids, 64)
        before, _ = check.evaluate("db:2", untrained, spec, test, 0)
        trainer, spec, _ = check.train("db:2", STEPS, 0, train_ids, 64)
        after, blocks = check.evaluate("db:2", trainer, spec, test, 0)
    finally:
        torch.set_num_threads(threads)
    assert after < before - 0.3, (before, after)
    for block, (trained, zero_init) in enumerate(blocks):
        assert trained < zero_init, f"block {block} did not learn: {trained:.4f} vs zero-init {zero_init:.4f}"


STEPS = 200
