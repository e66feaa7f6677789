"""Test-wide settings: one intra-op thread per pytest-xdist worker (one worker per core, so the
cores are busy without oversubscribing them: the suite's models are tiny and more threads per
step made steps slower, not faster); and a short timing budget."""

import pytest
import torch

from dbprofile.measure import steps

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def short_timing(monkeypatch):
    """Tests check what timing records, not how well: 0.05 s to 0.5 s of timed steps per
    technique instead of 1 s to 10 s keeps the suite's many real runs fast."""
    monkeypatch.setattr(steps, "MIN_TIME_S", 0.05)
    monkeypatch.setattr(steps, "MAX_TIME_S", 0.5)
