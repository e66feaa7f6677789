"""Benchmark: what profiling costs against the training work it runs. Profiles a preset with the
default techniques on the CPU (by default the default run: dbprofile.models.DEFAULT_PRESET at
batch 8) and prints

- the wall time (target < 60 s on 2 cores for the default run);
- the overhead ratio wall / (every raw step time it ran + model builds) (target <= 1.5): steps
  include the warm-ups, the tracked steps and the timed steps;
- per technique, the tracked step against the median untracked step (the tracker's own cost per op).

    python benchmarks/bench_default_run.py              # the default run
    python benchmarks/bench_default_run.py vit-s16 4    # another preset and batch size
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from dbprofile.cli import freeze_startup_objects
from dbprofile.measure.runner import run
from dbprofile.models import DEFAULT_PRESET, get_preset
from dbprofile.report.text import run_table
from dbprofile.techniques import DEFAULT_TECHNIQUES


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PRESET
    batch_size = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    start = time.perf_counter()
    spec = get_preset(preset)
    freeze_startup_objects()  # as `dbprofile run` does before measuring
    result = run(spec, DEFAULT_TECHNIQUES, [batch_size])
    wall = time.perf_counter() - start
    timing = [m.extra.get("timing", {}) for m in result.measurements]
    steps = sum(t.get("all_steps_s", 0.0) for t in timing)
    builds = sum(t.get("build_s", 0.0) for t in timing)
    print(run_table(result))
    print(f"{preset} at batch {batch_size}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"wall time: {wall:.1f} s (target < 60 s for the default run)")
    print(f"raw step times {steps:.2f} s over {sum(t.get('steps_run', 0) for t in timing)} steps, "
          f"model builds {builds:.2f} s")
    print(f"overhead ratio wall / (steps + builds): {wall / (steps + builds):.2f} (target <= 1.5)")
    for m in result.measurements:
        tracked = m.extra.get("timing", {}).get("tracked_steps_s") or []
        if tracked and m.step_time_s:
            print(f"  {m.technique}: tracked step {statistics.median(tracked):.4f} s vs untracked "
                  f"{m.step_time_s:.4f} s: {statistics.median(tracked) / m.step_time_s:.2f}x")


if __name__ == "__main__":
    main()
