"""Benchmark: how long the planner takes on the issue's two commands, and whether its depth
extrapolation agrees with the full trace.

Runs each command as a user would (its own process, ``dbprofile plan ... --json``), first with an
empty trace cache (cold: a temporary ``DBPROFILE_CACHE_DIR``), then again with what that run kept
(warm), and prints each one's wall and CPU time with the load average before and after (a loaded
machine slows a run; compare the loads first), then each technique's path (extrapolated or full
trace) and peak. With
``--full-trace`` it also runs each command with ``--full-trace`` and says whether every technique's
tracked peak, shares, FLOPs, largest batch and collectives equal the full trace's, and how far the planned peak
(with the allocator's replayed segments) is from the full replay's.

    python benchmarks/bench_plan_speed.py                # llama-7b, then llama-70b (ZeRO-3 over 64)
    python benchmarks/bench_plan_speed.py --full-trace   # and the full traces to compare with
    python benchmarks/bench_plan_speed.py --breakdown    # where the time goes, in one process
    python benchmarks/bench_plan_speed.py --full-trace --only llama-7b   # one of the plans

``--breakdown`` runs both plans in this process and prints the fixed costs (importing dbprofile and
torch, the first fake-tensor mode, which imports torch._dynamo, and the model's facts and checks on fake
tensors) and each technique's fake runs (one line per run: a confirming run of the largest batch size
is a second line), so what a plan cannot go below on this machine is measured, not guessed.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

COMMANDS = {
    "llama-7b": ["llama-7b", "-b", "2", "--gpu", "H100-80GB"],
    "llama-70b": ["llama-70b", "-b", "1", "--zero", "3", "--world-size", "64", "--gpu", "H100-80GB"],
}
GOALS_S = {"llama-7b": 5.0, "llama-70b": 15.0}
WARM_GOAL_S = 2.0


def plan(args: list[str], cache: str | None = None) -> tuple[dict, float, float]:
    """(the plan's JSON, wall seconds, CPU seconds of the child and its workers) of one ``dbprofile
    plan`` process, with the trace cache in ``cache`` (None: --no-cache)."""
    env = dict(os.environ, **({"DBPROFILE_CACHE_DIR": cache} if cache else {}))
    flags = [] if cache else ["--no-cache"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "dbprofile", "plan", *args, *flags, "--json", "-q"],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 3):  # 3: nothing fits, still a plan
        sys.exit(f"dbprofile plan {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(done.stdout), wall, cpu


def breakdown() -> None:
    """Fixed costs, then each fake run of each plan, timed in this process (CPU seconds)."""
    start = time.process_time()
    import dbprofile
    from dbprofile.loading import load_spec
    from dbprofile.measure import depth
    from dbprofile.measure.fake import fake_mode
    from dbprofile.planner.predict import checked_model

    print(f"import dbprofile (and torch): {time.process_time() - start:.2f} s")
    start = time.process_time()
    with fake_mode():
        pass
    print(f"first fake-tensor mode (imports torch._dynamo): {time.process_time() - start:.2f} s")
    for fn in ("measure_fake", "simulate_fake"):
        original = getattr(depth, fn)

        def timed(spec, *args, _original=original, **kwargs):
            began = time.process_time()
            m = _original(spec, *args, **kwargs)
            path = (m.extra.get("depth") or {}).get("path")
            print(f"    {m.technique:16s} batch {m.batch_size:<4d} {path:12s} {time.process_time() - began:6.2f} s")
            return m

        setattr(depth, fn, timed)
    for name, args in COMMANDS.items():
        spec = load_spec(args[0])
        began = time.process_time()
        checked_model(spec)  # what plan() runs first: the facts (a meta build) and the checks
        print(f"{name}: the model's facts and checks {time.process_time() - began:.2f} s")
        options = dict(zip(args[1::2], args[2::2]))
        began = time.process_time()
        dbprofile.plan(
            spec,
            batch_size=int(options["-b"]),
            device=options["--gpu"],
            zero_stage=int(options.get("--zero", 0)),
            world_size=int(options.get("--world-size", 1)),
            cache=False,  # what tracing costs, in this process
            workers=1,
        )
        print(f"{name}: the whole plan {time.process_time() - began:.2f} s CPU")


def main() -> None:
    if "--breakdown" in sys.argv[1:]:
        breakdown()
        return
    full = "--full-trace" in sys.argv[1:]
    # --only llama-7b: one of the two plans
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    for name, args in COMMANDS.items():
        if only is not None and name != only:
            continue
        with tempfile.TemporaryDirectory(prefix="dbprofile-bench-cache-") as cache:
            for kind in ("cold", "warm"):
                load = os.getloadavg()[0]
                result, wall, cpu = plan(args, cache)
                print(
                    f"{name} ({kind} cache): {wall:.1f} s wall, {cpu:.1f} s CPU (goal < {GOALS_S[name]:g} s cold, "
                    f"< {WARM_GOAL_S:g} s warm); load average {load:.2f} before, {os.getloadavg()[0]:.2f} after"
                )
        reference = {}
        if full:
            traced, full_wall, _ = plan([*args, "--full-trace"])  # --no-cache: traced now
            reference = {e["technique"]: e for e in traced["entries"]}
            print(f"  --full-trace: {full_wall:.1f} s wall")
        for entry in result["entries"]:
            depth = entry.get("extra", {}).get("depth") or {}
            # One device: the allocator's reserved bytes replayed; sharded entries take a fraction of their shares.
            replay = (entry.get("extra", {}).get("allocator_model") or {}) if entry.get("sharding") == "none" else {}
            reserved = " (replayed)" if replay else ""
            line = f"  {entry['technique']:16s} {depth.get('path', '?'):12s} peak {entry['peak_bytes']:,} B{reserved}"
            ref = reference.get(entry["technique"])
            if ref and ref.get("peak_bytes"):
                # Tracked bytes, shares, FLOPs and the largest batch must be the full trace's to the byte;
                # so must the planned peak (tracked bytes plus the CUDA corrections) where replayed.
                # A sharded entry's collectives (bytes by kind, bytes sent per step) too.
                figures = ("tracked_peak_bytes", "shares", "training_flops", "max_batch_size")
                exact = all(entry.get(k) == ref.get(k) for k in figures) and all(
                    entry.get("extra", {}).get(k) == ref.get("extra", {}).get(k)
                    for k in ("collective_bytes", "communication")
                )
                apart = entry["peak_bytes"] / ref["peak_bytes"] - 1
                line += f"  full trace {ref['peak_bytes']:,} B ({apart:+.4%}); tracked, shares, FLOPs, collectives " + (
                    "equal" if exact else "DIFFER"
                )
            print(line)


if __name__ == "__main__":
    main()
