"""A tiny residual classifier that follows the ModelSpec contract, for fast measurement tests.

Pre-norm residual layers (LayerNorm -> Linear -> GELU -> Linear, added back) over a short
token sequence; logits are read from token 0 as the classification contract says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dbprofile.spec import ModelSpec


class ToyLayer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ToyNet(nn.Module):
    def __init__(self, width: int, depth: int, classes: int, features: int) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.blocks = nn.ModuleList(ToyLayer(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)
        self.register_buffer("scale", torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) * self.scale
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)[:, 0])


def toy_spec(
    width: int = 32,
    depth: int = 4,
    tokens: int = 8,
    classes: int = 10,
    features: int = 12,
    fail: str | None = None,
    name: str = "toy",
) -> ModelSpec:
    """fail='raise' makes the loss raise; fail='nan' makes it NaN."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return ToyNet(width, depth, classes, features)

    def batch(batch_size: int, device) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(batch_size)
        inputs = torch.randn(batch_size, tokens, features, generator=gen).to(device)
        targets = torch.randint(0, classes, (batch_size,), generator=gen).to(device)
        return {"inputs": inputs, "targets": targets}

    def loss(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        if fail == "raise":
            raise ValueError("toy model refuses to run")
        out = F.cross_entropy(model(b["inputs"]), b["targets"])
        if fail == "nan":
            out = out * float("nan")
        return out

    return ModelSpec(
        name=name,
        build=build,
        batch=batch,
        loss=loss,
        layers="blocks",
        task="classification",
        num_classes=classes,
        hidden_size=width,
    )
