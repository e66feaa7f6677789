"""Counting a training step's floating-point operations with the formulas of PyTorch's
``torch.utils.flop_counter.FlopCounterMode``.

A counting dispatch mode sees every op the step runs, so it counts what the technique
really executes, including checkpointing's recomputed forward (which runs inside the
backward) and DiffusionBlocks' stem, head and sigma conditioning in every block-step, on
whatever sequence length the technique feeds its layers. It needs shapes only, so it
counts fake-tensor steps exactly as real ones, and the runner counts the same tracked step
whose memory it measures: no extra step is run.

What is counted: matrix multiplications (``mm``, ``addmm``, ``bmm``, ``baddbmm``),
convolutions and their backward, and scaled-dot-product attention forward and backward
(2 FLOPs per multiply-add), with PyTorch's own formulas (``flop_registry``). Not counted:
element-wise ops, norms, softmax, activation functions and the optimizer's update, which
are memory-bound and small in FLOPs next to the matmuls of a transformer. Attention is
counted over the full score matrix even when it is causal, as PyTorch's formulas do.
Checkpointing's recomputation stops at the last tensor the backward needs
(``torch.utils.checkpoint``'s early stop), so the last matmul of each checkpointed layer is
not recomputed and ckpt costs less than the textbook 4/3 of an e2e step (ViT-B/16: 1.22x;
the MLP's second matmul is a third of a layer's matmul work).

Why not ``FlopCounterMode`` itself: inside the step whose memory is being tracked it changes
that memory, measured on the tiny presets. Its module breakdown (a ``ModuleTracker``)
registers gradient hooks that hold autograd nodes, which under checkpointing keeps the
recomputed activations alive (gpt-tiny ckpt peak 6.37 MB -> 8.90 MB); and it decomposes every
op without a formula into smaller ops (llama-tiny's fused RMSNorm: e2e peak 8.47 MB -> 8.56 MB,
ckpt 5.69 MB -> 5.95 MB). ``FlopCounter`` below applies the same formulas without either, so the
counted step's memory is exactly the uncounted one's, and its totals equal FlopCounterMode's
(both tested).

One gap in PyTorch's table is closed here: it has no entry for the CPU's fused attention
kernel (``_scaled_dot_product_flash_attention_for_cpu`` and its backward), which is what
``scaled_dot_product_attention`` runs on the CPU and so in fake runs; its FLOPs would
silently be missing. ``CPU_ATTENTION_FORMULAS`` applies PyTorch's attention formulas (those
it uses for the CUDA kernels) to it, so a fake run on the CPU and a real run on a GPU count
the same attention work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dbprofile.torch_internals import (
    TorchDispatchMode,
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

aten = torch.ops.aten


def _cpu_attention_forward(query, key, value, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_attention_backward(grad_out, query, key, value, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


CPU_ATTENTION_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}
"""Formulas for the CPU attention kernel: (op arguments, out_val=output) -> FLOPs."""


class FlopCounter(TorchDispatchMode):
    """A dispatch mode that adds up the FLOPs of every op PyTorch has a formula for, running each
    op exactly as it would run uncounted.

    Example::

        with FlopCounter() as flops:
            trainer.step(batch)
        flops.total   # an int
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self._formulas = {**flop_registry, **CPU_ATTENTION_FORMULAS}
        # PyTorch wraps each registered formula in ``shape_wrapper``, which maps every argument to
        # its shape with a pytree walk: that walk was about half of what counting cost per tracked
        # matmul. The same mapping done directly (_shapes) feeds the formula underneath.
        self._on_shapes = {op: f.__wrapped__ for op, f in flop_registry.items() if hasattr(f, "__wrapped__")}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.count(func, args, kwargs, out)
        return out

    def count(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Add the FLOPs of one op that has run. The memory tracker calls this from its own dispatch
        mode (``Tracker.flops``), so a tracked step is counted without a second mode on the stack:
        each mode costs a Python round trip per op, about as much as the tracker's own work."""
        packet = func._overloadpacket
        on_shapes = self._on_shapes.get(packet)
        if on_shapes is not None:
            self.total += int(on_shapes(*_shapes(args), out_shape=_shapes(out), **_shapes(kwargs)))
            return
        formula = self._formulas.get(packet)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))


def _shapes(value: Any) -> Any:
    """``value`` with every tensor replaced by its shape, through tuples, lists and dicts (what
    torch.utils.flop_counter's ``shape_wrapper`` does with a pytree map)."""
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (tuple, list)):
        return (
            type(value)(_shapes(v) for v in value) if type(value) in (tuple, list) else tuple(_shapes(v) for v in value)
        )
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items()}
    return value
