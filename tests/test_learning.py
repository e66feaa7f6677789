"""DiffusionBlocks really learns: a short version of examples/learning_check.py (the built-in
tiny ViT on scikit-learn's digits, B=2, one block per step, clipping at 1.0), with the
accuracy read through the Euler chain and every block beating its zero-initialised self;
and examples/generation_check.py's plumbing (train, sample every class, score)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str = "learning_check"):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diffusion_blocks_learns_digits_at_two_blocks():
    check = _example()
    threads = torch.get_num_threads()
    # One thread: the figures below were measured so (examples/learning_check.py --threads 1),
    # and two threads on a shared 2-core machine spin against the other jobs.
    torch.set_num_threads(1)
    try:
        trainer, accuracy, seconds, block_losses = check.train("db:2", STEPS, batch_size=64, seed=0)
    finally:
        torch.set_num_threads(threads)
    # The first block classifies the images inside its training range (93.3% at sigma 10 in the
    # measured run, 91.4% at sigma_max = 80 where the chain asks it; e2e reaches 96.9%), and the
    # chain follows it (91.1%): docs/diffusion_blocks.md#learning-check. Under a constant learning
    # rate (the authors' main.py default) the chain reached only 78.1%.
    assert trainer.first_block_accuracy[10.0] >= 0.88, trainer.first_block_accuracy
    assert accuracy >= 0.85, f"db:2 reached {accuracy:.1%} after {STEPS} steps ({seconds:.0f} s)"
    assert len(block_losses) == 2
    for block, (trained, zero_init) in enumerate(block_losses):
        assert trained < zero_init, f"block {block} did not learn: {trained:.4f} vs zero-init {zero_init:.4f}"


STEPS = 2000  # B x 1000 block-steps, as examples/learning_check.py trains db:B (B times e2e's steps).


@pytest.mark.parametrize("technique", ["e2e", "db:2"])
def test_generation_check_samples_each_requested_class(technique):
    check = _example("generation_check")
    trainer, _, _ = check.train(technique, 2, batch_size=8)
    labels = torch.arange(10)
    images = check.generate(trainer, labels, levels=4)
    assert images.shape == (10, 1, 8, 8) and torch.isfinite(images).all()
    train_x, train_y, test_x, test_y = check.digits()
    assert (len(train_y), len(test_y)) == (1437, 360)


def test_cosine_schedule_follows_the_authors_recipe():
    check = _example()
    steps, peak = 1000, 1e-3
    lrs = [check.learning_rate(i, steps, peak, "cosine") for i in range(steps)]
    # linear warm-up over 1% of the steps (their 3900 of ~391,000), then a half cosine to 10%
    assert lrs[0] == pytest.approx(peak / 10) and lrs[9] == pytest.approx(peak)
    assert lrs[10] == pytest.approx(peak)
    assert lrs[10 + 495] == pytest.approx(0.1 * peak + 0.9 * peak * 0.5 * (1 + math.cos(math.pi * 495 / 990)))
    assert lrs[-1] == pytest.approx(0.1 * peak, rel=1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert {check.learning_rate(i, steps, peak, "constant") for i in range(steps)} == {peak}
