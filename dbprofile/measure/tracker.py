"""The memory tracker: live tensor bytes on one device, split into dbprofile's categories.

It works the way PyTorch's ``torch.distributed._tools.mem_tracker.MemTracker`` does: a
dispatch mode sees the outputs of every op, each new storage is counted once (views share
it) by its ``untyped_storage().nbytes()``, and a weak reference to the storage removes its
bytes the moment the storage is freed. MemTracker's own categories do not fit ours (its
ACT means "created in forward", ours means "saved for backward", and it has no inputs), so
the classification is dbprofile's:

- ``parameters``, ``buffers``: the model's (and the optimizer's) parameters and buffers;
- ``gradients``: ``p.grad``, recognised by ``register_post_accumulate_grad_hook``;
- ``optimizer_state``: tensors in ``optimizer.state`` (rescanned after each optimizer step);
- ``inputs``: the batch (``set_inputs``);
- ``activations``: storages held by the autograd graph for backward, seen through an
  outer ``saved_tensors_hooks`` (this includes the segment inputs that non-reentrant
  checkpointing saves) plus tensors recomputed for backward by checkpointing (op outputs
  made with grad mode on during the backward phase);
- ``temporaries``: everything else op outputs hold (the loss, gradients of activations,
  the optimizer's scratch tensors, ...);
- ``workspace`` (CUDA only): allocator bytes no tensor holds. At the start of a step,
  ``memory_allocated`` minus the tracked tensors (the cuBLAS handles' workspaces); and, for
  the instant of each op, its in-kernel peak (``reset_peak_memory_stats`` before the op,
  ``max_memory_allocated`` after) above what its outputs hold: scratch that attention
  backward or a cuDNN convolution takes and frees inside the op. Without it the tracker ran
  up to 9.8% under ``max_memory_allocated`` on an H100; with it, within 0.3%
  (reports/gpu-validation-h100.md). The runner reads the allocator's own peaks over separate
  untracked steps, so that comparison does not use the tracker's resets.

A storage has one category at a time, so the categories always sum to the live total and
the shares at the instant of the peak sum to the peak exactly. Fake tensors have storages
with the same ``nbytes``, so a fake run tracks the same bytes as a real CPU run.

On CUDA each storage is counted rounded up to a multiple of 512 bytes: the caching
allocator never hands out a smaller block (``kMinBlockSize``), and ``max_memory_allocated``
counts those rounded blocks, so without the rounding the many small tensors (biases,
norms, scalars, step counters) would be undercounted.

Usage::

    tracker = Tracker(torch.device("cpu"), trainer=trainer)
    with tracker:
        batch = spec.batch(8, "cpu")
        tracker.set_inputs(batch)
        tracker.begin_step()
        trainer.step(batch, mark=tracker.mark)
        record = tracker.end_step()   # peak_bytes, shares, peak_phase, timeline

Known limitations: memory an op allocates and frees inside one kernel (workspaces) is seen
on a real CUDA device only (``workspace``), not on the CPU or in fake runs;
``UntypedStorage.resize_`` is not seen by this tracker (single-device training steps do not
use it; the sharded tracker in dbprofile.measure.distributed follows it for FSDP); tensors
that are made with the dispatch mode disabled are counted from their first use by an op.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from dbprofile.measure.allocator import CachingAllocatorModel
from dbprofile.measure.cuda_scratch import op_input_copies, op_scratch_allocations
from dbprofile.torch_internals import TorchDispatchMode
from dbprofile.vocabulary import CATEGORIES, PHASES

CATEGORY_INDEX = {name: i for i, name in enumerate(CATEGORIES)}
_ACT = CATEGORY_INDEX["activations"]
_TMP = CATEGORY_INDEX["temporaries"]
_WS = CATEGORY_INDEX["workspace"]
# Roles set from what a storage is (a parameter, a gradient...) outrank how it is used.
_ROLE_RANK = {"parameters": 0, "buffers": 1, "gradients": 2, "optimizer_state": 3, "inputs": 4}

CUDA_BLOCK_BYTES = 512
"""c10/cuda/CUDACachingAllocator.cpp ``kMinBlockSize``: every block the caching allocator hands out
is rounded up to a multiple of 512 bytes, and max_memory_allocated counts the rounded blocks."""
DEFAULT_TIMELINE_POINTS = 240


class MemoryLimitExceeded(RuntimeError):
    """Raised inside a step when live tracked bytes exceed the tracker's memory limit."""


@dataclass
class StepRecord:
    """The peak of one tracked step and the bytes by category at that instant."""

    peak_bytes: int
    shares: dict[str, int]
    peak_phase: str | None
    timeline: dict[str, Any] = field(default_factory=dict)
    trace: list[tuple[Any, list[int]]] | None = None
    """With ``keep_trace``: every point of the step, not downsampled, as (the op that was running,
    [phase index, bytes per category...]). dbprofile.measure.depth aligns these across depths."""


class _Storage:
    """What the tracker knows about one live storage."""

    __slots__ = ("nbytes", "cat", "role", "saved", "recomputed", "ref", "block", "__weakref__")

    def __init__(self, nbytes: int, cat: int | None) -> None:
        self.nbytes = nbytes
        self.block: Any = None  # its block in the allocator model, when one is replayed
        self.cat = cat  # category index, or None when excluded (other device, host copy)
        self.role: str | None = None
        self.saved = 0  # how many saved-for-backward slots hold this storage
        self.recomputed = False
        self.ref: weakref.ref | None = None


class _Saved:
    """What the pack hook hands autograd: the tensor, plus a count on its storage that
    drops when autograd releases the saved slot (after the node's backward)."""

    __slots__ = ("tensor", "info", "tracker")

    def __init__(self, tensor: torch.Tensor, info: _Storage | None, tracker: Tracker) -> None:
        self.tensor = tensor
        self.info = info
        self.tracker = tracker

    def __del__(self) -> None:
        info = self.info
        if info is not None:
            info.saved -= 1
            if info.saved == 0:
                self.tracker._reclassify(info)


class _Mode(TorchDispatchMode):
    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tracker = self.tracker
        tracker.op = func
        kwargs = kwargs or {}
        if not tracker.sample_allocator:
            if tracker.model_cuda_scratch:
                out = self._with_cuda_scratch(func, args, kwargs)
            else:
                out = func(*args, **kwargs)
                tracker._on_op(func, args, kwargs, out)
        else:
            # CUDA: the allocator's peak inside this one op shows scratch memory a kernel takes and
            # gives back before returning (no tensor ever holds it, so only the allocator sees it).
            dev = tracker.device
            allocated_before = torch.cuda.memory_allocated(dev)
            total_before = tracker.total
            torch.cuda.reset_peak_memory_stats(dev)
            out = func(*args, **kwargs)
            in_op_peak = torch.cuda.max_memory_allocated(dev)
            tracker._on_op(func, args, kwargs, out)
            tracker._on_op_peak(total_before + in_op_peak - allocated_before)
        if tracker.flops is not None:
            tracker.flops.count(func, args, kwargs, out)
        return out


    def _with_cuda_scratch(self, func, args, kwargs):
        """A fake op with the scratch its CUDA kernel would take: input copies before its outputs,
        buffers after them; all of it given back before the op returns."""
        tracker = self.tracker
        before = op_input_copies(func, args)
        blocks = tracker._scratch_alloc(before)
        out = func(*args, **kwargs)
        tracker._on_op(func, args, kwargs, out)
        after = op_scratch_allocations(func, args, kwargs)
        blocks += tracker._scratch_alloc(after)
        if before or after:
            tracker._on_op_peak(tracker.total + sum(tracker._rounded(n) for n in before + after))
        tracker._scratch_free(blocks)
        return out


class Tracker:
    """Tracks live tensor bytes on ``device`` by category; see the module docstring."""

    def __init__(
        self,
        device: torch.device | str,
        *,
        trainer: Any = None,
        memory_limit: int | None = None,
        timeline_points: int = DEFAULT_TIMELINE_POINTS,
        round_to: int | None = None,
        allocator: CachingAllocatorModel | None = None,
        model_cuda_scratch: bool = False,
        keep_trace: bool = False,
    ) -> None:
        self.device = torch.device(device)
        # Fake runs standing for CUDA: the scratch CUDA kernels take inside an op (reduction
        # buffers, dbprofile.measure.cuda_scratch) counts as workspace at that instant, and is
        # allocated and freed in the allocator model.
        self.model_cuda_scratch = model_cuda_scratch
        # A model of the CUDA caching allocator that every tracked storage is allocated in and
        # freed from, in order: its peak reserved bytes predict max_memory_reserved (planner).
        self.allocator = allocator
        self.trainer = trainer
        self.memory_limit = memory_limit
        self.timeline_points = timeline_points
        # round_to overrides the device's rounding: the planner tracks fake CPU tensors as the
        # CUDA allocator would count them (512-byte blocks).
        self.round_to = round_to if round_to is not None else (CUDA_BLOCK_BYTES if self.device.type == "cuda" else 1)
        host = getattr(trainer, "host_resident", None) if trainer is not None else None
        self._host_resident: Callable[[torch.Tensor], bool] | None = host if callable(host) else None
        self._infos: dict[int, _Storage] = {}
        self._lock = threading.RLock()
        self.totals = [0] * len(CATEGORIES)
        self.total = 0
        self.phase: str | None = None
        self._phase_index = -1
        self.recording = False
        self._peak = -1
        self._peak_shares: list[int] = []
        self._peak_phase: str | None = None
        self._points: list[list[int]] = []
        self.keep_trace = keep_trace
        """Also keep every point with the op that made it (StepRecord.trace), for depth extrapolation."""
        self.op: Any = None
        """The op the dispatch mode is running (or ran last): the tag of a kept trace point."""
        self.flops: Any = None
        """A dbprofile.measure.flops.FlopCounter that this mode feeds every op it sees (``counting``)."""
        self._ops: list[Any] = []
        self.phase_snapshots: list[tuple[str, dict[str, int]]] = []
        """(phase entered, bytes by category) at every mark() of a recorded step."""
        self._grad_hooked: set[int] = set()
        self._opt_hooked: set[int] = set()
        self._handles: list[Any] = []
        self._mode: _Mode | None = None
        self._hooks: Any = None
        self.sample_allocator = self.device.type == "cuda" and torch.cuda.is_available()
        """On a real CUDA device the allocator's counters are read around every op (``workspace``)."""

    # ------------------------------------------------------------ context

    def __enter__(self) -> Tracker:
        self.refresh()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        self._mode = _Mode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        self._hooks.__exit__(*exc)
        self._mode = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._grad_hooked.clear()
        self._opt_hooked.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run code untracked (timing steps): no dispatch mode, no saved-tensor hooks.
        Storages already tracked still leave the count when they are freed."""
        self._mode.__exit__(None, None, None)
        self._hooks.__exit__(None, None, None)
        try:
            yield
        finally:
            self._hooks.__enter__()
            self._mode.__enter__()

    # ------------------------------------------------------------ public

    @contextlib.contextmanager
    def counting(self, flops: Any) -> Iterator[Any]:
        """Feed every op this tracker sees to ``flops`` (a FlopCounter) while inside: the same ops a
        FlopCounter mode of its own would count, without a second dispatch mode's cost per op."""
        self.flops = flops
        try:
            yield flops
        finally:
            self.flops = None

    def mark(self, phase: str) -> None:
        """Phase boundary (called by the Trainer): rescan roles, note the phase."""
        self.refresh()
        self.phase = phase
        self.op = f"mark:{phase}"
        self._phase_index = PHASES.index(phase) if phase in PHASES else len(PHASES)
        if self.recording:
            self.phase_snapshots.append((phase, self.shares()))
            self._record()

    def set_inputs(self, batch: Any) -> None:
        """Classify the batch's tensors as ``inputs``."""
        for t in _tensors(batch):
            self._assign_role(t, "inputs")

    def begin_step(self) -> None:
        """Start recording a step: the peak starts from what is live now."""
        self.refresh()
        if self.sample_allocator:
            # Allocator bytes no tensor holds at the start of the step: the cuBLAS handles'
            # workspaces (one per thread that ran a matmul, kept for the process's life).
            torch.cuda.synchronize(self.device)
            held = int(torch.cuda.memory_allocated(self.device)) - (self.total - self.totals[_WS])
            with self._lock:
                delta = max(held, 0) - self.totals[_WS]
                self.totals[_WS] += delta
                self.total += delta
        self.recording = True
        self.phase_snapshots = []
        self._points = []
        self._ops = []
        self._peak = -1
        self._record()

    def end_step(self) -> StepRecord:
        """Stop recording; the step's peak, its shares (summing to it) and the timeline."""
        self.refresh()
        self._record()
        self.recording = False
        shares = {name: self._peak_shares[i] for i, name in enumerate(CATEGORIES)}
        trace = list(zip(self._ops, self._points)) if self.keep_trace else None
        return StepRecord(
            peak_bytes=self._peak,
            shares=shares,
            peak_phase=self._peak_phase,
            timeline={
                "categories": list(CATEGORIES),
                "phases": list(PHASES),
                "points": _downsample(self._points, self.timeline_points),
            },
            trace=trace,
        )

    def shares(self) -> dict[str, int]:
        """Live bytes by category now."""
        return {name: self.totals[i] for i, name in enumerate(CATEGORIES)}

    def refresh(self) -> None:
        """Assign roles from the trainer: parameters, buffers, gradients, optimizer state."""
        trainer = self.trainer
        if trainer is None:
            return
        params = _trainer_parameters(trainer)
        for p in params:
            self._assign_role(p, "parameters")
            if p.grad is not None:
                self._assign_role(p.grad, "gradients")
            if p.requires_grad and id(p) not in self._grad_hooked:
                self._grad_hooked.add(id(p))
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        model = getattr(trainer, "model", None)
        if isinstance(model, torch.nn.Module):
            for b in model.buffers():
                self._assign_role(b, "buffers")
        optimizer = getattr(trainer, "optimizer", None)
        if optimizer is not None:
            if id(optimizer) not in self._opt_hooked:
                self._opt_hooked.add(id(optimizer))
                self._handles.append(
                    optimizer.register_step_post_hook(lambda *_: self._scan_optimizer(optimizer))
                )
            self._scan_optimizer(optimizer)

    # ------------------------------------------------------------ internals

    def _scan_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self._assign_role(value, "optimizer_state")

    def _on_grad(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            self._assign_role(param.grad, "gradients")

    def _info(self, t: torch.Tensor) -> _Storage | None:
        """The record for t's storage, creating it (as a temporary) the first time."""
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / nested layouts: not tracked
            return None
        key = id(st)
        info = self._infos.get(key)
        if info is not None:
            return info
        dev = t.device
        excluded = dev.type != self.device.type or (
            self.device.index is not None and dev.index != self.device.index
        )
        if not excluded and self._host_resident is not None:
            excluded = bool(self._host_resident(t))
        nbytes = self._rounded(st.nbytes())
        cat = None if excluded else _TMP
        info = _Storage(nbytes, cat)
        if cat is not None and self.phase == "backward" and torch.is_grad_enabled():
            # Grad mode on inside backward: checkpointing recomputes a forward for backward.
            info.recomputed = True
            info.cat = cat = _ACT
        info.ref = weakref.ref(st, lambda _r, key=key, info=info: self._on_free(key, info))
        with self._lock:
            self._infos[key] = info
            if cat is not None:
                if self.allocator is not None and st.nbytes() > 0:  # CUDA hands out no block for 0 bytes
                    info.block = self.allocator.malloc(st.nbytes())
                self._add(cat, nbytes)
        return info

    def _on_free(self, key: int, info: _Storage) -> None:
        with self._lock:
            if self._infos.get(key) is info:
                del self._infos[key]
            if info.cat is not None:
                self.totals[info.cat] -= info.nbytes
                self.total -= info.nbytes
                info.cat = None
                self._release_block(info)
                if self.recording:
                    self._record()

    def _release_block(self, info: _Storage) -> None:
        if info.block is not None:
            self.allocator.free(info.block)
            info.block = None

    def _add(self, cat: int, nbytes: int) -> None:
        self.totals[cat] += nbytes
        self.total += nbytes
        if self.recording:
            if self.total > self._peak:
                self._peak = self.total
                self._peak_shares = list(self.totals)
                self._peak_phase = self.phase
            self._record()
        if self.memory_limit is not None and self.total > self.memory_limit:
            raise MemoryLimitExceeded(
                f"out of memory: tracked tensors reached {self.total} bytes, above the memory limit "
                f"of {self.memory_limit} bytes"
            )

    def _rounded(self, nbytes: int) -> int:
        """``nbytes`` as counted: rounded up to ``round_to`` (512-byte blocks for CUDA)."""
        return -(-nbytes // self.round_to) * self.round_to

    def _scratch_alloc(self, sizes: list[int]) -> list[Any]:
        """Predicted in-op scratch, in the allocator model (the peak is the caller's)."""
        if self.allocator is None:
            return []
        return [self.allocator.malloc(n) for n in sizes]

    def _scratch_free(self, blocks: list[Any]) -> None:
        for block in reversed(blocks):
            self.allocator.free(block)

    def _on_op_peak(self, in_op_total: int) -> None:
        """An op's in-kernel peak above what its outputs hold counts, for that instant, as workspace."""
        extra = in_op_total - self.total
        if extra <= 0:
            return
        with self._lock:
            self._add(_WS, extra)
            self.totals[_WS] -= extra
            self.total -= extra
            if self.recording:
                self._record()

    def _move(self, info: _Storage, cat: int) -> None:
        with self._lock:
            if info.cat is None or info.cat == cat:
                return
            self.totals[info.cat] -= info.nbytes
            self.totals[cat] += info.nbytes
            info.cat = cat
            if self.recording:
                self._record()

    def _assign_role(self, t: torch.Tensor, role: str) -> None:
        info = self._info(t)
        if info is None or info.cat is None:
            return
        if self._host_resident is not None and self._host_resident(t):
            # A host copy the trainer made after the tracker first saw the storage (an
            # offload trainer fills it, then registers it): drop it from the device's count.
            self._exclude(info)
            return
        if info.role is not None and _ROLE_RANK[info.role] <= _ROLE_RANK[role]:
            return
        info.role = role
        self._move(info, CATEGORY_INDEX[role])

    def _exclude(self, info: _Storage) -> None:
        with self._lock:
            if info.cat is None:
                return
            self.totals[info.cat] -= info.nbytes
            self.total -= info.nbytes
            info.cat = None
            self._release_block(info)
            if self.recording:
                self._record()

    def _reclassify(self, info: _Storage) -> None:
        if info.cat is None or info.role is not None:
            return
        self._move(info, _ACT if (info.saved > 0 or info.recomputed) else _TMP)

    def _on_op(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Called after every op the dispatch mode sees. The base tracker reads its outputs; the
        sharded tracker (dbprofile.measure.distributed) also reads FSDP's regions and collectives."""
        self._on_output(out)

    def _on_output(self, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            self._info(out)
        elif isinstance(out, (tuple, list)):
            for item in out:
                if isinstance(item, torch.Tensor):
                    self._info(item)

    def _pack(self, t: torch.Tensor) -> _Saved:
        info = self._info(t)
        if info is not None:
            info.saved += 1
            self._reclassify(info)
        return _Saved(t, info, self)

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def _record(self) -> None:
        self._points.append([self._phase_index, *self.totals])
        if self.keep_trace:
            self._ops.append(self.op)


def _trainer_parameters(trainer: Any) -> list[torch.Tensor]:
    """Parameters of the trainer's model and its optimizer, each once."""
    seen: dict[int, torch.Tensor] = {}
    model = getattr(trainer, "model", None)
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            seen.setdefault(id(p), p)
    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                seen.setdefault(id(p), p)
    return list(seen.values())


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _downsample(points: list[list[int]], limit: int) -> list[list[int]]:
    """At most ``limit`` points: the largest-total point of each of ``limit`` equal runs
    (so the peak always survives), plus the first and last."""
    if len(points) <= limit:
        return points
    keep = limit - 2
    inner = points[1:-1]
    out = [points[0]]
    for i in range(keep):
        chunk = inner[i * len(inner) // keep:(i + 1) * len(inner) // keep]
        if chunk:
            out.append(max(chunk, key=lambda p: sum(p[1:])))
    out.append(points[-1])
    return out
