"""What a model source is: the ModelSpec contract and the helpers that read it (the layer
stack, the loss check). Loading a spec (presets, files, ecosystem models) and validating it
live in ``dbprofile.loading``, above ``models/``; this module imports nothing of dbprofile,
so every layer may import it.

A ModelSpec tells dbprofile how to build the user's model, make a batch, compute the
end-to-end loss, where the residual layers are (``layers``, a dotted path to an
``nn.ModuleList`` or ``nn.Sequential``) and which task DiffusionBlocks must cast as denoising. The batch and
call conventions per task (what DiffusionBlocks relies on) are in ``docs/protocol.md``.

Importing it does not import torch (the warm plan's fast path, dbprofile.cli.warm_plan, reads
``SpecError`` and never builds a model): the helpers import it when called, and the torch types
``LayerStack`` and ``Batch`` are made when first imported from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import TypeAlias

    import torch
    from torch import nn

    LayerStack: TypeAlias = nn.ModuleList | nn.Sequential
    Batch: TypeAlias = dict[str, torch.Tensor]

TASKS = ("classification", "denoising", "causal-lm", "masked-diffusion-lm")

SHAPES = ("seq_len", "image_size")
"""Model shapes a spec may let the command line change (``ModelSpec.shapes``)."""


def __getattr__(name: str) -> Any:
    """``LayerStack``: the containers a ``layers`` path may name (a ModuleList the forward loops
    over, or an nn.Sequential the forward calls: timm's ``blocks``); ``Batch``: a batch, tensors by
    name. Made on first use, so that importing this module does not import torch."""
    if name == "LayerStack":
        from torch import nn

        return nn.ModuleList | nn.Sequential
    if name == "Batch":
        import torch

        return dict[str, torch.Tensor]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
      masked-diffusion-lm: ``inputs`` (int64 clean tokens (N, T), ids below ``mask_token_id``);
        ``model(tokens)`` -> logits (N, T, num_classes), bidirectional (dbprofile.masked_diffusion).
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
    """classification | denoising | causal-lm | masked-diffusion-lm: how DiffusionBlocks casts the target."""
    hidden_size: int | None = None
    """Width of the residual stream; inferred from the layers' parameters when None."""
    num_classes: int | None = None
    """Classes (classification) or vocabulary size (the language-model tasks); None for denoising."""
    mask_token_id: int | None = None
    """masked-diffusion-lm: the absorbing [MASK] token, the last id of the vocabulary (num_classes - 1)."""
    family: str = "custom"
    """Model family name (vit, dit, gpt, custom)."""
    description: str = ""
    """One line for listings."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form facts for reports (e.g. sequence length, image size)."""
    at_depth: Callable[[int], ModelSpec] | None = None
    """The same model with another number of residual layers, for the planner's depth extrapolation
    (dbprofile.measure.depth); the built-in families set it. None: the planner cuts a full build's
    layer list instead, which works for any model that loops over ``layers``."""
    shapes: dict[str, Callable[[int], ModelSpec]] = field(default_factory=dict)
    """Shapes the command line may change (``seq_len``, ``image_size``): each maps to a function
    returning this model's spec at that value (``--seq-len`` / ``--image-size``)."""
    batch_dependent_loss: bool = False
    """True when the loss depends on the batch as a whole (in-batch contrastive negatives; BatchNorm
    layers are found without it): gradient accumulation over micro-batches would train something
    else, so the planner's verdict does not offer it."""
    position_adapter: Callable[..., Any] | None = None
    """For causal-lm models whose forward computes per-position tensors outside the layers (rotary
    tables, 4-D masks): ``adapter(model, layout)`` returns ``rewrite(layer, args, kwargs) -> (args,
    kwargs)``, which gives each active layer what matches a DiffusionBlocks ``SequenceLayout``
    (dbprofile.sequence_layout; docs/protocol.md). None: such models are
    refused for DiffusionBlocks with a message, e2e and ckpt still run."""

    observe: Callable[[nn.Module], AbstractContextManager[dict[str, Any]]] | None = None
    """For facts a fake run cannot know (a mixture-of-experts model's routing): ``observe(model)`` is
    a context manager around the real tracked steps that fills the dict it yields with what they saw;
    the runner keeps it in ``Measurement.extra['observed']``. It must make no tensor the memory
    tracker would count (real and fake bytes must agree)."""

    masking_schedule: str = "linear"
    """masked-diffusion-lm: the masking schedule alpha_t (dbprofile.masked_diffusion.SCHEDULES) that the
    spec's loss trains with; DiffusionBlocks' blocks and sampler use the same one."""
    rescheduled: Callable[[str], ModelSpec] | None = None
    """masked-diffusion-lm: ``rescheduled(name)`` is this model with its loss on another masking schedule
    (``--masking-schedule``); None where the spec's loss cannot change it (a user's own loss)."""
    routed_modules: Callable[[nn.Module], list[nn.Module]] | None = None
    """For mixture-of-experts models: ``routed_modules(model)`` returns the modules whose forward
    routes tokens to experts (router, dispatch, experts, combine). The tracker tags what their
    forwards make and a measurement reports those bytes at its peak (``extra['moe_at_peak']``,
    dbprofile.measure.regions)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError("ModelSpec.name must be a non-empty string.")
        for attr in ("build", "batch", "loss"):
            if not callable(getattr(self, attr)):
                raise SpecError(f"ModelSpec.{attr} must be callable; got {getattr(self, attr)!r}.")
        if self.task not in TASKS:
            raise SpecError(f"ModelSpec.task is {self.task!r}; it must be one of {', '.join(TASKS)}.")
        if not isinstance(self.layers, str) or not self.layers:
            raise SpecError("ModelSpec.layers must be a dotted path such as 'blocks' or 'transformer.h'.")
        unknown = sorted(set(self.shapes) - set(SHAPES))
        if unknown:
            raise SpecError(
                f"ModelSpec.shapes names {', '.join(map(repr, unknown))}; the shapes the command line can "
                f"change are {', '.join(SHAPES)}."
            )
        if self.task != "denoising" and self.num_classes is None:
            raise SpecError(
                f"ModelSpec.num_classes is required for task {self.task!r} "
                "(the number of classes, or the vocabulary size for a language model)."
            )
        if self.task == "masked-diffusion-lm" and self.mask_token_id != (self.num_classes or 0) - 1:
            raise SpecError(
                f"ModelSpec.mask_token_id is {self.mask_token_id!r}; task 'masked-diffusion-lm' needs the [MASK] "
                f"token to be the last id of the vocabulary, num_classes - 1 = {(self.num_classes or 0) - 1}."
            )
        for size in ("hidden_size", "num_classes"):
            value = getattr(self, size)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SpecError(f"ModelSpec.{size} must be a positive integer (or None); got {value!r}.")


def get_layers(model: nn.Module, path: str, spec_name: str = "model") -> LayerStack:
    """Follow the dotted ``layers`` path to an nn.ModuleList or nn.Sequential; raise SpecError
    naming the missing part."""
    from torch import nn

    obj: Any = model
    walked: list[str] = []
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
    from torch import nn

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
    import torch

    for module in layers[0].modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1 and "norm" in type(module).__name__.lower():
            return int(weight.shape[0])
    return None


def check_loss(loss: Any, name: str) -> None:
    """The loss must be a floating-point scalar tensor attached to the model's parameters:
    anything else fails e2e's backward while DiffusionBlocks (which computes its own loss)
    would still report numbers, so it is refused before anything is measured."""
    import torch

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
