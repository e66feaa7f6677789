"""What a model source is: the ModelSpec contract, loading it from a file or a preset name,
and validating it early with one clear message per mistake.

A ModelSpec tells dbprofile how to build the user's model, make a batch, compute the
end-to-end loss, where the residual layers are (``layers``, a dotted path to an
``nn.ModuleList`` or ``nn.Sequential``) and which task DiffusionBlocks must cast as denoising. The batch and
call conventions per task (what DiffusionBlocks relies on) are in ``docs/protocol.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

TASKS = ("classification", "denoising", "causal-lm")

SHAPES = ("seq_len", "image_size")
"""Model shapes a spec may let the command line change (``ModelSpec.shapes``)."""

LayerStack = nn.ModuleList | nn.Sequential
"""The containers a ``layers`` path may name: a ModuleList the forward loops over, or an
nn.Sequential the forward calls (timm's ``blocks``)."""

Batch = dict[str, torch.Tensor]


class SpecError(ValueError):
    """A model source or configuration is wrong; the message says what and how to fix it."""


@dataclass(kw_only=True)
class ModelSpec:
    """How to build, feed and train one residual model.

    Batch conventions (``batch(batch_size, device)`` returns a dict):
      classification: ``inputs`` (model input), ``targets`` (int64 class ids, shape (N,));
        ``model(inputs)`` -> logits (N, num_classes), read from token 0 (a CLS token).
      denoising: ``inputs`` (clean data x0), optional ``labels`` (int64);
        ``model(x, noise_level, labels)`` -> a tensor shaped like x.
      causal-lm: ``inputs`` (int64 tokens (N, T)), ``targets`` (int64 next tokens (N, T));
        ``model(inputs)`` -> logits (N, T, num_classes).
    """

    name: str
    """Short name used in reports and file names."""
    build: Callable[[], nn.Module]
    """Returns a fresh model on the CPU (or the current default device), deterministic seed."""
    batch: Callable[[int, torch.device | str], Batch]
    """Returns one training batch of the given size on the given device."""
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    """The end-to-end training loss, a scalar."""
    layers: str
    """Dotted path from the model to the nn.ModuleList (or nn.Sequential) of residual layers, e.g. 'blocks'."""
    task: str
    """classification | denoising | causal-lm: how DiffusionBlocks casts the target."""
    hidden_size: int | None = None
    """Width of the residual stream; inferred from the layers' parameters when None."""
    num_classes: int | None = None
    """Classes (classification) or vocabulary size (causal-lm); None for denoising."""
    family: str = "custom"
    """Model family name (vit, dit, gpt, custom)."""
    description: str = ""
    """One line for listings."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form facts for reports (e.g. sequence length, image size)."""
    at_depth: Callable[[int], "ModelSpec"] | None = None
    """The same model with another number of residual layers, for the planner's depth extrapolation
    (dbprofile.measure.depth); the built-in families set it. None: the planner cuts a full build's
    layer list instead, which works for any model that loops over ``layers``."""
    shapes: dict[str, Callable[[int], "ModelSpec"]] = field(default_factory=dict)
    """Shapes the command line may change (``seq_len``, ``image_size``): each maps to a function
    returning this model's spec at that value (``--seq-len`` / ``--image-size``)."""
    position_adapter: Callable[..., Any] | None = None
    """For causal-lm models whose forward computes per-position tensors outside the layers (rotary
    tables, 4-D masks): ``adapter(model, layout)`` returns ``rewrite(layer, args, kwargs) -> (args,
    kwargs)``, which gives each active layer what matches a DiffusionBlocks ``SequenceLayout``
    (dbprofile.methods.diffusion_blocks.sequence_layout; docs/protocol.md). None: such models are
    refused for DiffusionBlocks with a message, e2e and ckpt still run."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError("ModelSpec.name must be a non-empty string.")
        for attr in ("build", "batch", "loss"):
            if not callable(getattr(self, attr)):
                raise SpecError(f"ModelSpec.{attr} must be callable; got {getattr(self, attr)!r}.")
        if self.task not in TASKS:
            raise SpecError(
                f"ModelSpec.task is {self.task!r}; it must be one of {', '.join(TASKS)}."
            )
        if not isinstance(self.layers, str) or not self.layers:
            raise SpecError("ModelSpec.layers must be a dotted path such as 'blocks' or 'transformer.h'.")
        unknown = sorted(set(self.shapes) - set(SHAPES))
        if unknown:
            raise SpecError(
                f"ModelSpec.shapes names {', '.join(map(repr, unknown))}; the shapes the command line can "
                f"change are {', '.join(SHAPES)}."
            )
        if self.task in ("classification", "causal-lm") and self.num_classes is None:
            raise SpecError(
                f"ModelSpec.num_classes is required for task {self.task!r} "
                "(the number of classes, or the vocabulary size for causal-lm)."
            )


def get_layers(model: nn.Module, path: str, spec_name: str = "model") -> LayerStack:
    """Follow the dotted ``layers`` path to an nn.ModuleList or nn.Sequential; raise SpecError
    naming the missing part."""
    obj: Any = model
    walked = []
    for part in path.split("."):
        if not hasattr(obj, part):
            children = [n for n, _ in obj.named_children()] if isinstance(obj, nn.Module) else []
            where = ".".join(walked) or type(model).__name__
            hint = f" Its children are: {', '.join(children)}." if children else ""
            raise SpecError(
                f"layers path {path!r} not found in {spec_name}: {where} has no attribute "
                f"{part!r}.{hint} Set ModelSpec.layers to the dotted path of the layer stack "
                "that holds the residual layers."
            )
        obj = getattr(obj, part)
        walked.append(part)
    if not isinstance(obj, (nn.ModuleList, nn.Sequential)):
        raise SpecError(
            f"layers path {path!r} in {spec_name} is a {type(obj).__name__}, not an nn.ModuleList or "
            "nn.Sequential. Point ModelSpec.layers at the container of residual layers."
        )
    if len(obj) == 0:
        raise SpecError(f"layers path {path!r} in {spec_name} is an empty {type(obj).__name__}.")
    return obj


def like_stack(original: LayerStack, layers: Iterable[nn.Module]) -> LayerStack:
    """A container of ``layers`` of the same kind as ``original``: the model's forward either
    loops over a ModuleList or calls a Sequential, and a swapped-in stack must support the same."""
    return nn.Sequential(*layers) if isinstance(original, nn.Sequential) else nn.ModuleList(layers)


def set_layers(model: nn.Module, path: str, layers: LayerStack) -> None:
    """Replace the layer stack at the dotted path (used to run one DiffusionBlocks block)."""
    *parents, last = path.split(".")
    obj: Any = model
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, layers)


def infer_hidden_size(layers: LayerStack) -> int | None:
    """The residual width: the last dimension of the first LayerNorm/RMSNorm-like weight."""
    for module in layers[0].modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1 and "norm" in type(module).__name__.lower():
            return int(weight.shape[0])
    return None


# ---------------------------------------------------------------- loading model sources


def load_spec(source: str | None) -> ModelSpec:
    """Resolve a model source: None (the built-in default), a preset name, ``file.py[:name]``, or
    an ecosystem model (``hf:NAME``, ``diffusers:NAME``, ``timm:NAME``; dbprofile.models.sources)."""
    from dbprofile.models import DEFAULT_PRESET, PRESETS, get_preset

    if source is None:
        return get_preset(DEFAULT_PRESET)
    if isinstance(source, ModelSpec):
        return source
    from dbprofile.models.sources import is_ecosystem_source, load_ecosystem

    if is_ecosystem_source(source):  # hf:NAME, diffusers:NAME, timm:NAME
        return load_ecosystem(source)
    path_part, _, obj_name = source.partition(":")
    if path_part.endswith(".py") or "/" in path_part or Path(path_part).suffix:
        return _load_file(Path(path_part), obj_name or None)
    if source in PRESETS:
        return get_preset(source)
    close = difflib.get_close_matches(source, list(PRESETS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise SpecError(
        f"Unknown model {source!r}: it is neither a preset name nor a .py file.{hint} "
        "Run `dbprofile models` for the presets, or pass a model file such as examples/custom_resmlp.py."
    )


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
            raise SpecError(
                f"Calling {name}() from {str(path)!r} failed{line}: {type(err).__name__}: {err}."
            ) from None
    if not isinstance(obj, ModelSpec):
        raise SpecError(
            f"{str(path)}:{name} is a {type(obj).__name__}, not a dbprofile.ModelSpec "
            "(or a function returning one)."
        )
    return obj


def _exit_message(what: str, err: SystemExit, path: Path | None = None) -> str:
    """A model's code called sys.exit() (or exit()/quit()): without this the run would end
    with that exit code and write nothing, looking like success for sys.exit(0)."""
    line = _user_line(err, path) if path is not None else ""
    return (
        f"{what} called sys.exit({err.code!r}){line}, which would end dbprofile without measuring anything. "
        "A model file must only define things; put script code under `if __name__ == \"__main__\":` "
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


def validate_spec(spec: ModelSpec, max_blocks: int | None = None, require_residual: bool = True) -> dict[str, Any]:
    """Build the model with fake tensors (no real memory), run its loss once and check it, and
    check the layers are residual (only ``require_residual``: DiffusionBlocks needs it,
    end-to-end training and checkpointing do not).

    Returns facts: number of layers, parameters, the hidden width (from the spec, a norm
    weight, or the traced hidden state's last dimension), and ``not_residual`` (why the layers
    are not residual, or None). Raises SpecError.
    """
    from dbprofile.measure.fake import fake_mode

    with fake_mode():
        try:
            model = spec.build()
        except SystemExit as err:
            raise SpecError(_exit_message(f"Building model {spec.name!r}", err)) from None
        except Exception as err:
            raise SpecError(f"Building model {spec.name!r} failed: {type(err).__name__}: {err}.") from None
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

        handles = [layer.register_forward_hook(check(i)) for i, layer in enumerate(layers)]
        try:
            batch = spec.batch(2, "cpu")
            # With grad: a loss that is detached from the parameters is one of the mistakes to catch.
            loss = spec.loss(model, batch)
        except SpecError:
            raise
        except SystemExit as err:
            raise SpecError(_exit_message(f"Running one step of model {spec.name!r}", err)) from None
        except Exception as err:
            raise SpecError(
                f"Running one step of model {spec.name!r} failed: {type(err).__name__}: {err}. "
                "Check that ModelSpec.batch and ModelSpec.loss work together."
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
    if max_blocks is not None and max_blocks > len(layers):
        raise SpecError(
            f"DiffusionBlocks with B={max_blocks} needs at least {max_blocks} layers; "
            f"{spec.name!r} has {len(layers)}. Use --blocks with values up to {len(layers)}."
        )
    return {"num_layers": len(layers), "parameters": n_params, "hidden_size": hidden, "not_residual": not_residual}


def checked_spec(spec: ModelSpec, require_residual: bool = True) -> tuple[ModelSpec, dict[str, Any]]:
    """``validate_spec``, and the spec to run: with ``hidden_size`` filled in from what the
    validation found (a norm weight, or the traced hidden state's last dimension) where the spec
    leaves it out, so DiffusionBlocks never has to guess it later, half-way through a run."""
    facts = validate_spec(spec, require_residual=require_residual)
    if spec.hidden_size is None and facts["hidden_size"] is not None:
        spec = dataclasses.replace(spec, hidden_size=int(facts["hidden_size"]))
    return spec, facts


def check_loss(loss: Any, name: str) -> None:
    """The loss must be a floating-point scalar tensor attached to the model's parameters:
    anything else fails e2e's backward while DiffusionBlocks (which computes its own loss)
    would still report numbers, so it is refused before anything is measured."""
    fix = "ModelSpec.loss must return the scalar training loss as a tensor, e.g. F.cross_entropy(logits, targets)."
    if not isinstance(loss, torch.Tensor):
        raise SpecError(f"ModelSpec.loss of {name!r} returned {type(loss).__name__} {loss!r:.40}, not a tensor. {fix}")
    if loss.numel() != 1:
        raise SpecError(
            f"ModelSpec.loss of {name!r} returned a tensor of shape {list(loss.shape)}, not a scalar: reduce it "
            f"(e.g. .mean()). {fix}"
        )
    if not loss.is_floating_point():
        raise SpecError(f"ModelSpec.loss of {name!r} returned a {loss.dtype} tensor; a loss is floating point. {fix}")
    if not loss.requires_grad:
        raise SpecError(
            f"ModelSpec.loss of {name!r} returned a tensor that does not require grad: it is not connected to the "
            "model's parameters (a .detach(), .item(), torch.no_grad() or a new tensor on the way), so "
            f"backward cannot train anything. {fix}"
        )
