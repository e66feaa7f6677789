"""What a team would run instead of DiffusionBlocks, and which of it is best (docs/verdict.md).

An ``Option`` is one way a technique trains the asked batch on the target: in one step when its
plain step fits, or accumulating gradients over micro-batches when only a smaller micro-batch fits
(plans only: dbprofile.planner.accumulation measures the accumulating step). Accumulation is
offered only for models whose loss is a mean over independent samples (no BatchNorm, no in-batch
negatives) and only down to the plan's minimum micro-batch.

Options are ranked by their estimated compute per trained sample: the counted FLOPs (recomputation
included), plus, for an offloading technique, the host-link seconds that do not hide behind its
compute on the target, turned into FLOPs at the target's assumed rate. Options within
``COST_TIE`` of the cheapest count as equal in compute, and then the simplest wins: no recomputation
and no link first (``SIMPLICITY``), then the fewest micro-batches, then the least memory. The
FLOPs leave out the element-wise work selective checkpointing recomputes, which is why SAC ranks
after plain accumulation at equal FLOPs."""

from __future__ import annotations

from dataclasses import dataclass

from dbprofile.results import Reason
from dbprofile.units import format_bytes
from dbprofile.verdict.evidence import Row, Situation, row_fits

COST_TIE = 0.005
"""Options whose compute per sample is within this fraction of the cheapest are equal in compute."""

SIMPLICITY = {"e2e": 0, "offload": 1, "sac": 2, "sac:alt": 3, "ckpt": 5}
"""Preference at equal compute: what a technique adds to a plain step (ckpt:K between sac and ckpt;
DiffusionBlocks configurations are ranked by their own rules)."""


@dataclass(frozen=True)
class Option:
    """One way to train the asked batch: ``row``'s technique in ``steps`` micro-batches of ``micro_batch``."""

    row: Row
    micro_batch: int
    steps: int
    required: int
    cost: float | None
    """Estimated compute per trained sample, in FLOPs (link time converted); None when not counted."""

    @property
    def technique(self) -> str:
        return self.row.technique

    @property
    def label(self) -> str:
        if self.steps == 1:
            return self.row.technique
        return f"{self.row.technique} with {self.steps} micro-batches of {self.micro_batch}"

    @property
    def described(self) -> str:
        return f"{self.label} ({format_bytes(self.required)})"


def option_cost(row: Row, s: Situation) -> float | None:
    if row.flops_per_sample is None:
        return None
    if row.technique == "offload" and (row.exposed_transfer_s_per_sample is None or not s.seconds_per_flop):
        # No GPU target (a CPU run, a bare capacity): its link time is unknown, so its cost is too; it
        # then ranks after every option whose cost is known.
        return None
    if row.exposed_transfer_s_per_sample and s.seconds_per_flop:
        return row.flops_per_sample + row.exposed_transfer_s_per_sample / s.seconds_per_flop
    return row.flops_per_sample


def option_of(row: Row, s: Situation, plain: bool = True) -> Option | None:
    """How ``row``'s technique trains the batch on the target: its plain step when it fits (and
    ``plain``), else accumulating micro-batches when the plan found a micro-batch that fits."""
    cost = option_cost(row, s)
    if plain and row_fits(row, s):
        return Option(row, row.batch_size, 1, row.required, cost)
    acc = row.accumulation_required
    if (
        s.exact_accumulation
        and row.micro_batch_size is not None
        and (row.accumulation_steps or 1) > 1
        and row.micro_batch_size >= s.min_micro_batch
        and acc is not None
        and (s.capacity is None or acc <= s.capacity)
    ):
        return Option(row, row.micro_batch_size, row.accumulation_steps or 1, acc, cost)
    return None


def simplicity(technique: str) -> int:
    if technique.startswith("ckpt:"):
        return 4
    return SIMPLICITY.get(technique, 6)


def best_of(options: list[Option]) -> Option | None:
    """The cheapest option; within COST_TIE of it, the simplest, fewest micro-batches, least memory."""
    if not options:
        return None
    known = [o.cost for o in options if o.cost is not None]
    floor = min(known) if known else None

    def key(o: Option) -> tuple:
        dearer = o.cost is None or (floor is not None and o.cost > floor * (1 + COST_TIE))
        return (dearer, o.cost if dearer and o.cost is not None else 0.0, simplicity(o.technique), o.steps, o.required)

    return min(options, key=key)


def cost_ratio(option: Option, rival: Option | None) -> float | None:
    if rival is None or option.cost is None or not rival.cost:
        return None
    return option.cost / rival.cost


def reason_alternatives(options: list[Option], best: Option | None, e2e: Row | None, s: Situation) -> Reason:
    """The alternatives that train the batch on the target, their compute, and the best one."""

    def ratio(o: Option) -> str:
        if e2e is None or o.cost is None or not e2e.flops_per_sample:
            return ""
        link = " with link time" if o.row.exposed_transfer_s_per_sample else ""
        return f", {o.cost / e2e.flops_per_sample:.2f}x e2e's compute{link}"

    listed = "; ".join(f"{o.described}{ratio(o)}" for o in options)
    others = [o for o in options if o is not best]
    runner_up = best_of(others)
    second = f" Runner-up: {runner_up.described}{ratio(runner_up)}." if runner_up is not None else ""
    rule = (
        "accumulation only for a loss without batch statistics"
        if not s.exact_accumulation
        else f"micro-batches of at least {s.min_micro_batch}"
    )
    if best is None:
        sentence = f"No alternative to DiffusionBlocks trains batch {s.batch_size} on {s.target} ({rule})."
    else:
        sentence = (
            f"What trains batch {s.batch_size} on {s.target} without DiffusionBlocks ({rule}): {listed}. "
            f"Best: {best.label}, the least compute per sample (ties within {COST_TIE:.1%} go to the simplest).{second}"
        )
    return Reason(
        rule="alternatives",
        sentence=sentence,
        numbers={
            "best": best.technique if best else None,
            "best_micro_batch": best.micro_batch if best else None,
            "best_accumulation_steps": best.steps if best else None,
            "runner_up": runner_up.label if runner_up is not None else None,
            "options": {o.label: {"required_bytes": o.required, "cost_flops_per_sample": o.cost} for o in options},
        },
    )
