"""State without steps (dbprofile.measure.warmup): a fake measurement whose optimizer state is made by
the optimizer's own first step, and whose equal-length DiffusionBlocks blocks share one tracked step,
must be the warmed-up measurement to the byte: every tracked point of every unit, the allocator
replay, the FLOPs; and a model that keeps what its first step makes warms up by steps instead."""

from __future__ import annotations

import pytest
import torch

from dbprofile.measure.allocator import FREED, AllocationRecorder, CachingAllocatorModel, replay
from dbprofile.measure.runner import measure
from dbprofile.measure.warmup import learned_state_warmup
from dbprofile.models import get_preset
from dbprofile.spec import ModelSpec

CUDA = dict(round_to=512, emulate_cuda=True)


def _both(preset: str | ModelSpec, depth: int, technique: str, **settings):
    spec = get_preset(preset).at_depth(depth) if isinstance(preset, str) else preset
    out = []
    for mode in ("off", "all"):
        traces: dict = {}
        m = measure(
            spec,
            technique,
            2,
            device="cpu",
            fake=True,
            warmup_steps=1,
            steps=1,
            traces=traces,
            count_activations=False,
            state_warmup=mode,
            **settings,
        )
        assert m.ok, m.error
        out.append((m, traces))
    return out


def _assert_warmed_up_to_the_byte(stepped, stateless):
    (a, ta), (b, tb) = stepped, stateless
    assert {u: r.trace for u, r in ta.items()} == {u: r.trace for u, r in tb.items()}  # every point, its op
    assert a.extra.get("allocator_model") == b.extra.get("allocator_model")
    assert (a.peak_bytes, a.shares, a.peak_phase, a.peak_block, a.timeline) == (
        b.peak_bytes,
        b.shares,
        b.peak_phase,
        b.peak_block,
        b.timeline,
    )
    assert a.training_flops == b.training_flops
    assert [(x.block, x.layers, x.peak_bytes, x.shares, x.step_flops) for x in a.blocks] == [
        (x.block, x.layers, x.peak_bytes, x.shares, x.step_flops) for x in b.blocks
    ]


@pytest.mark.parametrize(
    ("preset", "technique", "optimizer", "warmup"),
    [
        ("vit-tiny", "e2e", "adamw-foreach", "optimizer state"),
        ("gpt-tiny", "ckpt", "adamw-loop", "optimizer state"),
        ("gpt-tiny", "sac", "adamw-fused", "optimizer state"),
        ("dit-tiny", "db:3", "adamw-foreach", "optimizer state"),
        # DiffusionBlocks' conditioning and the built-in Llama's rotary tables end with their step; a
        # ViT's class token, which DiffusionBlocks replaces, gets no gradient, and only a real first
        # step shows which parameters stay without state.
        ("vit-tiny", "db:2", "adamw-foreach", "optimizer state (after 1 step)"),
        ("llama-tiny", "db:2+ckpt", "adamw-loop", "optimizer state"),
        ("llama-tiny", "e2e", "adamw-foreach", "optimizer state"),
        ("llama-tiny", "offload", "adamw-foreach", "optimizer state"),
    ],
)
def test_state_without_steps_is_the_warmed_up_measurement_to_the_byte(preset, technique, optimizer, warmup):
    stepped, stateless = _both(preset, 4, technique, optimizer=optimizer, **CUDA)
    assert "warmup" not in stepped[0].extra
    assert stateless[0].extra["warmup"] == warmup
    _assert_warmed_up_to_the_byte(stepped, stateless)


@pytest.mark.parametrize(
    ("preset", "depth", "technique"),
    [
        ("llama-tiny", 5, "db:4+parallel"),
        ("gpt-tiny", 4, "db:4+parallel"),
        ("llama-tiny", 3, "e2e"),
        ("llama-tiny", 3, "sac"),
        ("gpt-tiny", 3, "ckpt"),
        ("llama-tiny", 4, "db:2"),
    ],
)
def test_simulated_ranks_make_their_state_without_steps_and_equal_the_warmed_up_ranks(preset, depth, technique):
    """Simulated ranks (block-parallel, and FSDP over 4 ranks) make their state without warm-up steps,
    every tracked point equal to the warmed-up rank's. FSDP's first step makes its unsharded
    parameters' storages and keeps them: made before the state (sharding.unshard_once), and an
    all-gather files them as communication whatever they held before (the tracker's resize rule).
    The block-parallel trainer used to keep the step's conditioning until the next step."""
    from dbprofile.measure.distributed import simulate_rank

    spec = get_preset(preset).at_depth(depth)
    runs = []
    for mode in ("off", "all"):
        rows: list = []
        simulate_rank(spec, technique, 2, 4, per_rank=rows, state_warmup=mode, round_to=512)
        runs.append(rows)
    stepped, stateless = runs
    # block-parallel: the first, the last and one middle rank per block length (uneven at depth 5)
    assert [m.extra["rank"] for m, _ in stateless] == [m.extra["rank"] for m, _ in stepped]
    for a, b in zip(stepped, stateless):
        assert "warmup" not in a[0].extra and b[0].extra["warmup"] == "optimizer state"
        _assert_warmed_up_to_the_byte(a, b)
        assert a[0].extra["collective_bytes"] == b[0].extra["collective_bytes"]


def test_uneven_blocks_share_one_step_per_length_and_equal_the_traced_blocks():
    # llama-tiny at 7 layers in 3 blocks: 3, 2, 2 layers; blocks 1 and 2 share one tracked step.
    stepped, stateless = _both("llama-tiny", 7, "db:3", optimizer="adamw-foreach", **CUDA)
    assert [b.layers for b in stateless[0].blocks] == [[0, 1, 2], [3, 4], [5, 6]]
    assert stateless[0].extra["timing"]["steps_run"] == 2  # blocks 0 and 1, no warm-up step
    assert stepped[0].extra["timing"]["steps_run"] == 6
    _assert_warmed_up_to_the_byte(stepped, stateless)


def _keeping_spec(depth: int) -> ModelSpec:
    """The toy classifier, keeping a tensor its first forward makes (as a model that caches a table on
    first use and keeps it between steps would)."""
    import dataclasses

    from _toy import ToyNet, toy_spec

    class KeepingNet(ToyNet):
        kept: torch.Tensor | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.kept is None:
                self.kept = torch.ones_like(x[0])
            return super().forward(x * self.kept)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return KeepingNet(32, depth, 10, 12)

    return dataclasses.replace(toy_spec(depth=depth), build=build)


def test_a_model_that_keeps_its_first_steps_tensors_warms_up_by_steps():
    # The tracked step of a run without a warm-up step would make the kept tensor, so the measurement
    # is made again with the warm-up step (one unit), or with a real step of the first block first.
    stepped, stateless = _both(_keeping_spec(3), 3, "e2e", optimizer="adamw-foreach", **CUDA)
    assert stateless[0].extra["warmup"] == "steps"
    _assert_warmed_up_to_the_byte(stepped, stateless)
    stepped, stateless = _both(_keeping_spec(4), 4, "db:2", optimizer="adamw-foreach", **CUDA)
    assert stateless[0].extra["warmup"] == "optimizer state (after 1 step)"
    _assert_warmed_up_to_the_byte(stepped, stateless)


def test_optimizers_that_make_state_inside_their_update_warm_up_by_steps():
    stepped, stateless = _both("gpt-tiny", 2, "e2e", optimizer="sgd-loop")
    assert "warmup" not in stateless[0].extra
    _assert_warmed_up_to_the_byte(stepped, stateless)


def test_the_next_run_starts_where_the_last_one_succeeded():
    assert learned_state_warmup("optimizer state", "all") == "all"
    assert learned_state_warmup("optimizer state (after 1 step)", "all") == "after-first"
    assert learned_state_warmup("steps", "all") == "off"
    assert learned_state_warmup(None, "after-first") == "after-first"  # not tried (offload, SGD)


def test_recorded_allocations_replay_as_the_allocator_model_places_them():
    recorder = AllocationRecorder()
    direct = CachingAllocatorModel()
    a, b = recorder.malloc(3 << 20), recorder.malloc(700)
    blocks = [direct.malloc(3 << 20), direct.malloc(700)]
    recorder.free(a)
    direct.free(blocks[0])
    assert recorder.events == [(0, 3 << 20), (1, 700), (0, FREED)]
    replayed = CachingAllocatorModel()
    live: dict = {}
    replay(replayed, recorder.events, live)
    assert replayed.stats == direct.stats and list(live) == [b]
