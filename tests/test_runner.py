"""The runner: per-technique failures stay in their measurement, results are saved as they
finish, DiffusionBlocks is measured per block, and the table is labelled in IEC units."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _toy import toy_spec

from dbprofile.measure import steps
from dbprofile.measure.runner import measure, run
from dbprofile.methods.checkpointing import CheckpointedSegment
from dbprofile.report.text import run_table
from dbprofile.results import RunResult
from dbprofile.spec import SpecError


def test_memory_limit_oom_keeps_the_other_techniques_results(tmp_path):
    spec = toy_spec()
    ckpt = measure(spec, "ckpt", 16)
    e2e = measure(spec, "e2e", 16)
    limit = (ckpt.peak_bytes + e2e.peak_bytes) // 2
    out = tmp_path / "run.json"
    seen = []
    result = run(spec, ["e2e", "ckpt"], [16], memory_limit=limit, out=out, on_measurement=seen.append)
    by_name = {m.technique: m for m in result.measurements}
    assert by_name["e2e"].status == "oom" and "batch size 16" in by_name["e2e"].error
    assert by_name["ckpt"].status == "ok" and by_name["ckpt"].peak_bytes == ckpt.peak_bytes
    saved = RunResult.load(out)
    assert [m.technique for m in saved.measurements] == ["e2e", "ckpt"]
    assert [m.technique for m in seen] == ["e2e", "ckpt"]


def test_model_error_is_reported_per_technique_with_its_message():
    base = toy_spec()

    def loss(model, batch):
        if isinstance(model.blocks[0], CheckpointedSegment):
            raise ValueError("my layer cannot be checkpointed")
        return base.loss(model, batch)

    spec = toy_spec()
    spec.loss = loss
    result = run(spec, ["e2e", "ckpt"], [8])
    e2e, ckpt = result.measurements
    assert e2e.status == "ok" and e2e.peak_bytes > 0
    assert ckpt.status == "error"
    assert ckpt.error == "ckpt: ValueError: my layer cannot be checkpointed"


def test_non_finite_loss_is_flagged_nan():
    m = measure(toy_spec(fail="nan"), "e2e", 8)
    assert m.status == "nan"
    assert "nan" in m.error.lower()
    assert m.peak_bytes > 0  # the memory figures are still recorded


def test_diffusion_blocks_measures_every_block_and_reports_the_worst():
    m = measure(toy_spec(depth=4), "db:2", 8)
    assert m.status == "ok", m.error
    assert [b.block for b in m.blocks] == [0, 1]
    assert [b.layers for b in m.blocks] == [[0, 1], [2, 3]]
    worst = max(m.blocks, key=lambda b: b.peak_bytes)
    assert m.peak_block == worst.block and m.peak_bytes == worst.peak_bytes
    assert m.shares == worst.shares and sum(m.shares.values()) == m.peak_bytes
    assert m.block_steps_time_s == pytest.approx(sum(b.step_time_s for b in m.blocks))
    assert m.extra_parameters and m.extra_parameters > 0
    assert "activation_ratios_error" not in m.extra
    ratios = m.extra["activation_ratios"]
    assert 0.5 <= ratios["ratio_vs_full_depth_adaln"] < 0.6  # 2 of 4 layers, plus the injected target


def test_offload_keeps_less_parameter_and_optimizer_state_on_the_device():
    plain = measure(toy_spec(depth=4), "db:2", 8)
    offload = measure(toy_spec(depth=4), "db:2+offload", 8)
    assert offload.status == "ok", offload.error
    assert offload.shares["parameters"] < plain.shares["parameters"]
    assert offload.shares["optimizer_state"] < plain.shares["optimizer_state"]
    assert offload.transfer_time_s is not None and offload.transfer_time_s > 0


def test_step_times_are_median_with_spread():
    m = measure(toy_spec(), "e2e", 8, steps=3)
    low, high = m.step_time_spread_s
    assert 0 < low <= m.step_time_s <= high
    assert 0 <= m.step_time_iqr_s <= high - low
    # warm-up, tracked, then torch.utils.benchmark's blocks: at least four, at least `steps` steps
    assert m.extra["timing"]["steps_run"] >= 1 + 1 + 4
    assert m.extra["timing"]["all_steps_s"] >= steps.MIN_TIME_S  # timed for at least 1 s
    assert m.status == "ok" and len(m.losses) >= m.extra["timing"]["steps_run"]  # timer warm-ups too


def test_too_few_timed_steps_get_more_blocks_and_keep_the_timed_ones(monkeypatch):
    from torch.utils import benchmark

    calls = []
    adaptive = benchmark.Timer.adaptive_autorange

    def counted(self, *args, **kwargs):
        calls.append(kwargs)
        return adaptive(self, *args, **kwargs)

    monkeypatch.setattr(benchmark.Timer, "adaptive_autorange", counted)
    monkeypatch.setattr(steps, "MIN_TIME_S", 0.001)
    monkeypatch.setattr(steps, "MAX_TIME_S", 0.002)  # the adaptive loop stops after a few blocks
    m = measure(toy_spec(), "e2e", 8, steps=400)
    timing = m.extra["timing"]
    # one adaptive run, then blocks of its size until 400 timed steps: none thrown away
    assert len(calls) == 1
    assert timing["steps_run"] - 2 >= 400  # less the warm-up and the tracked step
    assert 0 < timing["timed_steps_s"] < timing["all_steps_s"] - sum(timing["tracked_steps_s"])


def test_block_steps_carry_the_sum_of_the_blocks_spreads():
    m = measure(toy_spec(depth=4), "db:2", 8)
    assert m.block_steps_time_iqr_s == pytest.approx(sum(b.step_time_iqr_s for b in m.blocks))
    assert all(b.step_time_iqr_s is not None and b.step_time_iqr_s >= 0 for b in m.blocks)


@pytest.mark.parametrize("tech, message", [("bogus", "Unknown technique"), ("ckpt:9", "ckpt:K"), ("db:9", "db:B")])
def test_bad_techniques_raise_spec_error_before_running(tech, message):
    with pytest.raises(SpecError, match=message):
        run(toy_spec(depth=4), ["e2e", tech], [8])


def test_format_table_uses_labelled_iec_units_and_lists_failures():
    spec = toy_spec()
    result = run(spec, ["e2e", "ckpt"], [8], memory_limit=measure(spec, "ckpt", 8).peak_bytes + 1)
    table = run_table(result)
    assert "peak KiB" in table and "1 KiB = 1,024 bytes" in table
    assert "OOM" in table and "e2e @ batch 8: OOM" in table
    ckpt = result.get("ckpt")
    assert f"{ckpt.peak_bytes / 1024:.2f}" in table
    assert " KB" not in table and "GB" not in table


def test_run_result_round_trips_through_json(tmp_path):
    result = run(toy_spec(), ["e2e"], [4], out=tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["measurements"][0]["peak_bytes"] == result.measurements[0].peak_bytes
    assert data["environment"]["torch"] == torch.__version__
    # what else ran matters to every CPU timing: the record says how busy the machine was
    env = data["environment"]
    assert env["torch_threads"] == torch.get_num_threads() and env["cpu_count"] == os.cpu_count()
    assert isinstance(env["load_average_start"], float) and isinstance(env["load_average_end"], float)


def test_device_facts_are_unavailable_not_a_crash_off_cuda():
    from dbprofile.measure import device

    assert device.cuda_figures("cpu") is None
    env = device.environment("cpu")
    assert env["torch"] == torch.__version__ and env["dbprofile"]
    assert env["device_capacity_bytes"] is None and env["driver"] is None
    if not torch.cuda.is_available():
        assert device.nvml_used_bytes("cuda:0") is None  # no GPU here: None, never an exception
