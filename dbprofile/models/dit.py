"""Diffusion Transformer (Peebles & Xie, 2023) as a latent denoiser trained the EDM way.

Patchify the latent, add fixed 2-D sin-cos positions, condition every block on
``c = t_embed(noise_level) + y_embed(label)`` through adaLN-Zero (a zero-initialised
Linear(d -> 6d) giving shift/scale/gate for both branches, so each block starts as the
identity), then a final adaLN layer, a linear projection and unpatchify. The label embedder
has one extra "null" class used by classifier-free guidance; during training 10% of labels
are replaced by it, as in DiT.

``model(x, noise_level, labels)``: ``noise_level`` is EDM's c_noise = ln(sigma)/4, shape (N,).
The output is shaped like ``x`` (the network F of EDM; there is no learned-sigma channel).
The end-to-end loss is EDM training: sigma ~ truncated log-normal, z = x + sigma * eps,
D = c_skip z + c_out F(c_in z, c_noise), loss = mean over samples of w(sigma) * MSE(D, x).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import cast

import torch
from torch import nn

from dbprofile.edm import edm_preconditioning, loss_weight, sample_sigma
from dbprofile.models.common import GeluMLP, SelfAttention, sinusoidal_features
from dbprofile.seeding import data_generator, seeded
from dbprofile.spec import Batch, ModelSpec


@dataclass(kw_only=True)
class DiTConfig:
    """Shape of a DiT latent denoiser."""

    input_size: int = 32
    """Height and width of the latent (32 for 256x256 images through the SD VAE)."""
    in_channels: int = 4
    """Latent channels; the output has the same number (no learned-sigma channels)."""
    patch_size: int = 2
    """Side of one square latent patch; input_size must be a multiple of it."""
    num_classes: int = 1000
    """Class labels; the label embedder holds one more row for the null (unconditional) class."""
    num_layers: int = 28
    """DiT blocks (the layers DiffusionBlocks partitions)."""
    hidden_size: int = 1152
    """Width of the residual stream and of the conditioning vector c."""
    num_heads: int = 16
    """Attention heads; hidden_size must be a multiple of it."""
    mlp_ratio: float = 4.0
    """MLP width as a multiple of hidden_size."""
    class_dropout_prob: float = 0.1
    """Share of training labels replaced by the null class (classifier-free guidance)."""
    frequency_size: int = 256
    """Sinusoidal features of the noise level fed to the timestep MLP."""
    seed: int = 0
    """Seed for the initial weights and the random batch."""

    def __post_init__(self) -> None:
        for name in (
            "input_size",
            "in_channels",
            "patch_size",
            "num_classes",
            "num_layers",
            "hidden_size",
            "num_heads",
            "frequency_size",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"DiTConfig.{name} must be a positive integer; got {getattr(self, name)!r}.")
        if self.input_size % self.patch_size:
            raise ValueError(f"DiTConfig.patch_size={self.patch_size} must divide input_size={self.input_size}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig.num_heads={self.num_heads} must divide hidden_size={self.hidden_size}.")
        # The 2-D sin-cos position table splits the width in four (sin/cos x rows/columns).
        if self.hidden_size % 4:
            raise ValueError(f"DiTConfig.hidden_size={self.hidden_size} must be a multiple of 4.")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"DiTConfig.class_dropout_prob must be in [0, 1); got {self.class_dropout_prob}.")
        if self.mlp_ratio <= 0:
            raise ValueError(f"DiTConfig.mlp_ratio must be positive; got {self.mlp_ratio}.")

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-sample affine of normalised tokens; (1 + scale) so zero modulation is the identity."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_positions(hidden_size: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table (grid_size^2, hidden_size): half the width per axis."""
    coords = torch.arange(grid_size, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    quarter = hidden_size // 4
    per_axis = [sinusoidal_features(axis.reshape(-1), 2 * quarter) for axis in (rows, cols)]
    return torch.cat(per_axis, dim=-1)


class NoiseLevelEmbedder(nn.Module):
    """Noise level (N,) -> sinusoidal features -> Linear -> SiLU -> Linear -> (N, d)."""

    def __init__(self, hidden_size: int, frequency_size: int) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, noise_level: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_features(noise_level, self.frequency_size)
        first = cast(nn.Linear, self.mlp[0])  # the Sequential built in __init__ starts with a Linear
        return self.mlp(features.to(first.weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> (N, d); row ``num_classes`` is the null class for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.table(labels)


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero: both branches are modulated and gated by c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        # No affine in the norms: the per-sample shift/scale from c replaces it.
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = GeluMLP(hidden_size, int(hidden_size * mlp_ratio), approximate="tanh")
        # 6 vectors of width d: shift, scale, gate for attention, then for the MLP.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) -> Linear to patch_size^2 * channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """(x (N, C, H, W), noise_level (N,), labels (N,)) -> F, shaped like x."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.x_embedder = nn.Conv2d(config.in_channels, d, kernel_size=p, stride=p)
        self.t_embedder = NoiseLevelEmbedder(d, config.frequency_size)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
        # Fixed, not learned (as in DiT), so a buffer: it takes no gradient or optimizer state.
        self.register_buffer("pos_embed", sincos_positions(d, config.grid_size).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.num_layers))
        self.final_layer = FinalLayer(d, p, config.in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # DiT's initialisation: Xavier linears, N(0, 0.02) for the label table and timestep MLP,
        # and ZERO for every adaLN modulation and the output layer, so the untrained network
        # is the identity on the residual stream and outputs F = 0.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # The casts name what __init__ built: a Conv2d with its default bias, Linears at
        # positions 0 and 2 of the timestep MLP and last in every adaLN modulation, DiTBlocks.
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(cast(torch.Tensor, self.x_embedder.bias))
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        nn.init.normal_(cast(nn.Linear, self.t_embedder.mlp[0]).weight, std=0.02)
        nn.init.normal_(cast(nn.Linear, self.t_embedder.mlp[2]).weight, std=0.02)
        for block in self.blocks:
            modulation = cast(nn.Linear, cast(DiTBlock, block).adaLN_modulation[-1])
            nn.init.zeros_(modulation.weight)
            nn.init.zeros_(modulation.bias)
        final_modulation = cast(nn.Linear, self.final_layer.adaLN_modulation[-1])
        nn.init.zeros_(final_modulation.weight)
        nn.init.zeros_(final_modulation.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, grid^2, p*p*C) -> (N, C, grid*p, grid*p)."""
        n, g, p, c = tokens.shape[0], self.config.grid_size, self.config.patch_size, self.config.in_channels
        x = tokens.reshape(n, g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, c, g * p, g * p)

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, patches, d)
        c = self.t_embedder(noise_level) + self.y_embedder(labels)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) broadcastable against ``like``."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def edm_loss(model: nn.Module, batch: Batch, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM training loss (Karras et al., 2022) with the per-sample weight w(sigma)."""
    x, labels = batch["inputs"], batch["labels"]
    sigma = sample_sigma(x.shape[0], device=x.device).to(x.dtype)
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, sigma_data=sigma_data)
    z = x + _per_sample(sigma, x) * torch.randn_like(x)
    f = model(_per_sample(c_in, x) * z, c_noise.reshape(-1), labels)
    denoised = _per_sample(c_skip, x) * z + _per_sample(c_out, x) * f
    per_sample_mse = ((denoised - x) ** 2).flatten(1).mean(dim=1)
    return (loss_weight(sigma, sigma_data=sigma_data).reshape(-1) * per_sample_mse).mean()


# Clean latents are random normals scaled to this std, about what SD-VAE latents times 0.18215
# have and equal to EDM's sigma_data, so the preconditioning sees realistic magnitudes.
LATENT_STD = 0.5


def make_spec(config: DiTConfig, name: str = "dit", description: str = "") -> ModelSpec:
    """A denoising ModelSpec for a DiT of this configuration, trained with the EDM loss."""

    def build() -> nn.Module:
        with seeded(config.seed):
            return DiT(config)

    def batch(batch_size: int, device: torch.device | str) -> Batch:
        gen = data_generator(config.seed)
        shape = (batch_size, config.in_channels, config.input_size, config.input_size)
        latents = torch.randn(shape, generator=gen) * LATENT_STD
        labels = torch.randint(0, config.num_classes, (batch_size,), generator=gen)
        return {"inputs": latents.to(device), "labels": labels.to(device)}

    return ModelSpec(
        at_depth=lambda layers: make_spec(replace(config, num_layers=layers), name, description),
        name=name,
        build=build,
        batch=batch,
        loss=edm_loss,
        layers="blocks",
        task="denoising",
        hidden_size=config.hidden_size,
        num_classes=config.num_classes,
        family="dit",
        description=description
        or f"DiT {config.num_layers}x{config.hidden_size}, patch {config.patch_size}, "
        f"{config.input_size}x{config.input_size}x{config.in_channels} latents",
        extra={
            "latent_size": config.input_size,
            "latent_channels": config.in_channels,
            "patch_size": config.patch_size,
            "sequence_length": config.num_patches,
        },
        shapes={"image_size": lambda n: make_spec(replace(config, input_size=n), name=name)},
    )


def published_parameter_count(config: DiTConfig, published: float) -> float:
    """Adjust a parameter count published for DiT to this implementation's layout.

    DiT's published models predict a learned sigma too, so their output Linear has
    2 * in_channels channels per pixel; ours predicts only F (in_channels), which removes
    d * p^2 * C weights + p^2 * C biases (18,448 for DiT-XL/2). DiT also stores its fixed
    position table as a frozen nn.Parameter (patches * d, counted by ``parameters()``),
    which we hold as a buffer; subtract it too.
    """
    d, p, c = config.hidden_size, config.patch_size, config.in_channels
    output_channels_dropped = d * p * p * c + p * p * c
    frozen_positions = config.num_patches * d
    return published - output_channels_dropped - frozen_positions
