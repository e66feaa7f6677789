"""Per-rank measurement of sharded (FSDP2) and block-parallel training, merged on rank 0.

``run_distributed()`` is called on EVERY rank of a process group (started by ``torchrun``, or
``launch()`` which starts ``torchrun`` itself). Each rank builds its trainer
(``dbprofile.methods.sharding``), runs the runner's protocol (warm-up steps for every unit, one
tracked step per unit, timed steps with the tracker paused) under a ``ShardedTracker``, and rank 0
gathers the ranks' ``Measurement``s (``torch.distributed.gather_object``) into one ``RunResult``
with a row per rank and technique (``extra``: ``rank``, ``world_size``, ``sharding``).

What a rank measures, in the usual categories: its shards of the parameters, gradients and
optimizer state (FSDP keeps them as DTensors; the tracker counts each rank's local shard), its own
activations and temporaries, and ``communication``: the buffers FSDP allocates for its collectives
(the all-gather input and output, the unsharded parameters copied out of it, the reduce-scatter
input), recognised by the ``FSDP::all_gather*`` and ``FSDP::post_backward_reduce`` regions FSDP
marks with ``record_function``. The reduce-scatter output becomes the sharded gradients and is
counted there. FSDP frees and re-allocates unsharded parameters with ``UntypedStorage.resize_``,
which no dispatch mode sees; like PyTorch's own ``torch.distributed._tools.mem_tracker.MemTracker``,
the tracker wraps ``resize_`` while it is active so those bytes come and go at the right instant.

Failures: a rank's error (its step raised, OOM, NaN) is its own row, reported by rank 0 with the
rank number; the other ranks' rows and the other techniques are kept. A rank that fails while
the others wait in a collective would hang them, so the process group has a timeout
(``timeout_s``); after such a failure the remaining techniques are not run (the group may be out
of step) and say so. Results travel on a separate gloo group, so they arrive even then.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from dbprofile import progress
from dbprofile.measure import device as devices
from dbprofile.measure.runner import (
    DEFAULT_STEPS,
    DEFAULT_WARMUP_STEPS,
    SEED,
    _measure_into,
    free_memory,
    record_failure,
)
from dbprofile.measure.tracker import _CAT_INDEX, Tracker
from dbprofile.methods.checkpointing import split_contiguous
from dbprofile.methods.sharding import (
    SHARDING_BLOCK_PARALLEL,
    SHARDING_FSDP,
    DistributedTechnique,
    check_distributed,
    make_distributed_trainer,
    parse_distributed_technique,
)
from dbprofile.results import CATEGORIES, UNIT_BYTES, Measurement, RunResult, pick_unit
from dbprofile.loading import load_spec
from dbprofile.spec import ModelSpec, SpecError, get_layers

DEFAULT_TIMEOUT_S = 300
"""How long a rank waits in a collective for the others before it gives up (a failed rank)."""
RESULTS_GRACE_S = 120
"""The results group waits this much longer than the main group, so a timed-out rank still reports."""
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

_COMM = _CAT_INDEX["communication"]
_TMP = _CAT_INDEX["temporaries"]
# FSDP2 marks its collective work with record_function; storages made inside these regions are
# its communication buffers (``FSDP::all_gather`` also prefixes ``FSDP::all_gather_copy_out``).
_COMM_REGIONS = ("FSDP::all_gather", "FSDP::post_backward_reduce")
_RF_ENTER = "profiler._record_function_enter_new"
_RF_EXIT = "profiler._record_function_exit"
_REDUCE_SCATTER = ("c10d._reduce_scatter_base_", "c10d.reduce_scatter_tensor_coalesced_")


# ---------------------------------------------------------------- the tracker, for DTensors and FSDP


class ShardedTracker(Tracker):
    """The dbprofile ``Tracker`` for one rank of FSDP or block-parallel training.

    It counts a DTensor by its local shard (a DTensor's own storage reports the global size),
    follows ``UntypedStorage.resize_`` (FSDP frees unsharded parameters that way), and files
    FSDP's collective buffers under ``communication``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.regions: list[str] = []
        self._original_resize = None

    def __enter__(self) -> "ShardedTracker":
        self._patch_resize()
        try:
            return super().__enter__()
        except BaseException:
            self._unpatch_resize()
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._unpatch_resize()

    def _on_op(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        packet = str(func.overloadpacket)
        if packet == _RF_ENTER:
            self.regions.append(str(args[0]) if args else "")
        elif packet == _RF_EXIT and self.regions:
            self.regions.pop()
        super()._on_op(func, args, kwargs, out)
        if packet in _REDUCE_SCATTER and args:
            # The reduce-scatter output is what the sharded gradients are views of.
            for t in _flat_tensors(args[0]):
                self._assign_role(t, "gradients")
        elif packet == "fsdp.split_with_sizes_copy":
            # Its ``out`` tensors are the unsharded parameters (made just before, in the region).
            for t in _flat_tensors(kwargs.get("out", args[-1] if args else ())):
                self._to_communication(t)

    # -------------------------------------------------------- DTensors and regions

    def _info(self, t: torch.Tensor):
        t = _local(t)
        key_known = _storage_id(t) in self._infos
        info = super()._info(t)
        if (
            info is not None and not key_known and info.cat == _TMP
            and any(r.startswith(_COMM_REGIONS) for r in self.regions)
        ):
            self._to_communication(t, info)
        return info

    def _assign_role(self, t: torch.Tensor, role: str) -> None:
        local = _local(t)
        info = self._infos.get(_storage_id(local))
        # A plain (not DTensor) parameter whose storage FSDP all-gathered is the unsharded copy a
        # unit computes with: it stays communication, its sharded DTensor is the parameter.
        if role == "parameters" and local is t and info is not None and info.cat == _COMM and info.role is None:
            return
        super()._assign_role(local, role)

    def _to_communication(self, t: torch.Tensor, info=None) -> None:
        info = info if info is not None else self._info(t)
        if info is None or info.cat != _TMP or info.role is not None:
            return
        self._move(info, _COMM)
        if self.recording and self.total == self._peak:
            # The storage that set this peak was filed as a temporary a moment ago; the peak's
            # total is unchanged, its split now names it correctly.
            self._peak_shares = list(self.totals)

    # -------------------------------------------------------- resize_

    def _patch_resize(self) -> None:
        original = torch.UntypedStorage.resize_
        tracker = self

        @functools.wraps(original)
        def resize_(storage, size):
            result = original(storage, size)
            tracker._on_resize(storage)
            return result

        self._original_resize = original
        torch.UntypedStorage.resize_ = resize_

    def _unpatch_resize(self) -> None:
        if self._original_resize is not None:
            torch.UntypedStorage.resize_ = self._original_resize
            self._original_resize = None

    def _on_resize(self, storage: torch.UntypedStorage) -> None:
        info = self._infos.get(id(storage))
        if info is None or info.cat is None:
            return
        nbytes = self._rounded(storage.nbytes())
        delta = nbytes - info.nbytes
        if delta == 0:
            return
        with self._lock:
            info.nbytes = nbytes
            if delta > 0:
                self._add(info.cat, delta)
            else:
                self.totals[info.cat] += delta
                self.total += delta
                if self.recording:
                    self._record()


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (whose storage holds this rank's bytes); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        with torch.no_grad():
            return t.to_local()
    return t


def _storage_id(t: torch.Tensor) -> int | None:
    try:
        return id(t.untyped_storage())
    except (RuntimeError, NotImplementedError):
        return None


def _flat_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _flat_tensors(item)]
    return []


# ---------------------------------------------------------------- process group


def in_torchrun() -> bool:
    """True when this process was started by torchrun (its rendezvous variables are set)."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def init_process_group(device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int, torch.device]:
    """Join the process group from torchrun's environment (or use one already made).

    Backend NCCL when CUDA is used, gloo on the CPU. Returns (rank, world size, this rank's device):
    ``cuda:LOCAL_RANK`` on CUDA, else the CPU. Raises SpecError, saying how to launch, without one.
    """
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise SpecError(f"Device {device!r} was asked for but CUDA is not available here; use --device cpu.")
    if not dist.is_initialized():
        if not in_torchrun():
            raise SpecError(
                "--fsdp and db:B+parallel run one process per device and need a process group, and there is "
                "none: launch under torchrun, e.g. `torchrun --nproc-per-node 2 $(which dbprofile) run MODEL "
                "--fsdp`, or let dbprofile launch it with `dbprofile run MODEL --fsdp --nproc 2`."
            )
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
        torch.cuda.set_device(index)
        return rank, world, torch.device("cuda", index)
    return rank, world, torch.device("cpu")


# ---------------------------------------------------------------- one rank, one technique


def _sharding(dtech: DistributedTechnique, fsdp: bool) -> str:
    """How a rank's measurement is spread: block-parallel, FSDP (zero-3) or not at all."""
    return SHARDING_BLOCK_PARALLEL if dtech.parallel else (SHARDING_FSDP if fsdp else "none")


def measure_rank(
    spec: ModelSpec,
    dtech: DistributedTechnique,
    batch_size: int,
    dev: torch.device,
    fsdp: bool,
    precision: str = "fp32",
    optimizer: str = "adamw",
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    steps: int = DEFAULT_STEPS,
    results_group=None,
) -> Measurement:
    """This rank's measurement of one technique; every rank calls it with the same arguments.

    Building is checked by all ranks together first (on ``results_group``), so a rank that cannot
    build its trainer fails alone and the others do not wait in a collective for it.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    m = Measurement(technique=dtech.name, batch_size=batch_size, precision=precision, optimizer=optimizer,
                    device=str(dev), extra={"rank": rank, "world_size": world, "sharding": _sharding(dtech, fsdp)})
    trainer = None
    try:
        torch.manual_seed(SEED)
        start = time.perf_counter()
        trainer = make_distributed_trainer(dtech, spec, dev, rank, fsdp, precision=precision, optimizer=optimizer)
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
    try:
        _measure_into(m, spec, dtech.technique, batch_size, dev, dev, warmup_steps, steps, False, None,
                      trainer_factory=lambda: trainer, tracker_cls=ShardedTracker,
                      adaptive_timing=False)  # every rank must run the same steps (collectives)
        m.extra["timing"]["build_s"] = build_s
    except SpecError:
        raise
    except Exception as err:  # noqa: BLE001 - a rank's failure is its row, not a crash
        record_failure(m, err)
        del err
    finally:
        del trainer
        free_memory(dev)
    return m


# ---------------------------------------------------------------- one rank, simulated (the planner)


@contextlib.contextmanager
def _fake_world(world_size: int):
    """A process group of ``world_size`` ranks in which this process is rank 0 and every collective
    is a no-op (PyTorch's ``fake`` backend): FSDP runs its real code without other processes."""
    if dist.is_initialized():
        raise SpecError(
            "Simulating a sharded rank needs its own (fake) process group, but this process already belongs "
            "to one (it runs under torchrun). Plan outside torchrun, or measure with run_distributed."
        )
    from torch.distributed.device_mesh import init_device_mesh

    import torch.distributed.fsdp  # noqa: F401 - importing FSDP registers the 'fake' backend

    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=world_size)
    try:
        # Made outside fake mode: the mesh's set-up reads real values.
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def simulate_rank(
    spec: ModelSpec | str,
    technique: str | DistributedTechnique,
    batch_size: int,
    world_size: int,
    *,
    fsdp: bool = True,
    precision: str = "fp32",
    optimizer: str = "adamw",
    round_to: int | None = None,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    per_rank: list | None = None,
) -> Measurement:
    """What one rank of a ``world_size``-rank run would track, from ONE process and no memory: the
    real FSDP (or block-parallel) training code runs on fake tensors in a fake process group, and
    the same ``ShardedTracker`` counts it. FSDP ranks differ only where a first dimension does not
    divide by the world size: the first ranks get the larger pieces (as ``torch.chunk`` does), so
    rank 0 is the worst and stands for all. Block-parallel ranks differ where their blocks do: every
    rank holds the shared stem, head and sigma embedder and its own block's layers, so the first and
    last rank and one middle rank per block size are simulated (``representative_ranks``) and the worst
    is returned, with each rank's peak in ``extra['rank_peaks']``.
    ``per_rank``, a list, receives (measurement, tracked steps with every point kept) for each simulated
    rank (dbprofile.measure.depth extrapolates them to another depth).
    """
    from dbprofile.measure.fake import fake_mode

    spec = spec if isinstance(spec, ModelSpec) else load_spec(spec)
    dtech = parse_distributed_technique(technique)
    fsdp = fsdp and not dtech.parallel
    with fake_mode():
        model = spec.build()
        check_distributed(dtech, spec, model, world_size, fsdp)
        layers = len(get_layers(model, spec.layers, spec.name))
    cpu = torch.device("cpu")
    stands_for = representative_ranks(layers, world_size) if dtech.parallel else [0]
    ranks = sorted(set(stands_for))
    rows = []
    with _fake_world(world_size) as mesh:
        for rank in ranks:
            m = Measurement(technique=dtech.name, batch_size=batch_size, precision=precision, optimizer=optimizer,
                            device="cpu", fake=True,
                            extra={"rank": rank, "world_size": world_size, "sharding": _sharding(dtech, fsdp)})
            traces: dict | None = {} if per_rank is not None else None
            # The runner's protocol on fake tensors (it enters fake mode before calling the factory).
            _measure_into(m, spec, dtech.technique, batch_size, cpu, cpu, warmup_steps, 1, True, None, round_to,
                          trainer_factory=lambda rank=rank: make_distributed_trainer(
                              dtech, spec, cpu, rank, fsdp, precision=precision, optimizer=optimizer, mesh=mesh),
                          tracker_cls=ShardedTracker, traces=traces)
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


def representative_ranks(layers: int, blocks: int) -> list[int]:
    """For each block-parallel rank, the rank whose simulation stands for it: itself for the first and
    the last block, else the first middle rank whose block has as many layers (same bytes)."""
    sizes = [len(group) for group in split_contiguous(layers, blocks)]
    first_of_size: dict[int, int] = {}
    return [rank if rank in (0, blocks - 1) else first_of_size.setdefault(size, rank)
            for rank, size in enumerate(sizes)]


# ---------------------------------------------------------------- all ranks


def run_distributed(
    spec: ModelSpec | str | None,
    techniques: Sequence[str] | str,
    batch_size: int | Sequence[int],
    *,
    fsdp: bool = True,
    device: str | None = None,
    precision: str = "fp32",
    optimizer: str = "adamw",
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    steps: int = DEFAULT_STEPS,
    out: str | Path | None = None,
    command: str = "",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> RunResult | None:
    """Measure every technique (at every batch size, per rank) on every rank; rank 0 returns the
    RunResult (a row per rank, technique and batch size, saved to ``out`` after each technique), the
    other ranks return None.

    Call it on every rank (under torchrun). ``fsdp`` shards e2e / ckpt / db:B / db:B+ckpt with FSDP2;
    ``db:B+parallel`` needs exactly B ranks and no ``fsdp``. ``device``: 'cpu' (gloo) or 'cuda'
    (NCCL, one GPU per rank); by default CUDA when available. Bad input raises SpecError on every
    rank before anything runs.
    """
    spec = spec if isinstance(spec, ModelSpec) else load_spec(spec)
    names = [t for t in techniques.split(",") if t.strip()] if isinstance(techniques, str) else list(techniques)
    dtechs = list({d.name: d for d in map(parse_distributed_technique, names)}.values())
    if not dtechs:
        raise SpecError("No technique given; pass e.g. e2e,ckpt,db:2 (or db:B+parallel).")
    sizes = [batch_size] if isinstance(batch_size, int) else list(batch_size)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise SpecError(f"batch_size must be a positive integer (or a list of them); got {batch_size!r}.")
    if not fsdp and not any(d.parallel for d in dtechs):
        raise SpecError(
            "run_distributed measures sharded or block-parallel training: pass fsdp=True (--fsdp), "
            "or a db:B+parallel technique; for one device use dbprofile.measure.runner.run."
        )
    owns_group = not dist.is_initialized()
    rank, world, dev = init_process_group(device, timeout_s)
    try:
        return _run_ranks(spec, dtechs, sizes, rank, world, dev, fsdp, precision, optimizer, warmup_steps,
                          steps, out, command, timeout_s)
    finally:
        # A group this call made is this call's to close (torchrun's processes then exit cleanly).
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run_ranks(spec, dtechs, sizes, rank, world, dev, fsdp, precision, optimizer, warmup_steps, steps, out,
               command, timeout_s) -> RunResult | None:
    from dbprofile.measure.fake import fake_mode

    with fake_mode():  # shape checks only: no memory
        model = spec.build()
        for d in dtechs:
            check_distributed(d, spec, model, world, fsdp and not d.parallel)
        num_layers = len(get_layers(model, spec.layers, spec.name))
        del model
    results_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s + RESULTS_GRACE_S))
    result = None
    if rank == 0:
        env = devices.environment(dev)
        env.update(world_size=world, backend=dist.get_backend(), fsdp=fsdp)
        result = RunResult(
            model=spec.name,
            model_info={"family": spec.family, "task": spec.task, "num_layers": num_layers,
                        "hidden_size": spec.hidden_size, "description": spec.description},
            environment=env, command=command,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
    stopped: str | None = None
    for batch_size, d in [(b, d) for b in sizes for d in dtechs]:
        if stopped is None:
            m = measure_rank(spec, d, batch_size, dev, fsdp and not d.parallel, precision, optimizer,
                             warmup_steps, steps, results_group)
        else:
            m = Measurement(technique=d.name, batch_size=batch_size, precision=precision, optimizer=optimizer,
                            device=str(dev), status="error", error=f"not run: {stopped}",
                            extra={"rank": rank, "world_size": world, "not_measured": True})
        progress.stage(f"{d.name} @ batch {batch_size}: gathering the measurements of {world} ranks")
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(m, gathered, dst=0, group=results_group)
        verdict = [None]
        if rank == 0:
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
                verdict[0] = (f"rank {r} failed in {d.name}, so the ranks' collectives may be out of step; "
                              "the remaining techniques were not run")
            if out is not None:
                result.save(out)
        dist.broadcast_object_list(verdict, src=0, group=results_group)
        stopped = stopped or verdict[0]
    dist.barrier(group=results_group)
    return result


def _timed_out(error: str | None) -> bool:
    text = (error or "").lower()
    return "timed out" in text or "timeout" in text


# ---------------------------------------------------------------- launching torchrun


def launch(nproc: int, argv: Sequence[str], *, entry: str = "dbprofile.cli:main",
           torchrun_args: Sequence[str] = (), env: dict[str, str] | None = None) -> int:
    """Run ``entry`` (the dbprofile CLI by default) under ``python -m torch.distributed.run
    --standalone --nproc-per-node nproc`` with ``argv`` minus any ``--nproc``; returns its exit code.

    ``torchrun_args`` go to torchrun before the program (e.g. ``["--nnodes", "2", ...]`` for several
    machines; ``--standalone`` is then left out).
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise SpecError(f"--nproc must be a positive number of processes; got {nproc!r}.")
    args = strip_nproc(list(argv))
    module, _, func = entry.partition(":")
    code = f"import sys; from {module} import {func or 'main'} as _m; sys.exit(_m())"
    rendezvous = list(torchrun_args) or ["--standalone"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc-per-node={nproc}",
           "--no-python", sys.executable, "-c", code, *args]
    run_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, env=run_env).returncode


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without ``--nproc N`` / ``--nproc=N`` (the launched ranks must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out


def launch_command(nproc: int, argv: Sequence[str]) -> str:
    """The torchrun command line equivalent to ``launch(nproc, argv)``, for reports and docs."""
    return shlex.join(["torchrun", "--standalone", f"--nproc-per-node={nproc}", "$(which dbprofile)", *strip_nproc(list(argv))])


# ---------------------------------------------------------------- presenting


def format_ranks(result: RunResult) -> str:
    """One line per technique and rank: the rank's peak and its shares, in one IEC unit."""
    ok = [m for m in result.measurements if m.ok]
    largest = max((m.peak_bytes for m in ok), default=0)
    unit = pick_unit(largest, smallest="B")
    scale = UNIT_BYTES[unit]
    head = ["technique", "rank", f"peak {unit}", *CATEGORIES, "phase"]
    rows = [head]
    for m in result.measurements:
        rank = str(m.extra.get("rank", "-"))
        if not m.ok:
            rows.append([m.technique, rank, m.status.upper()] + [""] * (len(head) - 3))
            continue
        rows.append([m.technique, rank, f"{m.peak_bytes / scale:.2f}",
                     *[f"{m.shares.get(c, 0) / scale:.2f}" for c in CATEGORIES], m.peak_phase or ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i in (0, len(head) - 1) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    world = result.environment.get("world_size", "?")
    notes = [f"{m.technique} rank {m.extra.get('rank')}: {m.status.upper()}: {m.error}" for m in result.measurements if not m.ok]
    return "\n".join([f"{result.model}, {world} ranks: per-rank peak of tracked tensor memory, in {unit}", *lines, *notes])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dbprofile.measure.distributed MODEL -t TECHS -b N [--fsdp] [--out F]``: the
    worker entry without the CLI (tests, benchmarks); rank 0 writes the JSON, nothing is printed."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dbprofile.measure.distributed")
    parser.add_argument("model")
    parser.add_argument("-t", "--techniques", required=True)
    parser.add_argument("-b", "--batch-size", type=int, default=8)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    args = parser.parse_args(argv)
    try:
        run_distributed(args.model, args.techniques, args.batch_size, fsdp=args.fsdp, device=args.device,
                        steps=args.steps, out=args.out, timeout_s=args.timeout)
    except SpecError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
