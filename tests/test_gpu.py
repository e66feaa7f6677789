"""Ground truth on CUDA (skipped without a GPU): the tracker against the caching allocator,
and the planner's fake-tensor predictions against real runs. The tolerances are the ones the
H100 validation (reports/gpu-validation-h100.md) supports: tracker within 2% of
``max_memory_allocated``, planner within 5%, except where a documented kernel-policy difference
applies (bf16 autocast around a vocabulary-sized cross-entropy: the CPU's autocast casts the
logits to fp32 first, CUDA's does not, so the plan over-predicts there, never under)."""

from __future__ import annotations

import pytest
import torch

from dbprofile.validate import measure_one, plan_one, device_target

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CASES = [
    ("vit-b16", 32, "e2e", "fp32"),
    ("vit-b16", 32, "db:4", "bf16"),
    ("dit-b2", 32, "ckpt", "fp32"),
    ("dit-b2", 32, "db:4+offload", "bf16"),
    ("gpt2-small", 4, "db:2", "fp32"),
    ("gpt2-small", 4, "e2e", "fp32"),
]


@pytest.mark.parametrize("model, batch_size, technique, precision", CASES)
def test_tracker_peak_within_2_percent_of_max_memory_allocated(model, batch_size, technique, precision):
    row = measure_one(model, batch_size, technique, precision, torch.device("cuda"))
    assert row.status == "ok", row.error
    assert abs(row.tracker_error) <= 0.02, (row.tracked_peak_bytes, row.max_allocated_bytes)


@pytest.mark.parametrize("model, batch_size, technique, precision", CASES)
def test_planner_within_5_percent_of_max_memory_allocated(model, batch_size, technique, precision):
    device = torch.device("cuda")
    planned = plan_one(model, batch_size, technique, precision, device_target(device))
    assert "error" not in planned, planned
    row = measure_one(model, batch_size, technique, precision, device)
    error = (planned["planned_allocated_bytes"] - row.max_allocated_bytes) / row.max_allocated_bytes
    assert abs(error) <= 0.05, (planned, row.max_allocated_bytes)


def test_planner_over_predicts_bf16_language_model_loss_never_under():
    device = torch.device("cuda")
    planned = plan_one("gpt2-small", 4, "e2e", "bf16", device_target(device))
    row = measure_one("gpt2-small", 4, "e2e", "bf16", device)
    error = (planned["planned_allocated_bytes"] - row.max_allocated_bytes) / row.max_allocated_bytes
    assert 0.0 <= error <= 0.15, (planned, row.max_allocated_bytes)
