"""Decoder-only language models in two styles from one configuration.

``style="gpt2"`` (Radford et al., 2019): LayerNorm with bias, learned absolute positions
added in the stem, GELU MLP 4x, biases everywhere, LM head tied to the token embedding.
``style="llama"`` (Touvron et al., 2023): RMSNorm, rotary positions (RoPE) inside attention,
SwiGLU MLP, no biases, untied LM head, optional grouped-query attention.

Every block is a ``ResidualBlock`` that takes one tensor: RoPE tables are computed inside
attention from the runtime sequence length, because DiffusionBlocks runs the layers on
sequences up to twice the context length (clean and noisy tokens side by side). GPT-2's
learned positions are added once in the stem, for the real tokens only. Attention is
``scaled_dot_product_attention(..., is_causal=True)``, or with an explicit boolean mask and
position ids when DiffusionBlocks' concatenated layout passes ``attn_mask`` and
``positions`` through the layers (``common.SelfAttention``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from dbprofile.models.common import (
    GeluMLP,
    ResidualBlock,
    RotaryCache,
    SelfAttention,
    SwiGLU,
)
from dbprofile.seeding import data_generator, seeded
from dbprofile.spec import Batch, ModelSpec

STYLES = ("gpt2", "llama")


@dataclass(kw_only=True)
class GPTConfig:
    """Shape of a decoder-only language model."""

    style: str = "gpt2"
    """gpt2 (LayerNorm, learned positions, GELU, tied head) or llama (RMSNorm, RoPE, SwiGLU)."""
    vocab_size: int = 50257
    """Vocabulary size (GPT-2's BPE has 50257 tokens)."""
    context_length: int = 1024
    """Tokens per training sequence; also the size of GPT-2's position table."""
    num_layers: int = 12
    """Residual blocks (the layers DiffusionBlocks partitions)."""
    hidden_size: int = 768
    """Width of the residual stream."""
    num_heads: int = 12
    """Query heads; hidden_size must be a multiple of it."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (llama only); None means num_heads."""
    ffn_size: int | None = None
    """MLP inner width; None means 4 * hidden_size (gpt2) or 8/3 * hidden_size rounded up to 256 (llama)."""
    tie_embeddings: bool | None = None
    """Share the token embedding with the LM head; None means True for gpt2, False for llama."""
    norm_eps: float = 1e-5
    """Epsilon of the LayerNorm / RMSNorm layers."""
    rope_theta: float = 10000.0
    """RoPE base frequency (llama only)."""
    causal: bool = True
    """Causal attention (a decoder LM); False attends over the whole sequence (a masked diffusion LM)."""
    seed: int = 0
    """Seed for the initial weights and the random batch."""

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"GPTConfig.style must be one of {', '.join(STYLES)}; got {self.style!r}.")
        for name in ("vocab_size", "context_length", "num_layers", "hidden_size", "num_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer; got {getattr(self, name)!r}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"GPTConfig.num_heads={self.num_heads} must divide hidden_size={self.hidden_size}.")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"GPTConfig.num_kv_heads={self.num_kv_heads} must be a positive divisor of num_heads={self.num_heads}."
            )
        if self.style == "gpt2" and self.num_kv_heads != self.num_heads:
            raise ValueError("GPTConfig.num_kv_heads: grouped-query attention is only offered for style='llama'.")
        if self.style == "llama" and (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"GPTConfig.num_heads: RoPE needs an even head dimension; hidden_size/num_heads = "
                f"{self.hidden_size // self.num_heads}."
            )
        if self.ffn_size is None:
            if self.style == "gpt2":
                self.ffn_size = 4 * self.hidden_size
            else:
                # SwiGLU has three matrices instead of two, so 2/3 of 4d keeps the MLP's parameters
                # equal to a 4d GELU MLP; Llama rounds that up to a multiple of 256.
                self.ffn_size = 256 * math.ceil(8 * self.hidden_size / 3 / 256)
        if self.ffn_size < 1:
            raise ValueError(f"GPTConfig.ffn_size must be positive; got {self.ffn_size}.")
        if self.tie_embeddings is None:
            self.tie_embeddings = self.style == "gpt2"
        if self.norm_eps <= 0:
            raise ValueError(f"GPTConfig.norm_eps must be positive; got {self.norm_eps}.")


class GPT(nn.Module):
    """Tokens (N, T) int64 -> logits (N, T, vocab_size): of the next token (``causal``), or of each
    position's own token read from the whole sequence (``causal=False``, a masked diffusion LM)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        d, llama = config.hidden_size, config.style == "llama"
        if config.ffn_size is None:  # __post_init__ derives it; only a later assignment can undo that
            raise ValueError("GPTConfig.ffn_size is None after construction; set it to a positive integer.")
        ffn_size = config.ffn_size
        self.tok_embed = nn.Embedding(config.vocab_size, d)
        self.pos_embed = None if llama else nn.Embedding(config.context_length, d)
        rotary = RotaryCache(d // config.num_heads, config.rope_theta) if llama else None

        def norm() -> nn.Module:
            return nn.RMSNorm(d, eps=config.norm_eps) if llama else nn.LayerNorm(d, eps=config.norm_eps)

        def block() -> ResidualBlock:
            attn = SelfAttention(
                d,
                config.num_heads,
                num_kv_heads=config.num_kv_heads,
                bias=not llama,
                causal=config.causal,
                rotary=rotary,
            )
            # GPT-2 uses the tanh approximation of GELU ("gelu_new" in its released code).
            mlp = SwiGLU(d, ffn_size) if llama else GeluMLP(d, ffn_size, approximate="tanh")
            return ResidualBlock(norm(), attn, norm(), mlp)

        self.blocks = nn.ModuleList(block() for _ in range(config.num_layers))
        self.norm = norm()
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embed.weight

    def _init_weights(self) -> None:
        # GPT-2's scheme: N(0, 0.02) everywhere, and the projections that write into the
        # residual stream scaled by 1/sqrt(2L) because 2L of them add up along the depth.
        residual_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            # block() in __init__ builds every layer: SelfAttention, then SwiGLU (llama) or GeluMLP (gpt2).
            attn, mlp = cast(SelfAttention, block.attn), cast("SwiGLU | GeluMLP", block.mlp)
            nn.init.normal_(attn.proj.weight, std=residual_std)
            out = mlp.down if isinstance(mlp, SwiGLU) else mlp.fc2
            nn.init.normal_(out.weight, std=residual_std)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (Hugging Face's name): DiffusionBlocks' causal-lm target table."""
        return self.tok_embed

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.tok_embed(tokens)
        if self.pos_embed is not None:
            if t > self.config.context_length:
                raise ValueError(
                    f"GPT-2 style model got {t} tokens; its learned positions cover context_length="
                    f"{self.config.context_length}."
                )
            x = x + self.pos_embed(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def make_spec(config: GPTConfig, name: str = "gpt", description: str = "") -> ModelSpec:
    """A causal-lm ModelSpec: random tokens from a fixed generator, next-token cross-entropy."""

    def build() -> nn.Module:
        with seeded(config.seed):
            return GPT(config)

    def batch(batch_size: int, device: torch.device | str) -> Batch:
        gen = data_generator(config.seed)
        # T + 1 tokens so that targets are the inputs shifted by one position.
        tokens = torch.randint(0, config.vocab_size, (batch_size, config.context_length + 1), generator=gen)
        inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        return {"inputs": inputs.to(device), "targets": targets.to(device)}

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch["inputs"])
        return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())

    style = "GPT-2" if config.style == "gpt2" else "Llama"
    return ModelSpec(
        at_depth=lambda layers: make_spec(replace(config, num_layers=layers), name, description),
        name=name,
        build=build,
        batch=batch,
        loss=loss,
        layers="blocks",
        task="causal-lm",
        hidden_size=config.hidden_size,
        num_classes=config.vocab_size,
        family="gpt",
        description=description
        or f"{style}-style LM {config.num_layers}x{config.hidden_size}, context {config.context_length}",
        extra={
            "style": config.style,
            "sequence_length": config.context_length,
            "vocab_size": config.vocab_size,
            "num_kv_heads": config.num_kv_heads,
            "tie_embeddings": config.tie_embeddings,
        },
        shapes={"seq_len": lambda n: make_spec(replace(config, context_length=n), name=name)},
    )
