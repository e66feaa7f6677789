"""The kernel ``scaled_dot_product_attention`` runs on a CUDA target, run in a fake step in place of
the CPU's choice, so that the step saves what that kernel saves.

On the CPU, attention with dropout (and any call the CPU's flash kernel refuses) runs the math
kernel, which saves every head's T x T attention weights and dropout mask; on a GPU the same call
runs a fused kernel that applies dropout inside and saves the output, a log-sum-exp and the RNG
state. ``CudaAttention`` is a ``TorchFunctionMode`` that picks the backend PyTorch would pick on the
target (``choose_backend``) and calls that backend's ATen op, whose fake-tensor kernel
(torch/_meta_registrations.py) gives the outputs, and whose autograd node saves the tensors, that
the CUDA kernel has, after the same preparation the CUDA dispatcher makes (attention.cpp): the
head dimension padded to a multiple of 8 for flash, a boolean mask turned into an additive one, a
mask padded to 8 elements and expanded for memory-efficient attention, the inputs cast by CUDA's
autocast.

The rules are those of PyTorch's ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp`` (main
branch after 2.11, commit 001f694; the GPU validation ran torch 2.11.0+cu130) for dense inputs:

- order: cuDNN first on sm90 and sm10x when the cuDNN runtime is newer than 9.15.0
  (``check_prefer_cudnn_attention``; the H200 traces show cuDNN attention for bf16), else flash,
  memory-efficient, math, cuDNN;
- cuDNN: fp16/bf16, sm80 to sm121, dropout a multiple of 1/16, head dims multiples of 8 and at most
  128 (192 for q/k with 128 for v on sm90/sm10x), key length above 1, no query of length 1 with
  dropout, batch and heads at most 65535;
- flash: fp16/bf16, sm80 to sm121, no mask, equal head dims of at most 256, not causal with unequal
  lengths, no head dim in (192, 224] (or (224, 256] with dropout) when training on sm86-89 / sm120;
- memory-efficient: fp16/bf16/fp32 on sm80+ (fp16/fp32 before), sm50 to sm121, head dims multiples
  of 8 (fp16/bf16) or 4 (fp32) on sm80+, storage offsets aligned likewise;
- all: last-dimension stride 1, equal heads or ``enable_gqa`` with the query's heads a multiple of
  the key's; math is the fallback.

The math fallback is PyTorch's own composite (it computes fp16/bf16 inputs in fp32 on any device).
Known limitations: nested tensors, deterministic-algorithm mode and a user's ``sdpa_kernel`` choice
are not modelled; grouped-query attention on the memory-efficient kernel (fp32) repeats K and V to
the query's heads (its fake backward takes no grouped heads), which overstates each such call by
K and V's bytes times (query heads / key heads - 1). Where the RNG state lives follows the kernels (and the H200 traces): on the device
for flash (two uint64 and one scalar) and cuDNN (two int64), on the host for memory-efficient
attention (dbprofile.measure.cuda_scratch.op_host_outputs).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dbprofile.torch_internals import sdpa_backend_ops

FLASH, EFFICIENT, CUDNN, MATH = "flash", "efficient", "cudnn", "math"
BACKENDS = (FLASH, EFFICIENT, CUDNN, MATH)

ASSUMED_CUDNN_VERSION = 91501
"""cuDNN 9.15.1: newer than 9.15.0, the version from which PyTorch puts cuDNN attention first on
sm90/sm10x, as it did on the H200 (torch 2.11.0+cu130); below 9.22, so head dims up to 128."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_OPS = sdpa_backend_ops()


@dataclass(frozen=True)
class TensorFacts:
    """What the backend choice reads of a query, key or value: shape, strides, storage offset, dtype.
    No tensor, so it is kept with a traced run (``recorded_calls``) and asked again for another GPU."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorFacts:
        return cls(tuple(t.shape), tuple(t.stride()), int(t.storage_offset()), t.dtype)

    def dim(self) -> int:
        return len(self.shape)

    def stride(self, dim: int) -> int:
        return self.strides[dim]

    def storage_offset(self) -> int:
        return self.offset


@dataclass(frozen=True)
class AttentionCall:
    """What the backend choice reads from one call: shapes, dtype, mask, dropout, causal flag. The
    query, key and value are the call's tensors, or their ``TensorFacts`` (``facts``)."""

    query: Any
    key: Any
    value: Any
    masked: bool
    dropout_p: float
    is_causal: bool
    enable_gqa: bool
    training: bool

    @property
    def head_dims(self) -> tuple[int, int]:
        return self.query.shape[-1], self.value.shape[-1]

    def facts(self) -> AttentionCall:
        """The same call with its tensors' facts in their place: hashable and picklable."""
        q, k, v = (TensorFacts.of(t) for t in (self.query, self.key, self.value))
        return AttentionCall(q, k, v, self.masked, self.dropout_p, self.is_causal, self.enable_gqa, self.training)


_RECORDING: list[set[AttentionCall]] = []
"""The sets ``recorded_calls`` is filling (innermost last); every traced call goes into each."""


@contextlib.contextmanager
def recorded_calls() -> Iterator[set[AttentionCall]]:
    """Every attention call a CudaAttention mode decides inside, as facts (``AttentionCall.facts``).
    A step's program depends on the target GPU only through these decisions (the compute capability
    reaches nothing else of a fake run), so two GPUs on which each call picks the same backend run
    the same program (``Decisions.same_on``; the planner's trace cache shares such runs)."""
    calls: set[AttentionCall] = set()
    _RECORDING.append(calls)
    try:
        yield calls
    finally:
        _RECORDING.remove(calls)


def announce(calls: set[AttentionCall]) -> None:
    """Count ``calls`` as made again inside every ``recorded_calls`` (a trace read from memory)."""
    for recording in _RECORDING:
        recording.update(calls)


@dataclass(frozen=True)
class Decisions:
    """The attention calls of a run traced for a GPU of ``capability`` (``recorded_calls``)."""

    capability: tuple[int, int]
    calls: frozenset[AttentionCall]

    def same_on(self, other: tuple[int, int]) -> bool:
        """Whether each call picks the same backend on a GPU of ``other``: the same program there."""
        return all(choose_backend(call, self.capability) == choose_backend(call, other) for call in self.calls)


def _in_range(capability: tuple[int, int], low: tuple[int, int], high: tuple[int, int]) -> bool:
    return low <= capability <= high


def _dense_ok(call: AttentionCall) -> bool:
    """Non-empty 4-D inputs, last-dimension stride 1, heads equal or grouped (``enable_gqa``)."""
    q, k, v = call.query, call.key, call.value
    if any(t.dim() != 4 or t.shape[-2] == 0 for t in (q, k, v)):
        return False
    if any(t.stride(-1) != 1 and t.shape[-1] != 1 for t in (q, k, v)):
        return False
    if q.shape[0] != k.shape[0] or k.shape[1] != v.shape[1]:
        return False
    return q.shape[1] == k.shape[1] or (call.enable_gqa and q.shape[1] % k.shape[1] == 0)


def prefers_cudnn(capability: tuple[int, int]) -> bool:
    """cuDNN attention goes first on sm90 and sm10x (CUDA 13 builds, cuDNN newer than 9.15.0)."""
    return ASSUMED_CUDNN_VERSION > 91500 and capability[0] in (9, 10)


def can_use_cudnn(call: AttentionCall, capability: tuple[int, int]) -> bool:
    d_qk, d_v = call.head_dims
    limit = 128
    sm90_or_sm10x = capability == (9, 0) or capability[0] == 10
    if sm90_or_sm10x and ASSUMED_CUDNN_VERSION >= 91100 and (d_qk, d_v) == (192, 128):
        limit = 192
    return (
        call.query.dtype in _LOW_PRECISION
        and _in_range(capability, (8, 0), (12, 1))
        and (call.dropout_p * 16).is_integer()
        and call.query.shape[0] <= 65535
        and call.query.shape[1] <= 65535
        and d_qk <= limit
        and d_v <= limit
        and d_qk % 8 == 0
        and d_v % 8 == 0
        and call.key.shape[-2] != 1
        and not (call.dropout_p > 0 and call.query.shape[-2] == 1)
    )


def can_use_flash(call: AttentionCall, capability: tuple[int, int]) -> bool:
    d_qk, d_v = call.head_dims
    if call.masked or d_qk != call.key.shape[-1] or d_qk != d_v or d_qk > 256:
        return False
    if call.is_causal and call.query.shape[-2] != call.key.shape[-2]:
        return False
    sm86_89_or_12x = _in_range(capability, (8, 6), (8, 9)) or _in_range(capability, (12, 0), (12, 1))
    if call.training and sm86_89_or_12x and not (d_qk <= 192 or (call.dropout_p == 0 and d_qk > 224)):
        return False
    return _in_range(capability, (8, 0), (12, 1)) and call.query.dtype in _LOW_PRECISION


def can_use_efficient(call: AttentionCall, capability: tuple[int, int]) -> bool:
    dtype = call.query.dtype
    allowed = (torch.float16, torch.float32, torch.bfloat16) if capability[0] >= 8 else (torch.float16, torch.float32)
    if dtype not in allowed or not _in_range(capability, (5, 0), (12, 1)):
        return False
    # minimum_gemm_alignment: tensor cores on sm80+ (and for fp16 on sm70) need 128-bit rows.
    half = dtype in _LOW_PRECISION
    tensor_cores = capability[0] >= 8 or (capability[0] >= 7 and half)
    alignment = max(4 if capability[0] >= 8 else 1, (8 if half else 4) if tensor_cores else 1)
    d_qk, d_v = call.head_dims
    if d_qk != call.key.shape[-1] or d_qk % alignment or d_v % alignment:
        return False
    if capability[0] >= 8:
        return all(t.storage_offset() % alignment == 0 for t in (call.query, call.key, call.value))
    return True


def choose_backend(call: AttentionCall, capability: tuple[int, int]) -> str:
    """The backend ``select_sdp_backend`` picks for ``call`` on a GPU of ``capability``."""
    if not _dense_ok(call):
        return MATH
    order = (CUDNN, FLASH, EFFICIENT) if prefers_cudnn(capability) else (FLASH, EFFICIENT)
    checks = {CUDNN: can_use_cudnn, FLASH: can_use_flash, EFFICIENT: can_use_efficient}
    for backend in order:
        if checks[backend](call, capability):
            return backend
    return MATH


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``convert_boolean_attn_mask``: a boolean mask becomes 0 / -inf in the query's dtype."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    additive = torch.zeros_like(mask, dtype=dtype)
    return additive.masked_fill_(mask.logical_not(), -math.inf)


def _efficient_mask(mask: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """``preprocess_mask``: pad the last dimension when a stride is not a multiple of 8 (then slice
    back), and expand to (batch, heads, queries, keys)."""
    if any(s % 8 for s in mask.stride()[:-1]) or mask.stride(-1) != 1:
        last = mask.shape[-1]
        mask = F.pad(mask, (0, 8 - last % 8))[..., :last]
    q, k = call.query, call.key
    return mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def run_backend(backend: str, call: AttentionCall, mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """The output of ``backend``'s ATen op on ``call``, prepared as attention.cpp prepares it."""
    q, k, v = call.query, call.key, call.value
    mask = _additive_mask(mask, q.dtype)
    logsumexp = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if backend == FLASH:
        head_dim = q.shape[-1]
        scale = scale if scale is not None else 1 / math.sqrt(head_dim)
        pad = -head_dim % 8
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        out = _OPS[FLASH](q, k, v, call.dropout_p, call.is_causal, False, scale=scale)[0]
        return out[..., :head_dim] if pad else out
    if backend == EFFICIENT:
        mask = _efficient_mask(mask, call) if mask is not None else None
        if k.shape[1] != q.shape[1]:
            # Its fake kernel's backward takes no grouped heads (it returns the query's): repeat K and V
            # to the query's heads, as the math kernel does (a documented overestimate).
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        return _OPS[EFFICIENT](q, k, v, mask, logsumexp, call.dropout_p, call.is_causal, scale=scale)[0]
    if backend == CUDNN:
        return _OPS[CUDNN](q, k, v, mask, logsumexp, call.dropout_p, call.is_causal, False, scale=scale)[0]
    return _OPS[MATH](q, k, v, mask, call.dropout_p, call.is_causal, None, scale=scale, enable_gqa=call.enable_gqa)[0]


def _autocast(tensor: Any) -> Any:
    """CUDA's autocast runs SDPA in the autocast dtype (its lower-precision list); the fake run is
    under CPU autocast, which a direct call to a backend's op would bypass."""
    if not isinstance(tensor, torch.Tensor) or not torch.is_autocast_enabled("cpu"):
        return tensor
    dtype = torch.get_autocast_dtype("cpu")
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def call_site() -> str:
    """Where the model called attention: the first frame outside torch and this module, as a path
    relative to its package folder (``transformers/models/gpt2/modeling_gpt2.py:123``)."""
    frame: FrameType | None = sys._getframe(2)
    torch_root = str(Path(torch.__file__).parent)
    while frame is not None and (
        frame.f_code.co_filename.startswith(torch_root) or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    if frame is None:
        return "unknown"
    path = Path(frame.f_code.co_filename)
    roots = sorted((Path(p) for p in sys.path if p and path.is_relative_to(p)), key=lambda p: len(p.parts))
    shown = path.relative_to(roots[-1]) if roots else path.name
    return f"{shown}:{frame.f_lineno}"


class CudaAttention(TorchFunctionMode):
    """Inside a fake run standing for a GPU of ``capability``: every ``scaled_dot_product_attention``
    runs the backend that GPU would pick; ``backends`` maps each call site to it (sorted, joined by
    ', ' where one site picked several)."""

    def __init__(self, capability: tuple[int, int]) -> None:
        super().__init__()
        self.capability = capability
        self.backends: dict[str, str] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return self._attention(*args, **kwargs)

    def _attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        query, key, value, attn_mask = (_autocast(t) for t in (query, key, value, attn_mask))
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        call = AttentionCall(query, key, value, attn_mask is not None, dropout_p, is_causal, enable_gqa, training)
        backend = choose_backend(call, self.capability)
        if _RECORDING:
            announce({call.facts()})
        site = call_site()
        seen = set(self.backends.get(site, "").split(", ")) - {""}
        self.backends[site] = ", ".join(sorted(seen | {backend}))
        return run_backend(backend, call, attn_mask, scale)
