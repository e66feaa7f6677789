"""The figures README.md quotes from dbprofile's own output, computed in one place.

    python scripts/readme_figures.py            # print each quoted figure, README's and the code's
    python scripts/readme_figures.py --write    # put the code's figures into README.md
    python scripts/readme_figures.py --check    # exit 1 when README.md quotes another value

Each figure is a pattern of README.md (its numbers as groups) and the function that computes
them with the same API the quoted command calls. tests/test_readme_figures.py runs the check
(marked slow: it plans a 7B model and ViT-L/16, a few minutes on a laptop CPU).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
GIB = 2**30


@dataclass(frozen=True)
class Figure:
    command: str
    pattern: str
    """A regular expression matching the sentence in README.md; each group is one quoted number."""
    compute: Callable[[], tuple[str, ...]]


def _gib(n: int | None) -> str:
    return f"{(n or 0) / GIB:.2f}"


def _llama_shortfalls() -> tuple[str, ...]:
    import dbprofile

    plan = dbprofile.plan("llama-7b", 2, device="H100-80GB")
    return _gib(plan.get("ckpt").shortfall_bytes), _gib(plan.get("db:4").shortfall_bytes)


@functools.cache
def _vit_l16_alternatives_plan():
    import dbprofile

    techniques = ["e2e", "ckpt", "sac", "sac:alt", "offload", "db:2", "db:3", "db:4"]
    return dbprofile.plan("vit-l16", 64, device="RTX-4090", techniques=techniques, optimizer="adamw-loop")


def _vit_l16_e2e_row() -> tuple[str, ...]:
    plan = _vit_l16_alternatives_plan()
    e2e = plan.get("e2e")
    return (
        _gib(e2e.peak_bytes),
        _gib(plan.capacity_bytes),
        str(e2e.max_batch_size),
        str(e2e.micro_batch_size),
        str(e2e.accumulation_steps),
        _gib(e2e.accumulation_peak_bytes),
    )


def _vit_l16_db2_row() -> tuple[str, ...]:
    db2 = _vit_l16_alternatives_plan().get("db:2")
    return _gib(db2.peak_bytes), str(db2.max_batch_size)


def _vit_l16_jq() -> tuple[str, ...]:
    import dbprofile

    plan = dbprofile.plan("vit-l16", 640, device="RTX-4090", techniques=["e2e", "ckpt", "db:4"])
    return tuple(str(v) for e in plan.entries for v in (e.shortfall_bytes, e.max_batch_size))


FIGURES = [
    Figure(
        "dbprofile plan llama-7b -b 2 --gpu H100-80GB",
        r'\("ckpt by ([\d.]+) GiB, db:4 by ([\d.]+) GiB',
        _llama_shortfalls,
    ),
    Figure(
        "dbprofile plan vit-l16 -b 64 --gpu RTX-4090 -t e2e,ckpt,sac,sac:alt,offload,db:2,db:3,db:4 (e2e)",
        r"\| e2e \| ([\d.]+) \(misses the ([\d.]+)\) \| (\d+) \| (\d+) x (\d+) at ([\d.]+) \|",
        _vit_l16_e2e_row,
    ),
    Figure(
        "dbprofile plan vit-l16 -b 64 --gpu RTX-4090 -t e2e,ckpt,sac,sac:alt,offload,db:2,db:3,db:4 (db:2)",
        r"\| db:2 \| ([\d.]+) \| (\d+) \| 64 x 1 \|",
        _vit_l16_db2_row,
    ),
    Figure(
        "dbprofile plan vit-l16 -b 640 --gpu RTX-4090 -t e2e,ckpt,db:4 --json | jq ...",
        r"e2e false (\d+) (\d+)\nckpt false (\d+) (\d+)\ndb:4 false (\d+) (\d+)",
        _vit_l16_jq,
    ),
]


def quoted(text: str, figure: Figure) -> tuple[str, ...]:
    match = re.search(figure.pattern, text)
    if match is None:
        raise SystemExit(f"README.md no longer has the sentence for `{figure.command}` ({figure.pattern}).")
    return match.groups()


def replaced(text: str, figure: Figure, values: tuple[str, ...]) -> str:
    match = re.search(figure.pattern, text)
    assert match is not None
    out, last = [], match.start()
    for index, value in enumerate(values, start=1):
        out += [text[last : match.start(index)], value]
        last = match.end(index)
    return text[: match.start()] + "".join(out) + text[last:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the code's figures into README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 when README.md quotes another value")
    args = parser.parse_args()
    text = README.read_text(encoding="utf-8")
    stale = []
    for figure in FIGURES:
        old, new = quoted(text, figure), figure.compute()
        print(f"{figure.command}: README {', '.join(old)}; code {', '.join(new)}")
        if old != new:
            stale.append(figure.command)
            text = replaced(text, figure, new)
    if args.write and stale:
        README.write_text(text, encoding="utf-8")
        print(f"README.md updated: {', '.join(stale)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
