"""The named presets: a registry of functions that return a ``ModelSpec``, as DiT's
``DiT_models`` dict does, feeding ``dbprofile models`` and the model argument of the CLI.

Tiny presets (``*-tiny``, ``vit-cifar``) run a real training step on a laptop CPU; the
published ones reproduce the shapes (and parameter counts, within 1%) of well-known models
so the planner can answer for them in fake mode. Counting parameters builds the model on
the ``meta`` device, so even ``llama-7b`` costs no memory.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from typing import Any

from dbprofile.models import dit, gpt, masked_lm, vit
from dbprofile.models.common import build_on_meta, count_parameters
from dbprofile.spec import ModelSpec, SpecError, get_layers

DEFAULT_PRESET = "vit-tiny"


def _vit(name: str, description: str, **shape: Any) -> Callable[[], ModelSpec]:
    return lambda: vit.make_spec(vit.ViTConfig(**shape), name=name, description=description)


def _dit(name: str, description: str, **shape: Any) -> Callable[[], ModelSpec]:
    return lambda: dit.make_spec(dit.DiTConfig(**shape), name=name, description=description)


def _gpt(name: str, description: str, **shape: Any) -> Callable[[], ModelSpec]:
    return lambda: gpt.make_spec(gpt.GPTConfig(**shape), name=name, description=description)


def _md4(name: str, description: str, **shape: Any) -> Callable[[], ModelSpec]:
    config = gpt.GPTConfig(style="llama", vocab_size=masked_lm.TEXT8_VOCAB, **shape)
    return lambda: masked_lm.make_spec(config, name=name, description=description)


# name -> (factory). Published figures quoted in the descriptions are what tests/test_models.py
# checks the meta-device counts against.
PRESETS: dict[str, Callable[[], ModelSpec]] = {
    # Tiny ViT on 8x8 single-channel images with 10 classes: the shape of sklearn's digits,
    # so the same preset serves the default run and the learning checks.
    "vit-tiny": _vit(
        "vit-tiny",
        "tiny ViT, 6x64, 8x8x1 images (digits-shaped), 10 classes; the default",
        image_size=8,
        patch_size=2,
        channels=1,
        num_classes=10,
        num_layers=6,
        hidden_size=64,
        num_heads=4,
    ),
    # The DiffusionBlocks paper's CIFAR ViT: 12 layers, width 128, patch 4. Heads and MLP ratio
    # are not given in METHOD.md; 4 heads of 32 and a 4x MLP are our choice.
    "vit-cifar": _vit(
        "vit-cifar",
        "the DiffusionBlocks paper's CIFAR-100 ViT: 12x128, patch 4, 32x32",
        image_size=32,
        patch_size=4,
        channels=3,
        num_classes=100,
        num_layers=12,
        hidden_size=128,
        num_heads=4,
    ),
    "vit-s16": _vit(
        "vit-s16", "ViT-S/16 at 224px, 1000 classes (22.05M published)", num_layers=12, hidden_size=384, num_heads=6
    ),
    "vit-b16": _vit(
        "vit-b16", "ViT-B/16 at 224px, 1000 classes (86.57M published)", num_layers=12, hidden_size=768, num_heads=12
    ),
    "vit-l16": _vit(
        "vit-l16", "ViT-L/16 at 224px, 1000 classes (304.3M published)", num_layers=24, hidden_size=1024, num_heads=16
    ),
    "dit-tiny": _dit(
        "dit-tiny",
        "tiny DiT, 6x64, 8x8x4 latents, 10 classes",
        input_size=8,
        num_classes=10,
        num_layers=6,
        hidden_size=64,
        num_heads=4,
    ),
    "dit-s2": _dit(
        "dit-s2",
        "DiT-S/2 on 32x32x4 latents (256px), 1000 classes (33M published)",
        num_layers=12,
        hidden_size=384,
        num_heads=6,
    ),
    "dit-b2": _dit(
        "dit-b2",
        "DiT-B/2 on 32x32x4 latents (256px), 1000 classes (130M published)",
        num_layers=12,
        hidden_size=768,
        num_heads=12,
    ),
    "dit-l2": _dit(
        "dit-l2",
        "DiT-L/2 on 32x32x4 latents (256px), 1000 classes (458M published)",
        num_layers=24,
        hidden_size=1024,
        num_heads=16,
    ),
    "dit-xl2": _dit(
        "dit-xl2",
        "DiT-XL/2 on 32x32x4 latents (256px), 1000 classes (675M published)",
        num_layers=28,
        hidden_size=1152,
        num_heads=16,
    ),
    "gpt-tiny": _gpt(
        "gpt-tiny",
        "tiny GPT-2-style LM, 6x64, vocab 256, context 64",
        style="gpt2",
        vocab_size=256,
        context_length=64,
        num_layers=6,
        hidden_size=64,
        num_heads=4,
    ),
    "llama-tiny": _gpt(
        "llama-tiny",
        "tiny Llama-style LM, 6x64, 4 heads / 2 KV heads, vocab 256, context 64",
        style="llama",
        vocab_size=256,
        context_length=64,
        num_layers=6,
        hidden_size=64,
        num_heads=4,
        num_kv_heads=2,
        ffn_size=176,
    ),
    # Masked diffusion LMs (MD4) on text8's character vocabulary (27 + [MASK]). The full-size shape is
    # the GPT-2-small-sized transformer (12 layers, width 768, 12 heads) at sequence length 256 that
    # the text8 diffusion LMs MD4 compares with use; METHOD.md does not give MD4's exact config, so the
    # shape is our reading. Llama-style blocks (RoPE, SwiGLU), bidirectional attention.
    "md4-tiny": _md4(
        "md4-tiny",
        "tiny masked diffusion LM (MD4), 4x64, text8 characters + [MASK], sequence 64",
        context_length=64,
        num_layers=4,
        hidden_size=64,
        num_heads=4,
        ffn_size=176,
    ),
    "md4-text8": _md4(
        "md4-text8",
        "masked diffusion LM (MD4) of the paper's text8 task: 12x768, 12 heads, text8 characters + [MASK], "
        "sequence 256",
        context_length=256,
        num_layers=12,
        hidden_size=768,
        num_heads=12,
    ),
    "gpt2-small": _gpt(
        "gpt2-small",
        "GPT-2 small, 12x768, context 1024 (124.4M published)",
        num_layers=12,
        hidden_size=768,
        num_heads=12,
    ),
    "gpt2-medium": _gpt(
        "gpt2-medium",
        "GPT-2 medium, 24x1024, context 1024 (354.8M published)",
        num_layers=24,
        hidden_size=1024,
        num_heads=16,
    ),
    "gpt2-large": _gpt(
        "gpt2-large",
        "GPT-2 large, 36x1280, context 1024 (774.0M published)",
        num_layers=36,
        hidden_size=1280,
        num_heads=20,
    ),
    "gpt2-xl": _gpt(
        "gpt2-xl", "GPT-2 XL, 48x1600, context 1024 (1557.6M published)", num_layers=48, hidden_size=1600, num_heads=25
    ),
    # TinyLlama-1.1B's shape: 22 layers, 32 query heads sharing 4 KV heads.
    "llama-1b": _gpt(
        "llama-1b",
        "TinyLlama-1.1B shape: 22x2048, GQA 32/4 heads, context 2048 (1.100B published)",
        style="llama",
        vocab_size=32000,
        context_length=2048,
        num_layers=22,
        hidden_size=2048,
        num_heads=32,
        num_kv_heads=4,
        ffn_size=5632,
    ),
    "llama-7b": _gpt(
        "llama-7b",
        "Llama-2-7B shape: 32x4096, context 4096 (6.738B published)",
        style="llama",
        vocab_size=32000,
        context_length=4096,
        num_layers=32,
        hidden_size=4096,
        num_heads=32,
        ffn_size=11008,
    ),
    # Llama-2-70B: 80 layers, 64 query heads sharing 8 KV heads, SwiGLU 28672 (Touvron et al., 2023).
    "llama-70b": _gpt(
        "llama-70b",
        "Llama-2-70B shape: 80x8192, GQA 64/8 heads, FFN 28672, context 4096 (68.977B published)",
        style="llama",
        vocab_size=32000,
        context_length=4096,
        num_layers=80,
        hidden_size=8192,
        num_heads=64,
        num_kv_heads=8,
        ffn_size=28672,
    ),
    # Llama-3-8B: vocabulary 128256, GQA 32/8, FFN 14336, context 8192, RoPE base 500000.
    "llama3-8b": _gpt(
        "llama3-8b",
        "Llama-3-8B shape: 32x4096, GQA 32/8 heads, FFN 14336, vocab 128256, context 8192 (8.030B published)",
        style="llama",
        vocab_size=128256,
        context_length=8192,
        num_layers=32,
        hidden_size=4096,
        num_heads=32,
        num_kv_heads=8,
        ffn_size=14336,
        rope_theta=500000.0,
    ),
}


def _unknown(name: str) -> SpecError:
    close = difflib.get_close_matches(name, list(PRESETS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return SpecError(
        f"Unknown preset {name!r}.{hint} Run `dbprofile models` for the list of presets, "
        "or pass a model file such as examples/vit_custom.py."
    )


def get_preset(name: str) -> ModelSpec:
    """The ModelSpec of a named preset; SpecError with close names when it does not exist."""
    if name not in PRESETS:
        raise _unknown(name)
    return PRESETS[name]()


@functools.cache
def preset_shape(name: str) -> tuple[int, int]:
    """(parameter count, number of residual layers) of a preset, from a meta-device build."""
    spec = get_preset(name)
    model = build_on_meta(spec.build)
    return count_parameters(model), len(get_layers(model, spec.layers, spec.name))


def preset_table() -> list[dict[str, Any]]:
    """One row per preset for ``dbprofile models``; costs no memory (meta-device builds)."""
    rows = []
    for name in PRESETS:
        spec = get_preset(name)
        parameters, layers = preset_shape(name)
        rows.append(
            {
                "name": name,
                "family": spec.family,
                "task": spec.task,
                "parameters": parameters,
                "layers": layers,
                "hidden_size": spec.hidden_size,
                "description": spec.description,
            }
        )
    return rows
