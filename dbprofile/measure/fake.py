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
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dbprofile.measure._torch_private import fake_tensor_mode, is_fake

__all__ = ["fake_mode", "is_fake", "cuda_autocast_policy"]


@contextlib.contextmanager
def fake_mode() -> Iterator[None]:
    """Make every tensor created inside fake (no memory), with the CPU as its device."""
    # Fake tensors must report the CPU even if a caller changed the default device.
    with torch.device("cpu"), fake_tensor_mode():
        yield


class _CudaCrossEntropy(TorchFunctionMode):
    """``F.cross_entropy`` on low-precision logits as CUDA's autocast runs it.

    CPU autocast lists ``cross_entropy`` as an fp32 op and casts the bf16 logits to fp32
    *before* ``log_softmax``; on CUDA, ``log_softmax`` runs at the logits' precision and only
    its output is cast to fp32 for ``nll_loss`` (seen in the op list of a bf16 GPT-2 step on an
    H200: ``_log_softmax`` bf16 -> bf16, ``_to_copy`` -> fp32, ``nll_loss_forward``). For a
    vocabulary-sized loss the two orders hold different logits-sized tensors at the peak, so a
    fake run that stands for a CUDA device follows CUDA's order.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.cross_entropy and torch.is_autocast_enabled("cpu"):
            logits = args[0] if args else kwargs["input"]
            rest = {k: v for k, v in kwargs.items() if k != "input"}
            if isinstance(logits, torch.Tensor) and logits.dtype in (torch.bfloat16, torch.float16) \
                    and not rest.get("label_smoothing", 0.0) and len(args) <= 2:
                target = args[1] if len(args) > 1 else rest.pop("target")
                rest.pop("target", None)
                rest.pop("label_smoothing", None)  # zero here: nll_loss has no such argument
                with torch.autocast("cpu", enabled=False):
                    log_probs = torch.log_softmax(logits, dim=1 if logits.dim() > 1 else 0)
                    return F.nll_loss(log_probs.float(), target, **rest)
        return func(*args, **kwargs)


def cuda_autocast_policy() -> contextlib.AbstractContextManager:
    """Inside a fake run standing for a CUDA device: CUDA's autocast order where it differs from
    the CPU's in memory (the cross-entropy loss; see ``_CudaCrossEntropy``)."""
    return _CudaCrossEntropy()
