"""Tensor parallelism in a plan: which rank to simulate, the per-device shares it gives, and the bytes
each device sends per step. The layout itself (which Linear is split how) is
dbprofile.methods.tensor_parallel; the simulation runs it on fake tensors in a fake process group
(dbprofile.measure.distributed.simulate_rank with ``tp``).

With ``--tp N`` beside ``--world-size W`` and ``--zero S`` the devices form a (W / N) x N mesh, TP
innermost (torchtitan's order: a TP group is the GPUs of one node):

- ZeRO-3: FSDP2 over the data-parallel dimension of the 2-D mesh, simulated as such (W ranks);
- ZeRO 0, 1, 2: one TP group is simulated (N ranks, no FSDP), and stages 1 and 2 then shard its
  optimizer state (and gradients) over the W / N data-parallel replicas by the ZeRO formula, the
  gathered unit being the largest layer's TP slice.

``batch_size`` stays the batch of one data-parallel rank, i.e. of one TP group: the N ranks of a group
compute on the same samples, each on 1/N of the heads and MLP width.
"""

from __future__ import annotations

from typing import Any

from dbprofile.planner.zero import ceil_div, shard_zero

RING = "ring"


def simulated_world(zero_stage: int, world_size: int, tp: int, pp: int = 1) -> tuple[int, bool]:
    """(ranks of the simulated process group, FSDP on?) for a non-block-parallel technique."""
    if zero_stage == 3:
        return world_size // pp, True
    return tp, False


def tp_shares(
    shares: dict[str, int], zero_stage: int, world_size: int, tp: int, unit_bytes: int, peak_phase: str | None
) -> dict[str, int]:
    """One device's shares from the simulated TP rank: as they are under ZeRO-3 (FSDP ran) or without
    ZeRO, sharded over the data-parallel replicas by the ZeRO formula at stages 1 and 2."""
    if zero_stage in (1, 2):
        return shard_zero(shares, zero_stage, world_size // tp, ceil_div(unit_bytes, tp), peak_phase)
    return dict(shares)


def ring_bytes(collective_bytes: dict[str, int], group_sizes: dict[str, int]) -> int:
    """Bytes one device sends per step for the collectives the trace saw, with ring algorithms (NCCL's
    for large messages): an all-reduce of S bytes over n ranks sends 2 (n - 1) / n x S, an all-gather
    (of S bytes out) and a reduce-scatter (of S bytes in) (n - 1) / n x S each. ``group_sizes`` gives n
    per kind (TP's all-reduces run in the TP group, FSDP's all-gathers and reduce-scatters in the
    data-parallel one)."""
    total = 0.0
    for kind, size in collective_bytes.items():
        n = group_sizes.get(kind, 1)
        if n <= 1:
            continue
        factor = 2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n
        total += factor * size
    return int(total)


def communication(
    extra: dict[str, Any], group_sizes: dict[str, int], replica_gradient_bytes: int = 0
) -> dict[str, Any]:
    """``{bytes_per_step, by_kind, rule}``: what one device sends per training step, from the simulated
    rank's collectives (``extra['collective_bytes']``, counted on the traced step) in groups of
    ``group_sizes``; ``replica_gradient_bytes`` adds the gradient all-reduce (or ZeRO-1/2's
    reduce-scatter and all-gather, the same bytes) of data-parallel replicas that were not simulated:
    2 (n - 1) / n of the gradients, n = ``group_sizes['replicas']``."""
    seen = {k: v for k, v in (extra.get("collective_bytes") or {}).items() if v}
    sent = ring_bytes(seen, group_sizes)
    replicas = group_sizes.get("replicas", 1)
    if replica_gradient_bytes and replicas > 1:
        seen["gradient_all_reduce"] = replica_gradient_bytes
        sent += int(2 * (replicas - 1) / replicas * replica_gradient_bytes)
    return {"bytes_per_step": sent, "by_kind": seen, "rule": RING}


def group_sizes(parallel_blocks: int | None, zero_stage: int, world_size: int, tp: int, pp: int = 1) -> dict[str, int]:
    """Ranks in the group of each kind of collective: block-parallel DiffusionBlocks all-reduces its shared
    gradients over its B devices; TP all-reduces activations in its group; FSDP gathers and scatters over the
    data-parallel dimension; without FSDP the data-parallel replicas all-reduce gradients. FSDP alone
    all-reduces only clipping's gradient norms, over the data-parallel ranks; beside TP, the TP group
    stands for all all-reduces (clipping's are then a few bytes beside the activations')."""
    if parallel_blocks is not None:
        return {"all_reduce": parallel_blocks}
    dp = world_size // (tp * pp)
    if zero_stage == 3:
        return {"all_reduce": tp if tp > 1 else dp, "all_gather": dp, "reduce_scatter": dp}
    return {"all_reduce": tp, "replicas": dp}
