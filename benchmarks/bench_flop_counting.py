"""Benchmark: what counting FLOPs adds to a fake-tensor measurement (the planner's unit of work).

The runner counts FLOPs inside the tracked step it already runs; this measures the CPU time of
``measure(..., fake=True)`` with the counter on and off (replaced by a no-op), alternating,
and prints the medians and their ratio. CPU time, not wall time, so other load on the machine
matters less.

    python benchmarks/bench_flop_counting.py [MODEL] [BATCH] [TECHNIQUES] [REPEATS]
"""

from __future__ import annotations

import resource
import statistics
import sys

import dbprofile.measure.runner as runner


class _NoCount:
    total = None

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "llama-1b"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    techniques = (sys.argv[3] if len(sys.argv) > 3 else "e2e,ckpt,db:4").split(",")
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    counter = runner.FlopCounter
    times: dict[str, list[float]] = {"counted": [], "uncounted": []}
    runner.measure(model, techniques[0], batch, fake=True, steps=1)  # imports and caches warm
    for _ in range(repeats):
        for label, factory in (("counted", counter), ("uncounted", _NoCount)):
            runner.FlopCounter = factory
            start = cpu_seconds()
            for tech in techniques:
                runner.measure(model, tech, batch, fake=True, steps=1)
            times[label].append(cpu_seconds() - start)
    counted, uncounted = statistics.median(times["counted"]), statistics.median(times["uncounted"])
    print(f"{model} batch {batch}, {','.join(techniques)}, fake, {repeats} repeats (CPU seconds, median)")
    print(f"with FLOP counting:    {counted:.2f} s  {[round(t, 2) for t in times['counted']]}")
    print(f"without FLOP counting: {uncounted:.2f} s  {[round(t, 2) for t in times['uncounted']]}")
    print(f"ratio: {counted / uncounted:.3f}")


if __name__ == "__main__":
    main()
