"""Ground truth on CUDA (skipped without a GPU): the tracker against the caching allocator,
the planner's fake-tensor predictions against real runs, and the caching-allocator model
against the allocator's own trace. The tolerances are the ones the H200 validation
(reports/gpu-validation-h200-2.md) supports: tracker within 1% of ``max_memory_allocated``,
planner within 3% of it (bf16 language-model loss included, now that fake runs follow CUDA's
autocast order) and within 5% of ``max_memory_reserved``."""

from __future__ import annotations

import pytest
import torch

from dbprofile.validate import device_target, measure_one, plan_one

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CASES = [  # one per family, technique kind and precision; `dbprofile validate` covers the full grid
    ("vit-b16", 32, "db:4", "bf16"),
    ("dit-b2", 32, "ckpt", "fp32"),
    ("gpt2-small", 4, "db:2", "fp32"),
]


@pytest.mark.parametrize("model, batch_size, technique, precision", CASES)
def test_tracker_and_planner_against_the_allocator(model, batch_size, technique, precision):
    device = torch.device("cuda")
    planned = plan_one(model, batch_size, technique, precision, device_target(device))
    assert "error" not in planned, planned
    row = measure_one(model, batch_size, technique, precision, device)
    assert row.status == "ok", row.error
    for name, value in planned.items():
        setattr(row, name, value)
    assert abs(row.tracker_error) <= 0.01, (row.tracked_peak_bytes, row.max_allocated_bytes)
    assert abs(row.planner_error_allocated) <= 0.03, (planned, row.max_allocated_bytes)
    assert abs(row.planner_error_reserved) <= 0.05, (planned, row.max_reserved_bytes)


def test_bf16_language_model_loss_is_predicted_within_3_percent():
    device = torch.device("cuda")
    planned = plan_one("gpt2-small", 4, "e2e", "bf16", device_target(device))
    row = measure_one("gpt2-small", 4, "e2e", "bf16", device)
    error = (planned["planned_allocated_bytes"] - row.max_allocated_bytes) / row.max_allocated_bytes
    assert abs(error) <= 0.03, (planned, row.max_allocated_bytes)


def test_allocator_model_replays_a_real_run_to_its_reserved_peak():
    """Record the caching allocator's own trace of a training configuration, replay its
    allocations through the model, and compare peak reserved bytes."""
    from dbprofile.measure.allocator import CachingAllocatorModel

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    before = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python", clear_history=True)
    try:
        row = measure_one("gpt2-small", 4, "e2e", "fp32", device)
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    model = CachingAllocatorModel()
    for seg in before["segments"]:
        model.add_segment(seg["total_size"], seg["allocated_size"], small=seg["segment_type"] == "small")
    reserved = sum(seg["total_size"] for seg in before["segments"])
    recorded, live = reserved, {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = model.malloc(event["size"])
        elif event["action"] == "free_completed" and event["addr"] in live:
            model.free(live.pop(event["addr"]))
        elif event["action"] == "segment_alloc":
            reserved += event["size"]
            recorded = max(recorded, reserved)
        elif event["action"] == "segment_free":
            reserved -= event["size"]
    assert recorded == row.max_reserved_bytes
    assert abs(model.stats.peak_reserved_bytes - recorded) / recorded <= 0.03


def _trace_events(path) -> list[dict]:
    import pickle

    with open(path, "rb") as f:
        snap = pickle.load(f)
    assert {"segments", "device_traces"} <= set(snap), sorted(snap)
    return [event for trace in snap["device_traces"] for event in trace]


def test_memory_snapshot_of_each_tracked_step_is_a_memory_viz_pickle(tmp_path):
    """`--memory-snapshot`: one pickle per technique (per block for DiffusionBlocks), each holding the
    allocator's events of the tracked step with the Python frames that made them."""
    from dbprofile.measure.runner import measure

    for technique, files in (("e2e", 1), ("db:2", 2)):
        m = measure("vit-tiny", technique, 8, device="cuda", warmup_steps=1, steps=1, memory_snapshot=tmp_path)
        assert m.ok, m.error
        assert len(m.memory_snapshots) == files
        for path in m.memory_snapshots:
            allocs = [e for e in _trace_events(path) if e["action"] == "alloc"]
            assert allocs, path
            assert any(frame["filename"].endswith(".py") for e in allocs for frame in e["frames"])
            # one training step's allocations, not the timed steps' too: the largest block live at
            # once cannot exceed what the untracked steps reached
            assert max(e["size"] for e in allocs) <= m.cuda["max_memory_allocated"]


def test_run_command_links_the_snapshots_from_its_report(tmp_path):
    from click.testing import CliRunner

    from dbprofile.cli import main

    out, snaps = tmp_path / "r.json", tmp_path / "snaps"
    result = CliRunner().invoke(
        main,
        [
            "run",
            "vit-tiny",
            "--device",
            "cuda",
            "-t",
            "e2e,db:2",
            "--steps",
            "1",
            "-o",
            str(out),
            "--memory-snapshot",
            str(snaps),
        ],
    )
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in snaps.iterdir())
    assert names == ["vit-tiny_db-2_b8_block0.pickle", "vit-tiny_db-2_b8_block1.pickle", "vit-tiny_e2e_b8.pickle"]
    page = out.with_suffix(".html").read_text()
    assert 'href="snaps/vit-tiny_e2e_b8.pickle"' in page and "pytorch.org/memory_viz" in page
