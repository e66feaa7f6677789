"""Benchmark: what profiling costs against the training work it runs. Profiles a preset with the
default techniques on the CPU (by default the default run: dbprofile.models.DEFAULT_PRESET at
batch 8) and prints

- the wall time (target < 60 s on 2 cores for the default run) and the load average before and
  after (on a shared machine every wall-clock figure depends on it);
- the overhead ratio wall / (every raw step time it ran + model builds) (target <= 1.5): steps
  include the warm-ups, the tracked steps and the timed steps;
- where the rest of the wall time went: the checks before the first measurement (``prepare``),
  torch.utils.benchmark's own time around the timed steps (its block-size estimate and loop), the
  layer-activation counts of DiffusionBlocks (fake tensors), garbage collection between techniques,
  and what is left (results, report);
- per technique, the tracked step against the median untracked step (the tracker's own cost per op).

The tracked step's cost is dominated by Python's per-op dispatch: ``dispatch modes per tracked op``
counts the Python dispatch modes each op of a tracked step passes through (the tracker feeds the
FLOP counter itself, so 1; it was 2 with the counter as a mode of its own). Load-independent
figures: the op counts and the ratios taken within this one process.

    python benchmarks/bench_default_run.py              # the default run
    python benchmarks/bench_default_run.py vit-s16 4    # another preset and batch size
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from dbprofile.cli import freeze_startup_objects
from dbprofile.measure import interleaved, runner, steps
from dbprofile.measure.runner import run
from dbprofile.models import DEFAULT_PRESET, get_preset
from dbprofile.report.text import run_table
from dbprofile.techniques import DEFAULT_TECHNIQUES

spent: dict[str, float] = defaultdict(float)
LOOP = "timed steps"


def timed(owner: Any, name: str, label: str) -> None:
    """Wrap owner.name so its wall time adds up under ``label``."""
    inner: Callable = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def dispatch_modes_per_tracked_op() -> int:
    """Python dispatch modes (besides fake tensors' own) on the stack during a tracked step of the
    runner's measurement (one vit-tiny fake measurement), read at its phase marks."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    from dbprofile.measure.tracker import Tracker

    depths: list[int] = []
    mark = Tracker.mark

    def counting_mark(self: Tracker, phase: str) -> None:
        if self.recording:
            depths.append(len(_get_current_dispatch_mode_stack()) - 1)  # less the FakeTensorMode
        mark(self, phase)

    Tracker.mark = counting_mark
    try:
        runner.measure("vit-tiny", "e2e", 2, fake=True, steps=1)
    finally:
        Tracker.mark = mark
    return max(depths)


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PRESET
    batch_size = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    load_before = os.getloadavg()
    start = time.perf_counter()
    spec = get_preset(preset)
    freeze_startup_objects()  # as `dbprofile run` does before measuring
    timed(runner, "prepare", "checks before measuring (prepare)")
    timed(steps, "time_unit", LOOP)  # CUDA: each technique timed in its own measurement
    timed(interleaved, "time_rounds", LOOP)  # CPU: all techniques' rounds after the memory measurements
    timed(runner, "activation_ratios", "DiffusionBlocks layer-activation counts (fake)")
    timed(runner, "free_memory", "garbage collection between techniques")
    result = run(spec, DEFAULT_TECHNIQUES, [batch_size])
    wall = time.perf_counter() - start
    timing = [m.extra.get("timing", {}) for m in result.measurements]
    all_steps = sum(t.get("all_steps_s", 0.0) for t in timing)
    builds = sum(t.get("build_s", 0.0) for t in timing)
    tracked = sum(sum(t.get("tracked_steps_s") or []) for t in timing)
    timed_steps = sum(t.get("timed_steps_s", 0.0) for t in timing)
    print(run_table(result))
    load_after = os.getloadavg()
    print(
        f"{preset} at batch {batch_size}, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, "
        f"on {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    )
    print(f"wall time: {wall:.1f} s (target < 60 s for the default run)")
    print(
        f"raw step times {all_steps:.2f} s over {sum(t.get('steps_run', 0) for t in timing)} steps (warm-up "
        f"{all_steps - tracked - timed_steps:.2f} s, tracked {tracked:.2f} s, timed {timed_steps:.2f} s), "
        f"model builds {builds:.2f} s"
    )
    print(f"overhead ratio wall / (steps + builds): {wall / (all_steps + builds):.2f} (target <= 1.5)")
    rest = wall - all_steps - builds
    loop = spent.pop(LOOP, 0.0) - timed_steps
    print(f"the other {rest:.2f} s of wall time:")
    print(f"  torch.utils.benchmark around the timed steps (block-size estimate, loop): {loop:.2f} s")
    for label, seconds in spent.items():
        print(f"  {label}: {seconds:.2f} s")
    print(f"  everything else (results, report, bookkeeping): {rest - loop - sum(spent.values()):.2f} s")
    for m in result.measurements:
        tracked_times = m.extra.get("timing", {}).get("tracked_steps_s") or []
        untracked = m.step_time_s if not m.blocks else statistics.median(b.step_time_s for b in m.blocks)
        if tracked_times and untracked:
            print(
                f"  {m.technique}: tracked step {statistics.median(tracked_times):.4f} s vs untracked "
                f"{untracked:.4f} s: {statistics.median(tracked_times) / untracked:.2f}x"
            )
    print(f"dispatch modes per tracked op: {dispatch_modes_per_tracked_op()}")


if __name__ == "__main__":
    main()
