"""The spread of timings: interquartile range as torch.utils.benchmark defines it (numpy-style
linear quantiles), absolute and relative to the median. One definition for the measurement
(each timing's IQR, the interleaved rounds' stopping rule) and the verdict (a ratio's spread).
``paired_ratios`` pairs two techniques' times round by round, as both of those read them."""

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


def paired_ratios(times: list[float], reference: list[float]) -> list[float]:
    """Round by round, ``times`` over ``reference`` (rounds where the reference is not positive
    are left out): two techniques timed in the same rounds, so each pair saw the same speed."""
    return [t / r for t, r in zip(times, reference) if r > 0]
