"""The contract between a training technique and the measurement runner.

A ``Trainer`` owns one model prepared for one technique and its optimizer, and runs one
training step in named phases, calling ``mark(phase)`` at each phase boundary so the
tracker can say when the peak happened. ``units`` lists what the runner must measure
separately: ``[None]`` for end-to-end techniques, the block indices for DiffusionBlocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from dbprofile.settings import optimizer_parts, resolve_optimizer, unknown_optimizer, unknown_precision
from dbprofile.spec import Batch, ModelSpec, SpecError
from dbprofile.torch_internals import optimizer_scalar_reads

# Every technique clips the gradient norm at 1.0: DiffusionBlocks needs it (METHOD.md), and
# applying it everywhere keeps the per-step work (and its temporaries) comparable.
GRAD_CLIP_NORM = 1.0

Mark = Callable[[str], None]


def no_mark(_phase: str) -> None:
    return None


def make_optimizer(
    name: str, params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], lr: float = 1e-3
) -> torch.optim.Optimizer:
    """AdamW (default), SGD with momentum, or Adafactor, in the implementation ``name`` names
    ('adamw-fused'; dbprofile.settings.resolve_optimizer makes a bare 'adamw' explicit for the device;
    left bare, PyTorch picks by the parameters' device). ``params``: parameters, or parameter groups."""
    items: list[Any] = list(params)  # parameters or groups, as torch.optim takes them
    algorithm, implementation = optimizer_parts(name)
    # None leaves the choice to PyTorch (by the parameters' device); fused=True implies no foreach.
    foreach = None if implementation in (None, "fused") else implementation == "foreach"
    fused = True if implementation == "fused" else None
    if algorithm == "adamw":
        return torch.optim.AdamW(items, lr=lr, weight_decay=0.0, foreach=foreach, fused=fused)
    if algorithm == "sgd":
        return torch.optim.SGD(items, lr=lr, momentum=0.9, foreach=foreach, fused=fused)
    if algorithm == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise SpecError("The adafactor optimizer needs torch>=2.5; upgrade torch or use --optimizer adamw.")
        return torch.optim.Adafactor(items, lr=lr, foreach=foreach)  # settings refuse adafactor-fused
    raise unknown_optimizer(name)


def clip_gradients(params: list[nn.Parameter], optimizer_name: str) -> None:
    """Clip the gradient norm at GRAD_CLIP_NORM the way the optimizer's implementation goes: the
    for-loop with a loop optimizer, foreach otherwise (PyTorch's default for clipping on CUDA and the
    CPU; a fused optimizer has no fused clipping, so its users clip with foreach)."""
    _, implementation = optimizer_parts(optimizer_name)
    from dbprofile.methods.tensor_parallel import clip_over_meshes, meshes_of

    if len(meshes_of(params)) > 1:  # FSDP x TP: one clipping over gradients on two meshes
        clip_over_meshes(params, GRAD_CLIP_NORM)
        return
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP_NORM, foreach=implementation != "loop")


def step_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``, on fake tensors too: the numbers a step reads (Adafactor's ``.item()``) are
    answered there (torch_internals.optimizer_scalar_reads). Every step dbprofile takes goes through it."""
    with optimizer_scalar_reads():
        optimizer.step()


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def to_device(model: ModuleT, device: torch.device) -> ModuleT:
    """``model.to(device)``, skipped when every tensor is already there: a module built
    under dbprofile's fake mode (fake tensors on the CPU) cannot be ``.to()``-ed on recent
    PyTorch (its parameters are swapped, which fake-tensor weak references forbid)."""
    device = torch.device(device)
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == device.type and (device.index is None or t.device.index == device.index) for t in tensors):
        return model
    return model.to(device)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on the forward pass, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise unknown_precision(precision)


class TrainerProtocol(Protocol):
    """What the runner and the tracker need from a trainer: any technique's (a ``Trainer``
    subclass), a sharded or block-parallel one (dbprofile.methods.sharding), or a user's.
    Read-only, so a trainer may hold narrower types (a ``Trainer`` always has an optimizer)."""

    @property
    def model(self) -> nn.Module: ...

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """None for a trainer that steps no optimizer of its own (the tracker then tracks no state)."""

    @property
    def units(self) -> list[int | None]:
        """What one step trains: ``[None]`` (the whole model) or DiffusionBlocks' block indices."""

    @property
    def extra_parameters(self) -> int | Callable[[], int] | None:
        """Parameters the technique adds to the model (DiffusionBlocks' AdaLN and embedders)."""

    @property
    def block_layers(self) -> list[list[int]] | None:
        """The layers of each unit (DiffusionBlocks), else None."""

    def step(self, batch: Batch, unit: int | None = None, mark: Mark = ...) -> torch.Tensor: ...

    def host_resident(self, tensor: torch.Tensor) -> bool: ...


class Trainer:
    """One model under one technique. The step is shared; a technique prepares the model and, if it
    trains another objective, overrides ``compute_loss``."""

    technique: str
    units: list[int | None] = [None]
    extra_parameters: int | Callable[[], int] | None = None
    block_layers: list[list[int]] | None = None
    micro_batches: int = 1
    """Gradient accumulation: forward-backward passes per optimizer step (RunSettings.micro_batches)."""

    def __init__(
        self,
        spec: ModelSpec,
        model: nn.Module,
        device: torch.device,
        precision: str = "fp32",
        optimizer: str = "adamw",
        lr: float = 1e-3,
    ) -> None:
        self.spec = spec
        self.model = model
        self.device = device
        self.precision = precision
        # The implementation made explicit for the device (PyTorch's default there), so that clipping,
        # sharding's rebuilt optimizers and the offloading copies all follow one choice.
        self.optimizer_name = resolve_optimizer(optimizer, torch.device(device).type == "cuda")
        self.optimizer = make_optimizer(self.optimizer_name, self.trainable_parameters(), lr=lr)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def compute_loss(self, batch: Batch, unit: int | None) -> torch.Tensor:
        """The model's own loss on the batch; a technique that trains something else (DiffusionBlocks'
        block objective) overrides it."""
        return self.spec.loss(self.model, batch)

    def parameters_for_step(self, unit: int | None) -> list[nn.Parameter]:
        """The parameters that receive gradients in a step on ``unit`` (clipped and stepped)."""
        return self.trainable_parameters()

    def host_resident(self, tensor: torch.Tensor) -> bool:
        """True for host-side copies an offloading technique keeps off the device (none here)."""
        return False

    def reduce_gradients(self) -> None:
        """Between the backward and the optimizer step: where ranks share parameters outside FSDP, their
        gradients are averaged here (block-parallel DiffusionBlocks); nothing on one device."""

    def resolve_unit(self, unit: int | None) -> int | None:
        """The unit a step trains (DiffusionBlocks draws a block when none is named): fixed once per
        step, so every micro-batch of an accumulating step trains the same one."""
        return unit

    def step(self, batch: Batch, unit: int | None = None, mark: Mark = no_mark) -> torch.Tensor:
        """One training step: forward and backward (``micro_batches`` times, the gradients accumulating,
        each loss divided by the count), clip, optimizer step. Returns the detached loss."""
        unit = self.resolve_unit(unit)
        for _ in range(self.micro_batches):
            mark("forward")
            with autocast_context(self.device, self.precision):
                loss = self.compute_loss(batch, unit)
            mark("backward")
            (loss / self.micro_batches if self.micro_batches > 1 else loss).backward()
        self.reduce_gradients()
        mark("optimizer")
        params = [p for p in self.parameters_for_step(unit) if p.grad is not None]
        clip_gradients(params, self.optimizer_name)
        step_optimizer(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
