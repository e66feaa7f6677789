"""A residual model written from scratch, showing the protocol dbprofile needs.

    dbprofile run examples/custom_resmlp.py

The model is a small token-mixing residual MLP for 8x8 grey images (the shape of
scikit-learn's digits): each image row of 8 pixels becomes one token, a learnable CLS token
is prepended at position 0, and N residual layers each compute ``x + mlp(norm(x))``, where
the MLP mixes first across tokens, then across channels. A final norm and a linear head read
token 0. What dbprofile needs from a model like this:

- the residual layers live in ONE ``nn.ModuleList`` (here ``model.layers``) that ``forward``
  loops over, each taking the hidden state (N, tokens, width) and returning the same shape;
- for classification, the logits are read from token 0 (DiffusionBlocks puts its noisy
  target there);
- ``build``, ``batch`` and ``loss`` below, and ``layers="layers"`` naming the ModuleList.
"""

import torch
import torch.nn.functional as F
from torch import nn

from dbprofile import ModelSpec

IMAGE_SIDE = 8  # digits are 8x8 pixels with intensities 0..16
NUM_CLASSES = 10
WIDTH = 64
DEPTH = 6
TOKENS = 1 + IMAGE_SIDE  # CLS + one token per image row


class MixerLayer(nn.Module):
    """x + mlp(norm(x)), the MLP mixing tokens (a Linear over positions) then channels."""

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.token_mix = nn.Linear(tokens, tokens)
        self.channel_mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        h = self.token_mix(h.transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(h)


class ResMLP(nn.Module):
    """Images (N, 1, 8, 8) -> logits (N, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.row_embed = nn.Linear(IMAGE_SIDE, WIDTH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(torch.randn(1, TOKENS, WIDTH) * 0.02)
        self.layers = nn.ModuleList(MixerLayer(TOKENS, WIDTH) for _ in range(DEPTH))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rows = self.row_embed(images.flatten(1, 2))  # (N, 8 rows, WIDTH)
        x = torch.cat([self.cls_token.expand(rows.shape[0], -1, -1), rows], dim=1) + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x)[:, 0])


def build() -> nn.Module:
    torch.manual_seed(0)  # deterministic initial weights
    return ResMLP()


def batch(batch_size: int, device) -> dict[str, torch.Tensor]:
    """Random digits-shaped data from a fixed seed: memory only depends on the shapes."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 17, (batch_size, 1, IMAGE_SIDE, IMAGE_SIDE), generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    return {"inputs": (pixels.float() / 16).to(device), "targets": targets.to(device)}


def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["inputs"]), batch["targets"])


spec = ModelSpec(
    name="custom-resmlp",
    build=build,
    batch=batch,
    loss=loss,
    layers="layers",
    task="classification",
    hidden_size=WIDTH,
    num_classes=NUM_CLASSES,
    description="token-mixing residual MLP on 8x8 digits-shaped images",
    extra={"image_size": IMAGE_SIDE, "sequence_length": TOKENS},
)
