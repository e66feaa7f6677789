"""The process group of a distributed measurement: torchrun's environment, NCCL on CUDA or
gloo on the CPU, and a timeout so that a failed rank cannot hang the others for ever."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from dbprofile.spec import SpecError

DEFAULT_TIMEOUT_S = 300
"""How long a rank waits in a collective for the others before it gives up (a failed rank)."""


TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def in_torchrun() -> bool:
    """True when this process was started by torchrun (its rendezvous variables are set)."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def init_process_group(
    device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[int, int, torch.device]:
    """Join the process group from torchrun's environment (or use one already made).

    Backend NCCL when CUDA is used, gloo on the CPU. Returns (rank, world size, this rank's device):
    ``cuda:LOCAL_RANK`` on CUDA, else the CPU. Raises SpecError, saying how to launch, without one.
    """
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise SpecError(f"Device {device!r} was asked for but CUDA is not available here; use --device cpu.")
    if not dist.is_initialized():
        if not in_torchrun():
            raise SpecError(
                "--fsdp and db:B+parallel run one process per device and need a process group, and there is "
                "none: launch under torchrun, e.g. `torchrun --nproc-per-node 2 $(which dbprofile) run MODEL "
                "--fsdp`, or let dbprofile launch it with `dbprofile run MODEL --fsdp --nproc 2`."
            )
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
        torch.cuda.set_device(index)
        return rank, world, torch.device("cuda", index)
    return rank, world, torch.device("cpu")
