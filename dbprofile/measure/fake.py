"""Fake-tensor mode: run the same training code without allocating any memory.

Under ``fake_mode()`` every tensor (parameters built by ``spec.build()``, the batch, the
activations, gradients and optimizer state) is a ``FakeTensor`` on the CPU: it has shapes,
dtypes, strides and a storage size, but no data. The tracker counts storage bytes, which
fake storages report exactly as real ones do, so a fake run's tracked bytes equal a real
CPU run's to the byte while using almost no memory and little time. Values are meaningless
(a loss is never finite-checked in fake mode).

Example::

    with fake_mode():
        model = spec.build()          # allocates nothing
        loss = spec.loss(model, spec.batch(8, "cpu"))
        loss.backward()
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from dbprofile.measure._torch_private import fake_tensor_mode, is_fake

__all__ = ["fake_mode", "is_fake"]


@contextlib.contextmanager
def fake_mode() -> Iterator[None]:
    """Make every tensor created inside fake (no memory), with the CPU as its device."""
    # Fake tensors must report the CPU even if a caller changed the default device.
    with torch.device("cpu"), fake_tensor_mode():
        yield
