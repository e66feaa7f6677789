"""Activation checkpointing: non-reentrant ``torch.utils.checkpoint`` around every residual
layer (``ckpt``) or around k contiguous segments of layers (``ckpt:k``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dbprofile.methods.base import Trainer, to_device
from dbprofile.spec import ModelSpec, get_layers, like_stack, set_layers
from dbprofile.torch_internals import function_modes


def split_contiguous(n: int, parts: int) -> list[range]:
    """n items in ``parts`` contiguous groups whose sizes differ by at most one (larger first)."""
    base, extra = divmod(n, parts)
    groups, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        groups.append(range(start, start + size))
        start += size
    return groups


@contextlib.contextmanager
def _entered(modes: list[torch.overrides.TorchFunctionMode]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        yield


@contextlib.contextmanager
def _recomputing(recompute: contextlib.AbstractContextManager, modes: list) -> Iterator[None]:
    with _entered(modes), recompute:
        yield


def with_same_modes(
    contexts: tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager],
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """A checkpoint's (forward, recomputation) contexts, the recomputation also re-entering the forward's
    torch-function modes: it runs inside backward, where the autograd engine does not carry them, and
    must take the forward's path and save the same tensors. The planner's CUDA emulation is such a
    mode (CUDA's autocast order, the attention kernel a GPU picks: dbprofile.measure)."""
    forward, recompute = contexts
    return forward, _recomputing(recompute, function_modes())


def same_modes_in_recomputation() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for plain checkpointing (with_same_modes around no contexts of its own)."""
    return with_same_modes((contextlib.nullcontext(), contextlib.nullcontext()))


class CheckpointedSegment(nn.Module):
    """Runs a run of layers under one non-reentrant checkpoint; only its input is saved, unless
    ``context_fn`` (selective checkpointing, dbprofile.methods.selective) saves more."""

    def __init__(self, layers: list[nn.Module], context_fn: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.context_fn = context_fn

    def __getattr__(self, name: str):
        # Some models reach into a layer from outside the loop (diffusers' DiT reads
        # transformer_blocks[0].norm1 for its output conditioning); a one-layer segment answers
        # for its layer so such a model still runs checkpointed.
        try:
            return super().__getattr__(name)
        except AttributeError:
            layers = cast(nn.ModuleList, self._modules["layers"])  # set in __init__ (read here without __getattr__)
            if len(layers) == 1:
                return getattr(layers[0], name)
            raise

    def _run(self, hidden, *args, **kwargs):
        for layer in self.layers:
            hidden = layer(hidden, *args, **kwargs)
        return hidden

    def forward(self, hidden, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self._run(hidden, *args, **kwargs)
        context_fn = self.context_fn or same_modes_in_recomputation
        return checkpoint(self._run, hidden, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def checkpoint_layers(
    model: nn.Module, path: str, segments: int | None, context_fn: Callable[[], Any] | None = None
) -> None:
    """Replace the residual layer stack by checkpointed segments (every layer when None)."""
    layers = get_layers(model, path)
    groups = split_contiguous(len(layers), segments or len(layers))
    wrapped = like_stack(layers, (CheckpointedSegment([layers[i] for i in group], context_fn) for group in groups))
    set_layers(model, path, wrapped)


class CheckpointTrainer(Trainer):
    technique = "ckpt"

    @classmethod
    def create(cls, tech, spec: ModelSpec, device: torch.device, **kwargs) -> CheckpointTrainer:
        model = to_device(spec.build(), device)
        checkpoint_layers(model, spec.layers, tech.segments)
        trainer = cls(spec, model, device, **kwargs)
        trainer.technique = tech.name
        return trainer
