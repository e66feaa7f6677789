"""Text on a mixture-of-experts model's experts: their parameters, the memory their blocks made at
each peak, and the routing real steps saw. The run table, the plan's text and the report's
subtitle print these lines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dbprofile.units import format_bytes


def experts_summary(facts: dict[str, Any]) -> str:
    """One sentence on a mixture-of-experts model's experts (dbprofile.models.hf_moe.moe_facts)."""
    shared = facts.get("shared_expert_parameters") or 0
    return (
        f"experts: {facts['moe_layers']} MoE layers x {facts['experts_per_layer']} experts, "
        f"top-{facts['experts_per_token']}"
        + (f", plus shared experts ({shared:,} parameters)" if shared else "")
        + f"; routed experts hold {facts['expert_parameter_share']:.1%} of the parameters, the routers "
        f"{facts['router_parameters']:,}; {facts['active_parameters_per_token']:,} parameters active per token; "
        f"assumed: {facts['routing']}"
    )


def moe_memory(measurements: Sequence[Any]) -> list[str]:
    """A line per measurement on the activations its MoE blocks made that are live at its peak
    (``extra['moe_at_peak']``, dbprofile.measure.regions), and one for those whose peak holds none."""
    lines, without = [], []
    for m in measurements:
        made = m.extra.get("moe_at_peak") if m.ok else None
        if not isinstance(made, dict):
            continue
        activations = m.shares.get("activations", 0)
        if not activations:
            without.append(f"{m.technique} @ {m.batch_size} ({m.peak_phase})")
            continue
        temporaries = f"; {format_bytes(made['temporaries'])} of temporaries" if made.get("temporaries") else ""
        lines.append(
            f"MoE blocks at the peak of {m.technique} @ batch {m.batch_size}: {format_bytes(made['activations'])} "
            f"of the {format_bytes(activations)} activations ({made['activations'] / activations:.1%}) made by "
            f"routers, dispatch and experts{temporaries}"
        )
    if without:
        lines.append(f"MoE blocks: no activations are held at the peak of {', '.join(without)}")
    return lines


def routing_seen(measurements: Sequence[Any]) -> list[str]:
    """A line per real measurement on the routing its tracked steps saw (``extra['observed']``)."""
    lines = []
    for m in measurements:
        seen = m.extra.get("observed") or {}
        parts = [seen] if "max_over_mean" in seen else list(seen.values())
        loads = [p["max_over_mean"] for p in parts if p.get("max_over_mean") is not None]
        if loads:
            lines.append(
                f"routing seen by {m.technique} @ batch {m.batch_size}: busiest expert {max(loads):.2f}x the mean "
                "load (1.00 = balanced; bytes do not depend on it, step time does)"
            )
    return lines
