"""The runner: measure techniques x batch sizes on one device, real or fake, and never lose
a result.

``measure()`` builds one technique's trainer, warms it up (one step per unit, so the
optimizer holds state for everything the technique keeps: every DiffusionBlocks block),
then runs one measured step per unit under the tracker (the peak and its shares: steps are
deterministic, so one suffices) and ``steps`` timed steps with the tracker paused (so its
Python overhead never inflates step times), and returns a ``Measurement``. DiffusionBlocks
is measured per block; the worst block's peak and shares are the measurement's, and
``block_steps_time_s`` (B block-steps) is the fair time unit against one e2e step.

``run()`` does that for every technique and batch size, appending each finished
measurement to the result JSON at once (``RunResult.save`` is atomic), so an interrupted
run keeps what it measured. Failures stay inside their measurement: an exception in the
model's step is ``error`` (technique and the model's message), a real out-of-memory or
passing ``memory_limit`` is ``oom`` (with the batch size tried), a non-finite loss is
``nan``. ``format_table()`` renders a result for the terminal.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dbprofile import progress
from dbprofile.measure import device as devices
from dbprofile.measure import snapshot
from dbprofile.measure.allocator import CachingAllocatorModel
from dbprofile.measure.fake import cuda_autocast_policy, fake_mode
from dbprofile.measure.flops import FlopCounter
from dbprofile.measure.limits import Terminated, TimeLimitExceeded, time_limit
from dbprofile.measure.tracker import MemoryLimitExceeded, StepRecord, Tracker
from dbprofile.methods import DEFAULT_TECHNIQUES, Technique, check_technique_fits, make_trainer, parse_techniques
from dbprofile.results import CATEGORIES, UNIT_BYTES, BlockMeasurement, Measurement, RunResult, pick_unit
from dbprofile.loading import checked_spec, load_spec
from dbprofile.spec import ModelSpec, SpecError, get_layers

DEFAULT_STEPS = 5
DEFAULT_WARMUP_STEPS = 1
SEED = 0
MIN_TIME_S = 1.0
"""Each technique is timed for at least this long (split over DiffusionBlocks' blocks)..."""
MAX_TIME_S = 10.0
"""...and at most this long (split likewise), stopping earlier once the spread is small:"""
TIMING_THRESHOLD = 0.1
"""torch.utils.benchmark's adaptive_autorange stops when the interquartile range of its blocks is
below this fraction of their median (and it has at least four blocks)."""


class _UnitResult:
    """The measured steps of one unit (the whole model, or one block)."""

    def __init__(self) -> None:
        self.records: list[StepRecord] = []
        self.times: list[float] = []
        self.transfer_times: list[float] = []
        self.tracked_times: list[float] = []
        """Wall time of the tracked steps: against ``median``, the tracker's own cost."""
        self.iqr: float | None = None
        """Interquartile range of the timed steps (torch.utils.benchmark's blocks)."""
        self.median: float | None = None
        self.flops: int | None = None  # FLOPs of the tracked step (deterministic: one count suffices)

    @property
    def peak(self) -> StepRecord:
        return max(self.records, key=lambda r: r.peak_bytes)


class _PhaseClock:
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


def is_out_of_memory(err: BaseException) -> bool:
    """A real allocator OOM, or the tracker's memory limit."""
    if isinstance(err, MemoryLimitExceeded):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(err, oom_type):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def record_failure(m: Measurement, err: BaseException) -> None:
    """File a failed step in ``m``: ``oom`` (with the batch size tried) or ``error`` (the technique
    and the model's message)."""
    if is_out_of_memory(err):
        m.status, m.error = "oom", f"out of memory at batch size {m.batch_size}: {err}"
    elif isinstance(err, SystemExit):
        m.status, m.error = "error", f"{m.technique}: the model's code called sys.exit({err.code!r})"
    else:
        m.status, m.error = "error", f"{m.technique}: {type(err).__name__}: {err}"


def num_layers(spec: ModelSpec) -> int:
    """How many residual layers the model has (built with fake tensors: no memory)."""
    with fake_mode():
        return len(get_layers(spec.build(), spec.layers, spec.name))


def measure(
    spec: ModelSpec | str,
    technique: Technique | str,
    batch_size: int,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    optimizer: str = "adamw",
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    steps: int = DEFAULT_STEPS,
    fake: bool = False,
    memory_limit: int | None = None,
    layers: int | None = None,
    round_to: int | None = None,
    emulate_cuda: bool = False,
    memory_snapshot: str | Path | None = None,
    traces: dict | None = None,
    time_limit_s: float | None = None,
) -> Measurement:
    """Measure one technique at one batch size; failures come back as a status, not raised.

    Bad input (unknown technique, more segments or blocks than layers) raises SpecError.
    ``layers`` (the model's residual layer count) skips counting them again. ``round_to``
    overrides the tracker's per-storage rounding (the planner passes 512 for a CUDA target).
    ``emulate_cuda`` (fake runs standing for a CUDA device, as the planner's): every tracked
    allocation is replayed through a model of the CUDA caching allocator
    (dbprofile.measure.allocator; its figures land in ``m.extra["allocator_model"]``), and the
    loss follows CUDA's autocast order (dbprofile.measure.fake.cuda_autocast_policy).
    ``memory_snapshot``: a directory; on CUDA, PyTorch's memory history of the tracked step is
    written there (dbprofile.measure.snapshot) and listed in ``Measurement.memory_snapshots``.
    ``traces``, a dict, receives each unit's tracked step with every point kept (StepRecord.trace),
    for dbprofile.measure.depth.
    ``time_limit_s`` bounds the whole technique (build, steps, ratios): past it the
    measurement is ``timeout``.
    """
    spec = load_spec(spec) if not isinstance(spec, ModelSpec) else spec
    tech = parse_techniques([technique])[0] if not isinstance(technique, Technique) else technique
    if steps < 1 or warmup_steps < 1:
        raise SpecError(f"steps and warmup_steps must be at least 1; got steps={steps}, warmup_steps={warmup_steps}.")
    check_technique_fits(tech, layers if layers is not None else num_layers(spec))
    dev = devices.resolve_device(device)
    snapshot_for: Callable[[int | None], Path] | None = None
    if memory_snapshot is not None:
        snapshot.check_snapshot_device(dev, fake)
        snapshot_for = functools.partial(snapshot.snapshot_path, memory_snapshot, spec.name, tech.name, batch_size)
    m = Measurement(
        technique=tech.name, batch_size=batch_size, precision=precision, optimizer=optimizer,
        device=str(dev), fake=fake,
    )
    # In fake mode the tensors say "cpu" whatever the target; the tracker measures them there.
    track_dev = torch.device("cpu") if fake else dev
    with time_limit(time_limit_s, f"{tech.name} at batch size {batch_size}") as limit:
        try:
            with cuda_autocast_policy() if emulate_cuda else contextlib.nullcontext():
                _measure_into(m, spec, tech, batch_size, dev, track_dev, warmup_steps, steps, fake, memory_limit,
                              round_to, allocator=CachingAllocatorModel() if emulate_cuda else None,
                              model_cuda_scratch=emulate_cuda, snapshot_for=snapshot_for,
                              traces=traces)
            if m.status == "ok" and tech.is_diffusion_blocks:
                _activation_ratios(m, spec, tech, batch_size, dev, fake)
        except SpecError:
            raise
        # SystemExit too: a model that calls sys.exit() in its step must not end the whole run.
        except (Exception, SystemExit, TimeLimitExceeded) as err:  # noqa: BLE001 - a failure is a result
            if limit.expired:
                m.status = "timeout"
                m.error = (f"{tech.name}: stopped after the time limit of {time_limit_s:g} s per technique; building "
                           "the model or a training step did not finish. Raise --timeout if it is only slow.")
            else:
                record_failure(m, err)
            del err
        finally:
            if not fake:  # fake tensors hold no memory; a full collection costs ~0.4 s per fake run
                free_memory(dev)
    return m


def _measure_into(
    m: Measurement,
    spec: ModelSpec,
    tech: Technique,
    batch_size: int,
    dev: torch.device,
    track_dev: torch.device,
    warmup_steps: int,
    steps: int,
    fake: bool,
    memory_limit: int | None,
    round_to: int | None = None,
    trainer_factory: Callable[[], Any] | None = None,
    tracker_cls: type[Tracker] = Tracker,
    allocator: CachingAllocatorModel | None = None,
    model_cuda_scratch: bool = False,
    snapshot_for: Callable[[int | None], Path] | None = None,
    traces: dict | None = None,
    adaptive_timing: bool = True,
) -> None:
    """``trainer_factory`` and ``tracker_cls`` let dbprofile.measure.distributed run this same
    protocol for one rank (a sharded or block-parallel trainer, a tracker that knows DTensors);
    ``adaptive_timing=False`` times exactly ``steps`` steps, as ranks that must run the same
    collectives need, instead of torch.utils.benchmark's adaptive repetition.
    ``snapshot_for(unit)`` names the memory snapshot file of a unit's tracked step."""
    sync = dev.type == "cuda" and not fake
    where = f"{m.technique} @ batch {m.batch_size}"
    progress.stage(f"{where}: building the model")
    with fake_mode() if fake else contextlib.nullcontext():
        torch.manual_seed(SEED)
        start = time.perf_counter()
        if trainer_factory is not None:
            trainer = trainer_factory()
        else:
            trainer = make_trainer(tech, spec, dev, precision=m.precision, optimizer=m.optimizer)
        build_s = time.perf_counter() - start
        m.num_parameters = sum(p.numel() for p in trainer.model.parameters())
        extra = getattr(trainer, "extra_parameters", None)
        m.extra_parameters = int(extra() if callable(extra) else extra) if extra is not None else None
        units = list(getattr(trainer, "units", [None]))
        results = {unit: _UnitResult() for unit in units}
        counter = iter(range(10**9))
        all_steps: list[float] = []
        run_step = functools.partial(_step, m, spec, trainer, batch_size, dev, fake, sync, counter, all_steps)
        tracker = tracker_cls(track_dev, trainer=trainer, memory_limit=memory_limit, round_to=round_to,
                              allocator=allocator, model_cuda_scratch=model_cuda_scratch,
                              keep_trace=traces is not None)
        # The tracker is on from the first step so every tensor that persists across steps
        # (optimizer state, caches a model builds on first use) is seen being made.
        with tracker:
            # Warm-up: every unit steps (optimizer state for all of them) before any measurement.
            for i in range(warmup_steps):
                for unit in units:
                    progress.stage(f"{where}: warm-up step {i + 1}/{warmup_steps}{_of_block(unit, units)}")
                    run_step(tracker, unit, None)
            allocator_peaks: list[dict] = []
            for unit in units:
                progress.stage(f"{where}: tracked step{_of_block(unit, units)}")
                path = snapshot_for(unit) if snapshot_for is not None else None
                if path is not None:
                    m.memory_snapshots.append(str(path))
                with snapshot.recording(path):
                    run_step(tracker, unit, results[unit], track=True)
                if traces is not None:
                    traces[unit] = results[unit].records[-1]
                if not fake:
                    # Timed steps run untracked: the tracker's Python dispatch overhead must not
                    # inflate step times. Fake steps have no meaningful time. The allocator's
                    # peaks are read over these untracked steps only: the tracked step resets
                    # them around every op, and the ground truth must not come from the tracker.
                    progress.stage(f"{where}: {steps} timed step{'s' if steps > 1 else ''}{_of_block(unit, units)}")
                    with tracker.paused():
                        devices.reset_peaks(dev)
                        if adaptive_timing:
                            _time_unit(m, spec, trainer, batch_size, dev, unit, results[unit], steps,
                                       MIN_TIME_S / len(units), MAX_TIME_S / len(units), counter, all_steps)
                        else:
                            for _ in range(steps):
                                run_step(tracker, unit, results[unit], track=False)
                        figures = devices.cuda_figures(dev)
                    if figures is not None:
                        allocator_peaks.append(figures)
        m.cuda = _worst_figures(allocator_peaks) if allocator_peaks else None
        if allocator is not None:
            stats = allocator.stats
            m.extra["allocator_model"] = {
                "peak_reserved_bytes": stats.peak_reserved_bytes,
                "peak_allocated_bytes": stats.peak_allocated_bytes,
                "segments": stats.segments,
            }
        if m.cuda is not None:
            m.cuda["untracked_allocated_bytes"] = m.extra.pop("cuda_untracked_bytes", None)
        block_layers = getattr(trainer, "block_layers", None)
        del trainer, tracker
    m.extra["timing"] = {"build_s": build_s, "all_steps_s": sum(all_steps), "steps_run": len(all_steps),
                         "tracked_steps_s": [t for r in results.values() for t in r.tracked_times]}
    _summarise(m, units, results, fake, block_layers)


def _of_block(unit: int | None, units: list) -> str:
    return "" if unit is None else f" (block {unit + 1} of {len(units)})"


def _time_unit(m: Measurement, spec: ModelSpec, trainer: Any, batch_size: int, dev: torch.device, unit: Any,
               out: _UnitResult, min_steps: int, min_time_s: float, max_time_s: float, counter: Any,
               all_steps: list[float]) -> None:
    """Time untracked steps of one unit with torch.utils.benchmark's adaptive_autorange: blocks of
    steps (as many per block as make the timer's own overhead negligible) for at least ``min_time_s``
    and four blocks, until the blocks' IQR is under TIMING_THRESHOLD of their median or ``max_time_s``
    has passed; at least ``min_steps`` steps. Its timer synchronises CUDA around every block."""
    from torch.utils import benchmark

    step_index = next(counter)
    torch.manual_seed(SEED + 1 + step_index)
    batch = spec.batch(batch_size, dev)
    clock = _PhaseClock(None, dev, dev.type == "cuda")
    losses: list[torch.Tensor] = []
    transfers: list[float] = []

    def step() -> None:
        losses.append(trainer.step(batch, unit, clock.mark))
        transfers.append(clock.finish())
        clock.transfer_s = 0.0

    # num_threads: the timer would otherwise run with one thread, unlike the training it stands for.
    timer = benchmark.Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    result = timer.adaptive_autorange(TIMING_THRESHOLD, min_run_time=min_time_s, max_run_time=max_time_s)
    if result.number_per_run * len(result.raw_times) < min_steps:
        # Slow steps: ask for the time that many steps take (the first run was a warm-up too).
        result = timer.adaptive_autorange(TIMING_THRESHOLD, min_run_time=min_steps * result.median * 1.05,
                                          max_run_time=max(max_time_s, min_steps * result.median * 2))
    out.times = list(result.times)
    out.median, out.iqr = float(result.median), float(result.iqr)
    out.transfer_times = transfers
    # one entry per step (a block's time shared evenly), so the run's step count and total stay right
    n = result.number_per_run
    all_steps.extend(t / n for t in result.raw_times for _ in range(n))
    for value in (float(loss.detach().float()) for loss in losses):
        m.losses.append(value)
        if not math.isfinite(value) and m.status == "ok":
            m.status = "nan"
            where = f" (block {unit})" if unit is not None else ""
            m.error = f"{m.technique}: the loss was {value} in a timed step{where}; training diverged or the model produces NaN."
            break


def _worst_figures(per_unit: list[dict]) -> dict:
    """Allocator peaks over every unit (the worst block for DiffusionBlocks); NVML from the last."""
    worst = dict(per_unit[-1])
    for key in ("max_memory_allocated", "max_memory_reserved"):
        worst[key] = max(f[key] for f in per_unit)
    return worst


def _step(m, spec, trainer, batch_size, dev, fake, sync, counter, all_steps, tracker, unit,
          out: _UnitResult | None, track: bool = False) -> None:
    """One training step; ``out`` collects its peak (``track``) or its time (otherwise)."""
    step_index = next(counter)
    torch.manual_seed(SEED + 1 + step_index)
    batch = spec.batch(batch_size, dev)
    if track or out is None:
        tracker.set_inputs(batch)
    clock = _PhaseClock(tracker if track or out is None else None, dev, sync)
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
    # and never a timed step (the counter's dispatch overhead must not reach the times).
    with FlopCounter() if track else contextlib.nullcontext() as flops:
        loss = trainer.step(batch, unit, clock.mark)
    if sync:
        devices.synchronize(dev)
    elapsed = time.perf_counter() - start
    all_steps.append(elapsed)
    transfer = clock.finish()
    del batch
    if out is not None:
        if track:
            out.records.append(tracker.end_step())
            out.tracked_times.append(elapsed)
            out.flops = flops.total
        else:
            out.times.append(elapsed)
            out.transfer_times.append(transfer)
    if not fake and isinstance(loss, torch.Tensor):
        value = float(loss.detach().float())
        m.losses.append(value)
        if not math.isfinite(value) and m.status == "ok":
            m.status = "nan"
            where = f" (block {unit})" if unit is not None else ""
            m.error = f"{m.technique}: the loss was {value} at step {step_index}{where}; training diverged or the model produces NaN."


def _summarise(m: Measurement, units: list, results: dict, fake: bool, block_layers: list | None) -> None:
    worst_unit = max(units, key=lambda u: results[u].peak.peak_bytes)
    worst = results[worst_unit]
    peak = worst.peak
    m.peak_bytes = peak.peak_bytes
    m.shares = dict(peak.shares)
    m.peak_phase = peak.peak_phase
    m.timeline = peak.timeline
    if worst.times:
        m.step_time_s = worst.median if worst.median is not None else statistics.median(worst.times)
        m.step_time_iqr_s = worst.iqr if worst.iqr is not None else _iqr(worst.times)
        m.step_time_spread_s = [min(worst.times), max(worst.times)]
    unit_flops = [results[u].flops for u in units]
    if all(f is not None for f in unit_flops):
        # One step per unit trains every layer once: e2e's one step, DiffusionBlocks' B block-steps.
        m.training_flops = sum(unit_flops)
    if units != [None]:
        m.peak_block = int(worst_unit)
        for unit in units:
            r = results[unit]
            p = r.peak
            m.blocks.append(BlockMeasurement(
                block=int(unit),
                layers=list(block_layers[unit]) if block_layers else [],
                peak_bytes=p.peak_bytes,
                shares=dict(p.shares),
                peak_phase=p.peak_phase,
                step_time_s=(r.median if r.median is not None else statistics.median(r.times)) if r.times else None,
                step_time_iqr_s=(r.iqr if r.iqr is not None else _iqr(r.times)) if r.times else None,
                step_flops=r.flops,
                transfer_time_s=statistics.median(r.transfer_times) if any(r.transfer_times) else None,
            ))
        if all(b.step_time_s is not None for b in m.blocks):
            m.block_steps_time_s = sum(b.step_time_s for b in m.blocks)
            # The blocks are timed apart; summing their IQRs is the spread if their noise moved
            # together, an upper bound for independent noise.
            m.block_steps_time_iqr_s = sum(b.step_time_iqr_s or 0.0 for b in m.blocks)
            transfers = [t for u in units for t in results[u].transfer_times]
            if any(transfers):
                m.transfer_time_s = statistics.median(transfers)


def _iqr(times: list[float]) -> float:
    """Interquartile range (torch.utils.benchmark's definition: numpy-style linear quantiles)."""
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return q[2] - q[0]


def _activation_ratios(m: Measurement, spec: ModelSpec, tech: Technique, batch_size: int, dev, fake: bool) -> None:
    """Bytes saved for backward over the layers: one block vs the same AdaLN layers at full
    depth (about 1/B) and vs the plain e2e model (larger: AdaLN saves more); METHOD.md."""
    try:
        from dbprofile.methods.diffusion_blocks.activations import layer_activation_bytes
    except ImportError as err:
        m.extra["activation_ratios"] = None
        m.extra["activation_ratios_error"] = f"layer activation counting is not available: {err}"
        return
    try:
        with fake_mode():
            # Counting saved tensors needs shapes only: fake tensors cost no memory or time.
            m.extra["activation_ratios"] = layer_activation_bytes(
                spec, tech.blocks, batch_size, "cpu", lm_layout=tech.lm_layout
            )
    except Exception as err:  # noqa: BLE001 - a missing ratio must not lose the measurement
        m.extra["activation_ratios"] = None
        m.extra["activation_ratios_error"] = f"{type(err).__name__}: {err}"


def free_memory(dev: torch.device | str) -> None:
    """Release what a finished technique held before the next one starts."""
    gc.collect()
    if torch.device(dev).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare(
    spec: ModelSpec,
    techs: Sequence[Technique],
    precision: str = "fp32",
    optimizer: str = "adamw",
    drop_deeper: bool = False,
) -> tuple[ModelSpec, list[Technique], dict[str, Any]]:
    """Check everything the techniques need before the first measurement, so a run never
    stops half-way (after minutes of measuring) for a reason it could have found at the start.

    Validates the spec (its loss included) under fake tensors, requiring residual layers only
    when a DiffusionBlocks technique is asked for; checks each technique fits the layer count;
    fills in the hidden width from the traced hidden state where the spec leaves it out; and
    builds DiffusionBlocks on fake tensors and steps every block once, which is where the
    task conventions (batch keys, a CLS token, residual shapes) are checked. ``drop_deeper``
    (the CLI's default technique set, which adapts to shallow models) leaves out db:B with more
    blocks than layers instead of refusing them. Returns the spec to measure, the techniques,
    and the validation's facts; raises SpecError."""
    spec, facts = checked_spec(spec, require_residual=any(t.is_diffusion_blocks for t in techs))
    if drop_deeper:
        techs = [t for t in techs if not (t.is_diffusion_blocks and t.blocks > facts["num_layers"])]
    for tech in techs:
        check_technique_fits(tech, facts["num_layers"])
    db = [t for t in techs if t.is_diffusion_blocks]
    if db:
        # One DiffusionBlocks configuration suffices: the conventions it checks do not depend on B.
        tech = parse_techniques([f"db:{min(t.blocks for t in db)}"])[0]
        cpu = torch.device("cpu")
        with fake_mode():
            try:
                trainer = make_trainer(tech, spec, cpu, precision=precision, optimizer=optimizer)
                for unit in trainer.units:
                    trainer.step(spec.batch(2, cpu), unit)
            except SpecError:
                raise
            except SystemExit as err:
                raise SpecError(f"A DiffusionBlocks step of {spec.name!r} (on fake tensors, before measuring) called "
                                f"sys.exit({err.code!r}); the model's code must raise an exception instead.") from None
            except Exception:  # noqa: BLE001 - an op fake tensors cannot run is no fault of the model;
                pass  # the real measurement will run it, and record any real failure as that technique's error
    return spec, list(techs), facts


def run(
    spec: ModelSpec | str | None,
    techniques: Sequence[Technique | str] | str = DEFAULT_TECHNIQUES,
    batch_sizes: Sequence[int] | int = (8,),
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    optimizer: str = "adamw",
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    steps: int = DEFAULT_STEPS,
    fake: bool = False,
    memory_limit: int | None = None,
    out: str | Path | None = None,
    on_measurement: Callable[[Measurement], None] | None = None,
    command: str = "",
    time_limit_s: float | None = None,
    facts: dict[str, Any] | None = None,
    memory_snapshot: str | Path | None = None,
    from_checkpoint: bool = False,
) -> RunResult:
    """Measure every technique at every batch size; save after each measurement.

    Bad input raises SpecError before anything is measured (``prepare``). While it runs the
    saved result says ``complete: false``; Ctrl-C (or SIGTERM, see dbprofile.measure.limits)
    saves what finished with the reason and re-raises; a normal end saves ``complete: true``.
    ``time_limit_s`` bounds each technique (a ``timeout`` measurement, then the next one).
    ``facts``: the caller has already run ``prepare`` (``spec`` is the spec it returned).
    ``memory_snapshot``: a directory for PyTorch memory snapshots of each tracked step (CUDA only;
    see ``measure``). ``from_checkpoint`` records that the team keeps an end-to-end checkpoint
    (the verdict reads it)."""
    spec = spec if isinstance(spec, ModelSpec) else load_spec(spec)
    techs = parse_techniques(list(techniques) if not isinstance(techniques, str) else techniques)
    sizes = [batch_sizes] if isinstance(batch_sizes, int) else list(batch_sizes)
    if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
        raise SpecError(f"Batch sizes must be integers of at least 1; got {sizes}.")
    if steps < 1 or warmup_steps < 1:
        raise SpecError(f"steps and warmup_steps must be at least 1; got steps={steps}, warmup_steps={warmup_steps}.")
    devices.resolve_device(device)
    if facts is None:
        spec, techs, facts = prepare(spec, techs, precision, optimizer)
    layer_count = facts["num_layers"]
    if memory_snapshot is not None:
        snapshot.check_snapshot_device(torch.device(device), fake)
    result = RunResult(
        model=spec.name,
        model_info={
            "family": spec.family, "task": spec.task, "num_layers": layer_count,
            "hidden_size": spec.hidden_size, "description": spec.description,
            # The shapes --seq-len / --image-size set, so a sweep's runs can be told apart and drawn.
            **{key: spec.extra[key] for key in ("sequence_length", "image_size", "latent_size") if key in spec.extra},
        },
        environment=devices.environment(device),
        command=command,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        complete=False,
        from_checkpoint=from_checkpoint,
    )
    todo = [(tech, batch_size) for batch_size in sizes for tech in techs]
    done = 0
    try:
        for tech, batch_size in todo:
            try:
                m = measure(
                    spec, tech, batch_size, device=device, precision=precision, optimizer=optimizer,
                    warmup_steps=warmup_steps, steps=steps, fake=fake, memory_limit=memory_limit,
                    layers=layer_count, time_limit_s=time_limit_s, memory_snapshot=memory_snapshot,
                )
            except SpecError as err:
                # prepare() checked what every technique needs; whatever it could not foresee is
                # this technique's error, and must not throw away the rest of the run.
                m = Measurement(technique=tech.name, batch_size=batch_size, precision=precision,
                                optimizer=optimizer, device=str(device), fake=fake, status="error",
                                error=f"{tech.name}: {err}")
            if m.num_parameters is not None and "parameters" not in result.model_info and tech.kind == "e2e":
                result.model_info["parameters"] = m.num_parameters
            result.measurements.append(m)
            done += 1
            result.incomplete_reason = "still running (or killed); " + _progress(todo, done)
            if out is not None:
                result.save(out)
            if on_measurement is not None:
                on_measurement(m)
    except KeyboardInterrupt as err:
        cause = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted (Ctrl-C)"
        if done < len(todo):
            tech, batch_size = todo[done]
            cause += f" while measuring {tech.name} at batch size {batch_size}"
        result.incomplete_reason = f"{cause}; {_progress(todo, done)}"
        if out is not None:
            result.save(out)
        raise
    result.complete, result.incomplete_reason = True, None
    if out is not None:
        result.save(out)
    return result


def _progress(todo: list[tuple[Technique, int]], done: int) -> str:
    missing = ", ".join(f"{t.name} @ batch {b}" for t, b in todo[done:])
    return f"{done} of {len(todo)} measurements finished" + (f"; not measured: {missing}" if missing else "")


_SHORT = {
    "parameters": "params", "buffers": "buffers", "gradients": "grads", "optimizer_state": "optim",
    "activations": "acts", "temporaries": "temps", "inputs": "inputs",
    "workspace": "wkspace", "communication": "comm",
}


def format_table(result: RunResult) -> str:
    """A compact text table: one row per measurement, bytes in one IEC unit named in the header."""
    ok = [m for m in result.measurements if m.ok or m.status == "nan"]
    largest = max((m.peak_bytes for m in ok), default=0)
    unit = pick_unit(largest, smallest="B")
    scale = UNIT_BYTES[unit]
    # workspace (CUDA) and communication (FSDP) only get a column where some row has them.
    optional = ("workspace", "communication")
    cats = [c for c in CATEGORIES if c not in optional or any(m.shares.get(c, 0) for m in ok)]
    head = ["technique", "batch", f"peak {unit}"] + [_SHORT[c] for c in cats] + ["phase", "step s", "IQR",
                                                                                 "B steps s", "IQR", "GFLOP/sample"]
    rows = [head]
    for m in result.measurements:
        if m.status not in ("ok", "nan"):
            rows.append([m.technique, str(m.batch_size), m.status.upper()] + [""] * (len(head) - 3))
            continue
        figs = [f"{m.peak_bytes / scale:.2f}"] + [f"{m.shares.get(c, 0) / scale:.2f}" for c in cats]
        phase = m.peak_phase or ""
        if m.peak_block is not None:
            phase += f" (block {m.peak_block})"
        times = [f"{t:.4f}" if t is not None else "-" for t in
                 (m.step_time_s, m.step_time_iqr_s, m.block_steps_time_s, m.block_steps_time_iqr_s)]
        gflops = f"{m.flops_per_sample / 1e9:.4g}" if m.flops_per_sample is not None else "-"
        name = m.technique + (" NaN" if m.status == "nan" else "")
        rows.append([name, str(m.batch_size)] + figs + [phase, *times, gflops])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) if i < len(head) - 6 else c.ljust(w)
                                           for i, (c, w) in enumerate(zip(r[1:], widths[1:]), start=1)]
        lines.append("  ".join(cells).rstrip())
    notes = [f"{m.technique} @ batch {m.batch_size}: {m.status.upper()}: {m.error}"
             for m in result.measurements if m.status != "ok" and m.error]
    device = result.environment.get("device_name") or result.environment.get("device", "")
    fake = " (fake tensors)" if any(m.fake for m in result.measurements) else ""
    bytes_per_unit = f" (1 {unit} = {scale:,} bytes)" if scale > 1 else ""
    header = f"{result.model} on {device}{fake}: peak tracked tensor memory and its shares, in {unit}{bytes_per_unit}"
    return "\n".join([header, *lines, *notes])
