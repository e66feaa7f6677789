"""A plan's data (dbprofile.planner): one ``PlanEntry`` per technique with its predicted peak,
shares, CUDA corrections, fit and largest batch, in a ``Plan`` with the target and the verdict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dbprofile.files import to_standard_json
from dbprofile.results import views
from dbprofile.results.verdict import Verdict
from dbprofile.vocabulary import CATEGORIES, CUDA_CORRECTIONS, Status


@dataclass(kw_only=True)
class PlanEntry:
    """One planned configuration: a technique at a batch size on the target, predicted from a
    fake-tensor run plus the documented CUDA corrections (see dbprofile.planner)."""

    technique: str
    """Technique name; 'db:B+parallel' is DiffusionBlocks with one block per device."""
    batch_size: int
    """Batch size per device."""
    status: Status = "ok"
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
    shortfall_bytes: int | None = None
    """peak_bytes - capacity when it does not fit (by how much it misses), 0 when it fits, None
    when no capacity is known."""
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
    tensor_parallel: int = 1
    """Devices each layer is split over by tensor parallelism (1: none); world_size counts them all."""
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
    micro_batch_size: int | None = None
    """Gradient accumulation: the largest micro-batch (at least the plan's minimum) whose accumulating
    step fits, the batch split evenly into ``accumulation_steps`` of them; ``batch_size`` itself when
    the plain step fits; None when no micro-batch fits or the plan did not ask (no capacity, or a
    simulated sharded configuration)."""
    accumulation_steps: int | None = None
    """Micro-batches per optimizer step that make up ``batch_size`` (1 when the plain step fits)."""
    accumulation_peak_bytes: int | None = None
    """Predicted device memory of the accumulating step at ``micro_batch_size`` (every gradient
    resident through each micro-batch's forward and backward), CUDA corrections included."""
    exposed_transfer_s_per_sample: float | None = None
    """Offloading techniques: host-link seconds per trained sample that do not hide behind the compute on
    the target (dbprofile.planner.transfer; 0.0 when they hide, None when unknown or nothing moves)."""
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
    verdict: Verdict | None = None
    """The verdict on this plan (dbprofile.verdict.judge)."""
    elapsed_s: float | None = None
    """Wall time the planning took."""
    from_checkpoint: bool = False
    """The team must continue from an existing end-to-end checkpoint (default: training from scratch)."""
    peak_flops: int | None = None
    """The target's peak dense FLOPS per second at the plan's precision (dbprofile.gpus), if known."""
    peak_flops_source: str | None = None
    """Where ``peak_flops`` comes from (the card's datasheet or whitepaper)."""
    utilisation: float | None = None
    """The share of peak_flops assumed for time estimates (dbprofile.planner.ASSUMED_UTILISATION)."""
    min_micro_batch: int = 1
    """The smallest micro-batch gradient accumulation was allowed (plan(min_micro_batch=...))."""
    tensor_parallel: int = 1
    """The tensor-parallel degree asked for (--tp): the world is a (world_size / tp) x tp mesh."""
    pipeline: dict[str, Any] = field(default_factory=dict)
    """Pipeline parallelism (--pp, dbprofile.planner.pipeline): the stages, schedule, in-flight
    micro-batches and bubble of each planned technique, and the block-parallel comparison; empty without."""

    def get(self, technique: str) -> PlanEntry | None:
        for entry in self.entries:
            if entry.technique == technique:
                return entry
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 1) -> str:
        return to_standard_json(self.to_dict(), indent=indent)

    def fits(self, gpu: Any = None, technique: str | None = None) -> bool:
        """Does some technique (or ``technique``) fit, at this plan's batch size per device?

        ``gpu``: another target to ask about ('A100-40GB', a capacity in bytes); its CUDA
        corrections are recomputed for that card. Without it, the plan's own target.

        >>> p = plan("llama-1b", 4, device="H100-80GB")   # doctest: +SKIP
        >>> p.fits(), p.fits("L4"), p.fits("RTX-4090", technique="db:4")
        """
        return views.fits(self, gpu, technique)

    def to_dataframe(self):
        """One row per technique: the predicted peak, fit, headroom, shortfall, largest batch, every
        share and CUDA correction in bytes (the columns of ``dbprofile plan --csv``).

        >>> p.to_dataframe()[["technique", "peak_bytes", "fits", "max_batch_size"]]   # doctest: +SKIP
        """
        import pandas as pd

        rows = []
        for e in self.entries:
            row = {
                "model": self.model,
                "device": self.device,
                "capacity_bytes": self.capacity_bytes,
                "technique": e.technique,
                "batch_size": e.batch_size,
                "precision": self.precision,
                "optimizer": self.optimizer,
                "zero_stage": self.zero_stage,
                "world_size": e.world_size,
                "sharding": e.sharding,
                "status": e.status,
                "peak_bytes": e.peak_bytes,
                "tracked_peak_bytes": e.tracked_peak_bytes,
                "fits": e.fits,
                "headroom_bytes": e.headroom_bytes,
                "shortfall_bytes": e.shortfall_bytes,
                "max_batch_size": e.max_batch_size,
                "peak_phase": e.peak_phase,
                "peak_block": e.peak_block,
                "num_parameters": e.num_parameters,
                "extra_parameters": e.extra_parameters,
            }
            for cat in CATEGORIES:
                row[f"{cat}_bytes"] = e.shares.get(cat, 0)
            for name in CUDA_CORRECTIONS:
                row[f"{name}_bytes"] = e.corrections.get(name, 0)
            rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return views.show_text(self)

    def _repr_html_(self) -> str:
        return views.show_html(self)
