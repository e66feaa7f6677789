"""Does a plan fit its target: headroom, shortfall, the largest batch size that fits (a linear
model of the peak in the batch size, confirmed by fake runs), and ``fits_on`` for another GPU."""

from __future__ import annotations

from collections.abc import Callable

from dbprofile.gpus import GPU
from dbprofile.planner.targets import Target, cuda_corrections, resolve_target
from dbprofile.results import Plan, PlanEntry
from dbprofile.vocabulary import STATE_CATEGORIES

BATCH_DEPENDENT = ("activations", "temporaries", "inputs")
"""Shares that grow with the batch size; the others (parameters, buffers, gradients, optimizer
state) and the CUDA corrections other than the allocator's fraction do not."""


MAX_CONFIRM_RUNS = 3
"""Fake runs at the linear model's guesses."""
MAX_BISECT_RUNS = 5
"""Further fake runs, each halving the gap between the largest batch confirmed to fit and the
smallest confirmed to miss, when the linear guesses left it open: the peak is a staircase (the
allocator's segments), and a line through its steps can keep missing."""
SETTLED_FRACTION = 0.05
"""Bisection stops once that gap is within this fraction of the largest batch that fits (the
linear guesses, when they work, end within 0.1% of the refitted maximum)."""

MISS_MARGIN = 0.005
"""After a confirming run misses, the next guess aims this fraction of the capacity lower."""


def find_max_batch(entry: PlanEntry, predict: Callable[[int], PlanEntry], capacity: int, confirm: bool) -> None:
    """The largest batch size whose prediction fits ``capacity``.

    First model: peak(b) = fixed + per_sample * b from the one run at the plan's batch size,
    with the batch-dependent shares (activations, temporaries, inputs) as per_sample * b. Then,
    when ``confirm``, a fake run at the predicted maximum checks it; if it misses, the two runs
    give the line (a two-point fit) and the next guess, at most MAX_CONFIRM_RUNS runs. Every
    guess lies strictly between the largest batch confirmed to fit and the smallest confirmed to
    miss (a guess outside is replaced by their midpoint), and where the guesses leave that gap
    open, up to MAX_BISECT_RUNS halve it: the answer is a confirmed fit, never just the plan's
    own batch size because the line kept landing on a step of the staircase. Where the state alone
    (``state_floor``) misses the capacity, no batch size fits and no run is needed to say so.
    """
    b1 = entry.batch_size
    if confirm and (floor := state_floor(entry)) > capacity:
        # No batch size fits: every one's peak is at least this entry's state at its peak's instant.
        entry.max_batch_size = 0
        entry.linear_fit = {"points": [(b1, entry.peak_bytes)], "confirmed": True, "state_floor_bytes": floor}
        return
    variable = sum(entry.shares.get(c, 0) for c in BATCH_DEPENDENT)
    # Of the CUDA corrections only the allocator's segments grow with the tracked bytes: in the
    # proportion this entry's own prediction has (the replayed one, or the measured fraction).
    segments = entry.corrections.get("allocator_segments")
    allocated = entry.tracked_peak_bytes + entry.corrections.get("cublas_workspace", 0)
    scale = 1 + segments / max(allocated, 1) if segments is not None else 1.0
    per_sample = variable * scale / b1
    fixed = entry.peak_bytes - per_sample * b1
    points = {b1: entry.peak_bytes}

    def guess_from(fixed: float, per_sample: float, margin: float = 0.0) -> int:
        return max(int((capacity - margin - fixed) // per_sample), 0) if per_sample > 0 else 0

    guess = guess_from(fixed, per_sample)
    runs = 0
    while confirm and per_sample > 0 and runs < MAX_CONFIRM_RUNS + MAX_BISECT_RUNS:
        lo, hi = _gap(points, capacity)
        bisecting = runs >= MAX_CONFIRM_RUNS
        if bisecting and (hi is None or hi - lo <= max(1, int(SETTLED_FRACTION * lo))):
            break
        if bisecting or not lo < guess < (hi if hi is not None else guess + 1):
            guess = (lo + hi) // 2 if hi is not None else max(guess, 2 * lo)
        if guess < 1 or guess in points:
            break
        checked = predict(guess)
        runs += 1
        if not checked.ok:
            break
        points[guess] = checked.peak_bytes
        # Refit through the point nearest the capacity and the point farthest from it in batch
        # size, then guess again (or stop if the confirmed guess fits and guess + 1 is predicted
        # not to). Two near points would give a slope made of the allocator's 2 MiB / 20 MiB
        # rounding steps: on vit-tiny db:2 at 80 GiB, two guesses 142 samples apart, both a hair
        # over, gave a slope 0.56x the true one and the search ended on the first run's batch of 4.
        x1, y1 = min(points.items(), key=lambda kv: abs(kv[1] - capacity))
        x2, y2 = max(points.items(), key=lambda kv: abs(kv[0] - x1))
        if x1 != x2 and y1 != y2:
            per_sample = (y2 - y1) / (x2 - x1)
            fixed = y1 - per_sample * x1
        # After a miss, aim MISS_MARGIN below the capacity: the allocator's rounding makes the peak
        # a staircase, so a line through two points can keep landing a hair over (on vit-tiny db:2
        # at 80 GiB, three guesses 23-52 MB over, and the search fell back to the plan's batch of 4).
        margin = 0.0 if checked.peak_bytes <= capacity else MISS_MARGIN * capacity
        nxt = guess_from(fixed, per_sample, margin)
        # A confirmed fit within 0.1% of the refitted maximum is good enough: no more runs.
        if checked.peak_bytes <= capacity and nxt <= guess + max(1, guess // 1000):
            break
        guess = nxt
    fitting = [b for b, peak in points.items() if peak <= capacity]
    if not confirm and guess >= 1:
        fitting.append(guess)
    entry.max_batch_size = max(fitting, default=0) if per_sample > 0 else None
    entry.linear_fit = {
        "fixed_bytes": int(fixed),
        "per_sample_bytes": int(per_sample),
        "points": sorted(points.items()),
        "confirmed": confirm,
    }


def state_floor(entry: PlanEntry) -> int:
    """Bytes every batch size's peak reaches at least: the most state (parameters, buffers, gradients,
    optimizer state) live at one instant of the step, which is live at the same instant of a step of
    any batch size (``extra['state_peak_bytes']``, where the entry's shares are its measurement's or
    its simulated rank's; else the state at the entry's peak), plus the CUDA corrections that do not
    depend on the bytes (cuBLAS workspaces, context)."""
    fixed_corrections = sum(v for k, v in entry.corrections.items() if k != "allocator_segments")
    at_peak = sum(entry.shares.get(c, 0) for c in STATE_CATEGORIES)
    whole_step = entry.extra.get("state_peak_bytes")
    own_shares = entry.sharding == "none" or (
        entry.extra.get("sharding_model") == "simulated" and (entry.tensor_parallel or 1) == 1
    )
    if own_shares and isinstance(whole_step, int):
        at_peak = max(at_peak, whole_step)
    return at_peak + fixed_corrections


def _gap(points: dict[int, int], capacity: int) -> tuple[int, int | None]:
    """(the largest batch confirmed to fit, 0 if none; the smallest confirmed to miss, None if none)."""
    fit = [b for b, peak in points.items() if peak <= capacity]
    miss = [b for b, peak in points.items() if peak > capacity]
    return max(fit, default=0), min(miss, default=None)


def entry_corrections(entry: PlanEntry, target: Target) -> dict[str, int]:
    """``cuda_corrections`` for a planned entry on ``target``. The allocator replay (carried in
    ``entry.extra``) describes the one-device run; sharded shares get the fraction."""
    replay = entry.extra.get("allocator_model") if entry.sharding == "none" else None
    return cuda_corrections(entry.tracked_peak_bytes, target, replay["peak_reserved_bytes"] if replay else None)


def set_fit(entry: PlanEntry, capacity: int | None) -> None:
    """fits, headroom and shortfall of an entry against ``capacity`` (all None when unknown)."""
    if capacity is None or not entry.ok:
        entry.fits = entry.headroom_bytes = entry.shortfall_bytes = None
        return
    entry.headroom_bytes = capacity - entry.peak_bytes
    entry.fits = entry.headroom_bytes >= 0
    entry.shortfall_bytes = max(-entry.headroom_bytes, 0)


def nothing_fits(plan: Plan) -> bool:
    """The plan has a target capacity and no technique that ran fits it (or none ran at all)."""
    ok = [e for e in plan.entries if e.ok]
    return not ok or (plan.capacity_bytes is not None and not any(e.fits for e in ok))


def fits_on(plan: Plan, gpu: str | int | GPU | None = None, technique: str | None = None) -> bool:
    """Does ``technique`` (or any technique that ran) fit ``gpu`` (or the plan's target) at the
    plan's batch size? For another GPU the CUDA corrections are recomputed for that card; the
    tracked bytes, counted in CUDA's 512-byte blocks, and the allocator replay are the same on
    every CUDA device; the cuBLAS workspaces differ with the compute capability."""
    if technique is not None and plan.get(technique) is None:
        known = ", ".join(e.technique for e in plan.entries)
        raise ValueError(f"This plan has no technique {technique!r}; it planned {known}.")
    entries = [e for e in plan.entries if e.ok and (technique is None or e.technique == technique)]
    if gpu is None:
        if plan.capacity_bytes is None:
            raise ValueError(
                f"This plan targets {plan.device}, which has no capacity to fit; ask about a GPU: "
                "plan.fits('H100-80GB'), or plan with device='H100-80GB'."
            )
        return any(e.fits for e in entries)
    target = resolve_target(gpu)
    if target.capacity_bytes is None:
        raise ValueError(f"{gpu!r} has no memory capacity to fit; name a GPU ('A100-40GB') or a capacity in bytes.")
    if not plan.cuda_corrections:
        raise ValueError(
            f"This plan was made for {plan.device}, without CUDA's 512-byte blocks and corrections, so it cannot "
            f"answer for {target.name}; plan for that GPU instead: plan(spec, {plan.batch_size}, device={gpu!r})."
        )
    needs = [e.tracked_peak_bytes + sum(entry_corrections(e, target).values()) for e in entries]
    return any(n <= target.capacity_bytes for n in needs)
