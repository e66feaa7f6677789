"""The GPUs a plan can target: name, memory capacity in bytes as the driver reports it, and
the compute capability (which sets the cuBLAS workspace size). Lookup ignores case, spaces,
dashes and underscores (``h100-80gb``, ``H100 80GB`` and ``H100_80GB`` are one card); an
unknown name raises ``SpecError`` listing the close names.

Capacities are nvidia-smi's ``memory.total`` (MiB, ECC on where the card has it), the
figure a training job can at most reserve plus the CUDA context; ``torch.cuda.
get_device_properties(0).total_memory`` reports the same number in bytes. The H100 80GB
HBM3 figure (81559 MiB) is the one the GPU-validation issue checks on a real card; the
others are the commonly reported nvidia-smi figures for each card and are marked
``nominal`` where only the marketing size is known.

Peak dense FLOPS (per second, no 2:4 sparsity) come from NVIDIA's datasheets and architecture
whitepapers, named per card in ``flops_source``. ``fp32`` is the CUDA-core FP32 rate: PyTorch's
default matmul precision ("highest") does not use TF32 tensor cores for fp32 matmuls. ``bf16``
is the dense BF16 tensor-core rate with FP32 accumulation (what PyTorch's bf16 matmuls use;
GeForce cards run it at half their FP16-accumulate rate). A card without BF16 tensor cores
(V100, T4), or without a datasheet (the AWS-only A10G), has None there. The planner uses these
only to turn FLOPs into an illustrative time under a stated utilisation: ratios between
techniques are the claim, not absolute times.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from dbprofile.spec import SpecError
from dbprofile.units import MiB


@dataclass(frozen=True)
class GPU:
    """One card in the table."""

    name: str
    """Display name, e.g. 'H100-80GB'."""
    capacity_bytes: int
    """Total device memory the driver reports (nvidia-smi memory.total), in bytes."""
    compute_capability: tuple[int, int]
    """(major, minor); sm90+ gets a 32 MiB cuBLAS workspace in PyTorch, older cards 8 MiB + 128 KiB."""
    source: str = "nvidia-smi"
    """Where the capacity comes from: 'nvidia-smi' (reported memory.total) or 'nominal'."""
    peak_fp32_flops: int | None = None
    """Peak dense FP32 FLOPS (CUDA cores), per second."""
    peak_bf16_flops: int | None = None
    """Peak dense BF16 tensor-core FLOPS with FP32 accumulation, per second (None: no BF16 tensor cores
    or no published figure)."""
    flops_source: str = ""
    """The document the peak FLOPS come from."""
    host_link: str = ""
    """The link to host memory, e.g. 'PCIe Gen5 x16' (the card's datasheet)."""
    host_link_bytes_per_s: int | None = None
    """Its rate per direction, bytes per second: the datasheet's bidirectional figure halved (PCIe
    Gen3 x16 32 GB/s, Gen4 64 GB/s, Gen5 128 GB/s both ways). A peak: pinned copies reach about 80-90% of it."""

    def peak_flops(self, precision: str) -> int | None:
        """The peak dense FLOPS for a training precision ('fp32' or 'bf16'), or None when unknown."""
        return {"fp32": self.peak_fp32_flops, "bf16": self.peak_bf16_flops}.get(precision)


TERA = 10**12
PCIE_X16_BYTES_PER_S = {3: 16 * 10**9, 4: 32 * 10**9, 5: 64 * 10**9}
"""Per direction, as NVIDIA's datasheets give it (their bidirectional 32 / 64 / 128 GB/s halved)."""


def _gpu(
    name: str,
    mib: int,
    cc: tuple[int, int],
    fp32_tflops: float | None,
    bf16_tflops: float | None,
    flops_source: str,
    source: str = "nvidia-smi",
    pcie_gen: int | None = None,
) -> GPU:
    def flops(tflops: float | None) -> int | None:
        return None if tflops is None else int(round(tflops * TERA))

    return GPU(
        name=name,
        capacity_bytes=mib * MiB,
        compute_capability=cc,
        source=source,
        peak_fp32_flops=flops(fp32_tflops),
        peak_bf16_flops=flops(bf16_tflops),
        flops_source=flops_source,
        host_link=f"PCIe Gen{pcie_gen} x16" if pcie_gen else "",
        host_link_bytes_per_s=PCIE_X16_BYTES_PER_S.get(pcie_gen) if pcie_gen else None,
    )


# Datasheets quote tensor-core rates "with sparsity" (2:4), twice the dense rate: halved here.
_HOPPER = "NVIDIA H100 Tensor Core GPU datasheet"
_ADA = "NVIDIA Ada Lovelace GPU architecture whitepaper (v2.1), and the card's datasheet"
_AMPERE = "NVIDIA A100 Tensor Core GPU datasheet"
_GA102 = "NVIDIA Ampere GA102 GPU architecture whitepaper"
GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        # H100 80GB HBM3 (SXM5): 67 FP32, 1,979 BF16 with sparsity.
        _gpu("H100-80GB", 81559, (9, 0), 67, 989.5, _HOPPER + " (H100 SXM)", pcie_gen=5),
        # The PCIe card reports the same memory but runs slower: 51 FP32, 1,513 BF16 with sparsity.
        _gpu("H100-PCIe-80GB", 81559, (9, 0), 51, 756.5, _HOPPER + " (H100 PCIe)", pcie_gen=5),
        _gpu("H100-NVL-94GB", 95830, (9, 0), 60, 835.5, _HOPPER + " (H100 NVL)", pcie_gen=5),
        _gpu("H200-141GB", 143771, (9, 0), 67, 989.5, "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM)", pcie_gen=5),
        _gpu("A100-80GB", 81920, (8, 0), 19.5, 312, _AMPERE, pcie_gen=4),
        _gpu("A100-40GB", 40960, (8, 0), 19.5, 312, _AMPERE, pcie_gen=4),
        _gpu("L40S-48GB", 46068, (8, 9), 91.6, 362.05, "NVIDIA L40S datasheet", pcie_gen=4),
        _gpu("L40-48GB", 46068, (8, 9), 90.5, 181.05, "NVIDIA L40 datasheet", pcie_gen=4),
        _gpu("L4-24GB", 23034, (8, 9), 30.3, 121, "NVIDIA L4 Tensor Core GPU datasheet", pcie_gen=4),
        # AWS's A10G has no NVIDIA datasheet; its tensor rate is not the A10's.
        _gpu("A10G-24GB", 23028, (8, 6), None, None, "no published datasheet (AWS-only variant)", pcie_gen=4),
        _gpu("A10-24GB", 23028, (8, 6), 31.2, 125, "NVIDIA A10 Tensor Core GPU datasheet", pcie_gen=4),
        _gpu("RTX-6000-Ada-48GB", 49140, (8, 9), 91.1, 364.25, _ADA, pcie_gen=4),
        _gpu("RTX-A6000-48GB", 49140, (8, 6), 38.7, 154.85, "NVIDIA RTX A6000 datasheet", pcie_gen=4),
        _gpu("RTX-4090-24GB", 24564, (8, 9), 82.6, 165.2, _ADA, pcie_gen=4),
        _gpu("RTX-3090-24GB", 24576, (8, 6), 35.6, 71, _GA102, pcie_gen=4),
        _gpu(
            "V100-32GB",
            32768,
            (7, 0),
            15.7,
            None,
            "NVIDIA V100 Tensor Core GPU datasheet (SXM2)",
            "nominal",
            pcie_gen=3,
        ),
        _gpu(
            "V100-16GB",
            16384,
            (7, 0),
            15.7,
            None,
            "NVIDIA V100 Tensor Core GPU datasheet (SXM2)",
            "nominal",
            pcie_gen=3,
        ),
        _gpu("T4-16GB", 15360, (7, 5), 8.1, None, "NVIDIA T4 Tensor Core GPU datasheet", pcie_gen=3),
    )
}

# Short forms people type: the card name without its memory size picks the usual variant.
ALIASES: dict[str, str] = {
    "H100": "H100-80GB",
    "H200": "H200-141GB",
    "A100": "A100-80GB",
    "L40S": "L40S-48GB",
    "L40": "L40-48GB",
    "L4": "L4-24GB",
    "A10G": "A10G-24GB",
    "A10": "A10-24GB",
    "RTX-4090": "RTX-4090-24GB",
    "4090": "RTX-4090-24GB",
    "RTX-3090": "RTX-3090-24GB",
    "3090": "RTX-3090-24GB",
    "V100": "V100-32GB",
    "T4": "T4-16GB",
    "H100-SXM": "H100-80GB",
    "H100-PCIE": "H100-PCIe-80GB",
    "A6000": "RTX-A6000-48GB",
}


def _key(name: str) -> str:
    """Case, spaces, dashes and underscores do not matter: 'h100 80gb' == 'H100-80GB'."""
    return re.sub(r"[\s_\-]+", "", name).lower()


_INDEX: dict[str, str] = {_key(n): n for n in GPUS}
_INDEX.update({_key(a): n for a, n in ALIASES.items()})


def get_gpu(name: str) -> GPU:
    """The table entry for ``name``; SpecError naming the close names when there is none."""
    found = _INDEX.get(_key(name))
    if found is not None:
        return GPUS[found]
    keys = list(_INDEX)
    close_keys = difflib.get_close_matches(_key(name), keys, n=5, cutoff=0.5)
    close = list(dict.fromkeys(_INDEX[k] for k in close_keys))
    hint = f" Close names: {', '.join(close)}." if close else ""
    raise SpecError(
        f"Unknown GPU {name!r}.{hint} Known GPUs: {', '.join(GPUS)}. "
        "Pass one of these names, or a capacity such as 24GiB (or an integer of bytes) for another card."
    )


CUBLAS_HANDLES_IN_A_TRAINING_STEP = 2
"""cuBLAS handles (and so workspaces) are per thread and stream: the forward runs on the Python
thread and the backward on autograd's device thread, so a training step keeps two."""


def cublas_workspace_bytes(compute_capability: tuple[int, int]) -> int:
    """PyTorch's default cuBLAS workspaces for one training step (CublasHandlePool.cpp).

    Default CUBLAS_WORKSPACE_CONFIG is ':4096:8' (8 chunks of 4096 KiB = 32 MiB) on sm90+
    and ':4096:2:16:8' (2 x 4 MiB + 8 x 16 KiB) before, following NVIDIA's cublasSetWorkspace
    recommendation (32 MiB for Hopper), once per handle. The workspaces are allocated through
    the caching allocator, so they count in max_memory_allocated although no tensor holds them.
    Measured on an H100 80GB HBM3 (torch 2.11.0+cu130, reports/gpu-validation-h100.md): 65.6 to
    85.5 MiB of allocator memory held by no tensor at the start of a step, i.e. the two 32 MiB
    workspaces plus a few MiB that vary with the model.
    """
    return CUBLAS_HANDLES_IN_A_TRAINING_STEP * (_cublas_bytes_per_handle(compute_capability) + CUBLASLT_WORKSPACE_BYTES)


def _cublas_bytes_per_handle(compute_capability: tuple[int, int]) -> int:
    """One handle's cuBLAS workspace under PyTorch's default CUBLAS_WORKSPACE_CONFIG."""
    return 8 * 4096 * 1024 if compute_capability >= (9, 0) else 2 * 4096 * 1024 + 8 * 16 * 1024


CUBLASLT_WORKSPACE_BYTES = 1024 * 1024
"""PyTorch's default cuBLASLt workspace per handle (CUBLASLT_WORKSPACE_SIZE, 1024 KiB), also taken
through the caching allocator. Seen on an H200 (torch 2.11.0+cu130, reports/gpu-validation-h200-2.md):
each handle's first matmul allocates one 32 MiB block and one 1 MiB block, and they stay."""


def cublas_workspace_reserved_bytes(compute_capability: tuple[int, int]) -> int:
    """The allocator segments those workspaces occupy: the 32 MiB blocks take segments of their
    own size (requests of 10 MiB and more), each 1 MiB block a 2 MiB small-pool segment."""
    from dbprofile.measure.allocator import round_request, segment_size

    return CUBLAS_HANDLES_IN_A_TRAINING_STEP * (
        segment_size(round_request(_cublas_bytes_per_handle(compute_capability)))
        + segment_size(CUBLASLT_WORKSPACE_BYTES)
    )
