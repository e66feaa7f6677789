"""The runner: measure techniques x batch sizes on one device, real or fake, and never lose
a result.

``measure()`` runs one technique through the measurement protocol (dbprofile.measure.steps:
build, warm up, one tracked step per unit, timed untracked steps) under its time limit and
returns a ``Measurement``; failures come back as its status. DiffusionBlocks is measured per
block; the worst block's peak and shares are the measurement's, and ``block_steps_time_s``
(B block-steps) is the fair time unit against one e2e step.

``run()`` does that for every technique and batch size, appending each finished
measurement to the result JSON at once (``RunResult.save`` is atomic), so an interrupted
run keeps what it measured. Failures stay inside their measurement: an exception in the
model's step is ``error`` (technique and the model's message), a real out-of-memory or
passing ``memory_limit`` is ``oom`` (with the batch size tried), a non-finite loss is
``nan``. The verdict is judged once at the end and stored on the result;
dbprofile.report.text renders it for the terminal.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dbprofile.loading import checked_spec, load_spec
from dbprofile.measure import device as devices
from dbprofile.measure import snapshot
from dbprofile.measure.activation_counts import activation_ratios as counted_ratios
from dbprofile.measure.cuda_attention import CudaAttention
from dbprofile.measure.failures import free_memory, record_failure
from dbprofile.measure.fake import cuda_autocast_policy, fake_mode
from dbprofile.measure.interleaved import time_interleaved
from dbprofile.measure.limits import Terminated, TimeLimitExceeded, time_limit
from dbprofile.measure.steps import measure_into
from dbprofile.methods.factory import make_trainer
from dbprofile.results import Measurement, RunResult, model_info_of
from dbprofile.sequence_layout import UnsupportedLayoutError
from dbprofile.settings import RunSettings
from dbprofile.spec import ModelSpec, SpecError, get_layers
from dbprofile.techniques import DEFAULT_TECHNIQUES, Technique, check_technique_fits, parse_techniques
from dbprofile.verdict import judge_into
from dbprofile.verdict.evidence import DB_NOT_APPLICABLE


def num_layers(spec: ModelSpec) -> int:
    """How many residual layers the model has (built with fake tensors: no memory)."""
    with fake_mode():
        return len(get_layers(spec.build(), spec.layers, spec.name))


def measure(
    spec: ModelSpec | str,
    technique: Technique | str,
    batch_size: int,
    settings: RunSettings | None = None,
    *,
    layers: int | None = None,
    traces: dict | None = None,
    timed: bool = True,
    count_activations: bool = True,
    **setting_fields: Any,
) -> Measurement:
    """Measure one technique at one batch size; failures come back as a status, not raised.

    ``settings`` (dbprofile.settings.RunSettings: device, precision, optimizer, steps, fake,
    memory and time limits, snapshots, the planner's CUDA emulation), with any of its fields
    given by name replacing it: ``measure(spec, "e2e", 8, fake=True)``. Bad input (unknown
    technique, more segments or blocks than layers, a bad setting) raises SpecError.
    ``layers`` (the model's residual layer count) skips counting them again. ``traces``, a
    dict, receives each unit's tracked step with every point kept (StepRecord.trace), for
    dbprofile.measure.depth. ``settings.time_limit_s`` bounds the whole technique (build,
    steps, ratios): past it the measurement is ``timeout``. ``timed=False`` leaves the timed
    steps out (``run`` times CPU techniques afterwards, interleaved). ``count_activations=False``
    leaves out DiffusionBlocks' activation ratios (the depth extrapolation's shallow traces: it
    counts them once, at full depth).
    """
    settings = RunSettings.of(settings, **setting_fields)
    spec = load_spec(spec) if not isinstance(spec, ModelSpec) else spec
    tech = parse_techniques([technique])[0] if not isinstance(technique, Technique) else technique
    check_technique_fits(tech, layers if layers is not None else num_layers(spec))
    dev = devices.resolve_device(settings.device)
    fake = settings.fake
    snapshot_for: Callable[[int | None], Path] | None = None
    if settings.memory_snapshot is not None:
        snapshot.check_snapshot_device(dev, fake)
        snapshot_for = functools.partial(
            snapshot.snapshot_path, settings.memory_snapshot, spec.name, tech.name, batch_size
        )
    m = Measurement(
        technique=tech.name,
        batch_size=batch_size,
        precision=settings.precision,
        optimizer=settings.optimizer,
        device=str(dev),
        fake=fake,
    )
    time_limit_s = settings.time_limit_s or None
    with time_limit(time_limit_s, f"{tech.name} at batch size {batch_size}") as limit:
        try:
            attention = CudaAttention(settings.compute_capability) if settings.emulate_cuda else None
            with (
                cuda_autocast_policy() if settings.emulate_cuda else contextlib.nullcontext(),
                attention or contextlib.nullcontext(),
            ):
                measure_into(
                    m, spec, tech, batch_size, settings, dev=dev, snapshot_for=snapshot_for, traces=traces, timed=timed
                )
            if attention is not None and attention.backends:
                m.extra["attention_backends"] = attention.backends
            if m.status == "ok" and tech.is_diffusion_blocks and count_activations:
                activation_ratios(m, spec, tech, batch_size)
        except SpecError:
            raise
        # SystemExit too: a model that calls sys.exit() in its step must not end the whole run.
        except (Exception, SystemExit, TimeLimitExceeded) as err:  # noqa: BLE001 - a failure is a result
            if limit.expired:
                m.status = "timeout"
                m.error = (
                    f"{tech.name}: stopped after the time limit of {time_limit_s:g} s per technique; building "
                    "the model or a training step did not finish. Raise --timeout if it is only slow."
                )
            else:
                record_failure(m, err)
            del err
        finally:
            if not fake:  # fake tensors hold no memory; a full collection costs ~0.4 s per fake run
                free_memory(dev)
    return m


def prepare(
    spec: ModelSpec,
    techs: Sequence[Technique],
    precision: str = "fp32",
    optimizer: str = "adamw",
    default_set: bool = False,
    fake: bool = True,
) -> tuple[ModelSpec, list[Technique], dict[str, Any]]:
    """Check everything the techniques need before the first measurement, so a run never
    stops half-way (after minutes of measuring) for a reason it could have found at the start.

    Validates the spec (its loss included) under fake tensors; checks each technique fits the
    layer count; fills in the hidden width from the traced hidden state where the spec leaves it
    out; and checks DiffusionBlocks applies (``db_refusal``). ``default_set`` (the CLI's default
    techniques, which the user did not name) adapts them to the model: db:B with more blocks than
    layers is left out, and so is every DiffusionBlocks technique where it does not apply, with
    the reason in ``facts[DB_NOT_APPLICABLE]`` for the verdict; named techniques are refused
    instead. ``fake=False`` (a real run) checks a step that fake tensors cannot run on real
    tensors instead of refusing it. Returns the spec to measure, the techniques, and the
    validation's facts; raises SpecError."""
    asks_db = any(t.is_diffusion_blocks for t in techs)
    spec, facts = checked_spec(spec, require_residual=asks_db and not default_set, fake_only=fake)
    if default_set:
        techs = [t for t in techs if not (t.is_diffusion_blocks and t.blocks > facts["num_layers"])]
    for tech in techs:
        check_technique_fits(tech, facts["num_layers"])
    db = [t for t in techs if t.is_diffusion_blocks]
    refusal = db_refusal(spec, db, facts, precision, optimizer) if db else None
    if refusal is not None and not default_set:
        raise SpecError(refusal)
    if refusal is not None:
        techs = [t for t in techs if not t.is_diffusion_blocks]
        facts[DB_NOT_APPLICABLE] = refusal
    return spec, list(techs), facts


def db_refusal(
    spec: ModelSpec, db: list[Technique], facts: dict[str, Any], precision: str, optimizer: str
) -> str | None:
    """Why DiffusionBlocks cannot train this model, or None: layers that are not residual, or a
    convention its step needs (batch keys, a token axis, per-position tensors it can rebuild),
    found by building it on fake tensors and stepping every block once. One configuration
    suffices: what it checks does not depend on B, only on the token layout."""
    if facts["not_residual"]:
        return str(facts["not_residual"])
    fewest = min(t.blocks or 1 for t in db)
    cpu = torch.device("cpu")
    for layout in sorted({t.lm_layout for t in db}):
        tech = parse_techniques([f"db:{fewest}" + ("+interleaved" if layout == "interleaved" else "")])[0]
        with fake_mode():
            try:
                trainer = make_trainer(tech, spec, cpu, precision=precision, optimizer=optimizer)
                for unit in trainer.units:
                    trainer.step(spec.batch(2, cpu), unit)
            except (SpecError, UnsupportedLayoutError) as err:
                return str(err)
            except SystemExit as err:
                raise SpecError(
                    f"A DiffusionBlocks step of {spec.name!r} (on fake tensors, before measuring) called "
                    f"sys.exit({err.code!r}); the model's code must raise an exception instead."
                ) from None
            except Exception:  # noqa: BLE001 - an op fake tensors cannot run is no fault of the model;
                pass  # the real measurement will run it, and record any real failure as that technique's error
    return None


def run(
    spec: ModelSpec | str | None,
    techniques: Sequence[Technique | str] | str = DEFAULT_TECHNIQUES,
    batch_sizes: Sequence[int] | int = (8,),
    settings: RunSettings | None = None,
    *,
    out: str | Path | None = None,
    on_measurement: Callable[[Measurement], None] | None = None,
    command: str = "",
    facts: dict[str, Any] | None = None,
    from_checkpoint: bool = False,
    **setting_fields: Any,
) -> RunResult:
    """Measure every technique at every batch size; save after each measurement; judge.

    ``settings`` as for ``measure`` (fields by name replace it). Bad input raises SpecError
    before anything is measured (``prepare``). While it runs the saved result says
    ``complete: false``; Ctrl-C (or SIGTERM, see dbprofile.measure.limits) saves what finished
    with the reason and re-raises; a normal end saves ``complete: true``. Each technique is
    bounded by ``settings.time_limit_s`` (a ``timeout`` measurement, then the next one).
    ``facts``: the caller has already run ``prepare`` (``spec`` is the spec it returned).
    ``from_checkpoint`` records that the team keeps an end-to-end checkpoint (the verdict reads
    it). The verdict (dbprofile.verdict) is computed once at the end and stored on the result."""
    settings = RunSettings.of(settings, **setting_fields)
    spec = spec if isinstance(spec, ModelSpec) else load_spec(spec)
    techs = parse_techniques(techniques)
    sizes = [batch_sizes] if isinstance(batch_sizes, int) else list(batch_sizes)
    if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
        raise SpecError(f"Batch sizes must be integers of at least 1; got {sizes}.")
    device = settings.device
    dev = devices.resolve_device(device)  # a bad device string fails here, before anything runs
    if facts is None:
        # The default set (not named) adapts to the model, as on the command line.
        default_set = techniques is DEFAULT_TECHNIQUES
        spec, techs, facts = prepare(spec, techs, settings.precision, settings.optimizer, default_set, settings.fake)
    layer_count = facts["num_layers"]
    if settings.memory_snapshot is not None:
        snapshot.check_snapshot_device(dev, settings.fake)
    model_info = model_info_of(spec, layer_count)
    if facts.get(DB_NOT_APPLICABLE):
        model_info[DB_NOT_APPLICABLE] = facts[DB_NOT_APPLICABLE]
    result = RunResult(
        model=spec.name,
        model_info=model_info,
        environment=devices.environment(device),
        command=command,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        complete=False,
        from_checkpoint=from_checkpoint,
    )
    todo = [(tech, batch_size) for batch_size in sizes for tech in techs]
    done = 0
    # CPU techniques are timed after the memory measurements of their batch size, interleaved
    # (dbprofile.measure.interleaved, docs/timing.md); CUDA ones in their own measurement, where
    # the allocator's peaks are read over the same untracked steps.
    interleave = not settings.fake and dev.type == "cpu"
    try:
        for tech, batch_size in todo:
            try:
                m = measure(spec, tech, batch_size, settings, layers=layer_count, timed=not interleave)
            except SpecError as err:
                # prepare() checked what every technique needs; whatever it could not foresee is
                # this technique's error, and must not throw away the rest of the run.
                m = Measurement.failed(
                    tech.name,
                    batch_size,
                    f"{tech.name}: {err}",
                    precision=settings.precision,
                    optimizer=settings.optimizer,
                    device=str(device),
                    fake=settings.fake,
                )
            if m.num_parameters is not None and "parameters" not in result.model_info and tech.kind == "e2e":
                result.model_info["parameters"] = m.num_parameters
            result.measurements.append(m)
            done += 1
            result.incomplete_reason = "still running (or killed); " + _progress(todo, done)
            if out is not None:
                result.save(out)
            if on_measurement is not None:
                on_measurement(m)
            if interleave and (done == len(todo) or todo[done][1] != batch_size):
                time_cpu(spec, measured_at(result, batch_size, techs), batch_size, settings)
                if out is not None:
                    result.save(out)
    except KeyboardInterrupt as err:
        cause = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted (Ctrl-C)"
        if done < len(todo):
            tech, batch_size = todo[done]
            cause += f" while measuring {tech.name} at batch size {batch_size}"
        result.incomplete_reason = f"{cause}; {_progress(todo, done)}"
        judge_into(result)  # on what finished: the page says so
        if out is not None:
            result.save(out)
        raise
    result.complete, result.incomplete_reason = True, None
    result.environment["load_average_end"] = devices.load_average()
    judge_into(result)
    if out is not None:
        result.save(out)
    return result


def time_cpu(
    spec: ModelSpec, entries: list[tuple[Measurement, Technique]], batch_size: int, settings: RunSettings
) -> None:
    """``time_interleaved`` under the run's time limit. Each technique timed has its own limit, and
    the rounds time them together, so the rounds get the sum; past it the techniques not yet timed
    keep their memory figures and say the timing stopped (``extra['timing_error']``)."""
    timed = [m for m, _ in entries if m.ok]
    seconds = settings.time_limit_s * len(timed) if settings.time_limit_s and timed else None
    try:
        with time_limit(seconds, f"the CPU timing at batch size {batch_size}") as limit:
            time_interleaved(spec, entries, batch_size, settings.steps)
    except TimeLimitExceeded:
        pass
    if limit.expired:
        for m in timed:
            if m.step_time_s is None:
                m.extra["timing_error"] = (
                    f"timeout: the timed steps stopped after the time limit of {settings.time_limit_s:g} s per "
                    f"technique ({seconds:g} s for the {len(timed)} timed together); the memory figures stand. "
                    "Raise --timeout (or lower --steps) for step times."
                )


def measured_at(result: RunResult, batch_size: int, techs: list[Technique]) -> list[tuple[Measurement, Technique]]:
    """The run's measurements at ``batch_size`` with their techniques, in the run's order."""
    by_name = {t.name: t for t in techs}
    return [(m, by_name[m.technique]) for m in result.measurements if m.batch_size == batch_size]


def _progress(todo: list[tuple[Technique, int]], done: int) -> str:
    missing = ", ".join(f"{t.name} @ batch {b}" for t, b in todo[done:])
    return f"{done} of {len(todo)} measurements finished" + (f"; not measured: {missing}" if missing else "")


def activation_ratios(m: Measurement, spec: ModelSpec, tech: Technique, batch_size: int) -> None:
    """Bytes saved for backward over the layers: one block vs the same AdaLN layers at full
    depth (about 1/B) and vs the plain e2e model (larger: AdaLN saves more); METHOD.md."""
    if tech.blocks is None:  # only DiffusionBlocks has blocks to compare
        return
    try:
        with fake_mode():
            # Counting saved tensors needs shapes only: fake tensors cost no memory or time.
            m.extra["activation_ratios"] = counted_ratios(
                spec, tech.blocks, batch_size, "cpu", lm_layout=tech.lm_layout
            )
    except Exception as err:  # noqa: BLE001 - a missing ratio must not lose the measurement
        m.extra["activation_ratios"] = None
        m.extra["activation_ratios_error"] = f"{type(err).__name__}: {err}"
