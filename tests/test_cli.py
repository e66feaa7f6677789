"""The CLI's contract: every bad input is one paragraph on stderr with exit code 2, no traceback."""

from __future__ import annotations

import textwrap

from click.testing import CliRunner

from dbprofile import __version__
from dbprofile.cli import main

GOOD_MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn
    from dbprofile import ModelSpec

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.layers = nn.ModuleList([LAYER for _ in range(3)])
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.embed(x)
            for layer in self.layers:
                h = layer(h)
            return self.head(h[:, 0])

    def batch(n, device):
        g = torch.Generator().manual_seed(0)
        return {"inputs": torch.randn(n, 5, 4, generator=g).to(device),
                "targets": torch.randint(0, 3, (n,), generator=g).to(device)}

    spec = ModelSpec(name="toy", build=Net, batch=batch,
                     loss=lambda m, b: nn.functional.cross_entropy(m(b["inputs"]), b["targets"]),
                     layers=LAYERS_PATH, task="classification", num_classes=3)
    """
)


def write_model(tmp_path, layer="nn.Linear(8, 8)", layers_path="'layers'", name="model.py", text=None):
    path = tmp_path / name
    path.write_text(
        text if text is not None else GOOD_MODEL.replace("LAYERS_PATH", layers_path).replace("LAYER", layer)
    )
    return str(path)


def invoke(*args):
    result = CliRunner().invoke(main, list(args))
    return result


def assert_user_error(result, *fragments):
    output = result.output + (result.stderr if hasattr(result, "stderr") else "")
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in output, output


def test_version_prints_package_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert __version__ in result.output


def test_missing_model_file_is_a_clear_error(tmp_path):
    assert_user_error(invoke("run", str(tmp_path / "nope.py"), "--dry-run"), "does not exist")


def test_syntax_error_names_file_and_line(tmp_path):
    path = write_model(tmp_path, text="x = 1\ndef broken(:\n    pass\n")
    assert_user_error(invoke("run", path, "--dry-run"), "syntax error at line 2", "model.py")


def test_import_error_names_file_and_line(tmp_path):
    path = write_model(tmp_path, text="import os\nimport not_a_real_module_xyz\n")
    assert_user_error(invoke("run", path, "--dry-run"), "line 2", "not_a_real_module_xyz")


def test_file_without_spec_says_what_to_define(tmp_path):
    path = write_model(tmp_path, text="x = 1\n")
    assert_user_error(invoke("run", path, "--dry-run"), "defines no 'spec'")


def test_unknown_preset_suggests_close_names():
    assert_user_error(invoke("run", "vit-tinyy", "--dry-run"), "Unknown model", "vit-tiny")


def test_layers_path_missing(tmp_path):
    path = write_model(tmp_path, layers_path="'blocks'")
    assert_user_error(invoke("run", path, "--dry-run"), "'blocks' not found", "layers")


def test_layers_path_not_a_modulelist(tmp_path):
    path = write_model(tmp_path, layers_path="'head'")
    assert_user_error(invoke("run", path, "--dry-run"), "not an nn.ModuleList")


def test_layers_that_change_shape_are_not_residual(tmp_path):
    text = GOOD_MODEL.replace("LAYERS_PATH", "'layers'").replace("LAYER", "nn.Linear(8, 8)")
    text = text.replace(
        "self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])",
        "self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 8)])",
    )
    path = write_model(tmp_path, text=text)
    assert_user_error(invoke("run", path, "-t", "e2e,db:2", "--dry-run"), "not shape-preserving", "Layer 1")
    # The default techniques leave DiffusionBlocks out, with the reason, and check the rest (issue 29).
    default = invoke("run", path, "--dry-run")
    assert default.exit_code == 0 and "skipping db:2, db:3: Layer 1" in default.output, default.output


def test_unknown_technique_lists_the_valid_ones(tmp_path):
    path = write_model(tmp_path)
    assert_user_error(invoke("run", path, "--techniques", "e2e,dp:2", "--dry-run"), "Unknown technique 'dp:2'", "db:B")


def test_blocks_beyond_layer_count(tmp_path):
    path = write_model(tmp_path)
    assert_user_error(invoke("run", path, "--techniques", "db:4", "--dry-run"), "B=4", "3 layers")


def test_batch_size_below_one():
    assert_user_error(invoke("run", "--batch-size", "0", "--dry-run"), "--batch-size must be at least 1")


def test_dry_run_reports_layers_parameters_and_techniques(tmp_path):
    path = write_model(tmp_path)
    result = invoke("run", path, "--dry-run")
    assert result.exit_code == 0, result.output
    # embed 4*8+8, three 8x8 layers with bias, head 8*3+3
    assert "3 residual layers at 'layers'" in result.output
    assert f"{40 + 3 * 72 + 27:,} parameters" in result.output
    assert "e2e, ckpt, db:2, db:3" in result.output


def test_fsdp_without_a_process_group_says_how_to_launch(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    assert_user_error(invoke("run", "--fsdp", "-t", "e2e"), "torchrun --nproc-per-node", "--nproc 2")


def test_parallel_suffix_only_applies_to_plain_diffusion_blocks():
    assert_user_error(invoke("run", "-t", "ckpt+parallel", "--nproc", "2"), "'+parallel'")


def test_plan_json_carries_flops_per_sample_and_from_checkpoint_changes_the_decision():
    import json

    args = ["plan", "vit-tiny", "-b", "16", "--gpu", "cpu", "-t", "e2e,db:2"]
    scratch = CliRunner().invoke(main, args + ["--json"])
    kept = CliRunner().invoke(main, args + ["--json", "--from-checkpoint"])
    assert scratch.exit_code == kept.exit_code == 0, scratch.output
    scratch_plan, kept_plan = json.loads(scratch.stdout), json.loads(kept.stdout)
    assert all(e["flops_per_sample"] > 0 for e in scratch_plan["entries"])
    assert kept_plan["from_checkpoint"] is True and scratch_plan["from_checkpoint"] is False
    assert kept_plan["verdict"]["decision"] == "not-worth-it"
    assert any(r["rule"] == "from-checkpoint" for r in kept_plan["verdict"]["reasons"])
    assert "Verdict" in scratch.stderr  # the table goes to stderr with --json
