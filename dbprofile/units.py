"""Byte units: the IEC (1024-based) units every table, chart and report uses, and the parser
for sizes the user writes (``--memory-limit 24GiB``, ``--gpu 80GB``). Every memory figure in
dbprofile is an integer number of bytes; a unit is applied only when presenting."""

from __future__ import annotations

import math
import re

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

UNIT_BYTES = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB}
"""The IEC units a table or chart picks from, and their size in bytes."""


def pick_unit(max_bytes: int, smallest: str = "KiB") -> str:
    """The one IEC unit a table or chart uses for all its numbers: the largest unit (up to GiB)
    that ``max_bytes`` reaches, and never below ``smallest``."""
    units = list(UNIT_BYTES)
    for unit in reversed(units[units.index(smallest) :]):
        if max_bytes >= UNIT_BYTES[unit]:
            return unit
    return smallest


def format_bytes(n: int | float | None, unit: str | None = None, digits: int = 2) -> str:
    """IEC (1024-based) units with correct labels: 1536 -> '1.50 KiB'."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    units = [*UNIT_BYTES, "TiB"]
    if unit is not None:
        power = units.index(unit)
    else:
        power = 0
        while power < len(units) - 1 and abs(n) >= 1024 ** (power + 1):
            power += 1
    if power == 0:
        return f"{int(n)} B"
    return f"{n / 1024**power:.{digits}f} {units[power]}"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": TiB,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}


def parse_size(text: str) -> int:
    """'24GiB', '512 MiB', '80GB' (decimal) or a plain integer of bytes -> bytes; ValueError
    with the accepted forms otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"Cannot read the size {text!r}; write it like 24GiB, 512MiB or 1073741824 (bytes).")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "b").lower()])


def size_bytes(value: object, what: str, minimum: int = 1) -> int:
    """A size given to the Python API as the command line takes it: an integer of bytes, or a
    string ('24GiB', '80GB', '1073741824'); ValueError naming ``what`` for anything else (a
    bool, a float, NaN, below ``minimum``), so an API call fails as the CLI does, in one sentence."""
    if isinstance(value, str):
        value = parse_size(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} is a size: an integer of bytes or a string such as '24GiB'; got {value!r}.")
    if value < minimum:
        raise ValueError(f"{what} must be at least {minimum} byte{'s' if minimum != 1 else ''}; got {value}.")
    return value


def format_gflop(flops: float) -> str:
    """FLOPs in GFLOP, readable at every scale: '1,234.5', '12.3', '0.0123' (a tiny model's
    work is never shown as a bare 0.0)."""
    gflop = flops / 1e9
    return f"{gflop:,.1f}" if abs(gflop) >= 10 else f"{gflop:.3g}"


def format_duration(seconds: float) -> str:
    """A duration in the unit that reads best: '45.2 s', '12.5 min', '3.40 h' (a tiny model's
    million samples are never shown as '0.00 h')."""
    if seconds < 60:
        return f"{seconds:.3g} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:,.2f} h"
