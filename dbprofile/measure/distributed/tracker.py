"""The tracker for DTensors and FSDP: each rank's local shards of parameters, gradients and
optimizer state, and collective buffers as ``communication``: FSDP's (the ``FSDP::all_gather*``
and ``FSDP::post_backward_reduce`` regions FSDP marks with ``record_function``) and the outputs of
DTensor's functional collectives (tensor parallelism's all-reduces). FSDP frees and
re-allocates unsharded parameters with ``UntypedStorage.resize_``, which no dispatch mode sees;
like PyTorch's own ``torch.distributed._tools.mem_tracker.MemTracker``, the tracker wraps
``resize_`` while it is active so those bytes come and go at the right instant."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from dbprofile.measure.tracker import Tracker
from dbprofile.measure.tracker_mode import TrackingMode
from dbprofile.measure.tracking import CATEGORY_INDEX
from dbprofile.torch_internals import TorchDispatchMode, dtensor_local

_COMM = CATEGORY_INDEX["communication"]


TEMPORARIES = CATEGORY_INDEX["temporaries"]


# FSDP2 marks its collective work with record_function; storages made inside these regions are
# its communication buffers (``FSDP::all_gather`` also prefixes ``FSDP::all_gather_copy_out``).
_COMM_REGIONS = ("FSDP::all_gather", "FSDP::post_backward_reduce")


_RF_ENTER = "profiler._record_function_enter_new"


_RF_EXIT = "profiler._record_function_exit"


_FUNCTIONAL_COLLECTIVES = frozenset(
    f"_c10d_functional.{name}"
    for name in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")
)


_COLLECTIVE_PREFIXES = ("c10d.", "_c10d_functional.")


def _collective_kind(packet: str) -> str | None:
    """all_reduce | all_gather | reduce_scatter from a c10d op's name; None for the rest (waits, the
    autograd wrapper a real process group's functional collectives go through: not a second transfer)."""
    name = packet.split(".", 1)[1]
    for kind in ("all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter"):
        if kind in name:
            return kind.replace("allreduce", "all_reduce").replace("allgather", "all_gather")
    return None


_REDUCE_SCATTER = ("c10d._reduce_scatter_base_", "c10d.reduce_scatter_tensor_coalesced_")


class _CollectivesInsideDTensorOps(TorchDispatchMode):
    """Counts the collectives DTensor issues while it computes one of its ops: an implicit
    redistribution, such as the all-reduce of the partial gradient norms that ``clip_grad_norm_``
    stacks. DTensor runs them inside the tracking mode's handler, where that mode is off, so the
    tracker would never see them; this mode is on only there, and sees only the op's local work."""

    def __init__(self, tracker: ShardedTracker, dtensor: type) -> None:
        super().__init__()
        self.tracker = tracker
        self.dtensor = dtensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, self.dtensor) for t in types):
            return NotImplemented  # DTensor first: its local work comes back here
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = str(func.overloadpacket)
        if packet.startswith(_COLLECTIVE_PREFIXES):
            self.tracker.count_collective(packet, args, out)
        return out


class ShardedTrackingMode(TrackingMode):
    """The tracking mode, plus the collectives inside every DTensor op of a recorded step."""

    def __init__(self, tracker: Any) -> None:
        super().__init__(tracker)
        from torch.distributed.tensor import DTensor

        self._dtensor = DTensor
        self._inside = _CollectivesInsideDTensorOps(tracker, DTensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.tracker.recording and any(issubclass(t, self._dtensor) for t in types):
            with self._inside:
                return super().__torch_dispatch__(func, types, args, kwargs)
        return super().__torch_dispatch__(func, types, args, kwargs)


class ShardedTracker(Tracker):
    """The dbprofile ``Tracker`` for one rank of FSDP or block-parallel training.

    It counts a DTensor by its local shard (a DTensor's own storage reports the global size),
    follows ``UntypedStorage.resize_`` (FSDP frees unsharded parameters that way), and files
    FSDP's collective buffers under ``communication``. It counts the bytes of every collective of a
    recorded step, those DTensor issues inside its ops included (``ShardedTrackingMode``).
    """

    MODE = ShardedTrackingMode

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.regions: list[str] = []
        self._original_resize: Callable[..., Any] | None = None
        self.collective_bytes: dict[str, int] = {}
        """Bytes of the buffers each kind of collective worked on during the recorded steps (an
        all-reduce's tensor, an all-gather's output, a reduce-scatter's input): what crossed the links."""

    def __enter__(self) -> ShardedTracker:
        self._patch_resize()
        try:
            super().__enter__()
            return self
        except BaseException:
            self._unpatch_resize()
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._unpatch_resize()

    def on_op(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        packet = str(func.overloadpacket)
        if packet == _RF_ENTER:
            self.regions.append(str(args[0]) if args else "")
        elif packet == _RF_EXIT and self.regions:
            self.regions.pop()
        super().on_op(func, args, kwargs, out)
        if self.recording and packet.startswith(_COLLECTIVE_PREFIXES):
            self.count_collective(packet, args, out)
        if packet in _REDUCE_SCATTER and args:
            # The reduce-scatter output is what the sharded gradients are views of.
            for t in _flat_tensors(args[0]):
                self._assign_role(t, "gradients")
        elif packet in _FUNCTIONAL_COLLECTIVES:
            # DTensor's collectives (tensor parallelism's all-reduce of a row-wise layer's partial sums,
            # its all-gathers): their outputs are communication buffers until an op's output replaces them.
            for t in _flat_tensors(out):
                self._to_communication(t)
        elif packet == "fsdp.split_with_sizes_copy":
            # Its ``out`` tensors are the unsharded parameters (made just before, in the region).
            for t in _flat_tensors(kwargs.get("out", args[-1] if args else ())):
                self._to_communication(t)

    def count_collective(self, packet: str, args: tuple, out: Any) -> None:
        """Adds a c10d op's bytes to ``collective_bytes`` (waits and wrappers move nothing)."""
        kind = _collective_kind(packet)
        if kind is None:
            return
        # A reduce-scatter moves its input (c10d's in-place ops take the output first), the others their output.
        scattered = args[1 if packet.startswith("c10d.") else 0] if len(args) > 1 else None
        moved = _flat_tensors(scattered if kind == "reduce_scatter" else out)
        total = sum(_local(t).numel() * _local(t).element_size() for t in moved)
        self.collective_bytes[kind] = self.collective_bytes.get(kind, 0) + total

    # -------------------------------------------------------- DTensors and regions

    def _info(self, t: torch.Tensor, host: bool = False):
        t = _local(t)
        key_known = _storage_id(t) in self._infos
        info = super()._info(t, host)
        if (
            info is not None
            and not key_known
            and info.cat == TEMPORARIES
            and any(r.startswith(_COMM_REGIONS) for r in self.regions)
        ):
            self._to_communication(t, info)
        return info

    def _assign_role(self, t: torch.Tensor, role: str) -> None:
        local = _local(t)
        key = _storage_id(local)
        info = self._infos.get(key) if key is not None else None
        # A plain (not DTensor) parameter whose storage FSDP all-gathered is the unsharded copy a
        # unit computes with: it stays communication, its sharded DTensor is the parameter.
        if role == "parameters" and local is t and info is not None and info.cat == _COMM and info.role is None:
            return
        super()._assign_role(local, role)

    def _to_communication(self, t: torch.Tensor, info=None) -> None:
        info = info if info is not None else self._info(t)
        if info is None or info.cat != TEMPORARIES or info.role is not None:
            return
        self._move(info, _COMM)
        if self.recording and self.total == self._peak:
            # The storage that set this peak was filed as a temporary a moment ago; the peak's
            # total is unchanged, its split now names it correctly.
            self._peak_shares = list(self.totals)

    # -------------------------------------------------------- resize_

    def _patch_resize(self) -> None:
        original = torch.UntypedStorage.resize_
        tracker = self

        @functools.wraps(original)
        def resize_(storage, size):
            result = original(storage, size)
            tracker._on_resize(storage)
            return result

        self._original_resize = original
        # The patch is the point (module docstring); torch's stubs type resize_ as a fixed method.
        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign, assignment]

    def _unpatch_resize(self) -> None:
        if self._original_resize is not None:
            torch.UntypedStorage.resize_ = self._original_resize  # type: ignore[method-assign]
            self._original_resize = None

    def _on_resize(self, storage: torch.UntypedStorage) -> None:
        info = self._infos.get(id(storage))
        if info is None or info.cat is None:
            return
        nbytes = self.rounded(storage.nbytes())
        delta = nbytes - info.nbytes
        if delta == 0:
            return
        with self._lock:
            if info.nbytes == 0 and info.role is None and any(r.startswith(_COMM_REGIONS) for r in self.regions):
                # An unsharded parameter's storage, allocated again by an all-gather: communication from
                # this instant, whatever it was filed as when it held nothing (a temporary after a step
                # that saved it for backward; communication after an unshard with no step).
                info.cat = _COMM
            info.nbytes = nbytes
            if delta > 0:
                self._add(info.cat, delta, info.tagged)
            else:
                self.totals[info.cat] += delta
                self.total += delta
                if info.tagged:
                    self.tagged[info.cat] += delta
                if self.recording:
                    self._record(free=True)  # a storage resized down is a free (StepPoints)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (whose storage holds this rank's bytes); other tensors as they are."""
    return dtensor_local(t)


def _storage_id(t: torch.Tensor) -> int | None:
    try:
        return id(t.untyped_storage())
    except (RuntimeError, NotImplementedError):
        return None


def _flat_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _flat_tensors(item)]
    return []
