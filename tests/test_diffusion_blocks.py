"""DiffusionBlocks' block-wise model, conditioning, trainer variants, sampler and activation
check, on tiny models of the built-in families and a small user-style residual model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dbprofile.edm import edm_preconditioning
from dbprofile.methods import make_trainer
from dbprofile.methods.diffusion_blocks import (
    BlockwiseModel,
    DiffusionBlocksTrainer,
    OffloadDiffusionBlocksTrainer,
    predict_classes,
    sample,
)
from dbprofile.methods.diffusion_blocks.activations import layer_activation_bytes
from dbprofile.methods.diffusion_blocks.conditioning import (
    AdaLNZeroBlock,
    GenericAdaLNZero,
    modulation_of,
)
from dbprofile.methods.diffusion_blocks.sampler import (
    held_out_block_losses,
    identity_block_copy,
)
from dbprofile.methods.diffusion_blocks.task_targets import (
    concatenated_attention_mask,
    concatenated_positions,
)
from dbprofile.models import dit, gpt, vit
from dbprofile.sequence_layout import UnsupportedLayoutError
from dbprofile.spec import ModelSpec, SpecError, get_layers
from dbprofile.techniques import Technique, parse_technique

CPU = torch.device("cpu")


def tiny_vit(layers: int = 4) -> ModelSpec:
    return vit.make_spec(
        vit.ViTConfig(
            image_size=8, patch_size=2, channels=1, num_classes=10, num_layers=layers, hidden_size=32, num_heads=2
        )
    )


def tiny_gpt(layers: int = 4, style: str = "gpt2") -> ModelSpec:
    return gpt.make_spec(
        gpt.GPTConfig(style=style, vocab_size=64, context_length=16, num_layers=layers, hidden_size=32, num_heads=2)
    )


def tiny_dit() -> ModelSpec:
    return dit.make_spec(dit.DiTConfig(input_size=8, num_classes=10, num_layers=4, hidden_size=32, num_heads=2))


# ---------------------------------------------------------------- a user's own residual model


class MLPResidual(nn.Module):
    """A residual layer that is not a pre-norm transformer block; takes an optional scale."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + scale * torch.tanh(self.fc(self.norm(x)))


class TokenMLP(nn.Module):
    """Classification model: (N, 4) features -> 3 tokens (CLS first) -> residual layers -> head."""

    def __init__(self, d: int = 16, layers: int = 5, classes: int = 3, width_change_at: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 3 * d)
        self.blocks = nn.ModuleList(
            nn.Linear(d, d + 1) if i == width_change_at else MLPResidual(d) for i in range(layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).view(x.shape[0], 3, self.d)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))


def token_mlp_spec(layers: int = 5, width_change_at: int | None = None, float_targets: bool = False) -> ModelSpec:
    def batch(n, device):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, 4, generator=gen)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        return {"inputs": x.to(device), "targets": (y.float() if float_targets else y).to(device)}

    def build():
        torch.manual_seed(0)
        return TokenMLP(layers=layers, width_change_at=width_change_at)

    return ModelSpec(
        name="token-mlp",
        build=build,
        batch=batch,
        loss=lambda m, b: F.cross_entropy(m(b["inputs"]), b["targets"]),
        layers="blocks",
        task="classification",
        hidden_size=16,
        num_classes=3,
    )


def db(blocks: int, ckpt: bool = False, offload: bool = False, interleaved: bool = False) -> Technique:
    return Technique("db", blocks=blocks, ckpt=ckpt, offload=offload, interleaved=interleaved)


# ---------------------------------------------------------------- partition and bad input


def test_blocks_are_contiguous_and_drop_no_layer():
    trainer = DiffusionBlocksTrainer.create(db(3), token_mlp_spec(layers=7), CPU)
    assert trainer.block_layers == [[0, 1, 2], [3, 4], [5, 6]]
    assert trainer.units == [0, 1, 2]


def test_make_trainer_builds_every_diffusion_blocks_variant():
    spec = tiny_vit()
    for name, cls in (
        ("db:2", DiffusionBlocksTrainer),
        ("db:2+ckpt", DiffusionBlocksTrainer),
        ("db:2+offload", OffloadDiffusionBlocksTrainer),
    ):
        trainer = make_trainer(parse_technique(name), spec, CPU)
        assert type(trainer) is cls and trainer.technique == name
        assert torch.isfinite(trainer.step(spec.batch(4, CPU)))


@pytest.mark.parametrize("blocks", [0, -1])
def test_block_count_below_one_is_rejected(blocks):
    with pytest.raises(SpecError, match="B >= 1"):
        DiffusionBlocksTrainer.create(db(blocks), tiny_vit(), CPU)


def test_more_blocks_than_layers_is_rejected():
    with pytest.raises(SpecError, match="B=5 needs at least 5 layers.*has 4"):
        DiffusionBlocksTrainer.create(db(5), tiny_vit(4), CPU)


@pytest.mark.parametrize("gamma", [-0.1, 0.5])
def test_gamma_outside_range_is_rejected(gamma):
    with pytest.raises(SpecError, match="gamma"):
        DiffusionBlocksTrainer.create(db(2), tiny_vit(), CPU, gamma=gamma)


def test_layer_that_changes_shape_is_rejected():
    spec = token_mlp_spec(layers=4, width_change_at=1)
    trainer = DiffusionBlocksTrainer.create(db(2), spec, CPU)
    with pytest.raises(SpecError, match="not shape-preserving"):
        trainer.step(spec.batch(4, CPU), unit=0)


def test_float_targets_for_classification_are_rejected():
    spec = token_mlp_spec(float_targets=True)
    trainer = DiffusionBlocksTrainer.create(db(2), spec, CPU)
    with pytest.raises(SpecError, match="classification.*integer class ids.*float32"):
        trainer.step(spec.batch(4, CPU))


def test_causal_lm_targets_must_be_token_sequences():
    spec = tiny_gpt()
    trainer = DiffusionBlocksTrainer.create(db(2), spec, CPU)
    batch = spec.batch(2, CPU)
    batch["targets"] = batch["targets"][:, 0]
    with pytest.raises(SpecError, match=r"causal-lm.*\(N, T\)"):
        trainer.step(batch)


def test_unknown_weighting_is_rejected():
    with pytest.raises(SpecError, match="weighting"):
        DiffusionBlocksTrainer.create(db(2), tiny_vit(), CPU, weighting="edm")


# ---------------------------------------------------------------- only the active block runs


@pytest.mark.parametrize("spec_fn", [tiny_vit, tiny_gpt, tiny_dit, token_mlp_spec], ids=["vit", "gpt", "dit", "custom"])
def test_inactive_blocks_neither_run_nor_get_gradients(spec_fn):
    spec = spec_fn()
    trainer = DiffusionBlocksTrainer.create(db(2), spec, CPU)
    model = trainer.model
    fired: list[int] = []
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda *_a, i=i: fired.append(i))
    loss = trainer.compute_loss(spec.batch(4, CPU), unit=1)
    loss.backward()
    active = model.block_layers[1]
    assert sorted(set(fired)) == active
    for i, layer in enumerate(model.layers):
        grads = [p.grad for p in layer.parameters()]
        if i in active:
            assert all(g is not None for g in grads)
        else:
            assert all(g is None for g in grads)
    # the full ModuleList is back in the user's model after the step
    assert get_layers(model.model, spec.layers) is model.layers


def test_shared_parts_get_gradients_every_step():
    spec = tiny_vit()
    trainer = DiffusionBlocksTrainer.create(db(2), spec, CPU)
    model = trainer.model
    for block in (0, 1):
        model.zero_grad(set_to_none=True)
        # a non-zero gate so the stem's gradient flows through the block too
        for i in model.block_layers[block]:
            nn.init.normal_(model.layers[i].modulation.weight, std=0.1)
        trainer.compute_loss(spec.batch(4, CPU), unit=block).backward()
        for name in ("label_embedding", "model.head.weight", "model.norm.weight", "model.patch_embed.weight"):
            assert dict(model.named_parameters())[name].grad is not None, name
        assert all(p.grad is not None for p in model.sigma_embedder.parameters())


def test_blocks_are_picked_uniformly_at_random():
    trainer = DiffusionBlocksTrainer.create(db(3), token_mlp_spec(), CPU)
    picks = torch.tensor([trainer.pick_block() for _ in range(600)])
    counts = torch.bincount(picks, minlength=3)
    assert counts.sum() == 600 and counts.min() > 150


# ---------------------------------------------------------------- conditioning


def test_builtin_blocks_get_native_adaln_and_user_layers_the_generic_wrapper():
    vit_model = BlockwiseModel(tiny_vit(), tiny_vit().build(), 2)
    assert all(isinstance(layer, AdaLNZeroBlock) for layer in vit_model.layers)
    assert vit_model.layers[0].modulation.out_features == 6 * 32
    user = BlockwiseModel(token_mlp_spec(), token_mlp_spec().build(), 2)
    assert all(isinstance(layer, GenericAdaLNZero) for layer in user.layers)
    assert user.layers[0].modulation.out_features == 3 * 16
    # the denoising model (DiT) is noise-conditioned already: its layers are not wrapped
    dit_model = BlockwiseModel(tiny_dit(), tiny_dit().build(), 2)
    assert dit_model.sigma_embedder is None and dit_model.extra_parameters == 0
    assert type(dit_model.layers[0]).__name__ == "DiTBlock"


@pytest.mark.parametrize("spec_fn", [tiny_vit, token_mlp_spec], ids=["native", "generic"])
def test_wrapped_layers_start_as_the_identity(spec_fn):
    model = BlockwiseModel(spec_fn(), spec_fn().build(), 2)
    model.context.cond = torch.randn(3, model.sigma_embedder.mlp[-1].out_features)
    x = torch.randn(3, 5, model.hidden_size)
    for layer in model.layers:
        assert torch.equal(layer(x), x)


def test_generic_wrapper_modulates_input_and_gates_the_delta():
    model = BlockwiseModel(token_mlp_spec(), token_mlp_spec().build(), 2)
    wrapper = model.layers[0]
    torch.manual_seed(1)
    nn.init.normal_(wrapper.modulation.weight)
    nn.init.normal_(wrapper.modulation.bias)
    cond = torch.randn(2, wrapper.modulation.in_features)
    model.context.cond = cond
    x = torch.randn(2, 3, 16)
    shift, scale, gate = F.silu(wrapper.modulation(F.silu(cond)))[:, None, :].chunk(3, dim=-1)
    x_mod = x * (1 + scale) + shift
    want = x + gate * (wrapper.layer(x_mod, scale=0.5) - x_mod)
    # extra arguments reach the wrapped layer
    assert torch.allclose(wrapper(x, scale=0.5), want, atol=1e-6)
    assert not torch.allclose(wrapper(x, scale=0.5), wrapper(x))


def test_native_wrapper_follows_the_authors_adaln_zero():
    model = BlockwiseModel(tiny_vit(), tiny_vit().build(), 2)
    wrapper = model.layers[0]
    torch.manual_seed(2)
    nn.init.normal_(wrapper.modulation.weight, std=0.2)
    cond = torch.randn(2, wrapper.modulation.in_features)
    model.context.cond = cond
    x = torch.randn(2, 17, 32)
    # the authors' AdaLN: SiLU on the modulation's output too
    b1, a1, g1, b2, a2, g2 = F.silu(wrapper.modulation(F.silu(cond)))[:, None, :].chunk(6, dim=-1)
    blk = wrapper.layer
    h = x + g1 * blk.attn(blk.norm1(x) * (1 + a1) + b1)
    want = h + g2 * blk.mlp(blk.norm2(h) * (1 + a2) + b2)
    assert torch.allclose(wrapper(x), want, atol=1e-6)


def test_sigma_embedder_and_modulation_follow_the_authors_code():
    model = BlockwiseModel(tiny_vit(), tiny_vit().build(), 2)
    # _init_dit: the embedder's Linear weights N(0, 0.02), biases zero
    for linear in (model.sigma_embedder.mlp[0], model.sigma_embedder.mlp[2]):
        assert linear.bias.abs().sum() == 0 and 0.018 < float(linear.weight.detach().std()) < 0.022
    # their AdaLN is SiLU(Linear(SiLU(cond))): every shift, scale and gate >= min SiLU = -0.2785
    linear = model.layers[0].modulation
    torch.manual_seed(3)
    nn.init.normal_(linear.weight, std=3.0)
    nn.init.normal_(linear.bias, std=3.0)
    with torch.no_grad():
        mods = modulation_of(linear, torch.randn(64, linear.in_features))
    assert float(mods.min()) >= -0.2785 and float(mods.max()) > 1.0


def test_extra_parameters_are_counted_per_model():
    d, c, classes, layers = 32, 32, 10, 4  # cond width max(32, d // 6) = 32
    embedder = (256 * c + c) + (c * c + c)
    final_adaln = c * 2 * d + 2 * d
    vit_trainer = DiffusionBlocksTrainer.create(db(2), tiny_vit(layers), CPU)
    assert vit_trainer.extra_parameters == embedder + layers * (c * 6 * d + 6 * d) + classes * d + final_adaln
    # the causal-lm target comes from the model's own token embedding: no vocabulary x d table
    for technique in (db(2), db(2, interleaved=True)):
        gpt_trainer = DiffusionBlocksTrainer.create(technique, tiny_gpt(layers), CPU)
        assert gpt_trainer.extra_parameters == embedder + layers * (c * 6 * d + 6 * d)
        plain_gpt = sum(p.numel() for p in tiny_gpt(layers).build().parameters())
        assert sum(p.numel() for p in gpt_trainer.model.parameters()) == plain_gpt + gpt_trainer.extra_parameters
    user = DiffusionBlocksTrainer.create(db(2), token_mlp_spec(layers=5), CPU)
    assert user.extra_parameters == embedder + 5 * (c * 3 * 16 + 3 * 16) + 3 * 16
    plain = sum(p.numel() for p in tiny_vit(layers).build().parameters())
    assert sum(p.numel() for p in vit_trainer.model.parameters()) == plain + vit_trainer.extra_parameters


def test_gpt2_small_adds_only_the_adaln_modulation_and_sigma_embedder():
    from dbprofile.measure.fake import fake_mode
    from dbprofile.models.registry import PRESETS

    with fake_mode():
        trainer = make_trainer(parse_technique("db:2"), PRESETS["gpt2-small"](), CPU)
    d, c, layers = 768, 128, 12  # cond width d // 6
    embedder = (256 * c + c) + (c * c + c)
    assert trainer.extra_parameters == embedder + layers * (c * 6 * d + 6 * d) == 7_182_592
    assert trainer.model.input_embedding is trainer.model.model.tok_embed


# ---------------------------------------------------------------- task constructions


def _vit_readout_inputs(pooling: str = "cls"):
    spec = vit.make_spec(
        vit.ViTConfig(
            image_size=8,
            patch_size=2,
            channels=1,
            num_classes=10,
            num_layers=4,
            hidden_size=32,
            num_heads=2,
            pooling=pooling,
        )
    )
    model = BlockwiseModel(spec, spec.build(), 2)
    torch.manual_seed(1)
    nn.init.normal_(model.model.head.weight)  # zero-initialised, as the authors' classifier
    nn.init.normal_(model.final_modulation.weight, std=0.1)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    return model, spec.batch(3, CPU)["inputs"], torch.randn(3, 32), sigma


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_vit_readout_follows_the_authors_code(pooling):
    model, inputs, z, sigma = _vit_readout_inputs(pooling)
    vit_model = model.model
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma)
    seen = {}
    vit_model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    logits = model.classification_logits(inputs, z, sigma, model.block_layers[0])
    # c_in*z replaced the CLS token BEFORE the position embeddings were added
    assert torch.allclose(seen["x"][:, 0], c_in[:, None] * z + vit_model.pos_embed[0, 0], atol=1e-6)
    # F is the final-norm output pooled (token 0 or the patch mean); D; final AdaLN; classifier
    with model.running(model.block_layers[0]):
        f = vit_model.features(inputs, cls=c_in[:, None] * z)
    d = c_out[:, None] * f + c_skip[:, None] * z
    cond = F.silu(model.sigma_embedder(c_noise))
    shift, scale = F.silu(model.final_modulation(cond)).chunk(2, dim=-1)
    assert torch.allclose(logits, vit_model.head(d * (1 + scale) + shift), atol=1e-5)


def test_vit_features_pool_the_final_norm_output():
    for pooling in ("cls", "mean"):
        config = vit.ViTConfig(
            image_size=8,
            patch_size=2,
            channels=1,
            num_classes=10,
            num_layers=2,
            hidden_size=32,
            num_heads=2,
            pooling=pooling,
        )
        model = vit.ViT(config)
        images = torch.randn(2, 1, 8, 8)
        hidden = {}
        model.norm.register_forward_hook(lambda _m, _a, out, hidden=hidden: hidden.setdefault("h", out))
        feats = model.features(images)
        want = hidden["h"][:, 0] if pooling == "cls" else hidden["h"][:, 1:].mean(dim=1)
        assert torch.equal(feats, want)
        assert torch.allclose(model(images), model.head(want))
    with pytest.raises(ValueError, match="pooling"):
        vit.ViTConfig(pooling="max")


def test_vit_readout_starts_with_zero_classifier_and_final_adaln():
    spec = tiny_vit()
    model = BlockwiseModel(spec, spec.build(), 2)
    assert model.native_readout
    for param in (model.model.head.weight, model.model.head.bias, *model.final_modulation.parameters()):
        assert param.abs().sum() == 0
    logits = model.classification_logits(spec.batch(2, CPU)["inputs"], torch.randn(2, 32), torch.ones(2), [0, 1])
    assert torch.equal(logits, torch.zeros(2, 10))


def test_vit_dropout_acts_inside_the_diffusion_blocks_block_in_training_only():
    # The learning check trains with the authors' dropout 0.1: it must reach the AdaLN-Zero block,
    # which calls the layer's own attn and mlp.
    config = vit.ViTConfig(
        image_size=8, patch_size=2, channels=1, num_classes=10, num_layers=4, hidden_size=32, num_heads=2, dropout=0.2
    )
    spec = vit.make_spec(config)
    model = BlockwiseModel(spec, spec.build(), 2)
    model.model.dropout = 0.0  # no embedding dropout: any difference comes from inside the block
    torch.manual_seed(0)
    for param in model.parameters():
        if not param.any():  # zero-initialised gates, modulations and head: give them weights
            nn.init.normal_(param, std=0.5)
    inputs, z, sigma = spec.batch(4, CPU)["inputs"], torch.randn(4, 32), torch.ones(4)

    def logits():
        return model.classification_logits(inputs, z, sigma, model.block_layers[0])

    assert not torch.equal(logits(), logits())
    model.eval()
    assert torch.equal(logits(), logits())


def test_user_classifier_without_readout_gets_the_cls_hooks():
    spec = token_mlp_spec(layers=4)
    model = BlockwiseModel(spec, spec.build(), 2)
    assert not model.native_readout and not hasattr(model, "final_modulation")
    inputs = spec.batch(3, CPU)["inputs"]
    z = torch.randn(3, 16)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    c_skip, c_out, c_in, _ = edm_preconditioning(sigma)
    seen = {}
    first = model.layers[model.block_layers[1][0]].layer  # zero modulation: it sees the wrapper's input
    first.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    logits = model.classification_logits(inputs, z, sigma, model.block_layers[1])
    assert torch.allclose(seen["x"][:, 0], c_in[:, None] * z)
    # zero-init layers pass token 0 through, so D = c_skip*z + c_out*c_in*z, then the model's norm and head
    d = (c_skip + c_out * c_in)[:, None] * z
    assert torch.allclose(logits, model.model.head(model.model.norm(d)), atol=1e-5)


def test_concatenated_mask_and_positions():
    mask = concatenated_attention_mask(3)
    want = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],  # noisy 0 sees clean 0 and itself
        [1, 1, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 1],
    ]
    assert mask.tolist() == [[bool(v) for v in row] for row in want]
    assert concatenated_positions(3).tolist() == [0, 1, 2, 0, 1, 2]


def test_concatenated_layout_hands_mask_and_positions_to_every_layer():
    spec = tiny_gpt(style="llama")
    model = BlockwiseModel(spec, spec.build(), 2)
    seen = []
    for i in model.block_layers[1]:
        model.layers[i].layer.attn.register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append((args[0].shape[1], kwargs)), with_kwargs=True
        )
    model.loss(spec.batch(2, CPU), 1, generator=torch.Generator().manual_seed(0))
    assert len(seen) == len(model.block_layers[1])
    for length, kwargs in seen:
        assert length == 32
        assert torch.equal(kwargs["attn_mask"], concatenated_attention_mask(16))
        assert torch.equal(kwargs["positions"], concatenated_positions(16))


def test_masked_attention_with_positions_matches_causal_attention_on_the_clean_half():
    # The clean half of the concatenated sequence must see exactly what plain causal attention sees.
    from dbprofile.models.common import RotaryCache, SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(32, 4, num_kv_heads=2, bias=False, causal=True, rotary=RotaryCache(8))
    x = torch.randn(2, 5, 32)
    plain = attn(x)
    doubled = torch.cat([x, torch.randn(2, 5, 32)], dim=1)
    masked = attn(doubled, attn_mask=concatenated_attention_mask(5), positions=concatenated_positions(5))
    assert torch.allclose(masked[:, :5], plain, atol=1e-5)


def test_causal_lm_layout_must_be_known_and_only_for_language_models():
    with pytest.raises(SpecError, match="concatenated, interleaved"):
        BlockwiseModel(tiny_gpt(), tiny_gpt().build(), 2, lm_layout="side-by-side")
    with pytest.raises(SpecError, match="causal-lm models only"):
        DiffusionBlocksTrainer.create(db(2, interleaved=True), tiny_vit(), CPU)
    assert parse_technique("db:2+interleaved") == db(2, interleaved=True)
    assert parse_technique("db:2+ckpt+interleaved").name == "db:2+ckpt+interleaved"


class _PlainLayer(nn.Module):
    """A user's residual LM layer (token-wise, so causal by construction) taking one tensor."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class _MaskedLayer(_PlainLayer):
    """The same layer accepting the concatenated layout's keyword arguments."""

    def forward(self, x, attn_mask=None, positions=None):
        return super().forward(x)


class _UserLM(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 16, takes_mask: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = _MaskedLayer if takes_mask else _PlainLayer
        self.blocks = nn.ModuleList(layer(d) for _ in range(2))
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _user_lm_spec(takes_mask: bool) -> ModelSpec:
    def batch(n, device):
        tokens = torch.randint(0, 20, (n, 7), generator=torch.Generator().manual_seed(0))
        return {"inputs": tokens[:, :-1].to(device), "targets": tokens[:, 1:].to(device)}

    return ModelSpec(
        name="user-lm",
        build=lambda: _UserLM(takes_mask=takes_mask),
        batch=batch,
        loss=lambda m, b: F.cross_entropy(m(b["inputs"]).flatten(0, 1), b["targets"].flatten()),
        layers="blocks",
        task="causal-lm",
        hidden_size=16,
        num_classes=20,
    )


def test_user_language_model_target_is_its_own_embedding_and_layers_must_take_the_mask():
    spec = _user_lm_spec(takes_mask=True)
    model = BlockwiseModel(spec, spec.build(), 2)
    assert model.input_embedding is model.model.embed
    assert float(model.loss(spec.batch(3, CPU), 0).detach()) > 0
    plain = _user_lm_spec(takes_mask=False)
    # Refused at its first step (a per-technique error), so e2e and ckpt of the model still run.
    refused = BlockwiseModel(plain, plain.build(), 2)
    with pytest.raises(UnsupportedLayoutError, match="lm_layout='interleaved'"):
        refused.loss(plain.batch(3, CPU), 1)
    interleaved = BlockwiseModel(plain, plain.build(), 2, lm_layout="interleaved")
    assert float(interleaved.loss(plain.batch(3, CPU), 1).detach()) > 0


@pytest.mark.parametrize("layout", ["concatenated", "interleaved"])
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_causal_lm_runs_on_clean_and_noisy_tokens_without_leaks(layout, style):
    spec = tiny_gpt(style=style)
    model = BlockwiseModel(spec, spec.build(), 2, lm_layout=layout)
    torch.manual_seed(0)
    for layer in model.layers:  # non-trivial layers, else everything is the identity
        nn.init.normal_(layer.modulation.weight, std=0.2)
    batch = spec.batch(2, CPU)
    lengths = []
    model.layers[0].layer.norm1.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
    z = torch.randn(2, 16, 32)
    sigma = torch.tensor([0.5, 2.0])
    logits = model.lm_logits(batch["inputs"], z, sigma, model.block_layers[0])
    assert lengths == [32] and logits.shape == (2, 16, 64)
    # changing the noisy target at position k leaves every earlier position's logits unchanged
    k = 9
    z2 = z.clone()
    z2[:, k] += torch.randn(2, 32)
    logits2 = model.lm_logits(batch["inputs"], z2, sigma, model.block_layers[0])
    assert torch.allclose(logits[:, :k], logits2[:, :k], atol=1e-5)
    assert not torch.allclose(logits[:, k], logits2[:, k], atol=1e-3)
    # and so does changing a later clean input token
    inputs2 = batch["inputs"].clone()
    inputs2[:, k] = (inputs2[:, k] + 1) % 64
    logits3 = model.lm_logits(inputs2, z, sigma, model.block_layers[0])
    assert torch.allclose(logits[:, :k], logits3[:, :k], atol=1e-5)
    assert not torch.allclose(logits[:, k], logits3[:, k], atol=1e-3)
    # under the modified mask a noisy token sees no other noisy token: later positions ignore z_k
    # too; interleaved under the plain causal mask, later positions see n_k (harmless: they
    # already see the clean token it denoises)
    later_change = float((logits[:, k + 1 :] - logits2[:, k + 1 :]).abs().max().detach())
    if layout == "concatenated":
        assert later_change < 1e-6
    else:
        assert later_change > 0


def test_denoising_trains_with_per_sample_weights_like_its_end_to_end_loss():
    spec = tiny_dit()
    model = BlockwiseModel(spec, spec.build(), 2)
    assert model.weighting == "per-sample"
    assert BlockwiseModel(tiny_vit(), tiny_vit().build(), 2).weighting == "reference"
    assert BlockwiseModel(tiny_gpt(), tiny_gpt().build(), 2).weighting == "reference"
    assert BlockwiseModel(spec, spec.build(), 2, weighting="reference").weighting == "reference"


def test_denoising_calls_the_model_with_preconditioned_input_and_c_noise():
    spec = tiny_dit()
    model = BlockwiseModel(spec, spec.build(), 2)
    calls = {}
    model.model.register_forward_pre_hook(lambda _m, args: calls.setdefault("args", args))
    z = torch.randn(2, 4, 8, 8)
    sigma = torch.tensor([0.3, 5.0])
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma)
    d = model.denoise(z, sigma, model.block_layers[0], torch.tensor([1, 2]))
    x_in, noise_level, labels = calls["args"]
    assert torch.allclose(x_in, c_in[:, None, None, None] * z)
    assert torch.allclose(noise_level, c_noise) and labels.tolist() == [1, 2]
    f = (d - c_skip[:, None, None, None] * z) / c_out[:, None, None, None]
    assert f.shape == z.shape and torch.isfinite(f).all()


def test_loss_weighting_mode_changes_the_loss_as_defined():
    spec = token_mlp_spec()  # a non-zero head: per-sample losses differ (the ViT's classifier starts at 0)
    batch = spec.batch(4, CPU)
    losses = {}
    for mode in ("reference", "per-sample", "none"):
        model = BlockwiseModel(spec, spec.build(), 2, weighting=mode)
        with torch.no_grad():
            losses[mode] = float(model.loss(batch, 1, generator=torch.Generator().manual_seed(5)))
    # same sigmas and noise in each: reference = mean(w) * none, and per-sample differs from both
    model = BlockwiseModel(spec, spec.build(), 2)
    from dbprofile.edm import loss_weight, sample_sigma

    lo, hi = model.ranges[1]
    sigma = sample_sigma(4, lo, hi, generator=torch.Generator().manual_seed(5))
    assert losses["reference"] == pytest.approx(float(loss_weight(sigma).mean()) * losses["none"], rel=1e-5)
    assert losses["per-sample"] != pytest.approx(losses["reference"], rel=1e-3)


# ---------------------------------------------------------------- trainer variants


def _train(technique: Technique, spec: ModelSpec, steps: int = 6) -> DiffusionBlocksTrainer:
    trainer = DiffusionBlocksTrainer.create(technique, spec, CPU, seed=3)
    batch = spec.batch(8, CPU)
    for _ in range(steps):
        trainer.step(batch)
    return trainer


def _params(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def test_offload_trains_exactly_like_plain_diffusion_blocks():
    spec = tiny_vit()
    plain, offload = _train(db(2), spec), _train(db(2, offload=True), spec)
    a, b = _params(plain), _params(offload)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and the optimizer states agree too
    for p, q in zip(plain.model.parameters(), offload.model.parameters()):
        sa, sb = plain.optimizer.state.get(p, {}), offload.optimizer.state.get(q, {})
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key])


def test_offload_keeps_only_shared_parameters_off_the_host_between_steps():
    trainer = _train(db(2, offload=True), tiny_vit(), steps=4)
    model = trainer.model
    block_params = {id(p) for b in range(2) for p in model.block_parameters(b)}
    for p in model.parameters():
        assert trainer.host_resident(p) == (id(p) in block_params)
    states = [v for p in model.layers.parameters() for v in trainer.optimizer.state[p].values() if v.dim() > 0]
    assert states and all(trainer.host_resident(v) for v in states)
    shared_states = [v for p in model.shared_parameters() for v in trainer.optimizer.state[p].values() if v.dim() > 0]
    assert shared_states and not any(trainer.host_resident(v) for v in shared_states)
    # the base trainer has no host copies
    assert not DiffusionBlocksTrainer.create(db(2), tiny_vit(), CPU).host_resident(next(model.parameters()))


def test_offload_moves_the_active_block_in_for_the_step():
    trainer = DiffusionBlocksTrainer.create(db(2, offload=True), tiny_vit(), CPU)
    model = trainer.model
    seen, phases = {}, []

    def mark(phase):
        phases.append(phase)
        if phase == "backward":
            seen["active_on_host"] = [trainer.host_resident(p) for p in model.block_parameters(1)]
            seen["inactive_on_host"] = [trainer.host_resident(p) for p in model.block_parameters(0)]

    trainer.step(tiny_vit().batch(4, CPU), unit=1, mark=mark)
    assert phases == ["transfer", "forward", "backward", "optimizer", "transfer"]
    assert not any(seen["active_on_host"]) and all(seen["inactive_on_host"])


def test_checkpointing_inside_the_block_does_not_change_training():
    spec = tiny_gpt()
    a, b = _params(_train(db(2), spec, 3)), _params(_train(db(2, ckpt=True), spec, 3))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


# ---------------------------------------------------------------- sampler


def test_classification_chain_runs_each_block_once_from_noise():
    spec = tiny_vit(6)
    model = BlockwiseModel(spec, spec.build(), 3)
    order = []
    for b in range(3):
        model.layers[model.block_layers[b][0]].register_forward_hook(lambda *_a, b=b: order.append(b))
    inputs = spec.batch(5, CPU)["inputs"]
    pred = predict_classes(model, inputs, generator=torch.Generator().manual_seed(0))
    assert order == [0, 1, 2]
    assert pred.shape == (5,) and pred.dtype == torch.int64 and int(pred.max()) < 10


def test_classification_chain_follows_the_authors_sampler():
    spec = tiny_vit(4)
    model = BlockwiseModel(spec, spec.build(), 2)
    torch.manual_seed(0)
    nn.init.normal_(model.model.head.weight)
    nn.init.normal_(model.label_embedding)
    inputs = spec.batch(3, CPU)["inputs"]
    seen = []
    real = model.classification_logits
    model.classification_logits = lambda x, z, sigma, idx: (seen.append(z.clone()), real(x, z, sigma, idx))[1]
    logits = predict_classes(model, inputs, generator=torch.Generator().manual_seed(7), return_logits=True, table="raw")
    # start: N(0, 1) * sqrt(1 + 80^2)
    start = torch.randn((3, 32), generator=torch.Generator().manual_seed(7)) * (1 + 80.0**2) ** 0.5
    assert torch.allclose(seen[0], start)
    # one Euler step from 80 to 0.002 with D = softmax(logits) @ the RAW label table
    first = real(inputs, start, torch.full((3,), 80.0), model.block_layers[0])
    d = first.softmax(dim=-1) @ model.label_embedding
    ratio = 0.002 / 80.0
    assert torch.allclose(seen[1], ratio * start + (1 - ratio) * d, atol=1e-5)
    assert torch.allclose(logits, real(inputs, seen[1], torch.full((3,), 0.002), model.block_layers[1]))
    # the default: D from the L2-normalised rows, the targets the blocks were trained on
    seen.clear()
    predict_classes(model, inputs, generator=torch.Generator().manual_seed(7))
    d_normalised = first.softmax(dim=-1) @ F.normalize(model.label_embedding, dim=-1)
    assert torch.allclose(seen[1], ratio * start + (1 - ratio) * d_normalised, atol=1e-5)
    assert not torch.allclose(seen[1], ratio * start + (1 - ratio) * d, atol=1e-5)


def test_denoising_chain_returns_samples_of_the_requested_shape():
    spec = tiny_dit()
    model = BlockwiseModel(spec, spec.build(), 2)
    out = sample(
        model, (3, 4, 8, 8), labels=torch.tensor([0, 1, 2]), steps=5, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (3, 4, 8, 8) and torch.isfinite(out).all()


def test_identity_block_copy_resets_only_that_block():
    spec = tiny_vit()
    model = BlockwiseModel(spec, spec.build(), 2)
    for layer in model.layers:
        nn.init.normal_(layer.modulation.weight)
    clone = identity_block_copy(model, 0)
    for i, (mine, theirs) in enumerate(zip(model.layers, clone.layers)):
        zeroed = theirs.modulation.weight.abs().sum() == 0
        assert zeroed == (i in model.block_layers[0])
        assert mine.modulation.weight.abs().sum() > 0
    losses = held_out_block_losses(model, spec.batch(8, CPU))
    assert len(losses) == 2 and all(a > 0 and b > 0 for a, b in losses)


def test_offloaded_model_samples_like_the_resident_one():
    spec = tiny_vit()
    plain, offload = _train(db(2), spec, 4), _train(db(2, offload=True), spec, 4)
    inputs = spec.batch(6, CPU)["inputs"]
    a = predict_classes(plain.model, inputs, generator=torch.Generator().manual_seed(0), return_logits=True)
    b = predict_classes(offload.model, inputs, generator=torch.Generator().manual_seed(0), return_logits=True)
    assert torch.equal(a, b)
    assert all(offload.host_resident(p) for p in offload.model.block_parameters(0))


# ---------------------------------------------------------------- activation bytes (issue item 6)


@pytest.mark.parametrize(
    "spec_fn,layout",
    [(tiny_vit, "concatenated"), (tiny_gpt, "concatenated"), (tiny_gpt, "interleaved")],
    ids=["vit", "gpt-concatenated", "gpt-interleaved"],
)
@pytest.mark.parametrize("blocks", [2, 4])
def test_block_saves_one_bth_of_the_full_depth_adaln_activations(spec_fn, layout, blocks):
    result = layer_activation_bytes(spec_fn(8), blocks, batch_size=8, lm_layout=layout)
    assert result["ratio_vs_full_depth_adaln"] == pytest.approx(1 / blocks, rel=0.10)
    assert result["ratio_vs_plain_e2e"] > 1 / blocks
    assert isinstance(result["block_layers_bytes"], int) and result["block_layers_bytes"] > 0


def test_adaln_layers_save_more_than_plain_layers():
    result = layer_activation_bytes(tiny_vit(4), 1, batch_size=8)
    # one block of all layers is the full-depth AdaLN model; its extra modulate/gate products
    # make it heavier than the plain model (METHOD.md: 69.8 MB vs 55.1 MB on the 6-layer ViT)
    assert result["block_layers_bytes"] == result["full_depth_adaln_bytes"]
    assert 1.1 < result["ratio_vs_plain_e2e"] < 1.6


@pytest.mark.parametrize("layout", ["concatenated", "interleaved"])
def test_causal_lm_construction_doubles_the_sequence_and_its_activations(layout):
    result = layer_activation_bytes(tiny_gpt(4), 4, batch_size=8, lm_layout=layout)
    # one layer of one block runs on 2T tokens: it saves at least 2x what a plain layer saves
    per_plain_layer = result["plain_layers_bytes"] / 4
    assert result["block_layers_bytes"] > 2 * per_plain_layer
    vit_result = layer_activation_bytes(tiny_vit(4), 4, batch_size=8)
    assert vit_result["block_layers_bytes"] < 2 * vit_result["plain_layers_bytes"] / 4


@pytest.mark.parametrize("technique", ["db:2", "db:2+ckpt", "db:2+offload"])
def test_diffusion_blocks_steps_run_under_fake_tensors(technique):
    from dbprofile.measure.fake import fake_mode

    spec = tiny_gpt()
    with fake_mode():
        trainer = make_trainer(parse_technique(technique), spec, CPU)
        batch = spec.batch(4, CPU)
        trainer.step(batch)  # a random block: must not read tensor values
        trainer.step(batch, unit=1)
        on_host = sum(trainer.host_resident(p) for p in trainer.model.parameters())
    assert on_host == (
        sum(1 for b in range(2) for _ in trainer.model.block_parameters(b)) if "offload" in technique else 0
    )


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
def test_offload_on_cuda_trains_like_plain_and_keeps_inactive_blocks_on_pinned_host():
    spec = tiny_vit(8)
    cuda = torch.device("cuda")
    runs = {}
    for technique in (db(4), db(4, offload=True)):
        trainer = DiffusionBlocksTrainer.create(technique, spec, cuda, seed=3)
        batch = spec.batch(8, cuda)
        for _ in range(8):
            trainer.step(batch)
        torch.cuda.synchronize()
        runs[technique.offload] = trainer
    plain, offload = runs[False], runs[True]
    for (name, p), q in zip(plain.model.named_parameters(), offload.model.parameters()):
        assert torch.allclose(p.detach().cpu(), q.detach().cpu(), atol=1e-5), name
    for b in range(4):
        for p in offload.model.block_parameters(b):
            assert p.device.type == "cpu" and p.is_pinned() and offload.host_resident(p)
            for v in offload.optimizer.state[p].values():
                assert v.dim() == 0 or (v.device.type == "cpu" and offload.host_resident(v))
    for p in offload.model.shared_parameters():
        assert p.device.type == "cuda" and not offload.host_resident(p)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("technique", ["db:2", "db:2+ckpt", "db:2+offload"])
@pytest.mark.parametrize("spec_fn", [tiny_vit, tiny_gpt, tiny_dit], ids=["vit", "gpt", "dit"])
def test_diffusion_blocks_trains_on_cuda_in_bf16(technique, spec_fn):
    spec = spec_fn()
    cuda = torch.device("cuda")
    trainer = make_trainer(parse_technique(technique), spec, cuda, precision="bf16")
    batch = spec.batch(4, cuda)
    losses = [float(trainer.step(batch, unit=u)) for u in (0, 1, 0, 1)]
    assert all(torch.isfinite(torch.tensor(losses)))
