"""DiffusionBlocks' hand-off for transformers causal LMs (``ModelSpec.position_adapter`` of ``hf:``
causal LMs): the active layers get rotary embeddings, position ids and attention masks for the
S-token layout (dbprofile.sequence_layout), rebuilt with the model's own rotary module; any other
per-position tensor for T tokens refuses DiffusionBlocks with a message."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from dbprofile.sequence_layout import CallRewrite, SequenceLayout

# The per-position arguments transformers' decoder layers take that this adapter rebuilds.
REBUILT = ("attention_mask", "position_embeddings", "position_ids")


def _rotary_module(model: nn.Module) -> nn.Module | None:
    """The model's shared rotary-embedding module (``LlamaRotaryEmbedding`` and kin), if any."""
    return next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)


def _tables_per_type(rotary: nn.Module | None) -> bool:
    """Whether the rotary module makes one table per layer type (Gemma 3 and kin:
    ``rotary_emb(x, position_ids, layer_type)``, sliding and full attention with different bases)."""
    return rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters


def _layer_type(layer: nn.Module, rotary: nn.Module) -> str:
    """The rotary table ``layer`` reads, where ``_tables_per_type``. The type is the layer's own,
    ``config.layer_types[layer_idx]``: under DiffusionBlocks the model's loop indexes its types by
    the position in the active block, which would hand a layer another type's table."""
    from dbprofile.sequence_layout import UnsupportedLayoutError

    types = getattr(getattr(rotary, "config", None), "layer_types", None)
    indices = (getattr(m, "layer_idx", None) for m in layer.modules())
    index = next((i for i in indices if isinstance(i, int)), None)
    if not types or index is None or not 0 <= index < len(types):
        raise UnsupportedLayoutError(
            f"DiffusionBlocks cannot tell which rotary table {type(layer).__name__} reads: its model makes one per "
            "layer type (config.layer_types) and the layer names no layer_idx. e2e and ckpt are unaffected."
        )
    return str(types[index])


def _mask_for(original: torch.Tensor | None, layout: SequenceLayout) -> torch.Tensor | None:
    """The layout's mask in the format the model's attention uses: kept None for plain causal
    when the model masked with ``is_causal`` (SDPA), boolean (True = attend) for SDPA masks,
    additive (0 or the dtype's minimum) for eager attention's float masks."""
    if original is None and layout.allowed is None:
        return None
    allowed = layout.allowed_matrix()[None, None]
    if original is None or original.dtype == torch.bool:
        return allowed
    additive = torch.zeros(allowed.shape, dtype=original.dtype, device=allowed.device)
    return additive.masked_fill(~allowed, torch.finfo(original.dtype).min)


def hf_position_adapter(model: nn.Module, layout: SequenceLayout) -> CallRewrite:
    """The ``position_adapter`` of transformers causal LMs: rebuild ``attention_mask``,
    ``position_embeddings`` (with the model's own rotary module at the layout's positions) and
    ``position_ids`` for the S-token layout. One set of tensors per model call (one rotary table
    per layer type where the model makes one per type), shared by the active layers as the model's
    own forward shares its tables. Any other argument that is a
    per-position tensor for T tokens refuses DiffusionBlocks (sequence_layout.refusal)."""
    # Imported here, not at the top: a model source must not import DiffusionBlocks' layout code at load time.
    from dbprofile.sequence_layout import UnsupportedLayoutError, per_position_arguments, refusal, signature_names

    if layout.allowed is not None and not any("Attention" in type(m).__name__ for m in model.modules()):
        raise UnsupportedLayoutError(
            "DiffusionBlocks cannot run this model faithfully in its concatenated token layout: "
            "its layers mix tokens without attention (a state-space scan, as in Mamba), so there is no mask "
            "to keep each noisy token from reading the clean tokens after it. e2e and ckpt are unaffected; "
            "db:B+interleaved (clean and noisy tokens interleaved under the plain causal order) may apply."
        )
    rotary = _rotary_module(model)
    per_type = _tables_per_type(rotary)  # asked once per model call, not once per layer
    positions = layout.positions[None]
    made: dict[tuple[str, str | None], Any] = {}

    def rebuilt(name: str, value: Any, hidden: torch.Tensor, layer: nn.Module) -> Any:
        if value is None and name != "attention_mask":
            return None
        kind = _layer_type(layer, rotary) if name == "position_embeddings" and per_type and rotary is not None else None
        if (name, kind) not in made:
            if name == "attention_mask":
                made[name, kind] = _mask_for(value, layout)
            elif name == "position_embeddings":
                if rotary is None:
                    raise refusal(type(model).__name__, [(name, list(value[0].shape))], layout.tokens, layout.length)
                tables = getattr(rotary, "rope_type", None)
                if kind is None:
                    made[name, kind] = rotary(hidden, positions)
                elif isinstance(tables, dict) and kind not in tables:
                    made[name, kind] = None  # a layer type without rotary positions (NoPE)
                else:
                    made[name, kind] = rotary(hidden, positions, kind)
            else:
                made[name, kind] = positions
        return made[name, kind]

    def rewrite(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        names = signature_names(layer)
        positional = [names[i] if i < len(names) and names[i] in REBUILT else None for i in range(len(args))]
        # Whatever this adapter does not rebuild must not be a per-position tensor for T tokens.
        left = per_position_arguments(
            tuple(None if name else a for name, a in zip(positional, args, strict=True)),
            {k: v for k, v in kwargs.items() if k not in REBUILT},
            layout.tokens,
            names,
        )
        if left:
            raise refusal(type(model).__name__, left, layout.tokens, layout.length)
        hidden = args[0]
        new_args = tuple(
            a if i == 0 or name is None else rebuilt(name, a, hidden, layer)
            for i, (name, a) in enumerate(zip(positional, args, strict=True))
        )
        new_kwargs = {k: rebuilt(k, v, hidden, layer) if k in REBUILT else v for k, v in kwargs.items()}
        return new_args, new_kwargs

    return rewrite
