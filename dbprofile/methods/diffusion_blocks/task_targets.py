"""What each task's DiffusionBlocks construction needs besides the model: the causal-lm token
layouts (the concatenated layout's mask and positions, the keyword arguments its layers take),
the model's own input embedding (the causal-lm target), the classification label table's
initial scale, whether a classifier has the readout protocol, and small helpers for the
outputs of hooked layers. ``blockwise.py`` builds the block-wise model from them."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from dbprofile.spec import Batch, ModelSpec, SpecError


def first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def replace_first_output(out, new):
    return (new, *out[1:]) if isinstance(out, (tuple, list)) else new


def broadcast_per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, ..., 1) broadcastable against ``like``."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


LABEL_INIT_STD = 0.02
"""Std of the classification label table's initial rows, the authors' N(0, 0.02). The rows
are L2-normalised before use, so the scale only sets how fast AdamW (whose steps are about
lr in size whatever the scale) moves the targets; docs/diffusion_blocks.md has the measured
effect."""


LM_LAYOUTS = ("concatenated", "interleaved")
"""How the causal-lm task lays out clean and noisy tokens (module doc); the first is the default."""


LM_LAYER_KWARGS = ("attn_mask", "positions")
"""Keyword arguments every layer receives in the concatenated layout (docs/diffusion_blocks.md)."""


def concatenated_attention_mask(tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(2T, 2T) boolean mask, True where a query may attend, for [clean_0..T-1, noisy_0..T-1]:
    clean tokens are causal among themselves, noisy token i sees clean tokens 0..i and itself."""
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(2 * tokens, 2 * tokens, dtype=torch.bool, device=device)
    mask[:tokens, :tokens] = causal
    mask[tokens:, :tokens] = causal
    mask[tokens:, tokens:] = torch.eye(tokens, dtype=torch.bool, device=device)
    return mask


def concatenated_positions(tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(2T,) position ids [0..T-1, 0..T-1]: noisy token i sits at the position of the token it predicts from."""
    return torch.arange(tokens, device=device).repeat(2)


def accepts_keywords(fn, names: tuple[str, ...]) -> bool:
    """True when ``fn`` takes every keyword in ``names`` (or **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return True
    given = {p.name for p in params}
    return all(name in given for name in names)


def find_input_embedding(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """The model's own token embedding, (vocabulary x d): ``get_input_embeddings()`` when the
    model has it (Hugging Face and the built-in GPT), else its only ``nn.Embedding`` with
    ``num_classes`` rows. DiffusionBlocks builds the causal-lm target from it."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        table = getter()
        if isinstance(getattr(table, "weight", None), torch.Tensor):
            return table
    candidates = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.num_embeddings == spec.num_classes]
    if len(candidates) == 1:
        return candidates[0]
    found = "none" if not candidates else f"{len(candidates)}"
    raise SpecError(
        f"Task 'causal-lm' of {spec.name!r}: DiffusionBlocks builds its noisy targets from the model's own "
        f"token embedding, but the model has no get_input_embeddings() and {found} nn.Embedding with "
        f"num_classes={spec.num_classes} rows. Add a get_input_embeddings() method returning the token "
        "embedding module, or set ModelSpec.num_classes to the vocabulary size."
    )


def has_readout(model: nn.Module) -> bool:
    """True for a classifier with the readout protocol: ``features(inputs, cls=...)`` -> (N, d)
    and a linear ``head`` (the built-in ViT)."""
    features = getattr(model, "features", None)
    head = getattr(model, "head", None)
    return callable(features) and isinstance(head, nn.Linear) and accepts_keywords(features, ("cls",))


def check_batch(task: str, name: str, batch: Batch) -> None:
    """Raise SpecError when the batch of model ``name`` does not fit the conventions of ``task``
    (docs/protocol.md)."""
    if "inputs" not in batch:
        raise SpecError(f"The batch of {name!r} has no 'inputs'; ModelSpec.batch must return a dict with 'inputs'.")
    if task == "denoising":
        if not batch["inputs"].is_floating_point():
            raise SpecError(
                f"Task 'denoising' of {name!r} needs floating-point clean data in batch['inputs']; got "
                f"{batch['inputs'].dtype}. Use task='classification' or 'causal-lm' for discrete data."
            )
        return
    if task == "masked-diffusion-lm":
        tokens = batch["inputs"]
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dim() != 2:
            raise SpecError(
                f"Task 'masked-diffusion-lm' of {name!r} needs integer tokens of shape (N, T) in batch['inputs']; "
                f"got {tokens.dtype} of shape {list(tokens.shape)}. Fix ModelSpec.batch."
            )
        return
    targets = batch.get("targets")
    want = "(N,)" if task == "classification" else "(N, T)"
    ndim = 1 if task == "classification" else 2
    if targets is None or targets.is_floating_point() or targets.is_complex() or targets.dim() != ndim:
        got = "no 'targets'" if targets is None else f"{targets.dtype} targets of shape {list(targets.shape)}"
        raise SpecError(
            f"Task {task!r} of {name!r} needs integer class ids of shape {want} in batch['targets']; the "
            f"batch has {got}. Fix ModelSpec.batch, or set ModelSpec.task to the task that matches the "
            "targets (continuous targets: 'denoising')."
        )
