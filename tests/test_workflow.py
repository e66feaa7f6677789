"""Fitting into the user's workflow: JSON on stdout (human text on stderr), CSV files, exit codes
a CI gate can use, progress stages and verbosity, notebook views, and memory snapshots (their
refusal on the CPU and their wiring around the tracked step; tests/test_gpu.py runs them on CUDA)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from dbprofile import progress, torch_internals
from dbprofile.cli import EXIT_INTERRUPTED, EXIT_NOTHING_FITS, EXIT_OK, exit_code, main
from dbprofile.console import Output, standard_json
from dbprofile.measure import snapshot
from dbprofile.measure.runner import measure
from dbprofile.results import Measurement, Plan, PlanEntry, RunResult
from dbprofile.spec import SpecError
from dbprofile.verdict import judge_into

TOY = f"{Path(__file__).parent / '_toy.py'}:toy_spec"
GiB = 1024**3


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_clean(result, code: int) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- JSON, CSV and exit codes through the CLI


def test_models_json_is_every_preset_with_its_parameter_count():
    result = invoke("models", "--json")
    assert_clean(result, EXIT_OK)
    rows = {row["name"]: row for row in json.loads(result.stdout)["models"]}
    assert rows["vit-tiny"]["parameters"] == 302_154
    assert rows["gpt2-small"]["parameters"] == 124_439_808
    assert rows["llama-7b"]["layers"] == 32
    assert "vit-tiny" in result.stderr  # the human table went to stderr


def test_run_json_on_stdout_is_the_result_file_plus_verdict_and_files(tmp_path):
    out = tmp_path / "toy.json"
    result = invoke("run", TOY, "-t", "e2e,db:2", "--steps", "1", "-o", str(out), "--json")
    assert_clean(result, EXIT_OK)
    answer = json.loads(result.stdout)
    saved = json.loads(out.read_text())
    assert [m["peak_bytes"] for m in answer["measurements"]] == [m["peak_bytes"] for m in saved["measurements"]]
    assert answer["measurements"][0]["peak_bytes"] > 0
    assert answer["verdict"]["decision"] in ("adopt", "not-worth-it", "not-needed", "inconclusive")
    assert answer["files"] == {"json": str(out), "html": str(out.with_suffix(".html"))}
    assert RunResult.from_dict(answer).get("db:2").ok  # `report` and `compare` read it back
    assert "peak tracked tensor memory" in result.stderr and "peak tracked" not in result.stdout


def test_run_where_every_technique_runs_out_of_memory_exits_3_with_its_table_and_report(tmp_path):
    out = tmp_path / "oom.json"
    result = invoke("run", TOY, "-t", "e2e,ckpt", "--steps", "1", "--memory-limit", "1KiB", "-o", str(out))
    assert_clean(result, EXIT_NOTHING_FITS)
    assert "e2e            8     OOM" in result.stdout and "ckpt           8     OOM" in result.stdout
    assert "above the memory limit of 1024 bytes" in result.stdout
    assert out.exists() and out.with_suffix(".html").exists()
    assert {m.status for m in RunResult.load(out).measurements} == {"oom"}


def test_report_reads_a_result_back_as_json_csv_and_its_exit_code(tmp_path):
    out = tmp_path / "oom.json"
    invoke("run", TOY, "-t", "e2e", "--steps", "1", "--memory-limit", "1KiB", "-o", str(out), "--no-report")
    result = invoke("report", str(out), "--json", "--csv", str(tmp_path / "oom.csv"))
    assert_clean(result, EXIT_NOTHING_FITS)
    answer = json.loads(result.stdout)
    assert answer["measurements"][0]["status"] == "oom" and answer["verdict"]["decision"] == "inconclusive"
    assert answer["files"]["html"] == str(out.with_suffix(".html")) and out.with_suffix(".html").exists()
    assert pd.read_csv(tmp_path / "oom.csv")["status"].tolist() == ["oom"]


def test_run_csv_has_the_columns_and_values_of_to_dataframe(tmp_path):
    out, csv = tmp_path / "toy.json", tmp_path / "tables" / "toy.csv"
    result = invoke("run", TOY, "-t", "e2e,ckpt", "--steps", "1", "-o", str(out), "--csv", str(csv), "-q")
    assert_clean(result, EXIT_OK)
    written = pd.read_csv(csv)
    expected = RunResult.load(out).to_dataframe()
    assert list(written.columns) == list(expected.columns)
    assert written["peak_bytes"].tolist() == expected["peak_bytes"].tolist()
    assert written["activations_bytes"].tolist() == expected["activations_bytes"].tolist()


def test_plan_where_nothing_fits_answers_with_the_shortfall_exit_3_and_writes_its_files(tmp_path):
    html, csv = tmp_path / "plan.html", tmp_path / "plan.csv"
    result = invoke(
        "plan",
        "vit-tiny",
        "-b",
        "8",
        "--gpu",
        "1GiB",
        "-t",
        "e2e,db:2",
        "--json",
        "--html",
        str(html),
        "--csv",
        str(csv),
    )
    assert_clean(result, EXIT_NOTHING_FITS)
    answer = json.loads(result.stdout)
    assert answer["capacity_bytes"] == GiB
    for entry in answer["entries"]:
        assert entry["fits"] is False
        # the 1257 MiB CUDA context alone is more than 1 GiB: each misses by its whole need less 1 GiB
        assert entry["shortfall_bytes"] == entry["peak_bytes"] - GiB > 233 * 1024**2
    assert answer["verdict"]["decision"] == "not-worth-it"
    assert "Nothing fits in one step: at batch size 8, custom (1.00 GiB) is short for every technique" in result.stderr
    assert "Not even batch size 1 fits" in result.stderr
    assert "Nothing fits" in html.read_text()
    assert pd.read_csv(csv)["shortfall_bytes"].tolist() == [e["shortfall_bytes"] for e in answer["entries"]]


def test_plan_that_fits_exits_0():
    result = invoke("plan", "vit-tiny", "-b", "8", "--gpu", "4GiB", "-t", "e2e", "-q")
    assert_clean(result, EXIT_OK)
    assert "   yes " in result.stdout and "Nothing fits" not in result.output


def test_compare_json_lists_each_run_with_its_source_and_csv_adds_a_source_column(tmp_path):
    paths = []
    for b in ("2", "4"):
        out = tmp_path / f"b{b}.json"
        assert invoke("run", TOY, "-t", "e2e", "-b", b, "--steps", "1", "-o", str(out), "--no-report").exit_code == 0
        paths.append(str(out))
    csv = tmp_path / "all.csv"
    result = invoke("compare", *paths, "-o", str(tmp_path / "cmp.html"), "--json", "--csv", str(csv))
    assert_clean(result, EXIT_OK)
    answer = json.loads(result.stdout)
    assert [r["source"] for r in answer["runs"]] == paths
    assert [r["measurements"][0]["batch_size"] for r in answer["runs"]] == [2, 4]
    table = pd.read_csv(csv)
    assert table["source"].tolist() == paths and table["batch_size"].tolist() == [2, 4]


def test_validate_json_and_csv_carry_every_row_and_exit_3_when_all_failed(monkeypatch, tmp_path):
    """The command's output path, with the device work replaced (test_validate.py runs the real one)."""
    from dbprofile import validate as v

    rows = [
        v.ValidationRow(
            model="vit-tiny",
            batch_size=2,
            technique="e2e",
            precision="fp32",
            status="ok",
            tracked_peak_bytes=1000,
            max_allocated_bytes=1010,
        ),
        v.ValidationRow(model="vit-tiny", batch_size=2, technique="db:2", precision="fp32", status="oom"),
    ]

    def fake_validate(*args, on_row, **kwargs):
        for row in rows:
            on_row(row)
        return rows

    monkeypatch.setattr(v, "validate", fake_validate)
    args = ["validate", "--device", "cpu", "--cases", "vit-tiny:2", "-t", "e2e,db:2", "--precisions", "fp32"]
    result = invoke(*args, "--json", "--csv", str(tmp_path / "rows.csv"))
    assert_clean(result, EXIT_OK)
    answer = json.loads(result.stdout)
    assert [r["status"] for r in answer["rows"]] == ["ok", "oom"]
    assert answer["rows"][0]["tracker_error"] == pytest.approx(-10 / 1010)
    assert isinstance(answer["summary"], str) and "vit-tiny" in result.stderr
    assert pd.read_csv(tmp_path / "rows.csv")["technique"].tolist() == ["e2e", "db:2"]
    rows[0].status = "error"
    assert_clean(invoke(*args), EXIT_NOTHING_FITS)


def test_json_is_standard_json_without_nan():
    document = {"losses": [1.0, float("nan"), float("inf")], "pair": (1, 2)}
    assert standard_json(document) == {"losses": [1.0, None, None], "pair": [1, 2]}
    assert json.loads(json.dumps(standard_json(document), allow_nan=False))["losses"][1] is None


def test_exit_code_maps_each_outcome():
    def run_with(*statuses: str) -> RunResult:
        return RunResult(
            model="m", measurements=[Measurement(technique="e2e", batch_size=1, status=s) for s in statuses]
        )

    def plan_with(*fits: bool | None, capacity: int | None = GiB) -> Plan:
        return Plan(
            model="m",
            capacity_bytes=capacity,
            entries=[PlanEntry(technique=f"t{i}", batch_size=1, fits=f) for i, f in enumerate(fits)],
        )

    assert exit_code(run_with("oom", "ok")) == EXIT_OK
    assert exit_code(run_with("oom", "error", "nan")) == EXIT_NOTHING_FITS
    assert exit_code([run_with("oom"), run_with("ok")]) == EXIT_OK
    assert exit_code([run_with("oom"), run_with("error")]) == EXIT_NOTHING_FITS
    assert exit_code(plan_with(False, True)) == EXIT_OK
    assert exit_code(plan_with(False, False)) == EXIT_NOTHING_FITS
    assert exit_code(plan_with(None, capacity=None)) == EXIT_OK  # a CPU plan: nothing to fit, it ran
    assert exit_code(Plan(model="m", entries=[PlanEntry(technique="e2e", batch_size=1, status="error")])) == 3
    assert exit_code(interrupted=True) == EXIT_INTERRUPTED == 130
    assert exit_code() == EXIT_OK


def test_ctrl_c_exits_130_with_one_line(monkeypatch):
    import dbprofile.models

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(dbprofile.models, "preset_table", interrupted)
    result = invoke("models")
    assert_clean(result, EXIT_INTERRUPTED)
    assert result.stderr.strip() == "Interrupted. A run's result JSON keeps every measurement that finished."


# ---------------------------------------------------------------- verbosity and progress


def test_verbose_logs_every_stage_and_quiet_prints_only_the_answer(tmp_path):
    args = ["run", TOY, "-t", "db:2", "--steps", "1", "-o", str(tmp_path / "v.json"), "--no-report"]
    verbose = invoke(*args, "-v")
    assert_clean(verbose, EXIT_OK)
    for stage in (
        "db:2 @ batch 8: building the model",
        "db:2 @ batch 8: warm-up step 1/1 (block 2 of 2)",
        "db:2 @ batch 8: tracked step (block 1 of 2)",
        "measured db:2 @ batch 8",
        # CPU techniques are timed after the memory measurements (one technique: on its own)
        "db:2 @ batch 8: building again for the sequential timing",
        "timing db:2 @ batch 8 (sequential)",
    ):
        assert stage in verbose.stderr, verbose.stderr
    quiet = invoke(*args, "-q")
    assert_clean(quiet, EXIT_OK)
    assert quiet.stderr == "" and "peak tracked tensor memory" in quiet.stdout
    normal = invoke(*args)
    assert "measured db:2 @ batch 8" in normal.stderr and "warm-up" not in normal.stderr
    assert "contradict" in invoke(*args, "-q", "-v").output


def test_stages_reach_the_listener_in_order_for_every_block():
    from tests._toy import toy_spec

    stages: list[str] = []
    with progress.reporting(stages.append):
        measure(toy_spec(), "db:2", 2, warmup_steps=1, steps=2)
    assert stages == [
        "db:2 @ batch 2: building the model",
        "db:2 @ batch 2: warm-up step 1/1 (block 1 of 2)",
        "db:2 @ batch 2: warm-up step 1/1 (block 2 of 2)",
        "db:2 @ batch 2: tracked step (block 1 of 2)",
        "db:2 @ batch 2: 2 timed steps (block 1 of 2)",
        "db:2 @ batch 2: tracked step (block 2 of 2)",
        "db:2 @ batch 2: 2 timed steps (block 2 of 2)",
    ]
    progress.stage("outside any display")  # no listener: nothing to call, no error


def test_progress_display_draws_stages_on_a_terminal_and_nothing_elsewhere(monkeypatch):
    import io

    from rich.console import Console

    from dbprofile import console as console_module

    screen = io.StringIO()
    monkeypatch.setattr(console_module, "_stderr_console", lambda: Console(file=screen, force_terminal=True, width=120))
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    out = Output()
    assert out.interactive
    with out.progress("toy", total=2) as advance:
        progress.stage("db:2 @ batch 8: tracked step (block 1 of 2)")
        advance()
    assert "toy: db:2 @ batch 8: tracked step (block 1 of 2)" in screen.getvalue()
    assert not Output(verbosity=-1).interactive  # -q: never a display


# ---------------------------------------------------------------- notebook views


def test_run_result_repr_html_is_a_compact_escaped_table_with_the_verdict():
    shares = {"parameters": 100, "activations": 300}
    result = RunResult(
        model="<b>net</b>",
        measurements=[
            Measurement(
                technique="e2e", batch_size=8, peak_bytes=400, shares=shares, peak_phase="backward", step_time_s=0.01
            ),
            Measurement(technique="db:2", batch_size=8, status="oom", error="out of memory"),
        ],
    )
    judge_into(result)  # as the runner does when a run ends
    page = result._repr_html_()
    assert "&lt;b&gt;net&lt;/b&gt;" in page and "<b>net</b>" not in page
    assert "<td>e2e</td>" in page and "activations 75%" in page and "10.0 ms" in page and "<td>oom</td>" in page
    assert "Inconclusive" in page  # no DiffusionBlocks run succeeded: the verdict says so


# ---------------------------------------------------------------- memory snapshots


def test_memory_snapshot_is_refused_on_the_cpu_and_in_fake_mode_with_one_paragraph(tmp_path):
    for extra in ((), ("--fake",)):
        result = invoke("run", TOY, "-t", "e2e", "--memory-snapshot", str(tmp_path / "snaps"), *extra)
        assert_clean(result, 2)
        assert "CUDA caching allocator" in result.stderr and "--device cuda" in result.stderr
        assert result.stderr.count("\n") == 1  # one paragraph
    assert not (tmp_path / "snaps").exists()
    from tests._toy import toy_spec

    with pytest.raises(SpecError, match="CUDA caching allocator"):
        measure(toy_spec(), "e2e", 2, memory_snapshot=tmp_path)


def test_memory_snapshot_is_refused_for_distributed_runs(tmp_path):
    result = invoke("run", TOY, "-t", "db:2+parallel", "--memory-snapshot", str(tmp_path))
    assert_clean(result, 2)
    assert "not available for distributed runs" in result.stderr


def test_snapshot_records_only_the_tracked_step_of_each_block(monkeypatch, tmp_path):
    """The runner's wiring, with the three CUDA calls replaced by recorders: recording starts after
    the warm-up, stops before the timed steps, and one file per block is named in the measurement."""
    import torch

    from dbprofile.measure.steps import measure_into
    from dbprofile.settings import RunSettings
    from dbprofile.techniques import parse_techniques
    from tests._toy import toy_spec

    events: list[str] = []
    monkeypatch.setattr(torch_internals, "start_cuda_memory_history", lambda: events.append("start"))
    monkeypatch.setattr(torch_internals, "stop_cuda_memory_history", lambda: events.append("stop"))
    monkeypatch.setattr(
        torch_internals, "dump_cuda_memory_snapshot", lambda path: events.append(f"dump {Path(path).name}")
    )
    spec = toy_spec(name="my/toy")
    m = Measurement(technique="db:2", batch_size=2)
    tech = parse_techniques(["db:2"])[0]
    cpu = torch.device("cpu")
    name = lambda unit: snapshot.snapshot_path(tmp_path, spec.name, "db:2", 2, unit)  # noqa: E731
    with progress.reporting(lambda text: events.append(text.split(": ", 1)[1])):
        measure_into(m, spec, tech, 2, RunSettings(steps=1), dev=cpu, snapshot_for=name)
    assert events == [
        "building the model",
        "warm-up step 1/1 (block 1 of 2)",
        "warm-up step 1/1 (block 2 of 2)",
        "tracked step (block 1 of 2)",
        "start",
        "dump my-toy_db-2_b2_block0.pickle",
        "stop",
        "1 timed step (block 1 of 2)",
        "tracked step (block 2 of 2)",
        "start",
        "dump my-toy_db-2_b2_block1.pickle",
        "stop",
        "1 timed step (block 2 of 2)",
    ]
    assert [Path(p).name for p in m.memory_snapshots] == [
        "my-toy_db-2_b2_block0.pickle",
        "my-toy_db-2_b2_block1.pickle",
    ]
    assert snapshot.snapshot_path(tmp_path, "vit", "e2e", 8, None).name == "vit_e2e_b8.pickle"


def test_snapshot_is_written_even_when_the_step_fails(monkeypatch, tmp_path):
    events: list[str] = []
    monkeypatch.setattr(torch_internals, "start_cuda_memory_history", lambda: events.append("start"))
    monkeypatch.setattr(torch_internals, "stop_cuda_memory_history", lambda: events.append("stop"))
    monkeypatch.setattr(torch_internals, "dump_cuda_memory_snapshot", lambda path: events.append("dump"))
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        with snapshot.recording(tmp_path / "sub" / "x.pickle"):
            raise RuntimeError("CUDA out of memory")
    assert events == ["start", "dump", "stop"] and (tmp_path / "sub").is_dir()
    with snapshot.recording(None):  # no path: nothing recorded
        pass
    assert events == ["start", "dump", "stop"]


def test_report_links_each_snapshot_relative_to_the_page(tmp_path):
    from dbprofile.report import write_run_report

    snaps = tmp_path / "snaps"
    result = RunResult(
        model="toy",
        measurements=[
            Measurement(
                technique="e2e",
                batch_size=8,
                peak_bytes=10,
                shares={"activations": 10},
                memory_snapshots=[str(snaps / "toy_e2e_b8.pickle")],
            ),
            Measurement(
                technique="db:2",
                batch_size=8,
                peak_bytes=8,
                shares={"activations": 8},
                peak_block=1,
                memory_snapshots=[str(snaps / "b0.pickle"), str(snaps / "b1.pickle")],
            ),
        ],
    )
    page = write_run_report(result, tmp_path / "report" / "toy.html").read_text()
    assert 'href="../snaps/toy_e2e_b8.pickle"' in page
    assert '<a href="../snaps/b1.pickle">block 1</a> (the reported peak)' in page
    assert 'href="https://pytorch.org/memory_viz"' in page
