"""Vision Transformer classifier (Dosovitskiy et al., 2021), the family DiffusionBlocks' own
reference code uses: Conv2d patch embedding, a CLS token at position 0, learned position
embeddings, pre-norm blocks, a final LayerNorm and a linear head reading token 0 (or, with ``pooling="mean"``, the mean
of the patch tokens).

``features(images, cls=...)`` is the readout DiffusionBlocks uses (docs/diffusion_blocks.md):
the pooled final-norm features, with ``cls`` (N, d) replacing the learned CLS token BEFORE
the position embeddings are added, as in the authors' code; ``forward`` is
``head(features(images))``.

``make_spec(ViTConfig(...), name=...)`` turns a configuration into a ``ModelSpec`` for the
classification task: the batch is random images and labels from a fixed generator (the
measurement only needs the shapes) and the loss is cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from dbprofile.models.common import GeluMLP, ResidualBlock, SelfAttention, dropout
from dbprofile.seeding import data_generator, seeded
from dbprofile.spec import Batch, ModelSpec

POOLINGS = ("cls", "mean")


@dataclass(kw_only=True)
class ViTConfig:
    """Shape of a ViT classifier."""

    image_size: int = 224
    """Height and width of the (square) input image in pixels."""
    patch_size: int = 16
    """Side of one square patch; image_size must be a multiple of it."""
    channels: int = 3
    """Input image channels."""
    num_classes: int = 1000
    """Classes of the linear head."""
    num_layers: int = 12
    """Residual blocks (the layers DiffusionBlocks partitions)."""
    hidden_size: int = 768
    """Width of the residual stream."""
    num_heads: int = 12
    """Attention heads; hidden_size must be a multiple of it."""
    mlp_ratio: float = 4.0
    """MLP width as a multiple of hidden_size."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon (1e-6 as in the original ViT/timm weights)."""
    pooling: str = "cls"
    """What the head reads: ``cls`` (token 0) or ``mean`` (the mean of the patch tokens)."""
    dropout: float = 0.0
    """Dropout in training on the embeddings, the attention probabilities and each branch's output
    (Hugging Face ViT's ``hidden_dropout_prob`` and ``attention_probs_dropout_prob``; the DiffusionBlocks
    authors train with 0.1). The presets have none."""
    seed: int = 0
    """Seed for the initial weights and the random batch."""

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "channels", "num_classes", "num_layers", "hidden_size", "num_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ViTConfig.{name} must be a positive integer; got {getattr(self, name)!r}.")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig.patch_size={self.patch_size} must divide image_size={self.image_size}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ViTConfig.num_heads={self.num_heads} must divide hidden_size={self.hidden_size}.")
        if self.mlp_ratio <= 0:
            raise ValueError(f"ViTConfig.mlp_ratio must be positive; got {self.mlp_ratio}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ViTConfig.dropout must be in [0, 1); got {self.dropout}.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"ViTConfig.pooling must be one of {', '.join(POOLINGS)}; got {self.pooling!r}.")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def ffn_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


class ViT(nn.Module):
    """Image (N, C, H, W) -> class logits (N, num_classes)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.dropout = config.dropout
        d = config.hidden_size
        # A stride-p convolution with a p x p kernel is exactly "cut into patches, then Linear".
        self.patch_embed = nn.Conv2d(config.channels, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        # One extra position for the CLS token at index 0.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, d))
        self.blocks = nn.ModuleList(
            ResidualBlock(
                nn.LayerNorm(d, eps=config.norm_eps),
                SelfAttention(d, config.num_heads, bias=True, dropout=config.dropout),
                nn.LayerNorm(d, eps=config.norm_eps),
                GeluMLP(d, config.ffn_size, dropout=config.dropout),
            )
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.head = nn.Linear(d, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # N(0, 0.02) for the embeddings and linears, as timm's ViT. timm truncates at +-2,
        # i.e. 100 standard deviations, so a plain normal is the same distribution; it also
        # works under fake tensors, where trunc_normal_'s data-dependent resampling cannot.
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def features(self, images: torch.Tensor, cls: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features after the final norm, (N, d). ``cls`` (N, d) replaces the learned
        CLS token before the position embeddings (DiffusionBlocks puts its noisy target there)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (N, patches, d)
        first = self.cls_token.expand(x.shape[0], -1, -1) if cls is None else cls[:, None, :].to(x.dtype)
        x = torch.cat([first, x], dim=1)
        x = dropout(x + self.pos_embed, self.dropout, self.training)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 0] if self.config.pooling == "cls" else x[:, 1:].mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def make_spec(config: ViTConfig, name: str = "vit", description: str = "") -> ModelSpec:
    """A classification ModelSpec for a ViT of this configuration."""

    def build() -> nn.Module:
        with seeded(config.seed):
            return ViT(config)

    def batch(batch_size: int, device: torch.device | str) -> Batch:
        gen = data_generator(config.seed)
        shape = (batch_size, config.channels, config.image_size, config.image_size)
        images = torch.randn(shape, generator=gen)
        targets = torch.randint(0, config.num_classes, (batch_size,), generator=gen)
        return {"inputs": images.to(device), "targets": targets.to(device)}

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch["inputs"]), batch["targets"])

    return ModelSpec(
        at_depth=lambda layers: make_spec(replace(config, num_layers=layers), name, description),
        name=name,
        build=build,
        batch=batch,
        loss=loss,
        layers="blocks",
        task="classification",
        hidden_size=config.hidden_size,
        num_classes=config.num_classes,
        family="vit",
        description=description
        or f"ViT {config.num_layers}x{config.hidden_size}, patch {config.patch_size}, {config.image_size}px",
        extra={
            "image_size": config.image_size,
            "patch_size": config.patch_size,
            "channels": config.channels,
            "sequence_length": 1 + config.num_patches,
        },
        shapes={"image_size": lambda n: make_spec(replace(config, image_size=n), name=name)},
    )
