"""Technique names parse into exactly one meaning, and bad names fail with the accepted forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dbprofile.methods.checkpointing import CheckpointedSegment, checkpoint_layers, split_contiguous
from dbprofile.spec import SpecError
from dbprofile.techniques import check_technique_fits, parse_technique, parse_techniques


@pytest.mark.parametrize(
    "text, kind, blocks, segments, ckpt, offload",
    [
        ("e2e", "e2e", None, None, False, False),
        ("ckpt", "ckpt", None, None, False, False),
        ("ckpt:3", "ckpt", None, 3, False, False),
        ("db:4", "db", 4, None, False, False),
        ("db:2+ckpt", "db", 2, None, True, False),
        ("db:3+offload", "db", 3, None, False, True),
        ("db:3+ckpt+offload", "db", 3, None, True, True),
    ],
)
def test_technique_names_round_trip(text, kind, blocks, segments, ckpt, offload):
    tech = parse_technique(text)
    assert (tech.kind, tech.blocks, tech.segments, tech.ckpt, tech.offload) == (kind, blocks, segments, ckpt, offload)
    assert tech.name == text


@pytest.mark.parametrize("text", ["dp:2", "db", "db:0", "ckpt:0", "e2e:2", "e2e+ckpt", "db:2+fast", "db:2+ckpt+ckpt"])
def test_bad_technique_names_are_rejected(text):
    with pytest.raises(SpecError):
        parse_technique(text)


def test_technique_lists_drop_duplicates_in_order():
    assert [t.name for t in parse_techniques("e2e, db:2 ,e2e,ckpt")] == ["e2e", "db:2", "ckpt"]


def test_checkpoint_segments_and_blocks_cannot_exceed_layers():
    with pytest.raises(SpecError, match="ckpt:7"):
        check_technique_fits(parse_technique("ckpt:7"), 6)
    with pytest.raises(SpecError, match="B=7"):
        check_technique_fits(parse_technique("db:7"), 6)
    check_technique_fits(parse_technique("db:6"), 6)


def test_contiguous_split_sizes_differ_by_at_most_one_and_cover_every_layer():
    groups = split_contiguous(7, 3)
    assert [list(g) for g in groups] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [list(g) for g in split_contiguous(4, 4)] == [[0], [1], [2], [3]]


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x.square().mean()


def _saved_bytes(model, x):
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x)
    return loss, sum(saved.values())


def test_checkpointing_keeps_gradients_and_saves_fewer_activations():
    x = torch.randn(64, 16)
    plain, ckpt = _Stack(), _Stack()
    checkpoint_layers(ckpt, "layers", None)
    assert all(isinstance(layer, CheckpointedSegment) for layer in ckpt.layers)
    loss_plain, plain_saved = _saved_bytes(plain, x)
    loss_ckpt, ckpt_saved = _saved_bytes(ckpt, x)
    loss_plain.backward()
    loss_ckpt.backward()
    assert torch.allclose(loss_plain, loss_ckpt)
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)
    assert ckpt_saved < plain_saved


def test_checkpoint_segments_group_contiguous_layers():
    model = _Stack()
    checkpoint_layers(model, "layers", 2)
    assert len(model.layers) == 2 and [len(s.layers) for s in model.layers] == [2, 2]
