"""Model sources and shapes that need no ecosystem package: nn.Sequential layer stacks, layers
called with extra arguments, the refusal of DiffusionBlocks for per-position tensors it cannot
rebuild, --seq-len / --image-size on presets and spec files, and sweeps drawn in the report."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from dbprofile.cli import main
from dbprofile.loading import load_model, load_sweep, validate_spec
from dbprofile.measure.runner import run
from dbprofile.sequence_layout import SequenceLayout
from dbprofile.spec import ModelSpec, SpecError

TECHNIQUES = ["e2e", "ckpt", "db:2", "db:2+ckpt"]


class SequentialNet(nn.Module):
    """A timm-style classifier: its layers are an nn.Sequential the forward calls once."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.blocks = nn.Sequential(*(Residual(16) for _ in range(4)))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x))[:, 0])


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None, *, output_attentions: bool = False):
        out = x + self.fc(self.norm(x)) * (1.0 if scale is None else scale)
        # Hugging Face style: a tuple (hidden, attentions or None)
        return (out, None) if output_attentions else out


def _classifier_spec(model_cls, name: str) -> ModelSpec:
    def batch(n, device):
        gen = torch.Generator().manual_seed(0)
        return {
            "inputs": torch.randn(n, 3, 6, generator=gen).to(device),
            "targets": torch.randint(0, 5, (n,), generator=gen).to(device),
        }

    return ModelSpec(
        name=name,
        build=model_cls,
        batch=batch,
        loss=lambda m, b: F.cross_entropy(m(b["inputs"]), b["targets"]),
        layers="blocks",
        task="classification",
        num_classes=5,
        hidden_size=16,
    )


class KwargsNet(nn.Module):
    """Layers called with extra positional and keyword arguments, returning tuples."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.blocks = nn.ModuleList(Residual(16) for _ in range(4))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        scale = torch.full((1,), 0.5, device=x.device)
        for block in self.blocks:
            h = block(h, scale, output_attentions=True)[0]
        return self.head(h[:, 0])


@pytest.mark.parametrize("model_cls", [SequentialNet, KwargsNet])
def test_sequential_stacks_and_layers_with_extra_arguments_run_every_technique(model_cls):
    spec = _classifier_spec(model_cls, model_cls.__name__)
    assert validate_spec(spec)["num_layers"] == 4
    real = run(spec, TECHNIQUES, [2], steps=1)
    fake = run(spec, TECHNIQUES, [2], steps=1, fake=True)
    for r, f in zip(real.measurements, fake.measurements, strict=True):
        assert r.ok and f.ok, (r.technique, r.error, f.error)
        assert (r.peak_bytes, r.shares) == (f.peak_bytes, f.shares)  # fake agrees with real to the byte
    # DiffusionBlocks ran one block: half the layers' activations of the same AdaLN model at full depth
    db = real.get("db:2")
    assert db.extra_parameters > 0 and db.peak_block in (0, 1)


class TableLM(nn.Module):
    """A causal LM that computes a per-position table outside its layers and passes it in, as
    HF Llama does with rotary tables, but with no position adapter in its spec."""

    def __init__(self, vocab: int = 50, width: int = 16, tokens: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.table = nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.blocks = nn.ModuleList(TableLayer(width) for _ in range(2))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        table = self.table[None, : tokens.shape[1]]
        for block in self.blocks:
            h = block(h, table=table)
        return self.head(h)


class TableLayer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.norm(x + table[:, : x.shape[1]]))


def _table_spec() -> ModelSpec:
    def batch(n, device):
        tokens = torch.randint(0, 50, (n, 9), generator=torch.Generator().manual_seed(0))
        return {"inputs": tokens[:, :-1].to(device), "targets": tokens[:, 1:].to(device)}

    return ModelSpec(
        name="table-lm",
        build=TableLM,
        batch=batch,
        loss=lambda m, b: F.cross_entropy(m(b["inputs"]).flatten(0, 1), b["targets"].flatten()),
        layers="blocks",
        task="causal-lm",
        num_classes=50,
        hidden_size=16,
    )


def test_per_position_tensors_without_an_adapter_refuse_db_but_e2e_and_ckpt_run():
    # Named, DiffusionBlocks is refused before anything is measured; by default it is left out,
    # e2e and ckpt are measured and the verdict says why (issue 29).
    with pytest.raises(SpecError) as refused:
        run(_table_spec(), ["e2e", "ckpt", "db:2"], [2], steps=1, fake=True)
    message = str(refused.value)
    assert "cannot run 'table-lm' faithfully" in message
    assert "table [1, 8, 16]" in message and "16 tokens" in message and "position_adapter" in message
    result = run(_table_spec(), batch_sizes=[2], steps=1, fake=True)
    assert [(m.technique, m.ok) for m in result.measurements] == [("e2e", True), ("ckpt", True)]
    assert "position_adapter" in result.model_info["diffusion_blocks_not_applicable"]


def test_interleaved_layout_puts_clean_and_noisy_token_at_the_same_position():
    layout = SequenceLayout.interleaved(3, "cpu")
    assert layout.positions.tolist() == [0, 0, 1, 1, 2, 2]
    assert layout.length == 6 and layout.allowed is None
    assert torch.equal(layout.allowed_matrix(), torch.ones(6, 6, dtype=torch.bool).tril())


def test_seq_len_and_image_size_reshape_presets():
    assert load_model("gpt-tiny", seq_len=32).extra["sequence_length"] == 32
    assert load_model("vit-tiny", image_size=16).extra["image_size"] == 16
    assert load_model("dit-tiny", image_size=16).extra["latent_size"] == 16
    with pytest.raises(SpecError, match="--seq-len does not apply to 'vit-tiny'.*allows --image-size"):
        load_model("vit-tiny", seq_len=32)
    with pytest.raises(SpecError, match="--set changes the config of hf:"):
        load_model("gpt-tiny", {"num_layers": "2"})
    swept, specs = load_sweep("gpt-tiny", None, [16, 32], None)
    assert swept == "seq_len" and [s.extra["sequence_length"] for s in specs] == [16, 32]
    with pytest.raises(SpecError, match="Sweep one shape at a time"):
        load_sweep("vit-tiny", None, [16, 32], [8, 16])


def test_a_spec_without_declared_shapes_refuses_seq_len(tmp_path):
    path = tmp_path / "model.py"
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    path.write_text(f"import sys; sys.path.insert(0, {tests_dir!r})\nfrom _toy import toy_spec\nspec = toy_spec()\n")
    with pytest.raises(SpecError, match="declares which shapes may change.*allows neither"):
        load_model(str(path), seq_len=16)
    with pytest.raises(SpecError, match="ModelSpec.shapes names 'length'"):
        ModelSpec(
            name="x",
            build=nn.Module,
            batch=lambda n, d: {},
            loss=lambda m, b: 0,
            layers="a",
            task="denoising",
            shapes={"length": lambda n: None},
        )


def test_seq_len_sweep_writes_one_run_per_value_and_a_peak_against_length_chart(tmp_path):
    out = tmp_path / "gpt.json"
    result = CliRunner().invoke(
        main,
        [
            "run",
            "gpt-tiny",
            "--seq-len",
            "16,32",
            "-t",
            "e2e,db:2",
            "-b",
            "2",
            "--fake",
            "--steps",
            "1",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    peaks = {}
    for n in (16, 32):
        data = json.loads((tmp_path / f"gpt-seq_len-{n}.json").read_text())
        assert data["model_info"]["sequence_length"] == n
        peaks[n] = {m["technique"]: m["peak_bytes"] for m in data["measurements"]}
    assert peaks[32]["e2e"] > peaks[16]["e2e"] and peaks[32]["db:2"] > peaks[16]["db:2"]
    page = (tmp_path / "gpt-seq_len-sweep.html").read_text()
    assert "Peak against sequence length" in page and "sequence length (tokens)" in page
    sweep = page[page.index('id="sweep"') : page.index('id="peaks"')]
    assert sweep.count("<svg") == 1 and "db:2" in sweep and "e2e" in sweep  # one line per technique, labelled


def test_bad_shape_options_are_one_paragraph_errors():
    for args, fragment in (
        (["--seq-len", "abc"], "--seq-len takes comma-separated integers"),
        (["--seq-len", "0"], "--seq-len must be at least 1"),
        (["--set", "oops"], "--set takes KEY=VALUE"),
    ):
        result = CliRunner().invoke(main, ["run", "gpt-tiny", "--dry-run", *args])
        assert result.exit_code == 2, result.output
        assert fragment in result.output and "Traceback" not in result.output
