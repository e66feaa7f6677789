"""Issue 29, wrong answers and type mistakes from input that should have been refused: each is
one paragraph and exit 2 on the command line (a SpecError / ValueError naming the field from
Python) before any work; the Python API takes what the command line takes ('24GiB')."""

from __future__ import annotations

import math
import time

import pytest
import torch
from _cli import assert_refused, invoke
from torch import nn

import dbprofile
from dbprofile import ModelSpec, RunSettings, SpecError
from dbprofile.loading import load_model
from dbprofile.measure.device import resolve_device

TINY_GPT2 = ["--set", "n_layer=2", "--set", "n_embd=32", "--set", "n_head=2", "--set", "vocab_size=100"]


def test_technique_options_that_would_be_ignored_are_refused():
    assert_refused(invoke("run", "-t", "", "--dry-run"), "--techniques is empty")
    assert_refused(invoke("run", "-t", " , ", "--dry-run"), "--techniques is empty")
    assert_refused(invoke("run", "-t", "e2e", "--blocks", "2", "--dry-run"), "--blocks")
    assert_refused(invoke("plan", "gpt-tiny", "-t", ""), "No technique")


def test_repeated_values_are_measured_once(tmp_path):
    result = invoke("run", "vit-tiny", "-t", "e2e,e2e", "-b", "2,2,1,2", "--fake", "-o", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    measured = dbprofile.RunResult.load(tmp_path / "r.json").measurements
    assert [(m.technique, m.batch_size) for m in measured] == [("e2e", 2), ("e2e", 1)]


def test_block_parallel_never_plans_on_more_devices_than_the_world_size():
    assert_refused(invoke("plan", "gpt-tiny", "-b", "1", "-t", "e2e,db:4+parallel", "--world-size", "3"), "world size")
    assert_refused(invoke("plan", "gpt-tiny", "-b", "1", "-t", "db:2+parallel"), "--world-size")
    with pytest.raises(SpecError, match="on 4 devices"):
        dbprofile.plan("gpt-tiny", 1, device="cpu", techniques=["db:4+parallel"], world_size=2)


@pytest.mark.parametrize("option", ["--seq-len", "--image-size"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_shapes_below_one_are_refused_for_every_source(option, value):
    assert_refused(invoke("run", "hf:gpt2", *TINY_GPT2, option, value, "-t", "e2e", "--fake"), "at least 1")
    assert_refused(invoke("plan", "gpt-tiny", option, value, "-t", "e2e"))
    with pytest.raises(SpecError, match="at least 1"):
        load_model("hf:gpt2", {"n_layer": "2"}, seq_len=0)


@pytest.mark.parametrize("field", ["hidden_size", "num_classes"])
@pytest.mark.parametrize("value", [-4, 0, 2.5, True, "8"])
def test_model_spec_sizes_must_be_positive_integers(field, value):
    sizes = {"num_classes": 3, field: value}
    with pytest.raises(SpecError, match=field):
        ModelSpec(name="m", build=nn.Linear, batch=dict, loss=sum, layers="l", task="classification", **sizes)


@pytest.mark.parametrize("device", ["cpu:0", "cpu:1", "cpu:99"])
def test_an_indexed_cpu_is_refused_before_measuring(device):
    with pytest.raises(SpecError, match="one device"):
        resolve_device(device)
    assert_refused(invoke("run", "vit-tiny", "-t", "e2e", "--device", device, "--fake"), "--device cpu")


def test_the_api_refuses_what_is_not_a_model_or_a_technique_in_one_sentence():
    with pytest.raises(SpecError, match="got int 42"):
        dbprofile.run(42, ["e2e"], 2)
    with pytest.raises(SpecError, match="list of names"):
        dbprofile.run("vit-tiny", 42, 2, fake=True)
    with pytest.raises(SpecError, match="technique is a name"):
        dbprofile.run("vit-tiny", [None], 2, fake=True)
    with pytest.raises(SpecError, match="got float"):
        dbprofile.plan(3.5, 1)


def test_run_settings_take_sizes_as_the_cli_does_and_name_a_wrong_field():
    assert RunSettings(memory_limit="2GiB").memory_limit == 2 * 2**30
    assert RunSettings(memory_limit=0).memory_limit == 0
    assert RunSettings(device=torch.device("cpu")).device == "cpu"
    for field, value in [
        ("memory_limit", -1),
        ("memory_limit", math.nan),
        ("memory_limit", "lots"),
        ("steps", "5"),
        ("steps", True),
        ("fake", 1),
        ("time_limit_s", "3"),
        ("device", 0),
    ]:
        with pytest.raises(SpecError, match=field if field != "memory_limit" or value != "lots" else "size"):
            RunSettings(**{field: value})


def test_plan_and_judge_take_a_capacity_as_the_cli_does():
    plan = dbprofile.plan("gpt-tiny", 1, device="24GiB", techniques=["e2e"])
    assert plan.capacity_bytes == 24 * 2**30
    assert dbprofile.plan("gpt-tiny", 1, device="25GB", techniques=["e2e"]).capacity_bytes == 25 * 10**9
    again = dbprofile.judge(plan, capacity_bytes="1KiB")
    assert again.decision == dbprofile.judge(plan, capacity_bytes=1024).decision
    for capacity in [-1, 0, math.nan, math.inf, True, "x"]:
        with pytest.raises(ValueError, match="capacity_bytes|size"):
            dbprofile.judge(plan, capacity_bytes=capacity)
    with pytest.raises(ValueError, match="devices"):
        dbprofile.judge(plan, devices=0)


class _Sleepy(nn.Module):
    """Three residual layers whose every forward after the first few sleeps: the memory
    measurement finishes, the timed steps would not."""

    calls = 0

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        _Sleepy.calls += 1
        if _Sleepy.calls > 4:
            time.sleep(0.05)
        h = x
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h[:, 0])


def test_the_time_limit_bounds_the_cpu_timing_too():
    spec = ModelSpec(
        name="sleepy",
        build=_Sleepy,
        batch=lambda n, d: {"inputs": torch.randn(n, 5, 8), "targets": torch.zeros(n, dtype=torch.long)},
        loss=lambda m, b: nn.functional.cross_entropy(m(b["inputs"]), b["targets"]),
        layers="layers",
        task="classification",
        num_classes=3,
    )
    started = time.perf_counter()
    result = dbprofile.run(spec, ["e2e"], 2, steps=100_000, time_limit_s=2)
    assert time.perf_counter() - started < 15
    (m,) = result.measurements
    assert m.ok and m.peak_bytes > 0 and m.step_time_s is None  # the memory figures stand
    assert "time limit of 2 s" in m.extra["timing_error"]
    assert "no step time" in dbprofile.report.text.run_table(result)


def test_a_json_list_sets_a_tuple_field():
    from dbprofile.models.overrides import parse_value

    assert parse_value("depths", "[2, 2]", (2, 2, 6, 2)) == (2, 2)
    assert parse_value("sizes", "[[1, 2], [3]]", ((1,),)) == ((1, 2), (3,))
    with pytest.raises(SpecError, match="a list in JSON"):
        parse_value("depths", '{"a": 1}', (2, 2))


def test_swin_takes_its_depths_as_a_list_and_the_default_techniques_leave_db_out():
    """Swin's stages change width (not residual): e2e and ckpt apply, DiffusionBlocks does not."""
    args = ["--set", "depths=[2,2]", "--set", "num_heads=[2,2]", "--set", "embed_dim=16", "--set", "window_size=2"]
    result = invoke("run", "hf:swin", *args, "--image-size", "32", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert '"techniques": [\n  "e2e",\n  "ckpt"\n ]' in result.stdout
    assert "skipping db:2: Layer 0" in result.stderr


def test_more_api_arguments_of_the_wrong_kind_are_one_sentence():
    with pytest.raises(SpecError, match="list of names"):
        dbprofile.plan("gpt-tiny", 1, device="cpu", techniques=42)
    for device in (2.5e10, None, [80]):
        with pytest.raises(SpecError, match="GPU name"):
            dbprofile.plan("gpt-tiny", 1, device=device)
    with pytest.raises(TypeError, match="RunSettings"):
        dbprofile.run("gpt-tiny", ["e2e"], 2, {"fake": True})
    assert dbprofile.validate_spec("gpt-tiny")["num_layers"] >= 1


@pytest.mark.parametrize("option", ["--seq-len", "--image-size", "--batch-size"])
def test_an_empty_list_option_is_refused_not_read_as_the_default(option):
    assert_refused(invoke("run", "gpt-tiny", option, "", "-t", "e2e", "--dry-run"), "needs at least one value")
    assert_refused(invoke("run", "gpt-tiny", option, " , ", "-t", "e2e", "--dry-run"), "needs at least one value")
