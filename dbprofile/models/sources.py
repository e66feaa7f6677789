"""Model sources beyond presets and files: ``hf:NAME`` (transformers, or a diffusers config),
``diffusers:NAME`` (diffusers' DiT) and ``timm:NAME``, plus the command line's shape and config
options (``--seq-len``, ``--image-size``, ``--set``) for every kind of source.

Everything resolves to a ``ModelSpec``; nothing downstream knows where a model came from.
"""

from __future__ import annotations

from dbprofile.spec import ModelSpec, SpecError

PREFIXES = ("hf:", "diffusers:", "timm:")

SHAPE_OPTIONS = {"seq_len": "--seq-len", "image_size": "--image-size"}


def is_ecosystem_source(source: str) -> bool:
    """True for ``hf:NAME``, ``diffusers:NAME`` and ``timm:NAME``."""
    return isinstance(source, str) and source.startswith(PREFIXES)


def load_ecosystem(
    source: str,
    overrides: dict[str, str] | None = None,
    seq_len: int | None = None,
    image_size: int | None = None,
) -> ModelSpec:
    """The ModelSpec of an ecosystem model, built from its configuration only (no weights)."""
    prefix, _, name = source.partition(":")
    if not name:
        raise SpecError(f"{source!r} names no model: write {prefix}:NAME, e.g. hf:gpt2, diffusers:DiT, timm:vit_base_patch16_224.")
    if prefix == "hf":
        from dbprofile.models import hf

        return hf.make_spec(name, overrides, seq_len=seq_len, image_size=image_size)
    if seq_len is not None:
        raise SpecError(f"--seq-len applies to language models; {source} is a vision model (use --image-size).")
    if prefix == "diffusers":
        from dbprofile.models import diffusers_dit

        return diffusers_dit.make_spec(name, overrides, image_size=image_size)
    from dbprofile.models import timm_models

    return timm_models.make_spec(name, overrides, image_size=image_size)


def load_model(
    source: str | None,
    overrides: dict[str, str] | None = None,
    seq_len: int | None = None,
    image_size: int | None = None,
) -> ModelSpec:
    """Any model source with the command line's options applied: ecosystem models take
    ``--set`` and shapes directly; presets and files take the shapes their spec declares
    (``ModelSpec.shapes``)."""
    from dbprofile.spec import load_spec

    if is_ecosystem_source(source):
        return load_ecosystem(source, overrides, seq_len=seq_len, image_size=image_size)
    if overrides:
        raise SpecError(
            "--set changes the config of hf:, diffusers: and timm: models; "
            f"{source or 'the default model'} is a preset or a ModelSpec file, whose shape is set in its code."
        )
    spec = load_spec(source)
    for shape, value in (("seq_len", seq_len), ("image_size", image_size)):
        if value is not None:
            spec = reshape(spec, shape, value)
    return spec


def reshape(spec: ModelSpec, shape: str, value: int) -> ModelSpec:
    """``spec`` at ``shape`` = ``value`` through the function the spec declares for it."""
    if value < 1:
        raise SpecError(f"{SHAPE_OPTIONS[shape]} must be at least 1; got {value}.")
    change = spec.shapes.get(shape)
    if change is None:
        can = ", ".join(SHAPE_OPTIONS[s] for s in spec.shapes) or "neither"
        raise SpecError(
            f"{SHAPE_OPTIONS[shape]} does not apply to {spec.name!r}: its spec declares which shapes may change "
            f"(ModelSpec.shapes) and allows {can}."
        )
    return change(value)


def load_sweep(
    source: str | None,
    overrides: dict[str, str] | None = None,
    seq_lens: list[int] | None = None,
    image_sizes: list[int] | None = None,
) -> tuple[str | None, list[ModelSpec]]:
    """(the swept shape or None, one spec per value): several ``--seq-len`` or ``--image-size``
    values sweep that shape; one value (or none) gives one spec. Sweeping both at once is refused."""
    seq_lens, image_sizes = list(seq_lens or []), list(image_sizes or [])
    if len(seq_lens) > 1 and len(image_sizes) > 1:
        raise SpecError("Sweep one shape at a time: give several values to --seq-len or to --image-size, not both.")
    if len(seq_lens) > 1:
        image = image_sizes[0] if image_sizes else None
        return "seq_len", [load_model(source, overrides, seq_len=n, image_size=image) for n in seq_lens]
    if len(image_sizes) > 1:
        seq = seq_lens[0] if seq_lens else None
        return "image_size", [load_model(source, overrides, seq_len=seq, image_size=n) for n in image_sizes]
    seq = seq_lens[0] if seq_lens else None
    image = image_sizes[0] if image_sizes else None
    return None, [load_model(source, overrides, seq_len=seq, image_size=image)]


def shape_value(spec: ModelSpec, shape: str) -> int | None:
    """The value of ``shape`` a spec runs at, from its ``extra`` facts (None when not stated)."""
    key = {"seq_len": "sequence_length", "image_size": "image_size"}[shape]
    value = spec.extra.get(key)
    if shape == "image_size" and value is None:
        value = spec.extra.get("latent_size")  # DiTs: the latent side
    return value if isinstance(value, int) else None
