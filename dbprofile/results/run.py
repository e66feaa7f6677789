"""A profiling run's data: one ``Measurement`` per technique and batch size (and per block
for DiffusionBlocks) in a ``RunResult`` with the environment, the command and the verdict;
their JSON form (with a schema version, read back through ``validate_result``) and a pandas
DataFrame view. Every memory figure is an integer number of bytes; units are applied only
when presenting (``dbprofile.units``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dbprofile.files import to_standard_json, write_atomic
from dbprofile.results import views
from dbprofile.results.verdict import Verdict
from dbprofile.schema import (
    ResultSchemaError,
    check_fields,
    check_value,
    fail,
    is_instance,
    show,
)
from dbprofile.spec import ModelSpec
from dbprofile.units import format_bytes
from dbprofile.vocabulary import CATEGORIES, Status

SCHEMA_VERSION = 1


def known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``data`` that are fields of ``cls``: a newer file's extra keys are ignored."""
    known = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in known}


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
    """Median time of this block's step."""
    step_time_iqr_s: float | None = None
    """Interquartile range of this block's step times."""
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
    status: Status = "ok"
    """ok | oom | error | nan (the step ran but the loss was not finite) | timeout."""
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
    """Median wall time of a timed step (torch.utils.benchmark, synchronised on CUDA); the worst
    block's for DiffusionBlocks."""
    step_time_iqr_s: float | None = None
    """Interquartile range of the timed steps (the middle half of them spans this many seconds)."""
    step_time_spread_s: list[float] | None = None
    """[min, max] of the timed steps (per timing block: a block averages one or more steps)."""
    block_steps_time_s: float | None = None
    """DiffusionBlocks: sum over blocks of their median step times (B block-steps)."""
    block_steps_time_iqr_s: float | None = None
    """DiffusionBlocks: sum of the blocks' interquartile ranges (the spread of B block-steps if the
    blocks' noise moved together; an upper bound otherwise)."""
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
    losses: list[float | None] = field(default_factory=list)
    """The measured steps' losses; null where a loss was not finite (status ``nan``)."""
    cuda: dict[str, Any] | None = None
    """On CUDA: max_memory_allocated, max_memory_reserved, nvml_used_bytes (or None when unavailable)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Technique-specific facts, e.g. activation ratios for DiffusionBlocks."""
    memory_snapshots: list[str] = field(default_factory=list)
    """PyTorch memory snapshot pickles of the tracked step (``--memory-snapshot``, CUDA only): one
    file, or one per block for DiffusionBlocks, in block order. Open them at pytorch.org/memory_viz."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def flops_per_sample(self) -> float | None:
        """training_flops per sample of the batch: the compute that trains every layer on one sample (a
        gradient-accumulating step trains ``extra['micro_batches']`` micro-batches of ``batch_size``)."""
        return per_sample(self.training_flops, self.batch_size * int(self.extra.get("micro_batches", 1)))

    def share_fraction(self, category: str) -> float:
        return self.shares.get(category, 0) / self.peak_bytes if self.peak_bytes else 0.0

    @classmethod
    def failed(cls, technique: str, batch_size: int, error: str, **fields: Any) -> Measurement:
        """A measurement that produced no figures: ``status`` 'error' unless ``fields`` says otherwise
        (the runner's, the planner's and the distributed ranks' failures, made one way)."""
        fields.setdefault("status", "error")
        return cls(technique=technique, batch_size=batch_size, error=error, **fields)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        data = dict(data)
        data["blocks"] = [BlockMeasurement(**known_fields(BlockMeasurement, b)) for b in data.get("blocks", [])]
        return cls(**known_fields(cls, data))


def model_info_of(spec: ModelSpec, num_layers: int) -> dict[str, Any]:
    """What a run records of its model (``RunResult.model_info``); the parameter count joins it
    once the e2e measurement has counted it. One function for the single-device runner and the
    distributed one, so their results compare key by key."""
    return {
        "family": spec.family,
        "task": spec.task,
        "num_layers": num_layers,
        "hidden_size": spec.hidden_size,
        "description": spec.description,
        # The shapes --seq-len / --image-size set, so a sweep's runs can be told apart and drawn.
        **{key: spec.extra[key] for key in ("sequence_length", "image_size", "latent_size") if key in spec.extra},
        # Masked diffusion LMs: the masking schedule their loss trains on (--masking-schedule).
        **({"masking_schedule": spec.masking_schedule} if spec.task == "masked-diffusion-lm" else {}),
        # Mixture-of-experts models: expert counts and parameter shares (dbprofile.models.hf_moe).
        **({"experts": spec.extra["moe"]} if "moe" in spec.extra else {}),
    }


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
    complete: bool = True
    """False while the run is still measuring, and for a run that was interrupted or killed:
    the file then holds only the measurements that finished."""
    incomplete_reason: str | None = None
    """Why the run is incomplete (interrupted, still running), with what is missing."""
    from_checkpoint: bool = False
    """The team must continue from an existing end-to-end checkpoint (the verdict rules DiffusionBlocks
    out); default: training from scratch."""
    verdict: Verdict | None = None
    """The verdict on these measurements (dbprofile.verdict.judge), computed once when the run
    ends and stored with it; None for a run still measuring or a file written before verdicts
    were stored (``dbprofile report`` then judges it)."""
    verdict_error: str | None = None
    """Why the verdict could not be computed, where it could not (the measurements still stand)."""

    def get(self, technique: str, batch_size: int | None = None) -> Measurement | None:
        for m in self.measurements:
            if m.technique == technique and (batch_size is None or m.batch_size == batch_size):
                return m
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 1) -> str:
        return to_standard_json(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> Path:
        """Write atomically, so a reader (or an interrupted run) never sees half a file."""
        return write_atomic(path, self.to_json())

    @classmethod
    def from_dict(cls, data: Any) -> RunResult:
        """Build from parsed JSON; ``ResultSchemaError`` names the first field that is wrong."""
        validate_result(data)
        data = dict(data)
        data["measurements"] = [Measurement.from_dict(m) for m in data.get("measurements", [])]
        if isinstance(data.get("verdict"), dict):
            data["verdict"] = Verdict.from_dict(data["verdict"])
        return cls(**known_fields(cls, data))

    @classmethod
    def load(cls, path: str | Path) -> RunResult:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"Result file {str(path)!r} does not exist.") from None
        except IsADirectoryError:
            raise ValueError(f"Result file {str(path)!r} is a directory; pass the .json file a run wrote.") from None
        except PermissionError:
            raise ValueError(f"Result file {str(path)!r} cannot be read (permission denied).") from None
        except UnicodeDecodeError:
            raise ValueError(
                f"Result file {str(path)!r} is not text (not UTF-8); pass the .json file a run wrote."
            ) from None
        except (json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"Result file {str(path)!r} is not valid JSON ({err}).") from None
        try:
            return cls.from_dict(data)
        except ResultSchemaError as err:
            raise ResultSchemaError(f"Result file {str(path)!r} is not a dbprofile result: {err}") from None

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
                "step_time_iqr_s": m.step_time_iqr_s,
                "block_steps_time_s": m.block_steps_time_s,
                "block_steps_time_iqr_s": m.block_steps_time_iqr_s,
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

    def _repr_html_(self) -> str:
        """A compact table and the verdict, for notebooks: a cell ending in ``result`` shows it.

        >>> result = run("vit-tiny", ["e2e", "db:2"], batch_sizes=[8])   # doctest: +SKIP
        >>> result                        # in Jupyter: the table and the verdict
        >>> result.to_dataframe()         # every share in bytes, for your own plots
        """
        return views.show_html(self)


# ---------------------------------------------------------------- reading result files


# Keys inside free-form dicts that the report and the verdict compute with: integers of bytes
# or counts where present.
_INT_KEYS = {
    "model_info": ("num_layers", "parameters", "hidden_size"),
    "environment": ("device_capacity_bytes", "capacity_bytes", "total_memory"),
    "cuda": ("max_memory_allocated", "max_memory_reserved", "nvml_used_bytes", "untracked_allocated_bytes"),
}


def validate_result(data: Any) -> None:
    """Check parsed JSON against RunResult's fields (types from the dataclasses themselves) and
    the values the report computes with; raise ``ResultSchemaError`` naming the first wrong
    field, e.g. ``measurements[0].peak_bytes should be an integer, but it is "lots"``."""
    if not isinstance(data, dict):
        raise ResultSchemaError(
            f"the top level is {show(data)}, not a JSON object. Pass a .json file written by `dbprofile run`."
        )
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ResultSchemaError(
            f"it has schema_version {version!r}; this dbprofile reads version {SCHEMA_VERSION}. "
            "Re-run the profile with this version."
        )
    check_fields(RunResult, data, "")
    for key in ("model_info", "environment"):
        _check_int_keys(data.get(key) or {}, key, _INT_KEYS[key])
    for i, m in enumerate(data.get("measurements", [])):
        where = f"measurements[{i}]"
        if m["batch_size"] < 1:
            fail(f"{where}.batch_size", "at least 1", m["batch_size"])
        _check_bytes(m, where)
        for j, b in enumerate(m.get("blocks", [])):
            _check_bytes(b, f"{where}.blocks[{j}]")
        _check_int_keys(m.get("cuda") or {}, f"{where}.cuda", _INT_KEYS["cuda"])
        _check_timeline(m.get("timeline") or {}, f"{where}.timeline")


def _check_bytes(m: dict, where: str) -> None:
    if m.get("peak_bytes", 0) < 0:
        fail(f"{where}.peak_bytes", "a byte count (0 or more)", m["peak_bytes"])
    for key, value in (m.get("shares") or {}).items():
        if not is_instance(value, int) or value < 0:
            fail(f"{where}.shares.{key}", "a byte count (an integer, 0 or more)", value)


def _check_int_keys(data: dict, where: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        if data.get(key) is not None and not is_instance(data[key], int):
            fail(f"{where}.{key}", "an integer or null", data[key])


def _check_timeline(timeline: dict, where: str) -> None:
    """The chart reads points as [phase index, bytes per category...]."""
    if not timeline:
        return
    for key in ("categories", "phases"):
        check_value(timeline.get(key, []), list[str], f"{where}.{key}")
    width = 1 + len(timeline.get("categories", CATEGORIES))
    points = timeline.get("points", [])
    check_value(points, list[list[float]], f"{where}.points")
    for i, point in enumerate(points):
        if len(point) != width or not is_instance(point[0], int):
            fail(f"{where}.points[{i}]", f"[phase index, then {width - 1} byte counts]", point)
