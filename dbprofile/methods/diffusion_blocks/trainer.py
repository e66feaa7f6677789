"""The DiffusionBlocks training step: ``db:B``, ``db:B+ckpt`` and ``db:B+offload``.

As in the reference code, one AdamW covers every parameter and each step trains one block
(chosen uniformly at random unless the runner names it); the shared Trainer clips the
gradient norm at 1.0. ``db:B+ckpt`` checkpoints each layer of the active block.
``db:B+offload`` keeps only the active block's parameters, gradients and optimizer state on
the device: before a step the block's parameters and AdamW state are copied in from host
copies (pinned on CUDA), after it they are copied back and the device copies dropped.
``host_resident(tensor)`` tells the memory tracker which tensors are those host copies, which
matters when the "device" is the CPU itself (CPU runs, fake mode).
"""

from __future__ import annotations

import random

import torch
from torch import nn

from dbprofile.methods.base import Mark, Trainer, no_mark, to_device
from dbprofile.methods.diffusion_blocks.blockwise import BlockwiseModel
from dbprofile.methods.diffusion_blocks.schedule import DEFAULT_GAMMA
from dbprofile.methods.diffusion_blocks.task_targets import LABEL_INIT_STD
from dbprofile.methods.host_memory import HostCopies
from dbprofile.spec import Batch, ModelSpec


class DiffusionBlocksTrainer(Trainer):
    """DiffusionBlocks with B blocks on one device; ``model`` is the ``BlockwiseModel``."""

    technique = "db"
    model: BlockwiseModel

    def __init__(
        self, spec: ModelSpec, model: BlockwiseModel, device: torch.device, *, seed: int = 0, **kwargs
    ) -> None:
        super().__init__(spec, model, device, **kwargs)
        self.units = list(range(model.num_blocks))
        self.block_layers = [list(group) for group in model.block_layers]
        self.extra_parameters = model.extra_parameters
        # One generator for block choice, sigma and noise: two trainers with the same seed
        # take identical steps (the offload test relies on it).
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # The block choice is a Python draw: it must work under fake tensors too.
        self._block_rng = random.Random(seed)

    @classmethod
    def create(
        cls,
        tech,
        spec: ModelSpec,
        device: torch.device | str,
        precision: str = "fp32",
        optimizer: str = "adamw",
        lr: float = 1e-3,
        *,
        gamma: float = DEFAULT_GAMMA,
        weighting: str | None = None,
        partition: str = "equiprobable",
        cond_dim: int | None = None,
        label_init_std: float = LABEL_INIT_STD,
        seed: int = 0,
    ) -> DiffusionBlocksTrainer:
        device = torch.device(device)
        model = BlockwiseModel(
            spec,
            spec.build(),
            tech.blocks,
            gamma=gamma,
            partition=partition,
            weighting=weighting,
            cond_dim=cond_dim,
            checkpoint=tech.ckpt,
            lm_layout=tech.lm_layout,
            label_init_std=label_init_std,
            seed=seed,
        )
        trainer_cls = OffloadDiffusionBlocksTrainer if tech.offload else cls
        if tech.offload:
            trainer = trainer_cls(spec, model, device, seed=seed, precision=precision, optimizer=optimizer, lr=lr)
        else:
            trainer = trainer_cls(
                spec, to_device(model, device), device, seed=seed, precision=precision, optimizer=optimizer, lr=lr
            )
        trainer.technique = tech.name
        return trainer

    def pick_block(self) -> int:
        """A block chosen uniformly at random (the reference's schedule)."""
        return self._block_rng.randrange(len(self.units))

    def resolve_unit(self, unit: int | None) -> int | None:
        return self.pick_block() if unit is None else unit

    def compute_loss(self, batch: Batch, unit: int | None) -> torch.Tensor:
        block = self.pick_block() if unit is None else unit
        return self.model.loss(batch, block, generator=self.generator)

    def step(self, batch: Batch, unit: int | None = None, mark: Mark = no_mark) -> torch.Tensor:
        try:
            return super().step(batch, unit, mark)
        finally:
            # The step's conditioning ends with it, as the local it is in the reference code: kept on the
            # context it would be state that a first step makes (dbprofile.measure.warmup).
            self.model.context.cond = None

    def parameters_for_step(self, unit: int | None) -> list[nn.Parameter]:
        if unit is None:
            return self.trainable_parameters()
        # Kept in the model's parameter order so the clipped norm sums in the same order whether
        # or not the block was named (offload and plain runs then agree to the bit).
        used = {id(p) for p in self.model.shared_parameters() + self.model.block_parameters(unit)}
        return [p for p in self.trainable_parameters() if id(p) in used]


class OffloadDiffusionBlocksTrainer(DiffusionBlocksTrainer):
    """``db:B+offload``: only the active block's parameters and optimizer state on the device."""

    def __init__(self, spec: ModelSpec, model: BlockwiseModel, device: torch.device, **kwargs) -> None:
        self.device = device  # needed by _new_host before the base class sets it
        self._host = HostCopies(device)
        self.last_step_transfer: dict[str, int] = {}
        self._param_host: dict[int, torch.Tensor] = {}
        self._state_host: dict[tuple[int, str], torch.Tensor] = {}
        # Shared parameters and all buffers go to the device; every block's layers stay on the
        # host (nothing but the active block is ever copied to the device).
        block_ids = {id(p) for b in range(model.num_blocks) for p in model.block_parameters(b)}
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if id(param) in block_ids:
                    if id(param) not in self._param_host:
                        self._param_host[id(param)] = self._new_host(param.data)
                        param.data = self._param_host[id(param)]
                else:
                    param.data = param.data.to(device)
            for name, buf in module.named_buffers(recurse=False):
                module._buffers[name] = buf.to(device)
        super().__init__(spec, model, device, **kwargs)
        model.block_residency = self.block_resident

    def _new_host(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._host.copy_of(tensor)

    def host_resident(self, tensor: torch.Tensor) -> bool:
        """True for the host-side copies of offloaded parameters and optimizer state."""
        return self._host.holds(tensor)

    def _state_tensors(self, param: nn.Parameter):
        state = self.optimizer.state.get(param) or {}
        # AdamW's scalar 'step' stays where the optimizer keeps it (a 0-dim CPU tensor).
        return state, [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0]

    def move_in(self, block: int) -> None:
        """Copy block ``block``'s parameters and optimizer state onto the device."""
        moved = 0
        for param in self.model.block_parameters(block):
            param.data = self._param_host[id(param)].to(self.device, copy=True, non_blocking=True)
            moved += param.data.nbytes
            state, keys = self._state_tensors(param)
            for key in keys:
                state[key] = state[key].to(self.device, copy=True, non_blocking=True)
                moved += state[key].nbytes
        self.last_step_transfer = {"to_device_bytes": moved}

    def move_out(self, block: int) -> None:
        """Copy block ``block``'s parameters and optimizer state back into their host copies."""
        moved = 0
        for param in self.model.block_parameters(block):
            host = self._param_host[id(param)]
            host.copy_(param.data)
            moved += host.nbytes
            param.data = host
            state, keys = self._state_tensors(param)
            for key in keys:
                moved += state[key].nbytes
                slot = (id(param), key)
                if slot not in self._state_host:
                    self._state_host[slot] = self._new_host(state[key])
                else:
                    self._state_host[slot].copy_(state[key])
                state[key] = self._state_host[slot]
        self.last_step_transfer["to_host_bytes"] = moved

    def block_resident(self, block: int) -> _Resident:
        """Context manager: block ``block`` on the device for evaluation, back on the host after."""
        return _Resident(self, block)

    def step(self, batch: Batch, unit: int | None = None, mark: Mark = no_mark) -> torch.Tensor:
        block = self.pick_block() if unit is None else unit
        mark("transfer")
        self.move_in(block)
        loss = super().step(batch, block, mark)
        mark("transfer")
        self.move_out(block)
        return loss


class _Resident:
    def __init__(self, trainer: OffloadDiffusionBlocksTrainer, block: int) -> None:
        self.trainer, self.block = trainer, block

    def __enter__(self) -> None:
        self.trainer.move_in(self.block)

    def __exit__(self, *exc) -> None:
        self.trainer.move_out(self.block)
