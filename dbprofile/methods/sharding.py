"""Sharded and block-parallel training on PyTorch's own distributed engine.

Two ways to spread one technique over the ranks of a process group (launched by ``torchrun``):

- FSDP2 sharding (``--fsdp``, ZeRO-3 style): ``torch.distributed.fsdp.fully_shard`` is applied to
  every residual layer (its own all-gather / reduce-scatter unit) and to a root module that holds
  everything else (stem, head, embeddings, DiffusionBlocks' sigma embedder and label or target
  embedding). The root is ``LossRoot``: a module whose ``forward`` is the technique's loss, so
  FSDP's root hooks run around exactly what a step computes even when a technique calls parts of
  the model directly (DiffusionBlocks' loss reads its label embedding outside ``model.forward``).
  It composes with ``e2e``, ``ckpt``/``ckpt:k`` (the checkpointed segments call the sharded
  layers, so the recompute all-gathers again, as FSDP2 with activation checkpointing does) and
  ``db:B``/``db:B+ckpt`` (every rank steps the same block, so their collectives match).
  ``db:B+offload`` moves parameters between host and device itself and is refused.
- DiffusionBlocks block-parallel (``db:B+parallel``, world size == B): rank b holds the shared
  parts and block b only (the other blocks' layers live on the ``meta`` device: no memory) and
  trains block b every step. The shared parts' gradients are ALL-REDUCED (averaged) after each
  backward, not replicated-and-left-alone: the blocks of one DiffusionBlocks model must share one
  stem, head and label/target embedding (the sampler chains the blocks through them), and
  averaging their gradients is exactly the reference's single AdamW seeing gradients from B block
  steps at once. The cost is one all-reduce of the shared parameters' gradients per step; no
  activation ever crosses ranks, and no block's layers are communicated.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dbprofile.methods.base import make_optimizer
from dbprofile.methods.checkpointing import CheckpointedSegment
from dbprofile.methods.factory import make_trainer
from dbprofile.methods.tensor_parallel import parallelize_layers
from dbprofile.spec import Batch, ModelSpec, SpecError, get_layers
from dbprofile.techniques import Technique, check_technique_fits
from dbprofile.torch_internals import (
    device_meshes_outside_fake_mode,
    dtensor_local,
    fsdp_lazy_init,
    fsdp_shards_by_narrow,
    is_fake,
)

SHARDING_FSDP = "zero-3"
SHARDING_BLOCK_PARALLEL = "block-parallel"


def tp_param_groups(trainer: Any) -> list[dict[str, Any]]:
    """The trainer's parameters for an optimizer under tensor parallelism without FSDP: the split
    weights (DTensors) and the replicated rest (plain tensors) as two parameter groups. A foreach or
    fused step runs one multi-tensor kernel per group, and DTensor refuses a kernel mixing the two
    kinds ("got mixed torch.Tensor and DTensor"), so a team training TP alone groups them the same
    way (under FSDP every parameter is a DTensor and one group serves)."""
    from torch.distributed.tensor import DTensor

    params = list(trainer.trainable_parameters())
    split = [p for p in params if isinstance(p, DTensor)]
    whole = [p for p in params if not isinstance(p, DTensor)]
    return [{"params": group} for group in (split, whole) if group]


def check_distributed(dtech: Technique, spec: ModelSpec, model: nn.Module, world_size: int, fsdp: bool) -> None:
    """Input errors that need the model and the world size; raise SpecError saying how to fix them.

    ``model`` is the user's model as built (fake tensors are fine: only shapes are read).
    """
    layers = get_layers(model, spec.layers, spec.name)
    tech = dtech.on_one_device()
    check_technique_fits(tech, len(layers))
    if dtech.parallel:
        if world_size != tech.blocks:
            raise SpecError(
                f"Technique {dtech.name!r} trains one block per rank, so it needs exactly {tech.blocks} processes; "
                f"this run has {world_size}. Launch with --nproc-per-node {tech.blocks} (or --nproc {tech.blocks}), "
                f"or use db:{world_size}+parallel."
            )
        if fsdp:
            raise SpecError(
                f"Technique {dtech.name!r} is block-parallel (each rank holds its own block whole); it does not "
                "combine with --fsdp. Drop --fsdp, or use plain db:B with --fsdp."
            )
        return
    if not fsdp:
        return
    if tech.kind == "offload":
        raise SpecError(
            f"Technique {tech.name!r} copies each layer's saved tensors to host memory, and under FSDP a layer "
            "saves the full parameters FSDP gathered for it, which it would copy too. Offload with FSDP is not "
            "measured: use e2e, ckpt or sac with --fsdp (or --zero 3 in a plan), or offload on one device."
        )
    if tech.offload:
        raise SpecError(
            f"Technique {tech.name!r} moves each block's parameters between host and device itself, which "
            "FSDP's sharded parameters do not allow. With --fsdp use db:B or db:B+ckpt."
        )
    # FSDP2 shards every parameter on dim 0 (padding the last shard). A layer whose largest parameter
    # has fewer rows than there are ranks leaves ranks with nothing of it: the layers cannot be
    # sharded over that many ranks as asked.
    for index, layer in enumerate(layers):
        rows = max((p.shape[0] for p in layer.parameters() if p.dim() > 0), default=0)
        if rows < world_size:
            raise SpecError(
                f"World size {world_size} cannot shard layer {index} of {spec.layers!r} in {spec.name!r}: FSDP "
                f"shards each parameter on its first dimension, and this layer's largest parameter has only "
                f"{rows} rows, so some ranks would hold none of it. Use at most {rows} processes."
            )


# ---------------------------------------------------------------- FSDP2


class LossRoot(nn.Module):
    """FSDP's root unit: ``forward(batch, unit)`` is the technique's loss on its own model."""

    def __init__(self, trainer) -> None:
        super().__init__()
        self.model = trainer.model
        self._loss = trainer.compute_loss  # the technique's own bound method

    def forward(self, batch: Batch, unit: int | None) -> torch.Tensor:
        return self._loss(batch, unit)


def residual_layers(trainer, spec: ModelSpec) -> list[nn.Module]:
    """The residual layer modules of a trainer's model (inside checkpointed segments, AdaLN wrappers)."""
    from dbprofile.methods.diffusion_blocks import BlockwiseModel

    model = trainer.model
    # A BlockwiseModel's own list holds every (AdaLN-wrapped) layer, even while a step has swapped
    # the user's list for the active block's.
    found = list(model.layers) if isinstance(model, BlockwiseModel) else list(get_layers(model, spec.layers, spec.name))
    out: list[nn.Module] = []
    for module in found:
        out.extend(module.layers if isinstance(module, CheckpointedSegment) else [module])
    return out


def shard_trainer(trainer, spec: ModelSpec, mesh=None, reshard_after_forward: bool = True):
    """Apply FSDP2 to ``trainer``: each residual layer, then the ``LossRoot``; rebuild its optimizer
    over the sharded parameters (FSDP replaces them by DTensors). Returns the same trainer."""
    from torch.distributed.fsdp import fully_shard

    lr = trainer.optimizer.param_groups[0]["lr"] if trainer.optimizer.param_groups else 1e-3
    for layer in residual_layers(trainer, spec):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    root = LossRoot(trainer)
    fully_shard(root, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # Trainer.step calls self.compute_loss: route it through the root so FSDP's root hooks run.
    trainer.compute_loss = root
    trainer.fsdp_root = root
    _replace_optimizer(trainer, make_optimizer(trainer.optimizer_name, trainer.trainable_parameters(), lr=lr))
    trainer.sharding = SHARDING_FSDP
    return trainer


def unshard_once(trainer) -> None:
    """What FSDP's first step makes and keeps, without a step: the root's lazy initialisation, then
    every FSDP module's unsharded parameters all-gathered and freed again (FSDP2's public ``unshard``
    and ``reshard``; their storages stay, resized to 0, as between two steps). The planner's state
    without warm-up steps (dbprofile.measure.warmup) runs it before it makes the optimizer state.
    Nothing for a trainer without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    root = getattr(trainer, "fsdp_root", None)
    if not isinstance(root, FSDPModule):
        return
    fsdp_lazy_init(root)
    for module in [root, *trainer.model.modules()]:
        if isinstance(module, FSDPModule):
            module.unshard()
            module.reshard()


def _replace_optimizer(trainer, optimizer: torch.optim.Optimizer) -> None:
    """Swap in ``optimizer`` and free the old one now. An optimizer sits in a reference cycle, so
    without a collection the old one keeps the parameters it was built over (the unsharded ones,
    or every block's) allocated, unseen by the tracker: 88 MB of vit-s16 on an H100. Not for fake
    parameters (the planner's simulated ranks), which hold no memory: there a full collection cost
    0.1 to 0.2 s per trace, about 5% of a ZeRO-3 llama-70b plan."""
    trainer.optimizer = optimizer
    if not _fake(p for group in optimizer.param_groups for p in group["params"][:1]):
        gc.collect()


def _fake(params) -> bool:
    """Whether these (possibly sharded) parameters are fake: the planner's simulated ranks."""
    return any(is_fake(dtensor_local(p)) for p in params)


# ---------------------------------------------------------------- block-parallel DiffusionBlocks


def _block_parallel_class():
    from dbprofile.methods.diffusion_blocks import DiffusionBlocksTrainer

    class BlockParallelTrainer(DiffusionBlocksTrainer):
        """db:B+parallel on rank b: block b and the shared parts only; shared gradients all-reduced."""

        sharding = SHARDING_BLOCK_PARALLEL
        group = None

        def resolve_unit(self, unit: int | None) -> int | None:
            return self.units[0] if unit is None else unit  # the rank's own block

        def reduce_gradients(self) -> None:
            """Average the shared parameters' gradients over the ranks, in place, in a fixed order
            (every rank runs the same stem and head, so every rank has the same list)."""
            world = dist.get_world_size(self.group)
            for p in self.model.shared_parameters():
                if not p.requires_grad:
                    continue
                if p.grad is None:  # a shared part this block did not use: contribute zeros
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=self.group)
                p.grad.div_(world)

    return BlockParallelTrainer


def make_block_parallel_trainer(
    tech: Technique,
    spec: ModelSpec,
    device: torch.device,
    rank: int,
    precision: str = "fp32",
    optimizer: str = "adamw",
    lr: float = 1e-3,
    group=None,
):
    """The db:B+parallel trainer of ``rank``: block ``rank``'s layers and the shared parts on the
    device, every other block's layers on ``meta`` (no memory), one optimizer over what it holds."""
    cls = _block_parallel_class()
    trainer = cls.create(tech, spec, device, precision=precision, optimizer=optimizer, lr=lr)
    model = trainer.model
    for block in range(model.num_blocks):
        if block != rank:
            for index in model.block_layers[block]:
                _to_meta(model.layers[index])
    trainer.units = [rank]
    trainer.group = group
    own = [p for p in model.shared_parameters() + model.block_parameters(rank) if p.requires_grad]
    _replace_optimizer(trainer, make_optimizer(trainer.optimizer_name, own, lr=lr))
    return trainer


def _to_meta(module: nn.Module) -> None:
    """Replace the module's parameters and buffers by ``meta`` placeholders of the same shapes (no
    memory). Swapping entries, not ``module.to('meta')``: fake-tensor parameters cannot be swapped."""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                sub._parameters[name] = nn.Parameter(
                    torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                )
        for name, buf in sub._buffers.items():
            if buf is not None:
                sub._buffers[name] = torch.empty_like(buf, device="meta")


def make_distributed_trainer(
    dtech: Technique,
    spec: ModelSpec,
    device: torch.device,
    rank: int,
    fsdp: bool,
    precision: str = "fp32",
    optimizer: str = "adamw",
    mesh=None,
    tp_mesh=None,
):
    """A ready trainer for this rank: block-parallel, FSDP-sharded, or the technique as on one device;
    with ``tp_mesh`` (a 1-D DeviceMesh of the tensor-parallel group) its layers are first split by
    tensor parallelism (dbprofile.methods.tensor_parallel), then FSDP shards over ``mesh`` (the
    data-parallel dimension): the 2-D FSDP x TP layout."""
    if dtech.parallel:
        return make_block_parallel_trainer(dtech.on_one_device(), spec, device, rank, precision, optimizer)
    trainer = make_trainer(dtech.on_one_device(), spec, device, precision=precision, optimizer=optimizer)
    if tp_mesh is not None and tp_mesh.size() > 1:
        lr = trainer.optimizer.param_groups[0]["lr"] if trainer.optimizer.param_groups else 1e-3
        parallelize_layers(residual_layers(trainer, spec), tp_mesh)
        if not fsdp:
            _replace_optimizer(trainer, make_optimizer(trainer.optimizer_name, tp_param_groups(trainer), lr=lr))
    if fsdp:
        # A simulated rank's shards are taken as one view each (torch_internals).
        narrowed = fsdp_shards_by_narrow() if _fake(trainer.model.parameters()) else contextlib.nullcontext()
        with device_meshes_outside_fake_mode(), narrowed:
            shard_trainer(trainer, spec, mesh=mesh)
    return trainer
