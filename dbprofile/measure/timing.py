"""Timing a block of training steps as torch.utils.benchmark does, for the blocks the runner adds
after an adaptive run (dbprofile.measure.steps.time_unit)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch

from dbprofile.measure import device as devices


def time_block(one_step: Callable[[], None], number: int, dev: torch.device) -> float:
    """``number`` steps timed as torch.utils.benchmark times a block: garbage collection off (as
    timeit does), CUDA synchronised before and after."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        devices.synchronize(dev)
        start = time.perf_counter()
        for _ in range(number):
            one_step()
        devices.synchronize(dev)
        return time.perf_counter() - start
    finally:
        if collecting:
            gc.enable()
