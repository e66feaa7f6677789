"""timm models as a model source: ``timm:NAME`` builds ``timm.create_model(NAME,
pretrained=False, **overrides)`` (never weights) and describes it as a classification ModelSpec.

timm is optional: it needs torchvision, which must match the installed torch build. When it
cannot be imported, ``timm:`` stops with one message and the tests skip. ``--set KEY=VALUE``
passes constructor arguments (``depth=4``, ``embed_dim=192``, ``num_classes=10``), each read as
JSON where it parses (numbers, true/false) and as a string otherwise; ``--image-size`` passes
``img_size``. The layers are the longest stack of modules of one class (``blocks``, an
``nn.Sequential``, for ViTs).

Under fake tensors the model is built on the meta device with the fake mode suspended (its
constructors and initialisers read values, which fake tensors do not have) and then
materialised as fake tensors with ``to_empty``.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dbprofile.seeding import data_generator, seeded
from dbprofile.spec import Batch, ModelSpec, SpecError
from dbprofile.torch_internals import active_fake_mode, outside_fake_mode

SEED = 0


def require_timm() -> Any:
    try:
        import timm
    except Exception as err:  # noqa: BLE001 - a torchvision built for another torch fails at import with any error
        raise SpecError(
            f"timm: models need timm, which cannot be imported here ({type(err).__name__}: {err}). Install timm "
            "together with the torchvision built for your torch (on a CPU-only machine, from the CPU wheel index), "
            "then run again."
        ) from None
    return timm


def _typed(overrides: dict[str, str]) -> dict[str, Any]:
    out = {}
    for key, text in overrides.items():
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def make_spec(name: str, overrides: dict[str, str] | None = None, image_size: int | None = None) -> ModelSpec:
    """The classification ModelSpec of ``timm:NAME`` (see the module docstring)."""
    from dbprofile.models.hf import (
        find_layer_stack,  # the same fallback rule for every source
    )

    timm = require_timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise SpecError(
            f"timm:{name} is not a model timm {timm.__version__} knows.{hint} `timm.list_models()` lists them."
        )
    overrides = dict(overrides or {})
    kwargs = _typed(overrides)
    if image_size is not None:
        kwargs["img_size"] = image_size

    def create() -> nn.Module:
        try:
            return timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as err:
            raise SpecError(f"timm:{name} rejects these --set values: {err}") from None

    def build() -> nn.Module:
        with seeded(SEED):
            if active_fake_mode() is not None:
                # timm's constructors read values (drop-path rates via .item()) and its
                # initialisers are data-dependent: build on meta with the fake mode suspended,
                # then materialise every parameter and buffer as a fake tensor.
                with outside_fake_mode(), torch.device("meta"):
                    model = create()
                model = model.to_empty(device="cpu")
            else:
                model = create()
        return model.train()

    with torch.device("meta"):
        meta = create()
    path = find_layer_stack(meta)
    if path is None:
        raise SpecError(
            f"timm:{name}: cannot find a stack of residual layers (a ModuleList or Sequential of one class)."
        )
    cfg = getattr(meta, "pretrained_cfg", None) or {}
    channels, height, width = cfg.get("input_size", (3, 224, 224))
    if image_size is not None:
        height = width = image_size
    classes = meta.num_classes
    if not isinstance(classes, int) or not classes:
        raise SpecError(f"timm:{name} has no classifier head (num_classes={classes!r}); pass --set num_classes=N.")

    def batch(batch_size: int, device: torch.device | str) -> Batch:
        gen = data_generator(SEED)
        images = torch.randn((batch_size, channels, height, width), generator=gen)
        targets = torch.randint(0, classes, (batch_size,), generator=gen)
        return {"inputs": images.to(device), "targets": targets.to(device)}

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch["inputs"]), batch["targets"])

    label = f"timm:{name}" + "".join(f" {k}={v}" for k, v in overrides.items())
    return ModelSpec(
        name="timm-" + name.replace("/", "-"),
        build=build,
        batch=batch,
        loss=loss,
        layers=path,
        task="classification",
        hidden_size=getattr(meta, "embed_dim", None) or getattr(meta, "num_features", None),
        num_classes=classes,
        family="timm",
        description=f"{label}: {height}px, {classes} classes",
        extra={"source": f"timm:{name}", "image_size": height, "overrides": dict(overrides)},
        shapes={"image_size": lambda n: make_spec(name, overrides, image_size=n)},
    )
