"""Benchmark: what a training step costs to run on fake tensors against meta tensors.

The planner's floor (docs/planner.md) is the cost of running a step's Python on tensors without
data. This times AdamW steps of llama-7b cut to 2 layers (batch 2) on FakeTensorMode (what the
planner uses) and on plain meta tensors (what a tracer without FakeTensorMode could use), with and
without a dispatch mode that only counts the ops (the least any tracker adds), so the gain a tracer
without FakeTensorMode could bring is measured rather than guessed.

    python benchmarks/bench_fake_vs_meta.py
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dbprofile.loading import load_spec
from dbprofile.measure.fake import fake_mode
from dbprofile.measure.stack import spec_at_depth

STEPS = 5


class CountOps(TorchDispatchMode):
    """Counts the ops that reach dispatch, and does nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def steps(model, optimizer, batch, spec, count: int) -> None:
    for _ in range(count):
        spec.loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()


def main() -> None:
    spec = spec_at_depth(load_spec("llama-7b"), 2)
    for label in ("fake", "meta"):
        with fake_mode() if label == "fake" else contextlib.nullcontext():
            with contextlib.nullcontext() if label == "fake" else torch.device("meta"):
                model = spec.build()
            optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
            batch = spec.batch(2, "cpu" if label == "fake" else "meta")
            steps(model, optimizer, batch, spec, 1)  # optimizer state, as the planner's warm-up
            began = time.process_time()
            steps(model, optimizer, batch, spec, STEPS)
            plain = (time.process_time() - began) / STEPS
            counter = CountOps()
            began = time.process_time()
            with counter:
                steps(model, optimizer, batch, spec, STEPS)
            counted = (time.process_time() - began) / STEPS
        print(
            f"{label}: {1e3 * plain:.1f} ms CPU per step; with a counting dispatch mode {1e3 * counted:.1f} ms, "
            f"{counter.ops // STEPS} ops per step"
        )


if __name__ == "__main__":
    main()
