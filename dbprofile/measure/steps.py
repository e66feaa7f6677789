"""The measurement protocol of one technique on one device, shared by the single-device runner
(``dbprofile.measure.runner``), the depth extrapolation (``depth``) and each rank of a
distributed run (``distributed``): build the trainer, warm every unit up (one step each, so the
optimizer holds state for everything the technique keeps: every DiffusionBlocks block), run one
tracked step per unit (the peak and its shares: steps are deterministic, so one suffices; its
FLOPs are counted on the same step), then time untracked steps (torch.utils.benchmark's
adaptive repetition, so the tracker's Python overhead never reaches the times), and summarise
the worst unit into the ``Measurement``."""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dbprofile import progress
from dbprofile.measure import device as devices
from dbprofile.measure import snapshot
from dbprofile.measure.allocator import AllocationRecorder, CachingAllocatorModel
from dbprofile.measure.fake import fake_mode
from dbprofile.measure.flops import FlopCounter
from dbprofile.measure.regions import tagging
from dbprofile.measure.summary import UnitResult, record_losses, record_transfer, summarise, worst_figures
from dbprofile.measure.timing import time_block
from dbprofile.measure.tracker import Tracker
from dbprofile.measure.tracking import UnitTraces
from dbprofile.measure.warmup import (
    STATE_WARMUP_TRIES,
    WARMUP_BY_STEPS,
    StateWarmup,
    StepParts,
    state_warmup_applies,
)
from dbprofile.methods.base import TrainerProtocol as Trainer
from dbprofile.methods.factory import make_trainer
from dbprofile.results import Measurement
from dbprofile.settings import RunSettings
from dbprofile.spec import ModelSpec
from dbprofile.techniques import Technique

SEED = 0


MIN_TIME_S = 1.0
"""Each technique is timed for at least this long (split over DiffusionBlocks' blocks)..."""


MAX_TIME_S = 10.0
"""...and at most this long (split likewise), stopping earlier once the spread is small:"""


TIMING_THRESHOLD = 0.1
"""torch.utils.benchmark's adaptive_autorange stops when the interquartile range of its blocks is
below this fraction of their median (and it has at least four blocks)."""


class PhaseClock:
    """Wraps the tracker's ``mark`` to time the transfer phase (db:B+offload)."""

    def __init__(self, tracker: Tracker | None, dev: torch.device, sync: bool) -> None:
        self.tracker = tracker
        self.dev = dev
        self.sync = sync
        self.transfer_s = 0.0
        self._phase: str | None = None
        self._since = 0.0

    def mark(self, phase: str) -> None:
        self._close()
        if self.tracker is not None:
            self.tracker.mark(phase)
        self._phase = phase
        self._since = time.perf_counter()

    def _close(self) -> None:
        if self._phase == "transfer":
            if self.sync:
                devices.synchronize(self.dev)
            self.transfer_s += time.perf_counter() - self._since
        self._phase = None

    def finish(self) -> float:
        self._close()
        return self.transfer_s


@dataclass(kw_only=True)
class StepContext:
    """What every step of one measurement shares: the measurement being filled in, the model
    spec and trainer, the batch size, the devices, and the running step count and times."""

    m: Measurement
    spec: ModelSpec
    trainer: Trainer
    batch_size: int
    dev: torch.device
    fake: bool
    counter: Iterator[int] = field(default_factory=itertools.count)
    """Step index across warm-up, tracked and timed steps: each step's batch seed."""
    all_steps: list[float] = field(default_factory=list)
    """Wall time of every step run, for the run's step count and total."""

    @property
    def sync(self) -> bool:
        """Real CUDA steps are synchronised around the clock."""
        return self.dev.type == "cuda" and not self.fake


def measure_into(
    m: Measurement,
    spec: ModelSpec,
    tech: Technique,
    batch_size: int,
    settings: RunSettings,
    *,
    dev: torch.device,
    trainer_factory: Callable[[], Trainer] | None = None,
    tracker_cls: type[Tracker] = Tracker,
    snapshot_for: Callable[[int | None], Path] | None = None,
    traces: dict | None = None,
    adaptive_timing: bool = True,
    timed: bool = True,
) -> None:
    """Run the protocol (module docstring) for ``tech`` on ``dev`` and fill in ``m``.

    ``trainer_factory`` and ``tracker_cls`` let dbprofile.measure.distributed run this same
    protocol for one rank (a sharded or block-parallel trainer, a tracker that knows DTensors);
    ``adaptive_timing=False`` times exactly ``settings.steps`` steps, as ranks that must run the
    same collectives need, instead of torch.utils.benchmark's adaptive repetition.
    ``timed=False`` runs no timed steps: the single-device runner times CPU techniques afterwards,
    interleaved (dbprofile.measure.interleaved).
    ``snapshot_for(unit)`` names the memory snapshot file of a unit's tracked step. ``traces``,
    a dict, receives each unit's tracked step with every point kept (for dbprofile.measure.depth).
    ``settings.state_warmup`` (fake runs): the optimizer state is made without warm-up steps where
    that is the warmed-up measurement (dbprofile.measure.warmup), else the warm-up steps run."""
    kwargs: dict[str, Any] = dict(
        dev=dev,
        trainer_factory=trainer_factory,
        tracker_cls=tracker_cls,
        snapshot_for=snapshot_for,
        traces=traces,
        adaptive_timing=adaptive_timing,
        timed=timed,
    )
    # Simulated ranks (trainer_factory) ask for it too (depth.simulate_fake, settings.state_warmup).
    applies = settings.fake and state_warmup_applies(tech, settings.optimizer)
    tries = STATE_WARMUP_TRIES.get(settings.state_warmup, ()) if applies else ()
    for stepped_first in tries:
        trial = copy.deepcopy(m)
        if _measure_into(trial, spec, tech, batch_size, settings, stepped_first=stepped_first, **kwargs):
            vars(m).update(vars(trial))
            return
        if traces is not None:
            traces.clear()
    _measure_into(m, spec, tech, batch_size, settings, stepped_first=None, **kwargs)
    if tries and m.ok:
        m.extra["warmup"] = WARMUP_BY_STEPS


def _measure_into(
    m: Measurement,
    spec: ModelSpec,
    tech: Technique,
    batch_size: int,
    settings: RunSettings,
    *,
    stepped_first: int | None,
    dev: torch.device,
    trainer_factory: Callable[[], Trainer] | None,
    tracker_cls: type[Tracker],
    snapshot_for: Callable[[int | None], Path] | None,
    traces: dict | None,
    adaptive_timing: bool,
    timed: bool,
) -> bool:
    """``measure_into``'s protocol; ``stepped_first`` (not None): warm the first that many units up by a
    step and make the others' optimizer state without one. False when that measurement is not the
    warmed-up one, or has nothing to save (nothing in ``m`` is then to be kept)."""
    fake = settings.fake
    # In fake mode the tensors say "cpu" whatever the target; the tracker measures them there.
    track_dev = torch.device("cpu") if fake else dev
    record = isinstance(traces, UnitTraces)  # the allocator's events, for the depth extrapolation
    allocator = CachingAllocatorModel(record) if settings.emulate_cuda else None
    where = f"{m.technique} @ batch {m.batch_size}"
    progress.stage(f"{where}: building the model")
    with fake_mode() if fake else contextlib.nullcontext():
        torch.manual_seed(SEED)
        start = time.perf_counter()
        if trainer_factory is not None:
            trainer = trainer_factory()
        else:
            trainer = make_trainer(tech, spec, dev, precision=m.precision, optimizer=m.optimizer)
            trainer.micro_batches = settings.micro_batches
        if settings.micro_batches > 1:
            m.extra["micro_batches"] = settings.micro_batches
        build_s = time.perf_counter() - start
        m.num_parameters = sum(p.numel() for p in trainer.model.parameters())
        extra = trainer.extra_parameters
        m.extra_parameters = int(extra() if callable(extra) else extra) if extra is not None else None
        units = list(trainer.units)
        results = {unit: UnitResult() for unit in units}
        if stepped_first is not None and stepped_first >= len(units):
            return False
        recorder = AllocationRecorder() if stepped_first is not None else None
        timed_s = 0.0
        ctx = StepContext(m=m, spec=spec, trainer=trainer, batch_size=batch_size, dev=dev, fake=fake)
        tracker = tracker_cls(
            track_dev,
            trainer=trainer,
            memory_limit=settings.memory_limit,
            round_to=settings.round_to,
            allocator=recorder if recorder is not None else allocator,
            model_cuda_scratch=settings.emulate_cuda,
            keep_trace=traces is not None,
        )
        # The tracker is on from the first step so every tensor that persists across steps
        # (optimizer state, caches a model builds on first use) is seen being made.
        routed = spec.routed_modules(trainer.model) if spec.routed_modules is not None else []
        with tracker, tagging(tracker, routed):
            warm, parts = _warm_up(
                ctx, tracker, units, settings, recorder, stepped_first, allocator if record else None, where
            )
            allocator_peaks: list[dict] = []
            observed: dict[int | None, dict] = {}
            for unit in units:
                if warm is not None and warm.rep_of[unit] != unit:  # the same program as a unit traced
                    results[unit] = results[warm.rep_of[unit]]
                    if traces is not None:
                        traces[unit] = traces[warm.rep_of[unit]]
                    continue
                progress.stage(f"{where}: tracked step{of_block(unit, units)}")
                path = snapshot_for(unit) if snapshot_for is not None else None
                if path is not None:
                    m.memory_snapshots.append(str(path))
                with (
                    snapshot.recording(path),
                    observing(spec, trainer.model, fake) as seen,
                    warm.span() if warm is not None else parts.span(unit) if parts else contextlib.nullcontext(),
                ):
                    step(ctx, tracker, unit, results[unit], track=True)
                record_transfer(m, trainer)
                if seen:
                    observed[unit] = seen
                if traces is not None:
                    traces[unit] = results[unit].records[-1]
                if not fake and timed:
                    unit_s, figures = _timed_steps(
                        ctx, tracker, unit, units, results[unit], settings.steps, adaptive_timing, where
                    )
                    timed_s += unit_s
                    if figures is not None:
                        allocator_peaks.append(figures)
        if observed:
            m.extra["observed"] = observed.get(None) or {f"block {unit}": seen for unit, seen in observed.items()}
        m.cuda = worst_figures(allocator_peaks) if allocator_peaks else None
        if warm is not None:
            replayed = warm.finish(record)
            if replayed is None:
                return False
            allocator = replayed if allocator is not None else None
            m.extra["warmup"] = "optimizer state" + (f" (after {stepped_first} step)" if stepped_first else "")
        if allocator is not None:
            _allocator_figures(m, allocator, parts, traces)
        if m.cuda is not None:
            m.cuda["untracked_allocated_bytes"] = m.extra.pop("cuda_untracked_bytes", None)
        block_layers = trainer.block_layers
        has_routed = bool(routed)
        del routed  # the modules go with the trainer
        all_steps = ctx.all_steps
        del trainer, tracker, ctx
    m.extra["timing"] = {
        "build_s": build_s,
        "all_steps_s": sum(all_steps),
        "steps_run": len(all_steps),
        "tracked_steps_s": [t for r in results.values() for t in r.tracked_times],
        "timed_steps_s": timed_s,
    }
    summarise(m, units, results, fake, block_layers, tagged=has_routed)
    return True


def _warm_up(
    ctx: StepContext,
    tracker: Tracker,
    units: list,
    settings: RunSettings,
    recorder: AllocationRecorder | None,
    stepped_first: int | None,
    recorded: CachingAllocatorModel | None,
    where: str,
) -> tuple[StateWarmup | None, StepParts | None]:
    """The steps before the tracked ones: the optimizer state made without steps (``recorder``: the
    first ``stepped_first`` units by a real step), else every unit's warm-up steps, each one's span of
    the ``recorded`` allocator replay kept (StepParts) where the depth extrapolation asks for it."""
    if recorder is not None and stepped_first is not None:
        warm = StateWarmup(ctx.trainer, tracker, recorder, units, stepped_first)
        for unit in units[:stepped_first]:
            with warm.span():
                step(ctx, tracker, unit, None)
        progress.stage(f"{where}: optimizer state (no warm-up steps)")
        warm.make_state()
        return warm, None
    # Warm-up: every unit steps (optimizer state for all of them) before any measurement.
    parts = StepParts(ctx.trainer, tracker, recorded) if recorded is not None else None
    for i in range(settings.warmup_steps):
        for unit in units:
            progress.stage(f"{where}: warm-up step {i + 1}/{settings.warmup_steps}{of_block(unit, units)}")
            with parts.span(unit, warm_up=True) if parts else contextlib.nullcontext():
                step(ctx, tracker, unit, None)
    return None, parts


def _timed_steps(
    ctx: StepContext, tracker: Tracker, unit: Any, units: list, out: UnitResult, steps: int, adaptive: bool, where: str
) -> tuple[float, dict | None]:
    """A unit's timed steps: (the seconds the adaptive timer's raw steps took, else 0; the CUDA
    allocator's figures over them). Timed steps run untracked: the tracker's Python dispatch overhead
    must not inflate step times. The allocator's peaks are read over these untracked steps only: the
    tracked step resets them around every op, and the ground truth must not come from the tracker."""
    progress.stage(f"{where}: {steps} timed step{'s' if steps > 1 else ''}{of_block(unit, units)}")
    timed_s = 0.0
    with tracker.paused():
        devices.reset_peaks(ctx.dev)
        if adaptive:
            before = len(ctx.all_steps)
            time_unit(ctx, unit, out, steps, MIN_TIME_S / len(units), MAX_TIME_S / len(units))
            # the timer's raw step times (its block-size estimate and loop are not in all_steps)
            timed_s = sum(ctx.all_steps[before:])
        else:
            for _ in range(steps):
                step(ctx, tracker, unit, out, track=False)
        return timed_s, devices.cuda_figures(ctx.dev)


def _allocator_figures(
    m: Measurement, allocator: CachingAllocatorModel, parts: StepParts | None, traces: dict | None
) -> None:
    """The allocator model's figures (``extra['allocator_model']``); the replay itself, with its parts,
    handed to the depth extrapolation where it asked for it (UnitTraces)."""
    if parts is not None:
        parts.finish()
    if isinstance(traces, UnitTraces):
        traces.allocator = allocator
    m.extra["allocator_model"] = allocator.stats.figures()


def observing(spec: ModelSpec, model: torch.nn.Module, fake: bool) -> contextlib.AbstractContextManager[dict]:
    """``spec.observe`` around a real tracked step (what it saw that a fake run cannot know: MoE
    routing), or an empty dict."""
    return spec.observe(model) if spec.observe is not None and not fake else contextlib.nullcontext({})


def of_block(unit: int | None, units: list) -> str:
    return "" if unit is None else f" (block {unit + 1} of {len(units)})"


def time_unit(
    ctx: StepContext, unit: int | None, out: UnitResult, min_steps: int, min_time_s: float, max_time_s: float
) -> None:
    """Time untracked steps of one unit with torch.utils.benchmark's adaptive_autorange: blocks of
    steps (as many per block as make the timer's own overhead negligible) for at least ``min_time_s``
    and four blocks, until the blocks' IQR is under TIMING_THRESHOLD of their median or ``max_time_s``
    has passed; at least ``min_steps`` steps. Its timer synchronises CUDA around every block."""
    from torch.utils import benchmark

    m, trainer, dev = ctx.m, ctx.trainer, ctx.dev
    step_index = next(ctx.counter)
    torch.manual_seed(SEED + 1 + step_index)
    batch = ctx.spec.batch(ctx.batch_size, dev)
    clock = PhaseClock(None, dev, ctx.sync)
    losses: list[torch.Tensor] = []
    transfers: list[float] = []

    def one_step() -> None:
        losses.append(trainer.step(batch, unit, clock.mark))
        transfers.append(clock.finish())
        clock.transfer_s = 0.0

    # num_threads: the timer would otherwise run with one thread, unlike the training it stands for.
    timer = benchmark.Timer("one_step()", globals={"one_step": one_step}, num_threads=torch.get_num_threads())
    result = timer.adaptive_autorange(TIMING_THRESHOLD, min_run_time=min_time_s, max_run_time=max_time_s)
    raw, per_block = list(result.raw_times), result.number_per_run
    if per_block * len(raw) < min_steps:
        # Slow steps: more blocks of the same size until there are min_steps, keeping the blocks
        # already timed (a second adaptive_autorange would estimate its block size again and
        # throw them away: 4 to 6 slow steps of overhead per technique).
        while per_block * len(raw) < min_steps:
            raw.append(time_block(one_step, per_block, dev))
        result = benchmark.Measurement(per_block, raw, result.task_spec, result.metadata)
    out.times = list(result.times)
    out.median, out.iqr = float(result.median), float(result.iqr)
    out.transfer_times = transfers
    # one entry per step (a block's time shared evenly), so the run's step count and total stay right
    n = result.number_per_run
    ctx.all_steps.extend(t / n for t in result.raw_times for _ in range(n))
    record_losses(m, losses, unit)


def step(ctx: StepContext, tracker: Tracker, unit: int | None, out: UnitResult | None, track: bool = False) -> None:
    """One training step; ``out`` collects its peak (``track``) or its time (otherwise)."""
    m, dev, sync = ctx.m, ctx.dev, ctx.sync
    step_index = next(ctx.counter)
    torch.manual_seed(SEED + 1 + step_index)
    batch = ctx.spec.batch(ctx.batch_size, dev)
    if track or out is None:
        tracker.set_inputs(batch)
    clock = PhaseClock(tracker if track or out is None else None, dev, sync)
    if track:
        tracker.begin_step()
        if sync:
            # Allocator bytes no tensor holds when the step starts (cuBLAS workspaces): the
            # tracker counts them as workspace; kept beside max_memory_allocated to explain it.
            held = tracker.shares()["workspace"]
            m.extra["cuda_untracked_bytes"] = max(held, m.extra.get("cuda_untracked_bytes", 0))
    if sync:
        devices.synchronize(dev)
    start = time.perf_counter()
    # The tracked step is also the one whose FLOPs are counted: same shapes, no extra step,
    # and never a timed step (the counter's dispatch overhead must not reach the times). The
    # tracker's own dispatch mode feeds the counter: one mode per op instead of two.
    with tracker.counting(FlopCounter()) if track else contextlib.nullcontext() as flops:
        loss = ctx.trainer.step(batch, unit, clock.mark)
    if sync:
        devices.synchronize(dev)
    elapsed = time.perf_counter() - start
    ctx.all_steps.append(elapsed)
    transfer = clock.finish()
    del batch
    if out is not None:
        if track:
            out.records.append(tracker.end_step())
            out.tracked_times.append(elapsed)
            out.flops = flops.total if flops is not None else None
        else:
            out.times.append(elapsed)
            out.transfer_times.append(transfer)
    if not ctx.fake and isinstance(loss, torch.Tensor):
        record_losses(m, [loss], unit, f"at step {step_index}")
