"""Activation offloading (``offload``): the tensors every residual layer saves for the backward go
to host memory (pinned on CUDA) when they are saved, and come back to the device when the backward
needs them, as ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` does around each layer.

Two differences from ``save_on_cpu``, both what a careful implementation does: a saved tensor
that is a parameter (or a view of one, such as a Linear's transposed weight) stays where it is,
since it is resident anyway and copying it would cost the link and a device copy in the backward;
and the host copies are registered with the trainer so the memory tracker leaves them out of the
device's count even when the "device" is the CPU (CPU and fake runs). A tensor returned to the
device is a new device tensor, alive while the backward of the op that saved it runs, as on CUDA.

The step's bytes moved each way are kept in ``last_step_transfer`` (the runner records them):
the planner turns them into link time on the target's host link (dbprofile.gpus)."""

from __future__ import annotations

import torch
from torch import nn

from dbprofile.methods.base import Mark, Trainer, no_mark, to_device
from dbprofile.methods.checkpointing import CheckpointedSegment
from dbprofile.methods.host_memory import HostCopies, storage_key
from dbprofile.spec import Batch, ModelSpec, get_layers, like_stack, set_layers


class ActivationOffload:
    """The saved-tensor hooks: pack to a host copy, unpack to a fresh device tensor."""

    def __init__(self, device: torch.device, host: HostCopies, resident: set[int]) -> None:
        self.device = device
        self.host = host
        self.resident = resident
        """Storage keys that stay put (the parameters')."""
        self.to_host_bytes = 0
        self.to_device_bytes = 0

    def pack(self, tensor: torch.Tensor) -> tuple[bool, torch.Tensor]:
        if tensor.device.type != self.device.type or storage_key(tensor) in self.resident:
            return False, tensor
        copy = self.host.copy_of(tensor)
        self.to_host_bytes += copy.nbytes
        return True, copy

    def unpack(self, packed: tuple[bool, torch.Tensor]) -> torch.Tensor:
        moved, tensor = packed
        if not moved:
            return tensor
        back = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
        back.copy_(tensor, non_blocking=True)
        self.to_device_bytes += back.nbytes
        return back


class OffloadedLayer(CheckpointedSegment):
    """One residual layer whose saved tensors go through ``offload``'s hooks (no recomputation)."""

    def __init__(self, layer: nn.Module, offload: ActivationOffload) -> None:
        super().__init__([layer])
        self._offload = offload  # not a module: plain attribute

    def forward(self, hidden, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self._run(hidden, *args, **kwargs)
        with torch.autograd.graph.saved_tensors_hooks(self._offload.pack, self._offload.unpack):
            return self._run(hidden, *args, **kwargs)


class ActivationOffloadTrainer(Trainer):
    technique = "offload"

    def __init__(self, spec: ModelSpec, model: nn.Module, device: torch.device, **kwargs) -> None:
        super().__init__(spec, model, device, **kwargs)
        self.host = HostCopies(device)
        self.offload = ActivationOffload(device, self.host, {storage_key(p) for p in model.parameters()})
        layers = get_layers(model, spec.layers)
        set_layers(model, spec.layers, like_stack(layers, (OffloadedLayer(layer, self.offload) for layer in layers)))
        self.last_step_transfer: dict[str, int] = {}

    @classmethod
    def create(cls, tech, spec: ModelSpec, device: torch.device, **kwargs) -> ActivationOffloadTrainer:
        trainer = cls(spec, to_device(spec.build(), device), device, **kwargs)
        trainer.technique = tech.name
        return trainer

    def host_resident(self, tensor: torch.Tensor) -> bool:
        return self.host.holds(tensor)

    def step(self, batch: Batch, unit: int | None = None, mark: Mark = no_mark) -> torch.Tensor:
        self.offload.to_host_bytes = self.offload.to_device_bytes = 0
        loss = super().step(batch, unit, mark)
        self.last_step_transfer = {
            "to_host_bytes": self.offload.to_host_bytes,
            "to_device_bytes": self.offload.to_device_bytes,
        }
        return loss
