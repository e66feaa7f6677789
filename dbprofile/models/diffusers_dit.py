"""diffusers' DiT (``DiTTransformer2DModel``) as a model source, built from its configuration.

``diffusers:DiT`` (or ``diffusers:DiTTransformer2DModel``) takes the class's defaults, which are
DiT-XL/2 on 32x32x4 latents with 1000 classes; ``diffusers:PATH`` or ``hf:PATH`` reads a local
``config.json`` whose ``_class_name`` is ``DiTTransformer2DModel`` (a pipeline's
``transformer/config.json``). ``--set KEY=VALUE`` overrides any argument of the class, typed by
its default; ``--image-size`` sets ``sample_size`` (the latent side, in latent pixels).

The task is denoising: the model is wrapped to be called as the protocol says,
``model(x, noise_level, labels)`` (the noise level goes in as DiT's timestep, the labels as its
class labels), and trained with the same EDM loss as the built-in DiT. Its layers are
``transformer_blocks``. Nothing is downloaded.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dbprofile.models.dit import LATENT_STD, edm_loss
from dbprofile.models.overrides import parse_value, unknown_key
from dbprofile.seeding import data_generator, seeded
from dbprofile.spec import Batch, ModelSpec, SpecError

CLASS_NAMES = {"dit": "DiTTransformer2DModel", "dittransformer2dmodel": "DiTTransformer2DModel"}
SEED = 0


def require_diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise SpecError(
            "diffusers: models need the diffusers package, which is not installed. Install it with "
            "`pip install 'dbprofile[hf]'` (or `pip install diffusers`), then run again."
        ) from None
    return diffusers


class Denoiser(nn.Module):
    """A diffusers DiT called as the protocol says: (x, noise_level, labels) -> F, shaped like x."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        out = self.model(x, timestep=noise_level, class_labels=labels).sample
        # A learned-sigma DiT (out_channels = 2C) predicts the variance too; F is the first C channels.
        return out[:, : x.shape[1]]


def _read_config(name: str, config: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    if config is not None:
        return dict(config), name
    key = name.lower()
    if key in CLASS_NAMES:
        return {"_class_name": CLASS_NAMES[key]}, f"diffusers' {CLASS_NAMES[key]} defaults"
    path = Path(name).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if file.is_file():
        import json

        try:
            return json.loads(file.read_text()), str(file)
        except json.JSONDecodeError as err:
            raise SpecError(f"Cannot read the model config {str(file)!r}: {err}.") from None
    raise SpecError(
        f"diffusers:{name} is neither DiT (DiTTransformer2DModel) nor a local directory or config.json. "
        "Use diffusers:DiT, or pass the directory of a DiT transformer's config.json."
    )


def make_spec(
    name: str,
    overrides: dict[str, str] | None = None,
    image_size: int | None = None,
    config: dict[str, Any] | None = None,
) -> ModelSpec:
    """The denoising ModelSpec of a diffusers DiT (see the module docstring)."""
    diffusers = require_diffusers()
    data, source = _read_config(name, config)
    class_name = data.get("_class_name")
    if class_name != "DiTTransformer2DModel":
        raise SpecError(
            f"{source} describes a diffusers {class_name!r}; dbprofile profiles diffusers' DiTTransformer2DModel "
            "(write a ModelSpec file for other diffusers models)."
        )
    cls = diffusers.DiTTransformer2DModel
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in data.items() if k in params and k != "self"}
    overrides = dict(overrides or {})
    if image_size is not None:
        overrides["sample_size"] = str(image_size)
    for key, text in overrides.items():
        if key not in params or key == "self":
            raise unknown_key(key, [p for p in params if p != "self"], "DiTTransformer2DModel")
        current = kwargs.get(key, params[key].default)
        kwargs[key] = parse_value(key, text, current)
    defaults = {k: p.default for k, p in params.items() if k != "self"}
    shape = {**defaults, **kwargs}
    channels, size, classes = shape["in_channels"], shape["sample_size"], shape["num_embeds_ada_norm"]
    if not classes:
        raise SpecError(
            "diffusers DiT needs num_embeds_ada_norm (its number of classes) for class-conditional training."
        )

    def build() -> nn.Module:
        with seeded(SEED):
            try:
                model = cls(**kwargs)
            except (ValueError, TypeError) as err:
                raise SpecError(f"diffusers' DiTTransformer2DModel rejects this config: {err}") from None
        model.train()
        return Denoiser(model)

    def batch(batch_size: int, device: torch.device | str) -> Batch:
        gen = data_generator(SEED)
        latents = torch.randn((batch_size, channels, size, size), generator=gen) * LATENT_STD
        labels = torch.randint(0, classes, (batch_size,), generator=gen)
        return {"inputs": latents.to(device), "labels": labels.to(device)}

    hidden = shape["num_attention_heads"] * shape["attention_head_dim"]
    plain = {k: v for k, v in overrides.items() if k != "sample_size"}
    label = f"diffusers:{name}" + "".join(f" {k}={v}" for k, v in plain.items())
    return ModelSpec(
        name="diffusers-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(name).name).strip("-"),
        build=build,
        batch=batch,
        loss=edm_loss,
        layers="model.transformer_blocks",
        task="denoising",
        hidden_size=hidden,
        num_classes=classes,
        family="diffusers-dit",
        description=f"{label}: DiT {shape['num_layers']}x{hidden}, patch {shape['patch_size']}, "
        f"{size}x{size}x{channels} latents",
        extra={"source": f"diffusers:{name}", "latent_size": size, "overrides": plain},
        shapes={"image_size": lambda n: make_spec(name, plain, image_size=n, config=config)},
    )
