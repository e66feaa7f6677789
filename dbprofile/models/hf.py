"""Hugging Face ``transformers`` models as model sources: ``hf:NAME`` builds the model from its
configuration alone (never from weights) and describes it as a ModelSpec.

``NAME`` resolves, in this order: a local directory holding ``config.json`` or a ``.json`` file;
a hub id whose config is already in the local Hugging Face cache (``local_files_only``: nothing
is downloaded); a ``model_type`` transformers knows (``AutoConfig.for_model``: the class's
defaults, e.g. ``llama`` is Llama-2-7B's shape). ``--set KEY=VALUE`` overrides a config field,
typed by the field's current value, and is applied when the config is constructed, so derived
fields (Llama's ``head_dim``) follow the overridden sizes. ``--set attn_implementation=eager``
picks transformers' attention kernel (``sdpa`` by default), which changes activation memory.

The task comes from the architecture: encoders transformers builds with ``AutoModelForMaskedLM``
(BERT, RoBERTa, ModernBERT) are ``masked-diffusion-lm`` (random tokens, MD4's ELBO;
``hf_masked``), other models it builds with ``AutoModelForCausalLM`` are ``causal-lm`` (random
tokens, next-token cross-entropy), those it builds with ``AutoModelForImageClassification`` are
``classification`` (random images, cross-entropy). The
model is wrapped so that it is called as the protocol says (``model(tokens) -> logits``), and
its layer stack is found from a table of known paths or, failing that, as the longest
ModuleList/Sequential of modules of one class.

Under fake tensors the model is built with transformers' ``no_init_weights``: initialisers such
as ``trunc_normal_`` read tensor values, which fake tensors do not have, and fake values are
meaningless anyway. Causal LMs get a ``position_adapter`` (``hf_position_adapter``) that hands
DiffusionBlocks' active layers rotary embeddings, position ids and attention masks for the
doubled sequence.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dbprofile.masked_diffusion import DEFAULT_SCHEDULE
from dbprofile.models.hf_config import make_config, quiet_transformers, raw_config
from dbprofile.models.hf_masked import MaskedLM, is_masked_encoder, masked_spec
from dbprofile.models.hf_moe import is_moe, moe_facts, observe_routing, routed_blocks, use_grouped_mm_fallback
from dbprofile.models.hf_positions import hf_position_adapter
from dbprofile.models.masked_lm import reschedule
from dbprofile.seeding import data_generator, seeded
from dbprofile.spec import Batch, ModelSpec, SpecError
from dbprofile.torch_internals import active_fake_mode, is_fake

# model_type -> dotted path of the residual layers inside the transformers model. Anything not
# listed is found by ``find_layer_stack``; the table pins the common ones so a refactor of the
# fallback can never silently pick another stack for them.
KNOWN_LAYER_PATHS = {
    "gpt2": "transformer.h",
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2_moe": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "vit": "vit.layers",
}

DEFAULT_SEQ_LEN_CAP = 4096
"""Default sequence length: the model's context length (``n_positions`` /
``max_position_embeddings``), capped here so a 128k-context config does not plan 128k tokens."""

SEED = 0


# ---------------------------------------------------------------- resolving a configuration


# ---------------------------------------------------------------- the model


class CausalLM(nn.Module):
    """A transformers causal LM called as the protocol says: tokens (N, T) -> logits (N, T, V)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with unpacked_under_fake() if is_fake(tokens) else contextlib.nullcontext():
            return self.model(input_ids=tokens, use_cache=False).logits


@contextlib.contextmanager
def unpacked_under_fake() -> Iterator[None]:
    """Make a fake-tensor call take the mask path a real call takes.

    With no attention mask, transformers looks for packed sequences in the position ids; on
    real tensors it finds none (one sequence per row, as every dbprofile batch is) and lets SDPA
    mask with ``is_causal``, but on fake tensors it cannot read the values, assumes packing and
    materialises a (N, 1, T, T) mask, which also moves SDPA to another kernel: fake bytes would
    then differ from real ones (tests/test_hf.py pins that they agree). Answering "not packed"
    for it is what the real run computes."""
    import transformers.masking_utils as masking

    original = masking.find_packed_sequence_indices
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


class ImageClassifier(nn.Module):
    """A transformers image classifier called as the protocol says: images -> logits (N, classes)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits


def find_layer_stack(model: nn.Module) -> str | None:
    """The dotted path of the longest ModuleList/Sequential whose members are all of one class
    (the residual layers of a transformer), or None when there is none of length >= 2."""
    best, best_len = None, 1
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > best_len:
            if len({type(child) for child in module}) == 1:
                best, best_len = name, len(module)
    return best


def _task(config: Any) -> str | None:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    )

    model_type = config.model_type
    # Before the causal check: BERT-style encoders also have a causal-LM class (BertLMHeadModel),
    # but what they are is a masked LM (dbprofile.models.hf_masked).
    if is_masked_encoder(config):
        return "masked-diffusion-lm"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    if model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return "classification"
    return None


def make_spec(
    name: str,
    overrides: dict[str, str] | None = None,
    seq_len: int | None = None,
    image_size: int | None = None,
) -> ModelSpec:
    """The ModelSpec of ``hf:NAME`` (see the module docstring)."""
    overrides = dict(overrides or {})
    data, source = raw_config(name)
    if "_class_name" in data:  # a diffusers config: the DiT source reads it
        from dbprofile.models import diffusers_dit

        return diffusers_dit.make_spec(name, overrides, image_size=image_size, config=data)
    if image_size is not None:
        overrides["image_size"] = str(image_size)
    config = make_config(data, overrides, source)
    task = _task(config)
    if task is None:
        raise SpecError(
            f"hf:{name} is a {config.model_type!r} model, which transformers builds neither as a causal LM "
            "(AutoModelForCausalLM), a masked-LM encoder (AutoModelForMaskedLM) nor as an image classifier "
            "(AutoModelForImageClassification); dbprofile profiles those kinds from a config. Write a "
            "ModelSpec file for this model (README, "
            "'Bring your own model')."
        )
    if task == "classification" and seq_len is not None:
        raise SpecError(f"--seq-len applies to language models; hf:{name} is an image classifier (use --image-size).")
    if task != "classification" and image_size is not None:
        raise SpecError(f"--image-size applies to vision models; hf:{name} is a language model (use --seq-len).")
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForMaskedLM

    moe = is_moe(config)
    if moe:
        use_grouped_mm_fallback()  # expert matmuls that fake tensors can trace (dbprofile.models.hf_moe)
    auto, wrapper = {
        "causal-lm": (AutoModelForCausalLM, CausalLM),
        "masked-diffusion-lm": (AutoModelForMaskedLM, MaskedLM),
        "classification": (AutoModelForImageClassification, ImageClassifier),
    }[task]

    def build() -> nn.Module:
        if moe:
            # Again in every process that builds the model (a spec can be built far from where it was
            # loaded): an expert path not switched here would be the grouped kernel fake tensors cannot trace.
            use_grouped_mm_fallback()
        with seeded(SEED), quiet_transformers():
            # Fake tensors have no values for initialisers to read (trunc_normal_ is data-dependent).
            skip_init = active_fake_mode() is not None
            from transformers.initialization import no_init_weights

            with no_init_weights() if skip_init else contextlib.nullcontext():
                model = auto.from_config(config)
            if skip_init:
                model.tie_weights()  # skipped with the initialisation; GPT-2 ties its LM head to wte
        model.train()  # transformers builds in eval mode; dropout is part of the training step
        return wrapper(model)

    _check_token_ids(name, config)
    if getattr(config, "architectures", None) is None:
        # transformers' auto classes iterate it to choose among several heads (DeiT's two).
        config.architectures = []
    meta = _meta_model(name, auto, config)
    inner_path = KNOWN_LAYER_PATHS.get(config.model_type) or find_layer_stack(meta)
    if inner_path is None:
        raise SpecError(
            f"hf:{name}: cannot find the residual layers of {type(meta).__name__} (no ModuleList or Sequential "
            "of two or more modules of one class). Write a ModelSpec file that names them (README, "
            "'Bring your own model')."
        )
    hidden = getattr(config, "hidden_size", None)
    label = f"hf:{name}" + "".join(f" {k}={v}" for k, v in overrides.items() if k != "image_size")
    common = {
        "name": _safe(name),
        "build": build,
        "layers": f"model.{inner_path}",
        "hidden_size": hidden,
        "family": f"hf-{config.model_type}",
    }
    if moe:
        common["observe"] = observe_routing
        common["routed_modules"] = routed_blocks
    if task == "masked-diffusion-lm":
        t = seq_len or min(_context_length(config) or 512, DEFAULT_SEQ_LEN_CAP)

        def on_schedule(schedule: str) -> ModelSpec:
            spec = masked_spec(name, overrides, config, t, label, common, schedule)
            return dataclasses.replace(
                spec,
                rescheduled=on_schedule,
                shapes={"seq_len": lambda n: reschedule(make_spec(name, overrides, seq_len=n), schedule)},
            )

        return on_schedule(DEFAULT_SCHEDULE)
    if task == "causal-lm":
        facts = {"moe": moe_facts(meta, config)} if moe else {}
        return _causal_spec(name, overrides, config, seq_len, label, common, facts)
    return _classifier_spec(name, overrides, config, label, common)


def _check_token_ids(name: str, config: Any) -> None:
    """The padding token must be a row of the embedding table (Phi-3's default pad id 32000 is
    past a --set vocab_size=500): said here, before transformers asserts it."""
    pad, vocab = getattr(config, "pad_token_id", None), getattr(config, "vocab_size", None)
    if isinstance(pad, int) and isinstance(vocab, int) and not 0 <= pad < vocab:
        raise SpecError(
            f"hf:{name}: pad_token_id {pad} is outside the vocabulary of {vocab} tokens. "
            f"Give --set vocab_size above {pad}, or --set pad_token_id=0."
        )


def _meta_model(name: str, auto: Any, config: Any) -> nn.Module:
    """The model on the meta device (no memory); a config transformers cannot build (a size whose
    storage overflows, an attention kernel not installed) is one paragraph, not its traceback."""
    try:
        with torch.device("meta"), quiet_transformers():
            return auto.from_config(config)
    except Exception as err:
        raise SpecError(
            f"transformers cannot build hf:{name} ({config.model_type}) from this config: "
            f"{type(err).__name__}: {str(err).strip().rstrip('.')}. Check the --set values (sizes, attn_implementation)."
        ) from None


def _safe(name: str) -> str:
    return "hf-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(name).name or name).strip("-")


def _context_length(config: Any) -> int | None:
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _causal_spec(name, overrides, config, seq_len, label, common, facts) -> ModelSpec:
    context = _context_length(config)
    t = seq_len or min(context or 1024, DEFAULT_SEQ_LEN_CAP)
    learned = getattr(config, "n_positions", None)  # GPT-2-style learned absolute positions
    if isinstance(learned, int) and t > learned:
        raise SpecError(
            f"--seq-len {t} is longer than hf:{name}'s learned position table (n_positions={learned}). "
            f"Use --seq-len up to {learned}, or --set n_positions={t}."
        )
    vocab = config.vocab_size

    def batch(batch_size: int, device: torch.device | str) -> Batch:
        gen = data_generator(SEED)
        tokens = torch.randint(0, vocab, (batch_size, t + 1), generator=gen)
        return {"inputs": tokens[:, :-1].contiguous().to(device), "targets": tokens[:, 1:].contiguous().to(device)}

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch["inputs"])
        return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())

    return ModelSpec(
        **common,
        batch=batch,
        loss=loss,
        task="causal-lm",
        num_classes=vocab,
        description=f"{label}: {config.model_type} causal LM, {config.num_hidden_layers} layers, sequence {t}",
        extra={
            **facts,
            "source": f"hf:{name}",
            "sequence_length": t,
            "vocab_size": vocab,
            "attention": getattr(config, "_attn_implementation", None),
            "overrides": dict(overrides),
        },
        shapes={"seq_len": lambda n: make_spec(name, overrides, seq_len=n)},
        position_adapter=hf_position_adapter,
    )


def _vision(config: Any, key: str) -> Any:
    """A vision field from the config, or from its ``vision_config`` (CLIP-style composites)."""
    value = getattr(config, key, None)
    if value is None:
        value = getattr(getattr(config, "vision_config", None), key, None)
    return value


def _classifier_spec(name, overrides, config, label, common) -> ModelSpec:
    size, channels, classes = _vision(config, "image_size"), _vision(config, "num_channels") or 3, config.num_labels
    if not isinstance(size, int):
        raise SpecError(
            f"hf:{name}: the {config.model_type} config names no image_size (nor does its vision_config); "
            "pass --image-size N."
        )

    def batch(batch_size: int, device: torch.device | str) -> Batch:
        gen = data_generator(SEED)
        images = torch.randn((batch_size, channels, size, size), generator=gen)
        targets = torch.randint(0, classes, (batch_size,), generator=gen)
        return {"inputs": images.to(device), "targets": targets.to(device)}

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch["inputs"]), batch["targets"])

    plain = {k: v for k, v in overrides.items() if k != "image_size"}
    return ModelSpec(
        **common,
        batch=batch,
        loss=loss,
        task="classification",
        num_classes=classes,
        description=f"{label}: {config.model_type} image classifier, {size}px, {classes} classes",
        extra={"source": f"hf:{name}", "image_size": size, "overrides": dict(plain)},
        shapes={"image_size": lambda n: make_spec(name, plain, image_size=n)},
    )
