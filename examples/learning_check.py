"""Learning check: does dbprofile's DiffusionBlocks really train?

Trains the built-in tiny ViT (width 64, patch 2; the ``vit-tiny`` preset) at the depth and
dropout of the authors' ViT (12 layers, dropout 0.1 on the embeddings, the attention
probabilities and each branch's output: their ``load_vit``; the preset itself has 6 layers and
no dropout, ``--layers 6 --dropout 0``) on
scikit-learn's digits (8x8 images, shipped with scikit-learn, no download) end-to-end and
with DiffusionBlocks at B=2 and B=3: B times the steps, one block per step, the same
optimizer and schedule for both, the authors' (AdamW, peak lr 1e-3, weight decay 0.01,
gradient clipping at 1.0, the README's cosine schedule with warm-up: SCHEDULES). Prints the
test accuracy and wall time of each, the DiffusionBlocks accuracy read through the Euler
chain, and per block its held-out cross-entropy at sigmas of its own range against the same
block reset to zero init (identity), paired (same sigmas and noise) over 8 noise draws per
test image, so a block that learned nothing shows, and the first block's accuracy alone at
sigma 10 (inside its training draws) and 80 (where the chain starts, beyond them). The chain
reads D from the normalised label table (the targets the blocks were trained on); the
accuracy with the raw table, as the authors' sampler reads it, is printed beside it. With
several seeds it prints each seed and the mean per technique: on a 360-image test set one
image is 0.28 points and one seed moves accuracy by points, so compare means.

    python examples/learning_check.py                 # e2e, db:2, db:3, seed 0 (about 35 min, one thread)
    python examples/learning_check.py --seeds 0,1,2   # the README's table: 3 seeds and their means
    python examples/learning_check.py --steps 1000 --schedule constant   # shorter, the authors' main.py schedule
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from dbprofile.measure.stack import spec_at_depth
from dbprofile.methods import make_trainer
from dbprofile.methods.diffusion_blocks import predict_classes
from dbprofile.methods.diffusion_blocks.sampler import held_out_block_losses
from dbprofile.models.common import GeluMLP, SelfAttention
from dbprofile.models.registry import PRESETS
from dbprofile.models.vit import ViT
from dbprofile.spec import ModelSpec
from dbprofile.techniques import parse_technique


def digits(device: str = "cpu", test_size: int = 360, seed: int = 0):
    """(train_x, train_y, test_x, test_y): images (N, 1, 8, 8) scaled to [-1, 1], fixed split."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    x, y = x[order], y[order]
    return x[test_size:].to(device), y[test_size:].to(device), x[:test_size].to(device), y[:test_size].to(device)


LR = 1e-3
"""The authors' default peak learning rate (``main.py --lr``)."""
SCHEDULES = ("cosine", "constant")
"""``cosine``: the authors' README recipe "with learning rate scheduler" (``--scheduler_type
cosine_with_min_lr``): linear warm-up over WARMUP_SHARE of the steps (their 3900 of about
391,000, times B for DiffusionBlocks), then a half cosine from the peak down to MIN_LR_SHARE
of it (their 5e-4 -> 5e-5). ``constant``: their ``main.py`` default (``constant_with_warmup``
with no warm-up steps)."""
WARMUP_SHARE = 0.01
MIN_LR_SHARE = 0.1
WEIGHT_DECAY = 0.01
"""The authors' AdamW weight decay (``main.py --weight_decay``), on every parameter."""
STEPS = 3000
"""End-to-end steps of the default run (about 130 epochs of the 1437 training images at batch 64);
DiffusionBlocks gets B times as many. At 1000 the first block has not yet learned to classify at
sigma_max = 80, where the chain asks it (docs/diffusion_blocks.md#learning-check)."""
AUTHORS_LAYERS = 12
AUTHORS_DROPOUT = 0.1
"""The authors' CIFAR ViT (``vit.py`` ``load_vit``): 12 layers, ``hidden_dropout_prob`` and
``attention_probs_dropout_prob`` 0.1, end-to-end and DiffusionBlocks alike. Their width (128) is
not taken: 8x8 digits are smaller than CIFAR, and the width-64 preset keeps a seed near half an hour."""
DRAWS = 8
"""Noise draws per test image for the per-block held-out losses."""
PROBE_SIGMAS = (10.0, 80.0)
"""Where the first block alone is scored: 10, above which its training draws hold 0.3% of
its mass, and 80 = sigma_max, where the Euler chain starts and its draws hold none."""


def learning_rate(step: int, steps: int, peak: float, schedule: str) -> float:
    """The learning rate of 0-based ``step`` of ``steps`` under ``schedule`` (SCHEDULES)."""
    if schedule == "constant":
        return peak
    warmup = max(1, round(WARMUP_SHARE * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    floor = MIN_LR_SHARE * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def with_dropout(spec: ModelSpec, p: float) -> ModelSpec:
    """``spec`` whose ViT trains with dropout ``p`` (ViTConfig.dropout: embeddings, attention
    probabilities, each branch's output; the authors' ViT uses 0.1), end-to-end and DiffusionBlocks
    alike: the modules read their ``dropout`` at every forward."""
    build = spec.build

    def build_with_dropout() -> torch.nn.Module:
        model = build()
        for module in model.modules():
            if isinstance(module, (ViT, SelfAttention, GeluMLP)):
                module.dropout = p
        return model

    return dataclasses.replace(spec, build=build_with_dropout)


@torch.no_grad()
def first_block_accuracy(model, inputs: torch.Tensor, targets: torch.Tensor, sigma: float, seed: int = 0) -> float:
    """Test accuracy of block 0 (the highest-noise block) alone at one sigma, z = x0 + sigma*eps.
    At sigma >= 10 the noisy label carries almost nothing: this is the block classifying the
    image, which is what the chain's first level asks of it."""
    model.eval()
    try:
        generator = torch.Generator().manual_seed(seed)
        x0 = F.normalize(model.label_embedding, dim=-1)[targets]
        z = x0 + sigma * torch.randn(x0.shape, generator=generator)
        sigmas = torch.full((len(targets),), sigma)
        logits = model.classification_logits(inputs, z, sigmas, model.block_layers[0])
        return float((logits.argmax(dim=-1) == targets).float().mean())
    finally:
        model.train()


def train(
    technique: str,
    steps: int,
    batch_size: int = 64,
    lr: float = LR,
    seed: int = 0,
    weight_decay: float = WEIGHT_DECAY,
    draws: int = DRAWS,
    schedule: str = SCHEDULES[0],
    layers: int | None = None,
    dropout: float = 0.0,
    **db_options,
):
    """Train one technique on digits; returns (trainer, test accuracy, seconds, block losses).
    For DiffusionBlocks the accuracy is the Euler chain's with the normalised label table;
    ``trainer.raw_table_accuracy`` holds it with the raw rows (the authors' sampler) and
    ``trainer.first_block_accuracy`` block 0's alone at each of ``PROBE_SIGMAS``."""
    torch.manual_seed(seed)
    spec = PRESETS["vit-tiny"]()
    if layers is not None:
        spec = spec_at_depth(spec, layers)
    if dropout:
        spec = with_dropout(spec, dropout)
    tech = parse_technique(technique)
    if tech.is_diffusion_blocks:
        from dbprofile.methods.diffusion_blocks import DiffusionBlocksTrainer

        trainer = DiffusionBlocksTrainer.create(tech, spec, "cpu", lr=lr, seed=seed, **db_options)
    else:
        trainer = make_trainer(tech, spec, torch.device("cpu"), lr=lr)
    # dbprofile's AdamW has no weight decay (memory does not depend on it); the check uses the
    # authors' 0.01 on every parameter, end-to-end and DiffusionBlocks alike.
    for group in trainer.optimizer.param_groups:
        group["weight_decay"] = weight_decay
    train_x, train_y, test_x, test_y = digits()
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for index in range(steps):
        for group in trainer.optimizer.param_groups:
            group["lr"] = learning_rate(index, steps, lr, schedule)
        idx = torch.randint(len(train_y), (batch_size,), generator=gen)
        trainer.step({"inputs": train_x[idx], "targets": train_y[idx]})
    seconds = time.perf_counter() - start
    block_losses = None
    if tech.is_diffusion_blocks:
        pred = predict_classes(trainer.model, test_x, generator=torch.Generator().manual_seed(seed))
        raw = predict_classes(trainer.model, test_x, generator=torch.Generator().manual_seed(seed), table="raw")
        trainer.raw_table_accuracy = float((raw == test_y).float().mean())
        trainer.first_block_accuracy = {
            s: first_block_accuracy(trainer.model, test_x, test_y, s, seed) for s in PROBE_SIGMAS
        }
        block_losses = held_out_block_losses(
            trainer.model, {"inputs": test_x, "targets": test_y}, seed=seed, draws=draws
        )
    else:
        trainer.model.eval()
        with torch.no_grad():
            pred = trainer.model(test_x).argmax(dim=-1)
    accuracy = float((pred == test_y).float().mean())
    return trainer, accuracy, seconds, block_losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="e2e,db:2,db:3", help="comma-separated techniques")
    parser.add_argument(
        "--steps", type=int, default=STEPS, help="end-to-end steps; db:B gets B times as many (module doc)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=LR, help="peak AdamW learning rate (the authors' 1e-3)")
    parser.add_argument(
        "--schedule", choices=SCHEDULES, default=SCHEDULES[0], help="learning-rate schedule (module doc)"
    )
    parser.add_argument(
        "--weight-decay", type=float, default=WEIGHT_DECAY, help="AdamW weight decay (the authors' 0.01)"
    )
    parser.add_argument("--draws", type=int, default=DRAWS, help="noise draws per test image for the block losses")
    parser.add_argument("--weighting", default=None, help="reference | per-sample | none (default: the library's)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (data order, noise, block choice)")
    parser.add_argument(
        "--label-init-std",
        type=float,
        default=None,
        help="std of the label table's initial rows (default: the authors' 0.02)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--layers",
        type=int,
        default=AUTHORS_LAYERS,
        help="residual layers of the ViT (the authors' 12; the preset has 6)",
    )
    parser.add_argument(
        "--dropout",
        type=float,
        default=AUTHORS_DROPOUT,
        help="ViT dropout in training (the authors' 0.1; the preset: 0)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {"weighting": args.weighting} if args.weighting else {}
    if args.label_init_std is not None:
        options["label_init_std"] = args.label_init_std
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    techniques = [t.strip() for t in args.runs.split(",") if t.strip()]
    accuracies: dict[str, list[float]] = {t: [] for t in techniques}
    total = time.perf_counter()
    for seed in seeds:
        for technique in techniques:
            tech = parse_technique(technique)
            steps = args.steps * (tech.blocks if tech.is_diffusion_blocks else 1)
            trainer, accuracy, seconds, block_losses = train(
                technique,
                steps,
                args.batch_size,
                args.lr,
                seed,
                args.weight_decay,
                args.draws,
                args.schedule,
                args.layers,
                args.dropout,
                **(options if tech.is_diffusion_blocks else {}),
            )
            accuracies[technique].append(accuracy)
            extra = ""
            if tech.is_diffusion_blocks:
                extra = f", raw-table chain {100 * trainer.raw_table_accuracy:.1f}%"
            print(f"seed {seed} {technique}: {100 * accuracy:.1f}% ({seconds:.0f} s, {steps} steps{extra})", flush=True)
            if tech.is_diffusion_blocks:
                probe = ", ".join(f"sigma {s:g}: {100 * a:.1f}%" for s, a in trainer.first_block_accuracy.items())
                print(f"  block 0 alone (image only): {probe}", flush=True)
            for block, (trained, zero) in enumerate(block_losses or []):
                verdict = "learned" if trained < zero else "NOT LEARNED"
                print(f"  block {block}: held-out CE {trained:.3g} vs zero-init {zero:.3g} ({verdict})", flush=True)
    if len(seeds) > 1:
        for technique, values in accuracies.items():
            each = ", ".join(f"{100 * v:.1f}" for v in values)
            print(
                f"mean {technique}: {100 * sum(values) / len(values):.1f}% over seeds {args.seeds} ({each})", flush=True
            )
    print(f"total: {time.perf_counter() - total:.0f} s", flush=True)


if __name__ == "__main__":
    main()
