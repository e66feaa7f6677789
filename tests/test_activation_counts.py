"""DiffusionBlocks' activation ratios from shallow counts (dbprofile.measure.activation_counts) must
equal the direct full-depth count (layer_activation_bytes) to the byte, and fall back to it where the
layers differ or the model is too shallow."""

from __future__ import annotations

import dataclasses

import pytest
from _toy import toy_spec
from torch import nn

from dbprofile.measure import activation_counts
from dbprofile.measure.activation_counts import activation_ratios
from dbprofile.measure.fake import fake_mode
from dbprofile.methods.diffusion_blocks import activations
from dbprofile.methods.diffusion_blocks.activations import layer_activation_bytes
from dbprofile.models import get_preset


@pytest.mark.parametrize(
    "name,depth,layout",
    [
        ("llama-tiny", 10, "concatenated"),
        ("llama-tiny", 10, "interleaved"),
        ("gpt-tiny", 7, "concatenated"),
        ("vit-tiny", 6, "concatenated"),
        ("dit-tiny", 6, "concatenated"),
    ],
)
def test_shallow_counts_equal_the_full_depth_count_to_the_byte(name, depth, layout):
    spec = get_preset(name).at_depth(depth)
    with fake_mode():
        for blocks in (2, 3, 4):  # 3 and 4 split 10, 7 and 6 layers unevenly
            fast = activation_ratios(spec, blocks, 2, lm_layout=layout)
            assert fast == layer_activation_bytes(spec, blocks, 2, lm_layout=layout)
            assert fast["block_layers_bytes"] < fast["full_depth_adaln_bytes"]


def test_every_block_count_of_a_spec_shares_one_set_of_shallow_counts(monkeypatch):
    calls = []
    real = activation_counts.saved_layer_bytes

    def counting(spec, *args, **kwargs):
        calls.append(spec)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(activation_counts, "saved_layer_bytes", counting)
    spec = get_preset("llama-tiny").at_depth(8)
    with fake_mode():
        for blocks in (2, 3, 4):
            activation_ratios(spec, blocks, 2)
    assert len(calls) == 3  # depths 1, 2, 3, once for the three block counts


def _recording_full_counts(monkeypatch) -> list:
    calls: list = []
    real = activation_counts.layer_activation_bytes

    def recording(spec, *args, **kwargs):
        calls.append(spec)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(activation_counts, "layer_activation_bytes", recording)
    return calls


def test_layers_that_differ_or_too_few_are_counted_at_full_depth(monkeypatch):
    full_counts = _recording_full_counts(monkeypatch)
    toy = toy_spec(depth=5, name="toy-uneven")

    def wider_last_layer() -> nn.Module:
        model = toy.build()
        model.blocks[4].fc1 = nn.Linear(32, 96)
        model.blocks[4].fc2 = nn.Linear(96, 32)
        return model

    uneven = dataclasses.replace(toy, build=wider_last_layer)
    shallow = toy_spec(depth=3, name="toy-shallow")
    with fake_mode():
        for spec in (uneven, shallow):
            assert activation_ratios(spec, 2, 2) == activations.layer_activation_bytes(spec, 2, 2)
    assert full_counts == [uneven, shallow]


def test_a_count_off_the_line_falls_back_to_the_full_depth_count(monkeypatch):
    full_counts = _recording_full_counts(monkeypatch)
    real = activations.saved_layer_bytes

    def third_depth_one_byte_off(spec, *args, **kwargs):
        plain, conditioned = real(spec, *args, **kwargs)
        return (plain + 1, conditioned) if len(spec.build().blocks) == 3 else (plain, conditioned)

    monkeypatch.setattr(activation_counts, "saved_layer_bytes", third_depth_one_byte_off)
    spec = toy_spec(depth=6, name="toy-off-the-line")
    with fake_mode():
        assert activation_ratios(spec, 2, 2) == activations.layer_activation_bytes(spec, 2, 2)
    assert full_counts == [spec]
