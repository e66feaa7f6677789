"""Issue 29, tracebacks and misleading messages: a library's error while building a model from
its config is one paragraph; library loggers print no traceback; the fake-tensor pre-check
neither refuses a real run of a step it cannot trace nor misses a wrong input dtype; the hint
after a failed step fits the error; hf: paths say what is wrong with them."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _cli import assert_refused, invoke
from _toy import toy_spec
from click.testing import CliRunner
from torch import nn

from dbprofile import RunResult, SpecError
from dbprofile.cli import main
from dbprofile.loading import load_model, validate_spec

MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn
    from dbprofile import ModelSpec

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.embed(x)
            {FORWARD}
            for layer in self.layers:
                h = h + layer(h)
            return self.head(h[:, 0])

    def batch(n, device):
        return {{"inputs": {INPUTS}.to(device), "targets": torch.randint(0, 3, (n,)).to(device)}}

    def loss(m, b):
        return nn.functional.cross_entropy(m(b[{KEY}]), b["targets"])

    spec = ModelSpec(name="toy", build=Net, batch=batch, loss=loss, layers="layers",
                     task="classification", num_classes=3)
    """
)


def model_file(tmp_path, forward="pass", inputs="torch.randn(n, 5, 4)", key='"inputs"') -> str:
    path = tmp_path / "model.py"
    path.write_text(MODEL.format(FORWARD=forward, INPUTS=inputs, KEY=key))
    return str(path)


DATA_DEPENDENT = "if float(x.abs().max()) > 100: h = h * 0.5"


def test_a_step_fake_tensors_cannot_trace_runs_for_real_and_is_refused_only_where_faked(tmp_path):
    model = model_file(tmp_path, forward=DATA_DEPENDENT)
    out = tmp_path / "r.json"
    result = invoke("run", model, "-t", "e2e,ckpt", "-b", "2", "--steps", "1", "-o", out)
    assert result.exit_code == 0, result.output
    assert [m.status for m in RunResult.load(out).measurements] == ["ok", "ok"]
    assert_refused(
        invoke("run", model, "-t", "e2e", "--fake", "-o", out), "cannot run on fake tensors", "model.py:", "--fake"
    )
    assert_refused(invoke("plan", model, "-t", "e2e", "-b", "2"), "data-dependent")


@pytest.mark.parametrize("inputs", ["torch.randint(0, 3, (n, 5, 4))", "torch.randn(n, 5, 4, dtype=torch.float64)"])
def test_a_wrong_input_dtype_is_found_by_the_pre_check(tmp_path, inputs):
    result = invoke("run", model_file(tmp_path, inputs=inputs), "-t", "e2e", "-b", "2", "-o", tmp_path / "r.json")
    assert_refused(result, "same dtype", "model.py:")
    assert not (tmp_path / "r.json").exists()


def test_the_hint_after_a_failed_step_fits_the_error(tmp_path):
    shape_bug = invoke("run", model_file(tmp_path, forward="h = h[:, :, :5]"), "-t", "e2e", "--dry-run")
    assert_refused(shape_bug, "model.py:", "forward or loss")
    assert "ModelSpec.batch" not in shape_bug.output
    assert_refused(
        invoke("run", model_file(tmp_path, key='"pixels"'), "-t", "e2e", "--dry-run"), "key", "ModelSpec.batch"
    )
    bad_batch = invoke("run", model_file(tmp_path, inputs="torch.randn(n, -5)"), "-t", "e2e", "--dry-run")
    assert_refused(bad_batch, "ModelSpec.batch(2, 'cpu')")


def test_library_loggers_print_no_traceback(tmp_path):
    """torch's fake-tensor logger logs every failing op with its traceback before raising it."""
    model = model_file(tmp_path, forward="h = h[:, :, :5]")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "dbprofile", "run", model, "-t", "e2e", "--fake"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout and done.stderr.count("\n") == 1, done.stderr


TINY_GPT2 = {"n_layer": "2", "n_embd": "32", "n_head": "2", "vocab_size": "100"}
TINY_DECODER = {"num_hidden_layers": "2", "hidden_size": "32", "num_attention_heads": "2", "intermediate_size": "64"}


@pytest.mark.parametrize(
    "source, overrides, message",
    [
        ("hf:gpt2", {**TINY_GPT2, "n_embd": "1000000000"}, "overflowed"),
        ("hf:gpt2", {**TINY_GPT2, "attn_implementation": "flash_attention_2"}, "FlashAttention2"),
        ("hf:phi3", {**TINY_DECODER, "vocab_size": "500"}, "pad_token_id 32000"),
        ("hf:llama", {**TINY_DECODER, "vocab_size": "8", "pad_token_id": "9"}, "pad_token_id 9"),
    ],
)
def test_configs_transformers_cannot_build_are_one_paragraph(source, overrides, message):
    with pytest.raises(SpecError, match=message):
        load_model(source, overrides)
    args = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    assert_refused(invoke("run", source, *args, "-t", "e2e", "--dry-run"), message)


def test_an_image_classifier_with_several_heads_builds():
    spec = load_model("hf:deit", {**TINY_DECODER, "image_size": "32"})
    assert spec.task == "classification"


def test_hf_directories_say_what_they_lack(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_text("")
    assert_refused(invoke("run", "hf:empty", "--dry-run"), "without config.json", "empty")
    assert_refused(invoke("run", f"hf:{tmp_path / 'weights'}", "--dry-run"), "without config.json", "model.safetensors")
    assert_refused(invoke("run", "hf:./missing", "--dry-run"), "no such file or directory")


FLAT = textwrap.dedent(
    """
    import torch
    from torch import nn
    from dbprofile import ModelSpec

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return self.head(x)

    def batch(n, device):
        return {"inputs": torch.randn(n, 8).to(device), "targets": torch.randint(0, 3, (n,)).to(device)}

    def loss(m, b):
        return nn.functional.cross_entropy(m(b["inputs"]), b["targets"])

    spec = ModelSpec(name="flat", build=Net, batch=batch, loss=loss, layers="layers",
                     task="classification", num_classes=3)
    """
)


def test_default_techniques_measure_what_applies_and_the_verdict_says_why_db_does_not(tmp_path):
    """A classifier whose hidden state has no token axis: DiffusionBlocks needs a CLS token."""
    (tmp_path / "flat.py").write_text(FLAT)
    out = tmp_path / "r.json"
    result = invoke("run", tmp_path / "flat.py", "-b", "2", "--fake", "-o", out)
    assert result.exit_code == 0, result.output
    assert "skipping db:2: Task 'classification'" in result.output
    saved = RunResult.load(out)
    assert [m.technique for m in saved.measurements] == ["e2e", "ckpt"]
    assert "(N, tokens, d)" in saved.model_info["diffusion_blocks_not_applicable"]
    assert saved.verdict.decision == "not-worth-it" and saved.verdict.recommended == "e2e"
    assert "db-not-applicable" in [r.rule for r in saved.verdict.reasons]
    # Named, DiffusionBlocks is refused before anything is measured, as before.
    assert_refused(invoke("run", tmp_path / "flat.py", "-t", "e2e,db:2", "--fake", "-o", out), "(N, tokens, d)")
    assert_refused(invoke("run", tmp_path / "flat.py", "--blocks", "2", "--fake", "-o", out), "(N, tokens, d)")


def test_the_python_api_adapts_its_default_techniques_the_same_way(tmp_path):
    from dbprofile import load_spec, run

    (tmp_path / "flat.py").write_text(FLAT)
    spec = load_spec(str(tmp_path / "flat.py"))
    assert [m.technique for m in run(spec, batch_sizes=2, fake=True).measurements] == ["e2e", "ckpt"]
    with pytest.raises(SpecError, match="tokens"):
        run(spec, ["e2e", "db:2"], 2, fake=True)


def test_a_state_space_lm_says_why_db_cannot_run_in_the_concatenated_layout(tmp_path):
    args = ["--set", "num_hidden_layers=2", "--set", "hidden_size=16", "--set", "vocab_size=50", "--seq-len", "4"]
    out = tmp_path / "r.json"
    assert_refused(
        invoke("run", "hf:mamba", *args, "-t", "db:2", "--fake", "-o", out), "without attention", "interleaved"
    )
    result = invoke("run", "hf:mamba", *args, "-t", "e2e,db:2+interleaved", "-b", "1", "--fake", "-o", out)
    assert result.exit_code == 0, result.output
    assert [m.status for m in RunResult.load(out).measurements] == ["ok", "ok"]


def test_plan_adapts_its_default_techniques_the_same_way(tmp_path):
    (tmp_path / "flat.py").write_text(FLAT)
    result = CliRunner().invoke(main, ["plan", str(tmp_path / "flat.py"), "-b", "2", "--gpu", "L4", "--json"])
    assert result.exit_code == 0, result.output
    assert "skipping DiffusionBlocks: Task 'classification'" in result.stderr
    planned = json.loads(result.stdout)
    assert [e["technique"] for e in planned["entries"]] == ["e2e", "ckpt", "sac", "offload"]
    assert "(N, tokens, d)" in planned["model_info"]["diffusion_blocks_not_applicable"]
    assert_refused(invoke("plan", tmp_path / "flat.py", "-b", "2", "-t", "e2e,db:2"), "(N, tokens, d)")
    # A shallow model: the default db:3 and db:4 are left out, not refused (named, they are).
    shallow = CliRunner().invoke(main, ["plan", model_file(tmp_path), "-b", "2", "--gpu", "L4"])
    assert shallow.exit_code == 0 and "db:2" in shallow.output and "db:3" not in shallow.output, shallow.output
    assert_refused(invoke("plan", model_file(tmp_path), "-b", "2", "-t", "db:3"), "B=3")


def test_a_model_that_converts_its_own_modules_while_built_is_refused_with_the_reason():
    """PyTorch cannot .to() a module of fake tensors (it swaps the parameters, and the fake mode holds
    weak references to them): such a build is refused with what to change, not PyTorch's words alone."""
    spec = toy_spec()
    plain = spec.build

    def build():
        model = plain()
        model.head = nn.Linear(32, 10).to(dtype=torch.float32)  # as transformers' Inkling does
        return model

    with pytest.raises(SpecError, match="converts its own modules with .to"):
        validate_spec(dataclasses.replace(spec, build=build))
