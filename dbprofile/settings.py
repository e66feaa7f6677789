"""How a measurement runs: one settings object that the runner, the planner, the distributed
measurement, the GPU validation and the CLI pass down, instead of the same ten arguments
through a dozen signatures. Checked when it is made, so a bad value is refused before anything
is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbprofile.spec import SpecError
from dbprofile.units import size_bytes
from dbprofile.vocabulary import OPTIMIZER_ALGORITHMS, OPTIMIZERS, PRECISIONS

DEFAULT_STEPS = 5
DEFAULT_WARMUP_STEPS = 1


def unknown_precision(precision: object) -> SpecError:
    """The one message for a precision dbprofile does not train with (settings and trainers)."""
    return SpecError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")


def unknown_optimizer(name: object) -> SpecError:
    """The one message for an optimizer dbprofile does not build (settings and trainers)."""
    return SpecError(
        f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_ALGORITHMS)}, optionally with "
        "-loop, -foreach or -fused (e.g. adamw-fused)."
    )


UNSUPPORTED_OPTIMIZERS = {
    "adafactor-fused": "torch.optim.Adafactor has no fused implementation (it takes no fused argument)",
}
"""``algorithm-implementation`` pairs PyTorch does not build, and why."""


def check_optimizer(name: object) -> None:
    """Refuse, in one paragraph, an optimizer name dbprofile does not know or PyTorch does not build."""
    if name in UNSUPPORTED_OPTIMIZERS:
        algorithm = str(name).split("-")[0]
        raise SpecError(
            f"Optimizer {name!r} cannot be built: {UNSUPPORTED_OPTIMIZERS[str(name)]}. Nothing was measured. "
            f"Use --optimizer {algorithm} (PyTorch's default implementation for the device: foreach on CUDA, "
            f"the for-loop on the CPU), {algorithm}-foreach or {algorithm}-loop."
        )
    if name not in OPTIMIZERS:
        raise unknown_optimizer(name)


def optimizer_parts(name: str) -> tuple[str, str | None]:
    """('adamw', 'fused') for 'adamw-fused'; ('adamw', None) for 'adamw', PyTorch's default."""
    check_optimizer(name)
    algorithm, _, implementation = name.partition("-")
    return algorithm, implementation or None


def default_implementation(cuda: bool) -> str:
    """PyTorch's default for a step's parameters (``torch.optim.optimizer._default_to_fused_or_foreach``):
    foreach when every parameter is on a device with foreach kernels (CUDA), the for-loop otherwise;
    fused is never the default. On the CPU the for-loop keeps every CPU figure as it was."""
    return "foreach" if cuda else "loop"


def resolve_optimizer(name: str, cuda: bool) -> str:
    """``name`` with its implementation made explicit for a step on CUDA (``cuda``) or the CPU:
    'adamw' -> 'adamw-foreach' on CUDA, 'adamw-loop' on the CPU; an explicit name is kept."""
    algorithm, implementation = optimizer_parts(name)
    return f"{algorithm}-{implementation or default_implementation(cuda)}"


STATE_WARMUPS = ("off", "all", "after-first")


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """The settings of one measurement (every technique and batch size of a run shares them)."""

    device: str = "cpu"
    """Where to measure: 'cpu', 'cuda' or 'cuda:N'. In a fake run, the device the fake tensors
    stand for (they are tracked on the CPU)."""
    precision: str = "fp32"
    """'fp32', or 'bf16' (autocast; parameters and optimizer state stay fp32)."""
    optimizer: str = "adamw"
    """'adamw', 'sgd' or 'adafactor' (what the optimizer-state share holds), PyTorch's default
    implementation for the device, or with it named: 'adamw-loop', 'adamw-foreach', 'adamw-fused'."""
    warmup_steps: int = DEFAULT_WARMUP_STEPS
    """Untimed steps per unit before the tracked step, so the optimizer holds its state."""
    steps: int = DEFAULT_STEPS
    """At least this many timed steps per unit (timing adapts upwards; a fake run times none)."""
    fake: bool = False
    """Fake tensors (shapes only): any model size in seconds, bytes exact, no times."""
    memory_limit: int | None = None
    """Bytes: a tracked peak past it ends the technique as ``oom`` (a smaller card, simulated)."""
    time_limit_s: float | None = None
    """Seconds per technique (build, steps, ratios); past it the measurement is ``timeout``.
    None or 0: no limit."""
    memory_snapshot: str | Path | None = None
    """A directory for PyTorch memory snapshots of each tracked step (CUDA only)."""
    round_to: int | None = None
    """Per-storage rounding of tracked bytes (the planner passes CUDA's 512 for a CUDA target)."""
    emulate_cuda: bool = False
    """Fake runs standing for a CUDA device: replay every allocation through the caching-allocator
    model and follow CUDA's autocast order for the loss (dbprofile.measure.allocator, fake)."""
    micro_batches: int = 1
    """Gradient accumulation: forward and backward passes per optimizer step, each on a micro-batch of
    the measurement's batch size, the gradients accumulating in place. From the second micro-batch
    on every step is alike (all gradients resident), so 2 gives the peak of any count above 1."""
    compute_capability: tuple[int, int] = (9, 0)
    """The GPU an ``emulate_cuda`` run stands for (major, minor): which kernel each
    scaled_dot_product_attention call runs there (dbprofile.measure.cuda_attention)."""
    state_warmup: str = "off"
    """Fake runs: 'all' makes the optimizer state through the optimizer's own first step instead of
    warm-up steps, where that is the warmed-up measurement (dbprofile.measure.warmup checks it each
    time), else after a real step of the first unit, else by steps; 'after-first' starts there;
    'off' warms up by steps."""

    def __post_init__(self) -> None:
        self._check_types()
        if self.memory_limit is not None:
            # A size as the command line takes it ('2GiB'), stored as bytes.
            try:
                object.__setattr__(self, "memory_limit", size_bytes(self.memory_limit, "memory_limit", minimum=0))
            except ValueError as err:
                raise SpecError(str(err)) from None
        if self.steps < 1 or self.warmup_steps < 1:
            raise SpecError(
                f"steps and warmup_steps must be at least 1; got steps={self.steps}, warmup_steps={self.warmup_steps}."
            )
        if self.state_warmup not in STATE_WARMUPS:
            raise SpecError(f"state_warmup is one of {', '.join(STATE_WARMUPS)}; got {self.state_warmup!r}.")
        if self.micro_batches < 1:
            raise SpecError(f"micro_batches must be at least 1; got {self.micro_batches}.")
        if self.precision not in PRECISIONS:
            raise unknown_precision(self.precision)
        check_optimizer(self.optimizer)
        if self.time_limit_s is not None and not self.time_limit_s >= 0:  # also refuses nan
            raise SpecError(f"time_limit_s is seconds, 0 or more (0: no limit); got {self.time_limit_s}.")

    def _check_types(self) -> None:
        """Each field of the type it is documented with, so a wrong one is a sentence naming the
        field, not a TypeError from deep inside a measurement."""
        if not isinstance(self.device, str):
            if type(self.device).__name__ != "device":  # a torch.device stands for its string
                raise SpecError(f"device is a string such as 'cpu' or 'cuda:0'; got {self.device!r}.")
            object.__setattr__(self, "device", str(self.device))
        kinds: dict[str, tuple[type, ...]] = {
            "warmup_steps": (int,),
            "steps": (int,),
            "micro_batches": (int,),
            "fake": (bool,),
            "emulate_cuda": (bool,),
            "time_limit_s": (int, float, type(None)),
            "round_to": (int, type(None)),
            "memory_snapshot": (str, Path, type(None)),
        }
        for name, allowed in kinds.items():
            value = getattr(self, name)
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
                raise SpecError(f"{name} must be {names}; got {value!r}.")

    @classmethod
    def of(cls, settings: RunSettings | None = None, **fields: Any) -> RunSettings:
        """``settings`` (or the defaults) with ``fields`` replaced; an unknown name is refused
        with the list of the known ones."""
        if settings is not None and not isinstance(settings, RunSettings):
            raise TypeError(
                f"settings is a dbprofile.RunSettings (or give its fields by name: fake=True); got {settings!r}."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(
                f"Unknown run setting(s) {', '.join(unknown)}; the settings are {', '.join(sorted(known))}."
            )
        if "device" in fields and fields["device"] is not None:
            fields["device"] = str(fields["device"])
        return dataclasses.replace(settings or cls(), **fields)
