"""The residual stack as depth extrapolation sees it (dbprofile.measure.depth and the activation
counts of dbprofile.measure.activation_counts): are the layers identical, and the same model cut to
fewer of them."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from dbprofile.measure.fake import fake_mode
from dbprofile.spec import ModelSpec, get_layers


def _signature(layer: nn.Module) -> tuple:
    return (
        tuple((name, type(mod).__qualname__) for name, mod in layer.named_modules()),
        tuple((name, tuple(p.shape), p.dtype, p.requires_grad) for name, p in layer.named_parameters()),
        tuple((name, tuple(b.shape), b.dtype) for name, b in layer.named_buffers()),
    )


def identical_layers(spec: ModelSpec) -> tuple[int, str | None]:
    """(number of residual layers, None if they are identical else why not), from a fake build."""
    with fake_mode():
        layers = list(get_layers(spec.build(), spec.layers, spec.name))
    return len(layers), stack_difference(layers)


def stack_difference(layers: list[nn.Module]) -> str | None:
    """None when the layers are identical (class, module tree, parameter and buffer shapes and
    dtypes), else how the first one that differs from layer 0 differs."""
    first = _signature(layers[0])
    for i, layer in enumerate(layers[1:], start=1):
        if _signature(layer) != first:
            what = "class" if type(layer) is not type(layers[0]) else "module tree, parameter or buffer shapes"
            return f"layer {i} differs from layer 0 ({what})"
    return None


def spec_at_depth(spec: ModelSpec, layers: int) -> ModelSpec:
    """The same model with ``layers`` residual layers: the spec's own ``at_depth``, or a full build
    with its layer list cut to the first ``layers`` (any model whose forward loops over the list)."""
    if spec.at_depth is not None:
        return spec.at_depth(layers)
    full_build = spec.build
    parent_path, _, attr = spec.layers.rpartition(".")

    def build() -> nn.Module:
        model = full_build()
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, nn.ModuleList(list(getattr(parent, attr))[:layers]))
        return model

    return replace(spec, build=build)
