"""One plan's fake runs and the entries made from them: ``EntryPlanner`` runs each technique's real
training step on fake tensors (one rank of the sharded code where the plan shards by ZeRO-3 or per
block), shards the shares, adds the CUDA corrections, fits the target, and searches the largest
batch and the accumulating micro-batch. Every run is kept by its key, so the searches reuse them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dbprofile import progress
from dbprofile.methods.sharding import SHARDING_BLOCK_PARALLEL, SHARDING_FSDP
from dbprofile.planner.accumulation import plan_accumulation
from dbprofile.planner.fit import entry_corrections, find_max_batch, set_fit
from dbprofile.planner.targets import ASSUMED_UTILISATION, Target, time_per_million_samples
from dbprofile.planner.tensor_parallel import communication, group_sizes, simulated_world, tp_shares
from dbprofile.planner.trace_cache import TraceCache
from dbprofile.planner.transfer import estimate_link_time
from dbprofile.planner.zero import ModelFacts, block_parallel, shard_zero
from dbprofile.results import Measurement, PlanEntry, per_sample
from dbprofile.spec import ModelSpec, SpecError
from dbprofile.techniques import Technique
from dbprofile.vocabulary import CATEGORIES

MeasureFn = Callable[..., Measurement]


def recorded(name: str, b: int, measure: Callable[[], Measurement]) -> Measurement:
    """``measure()``, or a failed measurement saying why: one technique that cannot run must not stop
    the others from being planned. Bad input (SpecError) still stops the plan."""
    try:
        return measure()
    except SpecError:
        raise
    except Exception as err:  # recorded, not fatal: the other techniques still plan
        return Measurement.failed(name, b, f"{type(err).__name__}: {err}", fake=True)


Wanted = tuple[str, Technique, bool]
"""(display name, technique run on each device, block-parallel?) of one planned technique."""


def _decisions_parts(parts: dict[str, Any]) -> dict[str, Any]:
    """The cache key of a run's attention decisions: its key without the GPU's compute capability."""
    return {"attention decisions of": sorted((k, repr(v)) for k, v in parts.items() if k != "capability")}


def _rank_run(name: str) -> str:
    """``traced_in_full``'s key for a technique's simulated rank (its one-device run's is its name)."""
    return f"{name} (one rank)"


def _weight(group: list[Wanted]) -> int:
    """How long a group of techniques takes to plan, roughly, to start the longest first: block-parallel
    DiffusionBlocks (traced in full, every representative rank builds the whole model; derived from
    db:1+parallel's ranks it is lighter: 3.2 s against the db:2/3/4 group's 5.8 s on llama-70b) before
    a group of DiffusionBlocks techniques (db:1's traces, then each B derived), before full activation
    checkpointing, before any other technique alone. Checkpointing keeps the fewest activations, so its
    largest batch lies furthest above the plan's and its search confirms it with runs of its own: on
    llama-70b (ZeRO-3 over 64) ckpt took 5.3 s with its confirming run at batch 2, e2e 2.6 s and sac
    2.2 s; planned after e2e and sac, it finished 1.9 s after the other worker (issue 28, round 6)."""
    if any(parallel for _, _, parallel in group):
        return 3
    if len(group) > 1:
        return 2
    return int(group[0][1].kind == "ckpt")


@dataclass
class EntryPlanner:
    """What every fake run of one plan shares, and the runs made so far."""

    spec: ModelSpec
    facts: ModelFacts
    target: Target
    precision: str
    optimizer: str
    zero_stage: int
    world_size: int
    full_trace: bool
    full_trace_reason: str | None
    round_to: int | None
    capability: tuple[int, int]
    peak_flops: int | None
    measure_fn: MeasureFn | None = None
    """A stand-in for the fake runs (tests): called as dbprofile.measure.runner.measure is."""
    tp: int = 1
    """Tensor-parallel degree (dbprofile.planner.tensor_parallel): > 1 simulates a rank of the TP layout."""
    cache: TraceCache | None = None
    """Fake runs kept on disk (dbprofile.planner.trace_cache); None: none kept."""
    state_warmup: dict[bool, str] = field(default_factory=lambda: {True: "all", False: "all"})
    """Per kind of trainer (DiffusionBlocks or not): how its fake runs make their optimizer state
    (RunSettings.state_warmup), learned from the runs so far (warmup.learned_state_warmup): a model
    that keeps a tensor its first step makes (a table cached on first use), or has a parameter that
    never gets a gradient (a ViT's class token under DiffusionBlocks), needs a real first step, and its
    later runs start there without trying less."""
    runs: dict[tuple[str, int, int], Measurement] = field(default_factory=dict)
    block_traces: dict = field(default_factory=dict)
    """db:1's traces, from which every DiffusionBlocks technique of the plan is derived
    (dbprofile.measure.shared_blocks): db:2, db:3 and db:4 read the same ones."""
    simulated: dict[tuple[str, int], Measurement] = field(default_factory=dict)
    traced_in_full: dict[str, str] = field(default_factory=dict)
    """Technique (or its simulated rank, ``_rank_run``) -> why its later runs skip the shallow traces:
    at an earlier batch size they did not line up (what fails is the step's structure, which the batch size does not change), and a
    fallback costs the shallow traces and the full one (llama-1b with Adafactor's foreach step on an H100:
    134 s against 47 s for the plan traced in full)."""

    def fake_run(self, tech: Technique, b: int, micro: int = 1) -> Measurement:
        key = (tech.name, b, micro)
        if key not in self.runs:
            accumulating = f", {micro} micro-batches accumulating" if micro > 1 else ""
            progress.stage(f"planning {tech.name} at batch {b}{accumulating} (fake tensors)")
            self.runs[key] = self._cached(
                self.fake_parts(tech, b, micro), lambda: self.fake_measurement(tech, b, micro)
            )
            self._remember_path(tech.name, self.runs[key], b)
        return self.runs[key]

    def fake_parts(self, tech: Technique, b: int, micro: int) -> dict[str, Any]:
        # The key says which depth path was asked for (trace_cache), as _measure asks it.
        full_trace, reason = self._depth_path(tech.name)
        parts = {"run": "one device", "technique": tech.name, "batch": b, "micro_batches": micro, **self._setting()}
        return {**parts, "full_trace": full_trace, "full_trace_reason": reason}

    def _depth_path(self, run: str) -> tuple[bool, str | None]:
        """(trace in full?, why) for the next run of ``run`` (a technique's name; a simulated rank's is
        ``_rank_run``): the plan's own choice, unless its shallow traces already failed at another batch
        size (``traced_in_full``)."""
        if run in self.traced_in_full:
            return True, self.traced_in_full[run]
        return self.full_trace, self.full_trace_reason

    def _remember_path(self, run: str, m: Measurement, b: int) -> None:
        """Trace ``run`` in full from now on where its shallow traces did not line up at batch ``b``."""
        from dbprofile.measure.depth import NOT_EXTRAPOLATED

        depth = m.extra.get("depth") or {}
        if str(depth.get("reason", "")).startswith(NOT_EXTRAPOLATED):
            self.traced_in_full.setdefault(run, f"{depth['reason']} at batch {b}")

    def fake_measurement(self, tech: Technique, b: int, micro: int) -> Measurement:
        return recorded(tech.name, b, lambda: self._measure(tech, b, micro))

    def _setting(self) -> dict[str, Any]:
        """What every fake run of this plan shares and a cached trace must match (trace_cache)."""
        return {
            "precision": self.precision,
            "optimizer": self.optimizer,
            "round_to": self.round_to,
            "emulate_cuda": self.target.cuda,
            "capability": self.capability,
            "layers": self.facts.num_layers,
            "not_identical": self.facts.not_identical,
            "full_trace": self.full_trace,
            "full_trace_reason": self.full_trace_reason,
        }

    def _cached(self, parts: dict[str, Any], run: Callable[[], Measurement]) -> Measurement:
        """``run()``, or its result read from the cache (a stand-in measure_fn is never cached)."""
        from dbprofile.measure.cuda_attention import Decisions, recorded_calls

        found = self._read(parts)
        if found is not None:
            return found
        with recorded_calls() as calls:
            m = run()
        cache = self.cache if self.measure_fn is None else None
        if cache is not None and m.ok:
            cache.put(parts, m)
            if parts["emulate_cuda"]:  # a CPU target's runs have no GPU to share
                cache.put(_decisions_parts(parts), Decisions(parts["capability"], frozenset(calls)))
        return m

    def _read(self, parts: dict[str, Any]) -> Measurement | None:
        """The cached run for ``parts``, or the one traced for another GPU where every attention call
        picks the backend it picks on this one: the compute capability reaches nothing else of a fake
        run, so that is the same program (``cuda_attention.recorded_calls``). Llama's runs for an H100
        and an A100 in fp32 (memory-efficient attention on both), or for an A100 and an L40S in bf16
        (flash), are shared; in bf16 an H100's (cuDNN) and an A100's are not."""
        from dbprofile.measure.cuda_attention import Decisions

        cache = self.cache if self.measure_fn is None else None
        if cache is None:
            return None
        found = cache.get(parts)
        if found is not None or not parts["emulate_cuda"]:
            return found
        decided = cache.get(_decisions_parts(parts), kind=Decisions)
        if decided is None or decided.capability == parts["capability"] or not decided.same_on(parts["capability"]):
            return None
        return cache.get({**parts, "capability": decided.capability})

    def _measure(self, tech: Technique, b: int, micro: int) -> Measurement:
        # Fake runs are deterministic: one warm-up (optimizer state) and one measured step.
        common: dict[str, Any] = dict(
            precision=self.precision,
            optimizer=self.optimizer,
            round_to=self.round_to,
            emulate_cuda=self.target.cuda,
            micro_batches=micro,
            compute_capability=self.capability,
        )
        if self.measure_fn is not None:
            return self.measure_fn(
                self.spec,
                tech.name,
                b,
                device="cpu",
                fake=True,
                layers=self.facts.num_layers,
                warmup_steps=1,
                steps=1,
                **common,
            )
        from dbprofile.measure.depth import measure_fake
        from dbprofile.measure.warmup import learned_state_warmup

        kind = tech.is_diffusion_blocks
        full_trace, reason = self._depth_path(tech.name)
        m = measure_fake(
            self.spec,
            tech,
            b,
            layers=self.facts.num_layers,
            not_identical=self.facts.not_identical,
            full_trace=full_trace,
            full_trace_reason=reason,
            state_warmup=self.state_warmup[kind],
            block_traces=self.block_traces,
            **common,
        )
        self.state_warmup[kind] = learned_state_warmup(m.extra.get("warmup"), self.state_warmup[kind])
        return m

    def sharded_run(self, name: str, tech: Technique, parallel: bool, b: int) -> Measurement | None:
        """ZeRO-3 and block-parallel: one rank of the real FSDP / block-parallel code on fake tensors in a
        fake process group (dbprofile.measure.distributed.simulate_rank), instead of sharding the
        one-device shares by formula. None (the formula is used) with a stand-in measure_fn, or inside a
        process group of this process's own."""
        if not self.simulates(parallel):
            return None
        key = (name, b)
        if key not in self.simulated:
            progress.stage(f"planning {name} at batch {b}: one rank simulated on fake tensors")
            self.simulated[key] = self._cached(
                self.rank_parts(name, tech, parallel, b), lambda: self.rank_measurement(name, tech, parallel, b)
            )
            self._remember_path(_rank_run(name), self.simulated[key], b)
        return self.simulated[key]

    def simulates(self, parallel: bool) -> bool:
        """Whether the plan's runs of a technique are one simulated rank (``sharded_run``)."""
        if self.measure_fn is not None or not (parallel or self.zero_stage == 3 or self.tp > 1):
            return False
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized())

    def rank_world(self, tech: Technique, parallel: bool) -> tuple[int, int, bool]:
        """(ranks of the simulated process group, its tensor-parallel degree, FSDP on?)."""
        if parallel:  # one DiffusionBlocks block per device, no TP
            return tech.blocks or 1, 1, False
        world, fsdp = simulated_world(self.zero_stage, self.world_size, self.tp)
        return world, self.tp, fsdp

    def rank_parts(self, name: str, tech: Technique, parallel: bool, b: int) -> dict[str, Any]:
        world, tp, fsdp = self.rank_world(tech, parallel)
        full_trace, reason = self._depth_path(_rank_run(name))
        return {
            "run": "one rank",
            "technique": name,
            "batch": b,
            "world_size": world,
            "tp": tp,
            "fsdp": fsdp,
            **self._setting(),
            "full_trace": full_trace,
            "full_trace_reason": reason,
        }

    def rank_measurement(self, name: str, tech: Technique, parallel: bool, b: int) -> Measurement:
        from dbprofile.measure.depth import simulate_fake

        world, tp, fsdp = self.rank_world(tech, parallel)
        full_trace, reason = self._depth_path(_rank_run(name))
        return recorded(
            name,
            b,
            lambda: simulate_fake(
                self.spec,
                name,
                tech,
                b,
                world,
                layers=self.facts.num_layers,
                not_identical=self.facts.not_identical,
                parallel=parallel,
                full_trace=full_trace,
                full_trace_reason=reason,
                precision=self.precision,
                optimizer=self.optimizer,
                round_to=self.round_to,
                tp=tp,
                fsdp=fsdp,
                block_traces=self.block_traces,
            ),
        )

    def jobs(self, wanted: list[Wanted], b: int) -> list[list[Wanted]]:
        """The plan's techniques in groups that share no run, so that each group can be planned in a
        process of its own (dbprofile.planner.workers): every technique alone, but the DiffusionBlocks
        techniques derived from the same db:1 traces (dbprofile.measure.shared_blocks) together. A group
        whose first run is in the trace cache comes first: it costs a read, not a process; then the
        heaviest (``_weight``), so that side by side the workers finish together."""
        from dbprofile.measure.shared_blocks import one_block

        groups: dict[Any, list[Wanted]] = {}
        for name, tech, parallel in wanted:
            shares = tech.is_diffusion_blocks and not tech.offload and not parallel
            key = (one_block(tech).name, self.simulates(parallel)) if shares else name
            groups.setdefault(key, []).append((name, tech, parallel))
        return sorted(groups.values(), key=lambda group: (not self.first_run_known(group[0], b), -_weight(group)))

    def first_run_known(self, wanted: Wanted, b: int) -> bool:
        """Whether a technique's run at batch ``b`` is made or in the trace cache."""
        name, tech, parallel = wanted
        if self.simulates(parallel):
            known, parts = (name, b) in self.simulated, self.rank_parts(name, tech, parallel, b)
        else:
            known, parts = (tech.name, b, 1) in self.runs, self.fake_parts(tech, b, 1)
        return known or self._read(parts) is not None

    def plan_job(
        self, job: list[Wanted], b: int, searched: tuple[bool, int] | None
    ) -> dict[str, PlanEntry | SpecError]:
        """Each technique's entry at batch ``b``, its largest batch and micro-batch searched when
        ``searched`` = (confirm_max_batch, min_micro_batch); bad input comes back, not raised, for the
        plan to raise (or, for DiffusionBlocks in the default set, to leave it out) in its own order."""
        out: dict[str, PlanEntry | SpecError] = {}
        for name, tech, parallel in job:
            try:
                entry = self.predict(name, tech, parallel, b)
                if searched is not None:
                    self.search(entry, tech, parallel, *searched)
            except SpecError as err:
                out[name] = err
            else:
                out[name] = entry
        return out

    def keep(self, runs: dict, simulated: dict, state_warmup: dict[bool, str]) -> None:
        """What a worker's planner made, kept as if this one had made it (the trace cache has it already)."""
        self.runs.update(runs)
        self.simulated.update(simulated)
        for kind, way in state_warmup.items():
            if way != "all":
                self.state_warmup[kind] = way

    def predict(self, name: str, tech: Technique, parallel: bool, b: int, micro: int = 1) -> PlanEntry:
        """The entry for ``tech`` at batch ``b`` (``micro`` micro-batches accumulating per step)."""
        sim = self.sharded_run(name, tech, parallel, b) if micro == 1 else None
        m = sim if sim is not None else self.fake_run(tech, b, micro)
        entry = PlanEntry(
            technique=name,
            batch_size=b,
            status=m.status,
            error=m.error,
            num_parameters=m.num_parameters,
            extra_parameters=m.extra_parameters,
            peak_phase=m.peak_phase,
            peak_block=m.peak_block,
            extra=dict(m.extra),
        )
        if not m.ok:
            return entry
        # Counted on the same fake step as the memory: whole-model work per batch, whatever the sharding.
        entry.training_flops = m.training_flops
        entry.block_step_flops = list(
            m.extra.get("rank_step_flops") or [blk.step_flops for blk in m.blocks if blk.step_flops is not None]
        )
        entry.shares = {c: int(v) for c, v in self._shares(entry, m, sim, tech, parallel).items()}
        if sim is not None:
            sizes = group_sizes(tech.blocks if parallel else None, self.zero_stage, self.world_size, self.tp)
            replica_grads = sim.shares.get("parameters", 0) if self.zero_stage < 3 and not parallel else 0
            entry.extra["communication"] = communication(m.extra, sizes, replica_grads)
            if self.tp > 1 and not parallel and entry.training_flops is not None:
                # The simulated rank computed 1/tp of each layer (and all of the replicated rest): its TP
                # group's work on the batch is tp times that.
                entry.training_flops *= self.tp
        entry.tracked_peak_bytes = sum(entry.shares.values())
        entry.corrections = entry_corrections(entry, self.target)
        entry.peak_bytes = entry.tracked_peak_bytes + sum(entry.corrections.values())
        set_fit(entry, self.target.capacity_bytes)
        self._compute(entry, b * micro)
        return entry

    def _shares(
        self, entry: PlanEntry, m: Measurement, sim: Measurement | None, tech: Technique, parallel: bool
    ) -> dict[str, int]:
        """Per-device shares (every category), setting the entry's world size and sharding."""
        if sim is not None and not parallel and self.tp > 1:  # one rank of a TP group (x FSDP at ZeRO-3)
            unit = max(max(self.facts.layer_bytes), self.facts.rest_bytes)
            shares = tp_shares(sim.shares, self.zero_stage, self.world_size, self.tp, unit, m.peak_phase)
            entry.world_size, entry.tensor_parallel = self.world_size, self.tp
            entry.sharding = f"zero-{self.zero_stage}" if self.zero_stage else "none"
            entry.extra["sharding_model"] = "simulated"
        elif sim is not None:  # already one rank's shares
            shares = dict(sim.shares)
            entry.world_size = (tech.blocks or 1) if parallel else self.world_size
            entry.sharding = SHARDING_BLOCK_PARALLEL if parallel else SHARDING_FSDP
            entry.extra["sharding_model"] = "simulated"
        elif parallel:
            shares, entry.peak_block = block_parallel(m, self.facts)
            entry.world_size, entry.sharding = tech.blocks or 1, SHARDING_BLOCK_PARALLEL
        else:
            unit = max(max(self.facts.layer_bytes), self.facts.rest_bytes)
            shares = shard_zero(m.shares, self.zero_stage, self.world_size, unit, m.peak_phase)
            entry.world_size = self.world_size
            entry.sharding = f"zero-{self.zero_stage}" if self.zero_stage else "none"
        return {c: int(shares.get(c, 0)) for c in CATEGORIES}

    def _compute(self, entry: PlanEntry, samples: int) -> None:
        """FLOPs per sample, the host link's exposed time, and the time per million samples."""
        entry.flops_per_sample = per_sample(entry.training_flops, samples)
        entry.time_per_million_samples_s = time_per_million_samples(
            entry.flops_per_sample, self.peak_flops, entry.world_size
        )
        estimate_link_time(entry, self.target.gpu, self.peak_flops, ASSUMED_UTILISATION)
        if entry.time_per_million_samples_s is not None and entry.exposed_transfer_s_per_sample:
            entry.time_per_million_samples_s += entry.exposed_transfer_s_per_sample * 1e6 / max(entry.world_size, 1)

    def search(self, entry: PlanEntry, tech: Technique, parallel: bool, confirm: bool, min_micro_batch: int) -> None:
        """The largest batch that fits the target, then the accumulating micro-batch (one device, or ZeRO
        1/2 whose formula shards the accumulating step as it does the plain one)."""
        capacity = self.target.capacity_bytes
        if not entry.ok or capacity is None:
            return
        find_max_batch(entry, functools.partial(self.predict, entry.technique, tech, parallel), capacity, confirm)
        if entry.sharding in ("none", "zero-1", "zero-2"):
            accumulating = functools.partial(self.predict, entry.technique, tech, parallel, micro=2)
            plan_accumulation(entry, accumulating, capacity, min_micro_batch)
