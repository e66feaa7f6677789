"""Hugging Face encoders with a masked-LM head (BERT, RoBERTa, ModernBERT, ...) as masked
diffusion LMs: ``hf:bert`` is built with ``AutoModelForMaskedLM``, attends over the whole
sequence, and trains on MD4's ELBO (dbprofile.masked_diffusion) rather than next-token loss.

Why the diffusion loss and not BERT's fixed 15% masking: DiffusionBlocks for such a model IS the
masked diffusion construction (each block a range of masking rates), and end-to-end MD4 training
is the baseline it is compared with; MD4's loss is BERT's masked-token cross-entropy averaged over
masking rates with the ELBO weight, so the memory of a step is that of MLM training at the same
sequence length (the same tensors; only which tokens are masked differs). The last id of the
model's vocabulary serves as [MASK] (configs carry no tokenizer; its value changes no byte), and
the random data tokens are drawn below it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dbprofile.masked_diffusion import DEFAULT_SCHEDULE, check_schedule
from dbprofile.models.masked_lm import md4_loss
from dbprofile.seeding import data_generator
from dbprofile.spec import Batch, ModelSpec

SEED = 0


def is_masked_encoder(config: Any) -> bool:
    """Encoder-only models transformers builds with ``AutoModelForMaskedLM`` (not seq2seq ones such as BART)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False)


class MaskedLM(nn.Module):
    """A transformers masked LM called as the protocol says: tokens (N, T) -> logits (N, T, V)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits


def masked_spec(
    name: str, overrides: dict, config: Any, seq_len: int, label: str, common: dict, schedule: str = DEFAULT_SCHEDULE
) -> ModelSpec:
    """The masked-diffusion-lm ModelSpec of ``hf:NAME`` (``common``: name, build, layers, ...) on the
    masking ``schedule``."""
    check_schedule(schedule)
    vocab = config.vocab_size
    mask_id = vocab - 1

    def batch(batch_size: int, device: torch.device | str) -> Batch:
        tokens = torch.randint(0, mask_id, (batch_size, seq_len), generator=data_generator(SEED))
        return {"inputs": tokens.to(device)}

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        return md4_loss(model, batch["inputs"], mask_id, schedule)

    return ModelSpec(
        **common,
        batch=batch,
        loss=loss,
        task="masked-diffusion-lm",
        num_classes=vocab,
        mask_token_id=mask_id,
        masking_schedule=schedule,
        description=f"{label}: {config.model_type} masked diffusion LM (MD4 loss), "
        f"{config.num_hidden_layers} layers, sequence {seq_len}",
        extra={
            "source": f"hf:{name}",
            "sequence_length": seq_len,
            "vocab_size": vocab,
            "schedule": schedule,
            "overrides": dict(overrides),
        },
    )
