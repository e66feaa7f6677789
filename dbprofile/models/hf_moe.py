"""Mixture-of-experts ``hf:`` causal LMs (Mixtral, Qwen-MoE, ...): the expert matmul path dbprofile
runs them on, the facts a report shows about their experts, and the routing a real step saw.

**The matmul path.** transformers runs a layer's experts as grouped matmuls over the tokens
sorted by expert (``grouped_mm_experts_forward``), through ``torch.nn.functional.grouped_mm``
where it can. That kernel has no fake-tensor rule outside bf16 (its meta function copies the
CUDA kernel's dtype and 16-byte stride checks), so an fp32 or autocast run, whose expert
weights are fp32, cannot be traced. transformers has its own fallback for that case, the custom
op ``transformers::grouped_mm_fallback`` (one ``mm`` per expert into slices of one output, with a
registered fake function and backward), which it picks when ``_can_use_grouped_mm`` says no.
``use_grouped_mm_fallback`` makes it say no in this process, for real and fake runs alike:
the two must take one path to agree to the byte, and the fallback's tensors are the grouped
kernel's (an (S, out) output, S = tokens x top-k; the same gradients), plus the (E,) int32
offsets it keeps on its autograd node until the loss is freed (E x 4 bytes per MoE layer).

**Routing and memory.** The routing is data that fake tensors cannot see; a plan does not need
it. transformers' experts are dropless: every token goes to exactly top-k experts, and every
routed tensor has S = tokens x top-k rows however the tokens are spread over experts, so the
bytes of a step do not depend on the routing (tests/test_moe.py pins it by sending every token
to one expert). What the routing changes is per-expert compute (one expert doing all the work
is a longer step) and, with capacity-limited or expert-parallel implementations that dbprofile
does not model, memory. Real runs record the tokens each expert received (``observe_routing``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from dbprofile.spec import SpecError
from dbprofile.torch_internals import is_fake

ROUTING_ASSUMPTION = (
    "dropless top-k routing: every token reaches exactly top-k experts, so routed tensors have "
    "tokens x top-k rows whatever the balance; step bytes do not depend on the routing"
)


def is_moe(config: Any) -> bool:
    """True for configs with routed experts (``num_experts_per_tok`` and an expert count)."""
    return bool(getattr(config, "num_experts_per_tok", None)) and num_experts(config) > 1


def num_experts(config: Any) -> int:
    return int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0)


def use_grouped_mm_fallback() -> None:
    """Route transformers' expert matmuls through its own fallback op (module doc), once per process."""
    from transformers.integrations import moe

    check = getattr(moe, "_can_use_grouped_mm", None)
    if check is None:
        raise SpecError(
            "This transformers version has no transformers.integrations.moe._can_use_grouped_mm, which "
            "dbprofile switches off to trace mixture-of-experts layers under fake tensors. Use the "
            "transformers version in pyproject.toml, or report the version you have."
        )
    if not getattr(check, "dbprofile_fallback", False):

        def never(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> bool:
            return False

        never.dbprofile_fallback = True  # type: ignore[attr-defined]
        moe._can_use_grouped_mm = never


def _is_experts(module: nn.Module) -> bool:
    """transformers' routed-experts modules: ``*Experts`` with ``num_experts`` and 3-D weights."""
    return type(module).__name__.endswith("Experts") and isinstance(getattr(module, "num_experts", None), int)


def _experts_of(module: nn.Module) -> int:
    count = getattr(module, "num_experts", None)
    assert isinstance(count, int)  # _is_experts checked it
    return count


def _count(modules: list[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def routed_blocks(model: nn.Module) -> list[nn.Module]:
    """The sparse MoE blocks of ``model``: each holds a routed-experts module beside its router (and
    any shared experts), and its forward is the whole routed path (ModelSpec.routed_modules)."""
    return [m for m in model.modules() if any(_is_experts(c) for c in m.children())]


def moe_facts(model: nn.Module, config: Any) -> dict[str, Any]:
    """What a report shows about the experts of ``model`` (built on meta): counts and parameter shares."""
    experts = [m for m in model.modules() if _is_experts(m)]
    # The sparse MoE blocks hold the experts, their router (``gate``) and any shared experts.
    blocks = routed_blocks(model)
    gates = [gate for m in blocks if isinstance(gate := getattr(m, "gate", None), nn.Module)]
    # shared_expert and its gate (Qwen2-MoE), shared_experts (DeepSeek)
    shared = [c for m in blocks for name, c in m.named_children() if name.startswith("shared_expert")]
    total = sum(p.numel() for p in model.parameters())
    routed, router, shared_count = _count(experts), _count(gates), _count(shared)
    e, k = num_experts(config), int(config.num_experts_per_tok)
    # Per token, k of the E routed experts run: the rest of the expert weights sit idle.
    active = total - routed + routed * k // e
    return {
        "moe_layers": len(experts),
        "experts_per_layer": e,
        "experts_per_token": k,
        "expert_parameters": routed,
        "shared_expert_parameters": shared_count,
        "router_parameters": router,
        "expert_parameter_share": round(routed / total, 4) if total else 0.0,
        "active_parameters_per_token": active,
        "routing": ROUTING_ASSUMPTION,
    }


@contextlib.contextmanager
def observe_routing(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Record, during the real step inside the block, how many token slots each expert of each
    MoE layer received; fake steps record nothing (their routing has no values). Yields the dict
    it fills: ``tokens_per_expert`` (one list per MoE layer that ran, in layer order) and
    ``max_over_mean`` (the busiest expert's load over the mean load, 1.0 = perfectly balanced)."""
    counts: dict[int, np.ndarray] = {}
    seen: dict[str, Any] = {}

    def make_hook(index: int, experts: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            top_k_index = args[1]
            # A checkpointed layer runs its experts again in backward on the same routing: the
            # step's routing is its first call's.
            if is_fake(top_k_index) or index in counts:
                return
            # Counted in numpy: a tensor made here would be one the memory tracker counts in the
            # real step and not in the fake one.
            counted = np.bincount(top_k_index.cpu().numpy().reshape(-1), minlength=experts)[:experts]
            counts[index] = counted

        return hook

    layers = [m for m in model.modules() if _is_experts(m)]
    handles = [m.register_forward_pre_hook(make_hook(i, _experts_of(m))) for i, m in enumerate(layers)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
        if counts:
            per_layer = [counts[i].tolist() for i in sorted(counts)]
            loads = [c for layer in per_layer for c in layer]
            mean = sum(loads) / len(loads)
            seen["tokens_per_expert"] = per_layer
            seen["max_over_mean"] = round(max(loads) / mean, 3) if mean else None
