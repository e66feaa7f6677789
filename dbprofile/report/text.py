"""Every text table of dbprofile, from data objects: a run's table (``dbprofile run``), the
per-rank table (distributed runs), a plan's table and sentences (``dbprofile plan``), the GPU
validation table (markdown) and the preset list. One alignment helper (``aligned``); bytes in
one IEC unit per table (dbprofile.units). Importing this module installs the plan's text view
(``repr(plan)``) into the data layer (dbprofile.results.views)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from dbprofile.report.experts import experts_summary, moe_memory, routing_seen
from dbprofile.results import Plan, PlanEntry, RunResult, views
from dbprofile.units import UNIT_BYTES, format_bytes, format_duration, format_gflop, pick_unit
from dbprofile.vocabulary import CATEGORIES

if TYPE_CHECKING:  # validate imports torch, and the rows are only read here
    from dbprofile.validate import ValidationRow


def aligned(rows: Sequence[Sequence[str]], left: Collection[int] = (0,)) -> list[str]:
    """Rows of cells as lines of columns two spaces apart: the columns in ``left`` flush left
    (names, phases), the others flush right (numbers); no trailing spaces."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.ljust(width) if i in left else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]


# ---------------------------------------------------------------- runs


SHORT_CATEGORY = {
    "parameters": "params",
    "buffers": "buffers",
    "gradients": "grads",
    "optimizer_state": "optim",
    "activations": "acts",
    "temporaries": "temps",
    "inputs": "inputs",
    "workspace": "wkspace",
    "communication": "comm",
}


def run_table(result: RunResult) -> str:
    """A compact text table: one row per measurement, bytes in one IEC unit named in the header."""
    ok = [m for m in result.measurements if m.ok or m.status == "nan"]
    largest = max((m.peak_bytes for m in ok), default=0)
    unit = pick_unit(largest, smallest="B")
    scale = UNIT_BYTES[unit]
    # workspace (CUDA) and communication (FSDP) only get a column where some row has them.
    optional = ("workspace", "communication")
    cats = [c for c in CATEGORIES if c not in optional or any(m.shares.get(c, 0) for m in ok)]
    head = (
        ["technique", "batch", f"peak {unit}"]
        + [SHORT_CATEGORY[c] for c in cats]
        + ["phase", "step s", "IQR", "B steps s", "IQR", "GFLOP/sample"]
    )
    rows = [head]
    for m in result.measurements:
        if m.status not in ("ok", "nan"):
            rows.append([m.technique, str(m.batch_size), m.status.upper()] + [""] * (len(head) - 3))
            continue
        figs = [f"{m.peak_bytes / scale:.2f}"] + [f"{m.shares.get(c, 0) / scale:.2f}" for c in cats]
        phase = m.peak_phase or ""
        if m.peak_block is not None:
            phase += f" (block {m.peak_block})"
        times = [
            f"{t:.4f}" if t is not None else "-"
            for t in (m.step_time_s, m.step_time_iqr_s, m.block_steps_time_s, m.block_steps_time_iqr_s)
        ]
        gflops = format_gflop(m.flops_per_sample) if m.flops_per_sample is not None else "-"
        name = m.technique + (" NaN" if m.status == "nan" else "")
        rows.append([name, str(m.batch_size)] + figs + [phase, *times, gflops])
    lines = aligned(rows, left={0, *range(len(head) - 6, len(head))})
    notes = [
        f"{m.technique} @ batch {m.batch_size}: {m.status.upper()}: {m.error}"
        for m in result.measurements
        if m.status != "ok" and m.error
    ] + [
        f"{m.technique} @ batch {m.batch_size}: no step time: {m.extra['timing_error']}"
        for m in result.measurements
        if m.ok and m.extra.get("timing_error")
    ]
    device = result.environment.get("device_name") or result.environment.get("device", "")
    fake = " (fake tensors)" if any(m.fake for m in result.measurements) else ""
    bytes_per_unit = f" (1 {unit} = {scale:,} bytes)" if scale > 1 else ""
    header = f"{result.model} on {device}{fake}: peak tracked tensor memory and its shares, in {unit}{bytes_per_unit}"
    experts = result.model_info.get("experts")
    moe = (
        [experts_summary(experts), *moe_memory(result.measurements), *routing_seen(result.measurements)]
        if isinstance(experts, dict)
        else []
    )
    return "\n".join([header, *lines, *notes, *moe])


def ranks_table(result: RunResult) -> str:
    """One line per technique and rank: the rank's peak and its shares, in one IEC unit."""
    ok = [m for m in result.measurements if m.ok]
    largest = max((m.peak_bytes for m in ok), default=0)
    unit = pick_unit(largest, smallest="B")
    scale = UNIT_BYTES[unit]
    head = ["technique", "rank", f"peak {unit}", *CATEGORIES, "phase"]
    rows = [head]
    for m in result.measurements:
        rank = str(m.extra.get("rank", "-"))
        if not m.ok:
            rows.append([m.technique, rank, m.status.upper()] + [""] * (len(head) - 3))
            continue
        rows.append(
            [
                m.technique,
                rank,
                f"{m.peak_bytes / scale:.2f}",
                *[f"{m.shares.get(c, 0) / scale:.2f}" for c in CATEGORIES],
                m.peak_phase or "",
            ]
        )
    lines = aligned(rows, left={0, len(head) - 1})
    world = result.environment.get("world_size", "?")
    notes = [
        f"{m.technique} rank {m.extra.get('rank')}: {m.status.upper()}: {m.error}"
        for m in result.measurements
        if not m.ok
    ]
    return "\n".join(
        [f"{result.model}, {world} ranks: per-rank peak of tracked tensor memory, in {unit}", *lines, *notes]
    )


# ---------------------------------------------------------------- plans


def nothing_fits_summary(plan: Plan) -> str | None:
    """One paragraph when nothing fits the target: by how much each technique misses, the
    largest batch size that does fit, and what to change. None when something fits."""
    ok = [e for e in plan.entries if e.ok]
    if plan.capacity_bytes is None or not ok or any(e.fits for e in ok):
        return None
    misses = ", ".join(
        f"{e.technique} by {format_bytes(e.shortfall_bytes)}" for e in sorted(ok, key=lambda e: e.shortfall_bytes or 0)
    )
    fitting = [e for e in ok if e.max_batch_size]
    if fitting:
        best = max(fitting, key=lambda e: e.max_batch_size or 0)
        hint = f" The largest batch size that fits is {best.max_batch_size} ({best.technique})."
    else:
        hint = " Not even batch size 1 fits with any technique."
    accumulating = [e for e in ok if (e.accumulation_steps or 1) > 1]
    if accumulating:
        least = min(accumulating, key=lambda e: e.accumulation_steps or 0)
        hint += (
            f" Accumulating gradients, {least.technique} trains it in {least.accumulation_steps} micro-batches of "
            f"{least.micro_batch_size} ({format_bytes(least.accumulation_peak_bytes or 0)})."
        )
    return (
        f"Nothing fits in one step: at batch size {plan.batch_size}, {plan.device} ({format_bytes(plan.capacity_bytes)}) is "
        f"short for every technique: {misses}.{hint} Lower the batch size, accumulate gradients, shard the state "
        "(ZeRO-3 over several devices: --zero 3 --world-size N), or target a larger GPU."
    )


PLAN_COLUMNS = ("parameters", "gradients", "optimizer_state", "activations", "temporaries")


def plan_header(plan: Plan) -> str:
    sharding = (
        f", ZeRO-{plan.zero_stage} over {plan.world_size} ranks"
        if plan.zero_stage
        else (f", {plan.world_size} devices" if plan.world_size > 1 else "")
    )
    target = plan.device if plan.capacity_bytes is None else f"{plan.device} ({format_bytes(plan.capacity_bytes)})"
    return (
        f"Plan for {plan.model}: batch size {plan.batch_size} per device, {plan.precision}, {plan.optimizer}"
        f"{sharding}; target {target}"
    )


PLAN_HEAD = [
    "technique",
    "peak",
    *[SHORT_CATEGORY[c] for c in PLAN_COLUMNS],
    "other+CUDA",
    "fits",
    "headroom",
    "max batch",
    "micro x steps",
    "GFLOP/sample",
    "vs e2e",
]


def _row(e: PlanEntry, e2e_flops: float | None) -> list[str]:
    if not e.ok:
        return [e.technique, e.status.upper()] + [""] * (len(PLAN_HEAD) - 2)
    others = e.shares.get("buffers", 0) + e.shares.get("inputs", 0)
    flops = e.flops_per_sample
    return [
        e.technique + (f" x{e.world_size}" if e.world_size > 1 else ""),
        format_bytes(e.peak_bytes),
        *[format_bytes(e.shares.get(c, 0)) for c in PLAN_COLUMNS],
        format_bytes(others + sum(e.corrections.values())),
        "-" if e.fits is None else ("yes" if e.fits else "NO"),
        "-" if e.headroom_bytes is None else format_bytes(e.headroom_bytes),
        "-" if e.max_batch_size is None else str(e.max_batch_size),
        "-" if e.micro_batch_size is None else f"{e.micro_batch_size} x{e.accumulation_steps}",
        "-" if flops is None else format_gflop(flops),
        "-" if flops is None or not e2e_flops else f"{flops / e2e_flops:.2f}x",
    ]


def plan_rows(plan: Plan) -> list[list[str]]:
    e2e = plan.get("e2e")
    e2e_flops = e2e.flops_per_sample if e2e is not None and e2e.ok else None
    return [_row(e, e2e_flops) for e in plan.entries]


def format_time_estimate(plan: Plan) -> str | None:
    """One sentence: the estimated time per million samples of each technique on the target's
    devices at the plan's assumed utilisation (None without a known peak)."""
    timed = [e for e in plan.entries if e.ok and e.time_per_million_samples_s is not None]
    if not timed or not plan.peak_flops or plan.utilisation is None:
        return None
    parts = [
        f"{e.technique} {format_duration(e.time_per_million_samples_s or 0)}"
        + (f" on {e.world_size} devices" if e.world_size > 1 else "")
        for e in timed
    ]
    return (
        f"Estimated time per million samples at {round(100 * plan.utilisation)}% of the {plan.device}'s "
        f"{plan.peak_flops / 1e12:,.1f} TFLOPS {plan.precision} peak ({plan.peak_flops_source or 'datasheet'}; an illustration, the "
        "ratios are the claim): " + ", ".join(parts) + "."
    )


def format_plan(plan: Plan) -> str:
    """The plan as a text table followed by the verdict's headline and reasons."""
    lines = [plan_header(plan), "", *aligned([PLAN_HEAD, *plan_rows(plan)], left={0})]
    for e in plan.entries:
        if not e.ok:
            lines.append(f"{e.technique}: {e.error}")
    if (summary := nothing_fits_summary(plan)) is not None:
        lines += ["", summary]
    if plan.cuda_corrections:
        lines.append(
            "Shares count 512-byte CUDA blocks; other+CUDA: buffers, inputs, cuBLAS workspace, "
            "allocator segments, CUDA context."
        )
    lines.append(
        "GFLOP/sample: training FLOPs that update every layer once per sample (DiffusionBlocks: its B "
        "block-steps), counted on the same fake step."
    )
    bought = what_each_buys(plan)
    if bought:
        lines.append(bought)
    if any(e.micro_batch_size is not None for e in plan.entries):
        lines.append(
            f"micro x steps: the largest micro-batch (at least {plan.min_micro_batch}) whose gradient-accumulating "
            "step fits, and the micro-batches that make up the batch (x1: the plain step fits)."
        )
    estimate = format_time_estimate(plan)
    if estimate:
        lines.append(estimate)
    lines += link_lines(plan)
    lines += depth_lines(plan)
    if plan.verdict is not None:
        lines += ["", f"Verdict ({plan.verdict.decision}): {plan.verdict.headline}"]
        lines += [f"- {r.sentence}" for r in plan.verdict.reasons]
    return "\n".join(lines)


def what_each_buys(plan: Plan) -> str | None:
    """One sentence: each technique's largest batch on the target and its compute per sample."""
    e2e = plan.get("e2e")
    base = e2e.flops_per_sample if e2e is not None and e2e.ok else None
    parts = [
        f"{e.technique} batch {e.max_batch_size}"
        + (f" at {e.flops_per_sample / base:.2f}x e2e's FLOPs" if base and e.flops_per_sample else "")
        for e in plan.entries
        if e.ok and e.max_batch_size is not None
    ]
    if not parts or plan.capacity_bytes is None:
        return None
    return f"What each technique buys on {plan.device}: " + "; ".join(parts) + "."


def link_lines(plan: Plan) -> list[str]:
    """Offloading techniques: the bytes over the host link per step and whether they hide."""
    lines = []
    for e in plan.entries:
        link, moved = e.extra.get("host_link"), e.extra.get("host_transfer")
        if not link or not moved:
            continue
        exposed = link["exposed_s"]
        verdict = (
            "overlap unknown"
            if exposed is None
            else ("hidden behind the compute" if exposed == 0 else f"{format_duration(exposed)} exposed per step")
        )
        compute = f" against {format_duration(link['compute_s'])} of compute" if link["compute_s"] else ""
        lines.append(
            f"Host link ({link['link']}, {link['bytes_per_s'] / 1e9:.0f} GB/s each way): {e.technique} moves "
            f"{format_bytes(moved.get('to_host_bytes', 0))} out and {format_bytes(moved.get('to_device_bytes', 0))} "
            f"back per step, {format_duration(link['to_host_s'])} + {format_duration(link['to_device_s'])}{compute} "
            f"({link['rule']}): {verdict}."
        )
    return lines


def depth_lines(plan: Plan) -> list[str]:
    """Which path each entry's fake run took (dbprofile.measure.depth): extrapolated or full trace."""
    by_path: dict[tuple[str, str], list[str]] = {}
    not_affine: set[str] = set()
    for e in plan.entries:
        info = e.extra.get("depth")
        if info:
            by_path.setdefault((info["path"], info["reason"]), []).append(e.technique)
            not_affine.update(info.get("not_affine", []))
    lines = []
    for (path, reason), names in by_path.items():
        if path == "extrapolated":
            lines.append(
                f"Depth: {', '.join(names)} extrapolated from shallow traces ({reason}; checked to the byte "
                "at the deepest); --full-trace traces every layer."
            )
        else:
            lines.append(f"Depth: {', '.join(names)} traced every layer ({reason}).")
    if not_affine:
        lines.append(f"Depth: not affine in the depth, so not extrapolated: {', '.join(sorted(not_affine))}.")
    return lines


views.install_text(Plan, format_plan)


# ---------------------------------------------------------------- GPU validation (markdown)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:+.1f}%"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else format_bytes(n, "MiB", 1)


VALIDATION_HEADER = (
    "| model | batch | technique | precision | tracked | of which workspace | max allocated | tracker err "
    "| planned allocated | plan err (allocated) | reserved | plan err (reserved) | NVML used | NVML - reserved "
    "| plan vs tracker | step |\n"
    "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def validation_row(row: ValidationRow) -> str:
    if row.status != "ok":
        return (
            f"| {row.model} | {row.batch_size} | {row.technique} | {row.precision} | {row.status.upper()}: "
            f"{(row.error or '')[:120]} |" + " |" * 12
        )
    step = "n/a" if row.step_time_s is None else f"{row.step_time_s * 1000:.1f} ms"
    return (
        f"| {row.model} | {row.batch_size} | {row.technique} | {row.precision} | {_mib(row.tracked_peak_bytes)} "
        f"| {_mib(row.workspace_bytes)} | {_mib(row.max_allocated_bytes)} | {_pct(row.tracker_error)} "
        f"| {_mib(row.planned_allocated_bytes)} | {_pct(row.planner_error_allocated)} | {_mib(row.max_reserved_bytes)} "
        f"| {_pct(row.planner_error_reserved)} | {_mib(row.nvml_used_bytes)} | {_mib(row.nvml_minus_reserved_bytes)} "
        f"| {_pct(row.planner_error_tracked)} | {step} |"
    )


def validation_summary(rows: list[ValidationRow]) -> str:
    """Worst absolute errors over the rows that ran."""
    ok = [r for r in rows if r.status == "ok"]

    def worst(name: str) -> str:
        values = [getattr(r, name) for r in ok if getattr(r, name) is not None]
        return "n/a" if not values else f"{max(abs(v) for v in values) * 100:.1f}%"

    gaps = [r.nvml_minus_reserved_bytes for r in ok if r.nvml_minus_reserved_bytes is not None]
    lines = [
        f"configurations: {len(rows)} ({len(ok)} ran, {len(rows) - len(ok)} failed)",
        f"worst |tracker - max_allocated| / max_allocated: {worst('tracker_error')}",
        f"worst |planned - measured|: allocated {worst('planner_error_allocated')}, "
        f"reserved {worst('planner_error_reserved')}, tensor bytes (fake vs real) {worst('planner_error_tracked')}",
    ]
    if gaps:
        lines.append(
            f"NVML used - max reserved: {format_bytes(min(gaps))} to {format_bytes(max(gaps))} "
            "(CUDA context, libraries, and anything else on the card)"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- presets


def preset_list(rows: list[dict[str, Any]]) -> str:
    """``dbprofile models``: one line per preset."""
    lines = [f"{'name':<14} {'family':<6} {'task':<15} {'layers':>6} {'hidden':>6} {'parameters':>14}  description"]
    for row in rows:
        lines.append(
            f"{row['name']:<14} {row['family']:<6} {row['task']:<15} {row['layers']:>6} {row['hidden_size']:>6} "
            f"{row['parameters']:>14,}  {row['description']}"
        )
    return "\n".join(lines)
