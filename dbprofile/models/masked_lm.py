"""Masked diffusion language models (MD4; dbprofile.masked_diffusion): the built-in one is the
Llama-style transformer of ``gpt.py`` with bidirectional attention over a character vocabulary
plus the [MASK] token, trained end to end on MD4's ELBO. MD4 does not condition its transformer
on t (the number of masked tokens already tells it), so neither does this model; DiffusionBlocks
adds t-conditioning (AdaLN-Zero) to its blocks as it adds sigma-conditioning elsewhere.

Batches are random data tokens (ids below the mask): bytes do not depend on the text. The
learning check (examples/masked_diffusion_check.py) feeds real text through the same model.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from dbprofile.masked_diffusion import DEFAULT_SCHEDULE, SCHEDULES, check_schedule, elbo_loss, elbo_weight
from dbprofile.models.gpt import GPT, GPTConfig
from dbprofile.seeding import data_generator, seeded
from dbprofile.spec import Batch, ModelSpec, SpecError

TEXT8_VOCAB = 28
"""text8's 27 characters (a-z and space) plus [MASK], the last id."""


def md4_loss(model: nn.Module, tokens: torch.Tensor, mask_id: int, schedule: str = DEFAULT_SCHEDULE) -> torch.Tensor:
    """MD4's end-to-end loss: the ELBO in nats per token at t drawn over [0, 1] (one model for every t)."""
    ce, t = elbo_loss(lambda z, _t: model(z), tokens, mask_id, schedule)
    return (elbo_weight(t, schedule) * ce).mean()


def reschedule(spec: ModelSpec, schedule: str) -> ModelSpec:
    """``spec`` trained on the masking ``schedule`` (``--masking-schedule``), or one paragraph on why not."""
    if spec.task != "masked-diffusion-lm":
        raise SpecError(
            f"--masking-schedule applies to masked diffusion language models; {spec.name} is a {spec.task} model."
        )
    if schedule not in SCHEDULES:
        raise SpecError(
            f"--masking-schedule {schedule!r} is not a masking schedule; choose one of {', '.join(SCHEDULES)}."
        )
    if schedule == spec.masking_schedule:
        return spec
    if spec.rescheduled is None:
        raise SpecError(
            f"{spec.name} computes its own loss, so dbprofile cannot change its masking schedule: set "
            f"ModelSpec.masking_schedule and the loss in its file (docs/protocol.md)."
        )
    return spec.rescheduled(schedule)


def make_spec(config: GPTConfig, name: str, description: str = "", schedule: str = DEFAULT_SCHEDULE) -> ModelSpec:
    """A masked-diffusion-lm ModelSpec from a GPT shape (attention made bidirectional), trained on
    the masking ``schedule``."""
    check_schedule(schedule)
    config = replace(config, causal=False)
    mask_id = config.vocab_size - 1

    def build() -> nn.Module:
        with seeded(config.seed):
            return GPT(config)

    def batch(batch_size: int, device: torch.device | str) -> Batch:
        gen = data_generator(config.seed)
        tokens = torch.randint(0, mask_id, (batch_size, config.context_length), generator=gen)
        return {"inputs": tokens.to(device)}

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        return md4_loss(model, batch["inputs"], mask_id, schedule)

    return ModelSpec(
        at_depth=lambda layers: make_spec(replace(config, num_layers=layers), name, description, schedule),
        name=name,
        build=build,
        batch=batch,
        loss=loss,
        layers="blocks",
        task="masked-diffusion-lm",
        hidden_size=config.hidden_size,
        num_classes=config.vocab_size,
        mask_token_id=mask_id,
        family="masked-lm",
        description=description
        or f"masked diffusion LM {config.num_layers}x{config.hidden_size}, sequence {config.context_length}",
        masking_schedule=schedule,
        rescheduled=lambda other: make_spec(config, name, description, other),
        extra={"sequence_length": config.context_length, "vocab_size": config.vocab_size, "schedule": schedule},
        shapes={"seq_len": lambda n: make_spec(replace(config, context_length=n), name, "", schedule)},
    )
