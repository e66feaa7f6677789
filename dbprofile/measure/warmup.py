"""State without steps: a fake measurement's warm-up made by the optimizer's own first step instead
of a forward and backward of every unit.

The warm-up (dbprofile.measure.steps) exists to create the optimizer state, so that the tracked
step holds it as a warmed-up training step does. On fake tensors the planner can create that state
directly: every parameter a unit steps gets a zero gradient (untracked), the optimizer steps once
(its lazy state initialisation makes exactly the state tensors a first step makes; the update after
it, values only, is skipped: ``torch_internals.state_initialisation_only``), and the gradients are
dropped. The tracked steps then run as before. What the warm-up's forward and
backward left behind in the CUDA caching-allocator model (segments it reserved and cached) is
rebuilt without running them: the tracker records every allocation and free instead of placing
them (``AllocationRecorder``), and the replay places the allocations a warmed-up run makes, in its
order: the parameters and buffers, then each unit's warm-up step (its tracked step's allocations,
with the optimizer state of the parameters it is the first to step allocated where AdamW's
``_init_group`` allocates it, at the start of ``optimizer.step()``), then the tracked steps.

That is the warmed-up run only where the first step is a later step with the state made at the
start of the optimizer's step, and where a step leaves nothing behind but that state. So it is used
for AdamW (the other optimizers, and offloading DiffusionBlocks, which makes its host copies of every
block's parameters and state in its first step, warm up by steps; activation offloading's host copies
are the step's own, and its device bytes pass the checks below), and it is checked on every measurement: every allocation a tracked
step makes is freed within it and it frees nothing made before it, the step allocates between its
own start and end only, and the parameters that received gradients are exactly the ones given
state. A measurement that fails a check is measured again with the warm-up steps
(``finish`` returns None). tests/test_warmup.py compares the two on ViT, GPT, Llama and DiT presets:
every tracked point, the allocator figures and the FLOPs equal to the byte.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from dbprofile.measure.allocator import FREED, AllocationRecorder, CachingAllocatorModel, replay
from dbprofile.methods.base import step_optimizer
from dbprofile.methods.sharding import unshard_once
from dbprofile.settings import optimizer_parts
from dbprofile.techniques import Technique
from dbprofile.torch_internals import dtensor_local, state_initialisation_only

STATE_WARMUP_ALGORITHMS = ("adamw",)
"""Optimizers whose first step is a later step with its state made first (``_init_group`` at the
start of ``step``). SGD makes its momentum inside the update, from the gradient, so it warms up by steps."""


LAST_PHASE = "optimizer"
"""The phase a training step ends in (dbprofile.methods.base.Trainer.step), where a warmed-up
measurement's tracked step starts; a step that ends elsewhere is warmed up by a real step first."""


WARMUP_BY_STEPS = "steps"
"""``extra['warmup']`` of a fake measurement that tried to make its state without steps and could not."""


def learned_state_warmup(warmup: str | None, current: str) -> str:
    """The RunSettings.state_warmup for the next measurement of the same model and kind of trainer,
    from how this one's was made (``extra['warmup']``): start where it succeeded."""
    if warmup == WARMUP_BY_STEPS:
        return "off"
    if warmup is not None and warmup.startswith("optimizer state"):
        return "after-first" if "after" in warmup else "all"
    return current


STATE_WARMUP_TRIES = {"all": (0, 1), "after-first": (1,)}
"""RunSettings.state_warmup -> the units warmed up by a real step before the others get their state,
tried in turn (dbprofile.measure.warmup); a measurement that no try makes exactly warms up by steps."""


def state_warmup_applies(tech: Technique, optimizer: str) -> bool:
    """Whether a measurement of ``tech`` may make its state without warm-up steps (module docstring)."""
    algorithm, _ = optimizer_parts(optimizer)
    return algorithm in STATE_WARMUP_ALGORITHMS and not tech.offload


class StateWarmup:
    """The optimizer state of one measurement's trainer, made by one optimizer step, and the
    tracked steps' recorded allocations checked and replayed as a warmed-up run makes them.
    ``stepped_first``: units warmed up by a real step first (the first unit, for a model whose first
    step shows something a step-less state cannot: a tensor it caches on first use and keeps, a
    parameter that never gets a gradient); the others get state."""

    def __init__(
        self, trainer: Any, tracker: Any, recorder: AllocationRecorder, units: list, stepped_first: int
    ) -> None:
        self.trainer, self.tracker, self.recorder, self.units = trainer, tracker, recorder, units
        self.optimizer: torch.optim.Optimizer = trainer.optimizer
        self.stepped_first = units[:stepped_first]
        self.before_state = self.after_state = 0
        self.state_bytes: dict[int, list[int]] = {}
        self.given_state: set[int] = set()
        self.spans: list[tuple[int, int]] = []
        self.optimizer_at: list[int] = []
        self.stepped: list[list[torch.Tensor]] = []
        self.end_phases: list[str | None] = []
        # Blocks of one length run the same program (their layers alike, the other blocks resident
        # either way): one tracked step stands for all of them (the first of that length). Not where the
        # tracker also sums each step's collectives (a simulated FSDP rank): every block steps there.
        lengths = [len(layers) for layers in (trainer.block_layers or [[] for _ in units])]
        if hasattr(tracker, "collective_bytes"):
            lengths = list(range(len(units)))
        self.rep_of = {unit: units[lengths.index(n)] for unit, n in zip(units, lengths)}
        self._hook = self.optimizer.register_step_pre_hook(self._before_step)

    def make_state(self) -> None:
        """Every parameter some unit steps gets its state, through the optimizer's own step; call it
        after the real warm-up steps of ``stepped_first``."""
        have = {id(p) for params in self.stepped for p in params}
        wanted = {id(p) for unit in self.units for p in self.trainer.parameters_for_step(unit) if p.requires_grad}
        # A parameter the real warm-up step could have stepped but left without a gradient is not used
        # (a ViT's class token, which DiffusionBlocks replaces): no state, as in a warmed-up run.
        unused = {id(p) for unit in self.stepped_first for p in self.trainer.parameters_for_step(unit)} - have
        params = [
            p for group in self.optimizer.param_groups for p in group["params"] if id(p) in wanted - have - unused
        ]
        self.given_state = {id(p) for p in params}
        # FSDP makes its unsharded parameters' storages in its first step and keeps them (resized to 0)
        # for every later one: made here, before the state, as a warmed-up run has them.
        unshard_once(self.trainer)
        self.before_state = self.recorder.position()
        self._hook.remove()
        with self.tracker.paused():
            for p in params:
                p.grad = torch.zeros_like(p)
            if params:
                with state_initialisation_only(self.optimizer):
                    step_optimizer(self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
        self.tracker.refresh()  # the state as optimizer_state, allocated in the order it was made
        if not self.stepped_first:
            # A tracked step's first point carries the phase the step before it ended in.
            self.tracker.mark(LAST_PHASE)
        self.after_state = self.recorder.position()
        self.state_bytes = {id(p): state_sizes(self.optimizer, self.tracker, p) for p in params}
        self._hook = self.optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self.optimizer_at.append(self.recorder.position())
        self.stepped.append([p for group in optimizer.param_groups for p in group["params"] if p.grad is not None])

    @contextlib.contextmanager
    def span(self) -> Iterator[None]:
        """Around one unit's step (a real warm-up step, then each tracked step): where its
        allocations begin and end."""
        start = self.recorder.position()
        try:
            yield
        finally:
            self.spans.append((start, self.recorder.position()))
            self.end_phases.append(self.tracker.phase)

    def finish(self, record: bool = False) -> CachingAllocatorModel | None:
        """The allocator model after the allocations a warmed-up run makes (module docstring), or
        None when this measurement is not the warmed-up one (a check failed); ``record``: the model
        keeps the sequence it replayed (CachingAllocatorModel ``events``)."""
        self._hook.remove()
        events = self.recorder.events
        first = len(self.stepped_first)
        if len(self.optimizer_at) != len(self.spans):
            return None
        if self.after_state - self.before_state != sum(len(sizes) for sizes in self.state_bytes.values()):
            return None
        if any(nbytes == FREED for _, nbytes in events[self.before_state : self.after_state]):
            return None
        real, tracked = self.spans[:first], self.spans[first:]
        at, stepped = self.optimizer_at[first:], self.stepped[first:]
        if (real[-1][1] if real else self.before_state) != self.before_state or tracked[0][0] != self.after_state:
            return None
        if any(a[1] != b[0] for a, b in zip(tracked, tracked[1:])) or tracked[-1][1] != len(events):
            return None
        if not all(start <= where <= end for (start, end), where in zip(tracked, at)):
            return None
        if not first and set(self.end_phases) != {LAST_PHASE}:
            return None
        reps = list(dict.fromkeys(self.rep_of.values()))
        if len(tracked) != len(reps):
            return None
        index_of = {unit: first + reps.index(self.rep_of[unit]) for unit in self.units}
        stepped_of = {unit: self._stepped(unit, stepped[reps.index(self.rep_of[unit])]) for unit in self.units}
        if any(v is None for v in stepped_of.values()):
            return None
        stated = {id(p) for params in self.stepped[:first] for p in params}
        if {id(p) for params in stepped_of.values() for p in params or []} != stated | self.given_state:
            return None
        handed = _handed_on([events[start:end] for start, end in self.spans], first)
        if handed is None:
            return None
        own, taken = handed
        alloc = CachingAllocatorModel(record)
        replay(alloc, events[: real[0][0] if real else self.before_state], {})  # parameters, buffers
        # The order of a warmed-up run: each unit's warm-up step (the real ones as recorded, the others
        # their tracked step with the state made at the start of the optimizer's step), then the
        # tracked steps. A step frees what the step before it handed on (_handed_on).
        order: list[tuple[int, int | None, Any]] = [(i, None, None) for i in range(first)]
        order += [(index_of[u], self.optimizer_at[index_of[u]], u) for u in self.units[first:]]
        order += [(index_of[u], None, None) for u in self.units]
        before: list = []
        parts = ReplayParts(len(alloc.events or []), [])
        layers = layer_of(self.trainer)
        for index, where, unit in order:
            start, end = self.spans[index]
            position = {h: k for k, h in enumerate(own[index - 1])} if index else {}
            live: dict = {h: before[position[h]] for h in taken[index]}
            step = ReplayedStep(unit, len(alloc.events or []))
            replay(alloc, events[start : where if where is not None else end], live)
            if where is not None:
                state_start = len(alloc.events or [])
                for p in stepped_of[unit] or []:  # AdamW's _init_group: the group's order
                    if id(p) not in stated:
                        stated.add(id(p))
                        for nbytes in self.state_bytes[id(p)]:
                            alloc.malloc(nbytes)
                            step.state_layers.append(layers.get(id(p)))
                step.state = (state_start, len(alloc.events or []))
                replay(alloc, events[where:end], live)
            before = [live[h] for h in own[index]]
            step.end = len(alloc.events or [])
            parts.steps.append(step)
        alloc.parts = parts if record else None
        return alloc

    def _stepped(self, unit: Any, rep_stepped: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The parameters a step of ``unit`` gives gradients, from those its representative's step did:
        the same positions among each unit's parameters (None when the two do not correspond)."""
        rep = self.rep_of[unit]
        if rep == unit:
            return rep_stepped
        mine, theirs = self.trainer.parameters_for_step(unit), self.trainer.parameters_for_step(rep)
        if len(mine) != len(theirs) or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(mine, theirs)):
            return None
        got = {id(p) for p in rep_stepped}
        return [p for p, q in zip(mine, theirs) if id(q) in got]


def state_sizes(optimizer: torch.optim.Optimizer, tracker: Any, p: torch.Tensor) -> list[int]:
    """The bytes of each of ``p``'s optimizer state tensors the allocator holds, in the state's order (a
    DTensor's by its local shard, which holds this rank's bytes)."""
    local = [dtensor_local(t) for t in optimizer.state[p].values() if isinstance(t, torch.Tensor)]
    return [t.untyped_storage().nbytes() for t in local if tracker.allocated(t)]


def layer_of(trainer: Any) -> dict[int, int]:
    """The residual layer each parameter is in, where the trainer's model lists them (``layers``, as
    DiffusionBlocks' model does): which optimizer state a block's first step makes."""
    layers = getattr(trainer.model, "layers", None)
    if not isinstance(layers, torch.nn.Module):
        return {}
    return {id(p): i for i, layer in enumerate(layers.children()) for p in layer.parameters()}


class StepParts:
    """The parts of a recorded replay whose warm-up ran real steps (SGD, offloading, a model that keeps
    what its first step makes): each step's span of the allocator's events and, in each warm-up step,
    the optimizer state it made, found where its events first differ from the same unit's tracked
    step and checked to be those tensors' sizes. The result reads as StateWarmup's
    (``CachingAllocatorModel.parts``), so dbprofile.measure.block_replay builds db:B's replay from it."""

    def __init__(self, trainer: Any, tracker: Any, alloc: CachingAllocatorModel) -> None:
        self.trainer, self.tracker, self.alloc = trainer, tracker, alloc
        self.parts = ReplayParts(len(alloc.events or []), [])
        self.made: dict[int, list[tuple[int, int | None]]] = {}

    @contextlib.contextmanager
    def span(self, unit: Any, warm_up: bool = False) -> Iterator[None]:
        """Around one step: a warm-up step (``warm_up``), then each tracked step."""
        optimizer = self.trainer.optimizer
        had = {id(p) for p in optimizer.state}
        step = ReplayedStep(unit, len(self.alloc.events or []))
        yield
        step.end = len(self.alloc.events or [])
        if warm_up:
            layers = layer_of(self.trainer)
            self.made[len(self.parts.steps)] = [
                (n, layers.get(id(p)))
                for group in optimizer.param_groups
                for p in group["params"]
                if id(p) not in had and p in optimizer.state
                for n in state_sizes(optimizer, self.tracker, p)
            ]
        self.parts.steps.append(step)

    def finish(self) -> None:
        """Each warm-up step's state window, where its events are the tracked step's with the state
        inserted in one place; the parts are kept on the allocator model."""
        events = self.alloc.events or []
        tracked = {s.unit: s for i, s in enumerate(self.parts.steps) if i not in self.made}
        for index, made in self.made.items():
            warm, same = self.parts.steps[index], tracked.get(self.parts.steps[index].unit)
            if same is None:
                continue
            ours, theirs = events[warm.start : warm.end], events[same.start : same.end]
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a[1] != b[1]), len(theirs))
            if [n for _, n in ours[at : at + len(made)]] == [n for n, _ in made]:
                warm.state = (warm.start + at, warm.start + at + len(made))
                warm.state_layers = [layer for _, layer in made]
        self.alloc.parts = self.parts


@dataclass
class ReplayedStep:
    """One step of a recorded replay, by positions in CachingAllocatorModel ``events``: a warm-up step
    with the optimizer state made at ``state`` (start, end) and the layer of each state tensor's
    parameter (None: not in a layer), or a tracked step (``state`` None)."""

    unit: Any
    start: int
    end: int = 0
    state: tuple[int, int] | None = None
    state_layers: list[int | None] = field(default_factory=list)


@dataclass
class ReplayParts:
    """What a recorded replay is made of (``CachingAllocatorModel.parts``): the parameters and buffers
    (events up to ``params_end``), then each step in the order replayed. dbprofile.measure.block_replay
    builds DiffusionBlocks' replay of every block from db:1's."""

    params_end: int
    steps: list[ReplayedStep]


def _handed_on(spans: list[list[tuple[int, int]]], first: int) -> tuple[list[list[int]], list[list[int]]] | None:
    """(per step, the handles it hands on: made in it and freed by the next step, in the order they
    were made; per step, the handles of the step before's it frees), where every step frees exactly
    what the one before handed on (a tensor a model keeps until its next step and replaces there),
    every step hands on the same sizes, the tracked steps (from ``first`` on) keep
    nothing else, and the first step of all, which has no step before, hands nothing on unless it is
    a real warm-up step (as in a warmed-up run). None otherwise."""
    kept: list[dict[int, int]] = []
    taken: list[list[int]] = []
    for events in spans:
        made: dict[int, int] = {}
        frees: list[int] = []
        for handle, nbytes in events:
            if nbytes != FREED:
                made[handle] = nbytes
            elif handle in made:
                del made[handle]
            else:
                frees.append(handle)
        kept.append(made)
        taken.append(frees)
    if taken[0]:
        return None
    own: list[list[int]] = []
    for i in range(len(spans)):
        if i + 1 < len(spans):
            if not set(taken[i + 1]) <= kept[i].keys():
                return None
            own.append([h for h in kept[i] if h in set(taken[i + 1])])
        else:
            own.append(list(kept[i]))
        if i >= first and len(own[i]) != len(kept[i]):
            return None
    if len({tuple(kept[i][h] for h in own[i]) for i in range(len(spans))}) != 1:
        return None
    if first == 0 and own[0]:
        return None
    return own, taken
