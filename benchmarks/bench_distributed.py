"""Predicted vs measured per-rank peaks of sharded (FSDP2) and block-parallel training.

For 2 and 4 processes on the CPU (gloo), it launches ``torchrun`` once per world size to measure
e2e, ckpt, db:2 and db:2+ckpt under FSDP and db:N+parallel, then asks the planner
(``dbprofile.planner.plan(..., zero_stage=3, world_size=N)``) for the same configurations and prints,
per technique, the largest measured per-rank tracked peak, the prediction and their difference.
The single-device peak (world size 1) is printed beside them, to show how sharding moves it, and
so is what the planner's one-device formula (``shard_zero`` / ``block_parallel``, used when a stand-in
``measure_fn`` is given) would say, to show why the planner simulates sharded ranks instead.

    python benchmarks/bench_distributed.py                 # vit-tiny, batch 8
    python benchmarks/bench_distributed.py --model gpt-tiny --batch-size 4 --worlds 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from dbprofile.measure.distributed import launch
from dbprofile.measure.runner import measure
from dbprofile.planner import plan
from dbprofile.results import RunResult
from dbprofile.units import format_bytes

FSDP_TECHNIQUES = ("e2e", "ckpt", "db:2", "db:2+ckpt")


def measure_world(model: str, batch_size: int, world: int, out_dir: Path) -> tuple[RunResult, float]:
    out = out_dir / f"world{world}.json"
    techniques = ",".join([*FSDP_TECHNIQUES, f"db:{world}+parallel"])
    start = time.perf_counter()
    code = launch(
        world,
        [model, "-t", techniques, "-b", str(batch_size), "--fsdp", "--steps", "1", "--out", str(out)],
        entry="dbprofile.measure.distributed.launcher:main",
        env={"OMP_NUM_THREADS": "1"},
    )
    if code != 0:
        sys.exit(f"torchrun with {world} processes failed (exit code {code})")
    return RunResult.load(out), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--worlds", default="2,4", help="comma-separated process counts")
    args = parser.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    single = plan(args.model, args.batch_size, device="cpu", techniques=list(FSDP_TECHNIQUES), search_max_batch=False)
    print(f"{args.model}, batch {args.batch_size} per rank, CPU/gloo: per-rank tracked peak, measured vs planned")
    print(
        f"{'world':>5}  {'technique':<14} {'1 device':>10} {'measured':>10} {'planned':>10} {'diff B':>7} "
        f"{'formula':>10} {'diff':>8}  ranks measured"
    )
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            result, wall = measure_world(args.model, args.batch_size, world, Path(tmp))
            names = [*FSDP_TECHNIQUES, f"db:{world}+parallel"]
            predicted = plan(
                args.model,
                args.batch_size,
                device="cpu",
                techniques=names,
                zero_stage=3,
                world_size=world,
                search_max_batch=False,
            )
            # An explicit measure_fn makes the planner shard the one-device shares by formula.
            formula = plan(
                args.model,
                args.batch_size,
                device="cpu",
                techniques=names,
                zero_stage=3,
                world_size=world,
                search_max_batch=False,
                measure_fn=measure,
            )
            for name in names:
                rows = [m for m in result.measurements if m.technique == name]
                bad = [m for m in rows if not m.ok]
                entry = predicted.get(name)
                one = single.get(name.split("+parallel")[0]) if "+parallel" not in name else single.get("db:2")
                if bad or entry is None or not entry.ok:
                    why = bad[0].error if bad else (entry.error if entry else "not planned")
                    print(f"{world:>5}  {name:<14} failed: {why}")
                    continue
                measured = max(m.peak_bytes for m in rows)
                diff = (entry.tracked_peak_bytes - measured) / measured
                worst = max(worst, abs(diff))
                ranks = " ".join(format_bytes(m.peak_bytes) for m in sorted(rows, key=lambda m: m.extra["rank"]))
                base = format_bytes(one.tracked_peak_bytes) if one and "+parallel" not in name else "-"
                rough = formula.get(name).tracked_peak_bytes
                print(
                    f"{world:>5}  {name:<14} {base:>10} {format_bytes(measured):>10} "
                    f"{format_bytes(entry.tracked_peak_bytes):>10} {entry.tracked_peak_bytes - measured:>+7d} "
                    f"{format_bytes(rough):>10} {(rough - measured) / measured:>+8.2%}  {ranks}"
                )
            print(f"       ({world} processes measured in {wall:.1f} s)")
    print(
        f"largest |planned - measured| / measured: {worst:.3%} (the check asks for at most 3%); "
        "formula: the planner's one-device arithmetic"
    )


if __name__ == "__main__":
    main()
