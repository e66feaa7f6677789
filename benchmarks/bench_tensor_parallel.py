"""Measured vs simulated per-rank peaks of tensor-parallel training (``--tp``) on the CPU (gloo).

It launches ``torchrun`` once with ``world`` processes and ``--tp tp`` (FSDP over the first mesh
dimension when world > tp), measures each technique on every rank, then simulates one rank of the
same layout on fake tensors in a fake process group (``simulate_rank(..., tp=tp)``, what the planner
runs) and prints, per technique and rank, the measured and simulated tracked peaks, their difference
and the collectives' bytes.

    python benchmarks/bench_tensor_parallel.py                       # llama-tiny, 2 ranks, TP 2
    python benchmarks/bench_tensor_parallel.py --world 4 --tp 2      # FSDP 2 x TP 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from dbprofile.measure.distributed import launch, simulate_rank
from dbprofile.results import RunResult


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-tiny")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--techniques", default="e2e,ckpt,sac,db:2")
    args = parser.parse_args()
    fsdp = args.world > args.tp
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        run = [args.model, "-t", args.techniques, "-b", str(args.batch_size), "--tp", str(args.tp), "--steps", "1"]
        start = time.perf_counter()
        code = launch(
            args.world,
            [*run, *(["--fsdp"] if fsdp else []), "--out", str(out)],
            entry="dbprofile.measure.distributed.launcher:main",
            env={"OMP_NUM_THREADS": "1"},
        )
        if code != 0:
            sys.exit(f"torchrun failed (exit code {code})")
        result = RunResult.load(out)
    print(
        f"{args.model}, batch {args.batch_size} per data-parallel rank, {args.world} gloo processes, TP {args.tp}"
        f"{', FSDP over ' + str(args.world // args.tp) if fsdp else ''} (measured in {time.perf_counter() - start:.0f} s)"
    )
    print(f"{'technique':<10} {'rank':>4} {'measured B':>12} {'simulated B':>12} {'diff B':>9}  collectives (bytes)")
    for technique in args.techniques.split(","):
        sim = simulate_rank(args.model, technique, args.batch_size, args.world, tp=args.tp, fsdp=fsdp)
        for m in (row for row in result.measurements if row.technique == technique):
            if not m.ok:
                print(f"{technique:<10} {m.extra.get('rank', '?'):>4} {m.status}: {m.error}")
                continue
            diff = m.peak_bytes - sim.peak_bytes
            print(
                f"{technique:<10} {m.extra['rank']:>4} {m.peak_bytes:>12,} {sim.peak_bytes:>12,} {diff:>9,}  "
                f"{m.extra.get('collective_bytes')}"
            )


if __name__ == "__main__":
    main()
