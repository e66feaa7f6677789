"""Check: the planner's fast path against ``--full-trace`` over many configurations.

Every figure a plan gives must equal the full trace's: the tracked peak, the shares, the FLOPs, the
planned peak (with the allocator's replay on a GPU target), the largest batch size that fits and a
sharded rank's collectives. The reference plans (bench_plan_speed.py) cover two configurations; this
sweeps presets, precisions, optimizers, sharding, parallel layouts and GPU targets, and prints, per
case, how many techniques differ and which figures. Round 7 found its defects with it
(docs/planner.md); run it after a change to the depth extrapolation, the trackers or the trainers.

    python benchmarks/check_fast_path.py                  # the CPU cases (about 3 minutes on 2 cores)
    python benchmarks/check_fast_path.py --all            # and the GPU-target cases (about 15 more)
    python benchmarks/check_fast_path.py llama1b-h100     # the cases named
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from dbprofile.models import get_preset
from dbprofile.planner import plan

CPU = {"device": "cpu", "batch_size": 2}
H100 = {"device": "H100-80GB"}

CASES: dict[str, tuple[str, int, dict[str, Any], str]] = {
    # name: (preset, depth it is cut to (0: as it is), plan() arguments, techniques)
    "gpt-cpu": ("gpt-tiny", 12, CPU, "e2e,ckpt,sac,offload,db:2,db:3,db:2+ckpt,db:5"),
    "gpt-bf16-sgd": ("gpt-tiny", 12, {**CPU, "precision": "bf16", "optimizer": "sgd"}, "e2e,ckpt,sac,db:2,db:3"),
    "gpt-adafactor": ("gpt-tiny", 12, {**CPU, "optimizer": "adafactor-foreach"}, "e2e,ckpt,sac,db:2,db:3"),
    "gpt-micro-batches": ("gpt-tiny", 12, {**CPU, "batch_size": 4, "min_micro_batch": 2}, "e2e,ckpt,db:2,db:3"),
    "vit-cpu": ("vit-tiny", 12, CPU, "e2e,ckpt,sac,offload,db:2,db:3,db:3+ckpt"),
    "dit-cpu": ("dit-tiny", 12, CPU, "e2e,ckpt,sac,db:2,db:4"),
    "md4-cpu": ("md4-tiny", 12, CPU, "e2e,ckpt,db:2,db:3"),
    "llama-zero2": ("llama-tiny", 12, {**CPU, "zero_stage": 2, "world_size": 8}, "e2e,ckpt,db:2,db:3"),
    "llama-zero3-tp": ("llama-tiny", 12, {**CPU, "zero_stage": 3, "world_size": 8, "tp": 2}, "e2e,ckpt,db:2"),
    "llama-pp": ("llama-tiny", 12, {**CPU, "batch_size": 4, "world_size": 2, "pp": 2}, "e2e,ckpt,db:2"),
    "llama-fused": ("llama-tiny", 12, {**CPU, "optimizer": "adamw-fused"}, "e2e,sac,db:2,db:3"),
}
GPU_CASES: dict[str, tuple[str, int, dict[str, Any], str]] = {
    "llama1b-h100": ("llama-1b", 0, {**H100, "batch_size": 1}, "e2e,ckpt,sac,db:2,db:4"),
    "llama1b-h100-more": ("llama-1b", 0, {**H100, "batch_size": 2}, "db:2+ckpt,db:3+ckpt,db:5,sac:alt,offload"),
    "llama1b-bf16-sgd": (
        "llama-1b",
        0,
        {**H100, "batch_size": 2, "precision": "bf16", "optimizer": "sgd"},
        "e2e,ckpt,db:3",
    ),
    "llama1b-adafactor": ("llama-1b", 0, {**H100, "batch_size": 1, "optimizer": "adafactor"}, "e2e,ckpt,db:2"),
    "llama1b-zero3": ("llama-1b", 0, {**H100, "batch_size": 2, "zero_stage": 3, "world_size": 8}, "e2e,ckpt,db:3"),
    "llama1b-micro-batches": ("llama-1b", 0, {**H100, "batch_size": 8, "min_micro_batch": 2}, "e2e,db:2"),
    "gpt2xl-a100": ("gpt2-xl", 0, {"device": "A100-40GB", "batch_size": 1}, "e2e,ckpt,db:2,db:4"),
    "gpt2xl-bf16-fused": (
        "gpt2-xl",
        0,
        {"device": "A100-80GB", "batch_size": 2, "precision": "bf16", "optimizer": "adamw-fused"},
        "e2e,sac,db:3",
    ),
}
FIGURES = ("status", "tracked_peak_bytes", "shares", "training_flops", "peak_bytes", "max_batch_size")
EXTRAS = ("collective_bytes", "communication")


def differences(fast: Any, full: Any) -> list[str]:
    """The figures of one technique's entry that the fast path gives otherwise than the full trace."""
    found = [name for name in FIGURES if getattr(fast, name) != getattr(full, name)]
    return found + [name for name in EXTRAS if fast.extra.get(name) != full.extra.get(name)]


def check(name: str, preset: str, depth: int, arguments: dict[str, Any], techniques: str) -> int:
    """Plans the case both ways and prints what differs; returns how many techniques differ."""
    spec = get_preset(preset).at_depth(depth) if depth else preset
    planned, seconds = {}, {}
    for full_trace in (False, True):
        start = time.perf_counter()
        result = plan(spec, techniques=techniques.split(","), cache=False, full_trace=full_trace, **arguments)
        seconds[full_trace] = time.perf_counter() - start
        planned[full_trace] = {entry.technique: entry for entry in result.entries}
    differ = 0
    for technique, fast in planned[False].items():
        full = planned[True][technique]
        if not (fast.ok and full.ok):
            print(f"  {technique}: not planned ({fast.error or full.error})")
        found = differences(fast, full)
        if found:
            differ += 1
            print(
                f"  {technique} DIFFERS in {', '.join(found)}: peak {fast.peak_bytes:,} against {full.peak_bytes:,} B"
            )
    paths = ", ".join(f"{t} {(e.extra.get('depth') or {}).get('path', '?')}" for t, e in planned[False].items())
    print(
        f"{name}: {differ} of {len(planned[False])} differ; fast path {seconds[False]:.1f} s, "
        f"--full-trace {seconds[True]:.1f} s ({paths})",
        flush=True,
    )
    return differ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "cases", nargs="*", help=f"cases to run (default: the CPU ones): {', '.join({**CASES, **GPU_CASES})}"
    )
    parser.add_argument("--all", action="store_true", help="the GPU-target cases as well")
    args = parser.parse_args()
    every = {**CASES, **GPU_CASES}
    unknown = [name for name in args.cases if name not in every]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; the cases are {', '.join(every)}")
    names = args.cases or (list(every) if args.all else list(CASES))
    differ = sum(check(name, *every[name]) for name in names)
    print(f"{differ} technique(s) differ in {len(names)} case(s)")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
