"""The evidence the rules read: a measurement or a plan entry seen the same way (``Row``), and
the team's situation (``Situation``: the target's capacity, the task, training from scratch or
from a checkpoint, the devices)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dbprofile.results import Plan, RunResult, per_sample
from dbprofile.techniques import parse_technique
from dbprofile.units import size_bytes
from dbprofile.vocabulary import Status


@dataclass
class Row:
    """A measurement or a plan entry, seen the same way by the rules."""

    technique: str
    status: Status
    error: str | None
    batch_size: int
    peak: int  # tracked peak; the shares sum to it
    required: int  # device memory it needs (plan: with CUDA corrections; measured: reserved or peak)
    shares: dict[str, int]
    flops_per_sample: float | None = None
    step_time_s: float | None = None
    step_time_iqr_s: float | None = None
    block_steps_time_s: float | None = None
    block_steps_time_iqr_s: float | None = None
    round_step_times_s: list[float] | None = None
    """Interleaved timing (dbprofile.measure.interleaved): the step (B block-steps) per round."""
    extra_parameters: int | None = None
    num_parameters: int | None = None
    devices: int = 1
    max_batch_size: int | None = None
    micro_batch_size: int | None = None
    """Plans: the largest micro-batch whose accumulating step fits (dbprofile.planner.accumulation)."""
    accumulation_steps: int | None = None
    accumulation_required: int | None = None
    """Device memory the accumulating step needs at micro_batch_size."""
    exposed_transfer_s_per_sample: float | None = None
    """Host-link seconds per sample that do not hide behind compute (offloading techniques, plans)."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def blocks(self) -> int | None:
        return parse_technique(self.technique).blocks

    @property
    def variants(self) -> list[str]:
        return parse_technique(self.technique).variants

    @property
    def training_time_s(self) -> float | None:
        """Measured time to train every layer once: one step, or DiffusionBlocks' B block-steps."""
        return self.block_steps_time_s if self.blocks is not None else self.step_time_s

    def frac(self, *categories: str) -> float:
        return sum(self.shares.get(c, 0) for c in categories) / self.peak if self.peak else 0.0


DB_NOT_APPLICABLE = "diffusion_blocks_not_applicable"
"""The key of a result's ``model_info`` that says why DiffusionBlocks could not run on its model."""


@dataclass
class Situation:
    """What the rules know besides the rows: the target and how the team will train."""

    capacity: int | None
    target: str
    task: str | None
    from_checkpoint: bool
    devices: int
    batch_size: int | None
    seconds_per_flop: float | None = None
    """1 / (the target's peak FLOPS x the assumed utilisation): turns link seconds into FLOPs (plans on a GPU)."""
    min_micro_batch: int = 1
    exact_accumulation: bool = True
    """False when the loss depends on the whole batch (BatchNorm, ModelSpec.batch_dependent_loss)."""
    db_not_applicable: str | None = None
    """Why DiffusionBlocks could not run on this model at all (a run that left it out), if so."""


def rows_from_run(result: RunResult) -> tuple[list[Row], int | None]:
    """Rows at one batch size: the largest with an e2e measurement (else the largest)."""
    sizes = sorted({m.batch_size for m in result.measurements})
    with_e2e = [m.batch_size for m in result.measurements if m.technique == "e2e"]
    batch = max(with_e2e) if with_e2e else (sizes[-1] if sizes else None)
    rows = []
    for m in result.measurements:
        if m.batch_size != batch:
            continue
        reserved = (m.cuda or {}).get("max_memory_reserved") if m.cuda else None
        rows.append(
            Row(
                technique=m.technique,
                status=m.status,
                error=m.error,
                batch_size=m.batch_size,
                peak=m.peak_bytes,
                required=max(int(reserved), m.peak_bytes) if reserved else m.peak_bytes,
                shares=dict(m.shares),
                flops_per_sample=m.flops_per_sample,
                step_time_s=m.step_time_s,
                step_time_iqr_s=m.step_time_iqr_s,
                block_steps_time_s=m.block_steps_time_s,
                block_steps_time_iqr_s=m.block_steps_time_iqr_s,
                round_step_times_s=(m.extra.get("timing") or {}).get("round_step_times_s"),
                extra_parameters=m.extra_parameters,
                num_parameters=m.num_parameters,
            )
        )
    env = result.environment or {}
    capacity = next((env[k] for k in ("device_capacity_bytes", "capacity_bytes", "total_memory") if env.get(k)), None)
    return rows, int(capacity) if capacity else None


def rows_from_plan(plan: Plan) -> list[Row]:
    return [
        Row(
            technique=e.technique,
            status=e.status,
            error=e.error,
            batch_size=e.batch_size,
            peak=e.tracked_peak_bytes,
            required=e.peak_bytes,
            shares=dict(e.shares),
            flops_per_sample=e.flops_per_sample
            if e.flops_per_sample is not None
            else per_sample(e.training_flops, e.batch_size),
            extra_parameters=e.extra_parameters,
            num_parameters=e.num_parameters,
            devices=e.world_size,
            max_batch_size=e.max_batch_size,
            micro_batch_size=e.micro_batch_size,
            accumulation_steps=e.accumulation_steps,
            accumulation_required=e.accumulation_peak_bytes,
            exposed_transfer_s_per_sample=e.exposed_transfer_s_per_sample,
        )
        for e in plan.entries
    ]


def row_fits(row: Row, s: Situation) -> bool:
    return s.capacity is None or row.required <= s.capacity


def compute_ratio(row: Row, base: Row | None) -> float | None:
    if base is None or row.flops_per_sample is None or not base.flops_per_sample:
        return None
    return row.flops_per_sample / base.flops_per_sample


def cheapest_row(rows: list[Row]) -> Row | None:
    """Fewest FLOPs per sample (unknown FLOPs last), then the smallest need."""
    return min(rows, key=lambda r: (r.flops_per_sample is None, r.flops_per_sample or 0.0, r.required), default=None)


def situation_of(
    result: RunResult | Plan, capacity_bytes: int | str | None, from_checkpoint: bool | None, devices: int | None
) -> tuple[list[Row], Situation]:
    # The situation as a caller may write it ('24GiB', like --gpu 24GiB); nonsense is a ValueError.
    capacity_bytes = size_bytes(capacity_bytes, "capacity_bytes") if capacity_bytes is not None else None
    if from_checkpoint is not None and not isinstance(from_checkpoint, bool):
        raise ValueError(f"from_checkpoint is True, False or None; got {from_checkpoint!r}.")
    if devices is not None and (isinstance(devices, bool) or not isinstance(devices, int) or devices < 1):
        raise ValueError(f"devices is a number of devices, at least 1; got {devices!r}.")
    if isinstance(result, Plan):
        rows = rows_from_plan(result)
        capacity = capacity_bytes if capacity_bytes is not None else result.capacity_bytes
        target = result.device if capacity_bytes is None and result.device not in ("custom", "cpu") else "the target"
        stored_checkpoint, stored_devices = result.from_checkpoint, result.world_size
        batch: int | None = result.batch_size
        rate = (result.peak_flops or 0) * (result.utilisation or 0)
        extras: dict[str, Any] = {
            "seconds_per_flop": 1 / rate if rate else None,
            "min_micro_batch": result.min_micro_batch,
            "exact_accumulation": not (result.model_info or {}).get("batch_statistics", False),
        }
    elif isinstance(result, RunResult):
        rows, env_capacity = rows_from_run(result)
        capacity = capacity_bytes if capacity_bytes is not None else env_capacity
        target = (result.environment or {}).get("device_name") or "the target"
        stored_checkpoint, stored_devices = result.from_checkpoint, 1
        batch = rows[0].batch_size if rows else None
        extras = {}  # a run has no assumed utilisation and no accumulation figures
    else:
        raise TypeError(f"judge() takes a RunResult or a Plan, not {type(result).__name__}.")
    return rows, Situation(
        capacity=capacity,
        target=target,
        task=(result.model_info or {}).get("task"),
        from_checkpoint=stored_checkpoint if from_checkpoint is None else from_checkpoint,
        devices=stored_devices if devices is None else devices,
        batch_size=batch,
        **extras,
        db_not_applicable=(result.model_info or {}).get(DB_NOT_APPLICABLE),
    )
