"""The adoption rules (dbprofile.verdict) on hand-made measurements and plans: each decision,
the numbers in its sentences, and failed measurements."""

from __future__ import annotations

import pytest

from dbprofile.results import Measurement, Plan, PlanEntry, RunResult
from dbprofile.verdict import (
    MAX_RATIO_NOISE,
    ratio_is_clear,
    ACTIVATION_BOUND_SHARE,
    MIN_SAVING_FRACTION,
    STATE_BOUND_SHARE,
    judge,
)

GiB = 1024**3


def _m(technique, params=0, grads=0, opt=0, act=0, tmp=0, status="ok", time=None, block_time=None, extra=None,
       time_noise=0.02):
    shares = {
        "parameters": int(params * GiB),
        "gradients": int(grads * GiB),
        "optimizer_state": int(opt * GiB),
        "activations": int(act * GiB),
        "temporaries": int(tmp * GiB),
    }
    ok = status == "ok"
    return Measurement(
        technique=technique,
        batch_size=64,
        status=status,
        error=None if ok else "CUDA out of memory. Tried to allocate 2.00 GiB",
        peak_bytes=sum(shares.values()) if ok else 0,
        shares=shares if ok else {},
        step_time_s=time,
        step_time_iqr_s=None if time is None else time * time_noise,
        block_steps_time_s=block_time,
        block_steps_time_iqr_s=None if block_time is None else block_time * time_noise,
        num_parameters=1_000_000_000 + (extra or 0) if extra is not None else 1_000_000_000,
        extra_parameters=extra,
    )


def _activation_bound_run() -> RunResult:
    # e2e: 61 GiB, 70% activations. ckpt 26 GiB; db:2 38 GiB; db:4 24.9 GiB.
    return RunResult(
        model="dit-xl2",
        model_info={"task": "denoising"},
        measurements=[
            _m("e2e", 4, 4, 8, 43, 2, time=1.0),
            _m("ckpt", 4, 4, 8, 18, 2, time=1.33),
            _m("db:2", 4, 2, 8, 22, 2, time=0.5, block_time=1.02, extra=30_000_000),
            _m("db:4", 4, 1, 8, 9.9, 2, time=0.26, block_time=1.05, extra=30_000_000),
        ],
    )


def _rule(verdict, name):
    found = [r for r in verdict.reasons if r.rule == name]
    assert found, f"rule {name} did not fire: {[r.rule for r in verdict.reasons]}"
    return found[0]


def test_activation_bound_adopts_the_smallest_block_count_that_fits():
    verdict = judge(_activation_bound_run(), capacity_bytes=30 * GiB)
    assert verdict.decision == "adopt"
    # db:2 (38 GiB) does not fit 30 GiB; db:4 (24.9 GiB) does, and beats ckpt (36 GiB) by 11.1 GiB.
    assert verdict.best_technique == "db:4"
    assert _rule(verdict, "activation-bound").numbers["activations_fraction"] == pytest.approx(43 / 61)
    memory = _rule(verdict, "memory")
    assert "from 61.00 GiB to 24.90 GiB" in memory.sentence
    assert "11.10 GiB below ckpt" in memory.sentence
    assert memory.numbers["saving_fraction"] == pytest.approx(1 - 24.9 / 61, abs=1e-3)
    assert "Adopt DiffusionBlocks db:4" in verdict.headline


def test_compute_rule_compares_block_steps_with_e2e_and_ckpt_step_times():
    verdict = judge(_activation_bound_run(), capacity_bytes=30 * GiB)
    compute = _rule(verdict, "compute")
    assert compute.numbers["db_ratio"] == pytest.approx(1.05)
    assert compute.numbers["ckpt_ratio"] == pytest.approx(1.33)
    assert "1.05x" in compute.sentence and "1.33x" in compute.sentence


def test_compute_rule_withholds_a_ratio_whose_timings_are_too_noisy():
    run = _activation_bound_run()
    # ckpt's IQR is 25% of its median: 25% + e2e's 2% is over MAX_RATIO_NOISE (20%).
    run.measurements[1] = _m("ckpt", 4, 4, 8, 18, 2, time=1.33, time_noise=0.25)
    compute = _rule(judge(run, capacity_bytes=30 * GiB), "compute")
    assert "ckpt_ratio" not in compute.numbers and compute.numbers["too_noisy"] == ["ckpt"]
    assert compute.numbers["db_ratio"] == pytest.approx(1.05)  # 2% + 2%: quoted
    assert "too noisy to compare" in compute.sentence and "1.33x" in compute.sentence  # the expected ratio


def test_compute_rule_quotes_a_ratio_at_the_noise_threshold_and_not_past_it():
    assert ratio_is_clear(1.0, 0.1, 2.0, 0.2)  # 10% + 10% = MAX_RATIO_NOISE
    assert not ratio_is_clear(1.0, 0.1, 2.0, 0.21)
    assert not ratio_is_clear(1.0, None, 2.0, 0.0)  # no spread recorded: nothing to judge it by
    assert MAX_RATIO_NOISE == 0.2


def test_quality_risk_quotes_the_papers_block_ablations():
    verdict = judge(_activation_bound_run(), capacity_bytes=30 * GiB)
    quality = _rule(verdict, "quality-risk")
    for figure in ("B=1 12.09", "B=2 9.90", "B=3 11.11", "B=4 11.90", "B=6 14.43", "B=4 45.43"):
        assert figure in quality.sentence
    # db:4 is past the paper's best range and the sentence says so with the CIFAR-10 numbers.
    assert "past the paper's best" in quality.sentence and "39.83" in quality.sentence


def test_costs_rule_counts_extra_adaln_parameters_and_says_training_starts_from_scratch():
    verdict = judge(_activation_bound_run(), capacity_bytes=30 * GiB)
    costs = _rule(verdict, "costs")
    assert costs.numbers["extra_parameters"] == 30_000_000
    assert costs.numbers["extra_parameters_fraction"] == pytest.approx(0.03)
    assert "30.0 M parameters" in costs.sentence
    assert "from scratch" in costs.sentence and "checkpoint" in costs.sentence


def test_optimizer_bound_model_is_not_worth_it_and_names_the_alternatives():
    run = RunResult(
        model="big",
        measurements=[
            _m("e2e", 10, 10, 40, 3, 1),
            _m("ckpt", 10, 10, 40, 0.5, 1),
            _m("db:4", 10, 3, 40, 1, 1),
        ],
    )
    verdict = judge(run)
    assert verdict.decision == "not-worth-it"
    reason = _rule(verdict, "state-bound")
    assert reason.numbers["optimizer_state_fraction"] == pytest.approx(40 / 64)
    assert reason.numbers["state_fraction"] >= STATE_BOUND_SHARE
    for remedy in ("ZeRO", "offload", "8-bit optimizer"):
        assert remedy in reason.sentence
    assert "resident" in verdict.headline


def test_e2e_that_fits_with_headroom_is_not_needed():
    verdict = judge(_activation_bound_run(), capacity_bytes=80 * GiB)
    assert verdict.decision == "not-needed"
    reason = _rule(verdict, "fits-e2e")
    assert reason.numbers["headroom_bytes"] == 80 * GiB - 61 * GiB
    assert "19.00 GiB" in verdict.headline
    assert "batch size or the depth grows" in reason.sentence


def test_checkpointing_reaching_the_same_memory_makes_it_not_worth_it():
    run = _activation_bound_run()
    run.measurements[1] = _m("ckpt", 4, 4, 8, 7, 2, time=1.33)  # 25 GiB, about db:4's 24.9 GiB
    verdict = judge(run, capacity_bytes=30 * GiB)
    assert verdict.decision == "not-worth-it"
    assert "ckpt needs 25.00 GiB" in verdict.headline


def test_small_saving_is_not_worth_it():
    run = RunResult(
        model="m",
        measurements=[_m("e2e", 1, 1, 2, 8, 3), _m("db:2", 1, 1, 2, 6.5, 3)],
    )
    verdict = judge(run)
    assert verdict.decision == "not-worth-it"
    assert 1 - 13.5 / 15 < MIN_SAVING_FRACTION
    assert "saves only 10%" in verdict.headline


def test_oom_measurements_are_reported_and_the_rest_still_judged():
    run = _activation_bound_run()
    run.measurements[0] = _m("e2e", status="oom")
    verdict = judge(run, capacity_bytes=30 * GiB)
    failed = _rule(verdict, "failed-measurement")
    assert failed.numbers == {"technique": "e2e", "status": "oom", "batch_size": 64}
    assert "ran out of memory" in failed.sentence and "Tried to allocate" in failed.sentence
    assert verdict.decision == "adopt" and verdict.best_technique == "db:4"


def test_every_measurement_failed_is_inconclusive():
    run = RunResult(model="m", measurements=[_m("e2e", status="oom"), _m("db:2", status="error")])
    verdict = judge(run)
    assert verdict.decision == "inconclusive"
    assert len([r for r in verdict.reasons if r.rule == "failed-measurement"]) == 2


def test_plan_and_run_with_the_same_numbers_get_the_same_decision():
    run = _activation_bound_run()
    entries = []
    for m in run.measurements:
        entries.append(
            PlanEntry(
                technique=m.technique,
                batch_size=m.batch_size,
                tracked_peak_bytes=m.peak_bytes,
                shares=m.shares,
                peak_bytes=m.peak_bytes,
                num_parameters=m.num_parameters,
                extra_parameters=m.extra_parameters,
            )
        )
    plan = Plan(model="dit-xl2", model_info={"task": "denoising"}, device="custom", capacity_bytes=30 * GiB, entries=entries)
    from_plan, from_run = judge(plan), judge(run, capacity_bytes=30 * GiB)
    assert from_plan.decision == from_run.decision == "adopt"
    assert from_plan.best_technique == from_run.best_technique == "db:4"
    # A plan has no times: the compute rule says what is expected instead of a measured ratio.
    assert "not measured" in _rule(from_plan, "compute").sentence


def test_thresholds_are_fractions():
    assert 0 < ACTIVATION_BOUND_SHARE < 1 and 0 < STATE_BOUND_SHARE < 1 and 0 < MIN_SAVING_FRACTION < 1
