"""The planner: what each technique would need for this model, batch size and GPU, before
anyone books the GPU.

``plan()`` runs the real training code of every technique in fake-tensor mode (the
measurement runner with ``fake=True``: no memory, seconds even for a 7B model), takes each
tracked peak and its shares, applies sharding (ZeRO stages 1-3 / FSDP over a world size, or
DiffusionBlocks block-parallel, one block per device) and, for a CUDA target, the CUDA
effects a tensor tracker cannot see (the constants below, each with its source). It then
says what fits, the headroom, and the largest batch size that fits, found from a linear
model ``peak(b) = fixed + per_sample * b`` fitted on two fake runs and confirmed by a third.
A plan where nothing fits is an answer, not an error: every entry says by how much it misses
(``shortfall_bytes``), and ``nothing_fits_summary`` says it in one paragraph with the largest
batch size that does fit. ``fits_on`` answers "does it fit?" for the plan's target or another
GPU; dbprofile.report.text and dbprofile.report.notebook render a ``Plan`` as text and HTML.

Modules: ``predict`` (``plan()``), ``targets`` (the target GPU and the CUDA corrections),
``zero`` (ZeRO sharding and block-parallel arithmetic), ``fit`` (fit, headroom, largest batch).

ZeRO-3 (FSDP) and block-parallel predictions with the real fake runner do not use that arithmetic:
one rank of the real FSDP2 / block-parallel code runs on fake tensors in a fake process group
(``dbprofile.measure.distributed.simulate_rank``), so FSDP's prefetch, padding, root unit and
communication buffers are in the prediction (docs/distributed.md).

Known limitations (stages 1-2, and stage 3 with a stand-in ``measure_fn`` or inside a running
process group): the shares at the instant of the peak are sharded as a whole (the peak
may move to another instant under sharding); ZeRO adds one gathered unit (the largest
layer or the root's own parameters, and their gradients when the peak is in the backward),
not FSDP's prefetch of the next unit, nor communication buffers; step times are not
predicted. The CUDA corrections were measured on an H100 (reports/gpu-validation-h100.md).
"""

import importlib
from typing import TYPE_CHECKING, Any

from dbprofile.planner.fit import fits_on, nothing_fits
from dbprofile.planner.targets import (
    ALLOCATOR_OVERHEAD_FRACTION,
    ASSUMED_UTILISATION,
    CUDA_CONTEXT_BYTES,
    cuda_context_bytes,
    cuda_corrections,
    resolve_target,
    time_per_million_samples,
)
from dbprofile.results import views

if TYPE_CHECKING:
    from dbprofile.planner.predict import plan
    from dbprofile.planner.zero import ModelFacts, block_parallel, shard_zero

views.install_fits(fits_on)

LAZY = {
    "plan": "dbprofile.planner.predict",
    "ModelFacts": "dbprofile.planner.zero",
    "block_parallel": "dbprofile.planner.zero",
    "shard_zero": "dbprofile.planner.zero",
}
"""Names whose modules import torch, imported when first used (PEP 562): a plan read from the
trace cache (dbprofile.cli.warm_plan) needs ``nothing_fits`` and ``Plan.fits``, not torch."""


def __getattr__(name: str) -> Any:
    if name not in LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(LAZY))


__all__ = [
    "ALLOCATOR_OVERHEAD_FRACTION",
    "ASSUMED_UTILISATION",
    "CUDA_CONTEXT_BYTES",
    "ModelFacts",
    "block_parallel",
    "cuda_context_bytes",
    "cuda_corrections",
    "fits_on",
    "nothing_fits",
    "plan",
    "resolve_target",
    "shard_zero",
    "time_per_million_samples",
]
