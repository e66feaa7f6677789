"""What users and adversaries did to dbprofile (issue 14), pinned: each case stops with one
paragraph and the right exit code, or is measured and recorded, and every result file is
standard JSON written atomically. Model files are tiny (3 linear layers, 8 wide) so each real
run takes about a second."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
import threading

import pytest
from click.testing import CliRunner

from dbprofile.cli import main
from dbprofile.files import OutputBusyError, output_lock, to_standard_json, write_atomic
from dbprofile.loading import load_spec
from dbprofile.measure.limits import TimeLimitExceeded, time_limit
from dbprofile.measure.runner import run
from dbprofile.methods.diffusion_blocks.activations import layer_activation_bytes
from dbprofile.results import Measurement, RunResult
from dbprofile.schema import ResultSchemaError
from dbprofile.spec import SpecError

# {PRE} runs at import, {BUILD} in build(), {LOSS} at the start of the loss; `n` is the batch size
# and CALLS collects the batch size of every loss call (so a case can strike only on the k-th call).
MODEL = textwrap.dedent(
    """
    import sys, time
    import torch
    from torch import nn
    from dbprofile import ModelSpec

    CALLS = []
    {PRE}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.layers = nn.ModuleList([{LAYERS}])
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.embed(x){TOKENS}
            for layer in self.layers:
                h = layer(h)
            return self.head(h{READ})

    def build():
        {BUILD}
        return Net()

    def batch(n, device):
        g = torch.Generator().manual_seed(0)
        return {{"inputs": torch.randn(n, 5, 4, generator=g).to(device),
                "targets": torch.randint(0, 3, (n,), generator=g).to(device)}}

    def loss(m, b):
        n = b["inputs"].shape[0]
        CALLS.append(n)
        {LOSS}
        return nn.functional.cross_entropy(m(b["inputs"]), b["targets"])

    spec = ModelSpec(name="toy", build=build, batch=batch, loss=loss, layers="layers",
                     task="classification", num_classes=3)
    """
)

PLAIN_LAYERS = "nn.Linear(8, 8) for _ in range(3)"  # no norm: the hidden width must come from the traced state


def model_file(
    tmp_path, name="model.py", pre="pass", build="pass", loss="pass", layers=PLAIN_LAYERS, tokens="", read="[:, 0]"
) -> str:
    path = tmp_path / name
    body = {"BUILD": build, "LOSS": loss}
    body = {key: textwrap.indent(text, "    ").lstrip() for key, text in body.items()}  # inside a def
    path.write_text(MODEL.format(PRE=pre, LAYERS=layers, TOKENS=tokens, READ=read, **body))
    return str(path)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_exit(result, code, *fragments):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for fragment in fragments:
        assert fragment in result.output, result.output


def strict_json(text: str):
    """Parse as a strict parser would: NaN and Infinity are not JSON."""

    def refuse(constant):
        raise ValueError(f"not standard JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def run_args(model, out, *more):
    return ["run", model, "--steps", "1", "--no-report", "-o", out, *more]


# ---------------------------------------------------------------- 1. activation ratios


def test_activation_ratios_are_computed_through_the_cli(tmp_path):
    out = tmp_path / "r.json"
    assert_exit(invoke(*run_args(model_file(tmp_path), out, "-t", "e2e,db:3")), 0)
    db = next(m for m in strict_json(out.read_text())["measurements"] if m["technique"] == "db:3")
    assert "activation_ratios_error" not in db["extra"]
    ratios = db["extra"]["activation_ratios"]
    # The same counts as asking the activation counter directly (on real tensors, outside the runner).
    # The runner fills in the hidden width these norm-less layers do not show (case 9); so does this.
    spec = dataclasses.replace(load_spec(str(tmp_path / "model.py")), hidden_size=8)
    direct = layer_activation_bytes(spec, 3, 8)
    assert {k: ratios[k] for k in ("block_layers_bytes", "full_depth_adaln_bytes", "plain_layers_bytes")} == {
        k: direct[k] for k in ("block_layers_bytes", "full_depth_adaln_bytes", "plain_layers_bytes")
    }
    # 3 layers, one per block: the worst block (the first also holds the injected noisy target) saves
    # a little more than a third of what the same layers save at full depth.
    assert 1 / 3 < ratios["ratio_vs_full_depth_adaln"] < 0.4
    assert ratios["block_layers_bytes"] > 0


def test_activation_ratios_on_a_conv_patch_embedding_preset():
    """The reported failure: 'Couldn't swap Conv2d.weight' on vit-tiny under the runner's fake mode."""
    from dbprofile.measure.runner import activation_ratios
    from dbprofile.techniques import parse_techniques

    m = Measurement(technique="db:2", batch_size=2)
    activation_ratios(m, load_spec("vit-tiny"), parse_techniques(["db:2"])[0], 2)
    assert "activation_ratios_error" not in m.extra
    assert m.extra["activation_ratios"]["ratio_vs_full_depth_adaln"] == pytest.approx(0.5, abs=0.01)


# ---------------------------------------------------------------- 2. concurrent runs on one output


def test_concurrent_atomic_saves_never_show_a_reader_half_a_file(tmp_path):
    target = tmp_path / "same.json"
    payloads = [to_standard_json({"writer": w, "data": list(range(2000))}) for w in range(3)]
    errors: list[BaseException] = []

    def writer(text: str) -> None:
        try:
            for _ in range(60):
                write_atomic(target, text)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    reads = 0
    while any(t.is_alive() for t in threads):
        if target.exists():
            strict_json(target.read_text())  # raises on a torn file
            reads += 1
    for t in threads:
        t.join()
    assert errors == [] and reads > 0
    assert strict_json(target.read_text())["writer"] in (0, 1, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["same.json"]  # no temporary file left behind


def test_a_second_run_on_a_busy_output_is_refused_before_measuring(tmp_path):
    out = tmp_path / "same.json"
    with output_lock(out):
        result = invoke(*run_args(model_file(tmp_path), out, "-t", "e2e"))
        with pytest.raises(OutputBusyError, match=f"process {os.getpid()}"):
            with output_lock(out):
                pass
    assert_exit(result, 2, "Another dbprofile run", "another --out")
    assert "measured" not in result.output and not out.exists()
    assert not (tmp_path / "same.json.lock").exists()  # released and removed


def test_replacing_an_earlier_result_is_announced(tmp_path):
    out = tmp_path / "r.json"
    out.write_text(to_standard_json({"model": "other-model", "created": "2026-01-01T00:00:00+00:00"}))
    result = invoke(*run_args(model_file(tmp_path), out, "-t", "e2e"))
    assert_exit(result, 0, "replacing", "'other-model' from 2026-01-01")
    assert strict_json(out.read_text())["model"] == "toy"


# ---------------------------------------------------------------- 3. unwritable --out


def test_out_below_a_file_is_refused_before_measuring(tmp_path):
    (tmp_path / "some_file.json").write_text("{}")
    result = invoke(*run_args(model_file(tmp_path), tmp_path / "some_file.json" / "x.json", "-t", "e2e"))
    assert_exit(result, 2, "is a file, not a folder")
    assert "measured" not in result.output


def test_read_only_out_is_refused_before_measuring(tmp_path):
    out = tmp_path / "locked.json"
    out.write_text("{}")
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode == 0
    if not immutable:
        out.chmod(0o444)
        if os.access(out, os.W_OK):
            pytest.skip("cannot make a file unwritable here")
    try:
        result = invoke(*run_args(model_file(tmp_path), out, "-t", "e2e"))
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(out)], check=True)
    assert_exit(result, 2, "may not be changed")
    assert "measured" not in result.output
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_report_output_that_cannot_be_written_is_one_paragraph(tmp_path):
    result_file = tmp_path / "r.json"
    result_file.write_text(RunResult(model="m").to_json())
    (tmp_path / "file").write_text("")
    assert_exit(invoke("report", result_file, "-o", tmp_path / "file" / "r.html"), 2, "is a file, not a folder")
    assert_exit(invoke("report", result_file, "-o", result_file), 2, "overwrite its own result file")


# ---------------------------------------------------------------- 4. sys.exit and Ctrl-C in a model file


@pytest.mark.parametrize("code", ["0", "3", "None"])
def test_model_file_that_exits_at_import_is_an_error_not_success(tmp_path, code):
    result = invoke("run", model_file(tmp_path, pre=f"sys.exit({code})"), "--dry-run")
    assert_exit(result, 2, f"called sys.exit({code}) at line", '__name__ == "__main__"')


def test_model_that_exits_in_build_or_loss_is_an_error(tmp_path):
    assert_exit(
        invoke("run", model_file(tmp_path, build="sys.exit(5)"), "--dry-run"),
        2,
        "Building model 'toy' called sys.exit(5)",
    )
    assert_exit(invoke("run", model_file(tmp_path, loss="sys.exit(0)"), "--dry-run"), 2, "called sys.exit(0)")


def test_model_that_exits_only_in_a_measured_step_is_recorded_and_the_run_goes_on(tmp_path):
    out = tmp_path / "r.json"
    # The checks run at batch size 2; the exit comes at the first call at the measured batch size 8.
    result = invoke(*run_args(model_file(tmp_path, loss="if CALLS.count(8) == 1: sys.exit(7)"), out, "-t", "e2e,db:2"))
    assert_exit(result, 0)
    by_name = {m["technique"]: m for m in strict_json(out.read_text())["measurements"]}
    assert by_name["e2e"]["status"] == "error" and "sys.exit(7)" in by_name["e2e"]["error"]
    assert by_name["db:2"]["status"] == "ok"  # DiffusionBlocks computes its own loss


def test_ctrl_c_while_importing_a_model_file_exits_130(tmp_path):
    result = invoke("run", model_file(tmp_path, pre="raise KeyboardInterrupt"), "--dry-run")
    assert result.exit_code == 130, result.output
    assert "Interrupted while importing model file" in result.output and "at line" in result.output


# ---------------------------------------------------------------- 5. malformed result files


def valid_result() -> dict:
    m = Measurement(
        technique="e2e",
        batch_size=4,
        peak_bytes=100,
        shares={"parameters": 60, "activations": 40},
        timeline={"categories": ["parameters"], "phases": ["forward"], "points": [[0, 60]]},
    )
    return json.loads(RunResult(model="m", measurements=[m]).to_json())


def mutated(change) -> object:
    data = valid_result()
    return change(data) or data


MALFORMED = {
    "array": (lambda d: [1, 2], "the top level is an array"),
    "no model": (lambda d: d.pop("model") and None, "the field model is missing"),
    "peak lots": (
        lambda d: d["measurements"][0].update(peak_bytes="lots"),
        'measurements[0].peak_bytes should be an integer, but it is a string "lots"',
    ),
    "shares null": (lambda d: d["measurements"][0].update(shares=None), "measurements[0].shares should be an object"),
    "share negative": (
        lambda d: d["measurements"][0]["shares"].update(activations=-1),
        "measurements[0].shares.activations should be a byte count",
    ),
    "batch true": (
        lambda d: d["measurements"][0].update(batch_size=True),
        "measurements[0].batch_size should be an integer",
    ),
    "batch zero": (
        lambda d: d["measurements"][0].update(batch_size=0),
        "measurements[0].batch_size should be at least 1",
    ),
    "status": (lambda d: d["measurements"][0].update(status="great"), "measurements[0].status should be one of ok"),
    "measurements object": (lambda d: d.update(measurements={}), "measurements should be a list of objects"),
    "measurement string": (lambda d: d.update(measurements=["e2e"]), "measurements[0] should be an object"),
    "timeline point": (
        lambda d: d["measurements"][0]["timeline"]["points"].append([0]),
        "measurements[0].timeline.points[1] should be [phase index, then 1 byte counts]",
    ),
    "cuda figure": (
        lambda d: d["measurements"][0].update(cuda={"max_memory_allocated": "1GiB"}),
        "measurements[0].cuda.max_memory_allocated should be an integer or null",
    ),
    "parameters": (lambda d: d["model_info"].update(parameters="many"), "model_info.parameters should be an integer"),
    "schema": (lambda d: d.update(schema_version=99), "schema_version 99"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_result_files_name_the_wrong_field(tmp_path, case):
    change, message = MALFORMED[case]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(mutated(change)))
    with pytest.raises(ResultSchemaError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RunResult.load(path)
    for command in (["report", path], ["compare", path, "-o", tmp_path / "c.html"]):
        assert_exit(invoke(*command), 2, "is not a dbprofile result", message)


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage", b"[" * 100000 + b"]" * 100000, b"{'single': 1}"])
def test_result_files_that_are_not_json_are_one_paragraph(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    assert_exit(invoke("report", path), 2, "Result file")


def test_valid_result_still_loads():
    result = RunResult.from_dict(valid_result())
    assert result.measurements[0].peak_bytes == 100 and result.complete


# ---------------------------------------------------------------- 6. devices torch does not accept


@pytest.mark.parametrize(
    "device, message",
    [
        ("tpu", "torch does not accept it"),
        ("cuda:x", "torch does not accept it"),
        ("", "torch does not accept it"),
        ("meta", "not one dbprofile measures on"),
        ("mps", "not one dbprofile measures on"),
    ],
)
def test_unknown_devices_are_one_paragraph(device, message):
    for command in (["run", "vit-tiny", "--dry-run", "--device", device], ["validate", "--device", device]):
        assert_exit(invoke(*command), 2, message, "--device cpu")


# ---------------------------------------------------------------- 7. loss mistakes


@pytest.mark.parametrize(
    "loss, message",
    [
        ('return nn.functional.cross_entropy(m(b["inputs"]), b["targets"], reduction="none")', "not a scalar"),
        ('return nn.functional.cross_entropy(m(b["inputs"]), b["targets"]).detach()', "does not require grad"),
        ("return 3", "returned int 3, not a tensor"),
        ('return b["targets"].sum()', "a loss is floating point"),
    ],
)
def test_loss_mistakes_stop_before_any_technique_is_measured(tmp_path, loss, message):
    out = tmp_path / "r.json"
    result = invoke(*run_args(model_file(tmp_path, loss=loss), out, "-t", "e2e,db:2"))
    assert_exit(result, 2, "ModelSpec.loss of 'toy'", message)
    assert "measured" not in result.output and not out.exists()


# ---------------------------------------------------------------- 8. NaN stays out of the JSON


def test_a_nan_loss_writes_standard_json(tmp_path):
    out = tmp_path / "r.json"
    result = invoke(
        *run_args(model_file(tmp_path, loss='return m(b["inputs"]).sum() * float("nan")'), out, "-t", "e2e")
    )
    assert_exit(result, 3)  # answered, but the only technique failed (README: exit codes)
    m = strict_json(out.read_text())["measurements"][0]
    # warm-up and tracked step (a technique already NaN is not timed): every loss written as null
    assert m["status"] == "nan" and len(m["losses"]) >= 2 and all(v is None for v in m["losses"])
    assert RunResult.load(out).measurements[0].status == "nan"


def test_standard_json_turns_every_non_finite_float_into_null():
    text = to_standard_json({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}, "e": 2})
    assert strict_json(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}, "e": 2}


# ---------------------------------------------------------------- 9. everything checked before the first measurement


def test_layers_without_a_norm_take_the_hidden_width_from_the_traced_state(tmp_path):
    out = tmp_path / "r.json"
    result = invoke(*run_args(model_file(tmp_path), out, "-t", "e2e,ckpt,db:2"))
    assert_exit(result, 0, "hidden 8")
    assert [m["status"] for m in strict_json(out.read_text())["measurements"]] == ["ok", "ok", "ok"]


NOT_RESIDUAL = "nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 8)"


def test_non_residual_layers_refuse_db_before_measuring_but_allow_e2e_and_ckpt(tmp_path):
    model = model_file(tmp_path, layers=NOT_RESIDUAL)
    out = tmp_path / "r.json"
    refused = invoke(*run_args(model, out, "-t", "e2e,ckpt,db:2"))
    assert_exit(refused, 2, "Layer 0 of 'layers' in 'toy' maps shape [2, 5, 8] to [2, 5, 16]")
    assert "measured" not in refused.output and not out.exists()
    allowed = invoke(*run_args(model, out, "-t", "e2e,ckpt"))
    assert_exit(allowed, 0, "not shape-preserving")  # said as a note, and measured
    assert [m["status"] for m in strict_json(out.read_text())["measurements"]] == ["ok", "ok"]


def test_a_task_convention_db_needs_is_checked_before_e2e_is_measured(tmp_path):
    """A classifier whose hidden state has no token axis: DiffusionBlocks needs a CLS token.
    Found by stepping DiffusionBlocks on fake tensors before anything is measured."""
    model = model_file(tmp_path, tokens="[:, 0]", read="")
    out = tmp_path / "r.json"
    result = invoke(*run_args(model, out, "-t", "e2e,db:2"))
    assert_exit(result, 2, "DiffusionBlocks needs (N, tokens, d) with a CLS token")
    assert "measured" not in result.output and not out.exists()


# ---------------------------------------------------------------- 10. time limits


def test_time_limit_stops_a_python_loop_and_says_it_expired():
    with pytest.raises(TimeLimitExceeded, match="the loop took longer than 0.2 s"):
        with time_limit(0.2, "the loop") as limit:
            while True:
                pass
    assert limit.expired


def test_an_endless_build_stops_with_a_clear_error(tmp_path):
    result = invoke("run", model_file(tmp_path, build="while True: pass"), "--dry-run", "--timeout", "1")
    assert_exit(result, 2, "Loading and checking the model took longer than 1 s (--timeout)", "endless loop")


def test_a_hanging_step_is_recorded_as_timeout_and_the_run_moves_on(tmp_path):
    spec = load_spec(model_file(tmp_path, loss="while CALLS.count(8) == 1: time.sleep(0.01)"))
    out = tmp_path / "r.json"
    result = run(spec, ["e2e", "db:2"], 8, steps=1, out=out, time_limit_s=3)
    by_name = {m.technique: m for m in result.measurements}
    assert by_name["e2e"].status == "timeout" and "time limit of 3 s" in by_name["e2e"].error
    assert by_name["db:2"].status == "ok"
    assert strict_json(out.read_text())["complete"] is True


# ---------------------------------------------------------------- 11. Ctrl-C


def test_ctrl_c_exits_130_and_marks_the_result_incomplete(tmp_path):
    out = tmp_path / "r.json"
    # The first loss call at batch size 3 is e2e's warm-up there, after every technique at batch 8
    # finished (timing repeats steps adaptively, so calls are counted by batch size, not number).
    result = invoke(
        *run_args(
            model_file(tmp_path, loss="if CALLS.count(3) == 1: raise KeyboardInterrupt"),
            out,
            "-t",
            "e2e,ckpt,db:2",
            "-b",
            "8,3",
        )
    )
    assert result.exit_code == 130, result.output
    assert "marked incomplete" in result.output
    data = strict_json(out.read_text())
    assert data["complete"] is False
    assert data["incomplete_reason"] == (
        "interrupted (Ctrl-C) while measuring e2e at batch size 3; 3 of 6 "
        "measurements finished; not measured: e2e @ batch 3, ckpt @ batch 3, "
        "db:2 @ batch 3"
    )
    assert [m["technique"] for m in data["measurements"]] == ["e2e", "ckpt", "db:2"]

    html = tmp_path / "r.html"
    report = invoke("report", out, "-o", html)
    assert_exit(report, 0, "is an incomplete run (interrupted (Ctrl-C) while measuring e2e")
    page = html.read_text()
    assert "Incomplete run" in page and "interrupted (Ctrl-C) while measuring e2e" in page
    assert "Inconclusive" not in page


def test_a_result_saved_mid_run_says_it_is_not_complete(tmp_path):
    out = tmp_path / "r.json"
    seen = []
    run(
        load_spec(model_file(tmp_path)),
        ["e2e", "ckpt"],
        2,
        steps=1,
        out=out,
        on_measurement=lambda m: seen.append(strict_json(out.read_text())),
    )
    assert [(d["complete"], d["incomplete_reason"]) for d in seen] == [
        (False, "still running (or killed); 1 of 2 measurements finished; not measured: ckpt @ batch 2"),
        (False, "still running (or killed); 2 of 2 measurements finished"),
    ]
    assert strict_json(out.read_text())["complete"] is True


@pytest.mark.slow
def test_sigterm_to_a_real_run_exits_143_and_marks_the_result_incomplete(tmp_path):
    """The signal path end to end, in a real process (slow: it imports torch)."""
    out = tmp_path / "r.json"
    model = model_file(tmp_path, loss="if CALLS.count(8) == 4: time.sleep(600)")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbprofile", *run_args(model, out, "-t", "e2e,ckpt")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if "measured e2e" in line:
            break
    proc.terminate()
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143, output
    data = strict_json(out.read_text())
    assert data["complete"] is False and data["incomplete_reason"].startswith(
        "terminated (SIGTERM) while measuring ckpt"
    )


def test_spec_errors_that_slip_past_the_checks_are_that_techniques_error(tmp_path, monkeypatch):
    """The safety net: a SpecError raised while measuring one technique does not end the run."""
    import dbprofile.measure.runner as runner

    real = runner.measure

    def measure(spec, tech, *args, **kwargs):
        if tech.name == "ckpt":
            raise SpecError("something only a real ckpt step could see")
        return real(spec, tech, *args, **kwargs)

    monkeypatch.setattr(runner, "measure", measure)
    result = run(load_spec(model_file(tmp_path)), ["ckpt", "e2e"], 2, steps=1)
    assert [(m.technique, m.status) for m in result.measurements] == [("ckpt", "error"), ("e2e", "ok")]
    assert result.measurements[0].error == "ckpt: something only a real ckpt step could see"
    assert result.complete and not math.isnan(result.measurements[1].peak_bytes)


def test_a_closed_stdout_ends_quietly_with_141(monkeypatch):
    """`dbprofile models | head -1`: the reader went away; no 'Cannot use: Broken pipe' paragraph."""
    import click

    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(click, "echo", closed)
    result = invoke("models")
    assert result.exit_code == 141 and "Broken pipe" not in result.output


def test_plan_applies_the_same_model_checks(tmp_path):
    assert_exit(invoke("plan", model_file(tmp_path, loss="return 3"), "-t", "e2e"), 2, "returned int 3, not a tensor")
    assert_exit(invoke("plan", model_file(tmp_path, build="sys.exit(5)"), "-t", "e2e"), 2, "called sys.exit(5)")
    # Norm-less layers: the hidden width comes from the traced state, so db:2 plans.
    assert_exit(invoke("plan", model_file(tmp_path), "-t", "e2e,db:2", "-b", "2"), 0, "db:2")


def test_validate_writes_its_table_and_standard_json_atomically(tmp_path, monkeypatch):
    """The writing half of `dbprofile validate --out` (the measuring half needs a GPU or minutes)."""
    import dbprofile.validate as v

    row = v.ValidationRow(
        model="vit-tiny",
        batch_size=2,
        technique="e2e",
        precision="fp32",
        status="ok",
        tracked_peak_bytes=100,
        step_time_s=float("nan"),
    )
    monkeypatch.setattr(v, "validate", lambda *args, on_row=None, **kwargs: [row])
    out = tmp_path / "val.md"
    result = invoke(
        "validate", "--device", "cpu", "--cases", "vit-tiny:2", "-t", "e2e", "--precisions", "fp32", "-o", out
    )
    assert_exit(result, 0, f"written: {out}")
    assert "| vit-tiny | 2 | e2e | fp32 |" in out.read_text()
    rows = strict_json((tmp_path / "val.json").read_text())["rows"]
    assert rows[0]["tracked_peak_bytes"] == 100 and rows[0]["step_time_s"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.json", "val.md"]
