"""The built-in model families and presets: published sizes, real training steps of the tiny
presets, the block contract DiffusionBlocks relies on, causality and RoPE at any length,
meta-device counting, preset-name errors, and the example model files."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dbprofile.loading import load_spec, validate_spec
from dbprofile.models import DEFAULT_PRESET, PRESETS, DiTConfig, GPTConfig, ViTConfig, get_preset, preset_table
from dbprofile.models import dit as dit_module
from dbprofile.models.common import RotaryCache, apply_rotary, build_on_meta, count_parameters
from dbprofile.models.registry import preset_shape
from dbprofile.spec import SpecError, get_layers

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["vit-tiny", "vit-cifar", "dit-tiny", "gpt-tiny", "llama-tiny", "md4-tiny"]

# Published parameter counts: timm's ViT-S/B/L/16 at 224 (22,050,664 / 86,567,656 /
# 304,326,632), GPT-2 with tied embeddings, TinyLlama-1.1B and Llama-2-7B.
PUBLISHED = {
    "vit-s16": 22.05e6,
    "vit-b16": 86.57e6,
    "vit-l16": 304.3e6,
    "gpt2-small": 124.4e6,
    "gpt2-medium": 354.8e6,
    "gpt2-large": 774.0e6,
    "gpt2-xl": 1557.6e6,
    "llama-1b": 1.100e9,
    "llama-7b": 6.738e9,
}
# DiT paper, Table 4 (rounded), and DiT's training log for XL/2 (exact): these include the
# learned-sigma output channels and the frozen position table, which our DiT does not have;
# dit.published_parameter_count removes both (see its docstring).
PUBLISHED_DIT = {"dit-s2": 33e6, "dit-b2": 130e6, "dit-l2": 458e6, "dit-xl2": 675_129_632}


# The released checkpoints' exact totals (the sum of the safetensors shapes): Llama-2-70B and
# Meta-Llama-3-8B. Exact equality pins GQA, the FFN width, the untied head and the vocabulary.
PUBLISHED_EXACT = {"llama-70b": 68_976_648_192, "llama3-8b": 8_030_261_248}


@pytest.mark.parametrize("name", sorted(PUBLISHED_EXACT))
def test_llama_presets_match_released_checkpoints_exactly(name):
    parameters, layers = preset_shape(name)
    assert parameters == PUBLISHED_EXACT[name]
    assert layers == {"llama-70b": 80, "llama3-8b": 32}[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_presets_match_published_parameter_counts(name):
    parameters, _ = preset_shape(name)
    assert abs(parameters - PUBLISHED[name]) / PUBLISHED[name] < 0.01, (name, parameters)


@pytest.mark.parametrize("name", sorted(PUBLISHED_DIT))
def test_dit_presets_match_published_counts_adjusted_for_four_output_channels(name):
    spec = get_preset(name)
    model = build_on_meta(spec.build)
    expected = dit_module.published_parameter_count(model.config, PUBLISHED_DIT[name])
    assert abs(count_parameters(model) - expected) / expected < 0.01
    if name == "dit-xl2":  # the exact published figure pins the architecture to the parameter
        assert count_parameters(model) == expected == 674_816_272


def test_exact_counts_of_reference_models():
    # Exact figures of the released checkpoints pin the architectures, not just the size.
    assert preset_shape("vit-s16")[0] == 22_050_664
    assert preset_shape("vit-b16")[0] == 86_567_656
    assert preset_shape("gpt2-small")[0] == 124_439_808
    assert preset_shape("gpt2-xl")[0] == 1_557_611_200
    assert preset_shape("llama-1b")[0] == 1_100_048_384
    assert preset_shape("llama-7b")[0] == 6_738_415_616


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_counting_llama_7b_allocates_nothing():
    preset_shape.cache_clear()
    before, start = _rss_bytes(), time.perf_counter()
    rows = {row["name"]: row for row in preset_table()}
    elapsed, growth = time.perf_counter() - start, _rss_bytes() - before
    assert rows["llama-7b"]["parameters"] == 6_738_415_616
    # A real fp32 build would need 27 GB and minutes; the meta build costs neither.
    assert growth < 256 * 2**20, growth
    assert elapsed < 30, elapsed
    model = build_on_meta(get_preset("llama-7b").build)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_preset_table_rows_describe_every_preset():
    rows = preset_table()
    assert [row["name"] for row in rows] == list(PRESETS)
    by_name = {row["name"]: row for row in rows}
    assert by_name["gpt2-medium"]["layers"] == 24 and by_name["gpt2-medium"]["hidden_size"] == 1024
    assert {by_name[n]["task"] for n in ("vit-b16", "dit-b2", "llama-7b")} == {
        "classification",
        "denoising",
        "causal-lm",
    }
    for row in rows:
        assert set(row) == {"name", "family", "task", "parameters", "layers", "hidden_size", "description"}
        assert isinstance(row["parameters"], int) and row["parameters"] > 0
        assert row["family"] in ("vit", "dit", "gpt", "masked-lm") and row["description"]


def test_default_preset_is_a_tiny_vit():
    spec = get_preset(DEFAULT_PRESET)
    parameters, layers = preset_shape(DEFAULT_PRESET)
    assert spec.family == "vit" and spec.task == "classification"
    assert parameters < 1_000_000 and layers >= 4  # db:4 of the default run needs 4 layers
    assert load_spec(None).name == DEFAULT_PRESET


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_states_its_shapes(name):
    spec = get_preset(name)
    assert spec.name == name and spec.layers == "blocks"
    assert spec.hidden_size > 0 and spec.num_classes > 0
    assert spec.extra["sequence_length"] > 0


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_train_a_real_step_on_cpu(name):
    spec = get_preset(name)
    model = spec.build()
    batch = spec.batch(4, "cpu")
    loss = spec.loss(model, batch)
    loss.backward()
    assert loss.dim() == 0 and math.isfinite(loss.item()) and loss.item() > 0
    assert all(p.grad is not None for p in model.parameters())
    assert len(get_layers(model, spec.layers)) >= 4


def test_tiny_vit_learns_a_fixed_batch():
    spec = get_preset("vit-tiny")
    model = spec.build()
    batch = spec.batch(16, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = spec.loss(model, batch).item()
    for _ in range(25):
        loss = spec.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.5 * first


def test_output_shapes():
    vit = get_preset("vit-tiny")
    assert vit.build()(vit.batch(3, "cpu")["inputs"]).shape == (3, 10)
    dit = get_preset("dit-tiny")
    x = dit.batch(3, "cpu")["inputs"]
    assert x.shape == (3, 4, 8, 8)
    assert dit.build()(x, torch.zeros(3), torch.zeros(3, dtype=torch.long)).shape == x.shape
    for name in ("gpt-tiny", "llama-tiny"):
        lm = get_preset(name)
        b = lm.batch(2, "cpu")
        assert b["inputs"].shape == b["targets"].shape == (2, 64) and b["inputs"].dtype == torch.int64
        assert torch.equal(b["inputs"][:, 1:], b["targets"][:, :-1])  # targets are the next tokens
        assert lm.build()(b["inputs"]).shape == (2, 64, 256)


def test_builds_and_batches_are_deterministic_and_leave_global_rng_alone():
    spec = get_preset("llama-tiny")
    state = torch.get_rng_state()
    a, b = spec.build().state_dict(), spec.build().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(spec.batch(2, "cpu")["inputs"], spec.batch(2, "cpu")["inputs"])
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", ["vit-tiny", "gpt-tiny", "llama-tiny"])
def test_blocks_follow_the_prenorm_contract(name):
    model = get_preset(name).build()
    block = model.blocks[0]
    for attr in ("norm1", "attn", "norm2", "mlp"):
        assert isinstance(getattr(block, attr), torch.nn.Module)
    x = torch.randn(2, 9, 64)
    h = x + block.attn(block.norm1(x))
    expected = h + block.mlp(block.norm2(h))
    torch.testing.assert_close(block(x), expected, rtol=0, atol=0)


def test_dit_blocks_take_conditioning_and_start_as_identity():
    model = get_preset("dit-tiny").build()
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    assert torch.equal(model.blocks[0](x, c), x)  # adaLN-Zero: gates start at zero
    out = model(torch.randn(2, 4, 8, 8), torch.zeros(2), torch.tensor([1, 2]))
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output layer
    assert model.y_embedder.table.num_embeddings == 11  # 10 classes + the null class


def test_dit_label_dropout_uses_the_null_class_only_in_training():
    model = get_preset("dit-tiny").build()
    labels = torch.zeros(4000, dtype=torch.long)
    model.y_embedder.train()
    dropped = (model.y_embedder(labels) == model.y_embedder.table.weight[10]).all(dim=1).float().mean()
    assert 0.07 < dropped.item() < 0.13  # class_dropout_prob = 0.1
    model.y_embedder.eval()
    assert not (model.y_embedder(labels) == model.y_embedder.table.weight[10]).all(dim=1).any()


def test_vit_dropout_acts_only_in_training_and_costs_nothing_when_off():
    from dbprofile.models.vit import ViT, make_spec

    config = ViTConfig(
        image_size=8, patch_size=2, channels=1, num_classes=10, num_layers=2, hidden_size=32, num_heads=4
    )
    images = torch.randn(16, 1, 8, 8)
    with_dropout = ViT(replace(config, dropout=0.3)).train()
    torch.manual_seed(0)
    assert not torch.equal(with_dropout(images), with_dropout(images))  # a fresh mask per call
    with_dropout.eval()
    assert torch.equal(with_dropout(images), with_dropout(images))
    # Dropout 0 (every preset) runs no dropout op: a traced training step is the same ops as before.
    spec = make_spec(config)
    model = spec.build().train()
    ops: list[str] = []

    class Ops(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops():
        spec.loss(model, spec.batch(4, "cpu")).backward()
    assert not any("dropout" in op or "bernoulli" in op for op in ops)
    model.blocks[0].attn.dropout = 0.3
    ops.clear()
    with Ops():
        spec.loss(model, spec.batch(4, "cpu")).backward()
    assert any("dropout" in op or "bernoulli" in op for op in ops)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_causal_attention_hides_future_tokens(name):
    spec = get_preset(name)
    model = spec.build().eval()
    tokens = spec.batch(2, "cpu")["inputs"]
    changed = tokens.clone()
    changed[:, 40] = (changed[:, 40] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :40], b[:, :40], rtol=0, atol=1e-6)
    assert (a[:, 40:] - b[:, 40:]).abs().amax(dim=-1).min() > 1e-4


def test_rope_model_runs_blocks_on_twice_the_context_length():
    model = get_preset("llama-tiny").build()
    tokens = torch.randint(0, 256, (2, 128))  # context_length is 64
    assert model(tokens).shape == (2, 128, 256)
    hidden = torch.randn(2, 128, 64, requires_grad=True)
    for block in model.blocks:
        hidden = block(hidden)
    hidden.sum().backward()
    # One cos/sin table shared by every layer (one saved tensor, not one per layer).
    assert len({id(block.attn.rotary) for block in model.blocks}) == 1


def test_gpt2_adds_learned_positions_in_the_stem_only():
    model = get_preset("gpt-tiny").build()
    hidden = torch.randn(1, 128, 64)  # the blocks take any length (DiffusionBlocks doubles it)
    assert model.blocks[0](hidden).shape == hidden.shape
    with pytest.raises(ValueError, match="context_length=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_rope_scores_depend_only_on_relative_position():
    cache = RotaryCache(head_dim=8)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 8, dtype=torch.float64, generator=gen)
    cos, sin = cache(q, 20)  # angles are computed in float32, hence the 1e-6 below

    def score(m: int, n: int) -> float:
        qm = apply_rotary(q, cos[m], sin[m])
        kn = apply_rotary(k, cos[n], sin[n])
        return float((qm * kn).sum())

    assert score(3, 1) == pytest.approx(score(15, 13), abs=1e-6)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)


def test_unknown_preset_suggests_close_names():
    with pytest.raises(SpecError, match="Did you mean vit-b16"):
        get_preset("vit-b")
    with pytest.raises(SpecError, match="llama-7b"):
        get_preset("llama7b")
    with pytest.raises(SpecError, match="gpt2-small"):
        load_spec("gpt2-smal")


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: ViTConfig(image_size=30, patch_size=16), "patch_size"),
        (lambda: ViTConfig(hidden_size=100, num_heads=3), "num_heads"),
        (lambda: ViTConfig(dropout=1.0), "dropout"),
        (lambda: DiTConfig(class_dropout_prob=1.5), "class_dropout_prob"),
        (lambda: DiTConfig(num_layers=0), "num_layers"),
        (lambda: GPTConfig(style="mamba"), "style"),
        (lambda: GPTConfig(style="llama", num_heads=8, num_kv_heads=3, hidden_size=64), "num_kv_heads"),
    ],
)
def test_invalid_configs_name_the_bad_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_llama_defaults_follow_the_llama_recipe():
    config = GPTConfig(style="llama", hidden_size=4096, num_heads=32)
    assert config.ffn_size == 11008  # 8/3 * 4096 rounded up to a multiple of 256, as Llama-2-7B
    assert config.tie_embeddings is False and config.num_kv_heads == 32
    assert GPTConfig().tie_embeddings is True and GPTConfig().ffn_size == 3072


def test_gpt_refuses_a_config_whose_ffn_size_was_reset_to_none():
    from dbprofile.models.gpt import GPT

    config = GPTConfig(num_layers=1, hidden_size=64, num_heads=2, vocab_size=32, context_length=16)
    config.ffn_size = None  # after __post_init__ derived it
    with pytest.raises(ValueError, match="ffn_size is None"):
        GPT(config)


@pytest.mark.parametrize(
    "source, layers",
    [("vit_custom.py", 8), ("vit_custom.py:deeper", 16), ("custom_resmlp.py", 6)],
)
def test_example_model_files_load_and_validate(source, layers):
    spec = load_spec(str(EXAMPLES / source))
    facts = validate_spec(spec)
    assert facts["num_layers"] == layers
    assert facts["hidden_size"] == spec.hidden_size


def test_custom_resmlp_example_trains_a_step():
    spec = load_spec(str(EXAMPLES / "custom_resmlp.py"))
    model = spec.build()
    batch = spec.batch(8, "cpu")
    assert batch["inputs"].shape == (8, 1, 8, 8) and batch["inputs"].max() <= 1.0
    loss = spec.loss(model, batch)
    loss.backward()
    assert math.isfinite(loss.item()) and spec.task == "classification" and spec.num_classes == 10


def test_edm_loss_is_zero_for_the_perfect_denoiser_and_positive_for_f_zero():
    spec = get_preset("dit-tiny")
    batch = spec.batch(64, "cpu")
    clean = batch["inputs"]

    class Oracle(torch.nn.Module):
        """Returns the F that makes D(z) = x exactly, recovering sigma from c_noise = ln(sigma)/4."""

        def __init__(self, zero: bool) -> None:
            super().__init__()
            self.zero = zero

        def forward(self, scaled, noise_level, labels):
            assert noise_level.shape == labels.shape == (64,)
            if self.zero:
                return torch.zeros_like(scaled)
            s = torch.exp(4 * noise_level.double()).view(-1, 1, 1, 1)
            z = scaled.double() * torch.sqrt(s**2 + 0.25)  # undo c_in
            c_skip, c_out = 0.25 / (s**2 + 0.25), s * 0.5 / torch.sqrt(s**2 + 0.25)
            return ((clean.double() - c_skip * z) / c_out).float()

    assert spec.loss(Oracle(zero=False), batch).item() < 1e-4
    # F = 0 leaves D = c_skip * z, whose expected squared error is s^2 sd^2 / (s^2 + sd^2) for
    # data of std sd; EDM's weight w(s) is exactly its inverse, so the loss is 1 at every sigma.
    assert spec.loss(Oracle(zero=True), batch).item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("name", ["dit-tiny", "llama-tiny"])
def test_tiny_presets_train_under_fake_tensors(name):
    fake = pytest.importorskip("dbprofile.measure.fake")
    spec = get_preset(name)
    with fake.fake_mode():
        model = spec.build()
        loss = spec.loss(model, spec.batch(4, "cpu"))
        loss.backward()
        assert fake.is_fake(loss) and all(fake.is_fake(p.grad) for p in model.parameters())


@pytest.mark.parametrize("name", ["dit-tiny", "llama-tiny"])
def test_tiny_presets_train_under_bf16_autocast(name):
    spec = get_preset(name)
    model = spec.build()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = spec.loss(model, spec.batch(4, "cpu"))
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_train_on_cuda_in_bf16(name):
    spec = get_preset(name)
    model = spec.build().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = spec.loss(model, spec.batch(8, "cuda"))
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
