"""Ground truth on a real device: the tracker against the CUDA allocator, and the planner's
fake-tensor predictions (made without touching the GPU) against what the GPU really used.

For each model, batch size, technique and precision, ``validate`` plans the configuration
in fake mode for the device it runs on (the same card's capacity and compute capability),
then measures it for real, and compares:

- tracker peak vs ``torch.cuda.max_memory_allocated`` (the tracker's peak includes its
  ``workspace`` share: allocator bytes no tensor holds, read around every op; the allocator's
  peaks come from separate untracked steps, so the comparison is not circular);
- the planner's predicted allocated bytes (tracked peak + cuBLAS workspace) and reserved
  bytes (+ allocator segment overhead) vs the measured allocated and reserved peaks;
- NVML's used memory vs reserved (the gap is the CUDA context and libraries).

Rows are returned as they finish (``on_row``) and a time budget stops it from starting new
cases, so a run cut short still reports what it measured. On the CPU the allocator columns
are unavailable and only tracker vs planner is compared.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch

DEFAULT_CASES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("vit-b16", (32, 64)),
    ("dit-b2", (32, 64)),
    ("gpt2-small", (4, 8)),
)
DEFAULT_TECHNIQUES = ("e2e", "ckpt", "db:2", "db:4", "db:4+offload")
DEFAULT_PRECISIONS = ("fp32", "bf16")


@dataclass(kw_only=True)
class ValidationRow:
    """One configuration measured on the device and predicted by the planner."""

    model: str
    batch_size: int
    technique: str
    precision: str
    status: str
    error: str | None = None
    tracked_peak_bytes: int | None = None
    untracked_allocated_bytes: int | None = None
    """Allocator bytes no tensor held when the step started (the cuBLAS workspaces)."""
    workspace_bytes: int | None = None
    """The tracker's workspace share at its peak (persistent workspaces + in-op scratch)."""
    max_allocated_bytes: int | None = None
    max_reserved_bytes: int | None = None
    nvml_used_bytes: int | None = None
    planned_tracked_bytes: int | None = None
    planned_allocated_bytes: int | None = None
    planned_reserved_bytes: int | None = None
    planned_device_bytes: int | None = None
    """The planner's whole-device figure (reserved + CUDA context), comparable to NVML."""
    step_time_s: float | None = None
    plan_seconds: float | None = None
    measure_seconds: float | None = None

    @staticmethod
    def _err(value: int | None, truth: int | None) -> float | None:
        if value is None or not truth:
            return None
        return (value - truth) / truth

    @property
    def tracker_error(self) -> float | None:
        return self._err(self.tracked_peak_bytes, self.max_allocated_bytes)

    @property
    def planner_error_tracked(self) -> float | None:
        """Planner vs tracker on tensor bytes (the workspace share left out): fake run vs real run."""
        if self.tracked_peak_bytes is None:
            return None
        return self._err(self.planned_tracked_bytes, self.tracked_peak_bytes - (self.workspace_bytes or 0))

    @property
    def planner_error_allocated(self) -> float | None:
        return self._err(self.planned_allocated_bytes, self.max_allocated_bytes)

    @property
    def planner_error_reserved(self) -> float | None:
        return self._err(self.planned_reserved_bytes, self.max_reserved_bytes)

    @property
    def nvml_minus_reserved_bytes(self) -> int | None:
        if self.nvml_used_bytes is None or self.max_reserved_bytes is None:
            return None
        return self.nvml_used_bytes - self.max_reserved_bytes

    def to_dict(self) -> dict:
        data = asdict(self)
        for name in (
            "tracker_error",
            "planner_error_tracked",
            "planner_error_allocated",
            "planner_error_reserved",
            "nvml_minus_reserved_bytes",
        ):
            data[name] = getattr(self, name)
        return data


def device_target(device: torch.device):
    """The planner's target for the card we run on: its real capacity and compute capability."""
    from dbprofile.gpus import GPU

    if device.type != "cuda":
        return "cpu"
    props = torch.cuda.get_device_properties(device)
    return GPU(
        name=props.name,
        capacity_bytes=int(props.total_memory),
        compute_capability=(props.major, props.minor),
        source="torch.cuda",
    )


def plan_one(model: str, batch_size: int, technique: str, precision: str, target) -> dict:
    """The planner's prediction for one configuration (fake tensors only; runs in a worker process)."""
    from dbprofile.loading import load_spec
    from dbprofile.planner import plan

    torch.set_num_threads(1)  # one fake run per worker; the workers share the machine's cores
    started = time.perf_counter()
    try:
        entry = plan(
            load_spec(model),
            batch_size,
            device=target,
            techniques=[technique],
            precision=precision,
            search_max_batch=False,
        ).entries[0]
    except Exception as err:  # a planner failure is a finding, not a reason to skip the measurement
        return {"error": f"plan: {type(err).__name__}: {err}", "plan_seconds": time.perf_counter() - started}
    if not entry.ok:
        return {"error": f"plan: {entry.error}", "plan_seconds": time.perf_counter() - started}
    allocated = entry.tracked_peak_bytes + entry.corrections.get("cublas_workspace", 0)
    return {
        "planned_tracked_bytes": entry.tracked_peak_bytes,
        "planned_allocated_bytes": allocated,
        "planned_reserved_bytes": allocated + entry.corrections.get("allocator_segments", 0),
        "planned_device_bytes": entry.peak_bytes,
        "plan_seconds": time.perf_counter() - started,
    }


def measure_one(
    model: str, batch_size: int, technique: str, precision: str, device: torch.device, steps: int = 2
) -> ValidationRow:
    """Measure one configuration for real on ``device``."""
    from dbprofile.loading import load_spec
    from dbprofile.measure.runner import measure

    row = ValidationRow(model=model, batch_size=batch_size, technique=technique, precision=precision, status="ok")
    started = time.perf_counter()
    m = measure(load_spec(model), technique, batch_size, device=device, precision=precision, steps=steps)
    row.measure_seconds = time.perf_counter() - started
    row.status, row.error = m.status, m.error
    if not m.ok:
        return row
    row.tracked_peak_bytes = m.peak_bytes
    row.workspace_bytes = m.shares.get("workspace", 0)
    row.step_time_s = m.step_time_s
    if m.cuda:
        row.untracked_allocated_bytes = m.cuda.get("untracked_allocated_bytes")
        row.max_allocated_bytes = m.cuda.get("max_memory_allocated")
        row.max_reserved_bytes = m.cuda.get("max_memory_reserved")
        row.nvml_used_bytes = m.cuda.get("nvml_used_bytes")
    return row


def validate(
    cases: Iterable[tuple[str, Sequence[int]]] = DEFAULT_CASES,
    techniques: Iterable[str] = DEFAULT_TECHNIQUES,
    precisions: Iterable[str] = DEFAULT_PRECISIONS,
    device: str | torch.device = "cuda",
    steps: int = 2,
    time_budget_s: float | None = None,
    on_row: Callable[[ValidationRow], None] | None = None,
    plan_workers: int | None = None,
) -> list[ValidationRow]:
    """Every case x technique x precision; stops starting new ones once ``time_budget_s`` is spent.

    The planner's fake runs only need CPU, so they run in a pool of worker processes while the
    device measures: on a GPU machine with many cores the predictions cost almost no wall time.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        from dbprofile.spec import SpecError

        raise SpecError(
            "dbprofile validate --device cuda needs a CUDA GPU, and torch sees none. "
            "Run it on a GPU machine, or pass --device cpu to compare the planner with the tracker only."
        )
    started = time.perf_counter()
    # Breadth first: every model at its first batch size in the first precision before any second
    # batch size, so a run cut short by the time budget still covers every family.
    cases = [(model, tuple(sizes)) for model, sizes in cases]
    precisions, techniques = list(precisions), list(techniques)
    configs = [
        (model, sizes[i], technique, precision)
        for i in range(max(len(sizes) for _, sizes in cases))
        for precision in precisions
        for model, sizes in cases
        if i < len(sizes)
        for technique in techniques
    ]
    target = device_target(device)
    workers = plan_workers if plan_workers is not None else max(1, min(12, (os.cpu_count() or 2) - 2))
    rows: list[ValidationRow] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(plan_one, *config, target) for config in configs]
        for config, future in zip(configs, futures):
            if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
                for pending in futures:
                    pending.cancel()
                break
            row = measure_one(*config, device, steps=steps)
            planned = future.result()
            plan_error = planned.pop("error", None)
            for key, value in planned.items():
                setattr(row, key, value)
            if plan_error:
                row.error = "; ".join(filter(None, [row.error, plan_error]))
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows
