"""The words every layer shares, as typed literals with their tuples in display order: the
share categories of a peak, how a measurement ended, the phases of a step, the verdict's
decisions and the planner's CUDA corrections. One definition; ``typing.get_args`` keeps
each tuple and its type in step."""

from __future__ import annotations

from typing import Literal, get_args

Category = Literal[
    "parameters",
    "buffers",
    "gradients",
    "optimizer_state",
    "activations",
    "temporaries",
    "inputs",
    "workspace",
    "communication",
]
CATEGORIES: tuple[Category, ...] = get_args(Category)
"""The share categories of a peak, in display order. They sum to the peak exactly.

``workspace`` is CUDA-only: allocator bytes that no tensor holds (the cuBLAS handles'
workspaces, and scratch a kernel allocates and frees inside one op, e.g. attention backward or
cuDNN convolutions), read from the allocator's own counters around every op. It is 0 on the
CPU and in fake runs; the planner adds the cuBLAS part as a documented correction.

``communication`` is FSDP-only (dbprofile.measure.distributed): the all-gather and
reduce-scatter buffers, i.e. the all-gather input and output, the unsharded parameters a unit
computes with and the reduce-scatter input. It is 0 on a single device and under db:B+parallel."""


STATE_CATEGORIES: tuple[Category, ...] = ("parameters", "buffers", "gradients", "optimizer_state")
"""What a step holds whatever its batch size: at the same op, a step of any batch size has the same
parameters, buffers, gradients and optimizer state live (the planner's floor under every batch's peak)."""

Status = Literal["ok", "oom", "error", "nan", "timeout"]
STATUSES: tuple[Status, ...] = get_args(Status)
"""How a measurement ended; ``timeout``: it ran past the run's per-technique time limit."""

Phase = Literal["forward", "backward", "optimizer", "transfer"]
PHASES: tuple[Phase, ...] = get_args(Phase)
"""The phases of a training step the tracker attributes bytes to (``transfer``: +offload's copies)."""

Decision = Literal["adopt", "not-worth-it", "not-needed", "inconclusive"]
DECISIONS: tuple[Decision, ...] = get_args(Decision)
"""The verdict's decisions (dbprofile.verdict, docs/verdict.md)."""

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
"""Training precisions: fp32, or bf16 autocast (parameters and optimizer state stay fp32)."""

OptimizerName = Literal["adamw", "sgd", "adafactor"]
OPTIMIZER_ALGORITHMS: tuple[OptimizerName, ...] = get_args(OptimizerName)
"""The optimizers a technique trains with (what the optimizer-state share holds)."""

OptimizerImplementation = Literal["loop", "foreach", "fused"]
OPTIMIZER_IMPLEMENTATIONS: tuple[OptimizerImplementation, ...] = get_args(OptimizerImplementation)
"""How ``torch.optim`` runs a step (its ``foreach`` / ``fused`` arguments): one parameter at a time,
one kernel per operation over all parameters of a device and dtype (temporaries for all of them at
once), or one fused kernel per group. docs/planner.md says what each holds."""

OPTIMIZERS: tuple[str, ...] = OPTIMIZER_ALGORITHMS + tuple(
    f"{name}-{impl}" for name in OPTIMIZER_ALGORITHMS for impl in OPTIMIZER_IMPLEMENTATIONS
)
"""Every ``--optimizer`` name: an algorithm alone (PyTorch's default implementation for the device
the step runs on) or ``algorithm-implementation``; dbprofile.settings refuses the pairs PyTorch does
not build (fused Adafactor)."""

MaskingSchedule = Literal["linear", "cosine"]
MASKING_SCHEDULES: tuple[MaskingSchedule, ...] = get_args(MaskingSchedule)
"""A masked diffusion LM's masking schedules alpha_t, its default first (dbprofile.masked_diffusion);
here, beside the other names, so that the command line offers them without importing torch."""

CudaCorrection = Literal["cublas_workspace", "allocator_segments", "cuda_context"]
CUDA_CORRECTIONS: tuple[CudaCorrection, ...] = get_args(CudaCorrection)
"""The planner's corrections for a CUDA target, in ``PlanEntry.corrections`` (dbprofile.planner)."""
