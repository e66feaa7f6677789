"""End-to-end backprop: the model as given, one optimizer over all parameters."""

from __future__ import annotations

import torch

from dbprofile.methods.base import Trainer, to_device
from dbprofile.spec import ModelSpec, get_layers


class EndToEndTrainer(Trainer):
    technique = "e2e"

    @classmethod
    def create(cls, tech, spec: ModelSpec, device: torch.device, **kwargs) -> EndToEndTrainer:
        model = to_device(spec.build(), device)
        get_layers(model, spec.layers, spec.name)
        trainer = cls(spec, model, device, **kwargs)
        trainer.technique = tech.name
        return trainer
