"""Plan before booking a GPU: the 7B Llama-style preset on H100-80GB with ZeRO-3 over 8 ranks.

Every number comes from fake-tensor runs of the real training code (no GPU, no memory) plus
the documented CUDA corrections (docs/planner.md). Fake runs of a 7B model take 10-20 s each
on a laptop CPU, so this example plans three techniques and takes the largest batch size from
the linear model without confirming it by extra runs (``confirm_max_batch=False``); it runs in
under a minute.

    python examples/plan_api.py
"""

from __future__ import annotations

import time

import dbprofile
from dbprofile import plan

if __name__ == "__main__":
    started = time.perf_counter()
    result = plan(
        "llama-7b",
        batch_size=2,
        device="H100-80GB",
        techniques=["e2e", "ckpt", "db:4"],
        zero_stage=3,
        world_size=8,
        confirm_max_batch=False,
    )
    print(result)  # the table, then the verdict and its reasons
    print()
    # best_technique is the DiffusionBlocks configuration the rules weighed, adopted or not.
    print(
        f"decision: {result.verdict.decision} (DiffusionBlocks configuration weighed: {result.verdict.best_technique})"
    )
    for entry in result.entries:
        print(
            f"{entry.technique}: {dbprofile.format_bytes(entry.peak_bytes)} per device, "
            f"largest batch size that fits: {entry.max_batch_size}"
        )
    print(f"planned in {time.perf_counter() - started:.1f} s")
