"""Issue 29, the planner's largest batch size: the answer is a confirmed fit, never the plan's own
batch size because the linear model's guesses kept landing on a step of the peak's staircase."""

from __future__ import annotations

import pytest

from dbprofile.planner.fit import MAX_BISECT_RUNS, MAX_CONFIRM_RUNS, find_max_batch
from dbprofile.results import PlanEntry

GiB = 2**30


def staircase(step_samples: int, bytes_per_step: int, fixed: int):
    """A peak that rises in whole steps (an allocator's segments): flat between steps."""

    def peak(b: int) -> int:
        return fixed + ((b + step_samples - 1) // step_samples) * bytes_per_step

    return peak


def search(peak, batch: int, capacity: int, *, activations_per_sample: int):
    entry = PlanEntry(technique="e2e", batch_size=batch, peak_bytes=peak(batch), tracked_peak_bytes=peak(batch))
    entry.shares = {"activations": activations_per_sample * batch}
    calls: list[int] = []

    def predict(b: int) -> PlanEntry:
        calls.append(b)
        return PlanEntry(technique="e2e", batch_size=b, peak_bytes=peak(b), tracked_peak_bytes=peak(b))

    find_max_batch(entry, predict, capacity, confirm=True)
    return entry, calls


L4_BYTES = 24_152_899_584
# The peaks the issue's plan of a 40-layer, 32-wide GPT-2 on an L4 found (batch size, bytes): a
# step of 1.2 GB between 15954 and 15955 samples, flat up to 16873, then linear again.
GPT2_STEPS = [
    (1, 1_516_240_896),
    (8235, 13_635_682_304),
    (15954, 23_337_107_456),
    (15955, 24_559_747_072),
    (16873, 24_561_844_224),
    (41663, 57_113_837_568),
    (10**6, 10**15),
]


def interpolated(points):
    def peak(b: int) -> int:
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if x0 <= b <= x1:
                return int(y0 + (y1 - y0) * (b - x0) / (x1 - x0))
        raise AssertionError(b)

    return peak


def test_the_issues_plan_no_longer_collapses_to_the_asked_batch():
    """The old search guessed 41663, 16873 and 16469, all over the capacity, and answered 1."""
    peak = interpolated(GPT2_STEPS)
    per_sample = (L4_BYTES - GPT2_STEPS[0][1]) // 41662  # the first run's shares point at 41663
    entry, calls = search(peak, 1, L4_BYTES, activations_per_sample=per_sample)
    assert calls[:3] == [41663, 16873, 16469]
    assert entry.max_batch_size == 15954 and peak(15954) <= L4_BYTES < peak(15955)


@pytest.mark.parametrize("batch", [1, 7, 300])
def test_a_staircase_the_line_keeps_missing_still_gives_a_confirmed_large_batch(batch):
    # From batch 1 the line sees only the first step, and overestimates what fits by a wide margin.
    peak = staircase(1000, 1 * GiB, fixed=GiB // 2)
    entry, calls = search(peak, batch, 20 * GiB, activations_per_sample=GiB // 4000)
    truth = max(b for b in range(1, 40_000) if peak(b) <= 20 * GiB)
    assert peak(entry.max_batch_size) <= 20 * GiB  # confirmed: it fits
    assert entry.max_batch_size >= 0.9 * truth and entry.max_batch_size > batch
    assert len(calls) <= MAX_CONFIRM_RUNS + MAX_BISECT_RUNS
    assert all(b in dict(entry.linear_fit["points"]) for b in calls)


def test_no_guess_lands_beyond_a_batch_that_already_missed():
    peak = staircase(500, GiB, fixed=0)
    entry, calls = search(peak, 1, 10 * GiB, activations_per_sample=GiB // 2000)
    missed = [b for b in calls if peak(b) > 10 * GiB]
    for i, b in enumerate(calls):
        earlier = [m for m in missed if calls.index(m) < i]
        assert all(b < m for m in earlier), calls


def test_a_linear_peak_is_found_in_one_confirming_run():
    def peak(b: int) -> int:
        return GiB + b * 1_000_000

    entry, calls = search(peak, 8, 20 * GiB, activations_per_sample=1_000_000)
    assert entry.max_batch_size == (20 * GiB - GiB) // 1_000_000 and len(calls) == 1


def test_the_presentation_layer_reads_only_data_and_leaves():
    """A constant or a lookup that two layers need lives in a leaf (docs/architecture.md): the
    report and the console import nothing that measures, plans, loads or builds."""
    import ast
    from pathlib import Path

    import dbprofile

    package = Path(dbprofile.__file__).parent
    below = ("dbprofile.measure", "dbprofile.gpus", "dbprofile.planner", "dbprofile.loading", "dbprofile.methods")
    for path in [*sorted((package / "report").glob("*.py")), package / "console.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(below), f"{path.name} imports {node.module}"


def test_a_plans_time_estimate_names_its_flops_source_from_the_plan_itself():
    from dbprofile import plan
    from dbprofile.gpus import get_gpu
    from dbprofile.report.text import format_time_estimate

    planned = plan("gpt-tiny", 1, device="L4", techniques=["e2e"], search_max_batch=False)
    assert planned.peak_flops_source == get_gpu("L4").flops_source
    assert get_gpu("L4").flops_source in format_time_estimate(planned)
    assert plan("gpt-tiny", 1, device="cpu", techniques=["e2e"]).peak_flops_source is None
