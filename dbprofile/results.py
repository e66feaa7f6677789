"""Result data: one ``Measurement`` per technique (and per block for DiffusionBlocks), a
``RunResult`` holding a run's measurements and environment, their JSON form (with a schema
version) and a pandas DataFrame view. Every memory figure is an integer number of bytes;
units are applied only when presenting (``format_bytes``)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

# The share categories of a peak, in display order. They sum to the peak exactly.
# ``workspace`` is CUDA-only: allocator bytes that no tensor holds (the cuBLAS handles'
# workspaces, and scratch a kernel allocates and frees inside one op, e.g. attention backward
# or cuDNN convolutions), read from the allocator's own counters around every op. It is 0 on
# the CPU and in fake runs; the planner adds the cuBLAS part as a documented correction.
CATEGORIES = (
    "parameters",
    "buffers",
    "gradients",
    "optimizer_state",
    "activations",
    "temporaries",
    "inputs",
    "workspace",
    "communication",
)
"""``communication`` is FSDP-only (dbprofile.measure.distributed): the all-gather and reduce-scatter
buffers, i.e. the all-gather input and output, the unsharded parameters a unit computes with and the
reduce-scatter input. It is 0 on a single device and under db:B+parallel."""

STATUSES = ("ok", "oom", "error", "nan")


UNIT_BYTES = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
"""The IEC units a table or chart picks from, and their size in bytes."""


def pick_unit(max_bytes: int, smallest: str = "KiB") -> str:
    """The one IEC unit a table or chart uses for all its numbers: the largest unit (up to GiB)
    that ``max_bytes`` reaches, and never below ``smallest``."""
    units = list(UNIT_BYTES)
    for unit in reversed(units[units.index(smallest):]):
        if max_bytes >= UNIT_BYTES[unit]:
            return unit
    return smallest


def format_bytes(n: int | float | None, unit: str | None = None, digits: int = 2) -> str:
    """IEC (1024-based) units with correct labels: 1536 -> '1.50 KiB'."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    if unit is not None:
        power = units.index(unit)
    else:
        power = 0
        while power < len(units) - 1 and abs(n) >= 1024 ** (power + 1):
            power += 1
    if power == 0:
        return f"{int(n)} B"
    return f"{n / 1024 ** power:.{digits}f} {units[power]}"


def per_sample(training_flops: int | None, batch_size: int) -> float | None:
    """FLOPs that train every layer once on one sample (None when not counted)."""
    return training_flops / batch_size if training_flops is not None and batch_size > 0 else None


@dataclass(kw_only=True)
class BlockMeasurement:
    """The peak of steps that train one DiffusionBlocks block."""

    block: int
    """Block index (0 = next to the input, the highest noise range)."""
    layers: list[int]
    """Indices of the residual layers in this block."""
    peak_bytes: int
    shares: dict[str, int]
    peak_phase: str
    step_time_s: float | None = None
    transfer_time_s: float | None = None
    step_flops: int | None = None
    """FLOPs of one training step of this block (dbprofile.measure.flops)."""


@dataclass(kw_only=True)
class Measurement:
    """One technique at one batch size: the peak of a training step split into shares."""

    technique: str
    batch_size: int
    precision: str = "fp32"
    optimizer: str = "adamw"
    device: str = "cpu"
    fake: bool = False
    status: str = "ok"
    """ok | oom | error | nan (the step ran but the loss was not finite)."""
    error: str | None = None
    """The failure's message for oom / error / nan."""
    peak_bytes: int = 0
    """Largest total of live tracked tensor bytes during a measured step."""
    shares: dict[str, int] = field(default_factory=dict)
    """Bytes by category at the instant of the peak; sums to peak_bytes exactly."""
    peak_phase: str | None = None
    """forward | backward | optimizer | transfer: the phase in which the peak happened."""
    peak_block: int | None = None
    """For DiffusionBlocks: the block whose step has the largest peak (the reported one)."""
    blocks: list[BlockMeasurement] = field(default_factory=list)
    timeline: dict[str, Any] = field(default_factory=dict)
    """{'categories': [...], 'phases': [...], 'points': [[phase_index, bytes per category...], ...]}."""
    step_time_s: float | None = None
    """Median wall time of a measured step (synchronised on CUDA); worst block for DiffusionBlocks."""
    step_time_spread_s: list[float] | None = None
    """[min, max] of the measured step times."""
    block_steps_time_s: float | None = None
    """DiffusionBlocks: sum over blocks of their median step times (B block-steps)."""
    transfer_time_s: float | None = None
    """db:B+offload: median host<->device transfer time per step."""
    training_flops: int | None = None
    """FLOPs to train every layer once on one batch, counted by PyTorch's FlopCounterMode on the
    tracked step (matmuls, convolutions, attention; forward, backward and checkpointing's
    recomputation; dbprofile.measure.flops): one step for e2e and ckpt, the sum of the B
    block-steps (one per block, each with its own figure in ``blocks``) for DiffusionBlocks."""
    num_parameters: int | None = None
    extra_parameters: int | None = None
    """Parameters the technique adds to the user's model (AdaLN-Zero, sigma embedder, ...)."""
    losses: list[float] = field(default_factory=list)
    cuda: dict[str, Any] | None = None
    """On CUDA: max_memory_allocated, max_memory_reserved, nvml_used_bytes (or None when unavailable)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Technique-specific facts, e.g. activation ratios for DiffusionBlocks."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def flops_per_sample(self) -> float | None:
        """training_flops per sample of the batch: the compute that trains every layer on one sample."""
        return per_sample(self.training_flops, self.batch_size)

    def share_fraction(self, category: str) -> float:
        return self.shares.get(category, 0) / self.peak_bytes if self.peak_bytes else 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Measurement":
        data = dict(data)
        data["blocks"] = [BlockMeasurement(**b) for b in data.get("blocks", [])]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(kw_only=True)
class RunResult:
    """A profiling run: the model, the environment, the command, and every measurement."""

    model: str
    schema_version: int = SCHEMA_VERSION
    model_info: dict[str, Any] = field(default_factory=dict)
    """family, task, num_layers, parameters, hidden_size."""
    environment: dict[str, Any] = field(default_factory=dict)
    """torch, python, dbprofile versions; device name and capacity; driver."""
    command: str = ""
    """The exact command line that reproduces the run."""
    created: str = ""
    measurements: list[Measurement] = field(default_factory=list)
    from_checkpoint: bool = False
    """The team must continue from an existing end-to-end checkpoint (the verdict rules DiffusionBlocks
    out); default: training from scratch."""

    def get(self, technique: str, batch_size: int | None = None) -> Measurement | None:
        for m in self.measurements:
            if m.technique == technique and (batch_size is None or m.batch_size == batch_size):
                return m
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=True)

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename) so an interrupted run never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResult":
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"Result file has schema_version {version!r}; this dbprofile reads version {SCHEMA_VERSION}. "
                "Re-run the profile with this version."
            )
        data = dict(data)
        data["measurements"] = [Measurement.from_dict(m) for m in data.get("measurements", [])]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> "RunResult":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"Result file {str(path)!r} does not exist.") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"Result file {str(path)!r} is not valid JSON ({err}).") from None
        return cls.from_dict(data)

    def to_dataframe(self):
        """One row per measurement: technique, batch size, status, peak and each share in bytes."""
        import pandas as pd

        rows = []
        for m in self.measurements:
            row = {
                "model": self.model,
                "technique": m.technique,
                "batch_size": m.batch_size,
                "precision": m.precision,
                "optimizer": m.optimizer,
                "device": m.device,
                "fake": m.fake,
                "status": m.status,
                "peak_bytes": m.peak_bytes,
                "peak_phase": m.peak_phase,
                "peak_block": m.peak_block,
                "step_time_s": m.step_time_s,
                "block_steps_time_s": m.block_steps_time_s,
                "training_flops": m.training_flops,
            }
            for cat in CATEGORIES:
                row[f"{cat}_bytes"] = m.shares.get(cat, 0)
            if m.cuda:
                for key, value in m.cuda.items():
                    row[key] = value
            rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        lines = [f"RunResult({self.model!r}, {len(self.measurements)} measurements)"]
        for m in self.measurements:
            peak = format_bytes(m.peak_bytes) if m.ok else m.status.upper()
            lines.append(f"  {m.technique:<16} batch {m.batch_size:<5} peak {peak}")
        return "\n".join(lines)


# ---------------------------------------------------------------- plans (dbprofile.plan)


@dataclass(kw_only=True)
class PlanEntry:
    """One planned configuration: a technique at a batch size on the target, predicted from a
    fake-tensor run plus the documented CUDA corrections (see dbprofile.plan)."""

    technique: str
    """Technique name; 'db:B+parallel' is DiffusionBlocks with one block per device."""
    batch_size: int
    """Batch size per device."""
    status: str = "ok"
    """ok | error (the fake run failed; ``error`` says why)."""
    error: str | None = None
    tracked_peak_bytes: int = 0
    """Predicted peak of live tensor bytes per device (after sharding); the shares sum to it."""
    shares: dict[str, int] = field(default_factory=dict)
    """Bytes by category at the peak, per device; sums to tracked_peak_bytes exactly."""
    corrections: dict[str, int] = field(default_factory=dict)
    """CUDA effects a tensor tracker cannot see, in bytes: cublas_workspace, allocator_segments,
    cuda_context (empty when the target is the CPU). The 512-byte block rounding of each tensor is
    already in the shares for a CUDA target."""
    peak_bytes: int = 0
    """Predicted device memory needed: tracked_peak_bytes + sum(corrections)."""
    fits: bool | None = None
    """peak_bytes <= capacity (None when no capacity is known)."""
    headroom_bytes: int | None = None
    """capacity - peak_bytes (negative when it does not fit)."""
    max_batch_size: int | None = None
    """Largest batch size per device whose prediction fits (0: not even batch size 1)."""
    peak_phase: str | None = None
    peak_block: int | None = None
    num_parameters: int | None = None
    extra_parameters: int | None = None
    """Parameters the technique adds (AdaLN-Zero modulation, sigma embedder)."""
    world_size: int = 1
    """Devices this configuration uses."""
    sharding: str = "none"
    """none | zero-1 | zero-2 | zero-3 | block-parallel."""
    linear_fit: dict[str, Any] = field(default_factory=dict)
    """The batch-size model peak(b) = fixed_bytes + per_sample_bytes * b and the points it came from."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Technique-specific facts carried over from the fake run (e.g. activation ratios)."""
    training_flops: int | None = None
    """FLOPs to train every layer once on one batch of ``batch_size`` (Measurement.training_flops):
    one step, or DiffusionBlocks' B block-steps; whole-model work, whatever the sharding."""
    block_step_flops: list[int] = field(default_factory=list)
    """DiffusionBlocks: the FLOPs of each block's step, block 0 first (they sum to training_flops)."""
    flops_per_sample: float | None = None
    """training_flops / batch_size: the compute that trains every layer once on one sample."""
    time_per_million_samples_s: float | None = None
    """Estimated seconds to train on a million samples on the target's ``world_size`` devices at the
    plan's ``utilisation`` of their peak FLOPS (None without a known peak): an illustration."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def share_fraction(self, category: str) -> float:
        return self.shares.get(category, 0) / self.tracked_peak_bytes if self.tracked_peak_bytes else 0.0


@dataclass(kw_only=True)
class Plan:
    """What each technique would need for one model, batch size and target device."""

    model: str
    model_info: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    """The target: a GPU table name, 'cpu', or 'custom' for a capacity given in bytes."""
    capacity_bytes: int | None = None
    batch_size: int = 1
    precision: str = "fp32"
    optimizer: str = "adamw"
    zero_stage: int = 0
    world_size: int = 1
    cuda_corrections: bool = False
    """Whether the CUDA corrections were applied (a CUDA target) or not (the CPU)."""
    entries: list[PlanEntry] = field(default_factory=list)
    verdict: Any = None
    """A dbprofile.verdict.Verdict (kept untyped here so results.py imports nothing above it)."""
    elapsed_s: float | None = None
    """Wall time the planning took."""
    from_checkpoint: bool = False
    """The team must continue from an existing end-to-end checkpoint (default: training from scratch)."""
    peak_flops: int | None = None
    """The target's peak dense FLOPS per second at the plan's precision (dbprofile.gpus), if known."""
    utilisation: float | None = None
    """The share of peak_flops assumed for time estimates (dbprofile.plan.ASSUMED_UTILISATION)."""

    def get(self, technique: str) -> PlanEntry | None:
        for entry in self.entries:
            if entry.technique == technique:
                return entry
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=True)

    def __repr__(self) -> str:
        from dbprofile.plan import format_plan

        return format_plan(self)

    def _repr_html_(self) -> str:
        from dbprofile.plan import format_plan_html

        return format_plan_html(self)
