"""Seeded randomness shared by the models (weights, synthetic batches) and the methods
(DiffusionBlocks' extra modules): one definition, in a module both may import."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run with the CPU generator at ``seed``, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def data_generator(seed: int) -> torch.Generator:
    """A CPU generator for batches: the same seed gives the same batch every call."""
    return torch.Generator().manual_seed(seed)
