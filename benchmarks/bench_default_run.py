"""Benchmark: the default run (dbprofile.models.DEFAULT_PRESET, default techniques) on the
CPU. Prints the wall time (target < 60 s on 2 cores) and the overhead ratio
wall / (sum of every raw step time it ran + model builds) (target <= 1.5).

    python benchmarks/bench_default_run.py
"""

from __future__ import annotations

import time

from dbprofile.cli import freeze_startup_objects
from dbprofile.measure.runner import format_table, run
from dbprofile.methods import DEFAULT_TECHNIQUES
from dbprofile.models import DEFAULT_PRESET, get_preset


def main() -> None:
    start = time.perf_counter()
    spec = get_preset(DEFAULT_PRESET)
    freeze_startup_objects()  # as `dbprofile run` does before measuring
    result = run(spec, DEFAULT_TECHNIQUES, [8])
    wall = time.perf_counter() - start
    timing = [m.extra.get("timing", {}) for m in result.measurements]
    steps = sum(t.get("all_steps_s", 0.0) for t in timing)
    builds = sum(t.get("build_s", 0.0) for t in timing)
    print(format_table(result))
    print(f"wall time: {wall:.1f} s (target < 60 s)")
    print(f"raw step times {steps:.2f} s over {sum(t.get('steps_run', 0) for t in timing)} steps, "
          f"model builds {builds:.2f} s")
    print(f"overhead ratio wall / (steps + builds): {wall / (steps + builds):.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
