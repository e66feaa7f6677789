"""Collect GPU ground truth in one device call: the full validation table, and the CUDA
caching allocator's own event trace for every configuration (the data the reserved-memory
model in dbprofile.measure.allocator is checked against on the CPU).

For each configuration of ``dbprofile validate`` it records PyTorch's memory history
(``torch.cuda.memory._record_memory_history``, no stack traces) from the trainer's build to
the end of its timed steps, and stores the trace compactly: one row per allocator event
(action code, address, size), plus the segments that existed before the configuration
started (the cuBLAS workspaces). All traces go into one compressed ``.npz``;
the validation rows as JSON and Markdown.

Also logs the aten ops (name, input and output dtypes and shapes) of one bf16 GPT-2 step on
the device, so the fake run's op list can be compared with CUDA's (autocast policy).

Usage (on a GPU machine; ``--device cpu --quick`` is the CPU dry run)::

    PYTHONUNBUFFERED=1 python scripts/gpu_collect.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ACTIONS = (
    "alloc",
    "free_requested",
    "free_completed",
    "segment_alloc",
    "segment_free",
    "segment_map",
    "segment_unmap",
    "snapshot",
    "oom",
)


def compact_trace(snapshot: dict, device_index: int) -> dict[str, np.ndarray]:
    """The device's trace as arrays: action code, address (delta-encoded: ``np.cumsum`` restores
    it), size (int64)."""
    events = snapshot["device_traces"][device_index]
    codes = np.array([ACTIONS.index(e["action"]) if e["action"] in ACTIONS else 255 for e in events], dtype=np.uint8)
    # Addresses as differences from the previous event's: the same information, and it compresses.
    addrs = np.diff(np.array([int(e["addr"]) for e in events], dtype=np.int64), prepend=0)
    sizes = np.array([int(e["size"]) for e in events], dtype=np.int64)
    return {"action": codes, "addr": addrs, "size": sizes}


def segments_table(snapshot: dict, device_index: int) -> np.ndarray:
    """Segments at snapshot time: (address, total size, allocated bytes, is large pool)."""
    rows = [
        (
            int(s["address"]),
            int(s["total_size"]),
            int(s["allocated_size"]),
            1 if s.get("segment_type") == "large" else 0,
        )
        for s in snapshot["segments"]
        if s.get("device", device_index) == device_index
    ]
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def op_log(model: str, batch_size: int, precision: str, device: torch.device) -> list[str]:
    """aten ops of one e2e step: name, input dtypes/shapes, output dtypes/shapes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dbprofile.loading import load_spec
    from dbprofile.methods import make_trainer
    from dbprofile.techniques import parse_techniques

    lines: list[str] = []

    def desc(x):
        if isinstance(x, torch.Tensor):
            return f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"
        if isinstance(x, (list, tuple)):
            return "(" + ",".join(desc(i) for i in x if isinstance(i, (torch.Tensor, list, tuple))) + ")"
        return ""

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = ",".join(filter(None, (desc(a) for a in args)))
            lines.append(f"{func} | {ins} -> {desc(out)}")
            return out

    spec = load_spec(model)
    trainer = make_trainer(parse_techniques(["e2e"])[0], spec, device, precision=precision, optimizer="adamw")
    batch = spec.batch(batch_size, device)
    trainer.step(batch, None, lambda phase: None)
    with Log():
        trainer.step(batch, None, lambda phase: lines.append(f"## phase {phase}"))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models only (CPU dry run)")
    parser.add_argument("--time-budget", type=float, default=330.0)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per unit")
    parser.add_argument("--name", default="validate", help="file name stem of the table")
    parser.add_argument(
        "--timing",
        type=float,
        nargs=2,
        default=(0.2, 1.0),
        metavar=("MIN_S", "MAX_S"),
        help="seconds of adaptive timing per technique (the runner's MIN_TIME_S / MAX_TIME_S); "
        "short, since this run checks memory",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import dbprofile.measure.runner as runner_mod
    import dbprofile.validate as validate_mod

    runner_mod.MIN_TIME_S, runner_mod.MAX_TIME_S = args.timing
    from dbprofile.report.text import VALIDATION_HEADER, validation_row, validation_summary
    from dbprofile.validate import validate

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    traces: dict[str, dict[str, np.ndarray]] = {}
    measure_one = validate_mod.measure_one

    def recorded_measure(model, batch_size, technique, precision, dev, steps=2):
        key = f"{model}|{batch_size}|{technique}|{precision}"
        if cuda:
            before = torch.cuda.memory._snapshot()  # segments held already (cuBLAS workspaces)
            torch.cuda.memory._record_memory_history(
                enabled="all", context=None, stacks="python", max_entries=5_000_000, clear_history=True
            )
        row = measure_one(model, batch_size, technique, precision, dev, steps=steps)
        if cuda:
            after = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            idx = device.index or 0
            arrays = compact_trace(after, idx)
            arrays["initial_segments"] = segments_table(before, idx)
            arrays["peaks"] = np.array(
                [row.max_allocated_bytes or -1, row.max_reserved_bytes or -1, row.tracked_peak_bytes or -1],
                dtype=np.int64,
            )
            traces[key] = arrays
            print(f"  trace {key}: {len(arrays['action'])} events", flush=True)
        return row

    validate_mod.measure_one = recorded_measure
    if args.quick:
        cases = (("vit-tiny", (4,)), ("gpt-tiny", (2,)))
    else:
        cases = validate_mod.DEFAULT_CASES
    rows_json: list[dict] = []
    md = [VALIDATION_HEADER]

    def on_row(row):
        rows_json.append(row.to_dict())
        md.append(validation_row(row))
        print(validation_row(row), flush=True)
        (out / f"{args.name}.json").write_text(
            json.dumps({"environment": environment, "command": command, "rows": rows_json}, indent=1)
        )

    from dbprofile.measure.device import environment as device_environment

    environment = device_environment(device)
    command = "python scripts/gpu_collect.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    rows = validate(cases=cases, device=device, steps=args.steps, time_budget_s=args.time_budget, on_row=on_row)
    print(validation_summary(rows), flush=True)
    md.append("")
    md.append(validation_summary(rows))
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print(f"validate: {time.perf_counter() - started:.0f} s", flush=True)

    # Traces of every configuration in one compressed file (run 1's were 0.5-0.7 MiB per family).
    if traces:
        path = out / f"{args.name}-traces.npz"
        np.savez_compressed(
            path, **{f"{key}|{name}": arr for key, arrays in traces.items() for name, arr in arrays.items()}
        )
        print(f"{path.name}: {path.stat().st_size / 2**20:.1f} MiB", flush=True)

    # CUDA's op list for a bf16 language-model step (the autocast policy around the loss).
    model = "gpt-tiny" if args.quick else "gpt2-small"
    try:
        lines = op_log(model, 2, "bf16", device)
        (out / "oplog_gpt_bf16.txt").write_text("\n".join(lines) + "\n")
        print(f"op log: {len(lines)} ops", flush=True)
    except Exception as err:  # a diagnostic; must not lose the table
        print(f"op log failed: {type(err).__name__}: {err}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
