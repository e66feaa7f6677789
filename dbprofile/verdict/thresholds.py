"""The verdict's thresholds, named and documented (docs/verdict.md gives each one's source),
and the paper's quality figures the quality rule quotes (METHOD.md)."""

from __future__ import annotations

NOT_NEEDED_HEADROOM = 0.1
"""e2e fits with at least this share of the capacity free: no memory technique is needed. Below it a
fit is not safe: the allocator's reserved-over-allocated overhead ranged 2% to 35% on an H100
(median 11%, which the plan already adds), so a prediction within 10% of the capacity can run out."""


ACTIVATION_BOUND_SHARE = 0.5
"""Activations (tensors saved for backward) at least this share of the e2e peak: activation-bound,
the memory DiffusionBlocks cuts."""


STATE_BOUND_SHARE = 0.5
"""Parameters + buffers + gradients + optimizer state at least this share of the e2e peak:
state-bound, memory plain DiffusionBlocks keeps resident."""


MIN_SAVING_FRACTION = 0.2
"""With no target capacity to fit, DiffusionBlocks must cut the e2e peak by at least this fraction to
be worth a new training method."""


COMPUTE_MARGIN = 0.1
"""DiffusionBlocks must train a sample with at least this fraction fewer FLOPs than checkpointing to
be preferred to it. FLOPs count matmuls, convolutions and attention only; the element-wise work
DiffusionBlocks adds (AdaLN modulate and gate products in every layer) and its smaller per-step
batches of work are not in them, so a smaller lead is not a reliable time saving."""


LOW_RISK_MAX_BLOCKS = 3
"""B <= 3 matched or beat B=1 in every ablation of the paper (ImageNet FID 9.90/11.11 vs 12.09,
CIFAR-10 FID 35.47/38.03 vs 39.83, LM1B MAUVE best at B=3-4)."""


HIGH_RISK_MIN_BLOCKS = 6
"""B >= 6 was worse than B=1 on both image ablations (ImageNet FID 14.43 vs 12.09, CIFAR-10 53.32 vs
39.83): high quality risk. B=4-5 is elevated: better on ImageNet, worse on CIFAR-10 (45.43)."""


MAX_RATIO_NOISE = 0.2
"""A measured time ratio is quoted only when the two timings' interquartile ranges, each relative to
its median, add up to at most this: a ratio's relative spread is about the sum of its parts'."""


# METHOD.md, "Quality vs B": the paper's ablations (L = 24 layers).
QUALITY_ABLATIONS: dict[str, dict[int, float]] = {
    "ImageNet FID": {1: 12.09, 2: 9.90, 3: 11.11, 4: 11.90, 6: 14.43},
    "CIFAR-10 FID": {1: 39.83, 2: 35.47, 3: 38.03, 4: 45.43, 6: 53.32},
    "LM1B MAUVE": {2: 0.61, 3: 0.65, 4: 0.67, 6: 0.62},
}


# METHOD.md, "Quality reported": DiffusionBlocks vs end-to-end on the paper's tasks.
QUALITY_REPORTED = {
    "classification": "ViT CIFAR-100 accuracy 59.30% vs 60.25% end-to-end, Tiny-ImageNet 36.16% vs 35.32%",
    "denoising": "DiT CIFAR-10 FID 30.59 vs 32.84 end-to-end, ImageNet-256 FID 9.00 vs 9.01",
    "causal-lm": "AR LM1B MAUVE 0.71 vs 0.50 end-to-end, OpenWebText MAUVE 0.82 vs 0.85",
    "masked-diffusion-lm": "MD4 text8 1.45 bits per character vs 1.56 end-to-end (lower is better)",
}


STATE = ("parameters", "buffers", "gradients", "optimizer_state")
