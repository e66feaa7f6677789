"""Benchmark: the ~1B Llama preset at batch 8 x 1024 tokens, all default techniques, in
fake-tensor mode. Prints wall time and peak RSS (targets: under 30 s, under 2 GiB).

    python benchmarks/bench_fake_1b.py
"""

from __future__ import annotations

import resource
import sys
import time

from dbprofile.measure.runner import run
from dbprofile.models import get_preset, gpt
from dbprofile.report.text import run_table
from dbprofile.techniques import DEFAULT_TECHNIQUES
from dbprofile.units import format_bytes


def main() -> None:
    spec = llama_1b(tokens=1024)
    start = time.perf_counter()
    result = run(spec, DEFAULT_TECHNIQUES, [8], fake=True, steps=1)
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(run_table(result))
    print(f"wall time: {wall:.1f} s (target < 30 s)")
    print(f"peak RSS: {format_bytes(rss)} (target < 2.00 GiB)")
    failed = [m for m in result.measurements if not m.ok]
    sys.exit(1 if failed else 0)


def llama_1b(tokens: int):
    """The llama-1b preset's shape with ``tokens`` tokens per sequence (its context is 2048)."""
    base = get_preset("llama-1b")
    config = gpt.GPTConfig(
        style="llama",
        vocab_size=32000,
        context_length=tokens,
        num_layers=22,
        hidden_size=2048,
        num_heads=32,
        num_kv_heads=4,
        ffn_size=5632,
    )
    return gpt.make_spec(config, name=f"llama-1b@{tokens}", description=base.description)


if __name__ == "__main__":
    main()
