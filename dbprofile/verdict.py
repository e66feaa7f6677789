"""Adoption rules: should this team train with DiffusionBlocks, and if so with how many blocks?

``judge`` reads a measured ``RunResult`` or a predicted ``Plan`` the same way (one row per
technique: status, tracked peak and its shares, the device memory it needs, times, extra
parameters) and applies a small rule set whose thresholds are the module constants below.
Each rule that fires adds a ``Reason``: a sentence with its numbers, the numbers themselves,
and the rule's name, so a person can check every step. The decision is one of

- ``adopt``: activations dominate and a DiffusionBlocks configuration cuts the peak enough,
  below what checkpointing reaches (and fits the target, when one is known);
- ``not-worth-it``: the peak is parameters / gradients / optimizer state that plain
  DiffusionBlocks leaves resident, or the saving is small, or checkpointing gets there too;
- ``not-needed``: end-to-end training already fits the target with headroom;
- ``inconclusive``: too little was measured (every run failed, or no DiffusionBlocks run).

The quality figures quoted are the paper's block-count ablations (METHOD.md), the only
evidence about quality dbprofile has; it measures memory and time, not quality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dbprofile.results import Plan, RunResult, format_bytes

# ---------------------------------------------------------------- thresholds (named, documented)

ACTIVATION_BOUND_SHARE = 0.5
"""Activations (tensors saved for backward) at least this share of the e2e peak: activation-bound,
the memory DiffusionBlocks cuts."""
STATE_BOUND_SHARE = 0.5
"""Parameters + buffers + gradients + optimizer state at least this share of the e2e peak:
state-bound, memory plain DiffusionBlocks keeps resident."""
MIN_SAVING_FRACTION = 0.2
"""DiffusionBlocks must cut the e2e peak by at least this fraction to be worth a new training method."""
CKPT_TIE_FRACTION = 0.1
"""If checkpointing's peak is within this fraction above DiffusionBlocks', checkpointing gets there
without retraining from scratch."""
NOT_NEEDED_HEADROOM = 0.1
"""e2e fits with at least this share of the capacity free: no memory technique is needed."""
MAX_LOW_RISK_BLOCKS = 3
"""In the paper's ablations B=2 and B=3 match or beat B=1; B=4 and up lose quality on CIFAR-10 and
(B=6) on ImageNet."""
CKPT_TYPICAL_STEP_FACTOR = 4 / 3
"""Expected ckpt step time over e2e when times are not measured: one extra forward per layer, a
forward being about a third of a forward+backward step."""
DB_TYPICAL_BLOCK_STEPS_FACTOR = 1.0
"""Expected time of B block-steps over one e2e step: every layer runs forward and backward once;
each block-step also runs the stem, the head and the sigma embedder (more so for causal LMs, whose
sequence doubles)."""
MAX_RATIO_NOISE = 0.2
"""A measured time ratio is quoted only when the two timings' interquartile ranges, each relative to
its median, add up to at most this: a ratio's relative spread is about the sum of its parts'."""

DECISIONS = ("adopt", "not-worth-it", "not-needed", "inconclusive")

# METHOD.md, "Quality vs B": the paper's ablations (L = 24 layers).
QUALITY_ABLATIONS: dict[str, dict[int, float]] = {
    "ImageNet FID": {1: 12.09, 2: 9.90, 3: 11.11, 4: 11.90, 6: 14.43},
    "CIFAR-10 FID": {1: 39.83, 2: 35.47, 3: 38.03, 4: 45.43, 6: 53.32},
    "LM1B MAUVE": {2: 0.61, 3: 0.65, 4: 0.67, 6: 0.62},
}
# METHOD.md, "Quality reported": DiffusionBlocks vs end-to-end on the paper's tasks.
QUALITY_REPORTED = {
    "classification": "ViT CIFAR-100 accuracy 59.30% vs 60.25% end-to-end, Tiny-ImageNet 36.16% vs 35.32%",
    "denoising": "DiT CIFAR-10 FID 30.59 vs 32.84 end-to-end, ImageNet-256 FID 9.00 vs 9.01",
    "causal-lm": "AR LM1B MAUVE 0.71 vs 0.50 end-to-end, OpenWebText MAUVE 0.82 vs 0.85",
}

STATE = ("parameters", "buffers", "gradients", "optimizer_state")


@dataclass(kw_only=True)
class Reason:
    """One rule that fired: its name, the sentence shown to people, and the numbers in it."""

    rule: str
    sentence: str
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Verdict:
    """The decision, a one-sentence headline, and the reasons behind it."""

    decision: str
    """adopt | not-worth-it | not-needed | inconclusive."""
    headline: str
    reasons: list[Reason] = field(default_factory=list)
    best_technique: str | None = None
    """The DiffusionBlocks configuration the rules recommend or compared (None when there is none)."""

    def __str__(self) -> str:
        return "\n".join([self.headline] + [f"- {r.sentence}" for r in self.reasons])


@dataclass
class _Row:
    """A measurement or a plan entry, seen the same way by the rules."""

    technique: str
    status: str
    error: str | None
    batch_size: int
    peak: int  # tracked peak; the shares sum to it
    required: int  # device memory it needs (plan: with CUDA corrections; measured: reserved or peak)
    shares: dict[str, int]
    step_time_s: float | None = None
    step_time_iqr_s: float | None = None
    block_steps_time_s: float | None = None
    block_steps_time_iqr_s: float | None = None
    extra_parameters: int | None = None
    num_parameters: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def blocks(self) -> int | None:
        if not self.technique.startswith("db:"):
            return None
        return int(self.technique[3:].split("+")[0])

    @property
    def variants(self) -> list[str]:
        return self.technique.split("+")[1:]

    def frac(self, *categories: str) -> float:
        return sum(self.shares.get(c, 0) for c in categories) / self.peak if self.peak else 0.0


# ---------------------------------------------------------------- reading the input


def _rows_from_run(result: RunResult) -> tuple[list[_Row], int | None]:
    """Rows at one batch size: the largest with an e2e measurement (else the largest)."""
    sizes = sorted({m.batch_size for m in result.measurements})
    with_e2e = [m.batch_size for m in result.measurements if m.technique == "e2e"]
    batch = max(with_e2e) if with_e2e else (sizes[-1] if sizes else None)
    rows = []
    for m in result.measurements:
        if m.batch_size != batch:
            continue
        reserved = (m.cuda or {}).get("max_memory_reserved") if m.cuda else None
        rows.append(
            _Row(
                technique=m.technique,
                status=m.status,
                error=m.error,
                batch_size=m.batch_size,
                peak=m.peak_bytes,
                required=max(int(reserved), m.peak_bytes) if reserved else m.peak_bytes,
                shares=dict(m.shares),
                step_time_s=m.step_time_s,
                step_time_iqr_s=m.step_time_iqr_s,
                block_steps_time_s=m.block_steps_time_s,
                block_steps_time_iqr_s=m.block_steps_time_iqr_s,
                extra_parameters=m.extra_parameters,
                num_parameters=m.num_parameters,
            )
        )
    env = result.environment or {}
    capacity = next((env[k] for k in ("device_capacity_bytes", "capacity_bytes", "total_memory") if env.get(k)), None)
    return rows, int(capacity) if capacity else None


def _rows_from_plan(plan: Plan) -> list[_Row]:
    return [
        _Row(
            technique=e.technique,
            status=e.status,
            error=e.error,
            batch_size=e.batch_size,
            peak=e.tracked_peak_bytes,
            required=e.peak_bytes,
            shares=dict(e.shares),
            extra_parameters=e.extra_parameters,
            num_parameters=e.num_parameters,
        )
        for e in plan.entries
    ]


# ---------------------------------------------------------------- the rules


def _pct(x: float) -> str:
    return f"{round(100 * x)}%"


def _params(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return str(n)


def _pick_db(dbs: list[_Row], capacity: int | None) -> tuple[_Row, str]:
    """The DiffusionBlocks configuration to recommend, and why it was picked.

    With a target: the smallest B that fits (fewest blocks = least quality risk and the fewest
    extra steps), plain before +ckpt before +offload / +parallel. Without one, or when none
    fits: the lowest peak among B <= MAX_LOW_RISK_BLOCKS, else the lowest peak overall.
    """
    order = lambda r: (r.blocks or 0, len(r.variants), r.required)  # noqa: E731
    if capacity is not None:
        fitting = sorted((r for r in dbs if r.required <= capacity), key=order)
        if fitting:
            return fitting[0], f"the smallest block count that fits {format_bytes(capacity)}"
    low_risk = [r for r in dbs if (r.blocks or 0) <= MAX_LOW_RISK_BLOCKS]
    if low_risk:
        return min(low_risk, key=lambda r: r.required), f"the lowest peak with B <= {MAX_LOW_RISK_BLOCKS}"
    return min(dbs, key=lambda r: r.required), "the lowest peak measured"


def _failures(rows: list[_Row]) -> list[Reason]:
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


def _composition(base: _Row) -> Reason:
    act = base.frac("activations")
    state = base.frac(*STATE)
    opt = base.frac("optimizer_state")
    sentence = (
        f"At batch size {base.batch_size} the {base.technique} peak is {format_bytes(base.peak)}: activations "
        f"{_pct(act)}, parameters + gradients + optimizer state {_pct(state)} (optimizer state alone {_pct(opt)}), "
        f"temporaries and inputs {_pct(base.frac('temporaries', 'inputs'))}."
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


def _fit_reason(rows: list[_Row], capacity: int, target: str) -> Reason:
    parts = []
    for r in rows:
        verb = "fits" if r.required <= capacity else "does not fit"
        parts.append(f"{r.technique} needs {format_bytes(r.required)} ({verb})")
    return Reason(
        rule="fit",
        sentence=f"On {target} ({format_bytes(capacity)}): " + "; ".join(parts) + ".",
        numbers={"capacity_bytes": capacity, **{f"{r.technique}_required_bytes": r.required for r in rows}},
    )


def _memory_vs(best: _Row, e2e: _Row | None, ckpt: _Row | None, why: str) -> Reason:
    numbers: dict[str, Any] = {"technique": best.technique, "required_bytes": best.required, "why": why}
    parts = [f"{best.technique} (chosen as {why})"]
    if e2e is not None:
        saving = 1 - best.required / e2e.required if e2e.required else 0.0
        numbers.update(e2e_required_bytes=e2e.required, saving_fraction=saving)
        parts.append(
            f"cuts the peak from {format_bytes(e2e.required)} to {format_bytes(best.required)} ({_pct(saving)} less)"
        )
    else:
        parts.append(f"needs {format_bytes(best.required)}")
    if ckpt is not None:
        diff = ckpt.required - best.required
        numbers.update(ckpt_required_bytes=ckpt.required, below_ckpt_bytes=diff)
        rel = "below" if diff >= 0 else "above"
        parts.append(f"{format_bytes(abs(diff))} {rel} ckpt ({format_bytes(ckpt.required)})")
    if best.step_time_s and e2e is not None and e2e.step_time_s and ratio_is_clear(
            best.step_time_s, best.step_time_iqr_s, e2e.step_time_s, e2e.step_time_iqr_s):
        ratio = best.step_time_s / e2e.step_time_s
        numbers["step_time_ratio"] = ratio
        parts.append(f"at {ratio:.2f}x the per-step time")
    return Reason(rule="memory", sentence=parts[0] + " " + ", ".join(parts[1:]) + ".", numbers=numbers)


def _noise(time_s: float, iqr_s: float | None) -> float | None:
    """The interquartile range relative to the median; None when no spread was recorded."""
    return iqr_s / time_s if iqr_s is not None and time_s > 0 else None


def ratio_is_clear(num_s: float, num_iqr_s: float | None, den_s: float, den_iqr_s: float | None) -> bool:
    """MAX_RATIO_NOISE: both spreads known and together small enough to quote num/den."""
    a, b = _noise(num_s, num_iqr_s), _noise(den_s, den_iqr_s)
    return a is not None and b is not None and a + b <= MAX_RATIO_NOISE


def _compute(best: _Row, e2e: _Row | None, ckpt: _Row | None) -> Reason:
    """Fair compute unit: B block-steps (every layer trained once) against one e2e step, quoted only
    where the timings' spread allows (MAX_RATIO_NOISE), else the ratio the method implies."""
    b = best.blocks or 1
    numbers: dict[str, Any] = {"technique": best.technique, "blocks": b}
    expected = (
        f"{b} block-steps of {best.technique} run every layer once, about the work of one e2e step "
        f"({DB_TYPICAL_BLOCK_STEPS_FACTOR:.2f}x, plus the stem and head once per block), and training needs "
        f"{b}x as many steps; ckpt instead recomputes each layer's forward, typically about "
        f"{CKPT_TYPICAL_STEP_FACTOR:.2f}x an e2e step"
    )
    numbers.update(db_expected_ratio=DB_TYPICAL_BLOCK_STEPS_FACTOR, ckpt_expected_ratio=CKPT_TYPICAL_STEP_FACTOR)
    if not (best.block_steps_time_s and e2e is not None and e2e.step_time_s):
        return Reason(rule="compute", sentence=f"Compute (not measured here): {expected}.", numbers=numbers)
    spread = f"median, IQR {_pct(best.block_steps_time_iqr_s / best.block_steps_time_s)}" if (
        best.block_steps_time_iqr_s is not None) else "median"
    numbers.update(block_steps_time_s=best.block_steps_time_s, e2e_step_time_s=e2e.step_time_s,
                   block_steps_time_iqr_s=best.block_steps_time_iqr_s, e2e_step_time_iqr_s=e2e.step_time_iqr_s)
    parts = []
    noisy = []
    if ratio_is_clear(best.block_steps_time_s, best.block_steps_time_iqr_s, e2e.step_time_s, e2e.step_time_iqr_s):
        db_ratio = best.block_steps_time_s / e2e.step_time_s
        numbers["db_ratio"] = db_ratio
        parts.append(f"{b} block-steps of {best.technique} take {best.block_steps_time_s:.4g} s ({spread}) against "
                     f"{e2e.step_time_s:.4g} s for one e2e step ({db_ratio:.2f}x)")
    else:
        noisy.append(best.technique)
    if ckpt is not None and ckpt.step_time_s:
        if ratio_is_clear(ckpt.step_time_s, ckpt.step_time_iqr_s, e2e.step_time_s, e2e.step_time_iqr_s):
            ckpt_ratio = ckpt.step_time_s / e2e.step_time_s
            numbers.update(ckpt_step_time_s=ckpt.step_time_s, ckpt_ratio=ckpt_ratio)
            parts.append(f"ckpt takes {ckpt.step_time_s:.4g} s ({ckpt_ratio:.2f}x) because it recomputes the forward")
        else:
            noisy.append("ckpt")
    if noisy:
        numbers["too_noisy"] = noisy
        parts.append(
            f"the timings of {' and '.join(noisy)} against e2e were too noisy to compare (their interquartile "
            f"ranges add up to more than {_pct(MAX_RATIO_NOISE)} of the medians); by the method, {expected}"
        )
    return Reason(rule="compute", sentence="Compute: " + "; ".join(parts) + ".", numbers=numbers)


def _quality(best: _Row, task: str | None) -> Reason:
    b = best.blocks or 1
    tables = "; ".join(
        f"{name} " + ", ".join(f"B={k} {v:.2f}" for k, v in table.items()) for name, table in QUALITY_ABLATIONS.items()
    )
    if b <= 1:
        risk = "B=1 is end-to-end training of one denoiser (no block-wise memory saving)"
    elif b <= MAX_LOW_RISK_BLOCKS:
        risk = f"B={b} is within the range where the paper matched or beat B=1 (B=2-3)"
    else:
        cifar = QUALITY_ABLATIONS["CIFAR-10 FID"]
        nearest = max(k for k in cifar if k <= b)
        risk = (
            f"B={b} is past the paper's best (B=2-3): CIFAR-10 FID went from {cifar[1]:.2f} at B=1 to "
            f"{cifar[nearest]:.2f} at B={nearest}; check quality on your task before committing"
        )
    reported = QUALITY_REPORTED.get(task or "", "")
    tail = f" Reported at the paper's chosen B: {reported}." if reported else ""
    if task == "causal-lm":
        tail += " Autoregressive DiffusionBlocks concatenates noisy and clean tokens, doubling the sequence length."
    return Reason(
        rule="quality-risk",
        sentence=f"Quality risk: the paper's block-count ablations (L=24) give {tables}; {risk}.{tail}",
        numbers={"blocks": b, "ablations": QUALITY_ABLATIONS, "task": task},
    )


def _costs(best: _Row) -> Reason:
    b = best.blocks or 1
    numbers: dict[str, Any] = {"technique": best.technique, "extra_parameters": best.extra_parameters}
    if best.extra_parameters is not None:
        base = (best.num_parameters or 0) - best.extra_parameters
        frac = best.extra_parameters / base if base > 0 else 0.0
        numbers.update(base_parameters=base, extra_parameters_fraction=frac)
        added = f"adds {_params(best.extra_parameters)} parameters (AdaLN-Zero modulation and the sigma embedder"
        added += f", +{100 * frac:.1f}% over the model's {_params(base)})" if base > 0 else ")"
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


def _state_bound(base: _Row, offloaded: list[_Row]) -> Reason:
    opt, params, grads = (base.frac(c) for c in ("optimizer_state", "parameters", "gradients"))
    biggest = max((("optimizer state", opt), ("parameters", params), ("gradients", grads)), key=lambda kv: kv[1])
    sentence = (
        f"Not worth it for memory: parameters + gradients + optimizer state are {_pct(base.frac(*STATE))} of the "
        f"{base.technique} peak ({biggest[0]} {_pct(biggest[1])}); plain DiffusionBlocks leaves parameters and "
        "optimizer state resident (only +offload or one block per device would not); shard them (ZeRO-1 for the "
        "optimizer state, ZeRO-2/3 or FSDP for gradients and parameters), offload the optimizer, or use an 8-bit optimizer."
    )
    numbers: dict[str, Any] = {"state_fraction": base.frac(*STATE), "optimizer_state_fraction": opt}
    if offloaded:
        best = min(offloaded, key=lambda r: r.required)
        sentence += f" For comparison {best.technique} needs {format_bytes(best.required)}."
        numbers[f"{best.technique}_required_bytes"] = best.required
    return Reason(rule="state-bound", sentence=sentence, numbers=numbers)


# ---------------------------------------------------------------- the decision


def judge(result: RunResult | Plan, capacity_bytes: int | None = None) -> Verdict:
    """Apply the rules to a measured run or a plan; ``capacity_bytes`` overrides the target's."""
    if isinstance(result, Plan):
        rows = _rows_from_plan(result)
        capacity = capacity_bytes if capacity_bytes is not None else result.capacity_bytes
        target = result.device if capacity_bytes is None and result.device not in ("custom", "cpu") else "the target"
        task = (result.model_info or {}).get("task")
    elif isinstance(result, RunResult):
        rows, env_capacity = _rows_from_run(result)
        capacity = capacity_bytes if capacity_bytes is not None else env_capacity
        target = (result.environment or {}).get("device_name") or "the target"
        task = (result.model_info or {}).get("task")
    else:
        raise TypeError(f"judge() takes a RunResult or a Plan, not {type(result).__name__}.")

    reasons = _failures(rows)
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
    base = e2e or ckpt or ok[0]
    reasons.append(_composition(base))
    if capacity is not None:
        reasons.append(_fit_reason(ok, capacity, target))

    # Not needed: end-to-end already fits with room to spare.
    if e2e is not None and capacity is not None and capacity - e2e.required >= NOT_NEEDED_HEADROOM * capacity:
        spare = capacity - e2e.required
        reasons.append(
            Reason(
                rule="fits-e2e",
                sentence=(
                    f"e2e already fits on {target} with {format_bytes(spare)} ({_pct(spare / capacity)}) to spare; "
                    "no memory technique is needed unless the batch size or the depth grows."
                ),
                numbers={"e2e_required_bytes": e2e.required, "capacity_bytes": capacity, "headroom_bytes": spare},
            )
        )
        best = _pick_db(dbs, capacity)[0].technique if dbs else None
        return Verdict(
            decision="not-needed",
            headline=f"Not needed: e2e already fits on {target} with {format_bytes(spare)} to spare.",
            reasons=reasons,
            best_technique=best,
        )

    if not dbs:
        return Verdict(
            decision="inconclusive",
            headline="Inconclusive: no DiffusionBlocks configuration was measured successfully.",
            reasons=reasons,
        )

    best, why = _pick_db(dbs, capacity)
    details = [_memory_vs(best, e2e, ckpt, why), _compute(best, e2e, ckpt), _quality(best, task), _costs(best)]

    def verdict(decision: str, headline: str) -> Verdict:
        return Verdict(decision=decision, headline=headline, reasons=reasons, best_technique=best.technique)

    best_fits = capacity is None or best.required <= capacity
    ckpt_fits = ckpt is not None and (capacity is None or ckpt.required <= capacity)
    ckpt_ties = ckpt is not None and ckpt.required <= best.required * (1 + CKPT_TIE_FRACTION)

    # State-bound: what dominates is what plain DiffusionBlocks keeps resident.
    # Judged on the e2e composition only: under ckpt or DiffusionBlocks the state is a larger share
    # by construction, which says nothing about what end-to-end training runs out of.
    if base is e2e and base.frac(*STATE) >= STATE_BOUND_SHARE and base.frac("activations") < ACTIVATION_BOUND_SHARE:
        sharded = [r for r in dbs if "offload" in r.variants or "parallel" in r.variants]
        reasons.append(_state_bound(base, sharded))
        reasons.extend(details)
        only_sharded_fits = (
            capacity is not None
            and best in sharded
            and best_fits
            and not any(r.required <= capacity for r in ok if r not in sharded)
        )
        if not only_sharded_fits:
            return verdict(
                "not-worth-it",
                f"Not worth it: parameters, gradients and optimizer state are {_pct(base.frac(*STATE))} of the "
                f"{base.technique} peak and DiffusionBlocks leaves them resident; shard (ZeRO), offload or use an "
                "8-bit optimizer instead.",
            )
    elif base is e2e and base.frac("activations") >= ACTIVATION_BOUND_SHARE:
        reasons.append(
            Reason(
                rule="activation-bound",
                sentence=(
                    f"Activation-bound: activations are {_pct(base.frac('activations'))} of the {base.technique} peak "
                    f"(threshold {_pct(ACTIVATION_BOUND_SHARE)}), the memory DiffusionBlocks divides by about B."
                ),
                numbers={"activations_fraction": base.frac("activations"), "threshold": ACTIVATION_BOUND_SHARE},
            )
        )
    if not reasons or reasons[-1] is not details[-1]:
        reasons.extend(details)

    saving = 1 - best.required / e2e.required if e2e is not None and e2e.required else None
    if saving is not None and saving < MIN_SAVING_FRACTION:
        return verdict(
            "not-worth-it",
            f"Not worth it: {best.technique} saves only {_pct(saving)} of the e2e peak "
            f"(threshold {_pct(MIN_SAVING_FRACTION)}).",
        )
    if not best_fits:
        if ckpt_fits:
            return verdict(
                "not-worth-it",
                f"Not worth it: no DiffusionBlocks configuration fits {target}, but ckpt does "
                f"({format_bytes(ckpt.required)}).",
            )
        smallest = min(ok, key=lambda r: r.required)
        return verdict(
            "not-worth-it",
            f"Not worth it on {target} as planned: nothing fits at batch size {best.batch_size}; the smallest need is "
            f"{smallest.technique} at {format_bytes(smallest.required)}; lower the batch size or shard (ZeRO).",
        )
    if ckpt_ties and ckpt_fits:
        return verdict(
            "not-worth-it",
            f"Not worth it: ckpt needs {format_bytes(ckpt.required)} against {best.technique}'s "
            f"{format_bytes(best.required)}"
            + ("" if ckpt.required <= best.required else f" (at most {_pct(CKPT_TIE_FRACTION)} more)")
            + ", with the existing model and checkpoints.",
        )
    against = f"from {format_bytes(e2e.required)} " if e2e is not None else ""
    return verdict(
        "adopt",
        f"Adopt DiffusionBlocks {best.technique}: it cuts the peak {against}to {format_bytes(best.required)}"
        + (f", {format_bytes(ckpt.required - best.required)} below ckpt" if ckpt is not None else "")
        + ".",
    )
