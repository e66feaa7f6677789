"""Bytes the residual layers save for backward: one DiffusionBlocks block against the same
sigma-conditioned layers at full depth and against the user's plain model.

The measurement runner records these ratios in ``Measurement.extra`` so a report can show
both comparisons METHOD.md asks for: the B-fold cut holds against the same AdaLN model at
full depth, while against the plain end-to-end model the cut is smaller (AdaLN-Zero saves
its modulate and gate products too; the causal-lm construction doubles the sequence).
Counting uses ``torch.autograd.graph.saved_tensors_hooks`` during a forward pass, only while
a residual layer runs, and counts each storage once; parameters are not activations and
are left out.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from dbprofile.methods.base import to_device
from dbprofile.methods.diffusion_blocks.blockwise import BlockwiseModel
from dbprofile.methods.diffusion_blocks.task_targets import LM_LAYOUTS
from dbprofile.spec import ModelSpec, get_layers


class _SavedBytes:
    """Counts the distinct storages saved for backward while a watched layer runs."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.depth = 0
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.depth > 0:
            storage = tensor.untyped_storage()
            key = storage._cdata  # the StorageImpl: one per storage, defined for fake tensors too
            if key not in self.exclude:
                self.storages[key] = storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    @contextlib.contextmanager
    def watching(self, layers: list[nn.Module]) -> Iterator[None]:
        def enter(_module, _args):
            self.depth += 1

        def leave(_module, _args, _out):
            self.depth -= 1

        # prepend: count from before any other pre-hook until after the layer's own output
        handles = [layer.register_forward_pre_hook(enter, prepend=True) for layer in layers]
        handles += [layer.register_forward_hook(leave, prepend=True) for layer in layers]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            for handle in handles:
                handle.remove()


def _measure(model: nn.Module, layers: list[nn.Module], run: Callable[[], torch.Tensor]) -> int:
    exclude = {p.untyped_storage()._cdata for p in model.parameters()}
    counter = _SavedBytes(exclude)
    with torch.enable_grad(), counter.watching(layers):
        loss = run()
    del loss
    return counter.total


def layer_activation_bytes(
    spec: ModelSpec,
    blocks: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    lm_layout: str = LM_LAYOUTS[0],
) -> dict[str, float | int]:
    """Bytes saved for backward by the residual layers only (causal LMs in ``lm_layout``):

    - ``block_layers_bytes``: the worst block's layers in one DiffusionBlocks step;
    - ``full_depth_adaln_bytes``: the same sigma-conditioned layers run at full depth (same
      task construction, all L layers);
    - ``plain_layers_bytes``: the user's plain model's layers in its end-to-end loss;
    - ``ratio_vs_full_depth_adaln`` and ``ratio_vs_plain_e2e``: block / full-depth, block / plain.
    """
    device = torch.device(device)
    batch = spec.batch(batch_size, device)
    plain_bytes = _plain_bytes(spec, batch, device)
    model = _blockwise(spec, blocks, device, lm_layout)
    per_block = []
    for block in range(blocks):
        layers = [model.layer_runners[i] for i in model.block_layers[block]]
        gen = torch.Generator(device=device).manual_seed(block)
        # partial binds this iteration's block and generator (a lambda with defaults defeats mypy's inference)
        per_block.append(_measure(model, layers, functools.partial(model.loss, batch, block, generator=gen)))
    return activation_ratios_of(max(per_block), _conditioned_bytes(model, batch, device), plain_bytes)


def activation_ratios_of(block: int, full: int, plain: int) -> dict[str, float | int]:
    """``layer_activation_bytes``' answer from its three byte counts."""
    return {
        "block_layers_bytes": block,
        "full_depth_adaln_bytes": full,
        "plain_layers_bytes": plain,
        "ratio_vs_full_depth_adaln": block / full if full else float("nan"),
        "ratio_vs_plain_e2e": block / plain if plain else float("nan"),
    }


def saved_layer_bytes(
    spec: ModelSpec, batch_size: int, device: torch.device | str = "cpu", lm_layout: str = LM_LAYOUTS[0]
) -> tuple[int, int]:
    """(plain, conditioned): bytes the residual layers save for backward in the plain model's loss,
    and in the sigma-conditioned model's loss run through every layer as one block. A DiffusionBlocks
    block of q layers saves what the conditioned model of q layers does (the block's index changes
    its noise range, not a shape), so these two counts, as functions of the depth, give all three of
    ``layer_activation_bytes`` (dbprofile.measure.activation_counts)."""
    device = torch.device(device)
    batch = spec.batch(batch_size, device)
    conditioned = _conditioned_bytes(_blockwise(spec, 1, device, lm_layout), batch, device)
    return _plain_bytes(spec, batch, device), conditioned


def _conditioned_bytes(model: BlockwiseModel, batch: Any, device: torch.device) -> int:
    """Bytes the sigma-conditioned layers save with every layer run as one block (block 0's noise)."""
    gen = torch.Generator(device=device).manual_seed(0)
    everything = list(range(len(model.layers)))
    return _measure(
        model, list(model.layer_runners), lambda: model.loss(batch, 0, generator=gen, layer_indices=everything)
    )


def _plain_bytes(spec: ModelSpec, batch: Any, device: torch.device) -> int:
    # to_device, not .to(): under the runner's fake mode the parameters are fake tensors,
    # which recent PyTorch cannot swap ("_apply(): Couldn't swap Conv2d.weight").
    plain = to_device(spec.build(), device)
    plain_layers = list(get_layers(plain, spec.layers, spec.name))
    return _measure(plain, plain_layers, lambda: spec.loss(plain, batch))


def _blockwise(spec: ModelSpec, blocks: int, device: torch.device, lm_layout: str) -> BlockwiseModel:
    layout: dict[str, Any] = {"lm_layout": lm_layout} if spec.task == "causal-lm" else {}
    return to_device(BlockwiseModel(spec, spec.build(), blocks, **layout), device)
