"""Turning a parsed technique into a ready trainer on a device."""

from __future__ import annotations

import torch

from dbprofile.methods.activation_offload import ActivationOffloadTrainer
from dbprofile.methods.base import Trainer
from dbprofile.methods.checkpointing import CheckpointTrainer
from dbprofile.methods.diffusion_blocks import DiffusionBlocksTrainer
from dbprofile.methods.e2e import EndToEndTrainer
from dbprofile.methods.selective import SelectiveCheckpointTrainer
from dbprofile.spec import ModelSpec, SpecError
from dbprofile.techniques import Technique


def make_trainer(
    tech: Technique,
    spec: ModelSpec,
    device: torch.device,
    precision: str = "fp32",
    optimizer: str = "adamw",
    lr: float = 1e-3,
) -> Trainer:
    """Build the model and wrap it for ``tech``; returns a Trainer on ``device``."""
    if tech.parallel:
        raise SpecError(
            f"Technique {tech.name!r} trains one block per device: measure it with `dbprofile run --nproc "
            f"{tech.blocks}` (torchrun), or predict it with `dbprofile plan --world-size {tech.blocks}`."
        )
    one_model: dict[
        str, type[EndToEndTrainer | CheckpointTrainer | SelectiveCheckpointTrainer | ActivationOffloadTrainer]
    ] = {
        "e2e": EndToEndTrainer,
        "ckpt": CheckpointTrainer,
        "sac": SelectiveCheckpointTrainer,
        "offload": ActivationOffloadTrainer,
    }
    if tech.kind in one_model:
        return one_model[tech.kind].create(tech, spec, device, precision=precision, optimizer=optimizer, lr=lr)
    return DiffusionBlocksTrainer.create(tech, spec, device, precision=precision, optimizer=optimizer, lr=lr)
