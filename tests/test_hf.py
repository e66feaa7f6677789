"""hf: and diffusers: model sources, built offline from configs (tiny ones, so every test runs
in seconds): parameter counts against transformers' own, config resolution and --set errors,
fake bytes equal to real bytes, and the hand-off of rotary tables and masks to DiffusionBlocks'
active layers (sequence_layout + hf_position_adapter)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")

from dbprofile.cli import main  # noqa: E402
from dbprofile.loading import load_model, validate_spec  # noqa: E402
from dbprofile.measure.runner import measure, run  # noqa: E402
from dbprofile.methods.diffusion_blocks.blockwise import BlockwiseModel  # noqa: E402
from dbprofile.models.common import build_on_meta, count_parameters  # noqa: E402
from dbprofile.models.hf import hf_position_adapter  # noqa: E402
from dbprofile.sequence_layout import SequenceLayout  # noqa: E402
from dbprofile.spec import SpecError  # noqa: E402

TINY_LLAMA = {
    "num_hidden_layers": "2",
    "hidden_size": "32",
    "intermediate_size": "64",
    "num_attention_heads": "4",
    "num_key_value_heads": "2",
    "vocab_size": "100",
}
TINY_GPT2 = {"n_layer": "2", "n_embd": "32", "n_head": "4", "vocab_size": "100"}
TINY_VIT = {
    "num_hidden_layers": "2",
    "hidden_size": "32",
    "num_attention_heads": "4",
    "intermediate_size": "64",
    "image_size": "16",
    "patch_size": "8",
}


@pytest.mark.parametrize(
    "source, overrides, published",
    [
        ("hf:gpt2", {}, 124_439_808),
        ("hf:llama", {}, 6_738_415_616),  # transformers' LlamaConfig defaults are Llama-2-7B's shape
        ("hf:vit", {"num_labels": "1000"}, 86_567_656),  # ViT-B/16, 1000 classes
    ],
)
def test_meta_parameter_counts_equal_transformers(source, overrides, published):
    spec = load_model(source, overrides)
    assert count_parameters(build_on_meta(spec.build)) == published


def test_architecture_decides_task_layers_and_shapes():
    llama = load_model("hf:llama", TINY_LLAMA, seq_len=16)
    assert (llama.task, llama.layers, llama.hidden_size, llama.num_classes) == (
        "causal-lm",
        "model.model.layers",
        32,
        100,
    )
    assert llama.batch(3, "cpu")["inputs"].shape == (3, 16)
    gpt2 = load_model("hf:gpt2", TINY_GPT2)
    assert gpt2.layers == "model.transformer.h" and gpt2.extra["sequence_length"] == 1024  # n_positions
    vit = load_model("hf:vit", TINY_VIT)
    assert (vit.task, vit.layers, vit.num_classes) == ("classification", "model.vit.layers", 2)
    assert vit.batch(2, "cpu")["inputs"].shape == (2, 3, 16, 16)
    assert load_model("hf:vit", TINY_VIT, image_size=32).batch(1, "cpu")["inputs"].shape[-1] == 32


def test_set_values_are_typed_by_the_config_and_derived_fields_follow():
    spec = load_model("hf:llama", TINY_LLAMA)
    model = build_on_meta(spec.build)
    attn = model.model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 32)  # head_dim follows hidden_size/heads = 8, not the default 128
    with pytest.raises(SpecError, match="num_hidden_layers takes an integer"):
        load_model("hf:llama", {"num_hidden_layers": "four"})
    with pytest.raises(SpecError, match="has no field 'num_hidden_layer'.*Did you mean num_hidden_layers"):
        load_model("hf:llama", {"num_hidden_layer": "4"})
    with pytest.raises(SpecError, match="tie_word_embeddings takes true or false"):
        load_model("hf:llama", {"tie_word_embeddings": "maybe"})


def test_config_resolution_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = transformers.AutoConfig.for_model("gpt2", n_layer=3, n_embd=32, n_head=4)
    config.save_pretrained(tmp_path)
    from_dir = load_model(f"hf:{tmp_path}")
    assert count_parameters(build_on_meta(from_dir.build)) == count_parameters(
        transformers.AutoModelForCausalLM.from_config(config)
    )
    assert load_model(f"hf:{tmp_path / 'config.json'}").layers == "model.transformer.h"
    with pytest.raises(SpecError, match="Close model types: llama"):
        load_model("hf:lama")
    with pytest.raises(SpecError, match="huggingface-cli download someone/not-cached config.json"):
        load_model("hf:someone/not-cached")
    (tmp_path / "bert").mkdir()
    transformers.AutoConfig.for_model("bert", num_hidden_layers=2).save_pretrained(tmp_path / "bert")
    # transformers also has a causal LM for BERT (BertLMHeadModel); dbprofile builds what BERT is, a masked LM
    assert load_model(f"hf:{tmp_path / 'bert'}").task == "masked-diffusion-lm"
    with pytest.raises(SpecError, match="neither as a causal LM .* nor as an image classifier"):
        load_model("hf:t5")


def test_transformers_missing_is_one_paragraph(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    result = CliRunner().invoke(main, ["run", "hf:gpt2", "--dry-run"])
    assert result.exit_code == 2 and "pip install 'dbprofile[hf]'" in result.output
    assert "Traceback" not in result.output


def test_cli_errors_for_hf_names_and_keys():
    for args, fragment in (
        (["hf:gpt-2"], "Close model types: gpt2"),
        (["hf:gpt2", "--set", "nosuch=1"], "has no field 'nosuch'"),
        (["hf:gpt2", "--set", "n_layer=1.5"], "n_layer takes an integer"),
        (["hf:gpt2", "--seq-len", "2048"], "n_positions=1024"),
        (["hf:vit", "--seq-len", "64"], "--seq-len applies to language models"),
    ):
        result = CliRunner().invoke(main, ["run", *args, "--dry-run"])
        assert result.exit_code == 2, result.output
        assert fragment in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("source, overrides", [("hf:llama", TINY_LLAMA), ("hf:gpt2", TINY_GPT2)])
def test_causal_lms_measure_every_technique_and_fake_bytes_equal_real(source, overrides):
    spec = load_model(source, overrides, seq_len=16)
    techniques = ["e2e", "ckpt", "db:2", "db:2+ckpt"]
    real = run(spec, techniques, [2], steps=1)
    fake = run(spec, techniques, [2], steps=1, fake=True)
    for r, f in zip(real.measurements, fake.measurements, strict=True):
        assert r.ok and f.ok, (r.technique, r.error, f.error)
        assert (r.peak_bytes, r.shares) == (f.peak_bytes, f.shares), r.technique
    # GPT-2 ties its LM head to the token embedding under fake tensors too (one parameter).
    assert real.get("e2e").num_parameters == fake.get("e2e").num_parameters


def test_vit_builds_under_fake_tensors_and_runs_db():
    spec = load_model("hf:vit", TINY_VIT)
    assert validate_spec(spec)["num_layers"] == 2  # trunc_normal_ init is skipped under fake tensors
    result = run(spec, ["e2e", "db:2"], [2], steps=1, fake=True)
    assert all(m.ok for m in result.measurements), [m.error for m in result.measurements]


def _capture_layer_calls(model):
    calls = []
    for layer in model.model.model.layers:
        layer.register_forward_pre_hook(lambda _m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    return calls


def test_llama_layers_get_rotary_tables_at_the_layout_positions_under_db():
    spec = load_model("hf:llama", TINY_LLAMA, seq_len=6)
    for layout, positions in (
        ("concatenated", torch.arange(6).repeat(2)[None]),
        ("interleaved", SequenceLayout.interleaved(6, "cpu").positions[None]),
    ):
        model = spec.build()
        calls = _capture_layer_calls(model)
        blockwise = BlockwiseModel(spec, model, 2, lm_layout=layout)
        batch = spec.batch(2, "cpu")
        blockwise.loss(batch, block=0, generator=torch.Generator().manual_seed(0))
        ((args, kwargs),) = calls  # block 0 runs one layer only
        assert args[0].shape == (2, 12, 32)  # 2T tokens
        cos, sin = kwargs["position_embeddings"]
        expected_cos, expected_sin = model.model.model.rotary_emb(args[0], positions)
        assert cos.shape == (1, 12, 8) and torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)
        assert torch.equal(kwargs["position_ids"], positions)
        if layout == "interleaved":
            assert kwargs["attention_mask"] is None  # plain causal over 2T: SDPA keeps is_causal
        else:
            assert kwargs["attention_mask"] is not None  # the modified causal mask of the paper's layout


def _concatenated_layout(t: int) -> SequenceLayout:
    """[c_0..c_{T-1}, n_0..n_{T-1}]: clean tokens causal; noisy n_i sees c_0..c_i and itself."""
    s = 2 * t
    allowed = torch.zeros(s, s, dtype=torch.bool)
    allowed[:t, :t] = torch.ones(t, t, dtype=torch.bool).tril()
    allowed[t:, :t] = torch.ones(t, t, dtype=torch.bool).tril()
    allowed[t:, t:] = torch.eye(t, dtype=torch.bool)
    return SequenceLayout(tokens=t, positions=torch.arange(t).repeat(2), allowed=allowed)


def test_adapter_masks_agree_between_sdpa_and_eager_and_do_not_leak():
    """A layout with its own mask (the concatenated one) reaches SDPA as a boolean mask and
    eager attention as an additive one; both give the same layer output, and a noisy token
    never sees a later clean token."""
    t = 5
    layout = _concatenated_layout(t)
    outputs = {}
    for implementation in ("sdpa", "eager"):
        spec = load_model("hf:llama", {**TINY_LLAMA, "attn_implementation": implementation}, seq_len=t)
        model = spec.build().eval()
        calls = _capture_layer_calls(model)
        model(spec.batch(1, "cpu")["inputs"])
        args, kwargs = calls[0]
        hidden = torch.randn(1, 2 * t, 32, generator=torch.Generator().manual_seed(1))
        rewrite = hf_position_adapter(model, layout)
        layer = model.model.model.layers[0]
        new_args, new_kwargs = rewrite(layer, (hidden, *args[1:]), kwargs)
        mask = new_kwargs["attention_mask"]
        assert mask.dtype == (torch.bool if implementation == "sdpa" else torch.float32)
        outputs[implementation] = layer(*new_args, **new_kwargs)
        # Changing the last clean token must not move any noisy token but the last one.
        changed = hidden.clone()
        changed[0, t - 1] += 1.0
        moved = layer(changed, *new_args[1:], **new_kwargs)
        assert torch.allclose(moved[0, t : 2 * t - 1], outputs[implementation][0, t : 2 * t - 1])
        assert not torch.allclose(moved[0, 2 * t - 1], outputs[implementation][0, 2 * t - 1])
    assert torch.allclose(outputs["sdpa"], outputs["eager"], atol=1e-5)


def test_diffusers_dit_runs_every_technique_from_its_config(tmp_path):
    pytest.importorskip("diffusers")
    overrides = {"num_layers": "2", "num_attention_heads": "2", "attention_head_dim": "16", "num_embeds_ada_norm": "10"}
    spec = load_model("diffusers:DiT", overrides, image_size=8)
    assert (spec.task, spec.layers, spec.hidden_size) == ("denoising", "model.transformer_blocks", 32)
    result = run(spec, ["e2e", "ckpt", "db:2", "db:2+ckpt"], [2], steps=1, fake=True)
    assert all(m.ok for m in result.measurements), [m.error for m in result.measurements]
    # The same model from a local diffusers config.json, through hf: as well.
    import diffusers

    config = dict(diffusers.DiTTransformer2DModel(**{k: int(v) for k, v in overrides.items()}, sample_size=8).config)
    config["_class_name"] = "DiTTransformer2DModel"
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if not k.startswith("_use")}))
    assert count_parameters(build_on_meta(load_model(f"hf:{tmp_path}").build)) == count_parameters(
        build_on_meta(spec.build)
    )
    with pytest.raises(SpecError, match="has no field 'depth'"):
        load_model("diffusers:DiT", {"depth": "2"})


TINY_GEMMA3 = {
    "num_hidden_layers": "4",
    "hidden_size": "64",
    "intermediate_size": "128",
    "num_attention_heads": "4",
    "num_key_value_heads": "2",
    "head_dim": "16",
    "vocab_size": "500",
    "layer_types": '["sliding_attention", "full_attention", "sliding_attention", "full_attention"]',
}


def test_per_layer_type_rotary_tables_reach_each_layer_as_its_own_type():
    """Gemma 3 makes one rotary table per layer type (sliding layers on one base, full ones on
    another): DiffusionBlocks' active layers each get their own type's table for the doubled
    sequence, and db:2 measures with fake bytes equal to real."""
    spec = load_model("hf:gemma3_text", TINY_GEMMA3, seq_len=8)
    model = spec.build().eval()
    types = model.model.config.layer_types
    assert types == ["sliding_attention", "full_attention"] * 2
    layout = _concatenated_layout(8)
    rewrite = hf_position_adapter(model, layout)
    rotary = model.model.model.rotary_emb
    hidden = torch.randn(1, 16, 64)
    calls = _capture_layer_calls(model)
    model(spec.batch(1, "cpu")["inputs"])
    for index in (1, 2):  # as block 1 of 2 would run them: the full layer first, then a sliding one
        layer = model.model.model.layers[index]
        args, kwargs = calls[0]  # the model handed layer 0's (sliding) table to the first active layer
        _, new_kwargs = rewrite(layer, (hidden, *args[1:]), kwargs)
        want = rotary(hidden, layout.positions[None], types[index])
        assert all(torch.equal(a, b) for a, b in zip(new_kwargs["position_embeddings"], want, strict=True))
    sliding, full = (
        rotary(hidden, layout.positions[None], kind)[0] for kind in ("sliding_attention", "full_attention")
    )
    assert not torch.equal(sliding, full)  # the two bases differ, so the test can tell them apart
    real = measure(spec, "db:2", 2, steps=1, timed=False, count_activations=False)
    fake = measure(spec, "db:2", 2, steps=1, fake=True, count_activations=False)
    assert real.ok and fake.ok, (real.error, fake.error)
    assert (real.peak_bytes, real.shares) == (fake.peak_bytes, fake.shares)
