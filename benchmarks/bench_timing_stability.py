"""Benchmark: do two default runs in a row agree on the technique step-time ratios?

Runs ``dbprofile run`` (the default run, or a preset and batch size given) RUNS times in a row, each
in its own process as a user would, and prints per run the ratios the verdict quotes (ckpt / e2e
step time, a DiffusionBlocks technique's B block-steps / e2e step time) with each timing's IQR as a
share of its median, the load average the run recorded at its start and end, and torch's thread
count; then, per ratio, how far the runs are apart (largest / smallest - 1; the issue's goal is
within 20% on an idle machine). A run on a loaded machine is not evidence either way: compare the
load averages first.

    python benchmarks/bench_timing_stability.py                 # two default runs
    python benchmarks/bench_timing_stability.py vit-s16 4 3     # preset, batch size, runs
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

MAX_APART = 0.2


def ratios(data: dict) -> dict[str, tuple[float, float]]:
    """(ratio, relative IQR of the two timings added) per technique, against e2e."""
    ms = {m["technique"]: m for m in data["measurements"] if m.get("status") == "ok"}
    e2e = ms.get("e2e")
    if not e2e or not e2e.get("step_time_s"):
        return {}
    base, base_spread = e2e["step_time_s"], (e2e.get("step_time_iqr_s") or 0.0) / e2e["step_time_s"]
    out = {}
    for name, m in ms.items():
        if name == "e2e":
            continue
        time, iqr = (
            (m.get("block_steps_time_s"), m.get("block_steps_time_iqr_s"))
            if m.get("blocks")
            else (m.get("step_time_s"), m.get("step_time_iqr_s"))
        )
        if time:
            out[name] = (time / base, base_spread + (iqr or 0.0) / time)
    return out


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else None
    batch = sys.argv[2] if len(sys.argv) > 2 else None
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    per_run = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            out = Path(tmp) / f"run{i}.json"
            cmd = [
                sys.executable,
                "-m",
                "dbprofile",
                "run",
                *([preset] if preset else []),
                *(["-b", batch] if batch else []),
                "-o",
                str(out),
                "--no-report",
                "-q",
            ]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # the tables; the ratios follow
            data = json.loads(out.read_text())
            env = data.get("environment", {})
            per_run.append(ratios(data))
            print(
                f"run {i + 1}: load average {env.get('load_average_start')} at start, "
                f"{env.get('load_average_end')} at end; {env.get('torch_threads')} torch threads on "
                f"{env.get('cpu_count')} CPUs"
            )
            for name, (ratio, spread) in per_run[-1].items():
                print(f"  {name} / e2e: {ratio:.2f}x (timings' IQRs add up to {spread:.0%} of the ratio)")
    print("agreement between runs (largest / smallest - 1):")
    for name in per_run[0]:
        values = [r[name][0] for r in per_run if name in r]
        apart = max(values) / min(values) - 1
        verdict = "within" if apart <= MAX_APART else "NOT within"
        print(
            f"  {name} / e2e: {', '.join(f'{v:.2f}x' for v in values)}: {apart:.0%} apart ({verdict} {MAX_APART:.0%})"
        )


if __name__ == "__main__":
    main()
