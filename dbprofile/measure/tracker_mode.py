"""How the tracker sees a step (dbprofile.measure.tracker): a dispatch mode that hands every op's
outputs to the tracker (and, on a real CUDA device, the allocator's peak inside the op; in a
fake run standing for CUDA, the scratch the op's kernel would take), and the slot the
saved-tensors pack hook gives autograd, which tells the tracker when a saved activation is
released. ``TrackerHooks`` is what both need from the tracker."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from dbprofile.measure.cuda_scratch import op_host_outputs, op_input_copies, op_scratch_allocations
from dbprofile.measure.tracking import StorageInfo
from dbprofile.torch_internals import TorchDispatchMode, fake_device


class TrackerHooks(Protocol):
    """The tracker as the dispatch mode and the saved slots call it."""

    op: Any
    device: torch.device
    total: int
    sample_allocator: bool
    model_cuda_scratch: bool
    flops: Any

    def on_op(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None: ...

    def on_op_peak(self, in_op_total: int) -> None: ...

    def on_host_output(self, t: torch.Tensor) -> None: ...

    def scratch_alloc(self, sizes: list[int]) -> list[Any]: ...

    def scratch_free(self, blocks: list[Any]) -> None: ...

    def rounded(self, nbytes: int) -> int: ...

    def reclassify(self, info: StorageInfo) -> None: ...


class SavedSlot:
    """What the pack hook hands autograd: the tensor, plus a count on its storage that
    drops when autograd releases the saved slot (after the node's backward)."""

    __slots__ = ("tensor", "info", "tracker")

    def __init__(self, tensor: torch.Tensor, info: StorageInfo | None, tracker: TrackerHooks) -> None:
        self.tensor = tensor
        self.info = info
        self.tracker = tracker

    def __del__(self) -> None:
        info = self.info
        if info is not None:
            info.saved -= 1
            if info.saved == 0:
                self.tracker.reclassify(info)


PRIM_DEVICE = torch.ops.prim.device.default
METADATA_OPS = frozenset({PRIM_DEVICE})
"""Ops that only read a tensor's metadata: no outputs to count, no scratch, no FLOPs. The autograd
engine asks every fake tensor's device (a Python dispatch, unlike a real tensor's) several times per
node: two thirds of the ops of a fake training step (548 of 811 per Llama-7B layer of an e2e step on
an H100 target), so they skip the tracker's work, and a fake tensor's is answered here, as fake
tensors answer it (``torch_internals.fake_device``), not passed down the dispatch modes: a depth-4
e2e trace of Llama-7B 10% faster (median of 12 alternating pairs, issue 28 round 8)."""


class TrackingMode(TorchDispatchMode):
    def __init__(self, tracker: TrackerHooks) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tracker = self.tracker
        tracker.op = func  # still the tag of any point recorded before the next op (a free)
        kwargs = kwargs or {}
        if func in METADATA_OPS:
            device = fake_device(args[0]) if func is PRIM_DEVICE else None
            return device if device is not None else func(*args, **kwargs)
        if not tracker.sample_allocator:
            if tracker.model_cuda_scratch:
                out = self._with_cuda_scratch(func, args, kwargs)
            else:
                out = func(*args, **kwargs)
                tracker.on_op(func, args, kwargs, out)
        else:
            # CUDA: the allocator's peak inside this one op shows scratch memory a kernel takes and
            # gives back before returning (no tensor ever holds it, so only the allocator sees it).
            dev = tracker.device
            allocated_before = torch.cuda.memory_allocated(dev)
            total_before = tracker.total
            torch.cuda.reset_peak_memory_stats(dev)
            out = func(*args, **kwargs)
            in_op_peak = torch.cuda.max_memory_allocated(dev)
            tracker.on_op(func, args, kwargs, out)
            tracker.on_op_peak(total_before + in_op_peak - allocated_before)
        if tracker.flops is not None:
            tracker.flops.count(func, args, kwargs, out)
        return out

    def _with_cuda_scratch(self, func, args, kwargs):
        """A fake op with the scratch its CUDA kernel would take: input copies before its outputs,
        buffers after them; all of it given back before the op returns."""
        tracker = self.tracker
        before = op_input_copies(func, args)
        blocks = tracker.scratch_alloc(before)
        out = func(*args, **kwargs)
        for host in op_host_outputs(func, out):
            tracker.on_host_output(host)
        tracker.on_op(func, args, kwargs, out)
        after = op_scratch_allocations(func, args, kwargs)
        blocks += tracker.scratch_alloc(after)
        if before or after:
            tracker.on_op_peak(tracker.total + sum(tracker.rounded(n) for n in before + after))
        tracker.scratch_free(blocks)
        return out
