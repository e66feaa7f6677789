"""The planner's alternatives to DiffusionBlocks (gradient accumulation, host-link time) and the
verdict that weighs DiffusionBlocks against the best of them (docs/verdict.md)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _toy import toy_spec
from torch import nn

from dbprofile import plan
from dbprofile.gpus import get_gpu
from dbprofile.planner.accumulation import even_micro_batch
from dbprofile.planner.transfer import estimate_link_time
from dbprofile.planner.zero import model_facts
from dbprofile.results import PlanEntry
from dbprofile.spec import SpecError
from dbprofile.verdict import judge

# vit-tiny at batch 1024 (activations well above the allocator's 20 MiB rounding) on a custom
# capacity: e2e needs 2,170,552,320 bytes (CUDA context included), db:2 1,992,294,400 and ckpt
# 1,774,190,592; in between, e2e fits only accumulating.
CAPACITY = 2_050_000_000


@pytest.fixture(scope="module")
def squeezed():
    return plan("vit-tiny", 1024, device=CAPACITY, techniques=["e2e", "ckpt", "db:2"])


def test_even_micro_batches():
    assert even_micro_batch(64, 63) == (32, 2)
    assert even_micro_batch(100, 40) == (34, 3)
    assert even_micro_batch(7, 7) == (7, 1)


def test_a_technique_that_misses_gets_the_micro_batch_that_fits_and_its_steps(squeezed):
    e2e, ckpt, db2 = (squeezed.get(t) for t in ("e2e", "ckpt", "db:2"))
    assert not e2e.fits and 512 <= e2e.max_batch_size < 1024
    assert (e2e.micro_batch_size, e2e.accumulation_steps) == (512, 2)
    # The accumulating step keeps every gradient through the second micro-batch: it needs at least the
    # plain step at 512 (here the same reserved bytes: 1.2 MB of gradients fit an allocator segment
    # already reserved; test_alternatives pins the tracked bytes), and fits.
    plain_512 = plan("vit-tiny", 512, device=CAPACITY, techniques=["e2e"], search_max_batch=False).get("e2e")
    assert plain_512.peak_bytes <= e2e.accumulation_peak_bytes <= CAPACITY
    for fitting in (ckpt, db2):
        assert fitting.fits and (fitting.micro_batch_size, fitting.accumulation_steps) == (1024, 1)


def test_verdict_prefers_accumulating_e2e_to_diffusion_blocks_at_the_same_compute(squeezed):
    v = squeezed.verdict
    assert v.decision == "not-worth-it" and v.recommended == "e2e" and v.best_technique == "db:2"
    assert (v.recommended_micro_batch, v.recommended_accumulation_steps) == (512, 2)
    assert "e2e with 2 micro-batches of 512" in v.headline
    costlier = next(r for r in v.reasons if r.rule == "costlier-than-alternative")
    assert costlier.numbers["rival"] == "e2e" and costlier.numbers["vs_rival"] > 0.9


def test_without_accumulation_the_verdict_weighs_db_against_checkpointing(squeezed):
    too_small = dataclasses.replace(squeezed, min_micro_batch=513)
    v = judge(too_small)
    assert (v.decision, v.recommended) == ("adopt", "db:2")
    assert "0.8" in v.headline and "ckpt" in v.headline  # 0.82x ckpt's compute (ViT: db:2 ~ e2e)
    batch_statistics = dataclasses.replace(squeezed, model_info={**squeezed.model_info, "batch_statistics": True})
    assert judge(batch_statistics).recommended == "db:2"


def test_batch_norm_or_a_declared_batch_dependent_loss_rules_accumulation_out():
    assert not model_facts(toy_spec()).batch_statistics
    assert model_facts(dataclasses.replace(toy_spec(), batch_dependent_loss=True)).batch_statistics
    base = toy_spec()

    def build() -> nn.Module:
        net = base.build()
        net.blocks[0].norm = nn.BatchNorm1d(8)  # over the token axis: batch statistics
        return net

    assert model_facts(dataclasses.replace(base, build=build)).batch_statistics


def test_min_micro_batch_is_checked():
    with pytest.raises(SpecError, match="min_micro_batch"):
        plan("vit-tiny", 8, device="L4", min_micro_batch=0)


def test_link_time_hides_or_adds_by_the_stated_rule():
    gpu = get_gpu("H100-80GB")  # PCIe Gen5 x16: 64 GB/s per direction
    assert gpu.host_link == "PCIe Gen5 x16" and gpu.host_link_bytes_per_s == 64 * 10**9
    peak, util = 10**15, 0.5  # 5e14 FLOP/s: a step of 3e12 FLOPs is 6 ms, its forward 2 ms
    entry = PlanEntry(technique="offload", batch_size=8, training_flops=3 * 10**12)
    entry.extra["host_transfer"] = {"to_host_bytes": 64 * 10**6, "to_device_bytes": 64 * 10**6}  # 1 ms each way
    estimate_link_time(entry, gpu, peak, util)
    assert entry.extra["host_link"]["hidden"] and entry.exposed_transfer_s_per_sample == 0.0
    entry.extra["host_transfer"] = {"to_host_bytes": 192 * 10**6, "to_device_bytes": 320 * 10**6}  # 3 ms, 5 ms
    estimate_link_time(entry, gpu, peak, util)
    assert entry.extra["host_link"]["exposed_s"] == pytest.approx(0.001 + 0.001)
    assert entry.exposed_transfer_s_per_sample == pytest.approx(0.002 / 8)
    blockwise = PlanEntry(technique="db:4+offload", batch_size=2, training_flops=10**12, block_step_flops=[10**11] * 4)
    blockwise.extra["host_transfer"] = {"to_host_bytes": 64 * 10**6, "to_device_bytes": 64 * 10**6}
    estimate_link_time(blockwise, gpu, peak, util)
    # Not overlapped: 2 ms per block-step, 4 block-steps per sample-set of 2 samples.
    assert blockwise.exposed_transfer_s_per_sample == pytest.approx(0.002 * 4 / 2)


def test_offload_entries_of_a_gpu_plan_carry_their_link_figures():
    p = plan("vit-tiny", 8, device="H100-80GB", techniques=["offload"], search_max_batch=False)
    entry = p.get("offload")
    link = entry.extra["host_link"]
    assert link["link"] == "PCIe Gen5 x16" and link["to_host_s"] == pytest.approx(
        entry.extra["host_transfer"]["to_host_bytes"] / 64e9
    )
    assert entry.exposed_transfer_s_per_sample is not None
    assert torch.is_tensor(torch.zeros(1))  # the plan left torch usable (no fake mode leaked)


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "vit-tiny", "-t", "e2e,sac:every", "-o", "{out}"], "Unknown selective checkpointing technique"),
        (["run", "vit-tiny", "-t", "offload+ckpt", "-o", "{out}"], "Unknown technique 'offload+ckpt'"),
        (["run", "vit-tiny", "-t", "offload", "--micro-batches", "2", "--fsdp", "-o", "{out}"], "--micro-batches"),
        (["plan", "vit-tiny", "-t", "e2e,offload", "--zero", "3", "--world-size", "2"], "Technique 'offload'"),
        (["plan", "vit-tiny", "--min-micro-batch", "0"], "min-micro-batch"),
    ],
)
def test_bad_combinations_are_one_paragraph_and_exit_2_before_anything_is_measured(args, message, tmp_path):
    from click.testing import CliRunner

    from dbprofile.cli import main

    out = tmp_path / "r.json"
    result = CliRunner().invoke(main, [a.replace("{out}", str(out)) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def _entry(technique, need_gib, gflops, *, micro=None, steps=None, accumulated_gib=None, link_s=None, world=1):
    GiB = 2**30
    acts = int(need_gib * GiB * 0.8)
    return PlanEntry(
        technique=technique,
        batch_size=64,
        tracked_peak_bytes=int(need_gib * GiB),
        peak_bytes=int(need_gib * GiB),
        shares={"parameters": int(need_gib * GiB) - acts, "activations": acts},
        flops_per_sample=gflops * 1e9,
        micro_batch_size=micro,
        accumulation_steps=steps,
        accumulation_peak_bytes=int(accumulated_gib * GiB) if accumulated_gib else None,
        exposed_transfer_s_per_sample=link_s,
        extra_parameters=1,
        world_size=world,
    )


def _decide(entries, *, min_micro=1, batch_statistics=False):
    from dbprofile.results import Plan

    p = Plan(
        model="m",
        model_info={"task": "classification", "batch_statistics": batch_statistics},
        device="RTX-4090-24GB",
        capacity_bytes=24 * 2**30,
        batch_size=64,
        entries=entries,
        peak_flops=100 * 10**12,
        utilisation=0.4,
        min_micro_batch=min_micro,
    )
    v = judge(p)
    return v.decision, v.recommended, v.recommended_accumulation_steps


# The decision table (docs/verdict.md): e2e misses at 30 GiB in every row; db:2 fits at 18 GiB and
# trains a sample with 101 GFLOP against e2e's 100.
E2E_ACC = dict(micro=32, steps=2, accumulated_gib=17)
DECISIONS = [
    # e2e with two micro-batches of 32 trains the batch at e2e's compute: DiffusionBlocks is not cheaper.
    (
        [_entry("e2e", 30, 100, **E2E_ACC), _entry("ckpt", 8, 122), _entry("db:2", 18, 101)],
        {},
        ("not-worth-it", "e2e", 2),
    ),
    # The same when accumulation is not exact (BatchNorm): then ckpt is the alternative, 1.22x: adopt.
    (
        [_entry("e2e", 30, 100, **E2E_ACC), _entry("ckpt", 8, 122), _entry("db:2", 18, 101)],
        {"batch_statistics": True},
        ("adopt", "db:2", 1),
    ),
    # ... or below the micro-batch floor.
    (
        [_entry("e2e", 30, 100, **E2E_ACC), _entry("ckpt", 8, 122), _entry("db:2", 18, 101)],
        {"min_micro": 33},
        ("adopt", "db:2", 1),
    ),
    # sac fits at e2e's FLOPs: the alternative, whatever ckpt does.
    (
        [_entry("e2e", 30, 100), _entry("sac", 22, 100), _entry("ckpt", 8, 122), _entry("db:2", 18, 101)],
        {},
        ("not-worth-it", "sac", 1),
    ),
    # offload whose link hides (0 s exposed) is e2e's compute: the alternative.
    (
        [_entry("e2e", 30, 100), _entry("offload", 7, 100, link_s=0.0), _entry("db:2", 18, 101)],
        {},
        ("not-worth-it", "offload", 1),
    ),
    # offload whose link does not hide: 1e-3 s per sample at 40 TFLOP/s is 40 GFLOP more: 1.40x, so db:2 wins.
    (
        [_entry("e2e", 30, 100), _entry("offload", 7, 100, link_s=1e-3), _entry("db:2", 18, 101)],
        {},
        ("adopt", "db:2", 1),
    ),
    # Nothing else trains the batch: adopt whatever its compute.
    ([_entry("e2e", 30, 100), _entry("db:2", 18, 250)], {}, ("adopt", "db:2", 1)),
    # DiffusionBlocks that only fits accumulating, against nothing else: adopt, with its steps.
    (
        [_entry("e2e", 30, 100), _entry("db:2", 26, 101, micro=32, steps=2, accumulated_gib=15)],
        {},
        ("adopt", "db:2", 2),
    ),
]


@pytest.mark.parametrize("entries, situation, expected", DECISIONS)
def test_decision_table(entries, situation, expected):
    assert _decide(entries, **situation) == expected
