"""Fake-tensor mode: nothing is allocated, and tracked bytes equal a real CPU run's exactly."""

from __future__ import annotations

import torch
from _toy import toy_spec

from dbprofile.measure.fake import fake_mode, is_fake
from dbprofile.measure.runner import measure


def test_fake_mode_builds_and_steps_without_real_tensors():
    spec = toy_spec(width=4096, depth=2)  # ~270 MB of fp32 parameters if it were real
    with fake_mode():
        model = spec.build()
        batch = spec.batch(64, "cpu")
        loss = spec.loss(model, batch)
        loss.backward()
    assert all(is_fake(p) for p in model.parameters())
    assert is_fake(loss) and all(is_fake(p.grad) for p in model.parameters())
    assert model.blocks[0].fc1.weight.device == torch.device("cpu")


def test_fake_run_tracks_the_same_bytes_as_a_real_cpu_run_to_the_byte():
    spec = toy_spec(depth=4)
    for tech in ("e2e", "ckpt", "db:2"):
        real = measure(spec, tech, 8)
        fake = measure(spec, tech, 8, fake=True)
        assert real.status == fake.status == "ok", (real.error, fake.error)
        assert fake.fake and fake.step_time_s is None
        assert fake.peak_bytes == real.peak_bytes, tech
        assert fake.shares == real.shares, tech
        assert fake.peak_phase == real.peak_phase
        assert [b.shares for b in fake.blocks] == [b.shares for b in real.blocks]


def test_fake_run_honours_the_memory_limit():
    spec = toy_spec()
    m = measure(spec, "e2e", 8, fake=True, memory_limit=10_000)
    assert m.status == "oom"
