"""The planner (dbprofile.planner) and the GPU table: bad input, sharding arithmetic, CUDA
corrections, the max-batch search, rendering, and fake predictions against real CPU runs."""

from __future__ import annotations

import pytest

from dbprofile.gpus import GPUS, cublas_workspace_bytes, cublas_workspace_reserved_bytes, get_gpu
from dbprofile.measure.runner import measure
from dbprofile.planner import (
    ALLOCATOR_OVERHEAD_FRACTION,
    ASSUMED_UTILISATION,
    CUDA_CONTEXT_BYTES,
    ModelFacts,
    block_parallel,
    cuda_context_bytes,
    cuda_corrections,
    nothing_fits,
    plan,
    resolve_target,
    shard_zero,
    time_per_million_samples,
)
from dbprofile.report.text import format_plan, nothing_fits_summary
from dbprofile.results import BlockMeasurement, Measurement
from dbprofile.spec import SpecError
from dbprofile.units import format_bytes
from dbprofile.vocabulary import CATEGORIES

MiB = 1024**2
GiB = 1024**3


# ---------------------------------------------------------------- GPU table and bad input


def test_gpu_lookup_ignores_case_spaces_and_dashes():
    assert get_gpu("h100 80gb") is get_gpu("H100-80GB") is get_gpu("H100_80GB") is get_gpu("h100")
    # nvidia-smi's memory.total for the H100 80GB HBM3: 81559 MiB.
    assert get_gpu("H100-80GB").capacity_bytes == 81559 * MiB
    assert get_gpu("h200").capacity_bytes == 143771 * MiB
    for name in ("A100-40GB", "A100-80GB", "L40S-48GB", "L4-24GB", "RTX-4090-24GB", "RTX-3090-24GB", "T4-16GB"):
        assert name in GPUS


def test_unknown_gpu_name_lists_close_names():
    with pytest.raises(SpecError, match="Unknown GPU 'H10-80G'.*Close names: H100-80GB"):
        get_gpu("H10-80G")


def test_cublas_workspace_is_32_mib_on_hopper_and_8_mib_before_plus_cublaslt():
    # Two handles (forward thread, autograd's backward thread), each a cuBLAS workspace and a 1 MiB
    # cuBLASLt workspace: seen as 2 x (33554432 + 1048576) bytes in the H200 allocator traces.
    assert cublas_workspace_bytes((9, 0)) == 2 * (32 * MiB + 1 * MiB)
    assert cublas_workspace_bytes((8, 0)) == 2 * (8 * MiB + 128 * 1024 + 1 * MiB)
    # In segments: each 32 MiB block its own segment, each 1 MiB block a 2 MiB small segment.
    assert cublas_workspace_reserved_bytes((9, 0)) == 2 * (32 * MiB + 2 * MiB)


def test_zero_stage_without_world_size_is_rejected():
    with pytest.raises(SpecError, match="ZeRO stage 3 .* world_size is 1"):
        plan("gpt-tiny", 4, device="cpu", zero_stage=3)


@pytest.mark.parametrize("world_size", [0, -2])
def test_world_size_below_one_is_rejected(world_size):
    with pytest.raises(SpecError, match="world_size must be an integer >= 1"):
        plan("gpt-tiny", 4, device="cpu", world_size=world_size)


def test_unknown_gpu_in_plan_is_rejected_before_any_run():
    with pytest.raises(SpecError, match="Close names: A100-80GB"):
        plan("gpt-tiny", 4, device="A100-80G")


# ---------------------------------------------------------------- arithmetic


def test_zero_stages_divide_state_and_add_one_gathered_unit():
    shares = {"parameters": 800, "gradients": 800, "optimizer_state": 1600, "activations": 500, "temporaries": 10}
    assert shard_zero(shares, 1, 8, 100, "backward") == {**shares, "optimizer_state": 200}
    # Stage 2: gradients sharded, plus one unit's full gradients while the peak is in the backward.
    assert shard_zero(shares, 2, 8, 100, "backward")["gradients"] == 100 + 100
    assert shard_zero(shares, 2, 8, 100, "forward")["gradients"] == 100
    # Stage 3: parameters sharded plus the gathered unit's full parameters.
    three = shard_zero(shares, 3, 8, 100, "backward")
    assert three["parameters"] == 100 + 100 and three["activations"] == 500
    assert shard_zero(shares, 0, 8, 100, "backward") == shares


def test_block_parallel_keeps_the_shared_parts_and_one_blocks_layers():
    facts = ModelFacts(layer_bytes=(100, 100, 100, 100), rest_bytes=200, num_layers=4)
    # Plain db:2: all 600 parameter bytes and 1200 optimizer bytes resident; the model has no
    # extra parameters here, so each device keeps 200 (rest) + 2 x 100 (its block).
    blocks = [
        BlockMeasurement(
            block=0,
            layers=[0, 1],
            peak_bytes=2000,
            shares={"parameters": 600, "optimizer_state": 1200, "activations": 200},
            peak_phase="backward",
        ),
        BlockMeasurement(
            block=1,
            layers=[2, 3],
            peak_bytes=2100,
            shares={"parameters": 600, "optimizer_state": 1200, "activations": 300},
            peak_phase="backward",
        ),
    ]
    m = Measurement(
        technique="db:2",
        batch_size=4,
        peak_bytes=2100,
        shares=blocks[1].shares,
        blocks=blocks,
        num_parameters=150,
        extra_parameters=0,
    )
    shares, block = block_parallel(m, facts)
    assert block == 1
    assert shares == {"parameters": 400, "optimizer_state": 800, "activations": 300}


def test_cuda_corrections_name_each_effect():
    target = resolve_target("H100-80GB")
    corrections = cuda_corrections(10 * GiB, target)
    assert corrections["cublas_workspace"] == 66 * MiB
    assert corrections["cuda_context"] == 1257 * MiB  # measured on that card
    assert cuda_context_bytes("NVIDIA H200") == 1392 * MiB  # torch's name for the card
    assert cuda_context_bytes("NVIDIA H100 80GB HBM3") == 1257 * MiB
    assert cuda_context_bytes("some future card") == CUDA_CONTEXT_BYTES == 1392 * MiB
    # Without an allocator replay (sharded shares, stand-in runners): the measured median fraction.
    assert corrections["allocator_segments"] == pytest.approx(
        ALLOCATOR_OVERHEAD_FRACTION * (10 * GiB + 66 * MiB), abs=1
    )
    # With one: the replay's reserved bytes plus the workspaces' segments, less what is allocated.
    replayed = cuda_corrections(10 * GiB, target, replayed_reserved_bytes=10 * GiB + 40 * MiB)
    assert replayed["allocator_segments"] == 40 * MiB + 68 * MiB - 66 * MiB
    assert cuda_corrections(10 * GiB, resolve_target("cpu")) == {}
    assert resolve_target(40 * GiB).capacity_bytes == 40 * GiB


# ---------------------------------------------------------------- the planner with a stand-in runner


def _linear_runner(calls):
    """A stand-in for measure(): 1 MiB of state, 2 MiB of activations per sample (db halves them)."""

    def run(spec, technique, batch_size, **kwargs):
        calls.append((technique, batch_size, kwargs.get("round_to")))
        per_sample = 2 * MiB // (2 if technique.startswith("db") else 1)
        shares = {
            "parameters": MiB // 4,
            "gradients": MiB // 4,
            "optimizer_state": MiB // 2,
            "activations": per_sample * batch_size,
        }
        return Measurement(
            technique=technique,
            batch_size=batch_size,
            fake=True,
            peak_bytes=sum(shares.values()),
            shares=shares,
            peak_phase="backward",
            num_parameters=65536,
            extra_parameters=0,
        )

    return run


def test_max_batch_search_confirms_the_linear_prediction_in_one_run():
    calls: list = []
    capacity = CUDA_CONTEXT_BYTES + 300 * MiB
    result = plan("gpt-tiny", 8, device=capacity, techniques=["e2e"], measure_fn=_linear_runner(calls))
    e2e = result.get("e2e")
    # peak(b) = (1 MiB + 2 MiB * b + 64 MiB workspace) * (1 + overhead) + context <= capacity.
    expected = max(
        b
        for b in range(1, 200)
        if CUDA_CONTEXT_BYTES
        + int(-(-((MiB + 2 * MiB * b + 66 * MiB) * ALLOCATOR_OVERHEAD_FRACTION) // 1))
        + MiB
        + 2 * MiB * b
        + 66 * MiB
        <= capacity
    )
    assert e2e.max_batch_size == expected
    assert [c[1] for c in calls] == [8, expected]  # the plan's batch size, then one confirming run
    assert all(c[2] == 512 for c in calls)  # a CUDA target tracks 512-byte blocks
    assert e2e.fits and e2e.headroom_bytes == capacity - e2e.peak_bytes
    assert e2e.peak_bytes == e2e.tracked_peak_bytes + sum(e2e.corrections.values())


def test_batch_size_that_fits_nowhere_is_an_answer_with_each_shortfall():
    calls: list = []
    capacity = CUDA_CONTEXT_BYTES + 100 * MiB
    result = plan("gpt-tiny", 64, device=capacity, techniques=["e2e", "db:2"], measure_fn=_linear_runner(calls))
    e2e, db = result.get("e2e"), result.get("db:2")
    for entry in (e2e, db):
        assert entry.fits is False
        assert entry.shortfall_bytes == entry.peak_bytes - capacity == -entry.headroom_bytes > 0
    assert nothing_fits(result) and not result.fits()
    summary = nothing_fits_summary(result)
    assert summary.startswith("Nothing fits in one step: at batch size 64")
    # db:2 misses by less (half the activations), so it is named first; it alone fits a smaller batch
    assert f"db:2 by {format_bytes(db.shortfall_bytes)}, e2e by {format_bytes(e2e.shortfall_bytes)}" in summary
    assert f"The largest batch size that fits is {db.max_batch_size} (db:2)." in summary and db.max_batch_size > 0
    assert summary in format_plan(result) and result.verdict.decision == "not-worth-it"


def test_when_the_state_alone_misses_no_batch_fits_and_no_run_confirms_it():
    # 1 MiB of state + 66 MiB of cuBLAS workspaces + the context: over a capacity 67 MiB past the context.
    calls: list = []
    capacity = CUDA_CONTEXT_BYTES + 66 * MiB + MiB // 2
    result = plan("gpt-tiny", 4, device=capacity, techniques=["e2e"], measure_fn=_linear_runner(calls))
    e2e = result.get("e2e")
    assert e2e.max_batch_size == 0
    assert e2e.linear_fit["state_floor_bytes"] == MiB + 66 * MiB + CUDA_CONTEXT_BYTES > capacity
    assert [c[1] for c in calls] == [4]  # the plan's own run only
    # and the floor is a floor: batch 1 misses too
    one = plan(
        "gpt-tiny", 1, device=capacity, techniques=["e2e"], measure_fn=_linear_runner([]), search_max_batch=False
    )
    assert one.get("e2e").peak_bytes > capacity
    # the most state of the whole step counts, not only the state at the peak's instant
    calls.clear()
    runner = _linear_runner(calls)

    def with_gradients_at_the_end(spec, technique, batch_size, **kwargs):
        m = runner(spec, technique, batch_size, **kwargs)
        m.extra["state_peak_bytes"] = 2 * MiB  # all the gradients live at the optimizer's step
        return m

    later = plan("gpt-tiny", 4, device=capacity + MiB, techniques=["e2e"], measure_fn=with_gradients_at_the_end)
    assert later.get("e2e").max_batch_size == 0 and [c[1] for c in calls] == [4]
    # a capacity the state fits still confirms by a run
    calls.clear()
    roomy = plan("gpt-tiny", 4, device=capacity + MiB, techniques=["e2e"], measure_fn=_linear_runner(calls))
    assert len(calls) > 1 and "state_floor_bytes" not in roomy.get("e2e").linear_fit


def test_plan_fits_answers_for_its_target_another_gpu_and_one_technique():
    calls: list = []
    capacity = CUDA_CONTEXT_BYTES + 100 * MiB
    result = plan("gpt-tiny", 64, device=capacity, techniques=["e2e", "db:2"], measure_fn=_linear_runner(calls))
    assert not result.fits() and not result.fits(technique="db:2")
    assert result.fits("H100-80GB") and result.fits("H100-80GB", technique="e2e")
    # the e2e need on another card: tracked bytes plus that card's corrections, recomputed
    e2e = result.get("e2e")
    need = e2e.tracked_peak_bytes + sum(cuda_corrections(e2e.tracked_peak_bytes, resolve_target(10 * GiB)).values())
    assert result.fits(need, technique="e2e") and not result.fits(need - 1, technique="e2e")
    with pytest.raises(ValueError, match="no technique 'db:9'; it planned e2e, db:2"):
        result.fits(technique="db:9")
    cpu_plan = plan("gpt-tiny", 4, device="cpu", techniques=["e2e"], measure_fn=_linear_runner(calls))
    with pytest.raises(ValueError, match="targets cpu, which has no capacity"):
        cpu_plan.fits()
    with pytest.raises(ValueError, match="made for cpu, without CUDA's 512-byte blocks"):
        cpu_plan.fits("H100-80GB")


def test_plan_to_dataframe_has_one_row_per_technique_with_every_byte_figure():
    calls: list = []
    result = plan("gpt-tiny", 8, device="L4-24GB", techniques=["e2e", "db:2"], measure_fn=_linear_runner(calls))
    frame = result.to_dataframe()
    assert frame["technique"].tolist() == ["e2e", "db:2"]
    e2e = result.get("e2e")
    row = frame.iloc[0]
    assert row["peak_bytes"] == e2e.peak_bytes and row["activations_bytes"] == 16 * MiB
    assert row["cuda_context_bytes"] == CUDA_CONTEXT_BYTES and row["fits"] and row["shortfall_bytes"] == 0
    assert row["max_batch_size"] == e2e.max_batch_size and row["capacity_bytes"] == result.capacity_bytes
    assert (row[[f"{c}_bytes" for c in CATEGORIES]].sum()) == e2e.tracked_peak_bytes


def test_zero3_plan_shards_per_device_and_block_parallel_uses_b_devices():
    calls: list = []
    result = plan(
        "gpt-tiny",
        4,
        device="cpu",
        techniques=["e2e", "db:2+parallel"],
        zero_stage=3,
        world_size=8,
        measure_fn=_linear_runner(calls),
    )
    e2e, par = result.get("e2e"), result.get("db:2+parallel")
    assert e2e.sharding == "zero-3" and e2e.world_size == 8
    assert e2e.shares["optimizer_state"] == MiB // 2 // 8
    assert par.sharding == "block-parallel" and par.world_size == 2
    assert result.cuda_corrections is False and e2e.corrections == {} and e2e.fits is None
    assert sorted(c[0] for c in calls) == ["db:2", "e2e"]  # db:2+parallel is derived from the db:2 run


def test_plan_renders_as_text_and_as_escaped_html():
    calls: list = []
    result = plan("gpt-tiny", 4, device="L4-24GB", techniques=["e2e", "db:2"], measure_fn=_linear_runner(calls))
    text = repr(result)
    assert "Plan for gpt-tiny" in text and "L4-24GB (22.49 GiB)" in text
    assert "max batch" in text and "Verdict (not-needed)" in text
    result.model = "<script>x</script>"
    page = result._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page and "<table>" in page


# ---------------------------------------------------------------- accuracy against real CPU runs


def _agreement(preset: str, batch_size: int, technique: str = "e2e") -> float:
    predicted = plan(preset, batch_size, device="cpu", techniques=[technique]).get(technique)
    real = measure(preset, technique, batch_size, device="cpu", warmup_steps=1, steps=1)
    assert real.ok and predicted.ok
    return abs(predicted.peak_bytes - real.peak_bytes) / real.peak_bytes


@pytest.mark.parametrize("preset,batch_size", [("vit-tiny", 16), ("dit-tiny", 4), ("gpt-tiny", 8)])
def test_cpu_prediction_matches_a_real_cpu_run_within_one_percent(preset, batch_size):
    assert _agreement(preset, batch_size) <= 0.01


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["vit-tiny", "dit-tiny", "gpt-tiny"])
@pytest.mark.parametrize("batch_size", [2, 8, 32])
@pytest.mark.parametrize("technique", ["e2e", "db:2"])
def test_cpu_predictions_match_real_cpu_runs_across_batch_sizes(preset, batch_size, technique):
    assert _agreement(preset, batch_size, technique) <= 0.01


# ---------------------------------------------------------------- compute


def test_gpu_table_has_dense_peak_flops_with_sources():
    h100 = get_gpu("H100-80GB")
    # NVIDIA H100 SXM datasheet: 67 TFLOPS FP32, 1,979 TFLOPS BF16 with 2:4 sparsity (989.5 dense).
    assert h100.peak_flops("fp32") == 67 * 10**12 and h100.peak_flops("bf16") == 989_500 * 10**9
    assert get_gpu("H100-PCIe").peak_flops("fp32") == 51 * 10**12  # the PCIe card is its own entry
    assert get_gpu("RTX-4090").peak_flops("bf16") == 165_200 * 10**9  # FP32-accumulate rate on GeForce
    assert get_gpu("V100").peak_flops("bf16") is None  # no BF16 tensor cores
    assert get_gpu("A10G").peak_flops("fp32") is None  # no datasheet for the AWS-only card
    for gpu in GPUS.values():
        assert gpu.flops_source
        if gpu.peak_bf16_flops is not None:
            assert gpu.peak_bf16_flops > gpu.peak_fp32_flops


def test_plan_entries_carry_flops_a_time_estimate_and_the_memory_against_compute_chart():
    result = plan("vit-tiny", 4, device="L4", techniques="e2e,ckpt,db:2", search_max_batch=False)
    e2e, ckpt, db = (result.get(t) for t in ("e2e", "ckpt", "db:2"))
    assert db.training_flops == sum(db.block_step_flops) and len(db.block_step_flops) == 2
    assert e2e.flops_per_sample == e2e.training_flops / 4
    assert ckpt.flops_per_sample > e2e.flops_per_sample
    # NVIDIA L4 datasheet: 30.3 TFLOPS FP32.
    assert result.peak_flops == 30_300 * 10**9 and result.utilisation == ASSUMED_UTILISATION
    assert e2e.time_per_million_samples_s == pytest.approx(e2e.flops_per_sample * 1e6 / (30.3e12 * ASSUMED_UTILISATION))
    text = repr(result)
    assert "GFLOP/sample" in text and "1.00x" in text and "Estimated time per million samples at 40%" in text
    assert time_per_million_samples(1e9, 10**12, devices=4, utilisation=0.5) == pytest.approx(1e9 * 1e6 / 2e12)
    # The HTML: one point per technique, the capacity line, and the recommendation (e2e fits: not needed) ringed.
    page = result._repr_html_()
    assert page.count('id="mc-point-') == 3 and 'id="mc-capacity"' in page
    assert result.verdict.recommended == "e2e" and page.count('id="mc-recommended"') == 1


def test_the_plan_checks_a_model_of_identical_layers_on_a_two_layer_copy():
    import dataclasses

    from _toy import toy_spec

    from dbprofile.planner.predict import checked_model

    ran: list[int] = []
    base = toy_spec(depth=6)

    def counting_loss(model, batch, *, needs: int = 0):
        ran.append(len(model.blocks))
        if len(model.blocks) < needs:
            raise ValueError("this model needs its layers")
        return base.loss(model, batch)

    spec, checked, facts = checked_model(dataclasses.replace(base, loss=counting_loss))
    assert ran == [2] and facts.num_layers == 6 and checked["not_residual"] is None
    assert spec.hidden_size == base.hidden_size
    # a copy that fails is not the model's failure: the whole model is checked
    ran.clear()
    checked_model(dataclasses.replace(base, loss=lambda m, b: counting_loss(m, b, needs=3)))
    assert ran == [2, 6]
    # a model whose build fails gets the one-paragraph error of a run's check
    broken = dataclasses.replace(base, build=lambda: (_ for _ in ()).throw(RuntimeError("no weights")))
    with pytest.raises(SpecError, match="Building model 'toy' failed: RuntimeError: no weights"):
        checked_model(broken)
