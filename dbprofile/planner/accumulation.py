"""Gradient accumulation in a plan: for a technique that does not fit at the asked batch, the
largest micro-batch that does, and the accumulation steps that make up the batch.

An accumulating step differs from a plain one at the same micro-batch by the gradients: they
persist from the first micro-batch to the optimizer step, so every later micro-batch's forward and
backward run with all of them resident (and in place additions into them). Nothing else persists
across micro-batches: each micro-batch's activations are freed by its own backward. The peak is
therefore measured, not estimated: a fake run of the technique with two micro-batches per step
(RunSettings.micro_batches; a third and later micro-batch repeat the second exactly).

The micro-batch is the largest m, at least ``min_micro_batch``, such that K = ceil(B / m) steps of
micro-batches of ceil(B / K) fit: the batch split as evenly as K allows, which trains exactly the
batch B for models whose loss is a mean over samples without batch statistics. The first guess is
the plain step's largest batch (the gradients only add to it), then the linear model of the plain
peak in the batch plus the measured extra of accumulation, at most MAX_ACCUMULATION_RUNS runs."""

from __future__ import annotations

import math
from collections.abc import Callable

from dbprofile.results import PlanEntry

MAX_ACCUMULATION_RUNS = 3


def even_micro_batch(batch_size: int, largest: int) -> tuple[int, int]:
    """(micro-batch, steps): the fewest steps whose micro-batches are at most ``largest``, the batch
    split as evenly as that count allows."""
    steps = math.ceil(batch_size / largest)
    return math.ceil(batch_size / steps), steps


def plan_accumulation(
    entry: PlanEntry,
    accumulating: Callable[[int], PlanEntry],
    capacity: int,
    min_micro_batch: int,
) -> None:
    """Fill ``entry``'s micro_batch_size, accumulation_steps and accumulation_peak_bytes.
    ``accumulating(m)`` plans the technique at micro-batch m with accumulation."""
    if entry.fits:
        entry.micro_batch_size, entry.accumulation_steps = entry.batch_size, 1
        entry.accumulation_peak_bytes = entry.peak_bytes
        return
    largest = min(entry.max_batch_size or 0, entry.batch_size)
    per_sample = entry.linear_fit.get("per_sample_bytes") or 0
    for _ in range(MAX_ACCUMULATION_RUNS):
        if largest < max(min_micro_batch, 1):
            return
        micro, steps = even_micro_batch(entry.batch_size, largest)
        checked = accumulating(micro)
        if not checked.ok:
            return
        if checked.peak_bytes <= capacity:
            entry.micro_batch_size, entry.accumulation_steps = micro, steps
            entry.accumulation_peak_bytes = checked.peak_bytes
            return
        # Accumulation adds a fixed amount (the gradients) over the plain step, which grows by the
        # plain line's bytes per sample: shed the miss at that rate.
        guess = micro + int((capacity - checked.peak_bytes) // per_sample) if per_sample > 0 else 0
        largest = min(guess, micro - 1)
