"""Pieces the built-in model families share: the pre-norm residual block (the structure
DiffusionBlocks' AdaLN-Zero wrapper relies on), multi-head self-attention on
``scaled_dot_product_attention`` with optional RoPE and grouped-query heads, the two MLP
kinds, sinusoidal features, deterministic building and counting on the ``meta`` device.

Everything here is plain PyTorch; a family file (vit.py, dit.py, gpt.py) reads top to
bottom with these as its vocabulary.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    """A pre-norm transformer layer: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    The attribute names and this exact forward are a contract: DiffusionBlocks' native
    AdaLN-Zero wrapper re-uses ``norm1``, ``attn``, ``norm2`` and ``mlp`` and inserts the
    modulation around them. A layer takes ONE tensor; anything else (RoPE) is computed inside.
    """

    def __init__(self, norm1: nn.Module, attn: nn.Module, norm2: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.norm1 = norm1
        self.attn = attn
        self.norm2 = norm2
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class RotaryCache:
    """cos/sin tables for rotary position embeddings, computed from the runtime sequence length.

    One instance is shared by every attention layer of a model (a plain attribute, not a
    submodule, so it holds no parameters and moves nowhere). Sharing matters for memory: the
    autograd graph saves cos/sin for backward in every layer, and one shared table is one
    tensor instead of one per layer. Tables are kept by (length, device, dtype, tensor type), so a
    DiffusionBlocks pass at twice the context length simply adds a second entry and fake-tensor runs
    never receive real tables (or the reverse).

    The cache holds its tables by weak reference: a table lives as long as something uses it (the
    layers of one forward, and the autograd graph that saved it, until the backward is done), so the
    first layer of each step makes it and the step frees it, as a model that computes its tables once
    per forward (Hugging Face's Llama) does. A table kept between steps would be state that a first
    step makes, which the planner's warm-up without steps cannot make (dbprofile.measure.warmup).
    Small either way (Llama-2-7B at 8192 tokens in bf16: 2 x 8192 x 128 x 2 bytes = 4 MiB).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension; got {head_dim}.")
        self.head_dim = head_dim
        self.theta = theta
        self._tables: dict[tuple, tuple[weakref.ref[torch.Tensor], weakref.ref[torch.Tensor]]] = {}

    def __call__(self, like: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each (length, head_dim), on ``like``'s device and dtype."""
        device, dtype = like.device, like.dtype
        key = (length, device, dtype, type(like))
        kept = self._tables.get(key)
        if kept is not None:
            cos, sin = kept[0](), kept[1]()
            if cos is not None and sin is not None:
                return cos, sin
        # Frequencies theta^(-2i/d), i = 0..d/2-1, as in RoFormer and Llama; float32 for accuracy.
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim
        inv_freq = self.theta**-exponents
        angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim), "rotate half" layout
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        # Tables made under inference_mode cannot be saved for backward later: don't share them.
        if not torch.is_inference_mode_enabled():
            self._tables[key] = (weakref.ref(cos), weakref.ref(sin))
        return cos, sin

    def __deepcopy__(self, memo: dict) -> RotaryCache:
        # A copied model gets its own empty cache (tables are cheap to rebuild).
        return RotaryCache(self.head_dim, self.theta)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (N, heads, T, head_dim) by the angles in cos/sin (T, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class SelfAttention(nn.Module):
    """Multi-head self-attention: fused QKV projection, SDPA, output projection.

    ``num_kv_heads < num_heads`` gives grouped-query attention (K/V heads shared by groups
    of query heads, handled by SDPA's ``enable_gqa`` without copying K/V). ``rotary`` adds
    RoPE to queries and keys; ``causal`` masks future positions.

    ``dropout`` (in training only): on the attention probabilities (SDPA's ``dropout_p``) and on
    the output projection, as a Hugging Face ViT's ``attention_probs_dropout_prob`` and
    ``hidden_dropout_prob``; 0 (the default) runs no dropout op at all.

    ``forward(x, attn_mask=None, positions=None)``: DiffusionBlocks' concatenated causal-lm
    layout passes a (T, T) boolean ``attn_mask`` (True = may attend), which REPLACES the
    causal mask, and ``positions`` (T,) ids for RoPE. SDPA then runs with an explicit mask,
    which on CUDA rules out the flash kernel (memory-efficient or math kernel instead);
    without them it keeps ``is_causal=True`` and flash attention.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        bias: bool = True,
        causal: bool = False,
        rotary: RotaryCache | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dropout = dropout
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = hidden_size // num_heads
        self.causal = causal
        self.rotary = rotary
        self.qkv = nn.Linear(hidden_size, (num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias)

    def local_heads(self, width: int) -> tuple[int, int]:
        """(query heads, key/value heads) that a qkv output ``width`` wide holds: all of them, or a
        tensor-parallel rank's share (``num_heads / N`` and ``num_kv_heads / N``)."""
        full = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        return self.num_heads * width // full, self.num_kv_heads * width // full

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        n, t, _ = x.shape
        qkv = self.qkv(x)
        # Under tensor parallelism a rank's qkv computes 1/N of the heads (its rows laid out [q | k | v]:
        # dbprofile.methods.tensor_parallel), so the head counts are read from the output's width.
        heads, kv_heads = self.local_heads(qkv.shape[-1])
        q_size, kv_size = heads * self.head_dim, kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(n, t, heads, self.head_dim).transpose(1, 2)
        k = k.view(n, t, kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(n, t, kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            cos, sin = self.rotary(q, t)
            if positions is not None:  # ids below t: gather each token's row of the table
                cos, sin = cos[positions], sin[positions]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        grouped = kv_heads != heads
        extra: dict[str, Any] = {"enable_gqa": True} if grouped else {}
        if self.dropout and self.training:
            extra["dropout_p"] = self.dropout
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, **extra)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **extra)
        return dropout(self.proj(y.transpose(1, 2).reshape(n, t, q_size)), self.dropout, self.training)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout`` in training when ``p`` > 0; otherwise ``x`` itself, with no op (so a model
    without dropout traces exactly as before dropout existed)."""
    return F.dropout(x, p) if p and training else x


class GeluMLP(nn.Module):
    """Linear -> GELU -> Linear (ViT, DiT, GPT-2), then ``dropout`` in training (0: none)."""

    def __init__(
        self, hidden_size: int, ffn_size: int, *, bias: bool = True, approximate: str = "none", dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.dropout = dropout
        self.fc1 = nn.Linear(hidden_size, ffn_size, bias=bias)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(ffn_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self.fc2(self.act(self.fc1(x))), self.dropout, self.training)


class SwiGLU(nn.Module):
    """Llama's gated MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden_size, ffn_size, bias=False)
        self.up = nn.Linear(hidden_size, ffn_size, bias=False)
        self.down = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def sinusoidal_features(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) floats -> (N, dim) [cos | sin] features at geometric frequencies 1 .. 1/max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    angles = values.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """Build a model on the ``meta`` device: shapes only, no memory, any size in milliseconds."""
    with torch.device("meta"):
        return build()


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not); buffers are not counted."""
    return sum(p.numel() for p in model.parameters())
