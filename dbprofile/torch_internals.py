"""The one place dbprofile touches private PyTorch APIs.

Everything here is an import or a thin call into a private (underscore) PyTorch module:
fake tensors (``torch._subclasses.fake_tensor``), the Python dispatch-mode base class
(``torch.utils._python_dispatch``), which is how PyTorch's own
``torch.distributed._tools.mem_tracker.MemTracker`` sees every op's outputs, the CUDA
caching allocator's history recorder (``torch.cuda.memory._record_memory_history`` /
``_dump_snapshot``, the files PyTorch's memory_viz opens), and the attention
FLOP formulas of ``torch.utils.flop_counter`` (its ``flop_registry`` table, and
``sdpa_flop_count`` / ``sdpa_backward_flop_count``: module names outside its ``__all__``),
which dbprofile.measure.flops applies in a counting mode of its own, and FSDP2's shard lookup
(``_fsdp_param._chunk_with_empty``), which a simulated rank replaces by one view per shard
(``fsdp_shards_by_narrow``). ``tests/test_torch_private.py`` is
the canary: it exercises each name and the behaviour the tracker relies on (storage
Python objects outliving their last Python reference while a tensor still uses them, so a
weak reference to a storage fires exactly when its memory is freed), and fails loudly when
a PyTorch upgrade changes any of it. Fix this module, not its callers.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    UnsupportedOperatorException,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import (
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

__all__ = [
    "FakeTensor",
    "FakeTensorMode",
    "TorchDispatchMode",
    "fake_tensor_mode",
    "fake_device",
    "is_fake",
    "active_fake_mode",
    "start_cuda_memory_history",
    "stop_cuda_memory_history",
    "dump_cuda_memory_snapshot",
    "outside_fake_mode",
    "optimizer_scalar_reads",
    "state_initialisation_only",
    "device_meshes_outside_fake_mode",
    "fsdp_shards_by_narrow",
    "sdpa_flop_count",
    "sdpa_backward_flop_count",
    "flop_registry",
    "dtensor_local",
    "sdpa_backend_ops",
    "function_modes",
    "FAKE_TENSOR_LIMITS",
]

FAKE_TENSOR_LIMITS: tuple[type[BaseException], ...] = (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedOperatorException,
)
"""What fake tensors raise for an op they cannot run without values (``.item()``, ``float(t)``,
``nonzero``) or at all: a limit of shapes-only tensors, not a fault of the model."""

MEMORY_HISTORY_MAX_ENTRIES = 1_000_000
"""Allocator events kept (a ring buffer; the oldest are dropped beyond it). One training step of a
billion-parameter model makes tens of thousands of allocations and frees, so one step fits."""


def dtensor_local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard itself (``DTensor._local_tensor``), other tensors as they are. The
    public ``to_local()`` of a parameter DTensor makes a fresh view of it on every call (one op
    through every dispatch mode on the stack: a second per plan step of a sharded 70B model, where
    the tracker asks for each parameter's shard at every phase); the storage is the same."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def fake_device(t: object) -> torch.device | None:
    """The device a FakeTensor answers ``prim.device`` with, read off the tensor, or None for any
    other object. It is what ``FakeTensor.__torch_dispatch__`` and the mode's own handler return:
    the meta device inside a kernel's invocation (``in_kernel_invocation``), else ``fake_device``.
    Read here, the question skips a round trip through every dispatch mode below the asker and
    FakeTensorMode's dispatch (the autograd engine asks it several times per node)."""
    if type(t) is not FakeTensor:
        return None
    return torch.device("meta") if t.fake_mode.in_kernel_invocation else t.fake_device


def is_fake(t: torch.Tensor) -> bool:
    """True for a tensor made under FakeTensorMode (it has a meta storage, no data)."""
    return isinstance(t, FakeTensor)


@contextlib.contextmanager
def fake_tensor_mode() -> Iterator[FakeTensorMode]:
    """Enter a FakeTensorMode that turns every new tensor, including plain factory calls
    such as ``torch.randn`` and ``nn.Linear``'s parameters, into a fake one.

    ``allow_non_fake_inputs`` lets already-real tensors (module constants, a preset's
    cached table) flow into fake ops instead of raising.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        yield mode


def active_fake_mode() -> FakeTensorMode | None:
    """The FakeTensorMode on the current mode stack, or None."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode()


@contextlib.contextmanager
def outside_fake_mode() -> Iterator[None]:
    """Suspend the active FakeTensorMode (if any): tensors made inside are real (or meta).
    Used to build a model on the meta device under a fake run, where its init code may read
    values (``.item()``) that fake tensors do not have."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        yield


class _StandInScalarReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and is_fake(args[0]):
            dtype = args[0].dtype
            return True if dtype == torch.bool else 1.0 if dtype.is_floating_point or dtype.is_complex else 1
        if func is torch.ops.prim.device.default and (device := fake_device(args[0])) is not None:
            return device  # the optimizer's grouping by device asks it of every tensor (fake_device)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def optimizer_scalar_reads() -> Iterator[None]:
    """Inside a fake run, an optimizer step's reads of one number as a Python value answered with 1
    instead of failing (fake tensors hold no values): Adafactor's ``step_t.item()`` and
    ``param.norm(2).item()``, in both its loop and its foreach step. They only scale the update; which
    tensors the step makes, and their sizes, do not depend on them, so the bytes are the step's (and a
    fake step's values mean nothing anyway). Only the optimizer's step runs inside: a model whose own
    code branches on a value still stops with fake tensors' error. Outside fake mode it does nothing."""
    if active_fake_mode() is None:
        yield
        return
    with _StandInScalarReads():
        yield


STATE_ONLY_UPDATES = {"Adam": "adam", "AdamW": "adam"}
"""Optimizer class -> the functional update its ``step()`` calls after ``_init_group`` made the state
(a global of the module that defines the step: ``torch.optim.adam.adam`` for both in torch 2.x)."""


def _skip_update(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def state_initialisation_only(optimizer: torch.optim.Optimizer) -> Iterator[bool]:
    """Inside, AdamW's ``step()`` makes its state (``_init_group``: ``step``, ``exp_avg``,
    ``exp_avg_sq``, exactly as a first step does) and skips the update, which only changes values:
    its functional (``STATE_ONLY_UPDATES``) is swapped for one that does nothing. Yields whether it
    was; an optimizer not in the table, or a PyTorch whose step calls no such function, steps in full
    (the same state, more ops). Used where a fake run makes its state without steps
    (dbprofile.measure.warmup): the update was 5% of a depth-4 Llama-7B e2e trace with the foreach
    AdamW, 13% with the for-loop one (issue 28, round 8)."""
    name = STATE_ONLY_UPDATES.get(type(optimizer).__name__)
    module = sys.modules.get(getattr(type(optimizer).step, "__module__", ""))
    if name is None or module is None or not callable(getattr(module, name, None)):
        yield False
        return
    update = getattr(module, name)
    setattr(module, name, _skip_update)
    try:
        yield True
    finally:
        setattr(module, name, update)


@contextlib.contextmanager
def device_meshes_outside_fake_mode() -> Iterator[None]:
    """Let FSDP2 compose with tensor parallelism on fake tensors. ``fully_shard`` of a parameter that
    is already a DTensor on a TP mesh joins the two meshes with the private
    ``DeviceMesh._concatenate``, which builds a ``DeviceMesh`` and finds this rank's coordinates with
    ``(mesh == rank).nonzero()``; under FakeTensorMode that mesh tensor is fake and ``nonzero`` has no
    fake shape (DynamicOutputShapeException), though it is only bookkeeping of rank numbers. Inside
    this context the concatenation runs with fake mode suspended (the mesh is made of real ints, as
    ``init_device_mesh`` outside fake mode makes it); everything else stays fake."""
    from torch.distributed.device_mesh import DeviceMesh

    original = DeviceMesh.__dict__["_concatenate"]
    concatenate = original.__func__

    def outside(meshes: list[DeviceMesh]) -> DeviceMesh:
        with outside_fake_mode():
            return concatenate(meshes)

    DeviceMesh._concatenate = staticmethod(outside)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        DeviceMesh._concatenate = original  # type: ignore[method-assign]


class _NarrowedChunks:
    """``torch.chunk(tensor, count, dim)`` padded with empty tensors to ``count`` entries, as FSDP2's
    private ``_fsdp_common._chunk_with_empty`` returns it, with each chunk made only when it is read."""

    def __init__(self, tensor: torch.Tensor, count: int, dim: int) -> None:
        size = tensor.size(dim)
        self.tensor, self.dim = tensor, dim
        step = -(-size // count)  # torch.chunk's chunk length
        if size == 0:  # torch.chunk: ``count`` empty views
            self.bounds = [(0, 0)] * count
        else:
            self.bounds = [(start, min(step, size - start)) for start in range(0, size, step)]
        # FSDP2 pads with empty tensors made at once; they allocate (0 bytes), so they are made here too.
        self.empties = [tensor.new_empty(0) for _ in range(count - len(self.bounds))]

    def __len__(self) -> int:
        return len(self.bounds) + len(self.empties)

    def __getitem__(self, index: int) -> torch.Tensor:
        index = range(len(self))[index]
        if index >= len(self.bounds):
            return self.empties[index - len(self.bounds)]
        start, length = self.bounds[index]
        return self.tensor.narrow(self.dim, start, length)


@contextlib.contextmanager
def fsdp_shards_by_narrow() -> Iterator[None]:
    """Let ``fully_shard`` take each rank's shard of a fake parameter as one view. FSDP2 finds a
    parameter's shard with the private ``_fsdp_common._chunk_with_empty``: ``torch.chunk`` into every
    rank's chunk, of which it reads this rank's and the first; on fake tensors each chunk is a
    fake-tensor dispatch, so a simulated rank of a 64-way mesh made 64 views per parameter, twice
    (20% of the 70B plan's FSDP runs, issue 28). Inside this context that function (as
    ``_fsdp_param`` imported it) hands out the same chunks, each made by ``narrow`` when read: the
    same views (offset, size, strides) of the same storage, nothing else changed. Where a PyTorch
    version has no such function, nothing is replaced."""
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param
    except ImportError:
        yield
        return
    original = getattr(_fsdp_param, "_chunk_with_empty", None)
    if original is None:
        yield
        return
    _fsdp_param._chunk_with_empty = _NarrowedChunks  # type: ignore[assignment]  # a sequence, read by index
    try:
        yield
    finally:
        _fsdp_param._chunk_with_empty = original


def fsdp_lazy_init(root: Any) -> None:
    """FSDP2's lazy initialisation of the root module's state (which module is the root, the
    communication context every unit shares), which the root's first forward runs: the private
    ``FSDPState._lazy_init``, for a unshard before any forward (dbprofile.methods.sharding.unshard_once)."""
    root._get_fsdp_state()._lazy_init()


def profiler_allocations(prof: torch.profiler.profile) -> list[tuple[int, int]]:
    """(time in ns, bytes: + allocated / - freed) for every allocator event a
    ``torch.profiler.profile(profile_memory=True)`` recorded, in time order. The public
    ``prof.events()`` attributes most of them to ops and drops them; the raw kineto results
    keep each one. Used by the tests as the allocator's ground truth on the CPU."""
    if prof.profiler is None or prof.profiler.kineto_results is None:
        raise RuntimeError(
            "profiler_allocations needs a finished profile: call it after the "
            "`with torch.profiler.profile(...)` block exits."
        )
    events = prof.profiler.kineto_results.events()
    # _KinetoEvent.nbytes exists at run time but is missing from torch's stub (_C/_autograd.pyi).
    allocs = [(e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"]  # type: ignore[attr-defined]
    allocs.sort(key=lambda item: item[0])
    return allocs


def start_cuda_memory_history() -> None:
    """Start recording every CUDA allocation and free with its Python stack.

    ``stacks="python"``, not the default ``"all"``: C++ frames make ``_dump_snapshot`` symbolise
    native stacks, which takes minutes on a large step, and the Python stack already names the
    module and line that allocated."""
    options: dict = dict(enabled="all", context="all", stacks="python", max_entries=MEMORY_HISTORY_MAX_ENTRIES)
    # Each snapshot holds its own step only, whatever was recorded before (torch >= 2.5 can say so).
    if "clear_history" in inspect.signature(torch.cuda.memory._record_memory_history).parameters:
        options["clear_history"] = True
    torch.cuda.memory._record_memory_history(**options)


def stop_cuda_memory_history() -> None:
    """Stop recording (the timed steps that follow run without its overhead)."""
    torch.cuda.memory._record_memory_history(enabled=None)


def dump_cuda_memory_snapshot(path: str) -> None:
    """Write the allocator's state and the history recorded so far as the pickle memory_viz reads."""
    torch.cuda.memory._dump_snapshot(path)


def sdpa_backend_ops() -> dict[str, Any]:
    """The ATen ops behind ``scaled_dot_product_attention``'s backends (underscore ops the CUDA
    dispatcher calls, each with a fake-tensor kernel and a backward of its own): flash,
    memory-efficient, cuDNN, and the math composite."""
    aten = torch.ops.aten
    return {
        "flash": aten._scaled_dot_product_flash_attention.default,
        "efficient": aten._scaled_dot_product_efficient_attention.default,
        "cudnn": aten._scaled_dot_product_cudnn_attention.default,
        "math": aten._scaled_dot_product_attention_math.default,
    }


def function_modes() -> list[torch.overrides.TorchFunctionMode]:
    """The torch-function modes active on this thread now, outermost first (``torch.overrides``'
    private mode stack)."""
    return list(torch.overrides._get_current_function_mode_stack())
