"""PyTorch memory snapshots of a tracked step (``dbprofile run --memory-snapshot DIR``, CUDA only).

``recording(path)`` is the one entry point: it records the CUDA caching allocator's history
(every allocation and free, with the Python stack that made it) while its block runs, and
writes it to ``path`` as the pickle that PyTorch's memory viewer opens
(https://pytorch.org/memory_viz: drag the file in). The runner wraps each technique's tracked
step in it, one file per technique (per block for DiffusionBlocks, whose blocks differ); the
timed steps run outside it, so recording never slows the step times. The snapshot is written
even when the step fails: the picture of memory at an out-of-memory error is the one people
want most. The private PyTorch calls live in ``torch_internals``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from dbprofile import torch_internals as private
from dbprofile.spec import SpecError


def snapshot_path(directory: str | Path, model: str, technique: str, batch_size: int, block: int | None) -> Path:
    """``DIR/<model>_<technique>_b<batch>[_block<i>].pickle``, with characters file systems dislike
    (':' in 'db:4', '/' in a file-based model name) replaced."""
    name = f"{model}_{technique}_b{batch_size}" + (f"_block{block}" if block is not None else "")
    return Path(directory) / (re.sub(r"[^A-Za-z0-9_.+-]+", "-", name) + ".pickle")


def check_snapshot_device(device: torch.device, fake: bool) -> None:
    """Refuse, with one paragraph, a memory snapshot where there is no CUDA allocator to record."""
    if device.type == "cuda" and not fake:
        return
    where = "fake tensors" if fake else f"the {device.type} device"
    raise SpecError(
        f"--memory-snapshot records PyTorch's CUDA caching allocator (torch.cuda.memory._record_memory_history), "
        f"and this run uses {where}, which has no such allocator. Run it with --device cuda (without --fake) on a "
        "machine with an NVIDIA GPU, or drop --memory-snapshot: every report already shows the tracked step's "
        "memory over time by category, on any device."
    )


@contextlib.contextmanager
def recording(path: Path | None) -> Iterator[None]:
    """Record CUDA allocator history inside the block and dump it to ``path`` (nothing when None)."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    private.start_cuda_memory_history()
    try:
        yield
    finally:
        try:
            private.dump_cuda_memory_snapshot(str(path))
        finally:
            private.stop_cuda_memory_history()
