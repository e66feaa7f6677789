"""Generation check: does dbprofile's DiffusionBlocks train a generative model?

Trains a tiny class-conditional DiT (6 layers, width 64, patch 2) on scikit-learn's digits
(8x8 grey images, shipped with scikit-learn, no download) end-to-end with the EDM loss and
with DiffusionBlocks at B=2 and B=3: B times the steps, one block per step, the same AdamW
settings and gradient clipping at 1.0, EDM's per-sample loss weights in both. Then samples
images of every class with the Euler sampler (the same noise levels for every technique;
DiffusionBlocks runs at each level the block whose range holds it) and scores them with a
digits classifier trained here on the real training images. Prints the classifier's
accuracy on real test images (the ceiling), and per technique the class-conditional
accuracy of its samples (chance is 10%) and its training wall time.

    python examples/generation_check.py                # e2e, db:2, db:3 (under 5 min on 2 shared cores)
    python examples/generation_check.py --runs db:2 --steps 500
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from dbprofile.edm import edm_preconditioning
from dbprofile.methods import make_trainer
from dbprofile.methods.diffusion_blocks import DiffusionBlocksTrainer, inference_sigmas, sample
from dbprofile.methods.diffusion_blocks.sampler import euler_sample
from dbprofile.models import dit
from dbprofile.techniques import parse_technique

TEST_SIZE = 360


def digits(seed: int = 0):
    """(train_x, train_y, test_x, test_y): images (N, 1, 8, 8) scaled to [-1, 1], fixed split."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    x, y = x[order], y[order]
    return x[TEST_SIZE:], y[TEST_SIZE:], x[:TEST_SIZE], y[:TEST_SIZE]


def tiny_dit_spec(seed: int = 0):
    """The tiny DiT on 8x8x1 images: 16 patch tokens of width 64, 10 classes plus the null class."""
    config = dit.DiTConfig(
        input_size=8, in_channels=1, patch_size=2, num_classes=10, num_layers=6, hidden_size=64, num_heads=4, seed=seed
    )
    return dit.make_spec(config, name="dit-digits")


def train_classifier(train_x, train_y, test_x, test_y) -> tuple[LogisticRegression, float]:
    """Multinomial logistic regression on the 64 pixels; returns it and its real test accuracy."""
    classifier = LogisticRegression(max_iter=3000)
    classifier.fit(train_x.flatten(1).numpy(), train_y.numpy())
    return classifier, float(classifier.score(test_x.flatten(1).numpy(), test_y.numpy()))


def train(technique: str, steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0):
    """Train one technique on the digits; returns (trainer, wall seconds, CPU seconds)."""
    torch.manual_seed(seed)
    spec = tiny_dit_spec(seed)
    tech = parse_technique(technique)
    if tech.is_diffusion_blocks:
        trainer = DiffusionBlocksTrainer.create(tech, spec, "cpu", lr=lr, seed=seed)
    else:
        trainer = make_trainer(tech, spec, torch.device("cpu"), lr=lr)
    train_x, train_y, _, _ = digits()
    gen = torch.Generator().manual_seed(seed)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        idx = torch.randint(len(train_y), (batch_size,), generator=gen)
        trainer.step({"inputs": train_x[idx], "labels": train_y[idx]})
    return trainer, time.perf_counter() - start, time.process_time() - cpu


def generate(trainer, labels: torch.Tensor, levels: int, seed: int = 0) -> torch.Tensor:
    """Images (N, 1, 8, 8) of the given classes through the Euler chain over ``levels`` levels."""
    generator = torch.Generator().manual_seed(seed)
    shape = (labels.shape[0], 1, 8, 8)
    if trainer.technique.startswith("db"):
        return sample(trainer.model, shape, labels=labels, steps=levels, generator=generator)
    model = trainer.model
    model.eval()

    def denoise(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma)
        per = (-1, 1, 1, 1)
        return c_skip.view(per) * z + c_out.view(per) * model(c_in.view(per) * z, c_noise, labels)

    with torch.no_grad():
        return euler_sample(denoise, shape, inference_sigmas(levels), generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="e2e,db:2,db:3", help="comma-separated techniques")
    parser.add_argument("--steps", type=int, default=1500, help="end-to-end steps; db:B gets B times as many")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--levels", type=int, default=32, help="Euler noise levels from 80 down to 0.002")
    parser.add_argument("--per-class", type=int, default=20, help="samples per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    total = time.perf_counter()
    train_x, train_y, test_x, test_y = digits()
    classifier, real_accuracy = train_classifier(train_x, train_y, test_x, test_y)
    print(f"digits classifier: {100 * real_accuracy:.1f}% on {TEST_SIZE} real test images", flush=True)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    for technique in [t.strip() for t in args.runs.split(",") if t.strip()]:
        tech = parse_technique(technique)
        steps = args.steps * (tech.blocks if tech.is_diffusion_blocks else 1)
        trainer, seconds, cpu_seconds = train(technique, steps, args.batch_size, args.lr, args.seed)
        images = generate(trainer, labels, args.levels, args.seed).clamp(-1.0, 1.0)
        predicted = torch.from_numpy(classifier.predict(images.flatten(1).numpy()))
        accuracy = float((predicted == labels).float().mean())
        print(
            f"{technique}: samples classified as their class {100 * accuracy:.1f}% "
            f"({len(labels)} samples, {args.levels} levels; training {seconds:.0f} s wall, "
            f"{cpu_seconds:.0f} s CPU, {steps} steps)",
            flush=True,
        )
    print(f"total: {time.perf_counter() - total:.0f} s wall, {time.process_time():.0f} s CPU", flush=True)


if __name__ == "__main__":
    main()
