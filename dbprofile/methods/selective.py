"""Selective activation checkpointing (``sac``, ``sac:alt``): every residual layer runs under a
non-reentrant checkpoint whose policy (``torch.utils.checkpoint.create_selective_checkpoint_contexts``)
saves the outputs of the expensive ops and recomputes the rest in the backward, as torchtitan's
op-level SAC does.

The saved ops (``SAVED_OPS``) are the matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``), every
fused attention kernel PyTorch has (the CPU's ``_scaled_dot_product_flash_attention_for_cpu``; CUDA's
flash, memory-efficient and cuDNN kernels), and convolutions. Attention that falls back to the math
path (dropout on the CPU, an eager ``softmax(QK^T)``) is a ``bmm``, a softmax and a ``bmm``: its two
products are saved and the softmax recomputed. ``sac`` (``sac:all``) saves all of them;
``sac:alt`` recomputes every second matrix product of a layer, in the order the forward runs them,
as torchtitan's policy does (it counts ``mm`` only, since Llama's linears have no bias; dbprofile
counts ``mm`` and ``addmm`` alike, because a Linear with a bias runs ``addmm``). Element-wise ops,
norms and activations are recomputed: the FLOP counter counts none of them, so a ``sac`` step's
counted FLOPs equal e2e's and ``sac:alt``'s add the recomputed products.

The checkpoint keeps what the policy saves in its own cache, out of the saved-tensor hooks' sight;
the trainer therefore tells a listener (the memory tracker) about every output it saves, so those
bytes count as activations, not temporaries. PyTorch before 2.6 calls the policy before the op runs
(no ``op_output``): there the saved outputs stay in the tracker's temporaries share (the peak is the
same)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from dbprofile.methods.base import Trainer, to_device
from dbprofile.methods.checkpointing import checkpoint_layers, with_same_modes
from dbprofile.spec import ModelSpec


def _ops(*names: str) -> frozenset:
    """The default overloads of the aten ops that exist in this PyTorch (attention kernels vary)."""
    found = []
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None and hasattr(packet, "default"):
            found.append(packet.default)
    return frozenset(found)


MATMULS = _ops("mm", "addmm")
"""The products ``sac:alt`` alternates over (a Linear is one of them)."""
SAVED_OPS = MATMULS | _ops(
    "bmm",
    "baddbmm",
    "convolution",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)

SavedListener = Callable[[Any], None]


class SavePolicy:
    """One checkpointed layer call's policy: save the outputs of SAVED_OPS (all of them, or every
    other matmul when ``alternate``), recompute the rest; tell ``listen`` what it saves."""

    def __init__(self, alternate: bool, listen: Callable[[], SavedListener | None]) -> None:
        self.alternate = alternate
        self.listen = listen
        # Forward and (on PyTorch before 2.6) recomputation count apart, so both see the same choices.
        self.matmuls = {False: 0, True: 0}

    def __call__(self, ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if func not in SAVED_OPS:
            return CheckpointPolicy.PREFER_RECOMPUTE
        if func in MATMULS:
            recompute = bool(getattr(ctx, "is_recompute", False))
            self.matmuls[recompute] += 1
            if self.alternate and self.matmuls[recompute] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        listener = self.listen()
        out = getattr(ctx, "op_output", None)
        if listener is not None and out is not None:
            listener(out)
        return CheckpointPolicy.MUST_SAVE


class SelectiveCheckpointTrainer(Trainer):
    technique = "sac"

    saved_output_listener: SavedListener | None = None
    """Set by the memory tracker: called with every op output the policy saves."""

    @classmethod
    def create(cls, tech, spec: ModelSpec, device: torch.device, **kwargs) -> SelectiveCheckpointTrainer:
        model = to_device(spec.build(), device)
        holder: list[SelectiveCheckpointTrainer] = []
        alternate = tech.policy == "alt"

        def contexts():
            policy = SavePolicy(alternate, lambda: holder[0].saved_output_listener if holder else None)
            return with_same_modes(create_selective_checkpoint_contexts(policy))

        checkpoint_layers(model, spec.layers, None, context_fn=contexts)
        trainer = cls(spec, model, device, **kwargs)
        holder.append(trainer)
        trainer.technique = tech.name
        return trainer
