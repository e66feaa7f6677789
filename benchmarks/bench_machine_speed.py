"""Benchmark: does this machine run the same training step at the same speed for half a minute?

dbprofile times one technique after another, so its step-time ratios (ckpt / e2e, B block-steps /
e2e) are only as good as the machine's speed is steady over a run. This runs one technique's
untracked training step back to back for SECONDS seconds and prints, per second, the median step
time and the step count, then the slowest second's median against the fastest's. On an idle
machine whose speed holds, that ratio stays near 1.0; a ratio well above 1.1 means a run's
technique ratios can move by as much between runs, whatever the timing protocol inside a
technique does (docs/timing.md).

    python benchmarks/bench_machine_speed.py                  # vit-tiny e2e, batch 8, 30 s
    python benchmarks/bench_machine_speed.py vit-tiny 8 60 ckpt
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from dbprofile.methods import make_trainer
from dbprofile.models.registry import PRESETS
from dbprofile.techniques import parse_technique


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else "vit-tiny"
    batch_size = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 30.0
    technique = sys.argv[4] if len(sys.argv) > 4 else "e2e"
    spec = PRESETS[preset]()
    trainer = make_trainer(parse_technique(technique), spec, torch.device("cpu"))
    batch = spec.batch(batch_size, "cpu")
    load = os.getloadavg()[0]
    print(f"{preset} {technique} batch {batch_size}, torch threads {torch.get_num_threads()}, load average {load:.2f}")
    trainer.step(batch)  # first step: optimizer state, lazy initialisation
    medians: list[float] = []
    start = time.perf_counter()
    second_start, times = start, []
    while time.perf_counter() - start < seconds:
        before = time.perf_counter()
        trainer.step(batch)
        times.append(time.perf_counter() - before)
        if time.perf_counter() - second_start >= 1.0:
            medians.append(statistics.median(times))
            print(f"t = {time.perf_counter() - start:5.1f} s: median {1e3 * medians[-1]:8.2f} ms ({len(times)} steps)")
            second_start, times = time.perf_counter(), []
    if medians:
        slow, fast = max(medians), min(medians)
        print(
            f"slowest second {1e3 * slow:.2f} ms, fastest {1e3 * fast:.2f} ms: {slow / fast:.2f}x "
            f"(load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end)"
        )


if __name__ == "__main__":
    main()
