"""The target of a plan (a GPU from dbprofile.gpus, a capacity in bytes, or the CPU) and the
CUDA effects a tensor tracker cannot see, each a documented correction with its source: the
cuBLAS workspaces, the caching allocator's segments, the CUDA context."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dbprofile.gpus import GPU, cublas_workspace_bytes, cublas_workspace_reserved_bytes, get_gpu
from dbprofile.spec import SpecError
from dbprofile.units import MiB, size_bytes

MEASURED_CUDA_CONTEXT_BYTES = {"H100-80GB": 1257 * MiB, "H200-141GB": 1392 * MiB}
"""Device memory outside the caching allocator, per card where it was measured: the CUDA context
(driver state, the kernels loaded lazily) and the libraries' modules (cuBLAS, cuDNN), as NVML used
memory minus max_memory_reserved over a validation run's training configurations (driver 580.159.04,
torch 2.11.0+cu130). H100 80GB HBM3: 1247 to 1257 MiB over 60 configurations
(reports/gpu-validation-h100.md); H200: 1382 to 1392 MiB over 52 (reports/gpu-validation-h200-2.md).
It grows by about 10 MiB as more kernels load during a run, so the largest figure is used."""


CUDA_CONTEXT_BYTES = max(MEASURED_CUDA_CONTEXT_BYTES.values())
"""For a card not measured: the largest measured figure (older stacks report less, 287 MB right
after init, pytorch/pytorch#86509, but a training step loads far more kernels)."""


def cuda_context_bytes(gpu_name: str) -> int:
    """The measured context of this card (by its table name or a name the table resolves), else
    CUDA_CONTEXT_BYTES."""
    words = gpu_name.removeprefix("NVIDIA ").split()
    # torch names the card "NVIDIA H100 80GB HBM3": drop trailing words until the table knows it.
    for end in range(len(words), 0, -1):
        try:
            return MEASURED_CUDA_CONTEXT_BYTES.get(get_gpu(" ".join(words[:end])).name, CUDA_CONTEXT_BYTES)
        except SpecError:
            continue
    return CUDA_CONTEXT_BYTES


ALLOCATOR_OVERHEAD_FRACTION = 0.11
"""Reserved minus allocated, as a share of allocated: segments are 2 MiB for blocks <= 1 MiB, 20 MiB
for blocks < 10 MiB, and larger requests are rounded up to 2 MiB (kSmallBuffer, kLargeBuffer,
kRoundLarge in CUDACachingAllocator.cpp), and freed blocks split and fragment. No fake run can see
addresses, so this is the median measured on an H100 (reports/gpu-validation-h100.md): max_memory_reserved
/ max_memory_allocated - 1 was 0.02 to 0.35 over 60 configurations, median 0.11, 90th percentile 0.19
(checkpointing fragments most). Reserved memory is a cache the allocator frees and retries before it
reports out of memory, so the fit decision does not hinge on this estimate."""


UNKNOWN_GPU_COMPUTE_CAPABILITY = (9, 0)
"""A capacity given in bytes says nothing about the card; assume the larger (sm90) cuBLAS workspace."""


ASSUMED_UTILISATION = 0.4
"""Share of the target's peak dense FLOPS a training step sustains, used only to illustrate FLOPs as
time. Large transformer training on A100/H100 reports 30-55% model FLOPs utilisation (PaLM 46%,
Megatron-LM 52% on A100 for its largest models); 40% is a round middle. The ratios between techniques
do not depend on it; absolute times do, and are labelled as estimates."""


@dataclass(frozen=True)
class Target:
    """Where the plan must fit: a GPU from the table, a capacity in bytes, or the CPU."""

    name: str
    capacity_bytes: int | None
    cuda: bool
    compute_capability: tuple[int, int] | None = None
    gpu: GPU | None = None
    """The table entry (None for a capacity in bytes or the CPU): its peak FLOPS."""


def resolve_target(device: str | int | GPU) -> Target:
    """'cpu' (no capacity, no CUDA corrections), a GPU table name, or a capacity in bytes."""
    if isinstance(device, GPU):
        return Target(device.name, device.capacity_bytes, True, device.compute_capability, device)
    if isinstance(device, bool):
        raise SpecError(f"device must be a GPU name or a capacity in bytes, not {device!r}.")
    if isinstance(device, int):
        if device <= 0:
            raise SpecError(f"Device capacity must be a positive number of bytes; got {device}.")
        return Target("custom", device, True, UNKNOWN_GPU_COMPUTE_CAPABILITY)
    if not isinstance(device, str):
        raise SpecError(
            f"device is a GPU name ('H100-80GB'), a capacity ('24GiB' or an integer of bytes) or 'cpu'; got {device!r}."
        )
    if device.strip().lower() == "cpu":
        return Target("cpu", None, False)
    if device.strip()[:1].isdigit():  # a capacity, as --gpu 24GiB takes it
        try:
            return resolve_target(size_bytes(device, "device capacity"))
        except ValueError as err:
            raise SpecError(str(err)) from None
    gpu = get_gpu(str(device))
    return Target(gpu.name, gpu.capacity_bytes, True, gpu.compute_capability, gpu)


def cuda_corrections(tracked_bytes: int, target: Target, replayed_reserved_bytes: int | None = None) -> dict[str, int]:
    """The CUDA effects on top of tracked tensor bytes, in bytes (empty for the CPU).

    ``tracked_bytes`` already counts each storage rounded up to CUDA_BLOCK_BYTES (the fake run's
    tracker rounds for a CUDA target), so it stands for max_memory_allocated less the workspace.
    ``replayed_reserved_bytes``: the peak reserved bytes of the fake run's allocations replayed
    through the caching-allocator model (dbprofile.measure.allocator); the segments beyond the
    allocated bytes are then that replay's, and ALLOCATOR_OVERHEAD_FRACTION is only the fallback
    (sharded predictions, stand-in runners).
    """
    if not target.cuda:
        return {}
    capability = target.compute_capability or UNKNOWN_GPU_COMPUTE_CAPABILITY
    workspace = cublas_workspace_bytes(capability)
    allocated = tracked_bytes + workspace
    if replayed_reserved_bytes is not None:
        reserved = replayed_reserved_bytes + cublas_workspace_reserved_bytes(capability)
        segments = max(reserved - allocated, 0)
    else:
        segments = int(math.ceil(ALLOCATOR_OVERHEAD_FRACTION * allocated))
    return {
        "cublas_workspace": workspace,
        "allocator_segments": segments,
        "cuda_context": cuda_context_bytes(target.name),
    }


def time_per_million_samples(
    flops_per_sample: float | None, peak_flops: int | None, devices: int, utilisation: float = ASSUMED_UTILISATION
) -> float | None:
    """Seconds to train on a million samples with ``devices`` devices each sustaining ``utilisation``
    of ``peak_flops``: an illustration of FLOPs as time (None when either figure is unknown)."""
    if flops_per_sample is None or not peak_flops:
        return None
    return flops_per_sample * 1e6 / (peak_flops * utilisation * max(devices, 1))
