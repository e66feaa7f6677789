"""The sequence a DiffusionBlocks causal-LM step runs its active layers on, and the hand-off of
per-position tensors (rotary tables, 4-D attention masks) to those layers.

The causal-LM construction runs the active layers on S = 2T tokens (clean and noisy tokens of a
T-token batch). Models that compute per-position tensors once, outside their layers, and pass
them to every layer (Hugging Face Llama's ``position_embeddings`` and causal mask) hand the
layers tensors for T tokens. A ``SequenceLayout`` says, for each of the S tokens, which position
it stands for and which tokens it may attend to; a model's ``position_adapter``
(``ModelSpec.position_adapter``, docs/protocol.md) turns that into the arguments its layers
expect. The layout is the construction's to define (interleaved today); adapters never assume it.

Without an adapter, ``guard_rewrite`` checks each active layer's extra arguments and refuses
DiffusionBlocks with one paragraph when one of them is a per-position tensor for T tokens, so a
model is never run with positions or a mask that do not match its sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CallRewrite = Callable[[nn.Module, tuple, dict], tuple[tuple, dict]]
"""``rewrite(layer, args, kwargs) -> (args, kwargs)``: the arguments one active layer is called
with (as the model's forward passed them, hidden state first), rewritten for the layout.
``layer`` is the user's own layer (inside any AdaLN or checkpoint wrapper), so its signature
names the positional arguments."""


class UnsupportedLayoutError(RuntimeError):
    """A model's layers receive per-position tensors the DiffusionBlocks sequence cannot be
    matched with. Raised during a DiffusionBlocks step, so only that technique fails: e2e and
    ckpt measure as usual."""


@dataclass(frozen=True)
class SequenceLayout:
    """Where each of the S tokens the active layers run on stands, for a T-token batch."""

    tokens: int
    """T: the batch's sequence length (what the model's forward computed its tensors for)."""
    positions: torch.Tensor
    """(S,) int64: the token position (0..T-1) each element of the S-token sequence stands for;
    rotary embeddings and position ids are taken at these positions."""
    allowed: torch.Tensor | None = None
    """(S, S) bool, True where query i may attend to key j; None means plain causal over the S
    tokens, which the model's own causal masking already gives (so a model that masks with
    ``is_causal`` keeps its fast kernel)."""

    @property
    def length(self) -> int:
        """S: the number of tokens the active layers run on."""
        return int(self.positions.shape[0])

    def allowed_matrix(self) -> torch.Tensor:
        """(S, S) bool: ``allowed``, or the plain causal (lower-triangular) matrix."""
        if self.allowed is not None:
            return self.allowed
        s = self.length
        return torch.ones(s, s, dtype=torch.bool, device=self.positions.device).tril()

    @classmethod
    def interleaved(cls, tokens: int, device: torch.device | str) -> SequenceLayout:
        """[c_0, n_0, c_1, n_1, ...] under plain causal masking: both the clean token c_i and the
        noisy target n_i stand at position i (n_i = c_in*z_i + c_i carries c_i's position)."""
        positions = torch.arange(tokens, device=device).repeat_interleave(2)
        return cls(tokens=tokens, positions=positions, allowed=None)

    @classmethod
    def concatenated(cls, tokens: int, allowed: torch.Tensor, positions: torch.Tensor) -> SequenceLayout:
        """[c_0..c_{T-1}, n_0..n_{T-1}] under the modified causal mask ``allowed`` (the paper's layout;
        dbprofile.methods.diffusion_blocks.blockwise builds the mask and the positions)."""
        return cls(tokens=tokens, positions=positions, allowed=allowed)


def per_position_arguments(args: tuple, kwargs: dict, tokens: int, names: list[str]) -> list[tuple[str, list[int]]]:
    """(name, shape) of every extra tensor argument (not the hidden state) with a dimension of
    ``tokens`` among its last two: a position table, position ids or a mask for T tokens."""
    found = []
    items = [(names[i] if i < len(names) else f"argument {i}", a) for i, a in enumerate(args) if i > 0]
    items += list(kwargs.items())
    for name, value in items:
        tensors = value if isinstance(value, (tuple, list)) else (value,)
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and tokens in tuple(t.shape[-2:]):
                found.append((name, list(t.shape)))
    return found


def refusal(model_name: str, found: list[tuple[str, list[int]]], tokens: int, length: int) -> UnsupportedLayoutError:
    """The one paragraph that refuses DiffusionBlocks for a model whose layers take per-position
    tensors dbprofile cannot rebuild for the DiffusionBlocks sequence."""
    what = ", ".join(f"{name} {shape}" for name, shape in found)
    return UnsupportedLayoutError(
        f"DiffusionBlocks cannot run {model_name!r} faithfully: its forward computes per-position "
        f"tensors for {tokens} tokens outside its layers and passes them in ({what}), while a causal-LM "
        f"DiffusionBlocks step runs the layers on {length} tokens (clean and noisy). Running it anyway "
        "would pair tokens with the wrong positions or mask. e2e and ckpt are unaffected. To profile "
        "DiffusionBlocks, compute these tensors inside the layers from the hidden state's length, or give "
        "the ModelSpec a position_adapter that rebuilds them for the layout (docs/protocol.md)."
    )


def signature_names(layer: nn.Module) -> list[str]:
    """The names of ``layer.forward``'s parameters, in order (positional arguments by name)."""
    import inspect

    try:
        return list(inspect.signature(layer.forward).parameters)
    except (TypeError, ValueError):
        return []


def guard_rewrite(model_name: str, layout: SequenceLayout) -> CallRewrite:
    """The rewrite used when a model has no position adapter: pass the arguments through, but
    refuse (UnsupportedLayoutError) when an extra argument is a per-position tensor for T tokens."""

    def rewrite(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        found = per_position_arguments(args, kwargs, layout.tokens, signature_names(layer))
        if found:
            raise refusal(model_name, found, layout.tokens, layout.length)
        return args, kwargs

    return rewrite


def install_rewrite(runners: list[nn.Module], inner: list[nn.Module], rewrite: CallRewrite) -> list[Any]:
    """Forward pre-hooks on the active runners (what the model's forward calls) that rewrite
    each call's arguments with ``rewrite``. Hooking the runner, not the inner layer, means a
    checkpointed layer saves and replays the rewritten arguments. Returns the hook handles."""

    def make(layer: nn.Module):
        def hook(_module, args, kwargs):
            return rewrite(layer, args, kwargs)

        return hook

    return [runner.register_forward_pre_hook(make(layer), with_kwargs=True) for runner, layer in zip(runners, inner)]
