"""Mixture-of-experts hf: models (dbprofile.models.hf_moe): Mixtral and Qwen2-MoE (shared experts)
profile under e2e, ckpt and DiffusionBlocks in fp32 and bf16 with fake bytes equal to real bytes,
their expert facts, the routing a real step saw, and the claim the plan's routing assumption
rests on: a step's bytes do not depend on how tokens are routed."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")

from dbprofile.cli import main  # noqa: E402
from dbprofile.loading import load_model  # noqa: E402
from dbprofile.measure.runner import measure  # noqa: E402
from dbprofile.models.common import build_on_meta, count_parameters  # noqa: E402

TINY = {
    "num_hidden_layers": "2",
    "hidden_size": "32",
    "intermediate_size": "64",
    "num_attention_heads": "4",
    "num_key_value_heads": "2",
    "vocab_size": "100",
    "num_experts_per_tok": "2",
}
TINY_MIXTRAL = {**TINY, "num_local_experts": "4"}
TINY_QWEN_MOE = {**TINY, "num_experts": "4", "moe_intermediate_size": "32", "shared_expert_intermediate_size": "64"}


def test_mixtral_8x7b_has_its_published_parameter_count_and_expert_share():
    spec = load_model("hf:mixtral", {})  # transformers' MixtralConfig defaults are Mixtral-8x7B's shape
    assert count_parameters(build_on_meta(spec.build)) == 46_702_792_704  # "46.7B" (Mistral AI)
    facts = spec.extra["moe"]
    assert (facts["moe_layers"], facts["experts_per_layer"], facts["experts_per_token"]) == (32, 8, 2)
    assert facts["expert_parameters"] == 32 * 8 * 3 * 4096 * 14336
    assert facts["router_parameters"] == 32 * 8 * 4096
    assert facts["active_parameters_per_token"] == 12_879_925_248  # "12.9B active"


def test_qwen2_moe_counts_its_shared_expert():
    facts = load_model("hf:qwen2_moe", TINY_QWEN_MOE).extra["moe"]
    # Per layer: the shared expert's gate/up/down (3 x 32 x 64) and its one-output gate (32).
    assert facts["shared_expert_parameters"] == 2 * (3 * 32 * 64 + 32)
    assert facts["expert_parameters"] == 2 * 4 * 3 * 32 * 32


@pytest.mark.parametrize("source, overrides", [("hf:mixtral", TINY_MIXTRAL), ("hf:qwen2_moe", TINY_QWEN_MOE)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_moe_models_run_every_technique_and_fake_bytes_equal_real(source, overrides, precision):
    spec = load_model(source, overrides, seq_len=16)
    for tech in ("e2e", "ckpt", "db:2"):
        real = measure(spec, tech, 2, steps=1, precision=precision, timed=False, count_activations=False)
        fake = measure(spec, tech, 2, steps=1, precision=precision, fake=True, count_activations=False)
        assert real.ok and fake.ok, (tech, real.error, fake.error)
        assert (real.peak_bytes, real.shares) == (fake.peak_bytes, fake.shares), tech
        assert real.extra["moe_at_peak"] == fake.extra["moe_at_peak"], tech
        assert "observed" not in fake.extra
        if tech == "ckpt":  # a checkpointed layer's recomputation is not counted as more tokens
            assert [sum(layer) for layer in real.extra["observed"]["tokens_per_expert"]] == [2 * 16 * 2] * 2
    seen = real.extra["observed"]  # db:2: one record per block, each with its own layer
    assert set(seen) == {"block 0", "block 1"}
    # DiffusionBlocks' causal-lm layout runs 2T tokens; every token slot reaches top-2 experts.
    assert [sum(layer) for block in seen.values() for layer in block["tokens_per_expert"]] == [2 * 2 * 16 * 2] * 2


def _saved_bytes_made_in_moe_blocks(spec, batch_size: int) -> tuple[int, int]:
    """Counted apart from the tracker, on one forward of the model: the bytes of distinct storages
    saved for backward, all of them and those an op inside an MoE block made."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dbprofile.models.hf_moe import routed_blocks

    torch.manual_seed(0)
    model = spec.build()
    batch = spec.batch(batch_size, torch.device("cpu"))
    inside = [0]
    made: dict[int, bool] = {}
    kept: list = []
    saved: dict[int, int] = {}

    class Made(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                # where each storage first came out of an op (a view inside a block of a tensor made
                # before it, like the hidden states entering it, is not made there)
                if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in made:
                    made[id(t.untyped_storage())] = inside[0] > 0
                    kept.append(t.untyped_storage())  # alive, so no later storage reuses its id
            return out

    def pack(t):
        saved[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    handles = []
    for block in routed_blocks(model):
        handles.append(block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, inside[0] + 1)))
        handles.append(block.register_forward_hook(lambda *_: inside.__setitem__(0, inside[0] - 1)))
    params = {id(p.untyped_storage()) for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), Made():
        loss = spec.loss(model, batch)
    del loss
    activations = {k: n for k, n in saved.items() if k not in params}
    return sum(activations.values()), sum(n for k, n in activations.items() if made.get(k))


def test_moe_blocks_activations_at_the_peak_are_what_their_forwards_made_and_saved():
    spec = load_model("hf:mixtral", TINY_MIXTRAL, seq_len=32)
    m = measure(spec, "e2e", 8, steps=1, timed=False, count_activations=False)
    # e2e's peak is at the start of the backward, where every saved activation is still held.
    assert m.peak_phase == "backward"
    everything, in_moe = _saved_bytes_made_in_moe_blocks(spec, 8)
    # The loss's own saved tensors (4 KiB here) are freed by the first backward node, before the peak.
    assert 0 <= everything - m.shares["activations"] <= 4096
    assert m.extra["moe_at_peak"]["activations"] == in_moe
    assert 0 < in_moe < everything
    no_moe = measure(
        load_model("hf:llama", {k: v for k, v in TINY.items() if k != "num_experts_per_tok"}, seq_len=32),
        "e2e",
        8,
        steps=1,
        timed=False,
        count_activations=False,
    )
    assert "moe_at_peak" not in no_moe.extra


def _frozen_router(spec, zero: bool):
    """The spec with routers that do not train (so one step's update cannot change the routing),
    zeroed or as initialised: zero logits tie every expert and top-k picks the same k for every token."""

    def build():
        model = spec.build()
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.requires_grad_(False)
                if zero:
                    param.data.zero_()
        return model

    return dataclasses.replace(spec, build=build)


def test_step_bytes_do_not_depend_on_the_routing():
    spec = load_model("hf:mixtral", TINY_MIXTRAL, seq_len=16)
    spread = measure(_frozen_router(spec, zero=False), "e2e", 2, steps=1, timed=False, count_activations=False)
    one_pair = measure(_frozen_router(spec, zero=True), "e2e", 2, steps=1, timed=False, count_activations=False)
    # every token slot on two experts (which two is top-k's tie-break), none on the others
    assert [sorted(layer) for layer in one_pair.extra["observed"]["tokens_per_expert"]] == [[0, 0, 32, 32]] * 2
    assert one_pair.extra["observed"]["max_over_mean"] == 2.0
    assert spread.extra["observed"]["max_over_mean"] < 2.0
    assert (spread.peak_bytes, spread.shares) == (one_pair.peak_bytes, one_pair.shares)


def test_cli_fake_run_reports_the_experts_without_a_library_traceback(tmp_path):
    out = str(tmp_path / "moe.json")
    args = [
        "run",
        "hf:mixtral",
        "--seq-len",
        "16",
        "-b",
        "2",
        "-t",
        "e2e,db:2",
        "--fake",
        "--no-report",
        "--json",
        "-o",
        out,
    ]
    for key, value in TINY_MIXTRAL.items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "grouped_mm" not in result.output
    assert '"expert_parameter_share"' in result.output
    table = CliRunner().invoke(main, [a for a in args if a != "--json"] + ["-o", str(tmp_path / "again.json")])
    assert table.exit_code == 0, table.output
    assert re.search(
        r"MoE blocks at the peak of db:2 @ batch 2: .* activations \(\d+\.\d%\) made by routers", table.output
    )


def test_observe_routing_counts_every_token_slot():
    from dbprofile.models.hf_moe import observe_routing

    spec = load_model("hf:mixtral", TINY_MIXTRAL, seq_len=16)
    model = spec.build()
    with observe_routing(model) as seen, torch.no_grad():
        spec.loss(model, spec.batch(2, "cpu"))
    assert [sum(layer) for layer in seen["tokens_per_expert"]] == [2 * 16 * 2] * 2


def test_moe_blocks_bytes_at_the_peak_extrapolate_with_depth_to_the_byte():
    from dbprofile.measure.depth import PATH_EXTRAPOLATED, identical_layers, measure_fake
    from dbprofile.techniques import parse_technique

    # 20 layers: DiffusionBlocks at B = 2 is traced at 4, 6 and 8 layers, together fewer than 20
    spec = load_model("hf:mixtral", {**TINY_MIXTRAL, "num_hidden_layers": "20"}, seq_len=16)
    layers, different = identical_layers(spec)
    tech = parse_technique("db:2")
    fast = measure_fake(spec, tech, 8, layers=layers, not_identical=different)
    full = measure_fake(spec, tech, 8, layers=layers, not_identical=different, full_trace=True)
    assert fast.extra["depth"]["path"] == PATH_EXTRAPOLATED
    assert (fast.peak_bytes, fast.shares) == (full.peak_bytes, full.shares)
    assert fast.extra["moe_at_peak"] == full.extra["moe_at_peak"]
    assert fast.extra["moe_at_peak"]["activations"] > 0
