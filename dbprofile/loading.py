"""Where a ModelSpec comes from, and the checks it passes before anything is measured:
presets and model files (``load_spec``), ecosystem models ``hf:NAME`` (transformers, or a
diffusers config), ``diffusers:NAME`` (diffusers' DiT) and ``timm:NAME``, the command line's
shape and config options (``--seq-len``, ``--image-size``, ``--set``) for every kind of
source, and the fake-tensor validation (``validate_spec``, ``checked_spec``).

Everything resolves to a ``ModelSpec``; nothing downstream knows where a model came from.
This module sits above ``models/`` (it imports the presets and the ecosystem adapters), so
``spec.py`` stays the contract that every layer may import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dbprofile.measure.fake import fake_mode, real_dtype_checks
from dbprofile.models import DEFAULT_PRESET, PRESETS, get_preset
from dbprofile.models.masked_lm import reschedule
from dbprofile.spec import ModelSpec, SpecError, check_loss, get_layers, infer_hidden_size
from dbprofile.torch_internals import FAKE_TENSOR_LIMITS

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
    for shape, value in (("seq_len", seq_len), ("image_size", image_size)):
        if value is not None and value < 1:  # checked here as for presets (reshape), not left to a config default
            raise SpecError(f"{SHAPE_OPTIONS[shape]} must be at least 1; got {value}.")
    if not name:
        raise SpecError(
            f"{source!r} names no model: write {prefix}:NAME, e.g. hf:gpt2, diffusers:DiT, timm:vit_base_patch16_224."
        )
    try:
        return _ecosystem_spec(prefix, name, overrides, seq_len, image_size)
    except SpecError:
        raise
    except Exception as err:  # the library's own failure on this config: one paragraph, not its traceback
        raise SpecError(
            f"{source}: the library could not make the model from its config and the options given: "
            f"{type(err).__name__}: {str(err).strip().rstrip('.')}. Check the --set, --seq-len and --image-size values."
        ) from None


def _ecosystem_spec(
    prefix: str, name: str, overrides: dict[str, str] | None, seq_len: int | None, image_size: int | None
) -> ModelSpec:
    if prefix == "hf":
        from dbprofile.models import hf

        return hf.make_spec(name, overrides, seq_len=seq_len, image_size=image_size)
    if seq_len is not None:
        raise SpecError(f"--seq-len applies to language models; {prefix}:{name} is a vision model (use --image-size).")
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
    masking_schedule: str | None = None,
) -> ModelSpec:
    """Any model source with the command line's options applied: ecosystem models take
    ``--set`` and shapes directly; presets and files take the shapes their spec declares
    (``ModelSpec.shapes``); a masked diffusion LM takes another masking schedule."""
    if masking_schedule is not None:
        spec = load_model(source, overrides, seq_len, image_size)
        return reschedule(spec, masking_schedule)
    if source is not None and is_ecosystem_source(source):
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
    masking_schedule: str | None = None,
) -> tuple[str | None, list[ModelSpec]]:
    """(the swept shape or None, one spec per value): several ``--seq-len`` or ``--image-size``
    values sweep that shape; one value (or none) gives one spec. Sweeping both at once is refused."""
    seq_lens, image_sizes = list(seq_lens or []), list(image_sizes or [])
    if len(seq_lens) > 1 and len(image_sizes) > 1:
        raise SpecError("Sweep one shape at a time: give several values to --seq-len or to --image-size, not both.")
    if len(seq_lens) > 1:
        image = image_sizes[0] if image_sizes else None
        return "seq_len", [load_model(source, overrides, n, image, masking_schedule) for n in seq_lens]
    if len(image_sizes) > 1:
        seq = seq_lens[0] if seq_lens else None
        return "image_size", [load_model(source, overrides, seq, n, masking_schedule) for n in image_sizes]
    seq = seq_lens[0] if seq_lens else None
    image = image_sizes[0] if image_sizes else None
    return None, [load_model(source, overrides, seq, image, masking_schedule)]


def shape_value(spec: ModelSpec, shape: str) -> int | None:
    """The value of ``shape`` a spec runs at, from its ``extra`` facts (None when not stated)."""
    key = {"seq_len": "sequence_length", "image_size": "image_size"}[shape]
    value = spec.extra.get(key)
    if shape == "image_size" and value is None:
        value = spec.extra.get("latent_size")  # DiTs: the latent side
    return value if isinstance(value, int) else None


# ---------------------------------------------------------------- loading model sources


def load_spec(source: ModelSpec | str | Path | None) -> ModelSpec:
    """Resolve a model source: None (the built-in default), a preset name, ``file.py[:name]``, or
    an ecosystem model (``hf:NAME``, ``diffusers:NAME``, ``timm:NAME``; ``load_ecosystem``)."""
    if source is None:
        return get_preset(DEFAULT_PRESET)
    if isinstance(source, ModelSpec):
        return source
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise SpecError(
            f"A model is a ModelSpec, a preset name, a file.py[:name] path or hf:/diffusers:/timm:NAME; "
            f"got {type(source).__name__} {source!r}."
        )
    if is_ecosystem_source(source):  # hf:NAME, diffusers:NAME, timm:NAME
        return load_ecosystem(source)
    path_part, _, obj_name = source.partition(":")
    if names_file(source):
        return _load_file(Path(path_part), obj_name or None)
    if source in PRESETS:
        return get_preset(source)
    close = difflib.get_close_matches(source, list(PRESETS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise SpecError(
        f"Unknown model {source!r}: it is neither a preset name nor a .py file.{hint} "
        "Run `dbprofile models` for the presets, or pass a model file such as examples/custom_resmlp.py."
    )


def names_file(source: str) -> bool:
    """Whether ``load_spec`` reads ``source`` as ``file.py[:name]``: by its spelling (.py, a slash, a suffix)."""
    return (part := source.partition(":")[0]).endswith(".py") or "/" in part or bool(Path(part).suffix)


def _load_file(path: Path, obj_name: str | None) -> ModelSpec:
    if not path.exists():
        raise SpecError(
            f"Model file {str(path)!r} does not exist (looked in {Path.cwd()}). "
            "Pass the path of a Python file that defines `spec`, e.g. examples/custom_resmlp.py."
        )
    module_name = f"dbprofile_user_{abs(hash(str(path.resolve())))}"
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise SpecError(f"Cannot import {str(path)!r}: it is not a Python source file.")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    except SpecError:
        raise
    except SyntaxError as err:
        raise SpecError(
            f"Model file {str(path)!r} has a syntax error at line {err.lineno}: {str(err.msg).rstrip('.')}. "
            "Fix the file and run again."
        ) from None
    except SystemExit as err:
        raise SpecError(_exit_message(f"Importing model file {str(path)!r}", err, path)) from None
    except KeyboardInterrupt as err:
        raise KeyboardInterrupt(f"while importing model file {str(path)!r}{_user_line(err, path)}") from None
    except Exception as err:  # the user's import-time code failed: point at their line
        line = _user_line(err, path)
        raise SpecError(
            f"Importing model file {str(path)!r} failed{line}: {type(err).__name__}: {err}. "
            "Fix the file (or install what it imports) and run again."
        ) from None
    name = obj_name or "spec"
    if not hasattr(module, name):
        found = [n for n, v in vars(module).items() if isinstance(v, ModelSpec)]
        hint = f" It defines these ModelSpec objects: {', '.join(found)}; pick one with {path}:NAME." if found else ""
        raise SpecError(
            f"Model file {str(path)!r} defines no {name!r}.{hint} Define `{name} = ModelSpec(...)` "
            "or a function returning one (see the protocol in the README)."
        )
    obj = getattr(module, name)
    if callable(obj) and not isinstance(obj, ModelSpec):
        try:
            obj = obj()
        except SpecError:
            raise
        except SystemExit as err:
            raise SpecError(_exit_message(f"Calling {name}() from {str(path)!r}", err, path)) from None
        except Exception as err:
            line = _user_line(err, path)
            raise SpecError(f"Calling {name}() from {str(path)!r} failed{line}: {type(err).__name__}: {err}.") from None
    if not isinstance(obj, ModelSpec):
        raise SpecError(
            f"{str(path)}:{name} is a {type(obj).__name__}, not a dbprofile.ModelSpec (or a function returning one)."
        )
    return obj


def _exit_message(what: str, err: SystemExit, path: Path | None = None) -> str:
    """A model's code called sys.exit() (or exit()/quit()): without this the run would end
    with that exit code and write nothing, looking like success for sys.exit(0)."""
    line = _user_line(err, path) if path is not None else ""
    return (
        f"{what} called sys.exit({err.code!r}){line}, which would end dbprofile without measuring anything. "
        'A model file must only define things; put script code under `if __name__ == "__main__":` '
        "and raise an exception instead of exiting."
    )


def _user_line(err: BaseException, path: Path) -> str:
    """' at line N' for the deepest traceback frame inside the user's file, if any."""
    resolved = str(path.resolve())
    line = None
    for frame in traceback.extract_tb(err.__traceback__):
        if str(Path(frame.filename).resolve()) == resolved:
            line = frame.lineno
    return f" at line {line}" if line is not None else ""


# ---------------------------------------------------------------- validation


class _FakeCannotRun(Exception):
    """The model's step needs tensor values (data-dependent control flow) that fake tensors lack."""


def validate_spec(
    spec: ModelSpec | str, max_blocks: int | None = None, require_residual: bool = True, fake_only: bool = True
) -> dict[str, Any]:
    """Build the model with fake tensors (no real memory), run its loss once and check it, and
    check the layers are residual (only ``require_residual``: DiffusionBlocks needs it,
    end-to-end training and checkpointing do not).

    A step that fake tensors cannot run (it reads a tensor's value: ``if float(x.max()) > 100``)
    is refused when ``fake_only`` (a fake run or a plan can only trace); otherwise (a real run)
    the checks run again on real CPU tensors at batch size 2, as the measurement will.

    Returns facts: number of layers, parameters, the hidden width (from the spec, a norm
    weight, or the traced hidden state's last dimension), and ``not_residual`` (why the layers
    are not residual, or None). Raises SpecError.
    """
    spec = load_spec(spec)  # a name or a path is checked as what it names
    try:
        with fake_mode():
            facts = _checked_step(spec, require_residual, fake=True)
    except _FakeCannotRun as err:
        if fake_only:
            raise SpecError(
                f"One step of model {spec.name!r} cannot run on fake tensors{err}: it reads a tensor's value "
                "(data-dependent control flow such as `if float(x.max()) > 100`), and fake tensors have "
                "shapes only. Fake runs and plans need a step that does not; a real run (without --fake) "
                "measures it as it is."
            ) from None
        facts = _checked_step(spec, require_residual, fake=False)
    if max_blocks is not None and max_blocks > facts["num_layers"]:
        raise SpecError(
            f"DiffusionBlocks with B={max_blocks} needs at least {max_blocks} layers; "
            f"{spec.name!r} has {facts['num_layers']}. Use --blocks with values up to {facts['num_layers']}."
        )
    return facts


def _build_hint(err: Exception, fake: bool) -> str:
    """Why a build that works in plain PyTorch fails here, where dbprofile knows."""
    if fake and "Couldn't swap" in str(err):
        # nn.Module._apply swaps every fake parameter, and a fake tensor's mode keeps a weak reference to it.
        return (
            " The model converts its own modules with .to() while it is built, which PyTorch cannot do to the "
            "fake tensors dbprofile builds models with (their parameters cannot be swapped), so it cannot be "
            "profiled or planned as it is; build those modules in the wanted dtype instead of converting them."
        )
    return ""


def _checked_step(spec: ModelSpec, require_residual: bool, fake: bool) -> dict[str, Any]:
    """``validate_spec``'s checks on fake tensors, or on real CPU ones (``fake=False``)."""
    try:
        model = spec.build()
    except SystemExit as err:
        raise SpecError(_exit_message(f"Building model {spec.name!r}", err)) from None
    except Exception as err:
        raise SpecError(
            f"Building model {spec.name!r} failed: {type(err).__name__}: {err}.{_build_hint(err, fake)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise SpecError(
            f"ModelSpec.build of {spec.name!r} returned a {type(model).__name__}, not an nn.Module. "
            "build() must return the model."
        )
    layers = get_layers(model, spec.layers, spec.name)
    shapes: list[tuple[int, tuple, tuple]] = []

    def check(index: int):
        def hook(_module, args, output):
            inp = next((a for a in args if isinstance(a, torch.Tensor)), None)
            out = output[0] if isinstance(output, (tuple, list)) else output
            if inp is not None and isinstance(out, torch.Tensor):
                shapes.append((index, tuple(inp.shape), tuple(out.shape)))

        return hook

    batch = _checked_batch(spec)
    handles = [layer.register_forward_hook(check(i)) for i, layer in enumerate(layers)]
    try:
        # With grad: a loss that is detached from the parameters is one of the mistakes to catch.
        with real_dtype_checks() if fake else contextlib.nullcontext():
            loss = spec.loss(model, batch)
    except SpecError:
        raise
    except SystemExit as err:
        raise SpecError(_exit_message(f"Running one step of model {spec.name!r}", err)) from None
    except FAKE_TENSOR_LIMITS as err:
        if not fake:
            raise
        raise _FakeCannotRun(_where(err)) from None
    except Exception as err:
        raise SpecError(
            f"Running one step of model {spec.name!r} (batch size 2) failed{_where(err)}: "
            f"{type(err).__name__}: {err}. {_step_hint(spec, err)}"
        ) from None
    finally:
        for h in handles:
            h.remove()
    check_loss(loss, spec.name)
    not_residual = next(
        (
            f"Layer {index} of {spec.layers!r} in {spec.name!r} maps shape {list(in_shape)} to "
            f"{list(out_shape)}: it is not shape-preserving, so it is not a residual layer "
            "(h + f(h)). DiffusionBlocks needs every layer in ModelSpec.layers to keep the hidden "
            "shape; move projections and heads out of that layer stack (e2e and ckpt do not need it)."
            for index, in_shape, out_shape in shapes
            if in_shape != out_shape
        ),
        None,
    )
    if not_residual and require_residual:
        raise SpecError(not_residual)
    if len(shapes) == 0:
        raise SpecError(
            f"The layers at {spec.layers!r} in {spec.name!r} never ran during the loss: "
            "ModelSpec.layers must name the layer stack that forward actually runs."
        )
    n_params = sum(p.numel() for p in model.parameters())
    hidden = spec.hidden_size or infer_hidden_size(layers) or (shapes[0][1][-1] if shapes else None)
    return {"num_layers": len(layers), "parameters": n_params, "hidden_size": hidden, "not_residual": not_residual}


def _checked_batch(spec: ModelSpec) -> Any:
    try:
        return spec.batch(2, "cpu")
    except SpecError:
        raise
    except SystemExit as err:
        raise SpecError(_exit_message(f"ModelSpec.batch of {spec.name!r}", err)) from None
    except Exception as err:
        raise SpecError(
            f"ModelSpec.batch(2, 'cpu') of {spec.name!r} failed{_where(err)}: {type(err).__name__}: {err}. "
            "batch(n, device) must return the dict of tensors that the loss reads."
        ) from None


def _where(err: BaseException) -> str:
    """' at FILE:LINE' for the deepest frame of the error outside torch and dbprofile: the line of
    the model (or of its library) that the step failed in."""
    skip = (str(Path(torch.__file__).parent), str(Path(__file__).parent))
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(skip)]
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _step_hint(spec: ModelSpec, err: Exception) -> str:
    """What to look at, for the kind of error: a key the loss reads that batch() lacks, or the
    model itself (for a library's model, the options that made its config)."""
    if isinstance(err, KeyError):
        return "The loss reads a key that ModelSpec.batch does not return: make the two agree."
    if spec.family.startswith(("hf", "diffusers", "timm")):
        return (
            "The model was built from its config with the options given (--set, --seq-len, --image-size); "
            "one of them may not suit it (a size the patch or head count does not divide, a token id past "
            "the vocabulary)."
        )
    return "Fix the model's forward or loss at that line (the step ran on fake tensors: shapes only)."


def checked_spec(
    spec: ModelSpec, require_residual: bool = True, fake_only: bool = True
) -> tuple[ModelSpec, dict[str, Any]]:
    """``validate_spec``, and the spec to run: with ``hidden_size`` filled in from what the
    validation found (a norm weight, or the traced hidden state's last dimension) where the spec
    leaves it out, so DiffusionBlocks never has to guess it later, half-way through a run."""
    facts = validate_spec(spec, require_residual=require_residual, fake_only=fake_only)
    if spec.hidden_size is None and facts["hidden_size"] is not None:
        spec = dataclasses.replace(spec, hidden_size=int(facts["hidden_size"]))
    return spec, facts
