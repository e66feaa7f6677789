"""Training FLOPs per technique (dbprofile.measure.flops and the runner): the counter agrees with
PyTorch's FlopCounterMode, leaves the tracked memory untouched, counts the CPU attention kernel,
and gives each technique's compute per trained sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dbprofile.measure.runner as runner
import dbprofile.measure.steps as measure_steps
from dbprofile.loading import load_spec
from dbprofile.measure.fake import fake_mode
from dbprofile.measure.flops import CPU_ATTENTION_FORMULAS, FlopCounter
from dbprofile.methods import make_trainer
from dbprofile.techniques import parse_techniques


def _step_flops(model: str, technique: str, counter_factory) -> int:
    spec = load_spec(model)
    with fake_mode():
        torch.manual_seed(0)
        trainer = make_trainer(parse_techniques([technique])[0], spec, torch.device("cpu"))
        unit = list(getattr(trainer, "units", [None]))[0]
        batch = spec.batch(2, "cpu")
        counter = counter_factory()
        with counter:
            trainer.step(batch, unit, lambda phase: None)
    return counter.get_total_flops() if isinstance(counter, FlopCounterMode) else counter.total


@pytest.mark.parametrize(
    "model, technique",
    [
        ("vit-tiny", "e2e"),
        ("gpt-tiny", "ckpt"),
        ("llama-tiny", "db:2"),
        ("dit-tiny", "ckpt"),
        ("vit-tiny", "sac"),
        ("gpt-tiny", "sac:alt"),
        ("llama-tiny", "offload"),
    ],
)
def test_counter_totals_equal_pytorchs_flop_counter_mode(model, technique, monkeypatch):
    for formula in CPU_ATTENTION_FORMULAS.values():  # FlopCounterMode must hand them tensors, not shapes
        monkeypatch.setattr(formula, "_get_raw", True, raising=False)
    reference = _step_flops(
        model, technique, lambda: FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FORMULAS)
    )
    assert reference > 0
    assert _step_flops(model, technique, FlopCounter) == reference


def test_fused_cpu_attention_counts_its_matmuls_as_pytorch_does_for_the_cuda_kernels():
    def count(fn) -> int:
        with fake_mode():
            q = torch.randn(2, 4, 16, 8, requires_grad=True)
            with FlopCounter() as counter:
                fn(q).sum().backward()
        return counter.total

    fused = count(lambda q: F.scaled_dot_product_attention(q, q, q))
    explicit = count(lambda q: torch.softmax(q @ q.transpose(-1, -2) / 8**0.5, dim=-1) @ q)
    one_matmul = 2 * (2 * 4) * 16 * 16 * 8  # 2 * (batch * heads) * s * s * d
    # Explicit: Q K^T and P V forward, two matmuls each backward. The fused kernel's backward also
    # recomputes the scores Q K^T, as flash attention does and PyTorch's formula counts.
    assert explicit == 6 * one_matmul
    assert fused == explicit + one_matmul


class _NoCount:
    total = None

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None

    def count(self, *args):  # the tracker feeds its counter every op (Tracker.counting)
        return None


@pytest.mark.parametrize("technique", ["e2e", "ckpt"])
def test_counting_flops_leaves_the_tracked_memory_unchanged(technique, monkeypatch):
    # FlopCounterMode itself changed llama-tiny's peak (it decomposes the fused RMSNorm) and, with its
    # module hooks, checkpointing's: dbprofile's counter must not.
    counted = runner.measure("llama-tiny", technique, 2, fake=True, steps=1)
    monkeypatch.setattr(measure_steps, "FlopCounter", _NoCount)
    uncounted = runner.measure("llama-tiny", technique, 2, fake=True, steps=1)
    assert counted.training_flops and uncounted.training_flops is None
    assert (counted.peak_bytes, counted.shares, counted.peak_phase) == (
        uncounted.peak_bytes,
        uncounted.shares,
        uncounted.peak_phase,
    )


def test_real_and_fake_runs_count_the_same_flops_per_block():
    real = runner.measure("vit-tiny", "db:2", 4, steps=1)
    fake = runner.measure("vit-tiny", "db:2", 4, fake=True, steps=1)
    assert [b.step_flops for b in real.blocks] == [b.step_flops for b in fake.blocks]
    assert real.training_flops == fake.training_flops == sum(b.step_flops for b in real.blocks)


def test_flops_per_sample_do_not_depend_on_the_batch_size():
    small = runner.measure("gpt-tiny", "e2e", 2, fake=True, steps=1)
    large = runner.measure("gpt-tiny", "e2e", 6, fake=True, steps=1)
    assert small.flops_per_sample == large.flops_per_sample
    assert large.training_flops == 3 * small.training_flops


def test_vit_ckpt_and_diffusion_blocks_against_e2e():
    """The same bounds as ViT-B/16's below, on the 6-layer vit-tiny (db:3: B=3 of 6 layers)."""
    per_sample = {
        t: runner.measure("vit-tiny", t, 2, fake=True, steps=1).flops_per_sample for t in ("e2e", "ckpt", "db:3")
    }
    assert 1.2 <= per_sample["ckpt"] / per_sample["e2e"] <= 1.4
    assert 0.95 <= per_sample["db:3"] / per_sample["e2e"] <= 1.2


@pytest.mark.slow
def test_vit_b16_ckpt_and_db4_against_e2e():
    """ViT-B/16 at batch 64 (counted at batch 2: per-sample FLOPs are exactly linear in the batch)."""
    per_sample = {
        t: runner.measure("vit-b16", t, 2, fake=True, steps=1).flops_per_sample for t in ("e2e", "ckpt", "db:4")
    }
    # e2e: 3x a forward of 2 * 17.6 GMACs (timm's published 17.6 "GFLOPs" of ViT-B/16 are MACs).
    assert per_sample["e2e"] == pytest.approx(3 * 2 * 17.6e9, rel=0.01)
    assert 1.2 <= per_sample["ckpt"] / per_sample["e2e"] <= 1.4
    assert 0.95 <= per_sample["db:4"] / per_sample["e2e"] <= 1.2


def test_causal_lm_block_steps_cost_more_than_e2e():
    e2e = runner.measure("gpt-tiny", "e2e", 1, fake=True, steps=1)
    db = runner.measure("gpt-tiny", "db:3", 1, fake=True, steps=1)
    # Each block runs its layers on a doubled sequence and the head in every block-step: every
    # block-step costs more than a third of an e2e step, and the three together more than 2x.
    assert all(b.step_flops > e2e.training_flops / 3 for b in db.blocks)
    assert db.flops_per_sample > 2 * e2e.flops_per_sample
