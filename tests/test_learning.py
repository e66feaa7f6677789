"""DiffusionBlocks really learns: a short version of examples/learning_check.py (the built-in
tiny ViT on scikit-learn's digits, B=2, one block per step, clipping at 1.0), with the
accuracy read through the Euler chain and every block beating its zero-initialised self;
and examples/generation_check.py's plumbing (train, sample every class, score)."""

from __future__ import annotations

import importlib.util
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
    torch.set_num_threads(2)
    try:
        trainer, accuracy, seconds, block_losses = check.train("db:2", STEPS, batch_size=64, lr=2e-3, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert accuracy >= 0.80, f"db:2 reached {accuracy:.1%} after {STEPS} steps ({seconds:.0f} s)"
    assert len(block_losses) == 2
    for block, (trained, zero_init) in enumerate(block_losses):
        assert trained < zero_init, f"block {block} did not learn: {trained:.3f} vs zero-init {zero_init:.3f}"


STEPS = 2000  # B x 1000 block-steps, as examples/learning_check.py trains db:B (B times e2e's steps).
# With the authors' readout (final AdaLN, label table N(0, 0.02)) db:2 learns more slowly than our
# earlier readout: 61.7% at 800 steps; at 2000, 72 s on the 2 cores, it passes 80% (2026-11-27).


@pytest.mark.parametrize("technique", ["e2e", "db:2"])
def test_generation_check_samples_each_requested_class(technique):
    check = _example("generation_check")
    trainer, _, _ = check.train(technique, 2, batch_size=8)
    labels = torch.arange(10)
    images = check.generate(trainer, labels, levels=4)
    assert images.shape == (10, 1, 8, 8) and torch.isfinite(images).all()
    train_x, train_y, test_x, test_y = check.digits()
    assert (len(train_y), len(test_y)) == (1437, 360)
