"""Fake-tensor mode: run the same training code without allocating any memory.

Under ``fake_mode()`` every tensor (parameters built by ``spec.build()``, the batch, the
activations, gradients and optimizer state) is a ``FakeTensor`` on the CPU: it has shapes,
dtypes, strides and a storage size, but no data. The tracker counts storage bytes, which
fake storages report exactly as real ones do, so a fake run's tracked bytes equal a real
CPU run's to the byte while using almost no memory and little time. Values are meaningless
(a loss is never finite-checked in fake mode).

Example::

    with fake_mode():
        model = spec.build()          # allocates nothing
        loss = spec.loss(model, spec.batch(8, "cpu"))
        loss.backward()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dbprofile.torch_internals import TorchDispatchMode, fake_tensor_mode, is_fake

__all__ = ["fake_mode", "is_fake", "cuda_autocast_policy", "real_dtype_checks"]


@contextlib.contextmanager
def fake_mode() -> Iterator[None]:
    """Make every tensor created inside fake (no memory), with the CPU as its device."""
    # Fake tensors must report the CPU even if a caller changed the default device. The device
    # context is a Python TorchFunctionMode that every torch call then passes through (about 5% of
    # a fake step's time), so it is entered only when the default device is not already the CPU.
    device = torch.device("cpu") if torch.get_default_device().type != "cpu" else contextlib.nullcontext()
    with device, fake_tensor_mode():
        yield


_LOW_PRECISION = (torch.bfloat16, torch.float16)

# CUDA's autocast runs these in fp32 (aten/src/ATen/autocast_mode.cpp, the CUDA "fp32" list):
# lower-precision floating inputs are cast to fp32 first. CPU autocast leaves them at bf16.
_FP32_FUNCTIONS = {
    F.layer_norm,
    F.group_norm,
    F.softplus,
    F.cosine_similarity,
    F.kl_div,
    F.poisson_nll_loss,
    F.smooth_l1_loss,
    F.huber_loss,
    F.l1_loss,
    F.mse_loss,
    F.binary_cross_entropy_with_logits,
    F.nll_loss,
    torch.cdist,
    torch.dist,
    torch.renorm,
    torch.logsumexp,
    torch.Tensor.logsumexp,
    *(
        getattr(owner, name)
        for name in (
            "exp",
            "expm1",
            "log",
            "log10",
            "log2",
            "log1p",
            "reciprocal",
            "rsqrt",
            "sinh",
            "cosh",
            "tan",
            "acos",
            "asin",
            "erfinv",
            "pow",
        )
        for owner in (torch, torch.Tensor)
    ),
    torch.Tensor.__pow__,
    torch.Tensor.__rpow__,
}
# ...and these with an fp32 output dtype unless one is given (the "fp32_set_opt_dtype" list).
_FP32_OUTPUT_FUNCTIONS = {
    F.softmax,
    F.log_softmax,
    torch.softmax,
    torch.log_softmax,
    torch.Tensor.softmax,
    torch.Tensor.log_softmax,
    torch.cumsum,
    torch.Tensor.cumsum,
    torch.cumprod,
    torch.Tensor.cumprod,
    torch.prod,
    torch.Tensor.prod,
    torch.linalg.vector_norm,
    torch.linalg.matrix_norm,
}


def _to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in _LOW_PRECISION:
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_fp32(v) for v in value)
    return value


class _CudaAutocastPolicy(TorchFunctionMode):
    """CUDA's autocast policy inside a fake run, which (on the CPU) runs under CPU autocast.

    The two policies differ in which ops run in fp32, and so in which fp32 copies and outputs
    exist: on CUDA ``layer_norm``, ``group_norm``, the pointwise transcendental ops and most
    losses cast bf16 inputs to fp32 and return fp32; ``softmax``, ``log_softmax``, ``cumsum``,
    ``prod`` and the norms return fp32; CPU autocast keeps all of these at bf16. And a bf16
    ``cross_entropy``: CPU autocast casts the logits to fp32 *before* ``log_softmax``, while on
    CUDA ``log_softmax`` runs at the logits' precision and only its output is cast for
    ``nll_loss`` (seen in the op list of a bf16 GPT-2 step on an H200: ``_log_softmax`` bf16 ->
    bf16, ``_to_copy`` -> fp32, ``nll_loss_forward``). For a vocabulary-sized loss the two orders
    hold different logits-sized tensors at the peak. Outside autocast this mode changes nothing.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        if func is F.cross_entropy:
            return self._cross_entropy(func, args, kwargs)
        if func in _FP32_FUNCTIONS:
            with torch.autocast("cpu", enabled=False):
                return func(*_to_fp32(args), **{k: _to_fp32(v) for k, v in kwargs.items()})
        if func in _FP32_OUTPUT_FUNCTIONS and kwargs.get("dtype") is None:
            first = args[0] if args else kwargs.get("input")
            if isinstance(first, torch.Tensor) and first.dtype in _LOW_PRECISION:
                with torch.autocast("cpu", enabled=False):
                    return func(*args, **{**kwargs, "dtype": torch.float32})
        return func(*args, **kwargs)

    @staticmethod
    def _cross_entropy(func: Any, args: tuple, kwargs: dict) -> Any:
        logits = args[0] if args else kwargs.get("input")
        rest = {k: v for k, v in kwargs.items() if k != "input"}
        if (
            isinstance(logits, torch.Tensor)
            and logits.dtype in _LOW_PRECISION
            and not rest.get("label_smoothing", 0.0)
            and len(args) <= 2
        ):
            target = args[1] if len(args) > 1 else rest.pop("target")
            rest.pop("target", None)
            rest.pop("label_smoothing", None)  # zero here: nll_loss has no such argument
            with torch.autocast("cpu", enabled=False):
                log_probs = torch.log_softmax(logits, dim=1 if logits.dim() > 1 else 0)
                return F.nll_loss(log_probs.float(), target, **rest)
        return func(*args, **kwargs)


def cuda_autocast_policy() -> contextlib.AbstractContextManager:
    """Inside a fake run standing for a CUDA device: CUDA's autocast policy where it differs from
    the CPU's (see ``_CudaAutocastPolicy``)."""
    return _CudaAutocastPolicy()


_SAME_DTYPE_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "dot", "convolution"})
"""Ops whose tensor arguments must share a dtype on real tensors; fake tensors do not check it."""


class _DtypeCheck(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _SAME_DTYPE_OPS:
            dtypes = list(dict.fromkeys(a.dtype for a in args if isinstance(a, torch.Tensor)))
            if len(dtypes) > 1:
                raise RuntimeError(
                    f"{func.overloadpacket.__name__}: its inputs must have the same dtype, but got "
                    f"{' and '.join(str(d).removeprefix('torch.') for d in dtypes)}"
                )
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def real_dtype_checks() -> Iterator[None]:
    """Inside ``fake_mode``: refuse a matrix product or convolution of mixed dtypes (integer
    inputs to a Linear) as a real step would, so the fake pre-check finds it before measuring."""
    with _DtypeCheck():
        yield
