"""Device facts beside the tracker's: the CUDA allocator's peaks, NVML's view of the GPU,
and the environment a run happened in.

The CUDA figures explain the gap between dbprofile's tracked peak and what nvidia-smi
shows: ``max_memory_allocated`` (live tensor blocks, what the tracker should match within
2%), ``max_memory_reserved`` (segments the caching allocator holds) and NVML's used memory
(everything on the GPU: the CUDA context, cuBLAS workspaces, other processes). Anything
unavailable (no GPU, no driver, no ``pynvml``) is ``None``; nothing here raises, except
``resolve_device``, which turns a device string the user typed into a clear SpecError.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import torch

SUPPORTED_DEVICES = ("cpu", "cuda")


def resolve_device(device: torch.device | str) -> torch.device:
    """The torch.device a run measures on; SpecError (one paragraph) for anything torch does
    not accept (``tpu``, ``cuda:x``), a device type dbprofile does not measure on (``mps``,
    ``meta``), CUDA asked for where there is none, or a GPU index past the last GPU."""
    from dbprofile.spec import SpecError

    fix = "Use --device cpu, cuda or cuda:N (the N-th GPU), or `dbprofile plan --gpu NAME` to predict a GPU run here."
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise SpecError(f"Unknown device {str(device)!r}: torch does not accept it. {fix}") from None
    if dev.type not in SUPPORTED_DEVICES:
        raise SpecError(
            f"Device {str(device)!r} is not one dbprofile measures on (it tracks cpu and cuda memory). {fix}"
        )
    if dev.type == "cpu" and dev.index is not None:
        # torch accepts cpu:N, but the host is one device: measurements would fail at the first tensor.
        raise SpecError(f"Device {str(device)!r}: the CPU is one device, with no index; use --device cpu.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError(f"Device {str(device)!r} needs a CUDA GPU, and torch sees none here. {fix}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SpecError(
                f"Device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}. {fix}"
            )
    return dev


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def reset_peaks(device: torch.device | str) -> None:
    """Start a measurement: synchronise and reset the allocator's peak counters."""
    if is_cuda(device) and torch.cuda.is_available():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels so step times are wall times of finished work."""
    if is_cuda(device) and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def cuda_figures(device: torch.device | str) -> dict[str, Any] | None:
    """Allocator peaks since the last ``reset_peaks`` and NVML used memory; None off CUDA."""
    if not is_cuda(device) or not torch.cuda.is_available():
        return None
    torch.cuda.synchronize(device)
    return {
        "max_memory_allocated": int(torch.cuda.max_memory_allocated(device)),
        "max_memory_reserved": int(torch.cuda.max_memory_reserved(device)),
        "nvml_used_bytes": nvml_used_bytes(device),
    }


def device_name(device: torch.device | str) -> str:
    if is_cuda(device) and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def device_capacity(device: torch.device | str) -> int | None:
    """Total device memory in bytes (CUDA), or None."""
    if is_cuda(device) and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def _nvml_handle(device: torch.device | str):
    """(pynvml module, handle) for the device, or None when NVML cannot be used."""
    try:
        import pynvml

        pynvml.nvmlInit()
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        # NVML numbers GPUs physically; map through the PCI bus id so CUDA_VISIBLE_DEVICES
        # reordering does not point at another GPU.
        bus_id = _pci_bus_id(index)
        if bus_id is not None:
            return pynvml, pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # no library, no driver, no GPU: "unavailable", never a crash
        return None


def _pci_bus_id(index: int) -> str | None:
    try:
        props = torch.cuda.get_device_properties(index)
        # The pci_* fields exist on CUDA builds but are missing from torch's _CudaDeviceProperties stub.
        return f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"  # type: ignore[attr-defined]
    except Exception:
        return None


def nvml_used_bytes(device: torch.device | str) -> int | None:
    """Used memory on the GPU as NVML (nvidia-smi) reports it, or None."""
    found = _nvml_handle(device)
    if found is None:
        return None
    pynvml, handle = found
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None


def driver_version() -> str | None:
    """The NVIDIA driver version, or None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Versions and the device a run used, for the results' ``environment``."""
    from dbprofile.version import __version__

    device = torch.device(device)
    cuda = is_cuda(device) and torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "dbprofile": __version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name(device),
        "device_capacity_bytes": device_capacity(device),
        "cuda_runtime": torch.version.cuda if cuda else None,
        "driver": driver_version() if cuda else None,
        # CPU timings depend on what else runs: a step on a loaded machine (other processes on the
        # cores torch's threads use) took 30x its idle time here, so the load is part of the record.
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
    }


def load_average() -> float | None:
    """The 1-minute load average (runnable processes), where the OS reports one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # Windows has no load average
        return None
