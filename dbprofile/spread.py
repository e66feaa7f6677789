"""The spread of timings: interquartile range as torch.utils.benchmark defines it (numpy-style
linear quantiles), absolute and relative to the median. One definition for the measurement
(each timing's IQR, the interleaved rounds' stopping rule) and the verdict (a ratio's spread)."""

from __future__ import annotations

import statistics


def iqr(values: list[float]) -> float:
    """Interquartile range of ``values`` (0 for a single value)."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return q[2] - q[0]


def relative_iqr(values: list[float]) -> float:
    """Interquartile range over the median (infinite when the median is not positive)."""
    median = statistics.median(values)
    return iqr(values) / median if median > 0 else float("inf")
