"""DiffusionBlocks' CUDA caching-allocator replay at full depth, built from db:1's replays
(dbprofile.measure.shared_blocks derives every other figure of db:B from db:1's traces; this gives its
reserved bytes exactly instead of estimating them).

A warmed-up db:B run, as dbprofile.measure.warmup replays it, allocates the whole model's parameters
and buffers, then each block's warm-up step (its block-step, with the optimizer state of the parameters
it is the first to step made where AdamW's ``_init_group`` makes it: the shared parameters' and its
layers' for the first block, its layers' only for the others), then each block's tracked step. A
block-step of k layers is db:1's step on k layers (the same ops; the other layers only sit there), so
its events are db:1's tracked step at depth k, and its state is db:1's at depth k with the shared
parameters' left out after the first block. So from db:1's recorded replays at depths 2 to 5:

- the parameters' events and each block length's step are extended to their depth
  (dbprofile.measure.event_extrapolation, four depths: a step's frees may reach back to a layer the
  shallowest traces do not have yet), or read off a traced depth;
- where the state goes in a step (its position is affine in the depth, checked at every traced depth)
  and which state tensors belong to layers (the parameters' layers, recorded by the replay: shared
  ones, then the same tensors per layer, then shared ones, at every traced depth);
- and the sequence is put together in the order above and replayed.

db:1's state may have been made without a step (dbprofile.measure.warmup.StateWarmup) or by a real
warm-up step (SGD, a ViT whose class token gets no gradient: warmup.StepParts finds it where the
warm-up step's events first differ from the tracked step's). Anything else (a warm-up step that makes
more than the state, a step that hands a tensor on to the next, a layout that differs between depths)
raises NotAffine and the caller estimates. tests/test_block_replay.py compares
the result with db:B's own full-depth replay on Llama, GPT and DiT presets, equal and unequal blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dbprofile.measure.allocator import FREED
from dbprofile.measure.event_extrapolation import Event, EventExtension, in_allocation_order, replayed
from dbprofile.measure.step_extrapolation import NotAffine

EVENT_DEPTHS = (2, 3, 4, 5)
"""The db:1 depths whose replays are extended: a fourth checks rules a short run cannot show."""


@dataclass
class _OneBlockReplay:
    """db:1's replay at one depth, cut into what db:B's is made of."""

    params: list[Event]
    step: list[Event]
    state_at: int
    state_sizes: list[int]
    state_layers: list[int | None]


def _cut(units: Any) -> _OneBlockReplay:
    """db:1's recorded replay (UnitTraces ``allocator``) as parameters, one step and where its state goes."""
    alloc = getattr(units, "allocator", None)
    parts = getattr(alloc, "parts", None)
    if alloc is None or parts is None or alloc.events is None:
        raise NotAffine("db:1's replay was not recorded with its parts (its state was made by steps)")
    events = alloc.events
    if len(parts.steps) != 2 or parts.steps[0].state is None or parts.steps[1].state is not None:
        raise NotAffine("db:1's replay is not one warm-up step with its state and one tracked step")
    warm, tracked = parts.steps
    state_start, state_end = warm.state
    state = events[state_start:state_end]
    at = state_start - warm.start
    # A run of frees is put in allocation order (in_allocation_order) on either side of where the state
    # goes: the warm-up step makes the state there, between them.
    step = in_allocation_order(events[tracked.start : tracked.end], at)
    if any(n == FREED for _, n in state) or not _self_contained(step):
        raise NotAffine("db:1's step hands tensors on to the next step")
    # The warm-up step is the tracked step with the state made inside it (same sizes, same order).
    warm_events = in_allocation_order(events[warm.start : state_start] + events[state_end : warm.end], at)
    if _shape(warm_events) != _shape(step):
        raise NotAffine("db:1's warm-up step is not its tracked step with the state made first")
    return _OneBlockReplay(events[: parts.params_end], step, at, [n for _, n in state], list(warm.state_layers))


def builds_blocks(units: Any) -> bool:
    """Whether db:1's traced run (UnitTraces) recorded a replay that db:B's can be built from."""
    try:
        _cut(units)
    except NotAffine:
        return False
    return True


def _self_contained(events: Sequence[Event]) -> bool:
    """Every free releases a malloc of the same sequence, and every malloc is freed in it."""
    live: set[int] = set()
    for handle, nbytes in events:
        if nbytes == FREED:
            if handle not in live:
                return False
            live.discard(handle)
        else:
            live.add(handle)
    return not live


def _shape(events: Sequence[Event]) -> list[tuple[int, int]]:
    """Events with each free as the distance back to its malloc: equal for the same program."""
    made: dict[int, int] = {}
    out = []
    for i, (handle, nbytes) in enumerate(events):
        if nbytes == FREED:
            out.append((FREED, i - made[handle]))
        else:
            made[handle] = i
            out.append((nbytes, 0))
    return out


def _layer_state(replays: dict[int, _OneBlockReplay]) -> tuple[list[int], list[int], list[int]]:
    """(the shared parameters' state sizes before the layers', one layer's, after): the same at every
    traced depth, each layer's state together and in layer order; NotAffine otherwise."""
    found = set()
    for depth, r in replays.items():
        labels, sizes = r.state_layers, r.state_sizes
        inside = [i for i, label in enumerate(labels) if label is not None]
        if not inside or len(inside) % depth:
            raise NotAffine("db:1's state is not the same tensors for every layer")
        first, last = inside[0], inside[-1]
        per = len(inside) // depth
        if last - first + 1 != len(inside) or labels[first : last + 1] != [i for i in range(depth) for _ in range(per)]:
            raise NotAffine("db:1's state is not made layer by layer")
        layer = sizes[first : first + per]
        if sizes[first : last + 1] != layer * depth:
            raise NotAffine("db:1's layers do not have the same state")
        found.add((tuple(sizes[:first]), tuple(layer), tuple(sizes[last + 1 :])))
    if len(found) != 1:
        raise NotAffine("db:1's shared state differs between depths")
    shared_before, one_layer, shared_after = found.pop()
    return list(shared_before), list(one_layer), list(shared_after)


def _at_depth(replays: dict[int, _OneBlockReplay], k: int, extension: EventExtension) -> tuple[list[Event], int]:
    """db:1's step at ``k`` layers and where its state goes: traced, or extended from the traced depths."""
    if k in replays:
        return replays[k].step, replays[k].state_at
    if k < EVENT_DEPTHS[0]:
        raise NotAffine("a block shorter than the traced depths was not traced")
    at = [replays[d].state_at for d in EVENT_DEPTHS]
    per_depth = at[1] - at[0]
    if any(a != at[0] + per_depth * i for i, a in enumerate(at)):
        raise NotAffine("where db:1's state goes is not affine in the depth")
    return extension.at(k - EVENT_DEPTHS[0]), at[0] + per_depth * (k - EVENT_DEPTHS[0])


def _extensions(units_by_depth: dict[int, Any]) -> tuple[dict[int, _OneBlockReplay], EventExtension, EventExtension]:
    """db:1's replays cut, and the structures of its parameters' and its step's events: found once per
    set of traces (kept on the shallowest one's UnitTraces), which every B of a plan shares."""
    kept = units_by_depth[EVENT_DEPTHS[0]]
    if getattr(kept, "block_replay", None) is None:
        if any(d not in units_by_depth for d in EVENT_DEPTHS):
            raise NotAffine("db:1's replays were not recorded at every depth they are extended from")
        replays = {d: _cut(units_by_depth[d]) for d in EVENT_DEPTHS}
        params = EventExtension([replays[d].params for d in EVENT_DEPTHS])
        steps = EventExtension([replays[d].step for d in EVENT_DEPTHS], reorder_frees=False)
        kept.block_replay = (replays, params, steps)
    replays, params, steps = kept.block_replay
    # a shorter block length traced since (db:12's one-layer blocks, after db:2 of the same plan)
    replays.update({d: _cut(units) for d, units in units_by_depth.items() if d not in replays})
    return replays, params, steps


def _append(out: list[Event], events: Sequence[Event], handles: dict[int, int]) -> None:
    """``events`` added to ``out`` with their handles renamed to positions in ``out`` (``handles``
    carries the renaming of one sequence's handles across calls)."""
    for handle, nbytes in events:
        if nbytes == FREED:
            out.append((handles.pop(handle), FREED))
        else:
            handles[handle] = len(out)
            out.append((len(out), nbytes))


def block_replay(units_by_depth: dict[int, Any], lengths: list[int], layers: int) -> dict[str, int]:
    """The allocator model's figures of db:B with blocks of ``lengths`` layers on ``layers`` layers,
    from db:1's traces (depth -> UnitTraces) at EVENT_DEPTHS and any shorter block length; NotAffine
    where db:1's replays do not build it (module docstring)."""
    if EVENT_DEPTHS[0] not in units_by_depth:
        raise NotAffine("db:1 was not traced at the depths its replays are extended from")
    replays, params_extension, step_extension = _extensions(units_by_depth)
    before, layer, after = _layer_state({d: replays[d] for d in EVENT_DEPTHS})
    params = params_extension.at(layers - EVENT_DEPTHS[0])
    steps = {k: _at_depth(replays, k, step_extension) for k in set(lengths)}
    out: list[Event] = []
    _append(out, params, {})
    for b, k in enumerate(lengths):  # each block's warm-up step, its state made inside it
        step, at = steps[k]
        state = (before if b == 0 else []) + layer * k + (after if b == 0 else [])
        handles: dict[int, int] = {}
        _append(out, step[:at], handles)
        _append(out, [(-1 - i, n) for i, n in enumerate(state)], {})
        _append(out, step[at:], handles)
    for k in lengths:  # each block's tracked step
        _append(out, steps[k][0], {})
    return replayed(out)
