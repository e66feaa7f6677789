"""The rules: each turns the evidence into a ``Reason`` (a sentence with its numbers, the numbers
themselves, and the rule's name) or says nothing."""

from __future__ import annotations

import math
from typing import Any

from dbprofile.results import Reason
from dbprofile.spread import paired_ratios, relative_iqr
from dbprofile.units import format_bytes, format_gflop
from dbprofile.verdict.evidence import Row, Situation, compute_ratio
from dbprofile.verdict.thresholds import (
    HIGH_RISK_MIN_BLOCKS,
    LOW_RISK_MAX_BLOCKS,
    MAX_RATIO_NOISE,
    QUALITY_ABLATIONS,
    QUALITY_REPORTED,
    STATE,
    STATE_BOUND_SHARE,
)


def pct(x: float) -> str:
    return f"{round(100 * x)}%"


def pct_against(x: float, threshold: float) -> str:
    """``x`` as a percentage next to a threshold it is compared with: one decimal where whole
    percents would print the two alike (a 19.8% saving is not "20%, threshold 20%")."""
    if x != threshold and round(100 * x) == round(100 * threshold):
        return f"{100 * x:.1f}%"
    return pct(x)


def params_text(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return str(n)


def gflops_text(flops: float) -> str:
    return f"{format_gflop(flops)} GFLOP"


def quality_risk(blocks: int) -> str:
    """'low' | 'elevated' | 'high': where B sits in the paper's block-count ablations."""
    if blocks <= LOW_RISK_MAX_BLOCKS:
        return "low"
    return "high" if blocks >= HIGH_RISK_MIN_BLOCKS else "elevated"


def reason_failures(rows: list[Row]) -> list[Reason]:
    reasons = []
    for r in rows:
        if r.ok:
            continue
        what = {"oom": "ran out of memory", "nan": "produced a non-finite loss"}.get(r.status, "failed")
        detail = f" ({r.error.splitlines()[0][:160]})" if r.error else ""
        reasons.append(
            Reason(
                rule="failed-measurement",
                sentence=f"{r.technique} {what} at batch size {r.batch_size}{detail}; it is left out of the comparison.",
                numbers={"technique": r.technique, "status": r.status, "batch_size": r.batch_size},
            )
        )
    return reasons


def reason_composition(base: Row) -> Reason:
    act = base.frac("activations")
    state = base.frac(*STATE)
    opt = base.frac("optimizer_state")
    sentence = (
        f"At batch size {base.batch_size} the {base.technique} peak is {format_bytes(base.peak)}: activations "
        f"{pct(act)}, parameters + gradients + optimizer state {pct(state)} (optimizer state alone {pct(opt)}), "
        f"temporaries and inputs {pct(base.frac('temporaries', 'inputs'))}."
    )
    return Reason(
        rule="composition",
        sentence=sentence,
        numbers={
            "technique": base.technique,
            "peak_bytes": base.peak,
            "activations_fraction": act,
            "state_fraction": state,
            "optimizer_state_fraction": opt,
        },
    )


def reason_fit(rows: list[Row], s: Situation) -> Reason:
    assert s.capacity is not None
    parts = []
    for r in rows:
        verb = "fits" if r.required <= s.capacity else "does not fit"
        where = f" per device on {r.devices}" if r.devices > 1 else ""
        largest = f", largest batch {r.max_batch_size}" if r.max_batch_size is not None else ""
        if r.required > s.capacity and (r.accumulation_steps or 1) > 1 and r.accumulation_required is not None:
            largest += (
                f"; {r.accumulation_steps} micro-batches of {r.micro_batch_size} fit at "
                f"{format_bytes(r.accumulation_required)}"
            )
        parts.append(f"{r.technique} needs {format_bytes(r.required)}{where} ({verb}{largest})")
    return Reason(
        rule="fit",
        sentence=f"On {s.target} ({format_bytes(s.capacity)}): " + "; ".join(parts) + ".",
        numbers={"capacity_bytes": s.capacity, **{f"{r.technique}_required_bytes": r.required for r in rows}},
    )


def reason_compute_table(rows: list[Row], e2e: Row | None) -> Reason | None:
    """FLOPs per trained sample of every technique, relative to e2e."""
    counted = [r for r in rows if r.flops_per_sample is not None]
    if not counted:
        return None
    parts = []
    for r in counted:
        ratio = compute_ratio(r, e2e)
        rel = f" ({ratio:.2f}x e2e)" if ratio is not None and r is not e2e else ""
        parts.append(f"{r.technique} {gflops_text(r.flops_per_sample or 0)}{rel}")
    return Reason(
        rule="compute",
        sentence=(
            "Compute to train every layer once on one sample (FlopCounterMode: matmuls, convolutions, attention; "
            "DiffusionBlocks counted over its B block-steps): " + ", ".join(parts) + "."
        ),
        numbers={
            "flops_per_sample": {r.technique: r.flops_per_sample for r in counted},
            "vs_e2e": {r.technique: compute_ratio(r, e2e) for r in counted},
        },
    )


def reason_db_overhead(best: Row, e2e: Row | None, task: str | None) -> Reason | None:
    """Why a DiffusionBlocks sample costs what it does: stem/head per block-step, doubled LM sequence."""
    ratio = compute_ratio(best, e2e)
    if ratio is None or best.blocks is None or e2e is None:
        return None
    b = best.blocks
    per_block_step = ratio / b
    why = (
        "the embeddings, the head and the sigma embedder run in every block-step, not once per sample"
        if task != "causal-lm"
        else "the embeddings and the vocabulary-sized head run in every block-step, not once per sample, and each "
        "block runs its layers on a doubled sequence (noisy and clean tokens), which doubles their matmuls "
        "and quadruples their attention"
    )
    return Reason(
        rule="compute-overhead",
        sentence=(
            f"One {best.technique} block-step trains 1/{b} of the layers but costs {per_block_step:.3f}x an e2e step "
            f"per sample (1/{b} = {1 / b:.3f}x), so {b} block-steps cost {ratio:.2f}x e2e: {why}."
        ),
        numbers={"technique": best.technique, "blocks": b, "vs_e2e": ratio, "block_step_vs_e2e": per_block_step},
    )


def reason_measured_times(best: Row, e2e: Row | None, ckpt: Row | None) -> Reason | None:
    """Measured time ratios beside the FLOPs, quoted only when the timings' spread allows it."""
    if e2e is None or not e2e.step_time_s or not best.training_time_s:
        return None

    def noise(r: Row) -> float | None:
        """The timing's interquartile range relative to its median (B block-steps for db:B)."""
        if r.blocks is not None:
            return relative_noise(r.block_steps_time_s or 0.0, r.block_steps_time_iqr_s)
        return relative_noise(r.step_time_s or 0.0, r.step_time_iqr_s)

    compared = [r for r in (best, ckpt) if r is not None and r.training_time_s]
    spreads = {r.technique: noise(r) for r in [e2e, *compared]}
    e2e_noise = spreads[e2e.technique]
    # Timed interleaved (same rounds), a ratio's spread is that of its round-by-round ratios;
    # timed apart, about the sum of the two timings' relative spreads.
    paired = {r.technique: paired_ratio_noise(r.round_step_times_s, e2e.round_step_times_s) for r in compared}
    ratio_noise: dict[str, float | None] = {
        t: paired[t] if paired[t] is not None else (None if v is None or e2e_noise is None else v + e2e_noise)
        for t, v in spreads.items()
        if t != e2e.technique
    }
    numbers: dict[str, Any] = {"iqr_fraction": spreads, "noise_limit": MAX_RATIO_NOISE}
    if any(v is not None for v in paired.values()):
        numbers["paired_ratio_iqr_fraction"] = paired
    if any(v is None or v > MAX_RATIO_NOISE for v in ratio_noise.values()):
        worst = ", ".join(f"{t} {'unknown' if v is None else pct(v)}" for t, v in spreads.items())
        pairs = ", ".join(f"{t}/e2e {pct(v)}" for t, v in paired.items() if v is not None)
        return Reason(
            rule="measured-time",
            sentence=(
                f"Measured step times are too noisy to compare (interquartile range over the timed steps: {worst}"
                + (f"; of the ratios round by round: {pairs}" if pairs else "")
                + f"; a ratio is quoted when its spread is at most {pct(MAX_RATIO_NOISE)}); the FLOPs ratios above "
                "are the estimate."
            ),
            numbers=numbers,
        )
    parts = []
    for r in compared:
        ratio = (r.training_time_s or 0) / e2e.step_time_s
        numbers[f"{r.technique}_time_ratio"] = ratio
        unit = f"{r.blocks} block-steps of {r.technique}" if r.blocks is not None else r.technique
        parts.append(f"{unit} take {r.training_time_s:.4g} s ({ratio:.2f}x)")
    spread = [v for v in paired.values() if v is not None]
    how = (
        f" (timed interleaved, round by round; the ratios' interquartile range is at most {pct(max(spread))})"
        if spread
        else ""
    )
    return Reason(
        rule="measured-time",
        sentence=f"Measured{how}: one e2e step takes {e2e.step_time_s:.4g} s; " + "; ".join(parts) + ".",
        numbers=numbers,
    )


def paired_ratio_noise(times: list[float] | None, e2e_times: list[float] | None) -> float | None:
    """Interleaved timing: the interquartile range of the round-by-round ratios, relative to
    their median. Both techniques ran in the same rounds, so a machine that changes speed for
    tens of seconds moves both sides of each pair alike and leaves the ratio's spread small,
    while each technique's own IQR spans both speeds. None unless both have the same rounds."""
    if not times or not e2e_times or len(times) != len(e2e_times) or len(times) < 2:
        return None
    ratios = paired_ratios(times, e2e_times)
    if len(ratios) < 2:
        return None
    spread = relative_iqr(ratios)
    return spread if math.isfinite(spread) else None


def relative_noise(time_s: float, iqr_s: float | None) -> float | None:
    """The interquartile range relative to the median; None when no spread was recorded."""
    return iqr_s / time_s if iqr_s is not None and time_s > 0 else None


def ratio_is_clear(num_s: float, num_iqr_s: float | None, den_s: float, den_iqr_s: float | None) -> bool:
    """MAX_RATIO_NOISE: both spreads known and together small enough to quote num/den."""
    a, b = relative_noise(num_s, num_iqr_s), relative_noise(den_s, den_iqr_s)
    return a is not None and b is not None and a + b <= MAX_RATIO_NOISE


def reason_quality(best: Row, task: str | None) -> Reason:
    b = best.blocks or 1
    tables = "; ".join(
        f"{name} " + ", ".join(f"B={k} {v:.2f}" for k, v in table.items()) for name, table in QUALITY_ABLATIONS.items()
    )
    level = quality_risk(b)
    cifar = QUALITY_ABLATIONS["CIFAR-10 FID"]
    if b <= 1:
        risk = "B=1 is end-to-end training of one denoiser (no block-wise memory saving)"
    elif level == "low":
        risk = f"B={b} is within the range where the paper matched or beat B=1 (B<={LOW_RISK_MAX_BLOCKS}): low risk"
    else:
        nearest = max(k for k in cifar if k <= b)
        risk = (
            f"B={b} is past the paper's best (B=2-3): CIFAR-10 FID went from {cifar[1]:.2f} at B=1 to "
            f"{cifar[nearest]:.2f} at B={nearest}: {level} risk; check quality on your task before committing"
        )
    reported = QUALITY_REPORTED.get(task or "", "")
    tail = f" Reported at the paper's chosen B: {reported}." if reported else ""
    return Reason(
        rule="quality-risk",
        sentence=f"Quality risk: the paper's block-count ablations (L=24) give {tables}; {risk}.{tail}",
        numbers={"blocks": b, "risk": level, "ablations": QUALITY_ABLATIONS, "task": task},
    )


def reason_costs(best: Row) -> Reason:
    b = best.blocks or 1
    numbers: dict[str, Any] = {"technique": best.technique, "extra_parameters": best.extra_parameters}
    if best.extra_parameters is not None:
        base = (best.num_parameters or 0) - best.extra_parameters
        frac = best.extra_parameters / base if base > 0 else 0.0
        numbers.update(base_parameters=base, extra_parameters_fraction=frac)
        added = f"adds {params_text(best.extra_parameters)} parameters (AdaLN-Zero modulation and the sigma embedder"
        added += f", +{100 * frac:.1f}% over the model's {params_text(base)})" if base > 0 else ")"
    else:
        added = "adds AdaLN-Zero modulation and sigma-embedder parameters (not counted in this input)"
    return Reason(
        rule="costs",
        sentence=(
            f"Costs: {best.technique} {added}; it trains from scratch, since there is no described way to convert an "
            f"existing end-to-end checkpoint; and it takes {b}x as many (cheaper) steps so each block gets as many updates."
        ),
        numbers=numbers,
    )


def reason_parallel(rows: list[Row], s: Situation) -> Reason | None:
    """With B devices, one block per device: the memory per device and no traffic between blocks."""
    par = [r for r in rows if "parallel" in r.variants]
    if not par:
        return None
    r = min(par, key=lambda x: x.required)
    available = r.blocks is not None and s.devices >= r.blocks
    tail = (
        f"{s.devices} devices are available, so it is weighed with the rest"
        if available
        else f"it needs {r.blocks} devices and {s.devices} {'is' if s.devices == 1 else 'are'} available, so it is "
        "not weighed"
    )
    return Reason(
        rule="block-parallel",
        sentence=(
            f"{r.technique} trains one block per device on {r.blocks} devices: {format_bytes(r.required)} per device, "
            "no communication between blocks (only the shared stem and head gradients are all-reduced); " + tail + "."
        ),
        numbers={
            "technique": r.technique,
            "required_bytes": r.required,
            "devices_needed": r.blocks,
            "devices_available": s.devices,
        },
    )


def reason_state_bound(base: Row, offloaded: list[Row]) -> Reason:
    opt, params, grads = (base.frac(c) for c in ("optimizer_state", "parameters", "gradients"))
    biggest = max((("optimizer state", opt), ("parameters", params), ("gradients", grads)), key=lambda kv: kv[1])
    sentence = (
        f"Not worth it for memory: parameters + gradients + optimizer state are {pct_against(base.frac(*STATE), STATE_BOUND_SHARE)} of the "
        f"{base.technique} peak ({biggest[0]} {pct(biggest[1])}, threshold {pct(STATE_BOUND_SHARE)}); plain "
        "DiffusionBlocks leaves parameters and optimizer state resident (only +offload or one block per device "
        "would not); shard them (ZeRO-1 for the optimizer state, ZeRO-2/3 or FSDP for gradients and parameters), "
        "offload the optimizer, or use an 8-bit optimizer."
    )
    numbers: dict[str, Any] = {
        "state_fraction": base.frac(*STATE),
        "optimizer_state_fraction": opt,
        "threshold": STATE_BOUND_SHARE,
    }
    if offloaded:
        best = min(offloaded, key=lambda r: r.required)
        sentence += f" For comparison {best.technique} needs {format_bytes(best.required)}."
        numbers[f"{best.technique}_required_bytes"] = best.required
    return Reason(rule="state-bound", sentence=sentence, numbers=numbers)
