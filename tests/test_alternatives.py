"""The techniques a team runs before DiffusionBlocks (selective checkpointing, activation offloading,
gradient accumulation): their names, their bytes against independent counts, fake against real to
the byte, and the accumulating step's peak."""

from __future__ import annotations

import pytest
import torch
from _toy import toy_spec

from dbprofile.loading import load_spec
from dbprofile.measure.runner import measure
from dbprofile.measure.tracker import Tracker
from dbprofile.methods import make_trainer
from dbprofile.methods.selective import SAVED_OPS
from dbprofile.spec import SpecError, get_layers
from dbprofile.techniques import parse_technique
from dbprofile.torch_internals import TorchDispatchMode


def test_names_parse_and_bad_ones_say_what_exists():
    assert parse_technique("sac").name == "sac" and parse_technique("sac:all").name == "sac"
    assert parse_technique("sac:alt").policy == "alt" and parse_technique("offload").kind == "offload"
    assert parse_technique("sac").recomputes and not parse_technique("offload").recomputes
    with pytest.raises(SpecError, match=r"Unknown selective checkpointing technique 'sac:every'.*sac:alt"):
        parse_technique("sac:every")
    for bad in ("sac+ckpt", "offload:2", "e2e+offload", "offload+sac"):
        with pytest.raises(SpecError):
            parse_technique(bad)


@pytest.mark.parametrize("model", ["vit-tiny", "gpt-tiny"])
@pytest.mark.parametrize("technique", ["sac", "sac:alt", "offload"])
def test_fake_bytes_equal_real_cpu_bytes(model, technique):
    real = measure(model, technique, 4, steps=1)
    fake = measure(model, technique, 4, fake=True)
    assert real.ok and fake.ok
    assert (real.peak_bytes, real.shares, real.peak_phase) == (fake.peak_bytes, fake.shares, fake.peak_phase)
    assert real.extra.get("host_transfer") == fake.extra.get("host_transfer")
    assert real.training_flops == fake.training_flops


def _activations_when_backward_starts(spec, technique: str) -> int:
    """The tracker's activation bytes at the instant the tracked step's backward begins."""
    torch.manual_seed(0)
    trainer = make_trainer(parse_technique(technique), spec, torch.device("cpu"))
    with Tracker("cpu", trainer=trainer) as tracker:
        trainer.step(spec.batch(4, "cpu"), None, tracker.mark)
        tracker.begin_step()
        trainer.step(spec.batch(4, "cpu"), None, tracker.mark)
        tracker.end_step()
    return dict(tracker.phase_snapshots)["backward"]["activations"]


class SavedOpOutputs(TorchDispatchMode):
    """Bytes of the outputs of the ops the SAC policy saves, while ``inside`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = False
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.inside and func in SAVED_OPS:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.bytes += sum(t.untyped_storage().nbytes() for t in outs if isinstance(t, torch.Tensor))
        return out


@pytest.mark.parametrize("model", ["vit-tiny", "gpt-tiny"])
def test_sac_saves_the_outputs_of_the_policys_ops_on_top_of_the_layer_inputs(model):
    spec = load_spec(model)
    # Independent count: a plain forward, the saved ops' outputs inside the residual layers.
    torch.manual_seed(0)
    net = spec.build()
    counter = SavedOpOutputs()
    for layer in get_layers(net, spec.layers):
        layer.register_forward_pre_hook(lambda *_: setattr(counter, "inside", True))
        layer.register_forward_hook(lambda *_: setattr(counter, "inside", False))
    with counter:
        spec.loss(net, spec.batch(4, "cpu"))
    assert counter.bytes > 0
    ckpt = _activations_when_backward_starts(spec, "ckpt")
    assert _activations_when_backward_starts(spec, "sac") == ckpt + counter.bytes


def test_offload_moves_every_saved_non_parameter_tensor_of_the_layers():
    spec = load_spec("vit-tiny")
    torch.manual_seed(0)
    net = spec.build()
    params = {p.untyped_storage()._cdata for p in net.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage()._cdata not in params:
            saved.append(t.numel() * t.element_size())
        return t

    for layer in get_layers(net, spec.layers):
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        layer.register_forward_pre_hook(lambda *_, h=hooks: h.__enter__())
        layer.register_forward_hook(lambda *_, h=hooks: h.__exit__(None, None, None))
    spec.loss(net, spec.batch(4, "cpu"))
    m = measure("vit-tiny", "offload", 4, fake=True)
    assert m.extra["host_transfer"] == {"to_host_bytes": sum(saved), "to_device_bytes": sum(saved)}
    e2e = measure("vit-tiny", "e2e", 4, fake=True)
    assert m.peak_bytes < e2e.peak_bytes and m.shares["activations"] < e2e.shares["activations"] / 10


def test_accumulating_step_peaks_with_every_gradient_resident_and_two_micro_batches_are_enough():
    plain = measure("vit-tiny", "e2e", 4, fake=True)
    two = measure("vit-tiny", "e2e", 4, fake=True, micro_batches=2)
    three = measure("vit-tiny", "e2e", 4, fake=True, micro_batches=3)
    real = measure("vit-tiny", "e2e", 4, steps=1, micro_batches=2)
    parameter_bytes = plain.shares["parameters"]
    assert two.peak_bytes > plain.peak_bytes and two.peak_phase == "backward"
    assert two.shares["gradients"] == parameter_bytes  # all of them, through the second backward
    assert (three.peak_bytes, three.shares) == (two.peak_bytes, two.shares)
    assert (real.peak_bytes, real.shares) == (two.peak_bytes, two.shares)
    assert two.training_flops == 2 * plain.training_flops and two.extra["micro_batches"] == 2


def test_accumulating_micro_batches_of_one_batch_take_the_plain_steps_update():
    spec = toy_spec()
    batch = spec.batch(6, "cpu")
    weights = []
    for micro in (1, 3):
        torch.manual_seed(0)
        trainer = make_trainer(parse_technique("e2e"), spec, torch.device("cpu"))
        trainer.micro_batches = micro
        trainer.step(batch)
        weights.append([p.detach().clone() for p in trainer.model.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
