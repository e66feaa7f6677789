"""Tagging the storages a group of modules makes: where a mixture-of-experts step's routed bytes are.

A model spec may name modules whose forward makes memory a report should show apart
(``ModelSpec.routed_modules``: a mixture-of-experts model's sparse blocks, i.e. router, dispatch,
experts and the weighted combine). While one of their forwards runs, including the second forward
that checkpointing runs in the backward, every storage the tracker first sees is tagged, and the
tracker counts tagged bytes by category beside its totals; ``StepRecord.tagged_shares`` holds them
at the step's peak. A storage made before the region and only saved inside it (the hidden states
entering the experts) is not tagged: the tag says where memory was made, not who keeps it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from dbprofile.measure.tracker import Tracker


@contextlib.contextmanager
def tagging(tracker: Tracker, modules: Sequence[nn.Module]) -> Iterator[None]:
    """Tag what ``modules``' forwards make, for as long as the block runs."""

    def enter(_module: nn.Module, _args: Any) -> None:
        tracker.tagging += 1

    def leave(_module: nn.Module, _args: Any, _out: Any) -> None:
        tracker.tagging -= 1

    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(enter))
        # always_call: a forward that raises still closes its tag
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        tracker.tagging = 0
