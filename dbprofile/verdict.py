"""Adoption rules: should this team train with DiffusionBlocks, and if so with how many blocks?

``judge`` reads a measured ``RunResult`` or a predicted ``Plan`` the same way (one row per
technique: status, tracked peak and its shares, the device memory it needs, training FLOPs
per sample, measured times, extra parameters) together with the team's situation (training
from scratch or keeping an end-to-end checkpoint; how many devices) and applies a small rule
set whose thresholds are the module constants below (docs/verdict.md gives each one's
source). Each rule that fires adds a ``Reason``: a sentence with its numbers, the numbers
themselves, and the rule's name. The decision is one of

- ``not-needed``: end-to-end training fits the target with headroom;
- ``adopt``: training from scratch, e2e does not fit (or only without headroom), a
  DiffusionBlocks configuration of acceptable quality risk fits, and it trains a sample with
  at least COMPUTE_MARGIN fewer FLOPs than checkpointing (or checkpointing does not fit);
- ``not-worth-it``: the team must keep a checkpoint, the peak is state plain DiffusionBlocks
  keeps resident, no DiffusionBlocks configuration fits, the fitting ones carry high quality
  risk, or checkpointing trains a sample as cheaply (the head and, for language models, the
  doubled sequence make DiffusionBlocks' FLOPs per sample larger);
- ``inconclusive``: too little was measured (every run failed, or no DiffusionBlocks run).

``recommended`` names the technique to train with (a DiffusionBlocks configuration, ckpt or
e2e), or None when nothing fits as asked. The quality figures are the paper's block-count
ablations (METHOD.md), the only evidence about quality dbprofile has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dbprofile.results import Plan, Reason, RunResult, Verdict, per_sample
from dbprofile.units import format_bytes

# ---------------------------------------------------------------- thresholds (named, documented)

NOT_NEEDED_HEADROOM = 0.1
"""e2e fits with at least this share of the capacity free: no memory technique is needed. Below it a
fit is not safe: the allocator's reserved-over-allocated overhead ranged 2% to 35% on an H100
(median 11%, which the plan already adds), so a prediction within 10% of the capacity can run out."""
ACTIVATION_BOUND_SHARE = 0.5
"""Activations (tensors saved for backward) at least this share of the e2e peak: activation-bound,
the memory DiffusionBlocks cuts."""
STATE_BOUND_SHARE = 0.5
"""Parameters + buffers + gradients + optimizer state at least this share of the e2e peak:
state-bound, memory plain DiffusionBlocks keeps resident."""
MIN_SAVING_FRACTION = 0.2
"""With no target capacity to fit, DiffusionBlocks must cut the e2e peak by at least this fraction to
be worth a new training method."""
COMPUTE_MARGIN = 0.1
"""DiffusionBlocks must train a sample with at least this fraction fewer FLOPs than checkpointing to
be preferred to it. FLOPs count matmuls, convolutions and attention only; the element-wise work
DiffusionBlocks adds (AdaLN modulate and gate products in every layer) and its smaller per-step
batches of work are not in them, so a smaller lead is not a reliable time saving."""
LOW_RISK_MAX_BLOCKS = 3
"""B <= 3 matched or beat B=1 in every ablation of the paper (ImageNet FID 9.90/11.11 vs 12.09,
CIFAR-10 FID 35.47/38.03 vs 39.83, LM1B MAUVE best at B=3-4)."""
HIGH_RISK_MIN_BLOCKS = 6
"""B >= 6 was worse than B=1 on both image ablations (ImageNet FID 14.43 vs 12.09, CIFAR-10 53.32 vs
39.83): high quality risk. B=4-5 is elevated: better on ImageNet, worse on CIFAR-10 (45.43)."""
MAX_RATIO_NOISE = 0.2
"""A measured time ratio is quoted only when the two timings' interquartile ranges, each relative to
its median, add up to at most this: a ratio's relative spread is about the sum of its parts'."""


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
    flops_per_sample: float | None = None
    step_time_s: float | None = None
    step_time_iqr_s: float | None = None
    block_steps_time_s: float | None = None
    block_steps_time_iqr_s: float | None = None
    extra_parameters: int | None = None
    num_parameters: int | None = None
    devices: int = 1
    max_batch_size: int | None = None

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

    @property
    def training_time_s(self) -> float | None:
        """Measured time to train every layer once: one step, or DiffusionBlocks' B block-steps."""
        return self.block_steps_time_s if self.blocks is not None else self.step_time_s

    def frac(self, *categories: str) -> float:
        return sum(self.shares.get(c, 0) for c in categories) / self.peak if self.peak else 0.0


@dataclass
class _Situation:
    """What the rules know besides the rows: the target and how the team will train."""

    capacity: int | None
    target: str
    task: str | None
    from_checkpoint: bool
    devices: int
    batch_size: int | None


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
                flops_per_sample=m.flops_per_sample,
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
            flops_per_sample=e.flops_per_sample if e.flops_per_sample is not None
            else per_sample(e.training_flops, e.batch_size),
            extra_parameters=e.extra_parameters,
            num_parameters=e.num_parameters,
            devices=e.world_size,
            max_batch_size=e.max_batch_size,
        )
        for e in plan.entries
    ]


# ---------------------------------------------------------------- small helpers


def _pct(x: float) -> str:
    return f"{round(100 * x)}%"


def _params(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return str(n)


def _gflops(flops: float) -> str:
    return f"{flops / 1e9:,.1f} GFLOP"


def quality_risk(blocks: int) -> str:
    """'low' | 'elevated' | 'high': where B sits in the paper's block-count ablations."""
    if blocks <= LOW_RISK_MAX_BLOCKS:
        return "low"
    return "high" if blocks >= HIGH_RISK_MIN_BLOCKS else "elevated"


def _fits(row: _Row, s: _Situation) -> bool:
    return s.capacity is None or row.required <= s.capacity


def _compute_ratio(row: _Row, base: _Row | None) -> float | None:
    if base is None or row.flops_per_sample is None or not base.flops_per_sample:
        return None
    return row.flops_per_sample / base.flops_per_sample


def _cheapest(rows: list[_Row]) -> _Row | None:
    """Fewest FLOPs per sample (unknown FLOPs last), then the smallest need."""
    return min(rows, key=lambda r: (r.flops_per_sample is None, r.flops_per_sample or 0.0, r.required), default=None)


# ---------------------------------------------------------------- reasons (each a sentence with numbers)


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


def _fit_reason(rows: list[_Row], s: _Situation) -> Reason:
    assert s.capacity is not None
    parts = []
    for r in rows:
        verb = "fits" if r.required <= s.capacity else "does not fit"
        where = f" per device on {r.devices}" if r.devices > 1 else ""
        largest = f", largest batch {r.max_batch_size}" if r.max_batch_size is not None else ""
        parts.append(f"{r.technique} needs {format_bytes(r.required)}{where} ({verb}{largest})")
    return Reason(
        rule="fit",
        sentence=f"On {s.target} ({format_bytes(s.capacity)}): " + "; ".join(parts) + ".",
        numbers={"capacity_bytes": s.capacity, **{f"{r.technique}_required_bytes": r.required for r in rows}},
    )


def _compute_table(rows: list[_Row], e2e: _Row | None) -> Reason | None:
    """FLOPs per trained sample of every technique, relative to e2e."""
    counted = [r for r in rows if r.flops_per_sample is not None]
    if not counted:
        return None
    parts = []
    for r in counted:
        ratio = _compute_ratio(r, e2e)
        rel = f" ({ratio:.2f}x e2e)" if ratio is not None and r is not e2e else ""
        parts.append(f"{r.technique} {_gflops(r.flops_per_sample or 0)}{rel}")
    return Reason(
        rule="compute",
        sentence=(
            "Compute to train every layer once on one sample (FlopCounterMode: matmuls, convolutions, attention; "
            "DiffusionBlocks counted over its B block-steps): " + ", ".join(parts) + "."
        ),
        numbers={
            "flops_per_sample": {r.technique: r.flops_per_sample for r in counted},
            "vs_e2e": {r.technique: _compute_ratio(r, e2e) for r in counted},
        },
    )


def _db_overhead(best: _Row, e2e: _Row | None, task: str | None) -> Reason | None:
    """Why a DiffusionBlocks sample costs what it does: stem/head per block-step, doubled LM sequence."""
    ratio = _compute_ratio(best, e2e)
    if ratio is None or best.blocks is None or e2e is None:
        return None
    b = best.blocks
    per_block_step = ratio / b
    why = ("the embeddings, the head and the sigma embedder run in every block-step, not once per sample"
           if task != "causal-lm" else
           "the embeddings and the vocabulary-sized head run in every block-step, not once per sample, and each "
           "block runs its layers on a doubled sequence (noisy and clean tokens), which doubles their matmuls "
           "and quadruples their attention")
    return Reason(
        rule="compute-overhead",
        sentence=(
            f"One {best.technique} block-step trains 1/{b} of the layers but costs {per_block_step:.3f}x an e2e step "
            f"per sample (1/{b} = {1 / b:.3f}x), so {b} block-steps cost {ratio:.2f}x e2e: {why}."
        ),
        numbers={"technique": best.technique, "blocks": b, "vs_e2e": ratio, "block_step_vs_e2e": per_block_step},
    )


def _measured_times(best: _Row, e2e: _Row | None, ckpt: _Row | None) -> Reason | None:
    """Measured time ratios beside the FLOPs, quoted only when the timings' spread allows it."""
    if e2e is None or not e2e.step_time_s or not best.training_time_s:
        return None

    def noise(r: _Row) -> float | None:
        """The timing's interquartile range relative to its median (B block-steps for db:B)."""
        if r.blocks is not None:
            return _noise(r.block_steps_time_s or 0.0, r.block_steps_time_iqr_s)
        return _noise(r.step_time_s or 0.0, r.step_time_iqr_s)

    compared = [r for r in (best, ckpt) if r is not None and r.training_time_s]
    spreads = {r.technique: noise(r) for r in [e2e, *compared]}
    e2e_noise = spreads[e2e.technique]
    noisy = {t: v for t, v in spreads.items()
             if v is None or e2e_noise is None or (t != e2e.technique and v + e2e_noise > MAX_RATIO_NOISE)}
    numbers: dict[str, Any] = {"iqr_fraction": spreads, "noise_limit": MAX_RATIO_NOISE}
    if noisy:
        worst = ", ".join(f"{t} {'unknown' if v is None else _pct(v)}" for t, v in spreads.items())
        return Reason(
            rule="measured-time",
            sentence=(
                f"Measured step times are too noisy to compare (interquartile range over the timed steps: {worst}; "
                f"a ratio is quoted when e2e's and the other's add up to at most {_pct(MAX_RATIO_NOISE)} of their "
                "medians); the FLOPs ratios above are the estimate."
            ),
            numbers=numbers,
        )
    parts = []
    for r in compared:
        ratio = (r.training_time_s or 0) / e2e.step_time_s
        numbers[f"{r.technique}_time_ratio"] = ratio
        unit = f"{r.blocks} block-steps of {r.technique}" if r.blocks is not None else r.technique
        parts.append(f"{unit} take {r.training_time_s:.4g} s ({ratio:.2f}x)")
    return Reason(
        rule="measured-time",
        sentence=f"Measured: one e2e step takes {e2e.step_time_s:.4g} s; " + "; ".join(parts) + ".",
        numbers=numbers,
    )


def _noise(time_s: float, iqr_s: float | None) -> float | None:
    """The interquartile range relative to the median; None when no spread was recorded."""
    return iqr_s / time_s if iqr_s is not None and time_s > 0 else None


def ratio_is_clear(num_s: float, num_iqr_s: float | None, den_s: float, den_iqr_s: float | None) -> bool:
    """MAX_RATIO_NOISE: both spreads known and together small enough to quote num/den."""
    a, b = _noise(num_s, num_iqr_s), _noise(den_s, den_iqr_s)
    return a is not None and b is not None and a + b <= MAX_RATIO_NOISE


def _quality(best: _Row, task: str | None) -> Reason:
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


def _parallel(rows: list[_Row], s: _Situation) -> Reason | None:
    """With B devices, one block per device: the memory per device and no traffic between blocks."""
    par = [r for r in rows if "parallel" in r.variants]
    if not par:
        return None
    r = min(par, key=lambda x: x.required)
    available = r.blocks is not None and s.devices >= r.blocks
    tail = (f"{s.devices} devices are available, so it is weighed with the rest" if available else
            f"it needs {r.blocks} devices and {s.devices} {'is' if s.devices == 1 else 'are'} available, so it is "
            "not weighed")
    return Reason(
        rule="block-parallel",
        sentence=(
            f"{r.technique} trains one block per device on {r.blocks} devices: {format_bytes(r.required)} per device, "
            "no communication between blocks (only the shared stem and head gradients are all-reduced); " + tail + "."
        ),
        numbers={"technique": r.technique, "required_bytes": r.required, "devices_needed": r.blocks,
                 "devices_available": s.devices},
    )


def _state_bound(base: _Row, offloaded: list[_Row]) -> Reason:
    opt, params, grads = (base.frac(c) for c in ("optimizer_state", "parameters", "gradients"))
    biggest = max((("optimizer state", opt), ("parameters", params), ("gradients", grads)), key=lambda kv: kv[1])
    sentence = (
        f"Not worth it for memory: parameters + gradients + optimizer state are {_pct(base.frac(*STATE))} of the "
        f"{base.technique} peak ({biggest[0]} {_pct(biggest[1])}, threshold {_pct(STATE_BOUND_SHARE)}); plain "
        "DiffusionBlocks leaves parameters and optimizer state resident (only +offload or one block per device "
        "would not); shard them (ZeRO-1 for the optimizer state, ZeRO-2/3 or FSDP for gradients and parameters), "
        "offload the optimizer, or use an 8-bit optimizer."
    )
    numbers: dict[str, Any] = {"state_fraction": base.frac(*STATE), "optimizer_state_fraction": opt,
                               "threshold": STATE_BOUND_SHARE}
    if offloaded:
        best = min(offloaded, key=lambda r: r.required)
        sentence += f" For comparison {best.technique} needs {format_bytes(best.required)}."
        numbers[f"{best.technique}_required_bytes"] = best.required
    return Reason(rule="state-bound", sentence=sentence, numbers=numbers)


# ---------------------------------------------------------------- the decision


def _situation(result: RunResult | Plan, capacity_bytes: int | None, from_checkpoint: bool | None,
               devices: int | None) -> tuple[list[_Row], _Situation]:
    if isinstance(result, Plan):
        rows = _rows_from_plan(result)
        capacity = capacity_bytes if capacity_bytes is not None else result.capacity_bytes
        target = result.device if capacity_bytes is None and result.device not in ("custom", "cpu") else "the target"
        stored_checkpoint, stored_devices, batch = result.from_checkpoint, result.world_size, result.batch_size
    elif isinstance(result, RunResult):
        rows, env_capacity = _rows_from_run(result)
        capacity = capacity_bytes if capacity_bytes is not None else env_capacity
        target = (result.environment or {}).get("device_name") or "the target"
        stored_checkpoint, stored_devices = result.from_checkpoint, 1
        batch = rows[0].batch_size if rows else None
    else:
        raise TypeError(f"judge() takes a RunResult or a Plan, not {type(result).__name__}.")
    return rows, _Situation(
        capacity=capacity,
        target=target,
        task=(result.model_info or {}).get("task"),
        from_checkpoint=stored_checkpoint if from_checkpoint is None else from_checkpoint,
        devices=stored_devices if devices is None else devices,
        batch_size=batch,
    )


def judge(result: RunResult | Plan, capacity_bytes: int | None = None, *, from_checkpoint: bool | None = None,
          devices: int | None = None) -> Verdict:
    """Apply the rules to a measured run or a plan. ``capacity_bytes`` overrides the target's capacity,
    ``from_checkpoint`` and ``devices`` the situation stored in the result (training from scratch and
    the plan's world size by default)."""
    rows, s = _situation(result, capacity_bytes, from_checkpoint, devices)
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
    others = [r for r in ok if r.blocks is None]
    base = e2e or ckpt or ok[0]
    reasons.append(_composition(base))
    if s.capacity is not None:
        reasons.append(_fit_reason(ok, s))
    table = _compute_table(ok, e2e)
    if table is not None:
        reasons.append(table)

    def verdict(decision: str, headline: str, recommended: str | None, best: _Row | None = None) -> Verdict:
        return Verdict(decision=decision, headline=headline, reasons=reasons,
                       best_technique=best.technique if best is not None else None, recommended=recommended,
                       batch_size=s.batch_size, capacity_bytes=s.capacity)

    # Not needed: end-to-end already fits with room to spare.
    if e2e is not None and s.capacity is not None and s.capacity - e2e.required >= NOT_NEEDED_HEADROOM * s.capacity:
        spare = s.capacity - e2e.required
        reasons.append(Reason(
            rule="fits-e2e",
            sentence=(
                f"e2e already fits on {s.target} with {format_bytes(spare)} ({_pct(spare / s.capacity)}) to spare "
                f"(threshold {_pct(NOT_NEEDED_HEADROOM)}); no memory technique is needed unless the batch size or the "
                "depth grows."
            ),
            numbers={"e2e_required_bytes": e2e.required, "capacity_bytes": s.capacity, "headroom_bytes": spare,
                     "threshold": NOT_NEEDED_HEADROOM},
        ))
        return verdict("not-needed", f"Not needed: e2e already fits on {s.target} with {format_bytes(spare)} to spare.",
                       "e2e")
    if e2e is not None and s.capacity is not None and e2e.required <= s.capacity:
        spare = s.capacity - e2e.required
        reasons.append(Reason(
            rule="e2e-tight",
            sentence=(
                f"e2e fits on {s.target} with only {format_bytes(spare)} ({_pct(spare / s.capacity)}) to spare, below "
                f"the {_pct(NOT_NEEDED_HEADROOM)} headroom a fit needs to be safe; it is weighed as not fitting."
            ),
            numbers={"e2e_required_bytes": e2e.required, "headroom_bytes": spare, "threshold": NOT_NEEDED_HEADROOM},
        ))
    elif e2e is not None and s.capacity is not None and e2e.max_batch_size is not None and s.batch_size:
        reasons.append(Reason(
            rule="e2e-does-not-fit",
            sentence=(f"e2e does not fit at batch size {s.batch_size}: the largest that fits on {s.target} is "
                      f"{e2e.max_batch_size}."),
            numbers={"batch_size": s.batch_size, "e2e_max_batch_size": e2e.max_batch_size},
        ))

    # The alternative when DiffusionBlocks is not chosen: the cheapest non-DiffusionBlocks technique that
    # fits safely (e2e only with headroom, handled above), so ckpt or a ckpt:k.
    fallback = _cheapest([r for r in others if r is not e2e and _fits(r, s)])
    fallback_name = fallback.technique if fallback is not None else None
    instead = (f"train with {fallback.technique} ({format_bytes(fallback.required)})" if fallback is not None
               else "nothing else fits either: lower the batch size or shard the state (ZeRO-3 / FSDP)")

    par = _parallel(ok, s)
    if par is not None:
        reasons.append(par)

    if s.from_checkpoint:
        reasons.append(Reason(
            rule="from-checkpoint",
            sentence=(
                "The team keeps an existing end-to-end checkpoint: DiffusionBlocks trains its blocks as denoisers with "
                "AdaLN-Zero conditioning from scratch, and the paper describes no way to convert an end-to-end model; "
                f"so {instead}."
            ),
            numbers={"from_checkpoint": True, "recommended": fallback_name},
        ))
        return verdict("not-worth-it",
                       f"Not worth it when keeping an end-to-end checkpoint: DiffusionBlocks trains from scratch; "
                       f"{instead}.", fallback_name)

    if not dbs:
        return verdict("inconclusive", "Inconclusive: no DiffusionBlocks configuration was measured successfully.",
                       fallback_name)

    usable = [r for r in dbs if "parallel" not in r.variants or (r.blocks or 0) <= s.devices]
    fitting = [r for r in usable if _fits(r, s)]

    # State-bound: what dominates is what plain DiffusionBlocks keeps resident. Judged on the e2e
    # composition only: under ckpt or DiffusionBlocks the state is a larger share by construction.
    if base is e2e and e2e.frac(*STATE) >= STATE_BOUND_SHARE and e2e.frac("activations") < ACTIVATION_BOUND_SHARE:
        sharded = [r for r in fitting if "offload" in r.variants or "parallel" in r.variants]
        reasons.append(_state_bound(e2e, sharded))
        if not sharded or fallback is not None or any("offload" not in r.variants and "parallel" not in r.variants
                                                      for r in fitting):
            return verdict(
                "not-worth-it",
                f"Not worth it: parameters, gradients and optimizer state are {_pct(e2e.frac(*STATE))} of the e2e peak "
                f"and DiffusionBlocks leaves them resident; shard (ZeRO), offload or use an 8-bit optimizer"
                + (f", or {instead}." if fallback is not None else "."),
                fallback_name,
            )
        fitting = sharded  # only a configuration that moves state off the device fits
    elif base is e2e and e2e.frac("activations") >= ACTIVATION_BOUND_SHARE:
        reasons.append(Reason(
            rule="activation-bound",
            sentence=(
                f"Activation-bound: activations are {_pct(e2e.frac('activations'))} of the e2e peak (threshold "
                f"{_pct(ACTIVATION_BOUND_SHARE)}), the memory DiffusionBlocks divides by about B."
            ),
            numbers={"activations_fraction": e2e.frac("activations"), "threshold": ACTIVATION_BOUND_SHARE},
        ))

    if not fitting:
        smallest = min(usable or dbs, key=lambda r: r.required)
        reasons.extend([_quality(smallest, s.task), _costs(smallest)])
        return verdict(
            "not-worth-it",
            f"Not worth it on {s.target}: no DiffusionBlocks configuration fits (the smallest, {smallest.technique}, "
            f"needs {format_bytes(smallest.required)}); {instead}.",
            fallback_name, smallest,
        )

    acceptable = [r for r in fitting if quality_risk(r.blocks or 1) != "high"]
    if not acceptable:
        best = min(fitting, key=lambda r: r.blocks or 0)
        reasons.extend([_quality(best, s.task), _costs(best)])
        return verdict(
            "not-worth-it",
            f"Not worth it: only B >= {HIGH_RISK_MIN_BLOCKS} fits ({best.technique}), where the paper's quality was "
            f"worse than end-to-end on both image ablations; {instead}.",
            fallback_name, best,
        )

    # Least quality risk first, then the fewest blocks (fewest extra block-steps), then the fewest FLOPs.
    # +ckpt only when nothing without recomputation fits: it pays checkpointing's recomputation on top.
    def preference(r: _Row) -> tuple:
        risk = ("low", "elevated").index(quality_risk(r.blocks or 1))
        return ("ckpt" in r.variants, risk, r.blocks or 0, r.flops_per_sample or 0.0, r.required)

    best = min(acceptable, key=preference)
    for extra in (_db_overhead(best, e2e, s.task), _measured_times(best, e2e, ckpt)):
        if extra is not None:
            reasons.append(extra)
    reasons.extend([_quality(best, s.task), _costs(best)])

    if s.capacity is None and e2e is not None and e2e.required:
        saving = 1 - best.required / e2e.required
        reasons.append(Reason(
            rule="memory",
            sentence=(f"{best.technique} cuts the peak from {format_bytes(e2e.required)} to "
                      f"{format_bytes(best.required)} ({_pct(saving)} less; threshold {_pct(MIN_SAVING_FRACTION)} "
                      "with no target capacity)."),
            numbers={"technique": best.technique, "saving_fraction": saving, "threshold": MIN_SAVING_FRACTION},
        ))
        if saving < MIN_SAVING_FRACTION:
            return verdict("not-worth-it",
                           f"Not worth it: {best.technique} saves only {_pct(saving)} of the e2e peak "
                           f"(threshold {_pct(MIN_SAVING_FRACTION)}).", fallback_name or "e2e", best)

    # Compute against checkpointing, the alternative that also fits.
    rival = fallback if fallback is not None and fallback.flops_per_sample is not None else None
    db_vs = _compute_ratio(best, rival)
    if rival is not None and db_vs is not None and db_vs > 1 - COMPUTE_MARGIN:
        more = f"{_pct(db_vs - 1)} more" if db_vs >= 1 else f"only {_pct(1 - db_vs)} less"
        reasons.append(Reason(
            rule="costlier-than-ckpt",
            sentence=(
                f"{best.technique} trains a sample with {_gflops(best.flops_per_sample or 0)} against "
                f"{rival.technique}'s {_gflops(rival.flops_per_sample or 0)}: {db_vs:.2f}x, {more} (it must be at least "
                f"{_pct(COMPUTE_MARGIN)} less to be worth a new training method)."
            ),
            numbers={"technique": best.technique, "rival": rival.technique, "vs_rival": db_vs,
                     "margin": COMPUTE_MARGIN},
        ))
        return verdict(
            "not-worth-it",
            f"Not worth it: {rival.technique} fits ({format_bytes(rival.required)}) and trains a sample with "
            f"{1 / db_vs:.2f}x the FLOPs of {best.technique} ({format_bytes(best.required)}), which costs {db_vs:.2f}x "
            f"{rival.technique}'s compute; train with {rival.technique}.",
            rival.technique, best,
        )

    e2e_part = f"e2e needs {format_bytes(e2e.required)}" if e2e is not None else "e2e was not measured"
    if rival is not None and db_vs is not None:
        compute_part = (f"and trains a sample with {db_vs:.2f}x the FLOPs of {rival.technique} "
                        f"({_pct(1 - db_vs)} less; margin {_pct(COMPUTE_MARGIN)})")
    elif fallback is None and "ckpt" not in best.variants:
        compute_part = "and no checkpointing configuration fits"
    elif fallback is None:
        compute_part = "and it is the only configuration that fits"
    else:
        compute_part = "(FLOPs not counted in this input)"
    risk = quality_risk(best.blocks or 1)
    risk_part = (f"B={best.blocks} is in the paper's low-risk range" if risk == "low"
                 else f"B={best.blocks} carries {risk} quality risk in the paper's ablations: check quality")
    target = f" on {s.target}" if s.capacity is not None else ""
    reasons.append(Reason(
        rule="adopt",
        sentence=(f"Training from scratch, {best.technique} fits{target} at {format_bytes(best.required)} "
                  f"{compute_part}; {risk_part}."),
        numbers={"technique": best.technique, "required_bytes": best.required, "vs_ckpt": db_vs,
                 "risk": risk, "margin": COMPUTE_MARGIN},
    ))
    return verdict(
        "adopt",
        f"Adopt DiffusionBlocks {best.technique}: {e2e_part}; {best.technique} fits{target} at "
        f"{format_bytes(best.required)} {compute_part}; {risk_part}.",
        best.technique, best,
    )


def judge_into(result: RunResult) -> RunResult:
    """Judge ``result`` once and store the verdict on it (``result.verdict``). A rule that fails
    must not cost the measurements: the verdict is then None and ``verdict_error`` says why."""
    try:
        result.verdict, result.verdict_error = judge(result), None
    except Exception as err:  # noqa: BLE001 - the measurements are the result; the verdict is an extra
        result.verdict, result.verdict_error = None, f"the verdict could not be computed ({type(err).__name__}: {err})"
    return result
