"""What the tracker keeps (dbprofile.measure.tracker): one record per live storage, the record
of a tracked step, the category indices and role ranks, the CUDA block size, and small helpers
(the tensors in a batch, a trainer's parameters, a timeline thinned to a few hundred points)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from dbprofile.methods.base import TrainerProtocol
from dbprofile.vocabulary import CATEGORIES, STATE_CATEGORIES

CATEGORY_INDEX: dict[str, int] = {name: i for i, name in enumerate(CATEGORIES)}


ACTIVATIONS = CATEGORY_INDEX["activations"]


TEMPORARIES = CATEGORY_INDEX["temporaries"]


WORKSPACE = CATEGORY_INDEX["workspace"]


# Roles set from what a storage is (a parameter, a gradient...) outrank how it is used.
ROLE_RANK = {"parameters": 0, "buffers": 1, "gradients": 2, "optimizer_state": 3, "inputs": 4}


CUDA_BLOCK_BYTES = 512
"""c10/cuda/CUDACachingAllocator.cpp ``kMinBlockSize``: every block the caching allocator hands out
is rounded up to a multiple of 512 bytes, and max_memory_allocated counts the rounded blocks."""


DEFAULT_TIMELINE_POINTS = 240


STATE_INDEX = [CATEGORY_INDEX[name] for name in STATE_CATEGORIES]


def state_bytes(values: list[int] | tuple[int, ...]) -> int:
    """The state's bytes (STATE_CATEGORIES) among bytes per category."""
    return sum(values[i] for i in STATE_INDEX)


class MemoryLimitExceeded(RuntimeError):
    """Raised inside a step when live tracked bytes exceed the tracker's memory limit."""


@dataclass
class StepRecord:
    """The peak of one tracked step and the bytes by category at that instant."""

    peak_bytes: int
    shares: dict[str, int]
    peak_phase: str | None
    timeline: dict[str, Any] = field(default_factory=dict)
    tagged_shares: dict[str, int] = field(default_factory=dict)
    """At the peak, the bytes by category of storages made inside tagged modules' forwards
    (dbprofile.measure.regions: a mixture-of-experts model's routed blocks); empty when none are."""
    state_peak: int | None = None
    """The most bytes of state (STATE_CATEGORIES) live at one instant of the step: a floor under the
    peak of the same step at any batch size."""
    trace: list[tuple[Any, list[int]]] | None = None
    """With ``keep_trace``: every point of the step, not downsampled, as (the op that was running,
    [phase index, bytes per category...]). dbprofile.measure.depth aligns these across depths."""


class StorageInfo:
    """What the tracker knows about one live storage."""

    __slots__ = ("nbytes", "cat", "role", "saved", "recomputed", "tagged", "ref", "block", "__weakref__")

    def __init__(self, nbytes: int, cat: int | None) -> None:
        self.nbytes = nbytes
        self.block: Any = None  # its block in the allocator model, when one is replayed
        self.cat = cat  # category index, or None when excluded (other device, host copy)
        self.role: str | None = None
        self.saved = 0  # how many saved-for-backward slots hold this storage
        self.recomputed = False
        self.tagged = False  # made inside a tagged module's forward (Tracker.tagging)
        self.ref: weakref.ref | None = None


def trainer_parameters(trainer: TrainerProtocol) -> list[torch.Tensor]:
    """Parameters of the trainer's model and its optimizer, each once."""
    seen: dict[int, torch.Tensor] = {}
    for p in trainer.model.parameters():
        seen.setdefault(id(p), p)
    optimizer = trainer.optimizer
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                seen.setdefault(id(p), p)
    return list(seen.values())


def tensors_in(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v)]
    return []


def downsample(points: list[list[int]], limit: int) -> list[list[int]]:
    """At most ``limit`` points: the largest-total point of each of ``limit`` equal runs
    (so the peak always survives), plus the first and last."""
    if len(points) <= limit:
        return points
    keep = limit - 2
    inner = points[1:-1]
    out = [points[0]]
    for i in range(keep):
        chunk = inner[i * len(inner) // keep : (i + 1) * len(inner) // keep]
        if chunk:
            out.append(max(chunk, key=lambda p: sum(p[1:])))
    out.append(points[-1])
    return out


class StepPoints:
    """The points of a tracked step, [phase index, bytes per category...], each with the op that was
    running (kept only with ``keep_ops``). Frees with nothing else between them are one point: each
    lowers every category, so a point inside such a run is never a peak of any share, and the order
    they come in can change from run to run (bf16 autocast empties its cache of cast weights in hash
    order), which the depth extrapolation must not see as a different step."""

    __slots__ = ("points", "ops", "keep_ops", "_free_run")

    def __init__(self, keep_ops: bool) -> None:
        self.points: list[list[int]] = []
        self.ops: list[Any] = []
        self.keep_ops = keep_ops
        self._free_run = False

    def add(self, phase_index: int, totals: list[int], op: Any, free: bool) -> None:
        point = [phase_index, *totals]
        if free and self._free_run and self.points[-1][0] == phase_index:
            self.points[-1] = point
            if self.keep_ops:
                self.ops[-1] = op
        else:
            self.points.append(point)
            if self.keep_ops:
                self.ops.append(op)
        self._free_run = free


class UnitTraces(dict):
    """A run's tracked steps with every point kept, unit -> StepRecord (runner ``traces``), and, where
    the run replays the CUDA caching allocator, that model with every malloc and free it replayed
    (``allocator.events``, and ``allocator.parts`` where the state was made without steps), which the
    depth extrapolation extends to the full depth (dbprofile.measure.event_extrapolation,
    dbprofile.measure.block_replay). A plain dict asks for the steps only."""

    allocator: Any = None
    block_replay: Any = None
    """What dbprofile.measure.block_replay found in db:1's replays, kept for every B of a plan."""
