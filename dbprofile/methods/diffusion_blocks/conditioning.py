"""Sigma conditioning for DiffusionBlocks: the sigma embedder and AdaLN-Zero wrappers that
make a user's residual layers noise-level aware without changing how they are called.

The block-wise model computes one conditioning vector per sample each step
(``SigmaEmbedder(c_noise)``) and stores it in a shared ``ConditioningContext``; every
wrapped layer reads it from there, so layers keep taking one tensor argument (extra
positional and keyword arguments still reach the wrapped layer). Two wrappers exist:

- ``AdaLNZeroBlock`` (native) for pre-norm transformer blocks with ``norm1``, ``attn``,
  ``norm2``, ``mlp`` (the built-in ViT/GPT blocks, and look-alikes): a zero-initialised
  Linear(cond -> 6d) gives shift/scale/gate for both branches (``modulation_of``),
  ``h = x + g1*attn(norm1(x)*(1+a1)+b1); out = h + g2*mlp(norm2(h)*(1+a2)+b2)`` (DiT's form).
- ``GenericAdaLNZero`` for any other residual layer ``f(x) = x + delta(x)``: a
  zero-initialised Linear(cond -> 3d) gives shift/scale/gate and
  ``x_mod = x*(1+scale)+shift; out = x + gate*(layer(x_mod) - x_mod)``, i.e. the layer's
  input is modulated and its residual delta is gated.

With the zero init every wrapped layer starts as the identity (gate 0), as AdaLN-Zero does.
The modulation is the authors' ``AdaLN``: SiLU(Linear(SiLU(cond))), a SiLU on the output as
well as on the input (DiT has only the input one), so shift, scale and gate stay above
-0.278; docs/diffusion_blocks.md, "Sigma conditioning".
"""

from __future__ import annotations

from typing import Protocol, cast

import torch
from torch import nn

from dbprofile.models.common import sinusoidal_features
from dbprofile.spec import SpecError

NATIVE_PARTS = ("norm1", "attn", "norm2", "mlp")


class NativeBlock(Protocol):
    """What ``is_native_block`` checks a layer has: the four sub-modules of a pre-norm block."""

    norm1: nn.Module
    attn: nn.Module
    norm2: nn.Module
    mlp: nn.Module


EMBEDDER_INIT_STD = 0.02
"""Std of the sigma embedder's Linear weights (biases zero), as the authors' ``_init_dit``."""


class SigmaEmbedder(nn.Module):
    """c_noise (N,) -> conditioning (N, cond_dim): sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, cond_dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        first, second = nn.Linear(frequency_dim, cond_dim), nn.Linear(cond_dim, cond_dim)
        for linear in (first, second):
            nn.init.normal_(linear.weight, std=EMBEDDER_INIT_STD)
            nn.init.zeros_(linear.bias)
        self.mlp = nn.Sequential(first, nn.SiLU(), second)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_features(c_noise.reshape(-1), self.frequency_dim)
        first = cast(nn.Linear, self.mlp[0])  # the Sequential built in __init__ starts with a Linear
        return self.mlp(features.to(first.weight.dtype))


class ConditioningContext:
    """Holds the current step's conditioning (N, cond_dim); set by the block-wise model."""

    def __init__(self) -> None:
        self.cond: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self.cond is None:
            raise RuntimeError(
                "A sigma-conditioned layer ran without conditioning: call it through the "
                "DiffusionBlocks block-wise model, which sets the noise level first."
            )
        return self.cond


def zero_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def modulation_of(linear: nn.Linear, cond: torch.Tensor) -> torch.Tensor:
    """The authors' AdaLN modulation of the conditioning: SiLU(Linear(SiLU(cond))). Zero at
    zero init, like DiT's Linear(SiLU(cond)), but bounded below by -0.278."""
    return nn.functional.silu(linear(nn.functional.silu(cond)))


def _per_sample(mod: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N, k) -> (N, 1, ..., 1, k) so it broadcasts over the middle dims of ``like``."""
    return mod.reshape(mod.shape[0], *([1] * (like.dim() - 2)), mod.shape[-1])


def _check_shape(out: torch.Tensor, x: torch.Tensor, layer: nn.Module) -> None:
    if out.shape != x.shape:
        raise SpecError(
            f"Layer {type(layer).__name__} maps shape {list(x.shape)} to {list(out.shape)}: it is not "
            "shape-preserving, so it is not a residual layer (h + f(h)). DiffusionBlocks needs every layer "
            "in ModelSpec.layers to keep the hidden shape; move projections and heads out of that ModuleList."
        )


def is_native_block(layer: nn.Module) -> bool:
    """True for a pre-norm block whose parameters all live in norm1/attn/norm2/mlp (the
    built-in ResidualBlock, and look-alikes whose other children hold no parameters)."""
    if not all(isinstance(getattr(layer, name, None), nn.Module) for name in NATIVE_PARTS):
        return False
    for name, child in layer.named_children():
        if name not in NATIVE_PARTS and any(True for _ in child.parameters()):
            return False
    return not any(True for _ in layer.parameters(recurse=False))


class AdaLNZeroBlock(nn.Module):
    """Native AdaLN-Zero around a pre-norm block's own norm1/attn/norm2/mlp (DiT's layer).

    Extra arguments are passed to ``attn`` (the only sub-module that might take a mask)."""

    def __init__(self, layer: nn.Module, hidden_size: int, cond_dim: int, context: ConditioningContext) -> None:
        super().__init__()
        self.layer = layer
        self.modulation = zero_linear(cond_dim, 6 * hidden_size)
        self.context = context

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mods = _per_sample(modulation_of(self.modulation, self.context.get()), x)
        b1, a1, g1, b2, a2, g2 = mods.to(x.dtype).chunk(6, dim=-1)
        layer = cast(NativeBlock, self.layer)  # wrap_layer chose this wrapper because is_native_block(layer)
        attn_out = layer.attn(layer.norm1(x) * (1 + a1) + b1, *args, **kwargs)
        _check_shape(attn_out, x, self.layer)
        h = x + g1 * attn_out
        return h + g2 * layer.mlp(layer.norm2(h) * (1 + a2) + b2)


class GenericAdaLNZero(nn.Module):
    """AdaLN-Zero for any residual layer: modulate its input, gate its residual delta."""

    def __init__(self, layer: nn.Module, hidden_size: int, cond_dim: int, context: ConditioningContext) -> None:
        super().__init__()
        self.layer = layer
        self.modulation = zero_linear(cond_dim, 3 * hidden_size)
        self.context = context

    def forward(self, x: torch.Tensor, *args, **kwargs):
        mods = _per_sample(modulation_of(self.modulation, self.context.get()), x)
        shift, scale, gate = mods.to(x.dtype).chunk(3, dim=-1)
        x_mod = x * (1 + scale) + shift
        out = self.layer(x_mod, *args, **kwargs)
        # Layers that return (hidden, extras...) (Hugging Face style) keep their extras.
        rest = None
        if isinstance(out, (tuple, list)):
            out, rest = out[0], tuple(out[1:])
        _check_shape(out, x, self.layer)
        result = x + gate * (out - x_mod)
        return result if rest is None else (result, *rest)

    def __getattr__(self, name: str):
        # A model's forward may read plain attributes of its layers (ModernBERT reads each
        # layer's ``attention_type`` to pick its mask): the wrapped layer answers for it.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer":
                raise
            return getattr(self.layer, name)


def wrap_layer(layer: nn.Module, hidden_size: int, cond_dim: int, context: ConditioningContext) -> nn.Module:
    """The AdaLN-Zero wrapper that fits ``layer``: native for pre-norm blocks, generic otherwise."""
    cls = AdaLNZeroBlock if is_native_block(layer) else GenericAdaLNZero
    return cls(layer, hidden_size, cond_dim, context)


def default_cond_dim(hidden_size: int) -> int:
    """Width of the conditioning vector: d/6 as the reference code uses (so each layer's
    Linear(c -> 6d) costs about d^2 parameters), but at least 32 for small models."""
    return max(32, hidden_size // 6)
