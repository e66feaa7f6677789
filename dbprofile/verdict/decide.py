"""The decision: ``judge`` applies the rules (dbprofile.verdict.reasons) to the evidence
(dbprofile.verdict.evidence) and returns a ``Verdict``; ``judge_into`` stores it on a run
once, when the run ends. The package docstring gives the decisions and what each means."""

from __future__ import annotations

from dbprofile.results import Plan, Reason, RunResult, Verdict
from dbprofile.units import format_bytes
from dbprofile.verdict.evidence import Row, cheapest_row, compute_ratio, row_fits, situation_of
from dbprofile.verdict.reasons import (
    gflops_text,
    pct,
    pct_against,
    quality_risk,
    reason_composition,
    reason_compute_table,
    reason_costs,
    reason_db_overhead,
    reason_failures,
    reason_fit,
    reason_measured_times,
    reason_parallel,
    reason_quality,
    reason_state_bound,
)
from dbprofile.verdict.thresholds import (
    ACTIVATION_BOUND_SHARE,
    COMPUTE_MARGIN,
    HIGH_RISK_MIN_BLOCKS,
    MIN_SAVING_FRACTION,
    NOT_NEEDED_HEADROOM,
    STATE,
    STATE_BOUND_SHARE,
)
from dbprofile.vocabulary import Decision


def judge(
    result: RunResult | Plan,
    capacity_bytes: int | str | None = None,
    *,
    from_checkpoint: bool | None = None,
    devices: int | None = None,
) -> Verdict:
    """Apply the rules to a measured run or a plan. ``capacity_bytes`` (bytes, or a size such as
    '24GiB') overrides the target's capacity,
    ``from_checkpoint`` and ``devices`` the situation stored in the result (training from scratch and
    the plan's world size by default)."""
    rows, s = situation_of(result, capacity_bytes, from_checkpoint, devices)
    reasons = reason_failures(rows)
    ok = [r for r in rows if r.ok]
    if not ok:
        return Verdict(
            decision="inconclusive",
            headline="Inconclusive: no measurement succeeded, so there is nothing to compare.",
            reasons=reasons,
        )
    by_name = {r.technique: r for r in ok}
    e2e, ckpt = by_name.get("e2e"), by_name.get("ckpt")
    dbs = [r for r in ok if r.blocks is not None]
    others = [r for r in ok if r.blocks is None]
    base = e2e or ckpt or ok[0]
    reasons.append(reason_composition(base))
    if s.capacity is not None:
        reasons.append(reason_fit(ok, s))
    table = reason_compute_table(ok, e2e)
    if table is not None:
        reasons.append(table)

    def verdict(decision: Decision, headline: str, recommended: str | None, best: Row | None = None) -> Verdict:
        return Verdict(
            decision=decision,
            headline=headline,
            reasons=reasons,
            best_technique=best.technique if best is not None else None,
            recommended=recommended,
            batch_size=s.batch_size,
            capacity_bytes=s.capacity,
        )

    # Not needed: end-to-end already fits with room to spare.
    if e2e is not None and s.capacity is not None and s.capacity - e2e.required >= NOT_NEEDED_HEADROOM * s.capacity:
        spare = s.capacity - e2e.required
        reasons.append(
            Reason(
                rule="fits-e2e",
                sentence=(
                    f"e2e already fits on {s.target} with {format_bytes(spare)} ({pct_against(spare / s.capacity, NOT_NEEDED_HEADROOM)}) to spare "
                    f"(threshold {pct(NOT_NEEDED_HEADROOM)}); no memory technique is needed unless the batch size or the "
                    "depth grows."
                ),
                numbers={
                    "e2e_required_bytes": e2e.required,
                    "capacity_bytes": s.capacity,
                    "headroom_bytes": spare,
                    "threshold": NOT_NEEDED_HEADROOM,
                },
            )
        )
        return verdict(
            "not-needed", f"Not needed: e2e already fits on {s.target} with {format_bytes(spare)} to spare.", "e2e"
        )
    if e2e is not None and s.capacity is not None and e2e.required <= s.capacity:
        spare = s.capacity - e2e.required
        reasons.append(
            Reason(
                rule="e2e-tight",
                sentence=(
                    f"e2e fits on {s.target} with only {format_bytes(spare)} ({pct_against(spare / s.capacity, NOT_NEEDED_HEADROOM)}) to spare, below "
                    f"the {pct(NOT_NEEDED_HEADROOM)} headroom a fit needs to be safe; it is weighed as not fitting."
                ),
                numbers={"e2e_required_bytes": e2e.required, "headroom_bytes": spare, "threshold": NOT_NEEDED_HEADROOM},
            )
        )
    elif e2e is not None and s.capacity is not None and e2e.max_batch_size is not None and s.batch_size:
        reasons.append(
            Reason(
                rule="e2e-does-not-fit",
                sentence=(
                    f"e2e does not fit at batch size {s.batch_size}: the largest that fits on {s.target} is "
                    f"{e2e.max_batch_size}."
                ),
                numbers={"batch_size": s.batch_size, "e2e_max_batch_size": e2e.max_batch_size},
            )
        )

    # The alternative when DiffusionBlocks is not chosen: the cheapest non-DiffusionBlocks technique that
    # fits safely (e2e only with headroom, handled above), so ckpt or a ckpt:k.
    fallback = cheapest_row([r for r in others if r is not e2e and row_fits(r, s)])
    fallback_name = fallback.technique if fallback is not None else None
    instead = (
        f"train with {fallback.technique} ({format_bytes(fallback.required)})"
        if fallback is not None
        else "nothing else fits either: lower the batch size or shard the state (ZeRO-3 / FSDP)"
    )

    par = reason_parallel(ok, s)
    if par is not None:
        reasons.append(par)

    if s.from_checkpoint:
        reasons.append(
            Reason(
                rule="from-checkpoint",
                sentence=(
                    "The team keeps an existing end-to-end checkpoint: DiffusionBlocks trains its blocks as denoisers with "
                    "AdaLN-Zero conditioning from scratch, and the paper describes no way to convert an end-to-end model; "
                    f"so {instead}."
                ),
                numbers={"from_checkpoint": True, "recommended": fallback_name},
            )
        )
        return verdict(
            "not-worth-it",
            f"Not worth it when keeping an end-to-end checkpoint: DiffusionBlocks trains from scratch; {instead}.",
            fallback_name,
        )

    if not dbs and s.db_not_applicable:
        # What to train instead: e2e where it fits (or nothing says it does not), else the fallback.
        keep = e2e if e2e is not None and (s.capacity is None or row_fits(e2e, s)) else fallback
        reasons.append(
            Reason(
                rule="db-not-applicable",
                sentence=f"DiffusionBlocks does not apply to this model, so it was not measured: {s.db_not_applicable}",
                numbers={"recommended": keep.technique if keep is not None else None},
            )
        )
        what = f"train with {keep.technique} ({format_bytes(keep.required)})" if keep is not None else instead
        return verdict(
            "not-worth-it",
            f"Not applicable: DiffusionBlocks cannot train this model as it is; {what}.",
            keep.technique if keep is not None else None,
        )
    if not dbs:
        return verdict(
            "inconclusive", "Inconclusive: no DiffusionBlocks configuration was measured successfully.", fallback_name
        )

    usable = [r for r in dbs if "parallel" not in r.variants or (r.blocks or 0) <= s.devices]
    fitting = [r for r in usable if row_fits(r, s)]

    # State-bound: what dominates is what plain DiffusionBlocks keeps resident. Judged on the e2e
    # composition only: under ckpt or DiffusionBlocks the state is a larger share by construction.
    if base is e2e and e2e.frac(*STATE) >= STATE_BOUND_SHARE and e2e.frac("activations") < ACTIVATION_BOUND_SHARE:
        sharded = [r for r in fitting if "offload" in r.variants or "parallel" in r.variants]
        reasons.append(reason_state_bound(e2e, sharded))
        if (
            not sharded
            or fallback is not None
            or any("offload" not in r.variants and "parallel" not in r.variants for r in fitting)
        ):
            return verdict(
                "not-worth-it",
                f"Not worth it: parameters, gradients and optimizer state are {pct(e2e.frac(*STATE))} of the e2e peak "
                f"and DiffusionBlocks leaves them resident; shard (ZeRO), offload or use an 8-bit optimizer"
                + (f", or {instead}." if fallback is not None else "."),
                fallback_name,
            )
        fitting = sharded  # only a configuration that moves state off the device fits
    elif base is e2e and e2e.frac("activations") >= ACTIVATION_BOUND_SHARE:
        reasons.append(
            Reason(
                rule="activation-bound",
                sentence=(
                    f"Activation-bound: activations are {pct_against(e2e.frac('activations'), ACTIVATION_BOUND_SHARE)} of the e2e peak (threshold "
                    f"{pct(ACTIVATION_BOUND_SHARE)}), the memory DiffusionBlocks divides by about B."
                ),
                numbers={"activations_fraction": e2e.frac("activations"), "threshold": ACTIVATION_BOUND_SHARE},
            )
        )

    if not fitting:
        smallest = min(usable or dbs, key=lambda r: r.required)
        reasons.extend([reason_quality(smallest, s.task), reason_costs(smallest)])
        return verdict(
            "not-worth-it",
            f"Not worth it on {s.target}: no DiffusionBlocks configuration fits (the smallest, {smallest.technique}, "
            f"needs {format_bytes(smallest.required)}); {instead}.",
            fallback_name,
            smallest,
        )

    acceptable = [r for r in fitting if quality_risk(r.blocks or 1) != "high"]
    if not acceptable:
        best = min(fitting, key=lambda r: r.blocks or 0)
        reasons.extend([reason_quality(best, s.task), reason_costs(best)])
        return verdict(
            "not-worth-it",
            f"Not worth it: only B >= {HIGH_RISK_MIN_BLOCKS} fits ({best.technique}), where the paper's quality was "
            f"worse than end-to-end on both image ablations; {instead}.",
            fallback_name,
            best,
        )

    # Least quality risk first, then the fewest blocks (fewest extra block-steps), then the fewest FLOPs.
    # +ckpt only when nothing without recomputation fits: it pays checkpointing's recomputation on top.
    def preference(r: Row) -> tuple:
        risk = ("low", "elevated").index(quality_risk(r.blocks or 1))
        return ("ckpt" in r.variants, risk, r.blocks or 0, r.flops_per_sample or 0.0, r.required)

    best = min(acceptable, key=preference)
    for extra in (reason_db_overhead(best, e2e, s.task), reason_measured_times(best, e2e, ckpt)):
        if extra is not None:
            reasons.append(extra)
    reasons.extend([reason_quality(best, s.task), reason_costs(best)])

    if s.capacity is None and e2e is not None and e2e.required:
        saving = 1 - best.required / e2e.required
        reasons.append(
            Reason(
                rule="memory",
                sentence=(
                    f"{best.technique} cuts the peak from {format_bytes(e2e.required)} to "
                    f"{format_bytes(best.required)} ({pct_against(saving, MIN_SAVING_FRACTION)} less; threshold {pct(MIN_SAVING_FRACTION)} "
                    "with no target capacity)."
                ),
                numbers={"technique": best.technique, "saving_fraction": saving, "threshold": MIN_SAVING_FRACTION},
            )
        )
        if saving < MIN_SAVING_FRACTION:
            return verdict(
                "not-worth-it",
                f"Not worth it: {best.technique} saves only {pct_against(saving, MIN_SAVING_FRACTION)} of the e2e peak "
                f"(threshold {pct(MIN_SAVING_FRACTION)}).",
                fallback_name or "e2e",
                best,
            )

    # Compute against checkpointing, the alternative that also fits.
    rival = fallback if fallback is not None and fallback.flops_per_sample is not None else None
    db_vs = compute_ratio(best, rival)
    if rival is not None and db_vs is not None and db_vs > 1 - COMPUTE_MARGIN:
        more = f"{pct(db_vs - 1)} more" if db_vs >= 1 else f"only {pct_against(1 - db_vs, COMPUTE_MARGIN)} less"
        reasons.append(
            Reason(
                rule="costlier-than-ckpt",
                sentence=(
                    f"{best.technique} trains a sample with {gflops_text(best.flops_per_sample or 0)} against "
                    f"{rival.technique}'s {gflops_text(rival.flops_per_sample or 0)}: {db_vs:.2f}x, {more} (it must be at least "
                    f"{pct(COMPUTE_MARGIN)} less to be worth a new training method)."
                ),
                numbers={
                    "technique": best.technique,
                    "rival": rival.technique,
                    "vs_rival": db_vs,
                    "margin": COMPUTE_MARGIN,
                },
            )
        )
        return verdict(
            "not-worth-it",
            f"Not worth it: {rival.technique} fits ({format_bytes(rival.required)}) and trains a sample with "
            f"{1 / db_vs:.2f}x the FLOPs of {best.technique} ({format_bytes(best.required)}), which costs {db_vs:.2f}x "
            f"{rival.technique}'s compute; train with {rival.technique}.",
            rival.technique,
            best,
        )

    e2e_part = f"e2e needs {format_bytes(e2e.required)}" if e2e is not None else "e2e was not measured"
    if rival is not None and db_vs is not None:
        compute_part = (
            f"and trains a sample with {db_vs:.2f}x the FLOPs of {rival.technique} "
            f"({pct_against(1 - db_vs, COMPUTE_MARGIN)} less; margin {pct(COMPUTE_MARGIN)})"
        )
    elif fallback is None and "ckpt" not in best.variants:
        compute_part = "and no checkpointing configuration fits"
    elif fallback is None:
        compute_part = "and it is the only configuration that fits"
    else:
        compute_part = "(FLOPs not counted in this input)"
    risk = quality_risk(best.blocks or 1)
    risk_part = (
        f"B={best.blocks} is in the paper's low-risk range"
        if risk == "low"
        else f"B={best.blocks} carries {risk} quality risk in the paper's ablations: check quality"
    )
    target = f" on {s.target}" if s.capacity is not None else ""
    reasons.append(
        Reason(
            rule="adopt",
            sentence=(
                f"Training from scratch, {best.technique} fits{target} at {format_bytes(best.required)} "
                f"{compute_part}; {risk_part}."
            ),
            numbers={
                "technique": best.technique,
                "required_bytes": best.required,
                "vs_ckpt": db_vs,
                "risk": risk,
                "margin": COMPUTE_MARGIN,
            },
        )
    )
    return verdict(
        "adopt",
        f"Adopt DiffusionBlocks {best.technique}: {e2e_part}; {best.technique} fits{target} at "
        f"{format_bytes(best.required)} {compute_part}; {risk_part}.",
        best.technique,
        best,
    )


def judge_into(result: RunResult) -> RunResult:
    """Judge ``result`` once and store the verdict on it (``result.verdict``). A rule that fails
    must not cost the measurements: the verdict is then None and ``verdict_error`` says why."""
    try:
        result.verdict, result.verdict_error = judge(result), None
    except Exception as err:  # noqa: BLE001 - the measurements are the result; the verdict is an extra
        result.verdict, result.verdict_error = None, f"the verdict could not be computed ({type(err).__name__}: {err})"
    return result
