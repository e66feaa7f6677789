"""The memory tracker: live tensor bytes on one device, split into dbprofile's categories.

A dispatch mode sees the outputs of every op (as PyTorch's own ``MemTracker`` does); each new
storage is counted once by its ``untyped_storage().nbytes()`` (rounded up to CUDA's 512-byte
blocks on a CUDA target) and removed when a weak reference sees it freed. Each storage has one
category at a time (parameters, buffers, gradients, optimizer state, inputs, activations saved
for backward, temporaries, CUDA workspace), so the categories sum to the live total and the
shares at the peak sum to the peak exactly. The README's "What the numbers mean" gives the rules of
each category, the CUDA workspace and rounding; the records it keeps are in
dbprofile.measure.tracking.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from dbprofile.measure.allocator import AllocationRecorder, CachingAllocatorModel
from dbprofile.measure.tracker_mode import SavedSlot, TrackingMode
from dbprofile.measure.tracking import (
    ACTIVATIONS,
    CATEGORY_INDEX,
    CUDA_BLOCK_BYTES,
    DEFAULT_TIMELINE_POINTS,
    ROLE_RANK,
    TEMPORARIES,
    WORKSPACE,
    MemoryLimitExceeded,
    StepPoints,
    StepRecord,
    StorageInfo,
    downsample,
    state_bytes,
    tensors_in,
    trainer_parameters,
)
from dbprofile.methods.base import TrainerProtocol
from dbprofile.vocabulary import CATEGORIES, PHASES


class Tracker:
    """Tracks live tensor bytes on ``device`` by category; see the module docstring."""

    MODE: type[TrackingMode] = TrackingMode
    """The dispatch mode that shows this tracker every op (ShardedTracker's also sees inside DTensor's)."""

    def __init__(
        self,
        device: torch.device | str,
        *,
        trainer: TrainerProtocol | None = None,
        memory_limit: int | None = None,
        timeline_points: int = DEFAULT_TIMELINE_POINTS,
        round_to: int | None = None,
        allocator: CachingAllocatorModel | AllocationRecorder | None = None,
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
        self._host_resident: Callable[[torch.Tensor], bool] | None = (
            trainer.host_resident if trainer is not None else None
        )
        self._infos: dict[int, StorageInfo] = {}
        self._lock = threading.RLock()
        self.totals = [0] * len(CATEGORIES)
        self.total = 0
        self.tagging = 0
        """Depth of tagged modules' forwards running now (dbprofile.measure.regions): a storage made
        while it is above 0 is tagged, and its bytes are also counted in ``tagged`` by category."""
        self.tagged = [0] * len(CATEGORIES)
        self._peak_tagged: list[int] = []
        self.phase: str | None = None
        self._phase_index = -1
        self.recording = False
        self._peak = -1
        self._peak_shares: list[int] = []
        self._peak_phase: str | None = None
        self.keep_trace = keep_trace
        """Also keep every point with the op that made it (StepRecord.trace), for depth extrapolation."""
        self._points = StepPoints(keep_trace)
        self.op: Any = None
        """The op the dispatch mode is running (or ran last): the tag of a kept trace point."""
        self.flops: Any = None
        """A dbprofile.measure.flops.FlopCounter that this mode feeds every op it sees (``counting``)."""
        self.phase_snapshots: list[tuple[str, dict[str, int]]] = []
        """(phase entered, bytes by category) at every mark() of a recorded step."""
        self._grad_hooked: set[int] = set()
        self._opt_hooked: set[int] = set()
        self._handles: list[Any] = []
        self._mode: TrackingMode | None = None
        self._hooks: Any = None
        self.sample_allocator = self.device.type == "cuda" and torch.cuda.is_available()
        """On a real CUDA device the allocator's counters are read around every op (``workspace``)."""

    # ------------------------------------------------------------ context

    def __enter__(self) -> Tracker:
        self.refresh()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        self._mode = self.MODE(self)
        self._mode.__enter__()
        self._listen(self.note_saved)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._listen(None)
        if self._mode is not None:
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
        mode, hooks = self._mode, self._hooks
        if mode is None:  # not inside the tracker: nothing to pause
            yield
            return
        mode.__exit__(None, None, None)
        hooks.__exit__(None, None, None)
        try:
            yield
        finally:
            hooks.__enter__()
            mode.__enter__()

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
        for t in tensors_in(batch):
            self._assign_role(t, "inputs")

    def begin_step(self) -> None:
        """Start recording a step: the peak starts from what is live now."""
        self.refresh()
        if self.sample_allocator:
            # Allocator bytes no tensor holds at the start of the step: the cuBLAS handles'
            # workspaces (one per thread that ran a matmul, kept for the process's life).
            torch.cuda.synchronize(self.device)
            held = int(torch.cuda.memory_allocated(self.device)) - (self.total - self.totals[WORKSPACE])
            with self._lock:
                delta = max(held, 0) - self.totals[WORKSPACE]
                self.totals[WORKSPACE] += delta
                self.total += delta
        self.recording = True
        self.phase_snapshots = []
        self._points = StepPoints(self.keep_trace)
        self._peak = -1
        self._record()

    def end_step(self) -> StepRecord:
        """Stop recording; the step's peak, its shares (summing to it) and the timeline."""
        self.refresh()
        self._record()
        self.recording = False
        shares: dict[str, int] = {name: self._peak_shares[i] for i, name in enumerate(CATEGORIES)}
        points = self._points.points
        trace = list(zip(self._points.ops, points)) if self.keep_trace else None
        return StepRecord(
            peak_bytes=self._peak,
            shares=shares,
            peak_phase=self._peak_phase,
            tagged_shares={name: n for name, n in zip(CATEGORIES, self._peak_tagged) if n},
            state_peak=max((state_bytes(point[1:]) for point in points), default=0),
            timeline={
                "categories": list(CATEGORIES),
                "phases": list(PHASES),
                "points": downsample(points, self.timeline_points),
            },
            trace=trace,
        )

    def shares(self) -> dict[str, int]:
        """Live bytes by category now."""
        return {name: self.totals[i] for i, name in enumerate(CATEGORIES)}

    def allocated(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s storage holds a block in the allocator (model or recorder) now."""
        info = self._infos.get(id(t.untyped_storage()))
        return info is not None and info.block is not None

    def refresh(self) -> None:
        """Assign roles from the trainer: parameters, buffers, gradients, optimizer state."""
        trainer = self.trainer
        if trainer is None:
            return
        params = trainer_parameters(trainer)
        for p in params:
            self._assign_role(p, "parameters")
            if p.grad is not None:
                self._assign_role(p.grad, "gradients")
            if p.requires_grad and id(p) not in self._grad_hooked:
                self._grad_hooked.add(id(p))
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        for b in trainer.model.buffers():
            self._assign_role(b, "buffers")
        optimizer = trainer.optimizer
        if optimizer is not None:
            if id(optimizer) not in self._opt_hooked:
                self._opt_hooked.add(id(optimizer))
                self._handles.append(optimizer.register_step_post_hook(lambda *_: self._scan_optimizer(optimizer)))
            self._scan_optimizer(optimizer)

    def note_saved(self, out: Any) -> None:
        """Outputs a technique keeps for the backward outside the saved-tensor hooks (selective
        checkpointing's cache, dbprofile.methods.selective): they count as activations."""
        for t in out if isinstance(out, (tuple, list)) else (out,):
            info = self._info(t) if isinstance(t, torch.Tensor) else None
            if info is not None:
                info.saved += 1
                self.reclassify(info)

    # ------------------------------------------------------------ internals

    def _listen(self, listener: Callable[[Any], None] | None) -> None:
        # Only trainers that keep tensors outside the hooks have the attribute (SelectiveCheckpointTrainer).
        if self.trainer is not None and hasattr(self.trainer, "saved_output_listener"):
            self.trainer.saved_output_listener = listener

    def _scan_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self._assign_role(value, "optimizer_state")

    def _on_grad(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            self._assign_role(param.grad, "gradients")

    def on_host_output(self, t: torch.Tensor) -> None:
        """``t`` is an output the CUDA kernel keeps in host memory although the fake op made it on the
        tracked device (memory-efficient attention's RNG seed and offset): never counted."""
        self._info(t, host=True)

    def _info(self, t: torch.Tensor, host: bool = False) -> StorageInfo | None:
        """The record for t's storage, creating it (as a temporary, or uncounted if ``host``) the
        first time."""
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / nested layouts: not tracked
            return None
        key = id(st)
        info = self._infos.get(key)
        if info is not None:
            return info
        dev = t.device
        excluded = (
            host or dev.type != self.device.type or (self.device.index is not None and dev.index != self.device.index)
        )
        if not excluded and self._host_resident is not None:
            excluded = bool(self._host_resident(t))
        nbytes = self.rounded(st.nbytes())
        cat = None if excluded else TEMPORARIES
        info = StorageInfo(nbytes, cat)
        info.tagged = self.tagging > 0 and cat is not None
        if cat is not None and self.phase == "backward" and torch.is_grad_enabled():
            # Grad mode on inside backward: checkpointing recomputes a forward for backward.
            info.recomputed = True
            info.cat = cat = ACTIVATIONS
        info.ref = weakref.ref(st, functools.partial(self._on_free, key, info))
        with self._lock:
            self._infos[key] = info
            if cat is not None:
                if self.allocator is not None and st.nbytes() > 0:  # CUDA hands out no block for 0 bytes
                    info.block = self.allocator.malloc(st.nbytes())
                self._add(cat, nbytes, info.tagged)
        return info

    def _on_free(self, key: int, info: StorageInfo, _ref: Any) -> None:
        """The storage's weak reference fired: it was freed."""
        with self._lock:
            if self._infos.get(key) is info:
                del self._infos[key]
            self._uncount(info)

    def _release_block(self, info: StorageInfo) -> None:
        if info.block is not None and self.allocator is not None:
            self.allocator.free(info.block)
            info.block = None

    def _add(self, cat: int, nbytes: int, tagged: bool = False) -> None:
        self.totals[cat] += nbytes
        self.total += nbytes
        if tagged:
            self.tagged[cat] += nbytes
        if self.recording:
            if self.total > self._peak:
                self._peak = self.total
                self._peak_shares = list(self.totals)
                self._peak_tagged = list(self.tagged)
                self._peak_phase = self.phase
            self._record()
        if self.memory_limit is not None and self.total > self.memory_limit:
            raise MemoryLimitExceeded(
                f"out of memory: tracked tensors reached {self.total} bytes, above the memory limit "
                f"of {self.memory_limit} bytes"
            )

    def rounded(self, nbytes: int) -> int:
        """``nbytes`` as counted: rounded up to ``round_to`` (512-byte blocks for CUDA)."""
        return -(-nbytes // self.round_to) * self.round_to

    def scratch_alloc(self, sizes: list[int]) -> list[Any]:
        """Predicted in-op scratch, in the allocator model (the peak is the caller's)."""
        if self.allocator is None:
            return []
        return [self.allocator.malloc(n) for n in sizes]

    def scratch_free(self, blocks: list[Any]) -> None:
        if self.allocator is None:  # no model, so scratch_alloc handed out no blocks
            return
        for block in reversed(blocks):
            self.allocator.free(block)

    def on_op_peak(self, in_op_total: int) -> None:
        """An op's in-kernel peak above what its outputs hold counts, for that instant, as workspace."""
        extra = in_op_total - self.total
        if extra <= 0:
            return
        with self._lock:
            self._add(WORKSPACE, extra)
            self.totals[WORKSPACE] -= extra
            self.total -= extra
            if self.recording:
                self._record()

    def _move(self, info: StorageInfo, cat: int) -> None:
        with self._lock:
            if info.cat is None or info.cat == cat:
                return
            self.totals[info.cat] -= info.nbytes
            self.totals[cat] += info.nbytes
            if info.tagged:
                self.tagged[info.cat] -= info.nbytes
                self.tagged[cat] += info.nbytes
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
        if info.role is not None and ROLE_RANK[info.role] <= ROLE_RANK[role]:
            return
        info.role = role
        self._move(info, CATEGORY_INDEX[role])

    def _exclude(self, info: StorageInfo) -> None:
        with self._lock:
            self._uncount(info)

    def _uncount(self, info: StorageInfo) -> None:
        """Take a counted storage out of the totals (freed, or excluded); the caller holds the lock."""
        if info.cat is None:
            return
        self.totals[info.cat] -= info.nbytes
        self.total -= info.nbytes
        if info.tagged:
            self.tagged[info.cat] -= info.nbytes
        info.cat = None
        self._release_block(info)
        if self.recording:
            self._record(free=True)

    def reclassify(self, info: StorageInfo) -> None:
        if info.cat is None or info.role is not None:
            return
        self._move(info, ACTIVATIONS if (info.saved > 0 or info.recomputed) else TEMPORARIES)

    def on_op(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
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

    def _pack(self, t: torch.Tensor) -> SavedSlot:
        info = self._info(t)
        if info is not None:
            info.saved += 1
            self.reclassify(info)
        return SavedSlot(t, info, self)

    @staticmethod
    def _unpack(saved: SavedSlot) -> torch.Tensor:
        return saved.tensor

    def _record(self, free: bool = False) -> None:
        self._points.add(self._phase_index, self.totals, self.op, free)
