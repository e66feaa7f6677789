"""The optimizer's implementation (loop, foreach, fused): what each step holds beyond the state,
against an independent count from PyTorch's own step code (torch/optim/adam.py), and how a bare
name follows PyTorch's default for the device."""

from __future__ import annotations

import pytest
import torch
from _toy import toy_spec

from dbprofile.measure.runner import measure
from dbprofile.measure.tracker import Tracker
from dbprofile.methods import make_trainer
from dbprofile.planner import plan
from dbprofile.settings import RunSettings, resolve_optimizer
from dbprofile.spec import SpecError
from dbprofile.techniques import parse_technique
from dbprofile.vocabulary import CATEGORIES, PHASES


def _optimizer_step_peak(optimizer: str) -> tuple[dict[str, int], dict[str, int], list[torch.Tensor]]:
    """A real CPU step of the toy model: (shares at the optimizer phase's highest point, shares when
    the phase began, the parameters)."""
    spec = toy_spec(width=64, depth=3)
    trainer = make_trainer(parse_technique("e2e"), spec, torch.device("cpu"), optimizer=optimizer)
    with Tracker("cpu", trainer=trainer, keep_trace=True) as tracker:
        batch = spec.batch(2, "cpu")
        tracker.set_inputs(batch)
        trainer.step(batch, None, tracker.mark)  # warm-up: the state exists
        tracker.begin_step()
        trainer.step(batch, None, tracker.mark)
        record = tracker.end_step()
    assert record.trace is not None
    # A trace point is [phase index, bytes per category...].
    points = [p for _, p in record.trace if p[0] == PHASES.index("optimizer")]
    top = max(points, key=lambda p: sum(p[1:]))
    return dict(zip(CATEGORIES, top[1:])), dict(tracker.phase_snapshots)["optimizer"], list(trainer.model.parameters())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _loop_temporaries(sizes: list[int]) -> int:
    return max(2 * size + (sizes[i - 1] if i else 0) for i, size in enumerate(sizes))


@pytest.mark.parametrize(
    ("optimizer", "temporaries"),
    [
        # _single_tensor_adam, one parameter at a time: exp_avg_sq.sqrt() and its division by the bias
        # correction, while the previous parameter's denominator is still bound to ``denom``.
        ("adamw-loop", lambda params: _loop_temporaries([_nbytes(p) for p in params])),
        # _multi_tensor_adam: _foreach_sqrt over every parameter of the (device, dtype) group, the
        # divisions and the eps in place: one copy of all parameters (fp32, one group).
        ("adamw-foreach", lambda params: sum(_nbytes(p) for p in params)),
        # _fused_adamw_ works in place: the phase's highest point is the clipping before it, one fp32
        # norm per gradient (_foreach_norm), their stack and the total norm.
        ("adamw-fused", lambda params: 4 * len(params) * 2 + 4),
    ],
)
def test_each_implementations_step_peak_holds_its_own_temporaries(optimizer, temporaries):
    top, at_start, params = _optimizer_step_peak(optimizer)
    p_bytes = sum(_nbytes(p) for p in params)
    assert top["parameters"] == p_bytes and top["gradients"] == p_bytes
    # exp_avg and exp_avg_sq, and one fp32 step count per parameter (on the CPU for every implementation).
    assert top["optimizer_state"] == 2 * p_bytes + 4 * len(params)
    assert top["temporaries"] - at_start["temporaries"] == temporaries(params)


def test_a_bare_name_is_pytorchs_default_for_the_device():
    assert resolve_optimizer("adamw", cuda=True) == "adamw-foreach"
    assert resolve_optimizer("adamw", cuda=False) == "adamw-loop"
    assert resolve_optimizer("sgd-fused", cuda=False) == "sgd-fused"
    trainer = make_trainer(parse_technique("e2e"), toy_spec(), torch.device("cpu"))
    assert trainer.optimizer_name == "adamw-loop"
    assert trainer.optimizer.defaults["foreach"] is False


def test_fused_adafactor_is_refused_in_one_paragraph_before_anything_runs():
    with pytest.raises(SpecError, match="no fused implementation.*Nothing was measured"):
        RunSettings(optimizer="adafactor-fused")
    with pytest.raises(SpecError, match="adafactor-fused"):
        plan(toy_spec(), 2, device="H100-80GB", techniques="e2e", optimizer="adafactor-fused")


def test_a_gpu_plan_runs_the_foreach_step_by_default():
    default = plan(toy_spec(width=64, depth=3), 1, device="H100-80GB", techniques="e2e", search_max_batch=False)
    loop = plan(
        toy_spec(width=64, depth=3),
        1,
        device="H100-80GB",
        techniques="e2e",
        optimizer="adamw-loop",
        search_max_batch=False,
    )
    assert default.optimizer == "adamw-foreach" and loop.optimizer == "adamw-loop"
    assert default.entries[0].tracked_peak_bytes > loop.entries[0].tracked_peak_bytes


@pytest.mark.parametrize("optimizer", ["adafactor-loop", "adafactor-foreach"])
def test_adafactor_runs_on_fake_tensors_and_tracks_a_real_cpu_runs_bytes(optimizer):
    """Adafactor reads numbers inside its step (the step count, each parameter's and update's norm, with
    ``.item()``), which fake tensors do not hold: the planner answers them with a stand-in
    (torch_internals.optimizer_scalar_reads). They only scale the update, so every byte is the real step's."""
    spec = toy_spec(depth=4)
    for tech in ("e2e", "db:2"):
        real = measure(spec, tech, 8, optimizer=optimizer)
        fake = measure(spec, tech, 8, fake=True, optimizer=optimizer)
        assert real.ok and fake.ok, (real.error, fake.error)
        assert (fake.peak_bytes, fake.shares, fake.peak_phase) == (real.peak_bytes, real.shares, real.peak_phase)
    planned = plan(toy_spec(), 2, device="H100-80GB", techniques="e2e", optimizer="adafactor", search_max_batch=False)
    assert planned.entries[0].ok and planned.optimizer == "adafactor-foreach"
