"""The adoption rules (dbprofile.verdict): each decision and its recommended technique, the numbers
in its sentences, and failed measurements.

Two kinds of input: hand-made rows for situations a tiny model cannot produce (state-bound,
B >= 6, block-parallel), and real fake-tensor plans of the tiny presets judged at capacities
placed between their predicted figures, so every expectation is derived from the rules and the
predictions, never from today's byte counts."""

from __future__ import annotations

import pytest

from dbprofile.planner import plan
from dbprofile.results import Measurement, Plan, PlanEntry, RunResult
from dbprofile.verdict import (
    ACTIVATION_BOUND_SHARE,
    COMPUTE_MARGIN,
    HIGH_RISK_MIN_BLOCKS,
    LOW_RISK_MAX_BLOCKS,
    MAX_RATIO_NOISE,
    MIN_SAVING_FRACTION,
    NOT_NEEDED_HEADROOM,
    STATE_BOUND_SHARE,
    judge,
    quality_risk,
    ratio_is_clear,
)

GiB = 1024**3
GFLOP = 10**9


def _rule(verdict, name):
    found = [r for r in verdict.reasons if r.rule == name]
    assert found, f"rule {name} did not fire: {[r.rule for r in verdict.reasons]}"
    return found[0]


def _fired(verdict) -> set[str]:
    return {r.rule for r in verdict.reasons}


# ---------------------------------------------------------------- hand-made rows


def _m(
    technique,
    params=0,
    grads=0,
    opt=0,
    act=0,
    tmp=0,
    status="ok",
    gflops=None,
    time=None,
    iqr=None,
    block_time=None,
    extra=None,
):
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
        training_flops=None if gflops is None else int(gflops * GFLOP * 64),
        step_time_s=time,
        step_time_iqr_s=iqr,
        block_steps_time_s=block_time,
        num_parameters=1_000_000_000 + (extra or 0),
        extra_parameters=extra,
    )


def _activation_bound_run() -> RunResult:
    # e2e 61 GiB (70% activations), ckpt 36 GiB, db:2 38 GiB, db:4 24.9 GiB. FLOPs per sample as a
    # ViT's: ckpt 1.22x e2e, DiffusionBlocks about 1.01x.
    return RunResult(
        model="dit-xl2",
        model_info={"task": "denoising"},
        measurements=[
            _m("e2e", 4, 4, 8, 43, 2, gflops=100),
            _m("ckpt", 4, 4, 8, 18, 2, gflops=122),
            _m("db:2", 4, 2, 8, 22, 2, gflops=101, extra=30_000_000),
            _m("db:4", 4, 1, 8, 9.9, 2, gflops=102, extra=30_000_000),
        ],
    )


def _as_plan(run: RunResult, capacity: int | None, devices: int = 1, **kwargs) -> Plan:
    entries = [
        PlanEntry(
            technique=m.technique,
            batch_size=m.batch_size,
            status=m.status,
            error=m.error,
            tracked_peak_bytes=m.peak_bytes,
            shares=m.shares,
            peak_bytes=m.peak_bytes,
            num_parameters=m.num_parameters,
            extra_parameters=m.extra_parameters,
            training_flops=m.training_flops,
            flops_per_sample=m.flops_per_sample,
            world_size=int(m.technique[3:].split("+")[0]) if "parallel" in m.technique else 1,
        )
        for m in run.measurements
    ]
    return Plan(
        model=run.model,
        model_info=run.model_info,
        device="custom",
        capacity_bytes=capacity,
        batch_size=64,
        world_size=devices,
        entries=entries,
        **kwargs,
    )


def test_adopt_needs_e2e_not_fitting_a_low_risk_b_fitting_and_less_compute_than_ckpt():
    verdict = judge(_activation_bound_run(), capacity_bytes=40 * GiB)
    # e2e 61 GiB does not fit 40 GiB; ckpt (36) and db:2 (38) and db:4 (24.9) fit; db:2 is the lowest
    # low-risk B, and 101 / 122 = 0.83 < 1 - COMPUTE_MARGIN.
    assert verdict.decision == "adopt" and verdict.recommended == verdict.best_technique == "db:2"
    assert 101 / 122 < 1 - COMPUTE_MARGIN and quality_risk(2) == "low"
    adopt = _rule(verdict, "adopt")
    assert adopt.numbers["vs_rival"] == pytest.approx(101 / 122)
    assert "0.83x the compute of ckpt (36.00 GiB), the best alternative (17% less; margin 10%)" in verdict.headline
    assert "e2e needs 61.00 GiB" in verdict.headline and "at 38.00 GiB" in verdict.headline
    assert _rule(verdict, "activation-bound").numbers["activations_fraction"] == pytest.approx(43 / 61)


def test_compute_table_gives_every_technique_per_sample_and_relative_to_e2e():
    compute = _rule(judge(_activation_bound_run(), capacity_bytes=40 * GiB), "compute")
    assert compute.numbers["flops_per_sample"]["ckpt"] == pytest.approx(122 * GFLOP)
    assert compute.numbers["vs_e2e"]["ckpt"] == pytest.approx(1.22)
    assert compute.numbers["vs_e2e"]["db:4"] == pytest.approx(1.02)
    assert "ckpt 122.0 GFLOP (1.22x e2e)" in compute.sentence


def test_from_a_checkpoint_diffusion_blocks_is_not_worth_it_and_ckpt_is_recommended():
    verdict = judge(_activation_bound_run(), capacity_bytes=40 * GiB, from_checkpoint=True)
    assert verdict.decision == "not-worth-it" and verdict.recommended == "ckpt"
    assert "from scratch" in _rule(verdict, "from-checkpoint").sentence
    assert "train with ckpt (36.00 GiB)" in verdict.headline


def test_diffusion_blocks_costlier_than_ckpt_is_not_worth_it_and_says_by_how_much():
    run = _activation_bound_run()
    run.measurements[2] = _m("db:2", 4, 2, 8, 22, 2, gflops=230, extra=30_000_000)  # a causal LM's 2.3x
    run.measurements[3] = _m("db:4", 4, 1, 8, 9.9, 2, gflops=280, extra=30_000_000)
    run.model_info = {"task": "causal-lm"}
    verdict = judge(run, capacity_bytes=40 * GiB)
    assert verdict.decision == "not-worth-it" and verdict.recommended == "ckpt" and verdict.best_technique == "db:2"
    costlier = _rule(verdict, "costlier-than-alternative")
    assert costlier.numbers["vs_rival"] == pytest.approx(230 / 122)
    assert "1.89x the compute of ckpt, 89% more" in costlier.sentence
    overhead = _rule(verdict, "compute-overhead")
    assert "doubled sequence" in overhead.sentence and "2.30x e2e" in overhead.sentence


def test_a_lead_smaller_than_the_margin_is_not_enough():
    run = _activation_bound_run()
    run.measurements[2] = _m("db:2", 4, 2, 8, 22, 2, gflops=122 * (1 - COMPUTE_MARGIN) + 1, extra=1)
    run.measurements[3] = _m("db:4", 4, 1, 8, 9.9, 2, gflops=122 * (1 - COMPUTE_MARGIN) + 1, extra=1)
    verdict = judge(run, capacity_bytes=40 * GiB)
    assert verdict.decision == "not-worth-it"
    assert "only 9% less" in _rule(verdict, "costlier-than-alternative").sentence


def test_when_ckpt_does_not_fit_a_fitting_diffusion_blocks_is_adopted_whatever_its_compute():
    run = _activation_bound_run()
    run.measurements[3] = _m("db:4", 4, 1, 8, 9.9, 2, gflops=250, extra=1)
    verdict = judge(run, capacity_bytes=30 * GiB)  # only db:4 (24.9) fits
    assert verdict.decision == "adopt" and verdict.recommended == "db:4"
    assert "nothing else fits" in verdict.headline
    assert "elevated quality risk" in verdict.headline  # B=4 sits past the paper's low-risk range
    assert quality_risk(4) == "elevated" and _rule(verdict, "quality-risk").numbers["risk"] == "elevated"


def test_only_high_risk_block_counts_fitting_is_not_worth_it():
    run = RunResult(
        model="m",
        measurements=[
            _m("e2e", 1, 1, 2, 40, 1, gflops=100),
            _m("db:2", 1, 1, 2, 20, 1, gflops=101),
            _m("db:8", 1, 1, 2, 5, 1, gflops=104),
        ],
    )
    verdict = judge(run, capacity_bytes=15 * GiB)
    assert quality_risk(8) == "high" and HIGH_RISK_MIN_BLOCKS <= 8
    assert verdict.decision == "not-worth-it" and verdict.best_technique == "db:8" and verdict.recommended is None
    assert "only B >= 6 fits" in verdict.headline and "lower the batch size or shard" in verdict.headline


def test_db_with_ckpt_is_adopted_only_when_nothing_else_fits():
    rows = [
        _m("e2e", 1, 1, 2, 40, 1, gflops=100),
        _m("db:2", 1, 1, 2, 20, 1, gflops=101),
        _m("db:2+ckpt", 1, 1, 2, 3, 1, gflops=125),
    ]
    verdict = judge(RunResult(model="m", measurements=rows), capacity_bytes=10 * GiB)
    assert verdict.decision == "adopt" and verdict.recommended == "db:2+ckpt"
    assert "only configuration that fits" in verdict.headline
    # With room for plain db:2, the recomputation is not paid.
    assert judge(RunResult(model="m", measurements=rows), capacity_bytes=30 * GiB).recommended == "db:2"


def test_optimizer_bound_model_is_not_worth_it_and_names_the_alternatives():
    run = RunResult(
        model="big",
        measurements=[
            _m("e2e", 10, 10, 40, 3, 1, gflops=100),
            _m("ckpt", 10, 10, 40, 0.5, 1, gflops=122),
            _m("db:4", 10, 3, 40, 1, 1, gflops=102),
        ],
    )
    verdict = judge(run)
    assert verdict.decision == "not-worth-it" and verdict.recommended == "ckpt"
    reason = _rule(verdict, "state-bound")
    assert reason.numbers["optimizer_state_fraction"] == pytest.approx(40 / 64)
    assert reason.numbers["state_fraction"] >= STATE_BOUND_SHARE
    for remedy in ("ZeRO", "offload", "8-bit optimizer"):
        assert remedy in reason.sentence
    assert "resident" in verdict.headline


def test_block_parallel_is_weighed_only_with_b_devices():
    rows = [_m("e2e", 10, 10, 40, 3, 1, gflops=100), _m("db:4+parallel", 3, 1, 10, 1, 1, gflops=102)]
    few = judge(_as_plan(RunResult(model="m", measurements=rows), 30 * GiB, devices=2))
    many = judge(_as_plan(RunResult(model="m", measurements=rows), 30 * GiB, devices=4))
    assert "not weighed" in _rule(few, "block-parallel").sentence
    assert few.decision == "not-worth-it"
    # State-bound, but the only fitting configuration moves the state off the device: adopted.
    assert "weighed with the rest" in _rule(many, "block-parallel").sentence
    assert many.decision == "adopt" and many.recommended == "db:4+parallel"


def test_e2e_that_fits_with_headroom_is_not_needed():
    verdict = judge(_activation_bound_run(), capacity_bytes=80 * GiB)
    assert verdict.decision == "not-needed" and verdict.recommended == "e2e"
    reason = _rule(verdict, "fits-e2e")
    assert reason.numbers["headroom_bytes"] == 80 * GiB - 61 * GiB
    assert "19.00 GiB" in verdict.headline and "batch size or the depth grows" in reason.sentence


def test_e2e_fitting_without_headroom_is_weighed_as_not_fitting():
    capacity = int(61 * GiB / (1 - NOT_NEEDED_HEADROOM / 2))  # 5% free
    verdict = judge(_activation_bound_run(), capacity_bytes=capacity)
    assert "e2e-tight" in _fired(verdict) and verdict.decision == "adopt"


def test_small_saving_without_a_target_is_not_worth_it():
    run = RunResult(model="m", measurements=[_m("e2e", 1, 1, 2, 8, 3), _m("db:2", 1, 1, 2, 6.5, 3)])
    verdict = judge(run)
    assert verdict.decision == "not-worth-it" and verdict.recommended == "e2e"
    assert 1 - 13.5 / 15 < MIN_SAVING_FRACTION
    assert "saves only 10%" in verdict.headline


def test_measured_time_ratio_is_quoted_only_when_the_spread_allows():
    run = _activation_bound_run()
    for m, t in zip(run.measurements, (1.0, 1.3, 0.5, 0.26)):
        m.step_time_s, m.step_time_iqr_s = t, 0.05 * t  # IQR 5% of the median
    run.measurements[2].block_steps_time_s, run.measurements[2].block_steps_time_iqr_s = 1.02, 0.05 * 1.02
    steady = _rule(judge(run, capacity_bytes=40 * GiB), "measured-time")
    assert steady.numbers["db:2_time_ratio"] == pytest.approx(1.02) and "(1.02x)" in steady.sentence
    # ckpt's IQR 35% of its median: with e2e's 5% past MAX_RATIO_NOISE (20%), so no ratio is quoted.
    run.measurements[1].step_time_iqr_s = 0.35 * 1.3
    noisy = _rule(judge(run, capacity_bytes=40 * GiB), "measured-time")
    assert "too noisy" in noisy.sentence and "ckpt 35%" in noisy.sentence
    assert "db:2_time_ratio" not in noisy.numbers


def test_quality_risk_quotes_the_papers_block_ablations():
    run = _activation_bound_run()
    verdict = judge(run, capacity_bytes=30 * GiB)  # db:4 is the only fit
    quality = _rule(verdict, "quality-risk")
    for figure in ("B=1 12.09", "B=2 9.90", "B=3 11.11", "B=4 11.90", "B=6 14.43", "B=4 45.43"):
        assert figure in quality.sentence
    assert "past the paper's best" in quality.sentence and "39.83" in quality.sentence


def test_costs_rule_counts_extra_adaln_parameters_and_says_training_starts_from_scratch():
    costs = _rule(judge(_activation_bound_run(), capacity_bytes=40 * GiB), "costs")
    assert costs.numbers["extra_parameters"] == 30_000_000
    assert costs.numbers["extra_parameters_fraction"] == pytest.approx(0.03)
    assert "30.0 M parameters" in costs.sentence and "from scratch" in costs.sentence


def test_oom_measurements_are_reported_and_the_rest_still_judged():
    run = _activation_bound_run()
    run.measurements[0] = _m("e2e", status="oom")
    verdict = judge(run, capacity_bytes=40 * GiB)
    failed = _rule(verdict, "failed-measurement")
    assert failed.numbers == {"technique": "e2e", "status": "oom", "batch_size": 64}
    assert "ran out of memory" in failed.sentence and "Tried to allocate" in failed.sentence
    assert verdict.decision == "adopt" and verdict.best_technique == "db:2"


def test_every_measurement_failed_is_inconclusive():
    run = RunResult(model="m", measurements=[_m("e2e", status="oom"), _m("db:2", status="error")])
    verdict = judge(run)
    assert verdict.decision == "inconclusive"
    assert len([r for r in verdict.reasons if r.rule == "failed-measurement"]) == 2


def test_plan_and_run_with_the_same_numbers_get_the_same_decision():
    run = _activation_bound_run()
    from_plan, from_run = judge(_as_plan(run, 40 * GiB)), judge(run, capacity_bytes=40 * GiB)
    assert from_plan.decision == from_run.decision == "adopt"
    assert from_plan.recommended == from_run.recommended == "db:2"


def test_a_plans_situation_is_read_from_the_plan():
    assert judge(_as_plan(_activation_bound_run(), 40 * GiB, from_checkpoint=True)).decision == "not-worth-it"


def test_thresholds_are_fractions_and_risk_bands_are_ordered():
    for share in (
        ACTIVATION_BOUND_SHARE,
        STATE_BOUND_SHARE,
        MIN_SAVING_FRACTION,
        COMPUTE_MARGIN,
        NOT_NEEDED_HEADROOM,
        MAX_RATIO_NOISE,
    ):
        assert 0 < share < 1
    assert 2 <= LOW_RISK_MAX_BLOCKS < HIGH_RISK_MIN_BLOCKS


# ---------------------------------------------------------------- decision tables on real predictions


@pytest.fixture(scope="module")
def vit_plan() -> Plan:
    """vit-tiny's predicted peaks and FLOPs (fake tensors, no capacity): the rules are judged below
    at capacities placed between these figures."""
    return plan("vit-tiny", 32, device="cpu", techniques="e2e,ckpt,db:2,db:3", search_max_batch=False)


@pytest.fixture(scope="module")
def gpt_plan() -> Plan:
    # A causal LM's db:2 runs half the layers on twice the sequence: no memory cut; db:3 has one.
    return plan("gpt-tiny", 32, device="cpu", techniques="e2e,ckpt,db:3", search_max_batch=False)


def _need(p: Plan, technique: str) -> int:
    entry = p.get(technique)
    assert entry is not None and entry.ok
    return entry.peak_bytes


def _ratio(p: Plan, a: str, b: str) -> float:
    return p.get(a).flops_per_sample / p.get(b).flops_per_sample


def test_vit_decision_table_from_scratch_and_from_a_checkpoint(vit_plan):
    p = vit_plan
    e2e, ckpt, db2, db3 = (_need(p, t) for t in ("e2e", "ckpt", "db:2", "db:3"))
    # The premises, from the predictions: activation-bound at batch 32, every technique below e2e,
    # ckpt below every DiffusionBlocks B, and a ViT's small head keeps db:B near e2e's compute.
    assert p.get("e2e").share_fraction("activations") >= ACTIVATION_BOUND_SHARE
    assert e2e > max(db2, db3) > ckpt
    assert _ratio(p, "db:2", "ckpt") < 1 - COMPUTE_MARGIN
    # e2e does not fit, every DiffusionBlocks B fits, db:2 is the fewest blocks and beats ckpt's compute.
    between = (max(db2, db3) + e2e) // 2
    adopt = judge(p, capacity_bytes=between)
    assert (adopt.decision, adopt.recommended) == ("adopt", "db:2")
    kept = judge(p, capacity_bytes=between, from_checkpoint=True)
    assert (kept.decision, kept.recommended) == ("not-worth-it", "ckpt")
    # e2e fits with headroom: nothing is needed, whatever the situation.
    roomy = int(e2e / (1 - NOT_NEEDED_HEADROOM)) + 1
    for from_checkpoint in (False, True):
        v = judge(p, capacity_bytes=roomy, from_checkpoint=from_checkpoint)
        assert (v.decision, v.recommended) == ("not-needed", "e2e")
    # Only ckpt fits: no DiffusionBlocks configuration fits.
    squeezed = judge(p, capacity_bytes=(ckpt + min(db2, db3)) // 2)
    assert squeezed.decision == "not-worth-it" and squeezed.recommended == "ckpt"


def test_gpt_decision_table_head_and_doubled_sequence_make_db_costlier_than_ckpt(gpt_plan):
    p = gpt_plan
    e2e, ckpt, db3 = (_need(p, t) for t in ("e2e", "ckpt", "db:3"))
    ratio = _ratio(p, "db:3", "ckpt")
    # The premises, from the predictions: DiffusionBlocks costs more than ckpt per sample, and with a
    # capacity just above both, e2e does not fit.
    assert ratio > 1 - COMPUTE_MARGIN
    capacity = max(db3, ckpt) + 1
    assert e2e > capacity
    verdict = judge(p, capacity_bytes=capacity)
    assert (verdict.decision, verdict.recommended) == ("not-worth-it", "ckpt")
    assert _rule(verdict, "costlier-than-alternative").numbers["vs_rival"] == pytest.approx(ratio)
    assert "doubled sequence" in _rule(verdict, "compute-overhead").sentence


@pytest.mark.slow
@pytest.mark.parametrize("from_checkpoint", [False, True])
def test_vit_l16_on_an_rtx_4090_follows_the_rules_from_its_predicted_figures(from_checkpoint):
    """The issue's first case, planned for real (the fast decision tables cover the same rules):
    e2e misses, but two micro-batches of 32 fit at e2e's compute, which DiffusionBlocks cannot beat."""
    p = plan(
        "vit-l16",
        64,
        device="RTX-4090",
        techniques="e2e,ckpt,db:2,db:3,db:4,db:4+offload",
        from_checkpoint=from_checkpoint,
    )
    e2e, ckpt = p.get("e2e"), p.get("ckpt")
    low_risk = [e for e in p.entries if e.technique in ("db:2", "db:3") and e.fits]
    tight = e2e.peak_bytes > (1 - NOT_NEEDED_HEADROOM) * p.capacity_bytes
    # The premises, from the predictions: e2e does not fit with headroom, a low-risk B fits and beats
    # checkpointing's compute by the margin, and e2e accumulating two micro-batches of 32 fits.
    assert tight and low_risk and (e2e.micro_batch_size, e2e.accumulation_steps) == (32, 2)
    assert low_risk[0].flops_per_sample < (1 - COMPUTE_MARGIN) * ckpt.flops_per_sample
    v = p.verdict
    assert (v.decision, v.recommended, v.recommended_accumulation_steps) == ("not-worth-it", "e2e", 2)


def test_a_time_ratio_is_quoted_at_the_noise_threshold_and_not_past_it():
    assert ratio_is_clear(1.0, 0.1, 2.0, 0.2)  # 10% + 10% = MAX_RATIO_NOISE
    assert not ratio_is_clear(1.0, 0.1, 2.0, 0.21)
    assert not ratio_is_clear(1.0, None, 2.0, 0.0)  # no spread recorded: nothing to judge it by
    assert MAX_RATIO_NOISE == 0.2


def test_a_saving_just_under_the_threshold_is_not_printed_as_the_threshold():
    from dbprofile.verdict.reasons import pct_against

    # The sample report at batch 32 said "saves only 20% of the e2e peak (threshold 20%)" for 19.8%.
    assert pct_against(0.198, 0.2) == "19.8%"
    assert pct_against(0.2, 0.2) == "20%" and pct_against(0.35, 0.2) == "35%"


def test_interleaved_timing_judges_a_ratio_by_its_round_by_round_spread():
    # A machine with two speed states 1.5x apart: every technique's own IQR spans both (about 40%),
    # but ckpt and db:2 were timed in the same rounds as e2e, so their ratios hold round by round.
    states = [1.0, 1.0, 1.5, 1.5, 1.0, 1.5, 1.0, 1.5]
    run = _activation_bound_run()
    for m, ratio in zip(run.measurements, (1.0, 1.3, 1.02, 0.26)):
        rounds = [ratio * s for s in states]
        m.step_time_s, m.step_time_iqr_s = 1.25 * ratio, 0.5 * ratio
        m.extra["timing"] = {"protocol": "interleaved", "round_step_times_s": rounds}
    run.measurements[2].block_steps_time_s, run.measurements[2].block_steps_time_iqr_s = 1.25 * 1.02, 0.5 * 1.02
    steady = _rule(judge(run, capacity_bytes=40 * GiB), "measured-time")
    assert "too noisy" not in steady.sentence and "timed interleaved" in steady.sentence
    assert steady.numbers["db:2_time_ratio"] == pytest.approx(1.02)
    assert steady.numbers["paired_ratio_iqr_fraction"]["db:2"] == pytest.approx(0.0)
    # The same own spreads without shared rounds: the sum of the two IQRs (80%) is too noisy.
    for m in run.measurements:
        m.extra["timing"] = {"protocol": "sequential"}
    apart = _rule(judge(run, capacity_bytes=40 * GiB), "measured-time")
    assert "too noisy" in apart.sentence
    # Shared rounds whose ratios swing (db:2 twice as slow against e2e in half of them): too noisy.
    swinging = [1.02 * s * (2.0 if i % 2 else 1.0) for i, s in enumerate(states)]
    for m in run.measurements:
        m.extra["timing"] = {"protocol": "interleaved", "round_step_times_s": [t * 1.0 for t in states]}
    run.measurements[2].extra["timing"]["round_step_times_s"] = swinging
    swung = _rule(judge(run, capacity_bytes=40 * GiB), "measured-time")
    assert "too noisy" in swung.sentence and "db:2/e2e" in swung.sentence
