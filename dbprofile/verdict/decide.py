"""The decision: ``judge`` applies the rules (dbprofile.verdict.reasons) to the evidence
(dbprofile.verdict.evidence) and returns a ``Verdict``; ``judge_into`` stores it on a run
once, when the run ends. The package docstring gives the decisions and what each means.

``judge`` runs in stages: the evidence every verdict states; "not needed" when e2e fits with
headroom; the best alternative to DiffusionBlocks that trains the batch (dbprofile.verdict.
alternatives: e2e with gradient accumulation, selective checkpointing, activation offloading,
checkpointing); the team's situation (an end-to-end checkpoint to keep); and DiffusionBlocks
weighed against that alternative (``weigh_diffusion_blocks``)."""

from __future__ import annotations

from dataclasses import dataclass

from dbprofile.results import Plan, Reason, RunResult, Verdict
from dbprofile.units import format_bytes
from dbprofile.verdict.alternatives import Option, best_of, cost_ratio, option_of, reason_alternatives
from dbprofile.verdict.evidence import Row, Situation, row_fits, situation_of
from dbprofile.verdict.reasons import (
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


@dataclass
class Case:
    """What every stage reads: the situation, the rows that succeeded, the reasons so far, and the
    best alternative to DiffusionBlocks (with the sentence that recommends it)."""

    s: Situation
    ok: list[Row]
    reasons: list[Reason]
    e2e: Row | None = None
    ckpt: Row | None = None
    alternative: Option | None = None
    instead: str = ""

    @property
    def dbs(self) -> list[Row]:
        return [r for r in self.ok if r.blocks is not None]

    @property
    def others(self) -> list[Row]:
        return [r for r in self.ok if r.blocks is None]

    def verdict(
        self, decision: Decision, headline: str, recommended: Option | str | None, best: Row | None = None
    ) -> Verdict:
        option = recommended if isinstance(recommended, Option) else None
        return Verdict(
            decision=decision,
            headline=headline,
            reasons=self.reasons,
            best_technique=best.technique if best is not None else None,
            recommended=option.technique if option is not None else recommended,  # type: ignore[arg-type]
            recommended_micro_batch=option.micro_batch if option is not None else None,
            recommended_accumulation_steps=option.steps if option is not None else None,
            batch_size=self.s.batch_size,
            capacity_bytes=self.s.capacity,
        )


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
    case = Case(s=s, ok=ok, reasons=reasons, e2e=by_name.get("e2e"), ckpt=by_name.get("ckpt"))
    state_evidence(case)
    done = not_needed(case)
    if done is not None:
        return done
    choose_alternative(case)
    par = reason_parallel(ok, s)
    if par is not None:
        reasons.append(par)
    if s.from_checkpoint:
        return keep_checkpoint(case)
    if not case.dbs:
        return without_diffusion_blocks(case)
    return weigh_diffusion_blocks(case)


def state_evidence(case: Case) -> None:
    """The e2e composition, what fits on the target, and the compute table."""
    base = case.e2e or case.ckpt or case.ok[0]
    case.reasons.append(reason_composition(base))
    if case.s.capacity is not None:
        case.reasons.append(reason_fit(case.ok, case.s))
    table = reason_compute_table(case.ok, case.e2e)
    if table is not None:
        case.reasons.append(table)


def not_needed(case: Case) -> Verdict | None:
    """e2e fits with headroom: nothing is needed. Otherwise say how e2e misses (tight, or too big)."""
    e2e, s = case.e2e, case.s
    if e2e is None or s.capacity is None:
        return None
    spare = s.capacity - e2e.required
    if spare >= NOT_NEEDED_HEADROOM * s.capacity:
        case.reasons.append(
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
        option = Option(e2e, e2e.batch_size, 1, e2e.required, e2e.flops_per_sample)
        return case.verdict(
            "not-needed", f"Not needed: e2e already fits on {s.target} with {format_bytes(spare)} to spare.", option
        )
    if spare >= 0:
        case.reasons.append(
            Reason(
                rule="e2e-tight",
                sentence=(
                    f"e2e fits on {s.target} with only {format_bytes(spare)} ({pct_against(spare / s.capacity, NOT_NEEDED_HEADROOM)}) to spare, below "
                    f"the {pct(NOT_NEEDED_HEADROOM)} headroom a fit needs to be safe; it is weighed as not fitting."
                ),
                numbers={"e2e_required_bytes": e2e.required, "headroom_bytes": spare, "threshold": NOT_NEEDED_HEADROOM},
            )
        )
    elif e2e.max_batch_size is not None and s.batch_size:
        case.reasons.append(
            Reason(
                rule="e2e-does-not-fit",
                sentence=(
                    f"e2e does not fit at batch size {s.batch_size}: the largest that fits on {s.target} is "
                    f"{e2e.max_batch_size}."
                ),
                numbers={"batch_size": s.batch_size, "e2e_max_batch_size": e2e.max_batch_size},
            )
        )
    return None


def choose_alternative(case: Case) -> None:
    """The best technique other than DiffusionBlocks that trains the batch on the target. e2e's plain
    step counts only with headroom (not_needed), so e2e appears here only accumulating."""
    options = [o for r in case.others if (o := option_of(r, case.s, plain=r is not case.e2e)) is not None]
    case.alternative = best_of(options)
    if case.s.capacity is not None or options:
        case.reasons.append(reason_alternatives(options, case.alternative, case.e2e, case.s))
    case.instead = (
        f"train with {case.alternative.described}"
        if case.alternative is not None
        else "nothing else fits either: lower the batch size or shard the state (ZeRO-3 / FSDP)"
    )


def keep_checkpoint(case: Case) -> Verdict:
    alt = case.alternative
    case.reasons.append(
        Reason(
            rule="from-checkpoint",
            sentence=(
                "The team keeps an existing end-to-end checkpoint: DiffusionBlocks trains its blocks as denoisers with "
                "AdaLN-Zero conditioning from scratch, and the paper describes no way to convert an end-to-end model; "
                f"so {case.instead}."
            ),
            numbers={"from_checkpoint": True, "recommended": alt.technique if alt else None},
        )
    )
    return case.verdict(
        "not-worth-it",
        f"Not worth it when keeping an end-to-end checkpoint: DiffusionBlocks trains from scratch; {case.instead}.",
        alt,
    )


def without_diffusion_blocks(case: Case) -> Verdict:
    """No DiffusionBlocks measurement: the model cannot be trained that way (a run that left it out
    says why), or every configuration failed."""
    s, e2e = case.s, case.e2e
    if not s.db_not_applicable:
        return case.verdict(
            "inconclusive",
            "Inconclusive: no DiffusionBlocks configuration was measured successfully.",
            case.alternative,
        )
    # What to train instead: e2e where it fits (or nothing says it does not), else the best alternative.
    if e2e is not None and (s.capacity is None or row_fits(e2e, s)):
        keep: Option | None = Option(e2e, e2e.batch_size, 1, e2e.required, e2e.flops_per_sample)
    else:
        keep = case.alternative
    case.reasons.append(
        Reason(
            rule="db-not-applicable",
            sentence=f"DiffusionBlocks does not apply to this model, so it was not measured: {s.db_not_applicable}",
            numbers={"recommended": keep.technique if keep is not None else None},
        )
    )
    what = f"train with {keep.described}" if keep is not None else case.instead
    return case.verdict(
        "not-worth-it", f"Not applicable: DiffusionBlocks cannot train this model as it is; {what}.", keep
    )


def preference(o: Option) -> tuple:
    """Least quality risk first, then the fewest blocks (fewest extra block-steps), the fewest
    micro-batches, the fewest FLOPs. +ckpt only when nothing without recomputation fits: it pays
    checkpointing's recomputation on top."""
    r = o.row
    risk = ("low", "elevated").index(quality_risk(r.blocks or 1))
    return ("ckpt" in r.variants, risk, r.blocks or 0, o.steps, r.flops_per_sample or 0.0, o.required)


def weigh_diffusion_blocks(case: Case) -> Verdict:
    s, e2e, reasons, alt = case.s, case.e2e, case.reasons, case.alternative
    usable = [r for r in case.dbs if "parallel" not in r.variants or (r.blocks or 0) <= s.devices]
    fitting = [o for r in usable if (o := option_of(r, s)) is not None]
    base = e2e or case.ckpt or case.ok[0]

    # State-bound: what dominates is what plain DiffusionBlocks keeps resident. Judged on the e2e
    # composition only: under ckpt or DiffusionBlocks the state is a larger share by construction.
    if base is e2e and e2e.frac(*STATE) >= STATE_BOUND_SHARE and e2e.frac("activations") < ACTIVATION_BOUND_SHARE:
        sharded = [o for o in fitting if "offload" in o.row.variants or "parallel" in o.row.variants]
        reasons.append(reason_state_bound(e2e, [o.row for o in sharded]))
        if not sharded or alt is not None or any(o not in sharded for o in fitting):
            return case.verdict(
                "not-worth-it",
                f"Not worth it: parameters, gradients and optimizer state are {pct(e2e.frac(*STATE))} of the e2e peak "
                f"and DiffusionBlocks leaves them resident; shard (ZeRO), offload or use an 8-bit optimizer"
                + (f", or {case.instead}." if alt is not None else "."),
                alt,
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
        smallest = min(usable or case.dbs, key=lambda r: r.required)
        reasons.extend([reason_quality(smallest, s.task), reason_costs(smallest)])
        return case.verdict(
            "not-worth-it",
            f"Not worth it on {s.target}: no DiffusionBlocks configuration fits (the smallest, {smallest.technique}, "
            f"needs {format_bytes(smallest.required)}); {case.instead}.",
            alt,
            smallest,
        )

    acceptable = [o for o in fitting if quality_risk(o.row.blocks or 1) != "high"]
    if not acceptable:
        worst = min(fitting, key=lambda o: o.row.blocks or 0).row
        reasons.extend([reason_quality(worst, s.task), reason_costs(worst)])
        return case.verdict(
            "not-worth-it",
            f"Not worth it: only B >= {HIGH_RISK_MIN_BLOCKS} fits ({worst.technique}), where the paper's quality was "
            f"worse than end-to-end on both image ablations; {case.instead}.",
            alt,
            worst,
        )
    best = min(acceptable, key=preference)
    for extra in (reason_db_overhead(best.row, e2e, s.task), reason_measured_times(best.row, e2e, case.ckpt)):
        if extra is not None:
            reasons.append(extra)
    reasons.extend([reason_quality(best.row, s.task), reason_costs(best.row)])
    small = too_small_saving(case, best)
    if small is not None:
        return small
    return compare_with_alternative(case, best)


def too_small_saving(case: Case, best: Option) -> Verdict | None:
    """With no capacity to fit, DiffusionBlocks must cut the e2e peak by MIN_SAVING_FRACTION."""
    e2e = case.e2e
    if case.s.capacity is not None or e2e is None or not e2e.required:
        return None
    saving = 1 - best.required / e2e.required
    case.reasons.append(
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
    if saving >= MIN_SAVING_FRACTION:
        return None
    return case.verdict(
        "not-worth-it",
        f"Not worth it: {best.technique} saves only {pct_against(saving, MIN_SAVING_FRACTION)} of the e2e peak "
        f"(threshold {pct(MIN_SAVING_FRACTION)}).",
        case.alternative or "e2e",
        best.row,
    )


def compare_with_alternative(case: Case, best: Option) -> Verdict:
    """Adopt DiffusionBlocks only when it trains a sample with COMPUTE_MARGIN less compute than the
    best alternative that fits (or when nothing else fits)."""
    s, e2e, rival = case.s, case.e2e, case.alternative
    db_vs = cost_ratio(best, rival)
    if db_vs is None and rival is not None and rival.technique == "e2e":
        # FLOPs not counted (a stand-in measurement), but the comparison needs none: DiffusionBlocks runs
        # the stem and the head in every block-step, so it never trains a sample with fewer FLOPs than e2e.
        case.reasons.append(
            Reason(
                rule="costlier-than-alternative",
                sentence=(
                    f"{rival.label} trains the batch, and DiffusionBlocks never trains a sample with fewer FLOPs than "
                    "e2e (its stem and head run in every block-step)."
                ),
                numbers={"technique": best.technique, "rival": rival.technique, "vs_rival": None},
            )
        )
        return case.verdict(
            "not-worth-it",
            f"Not worth it: {rival.described} trains the batch; train with {rival.label}.",
            rival,
            best.row,
        )
    if rival is not None and db_vs is not None and db_vs > 1 - COMPUTE_MARGIN:
        more = f"{pct(db_vs - 1)} more" if db_vs >= 1 else f"only {pct_against(1 - db_vs, COMPUTE_MARGIN)} less"
        case.reasons.append(
            Reason(
                rule="costlier-than-alternative",
                sentence=(
                    f"{best.label} trains a sample with {db_vs:.2f}x the compute of {rival.label}, {more} (it must be "
                    f"at least {pct(COMPUTE_MARGIN)} less to be worth a new training method)."
                ),
                numbers={
                    "technique": best.technique,
                    "rival": rival.technique,
                    "rival_micro_batch": rival.micro_batch,
                    "rival_accumulation_steps": rival.steps,
                    "vs_rival": db_vs,
                    "margin": COMPUTE_MARGIN,
                },
            )
        )
        return case.verdict(
            "not-worth-it",
            f"Not worth it: {rival.described} trains the batch with {1 / db_vs:.2f}x the compute per sample of "
            f"{best.described}; train with {rival.label}.",
            rival,
            best.row,
        )
    e2e_part = f"e2e needs {format_bytes(e2e.required)}" if e2e is not None else "e2e was not measured"
    if rival is not None and db_vs is not None:
        compute_part = (
            f"and trains a sample with {db_vs:.2f}x the compute of {rival.described}, the best alternative "
            f"({pct_against(1 - db_vs, COMPUTE_MARGIN)} less; margin {pct(COMPUTE_MARGIN)})"
        )
    elif rival is None:
        compute_part = (
            "and nothing else fits" if "ckpt" not in best.row.variants else "and it is the only configuration that fits"
        )
    else:
        compute_part = "(FLOPs not counted in this input)"
    risk = quality_risk(best.row.blocks or 1)
    risk_part = (
        f"B={best.row.blocks} is in the paper's low-risk range"
        if risk == "low"
        else f"B={best.row.blocks} carries {risk} quality risk in the paper's ablations: check quality"
    )
    target = f" on {s.target}" if s.capacity is not None else ""
    case.reasons.append(
        Reason(
            rule="adopt",
            sentence=f"Training from scratch, {best.label} fits{target} at {format_bytes(best.required)} {compute_part}; {risk_part}.",
            numbers={
                "technique": best.technique,
                "required_bytes": best.required,
                "vs_rival": db_vs,
                "rival": rival.technique if rival else None,
                "risk": risk,
                "margin": COMPUTE_MARGIN,
            },
        )
    )
    return case.verdict(
        "adopt",
        f"Adopt DiffusionBlocks {best.label}: {e2e_part}; {best.technique} fits{target} at "
        f"{format_bytes(best.required)} {compute_part}; {risk_part}.",
        best,
        best.row,
    )


def judge_into(result: RunResult) -> RunResult:
    """Judge ``result`` once and store the verdict on it (``result.verdict``). A rule that fails
    must not cost the measurements: the verdict is then None and ``verdict_error`` says why."""
    try:
        result.verdict, result.verdict_error = judge(result), None
    except Exception as err:  # noqa: BLE001 - the measurements are the result; the verdict is an extra
        result.verdict, result.verdict_error = None, f"the verdict could not be computed ({type(err).__name__}: {err})"
    return result
