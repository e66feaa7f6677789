"""Each rank of a distributed measurement: ``measure_rank`` (this rank, one technique, under
the sharded tracker), ``run_distributed`` (every technique on every rank, merged on rank 0
into one RunResult with a row per rank), and ``simulate_rank`` (one rank of a sharded or
block-parallel run from ONE process on fake tensors, for the planner). The package docstring
(dbprofile.measure.distributed) describes what a rank measures and how failures are kept."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist

from dbprofile import progress
from dbprofile.loading import load_spec
from dbprofile.measure import device as devices
from dbprofile.measure.distributed.group import DEFAULT_TIMEOUT_S, init_process_group
from dbprofile.measure.distributed.mesh import check_mesh, make_meshes
from dbprofile.measure.distributed.tracker import ShardedTracker
from dbprofile.measure.failures import free_memory, record_failure
from dbprofile.measure.fake import fake_mode
from dbprofile.measure.steps import SEED, measure_into
from dbprofile.methods.checkpointing import split_contiguous
from dbprofile.methods.sharding import (
    SHARDING_BLOCK_PARALLEL,
    SHARDING_FSDP,
    check_distributed,
    make_distributed_trainer,
)
from dbprofile.methods.tensor_parallel import check_tensor_parallel
from dbprofile.results import Measurement, RunResult, model_info_of
from dbprofile.settings import RunSettings
from dbprofile.spec import ModelSpec, SpecError, get_layers
from dbprofile.techniques import Technique, parse_technique
from dbprofile.verdict import judge_into

RESULTS_GRACE_S = 120
"""The results group waits this much longer than the main group, so a timed-out rank still reports."""


# ---------------------------------------------------------------- one rank, one technique


def _sharding(dtech: Technique, fsdp: bool) -> str:
    """How a rank's measurement is spread: block-parallel, FSDP (zero-3) or not at all."""
    return SHARDING_BLOCK_PARALLEL if dtech.parallel else (SHARDING_FSDP if fsdp else "none")


def measure_rank(
    spec: ModelSpec,
    dtech: Technique,
    batch_size: int,
    dev: torch.device,
    fsdp: bool,
    settings: RunSettings,
    results_group=None,
    meshes: tuple = (None, None),
) -> Measurement:
    """This rank's measurement of one technique; every rank calls it with the same arguments.

    Building is checked by all ranks together first (on ``results_group``), so a rank that cannot
    build its trainer fails alone and the others do not wait in a collective for it.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    precision, optimizer = settings.precision, settings.optimizer
    m = Measurement(
        technique=dtech.name,
        batch_size=batch_size,
        precision=precision,
        optimizer=optimizer,
        device=str(dev),
        extra={"rank": rank, "world_size": world, "sharding": _sharding(dtech, fsdp)},
    )
    if meshes[1] is not None:
        m.extra["tp"] = meshes[1].size()
    built_trainers = []
    try:
        torch.manual_seed(SEED)
        start = time.perf_counter()
        built_trainers.append(
            make_distributed_trainer(
                dtech,
                spec,
                dev,
                rank,
                fsdp,
                precision=precision,
                optimizer=optimizer,
                mesh=meshes[0],
                tp_mesh=meshes[1],
            )
        )
        build_s = time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - reported as this rank's row
        record_failure(m, err)
    built: list[Any] = [None] * world
    dist.all_gather_object(built, m.error, group=results_group)
    broken = [(r, e) for r, e in enumerate(built) if e is not None]
    if broken:
        if m.ok:
            r, e = broken[0]
            m.status, m.error = "error", f"not measured: rank {r} failed to build its trainer ({e})"
            m.extra["not_measured"] = True
        return m
    made: list[ShardedTracker] = []
    try:
        # The protocol takes the built trainer (the list's only reference, so it is freed after).
        measure_into(
            m,
            spec,
            dtech.on_one_device(),
            batch_size,
            dataclasses.replace(settings, fake=False),
            dev=dev,
            trainer_factory=built_trainers.pop,
            tracker_cls=counting_tracker(made),
            adaptive_timing=False,
        )  # every rank must run the same steps (collectives)
        m.extra["collective_bytes"] = dict(made[-1].collective_bytes)
        m.extra["timing"]["build_s"] = build_s
    except SpecError:
        raise
    except Exception as err:  # noqa: BLE001 - a rank's failure is its row, not a crash
        record_failure(m, err)
        del err
    finally:
        built_trainers.clear()
        free_memory(dev)
    return m


# ---------------------------------------------------------------- one rank, simulated (the planner)


@contextlib.contextmanager
def _fake_world(world_size: int, tp: int = 1):
    """A process group of ``world_size`` ranks in which this process is rank 0 and every collective
    is a no-op (PyTorch's ``fake`` backend): FSDP runs its real code without other processes. Yields
    the (data-parallel, tensor-parallel or None) meshes."""
    if dist.is_initialized():
        raise SpecError(
            "Simulating a sharded rank needs its own (fake) process group, but this process already belongs "
            "to one (it runs under torchrun). Plan outside torchrun, or measure with run_distributed."
        )
    import torch.distributed.fsdp  # noqa: F401 - importing FSDP registers the 'fake' backend

    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=world_size)
    try:
        # Made outside fake mode: the mesh's set-up reads real values.
        yield make_meshes("cpu", world_size, tp)
    finally:
        dist.destroy_process_group()


def simulate_rank(
    spec: ModelSpec | str,
    technique: str | Technique,
    batch_size: int,
    world_size: int,
    settings: RunSettings | None = None,
    *,
    fsdp: bool = True,
    per_rank: list | None = None,
    tp: int = 1,
    **setting_fields: Any,
) -> Measurement:
    """What one rank of a ``world_size``-rank run would track, from ONE process and no memory: the
    real FSDP (or block-parallel) training code runs on fake tensors in a fake process group, and
    the same ``ShardedTracker`` counts it. FSDP ranks differ only where a first dimension does not
    divide by the world size: the first ranks get the larger pieces (as ``torch.chunk`` does), so
    rank 0 is the worst and stands for all. Block-parallel ranks differ where their blocks do: every
    rank holds the shared stem, head and sigma embedder and its own block's layers, so the first and
    last rank and one middle rank per block size are simulated (``representative_ranks``) and the worst
    is returned, with each rank's peak in ``extra['rank_peaks']``. ``tp`` > 1 splits every layer
    over ``tp`` ranks by tensor parallelism (dbprofile.methods.tensor_parallel) on a (world_size / tp)
    x tp mesh, FSDP sharding over the first dimension (when ``fsdp`` and it is over 1); TP ranks hold
    equal slices, so rank 0 stands for all.
    ``per_rank``, a list, receives (measurement, tracked steps with every point kept) for each simulated
    rank (dbprofile.measure.depth extrapolates them to another depth). ``settings`` (fields by name
    replace it) as for dbprofile.measure.runner.measure; the simulation is always fake and one step.
    """
    settings = RunSettings.of(settings, **setting_fields)
    settings = dataclasses.replace(settings, fake=True, steps=1)
    precision, optimizer = settings.precision, settings.optimizer
    spec = spec if isinstance(spec, ModelSpec) else load_spec(spec)
    dtech = parse_technique(technique)
    fsdp = fsdp and not dtech.parallel
    dp = check_mesh(world_size, tp)
    fsdp = fsdp and not (tp > 1 and dp == 1)
    with fake_mode():
        model = spec.build()
        check_distributed(dtech, spec, model, dp, fsdp)
        check_tensor_parallel(spec, model, tp)
        layers = len(get_layers(model, spec.layers, spec.name))
    cpu = torch.device("cpu")
    stands_for = representative_ranks(layers, world_size) if dtech.parallel else [0]
    ranks = sorted(set(stands_for))
    rows = []
    made: list[ShardedTracker] = []
    with _fake_world(world_size, tp) as (mesh, tp_mesh):
        for rank in ranks:
            m = Measurement(
                technique=dtech.name,
                batch_size=batch_size,
                precision=precision,
                optimizer=optimizer,
                device="cpu",
                fake=True,
                extra={"rank": rank, "world_size": world_size, "sharding": _sharding(dtech, fsdp), "tp": tp},
            )
            traces: dict | None = {} if per_rank is not None else None
            # The runner's protocol on fake tensors (it enters fake mode before calling the factory).
            build = functools.partial(
                make_distributed_trainer,
                dtech,
                spec,
                cpu,
                rank,
                fsdp,
                precision=precision,
                optimizer=optimizer,
                mesh=mesh,
                tp_mesh=tp_mesh,
            )
            measure_into(
                m,
                spec,
                dtech.on_one_device(),
                batch_size,
                settings,
                dev=cpu,
                trainer_factory=build,
                tracker_cls=counting_tracker(made),
                traces=traces,
            )
            if made and m.ok:
                m.extra["collective_bytes"] = dict(made[-1].collective_bytes)
            rows.append(m)
            if per_rank is not None:
                per_rank.append((m, traces))
    worst = max(rows, key=lambda row: row.peak_bytes)
    peaks = {row.extra["rank"]: row.peak_bytes for row in rows}
    worst.extra["rank_peaks"] = [peaks[rank] for rank in stands_for]
    if dtech.parallel and all(row.training_flops is not None for row in rows):
        # Block-parallel ranks each train one block: together, one step of every rank trains
        # every layer once, the same work as db:B's B block-steps on one device.
        flops = {row.extra["rank"]: row.training_flops for row in rows}
        worst.extra["rank_step_flops"] = [flops[rank] for rank in stands_for]
        worst.training_flops = sum(worst.extra["rank_step_flops"])
    return worst


def counting_tracker(made: list[ShardedTracker]) -> type[ShardedTracker]:
    """A ShardedTracker factory that keeps each tracker it makes in ``made`` (its collective bytes are
    read after the protocol ends)."""

    def make(*args: Any, **kwargs: Any) -> ShardedTracker:
        made.append(ShardedTracker(*args, **kwargs))
        return made[-1]

    return cast("type[ShardedTracker]", make)


def representative_ranks(layers: int, blocks: int) -> list[int]:
    """For each block-parallel rank, the rank whose simulation stands for it: itself for the first and
    the last block, else the first middle rank whose block has as many layers (same bytes)."""
    sizes = [len(group) for group in split_contiguous(layers, blocks)]
    first_of_size: dict[int, int] = {}
    return [
        rank if rank in (0, blocks - 1) else first_of_size.setdefault(size, rank) for rank, size in enumerate(sizes)
    ]


# ---------------------------------------------------------------- all ranks


def run_distributed(
    spec: ModelSpec | str | None,
    techniques: Sequence[str] | str,
    batch_size: int | Sequence[int],
    settings: RunSettings | None = None,
    *,
    fsdp: bool = True,
    device: str | None = None,
    out: str | Path | None = None,
    command: str = "",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    tp: int = 1,
    **setting_fields: Any,
) -> RunResult | None:
    """Measure every technique (at every batch size, per rank) on every rank; rank 0 returns the
    RunResult (a row per rank, technique and batch size, saved to ``out`` after each technique), the
    other ranks return None.

    Call it on every rank (under torchrun). ``fsdp`` shards e2e / ckpt / db:B / db:B+ckpt with FSDP2;
    ``db:B+parallel`` needs exactly B ranks and no ``fsdp``. ``device``: 'cpu' (gloo) or 'cuda'
    (NCCL, one GPU per rank); by default CUDA when available. Bad input raises SpecError on every
    rank before anything runs. ``settings`` (fields by name replace it) as for
    dbprofile.measure.runner.run; its ``device`` is not used (``device`` picks the backend).
    ``tp`` > 1 splits each layer over ``tp`` ranks by tensor parallelism on a (world / tp) x tp mesh
    (FSDP, if asked, over the first dimension when it is over 1); e2e, ckpt, sac and db:B.
    """
    settings = RunSettings.of(settings, **setting_fields)
    spec = spec if isinstance(spec, ModelSpec) else load_spec(spec)
    names = [t for t in techniques.split(",") if t.strip()] if isinstance(techniques, str) else list(techniques)
    dtechs = list({d.name: d for d in map(parse_technique, names)}.values())
    if not dtechs:
        raise SpecError("No technique given; pass e.g. e2e,ckpt,db:2 (or db:B+parallel).")
    sizes = [batch_size] if isinstance(batch_size, int) else list(batch_size)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise SpecError(f"batch_size must be a positive integer (or a list of them); got {batch_size!r}.")
    if not fsdp and tp == 1 and not any(d.parallel for d in dtechs):
        raise SpecError(
            "run_distributed measures sharded or block-parallel training: pass fsdp=True (--fsdp), "
            "or a db:B+parallel technique; for one device use dbprofile.measure.runner.run."
        )
    owns_group = not dist.is_initialized()
    rank, world, dev = init_process_group(device, timeout_s)
    try:
        return _run_ranks(
            spec,
            dtechs,
            sizes,
            settings,
            rank=rank,
            world=world,
            dev=dev,
            fsdp=fsdp,
            out=out,
            command=command,
            timeout_s=timeout_s,
            tp=tp,
        )
    finally:
        # A group this call made is this call's to close (torchrun's processes then exit cleanly).
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run_ranks(
    spec: ModelSpec,
    dtechs: list[Technique],
    sizes: list[int],
    settings: RunSettings,
    *,
    rank: int,
    world: int,
    dev: torch.device,
    fsdp: bool,
    out: str | Path | None,
    command: str,
    timeout_s: float,
    tp: int = 1,
) -> RunResult | None:
    dp = check_mesh(world, tp)
    fsdp = fsdp and dp > 1
    with fake_mode():  # shape checks only: no memory
        model = spec.build()
        for d in dtechs:
            check_distributed(d, spec, model, dp, fsdp and not d.parallel)
        check_tensor_parallel(spec, model, tp)
        num_layers = len(get_layers(model, spec.layers, spec.name))
        del model
    results_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s + RESULTS_GRACE_S))
    meshes = make_meshes(dev.type, world, tp) if tp > 1 else (None, None)
    result = None
    if rank == 0:
        env = devices.environment(dev)
        env.update(world_size=world, backend=dist.get_backend(), fsdp=fsdp, tp=tp)
        result = RunResult(
            model=spec.name,
            model_info=model_info_of(spec, num_layers),
            environment=env,
            command=command,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
    stopped: str | None = None
    for batch_size, d in [(b, d) for b in sizes for d in dtechs]:
        if stopped is None:
            m = measure_rank(
                spec,
                d,
                batch_size,
                dev,
                fsdp and not d.parallel,
                settings,
                results_group,
                (None, None) if d.parallel else meshes,
            )
        else:
            m = Measurement.failed(
                d.name,
                batch_size,
                f"not run: {stopped}",
                precision=settings.precision,
                optimizer=settings.optimizer,
                device=str(dev),
                extra={"rank": rank, "world_size": world, "not_measured": True},
            )
        progress.stage(f"{d.name} @ batch {batch_size}: gathering the measurements of {world} ranks")
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(m, gathered, dst=0, group=results_group)
        stop_reason: list[str | None] = [None]
        if result is not None and gathered is not None:  # rank 0
            for r, row in enumerate(gathered):
                if not row.ok and row.error and not row.error.startswith(f"rank {r}"):
                    row.error = f"rank {r}: {row.error}"
                result.measurements.append(row)
                if e2e_parameters := (row.num_parameters if row.technique == "e2e" else None):
                    result.model_info.setdefault("parameters", e2e_parameters)
            failed = [(r, row) for r, row in enumerate(gathered) if not row.ok and not row.extra.get("not_measured")]
            # The same failure on every rank (a deterministic model error) left nobody waiting; a
            # failure on some ranks, or different ones, may have left collectives half done.
            uneven = len(failed) < world or len({row.error.split(": ", 1)[-1] for _, row in failed}) > 1
            if stopped is None and failed and uneven:
                waited = {w for w, row in failed if _timed_out(row.error)}
                r = next((r for r, _ in failed if r not in waited), failed[0][0])
                for w in waited:
                    gathered[w].error += f" (rank {w} waited in a collective for rank {r}, which failed)"
                stop_reason[0] = (
                    f"rank {r} failed in {d.name}, so the ranks' collectives may be out of step; "
                    "the remaining techniques were not run"
                )
            judge_into(result)  # on the measurements so far: the saved file always carries one
            if out is not None:
                result.save(out)
        dist.broadcast_object_list(stop_reason, src=0, group=results_group)
        stopped = stopped or stop_reason[0]
    dist.barrier(group=results_group)
    return result


def _timed_out(error: str | None) -> bool:
    text = (error or "").lower()
    return "timed out" in text or "timeout" in text


# ---------------------------------------------------------------- launching torchrun
