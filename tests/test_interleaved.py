"""CPU runs time their techniques interleaved, round by round (dbprofile.measure.interleaved,
docs/timing.md), after the memory measurements, and fall back to one at a time."""

from __future__ import annotations

import pytest
from _toy import toy_spec

from dbprofile.measure import interleaved
from dbprofile.measure.runner import run


@pytest.fixture(autouse=True)
def short_timing(monkeypatch):
    """A tenth of a second of timed steps per technique instead of one: the rules, not the figures."""
    monkeypatch.setattr(interleaved, "MIN_TIME_S", 0.1)
    monkeypatch.setattr(interleaved, "MAX_TIME_S", 1.0)


def _timing(m) -> dict:
    return m.extra["timing"]


def test_techniques_share_the_timing_rounds_and_keep_their_memory_figures():
    spec = toy_spec(depth=4)
    result = run(spec, ["e2e", "ckpt", "db:2"], 8, steps=3)
    by_name = {m.technique: m for m in result.measurements}
    rounds = {_timing(m)["rounds"] for m in result.measurements}
    assert len(rounds) == 1 and rounds.pop() >= interleaved.MIN_BLOCKS
    for m in result.measurements:
        timing = _timing(m)
        assert m.ok and timing["protocol"] == "interleaved" and timing["timed_together"] == 3
        assert len(timing["round_step_times_s"]) == timing["rounds"]
        assert m.step_time_s > 0 and m.step_time_iqr_s is not None
        assert sum(m.shares.values()) == m.peak_bytes  # the memory measurement is untouched
    db = by_name["db:2"]
    assert [b.step_time_s is not None for b in db.blocks] == [True, True]
    assert db.block_steps_time_s == pytest.approx(sum(b.step_time_s for b in db.blocks))
    # the same memory figures as a run that times nothing (fake tensors count the same bytes)
    fake = run(spec, ["e2e", "ckpt", "db:2"], 8, fake=True)
    assert [m.peak_bytes for m in fake.measurements] == [m.peak_bytes for m in result.measurements]
    assert all(m.step_time_s is None and "protocol" not in _timing(m) for m in fake.measurements)


def test_techniques_that_would_not_fit_together_are_timed_one_at_a_time(monkeypatch):
    monkeypatch.setattr(interleaved, "_free_host_bytes", lambda: 1)
    result = run(toy_spec(), ["e2e", "ckpt"], 8, steps=3)
    assert [_timing(m)["protocol"] for m in result.measurements] == ["sequential", "sequential"]
    assert all(_timing(m)["timed_together"] == 1 and m.step_time_s > 0 for m in result.measurements)


def test_a_failing_timing_keeps_the_memory_measurement(monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("no second build")

    monkeypatch.setattr(interleaved, "make_trainer", broken)
    result = run(toy_spec(), ["e2e", "ckpt"], 8, steps=3)
    for m in result.measurements:
        assert m.ok and m.peak_bytes > 0 and m.step_time_s is None
        assert m.extra["timing_error"] == "RuntimeError: no second build"


def test_a_loss_that_turns_non_finite_while_timed_is_flagged():
    result = run(toy_spec(fail="nan"), ["e2e"], 8, steps=3)
    assert result.measurements[0].status == "nan"


def test_trimmed_mean_keeps_a_mixtures_ratio_where_a_median_jumps():
    # Two techniques timed in the same rounds on a machine with two speeds (10 and 15 ms for the
    # first): 11 rounds fast, 9 slow. Both medians land in the fast state here, but one more slow
    # round would move them; the trimmed means keep the ratio 1.5 and a stray burst does not move them.
    fast, slow = [0.010] * 11, [0.015] * 9
    e2e = fast + slow
    other = [1.5 * t for t in e2e]
    assert interleaved.trimmed_mean(other) / interleaved.trimmed_mean(e2e) == pytest.approx(1.5)
    burst = e2e[:-1] + [1.0]
    assert interleaved.trimmed_mean(burst) == pytest.approx(interleaved.trimmed_mean(e2e[:-1] + [0.015]))
