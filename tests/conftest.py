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


@pytest.fixture(autouse=True)
def trace_cache_of_its_own(monkeypatch, tmp_path_factory):
    """Every test plans with an empty trace cache of its own (dbprofile.planner.trace_cache), never
    the user's, and in one process: a test sees what a first plan does, and leaves nothing behind."""
    monkeypatch.setenv("DBPROFILE_CACHE_DIR", str(tmp_path_factory.mktemp("trace-cache")))
    # One process: tests spy on the fake runs in this process (tests/test_workers.py asks for workers).
    monkeypatch.setenv("DBPROFILE_WORKERS", "1")
