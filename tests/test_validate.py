"""`dbprofile validate` on the CPU: the planner's fake run and the real run agree to the byte,
rows stream as they finish, and asking for CUDA without a GPU is a clear error."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from dbprofile.cli import main
from dbprofile.report.text import validation_row, validation_summary
from dbprofile.validate import ValidationRow, validate


def test_planner_matches_real_cpu_run_to_the_byte():
    seen: list[ValidationRow] = []
    rows = validate([("vit-tiny", (4,))], ["e2e", "db:2"], ["fp32"], device="cpu", plan_workers=1, on_row=seen.append)
    assert [r.technique for r in rows] == ["e2e", "db:2"] and seen == rows
    for row in rows:
        assert row.status == "ok", row.error
        assert row.planned_tracked_bytes == row.tracked_peak_bytes
        assert row.planner_error_tracked == 0.0
        assert row.max_allocated_bytes is None and row.tracker_error is None  # no allocator on the CPU
        assert row.workspace_bytes == 0
    assert "tensor bytes (fake vs real) 0.0%" in validation_summary(rows)
    assert validation_row(rows[0]).startswith("| vit-tiny | 4 | e2e | fp32 |")


def test_errors_are_relative_to_the_allocator_figures():
    row = ValidationRow(
        model="m",
        batch_size=1,
        technique="e2e",
        precision="fp32",
        status="ok",
        tracked_peak_bytes=990,
        workspace_bytes=90,
        max_allocated_bytes=1000,
        max_reserved_bytes=1100,
        nvml_used_bytes=2100,
        planned_tracked_bytes=909,
        planned_allocated_bytes=1020,
        planned_reserved_bytes=1122,
    )
    assert row.tracker_error == pytest.approx(-0.01)
    assert row.planner_error_tracked == pytest.approx(0.01)  # against tensor bytes: 990 - 90
    assert row.planner_error_allocated == pytest.approx(0.02)
    assert row.planner_error_reserved == pytest.approx(0.02)
    assert row.nvml_minus_reserved_bytes == 1000


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_validate_on_cuda_without_a_gpu_says_what_to_do():
    result = CliRunner().invoke(main, ["validate", "--device", "cuda", "--cases", "vit-tiny:2"])
    assert result.exit_code == 2
    assert "needs a CUDA GPU" in result.output and "--device cpu" in result.output
    assert "Traceback" not in result.output
