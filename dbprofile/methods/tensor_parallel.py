"""Tensor parallelism (Megatron-LM's layout, built with PyTorch's ``parallelize_module`` on DTensor).

Inside every residual layer the attention's fused QKV projection and the MLP's first projection(s)
are sharded column-wise (each rank computes 1/N of the heads and of the FFN width) and the output
projections row-wise (each rank's partial sum is all-reduced), as torchtitan's Llama plan
(``torchtitan/models/llama3/infra/parallelize.py``: ``wq/wk/wv`` and ``w1/w3`` colwise, ``wo`` and
``w2`` rowwise) and Megatron-LM (Shoeybi et al., 2019, section 3) do. Norms, embeddings, the LM head
and DiffusionBlocks' AdaLN modulation stay whole on every rank of the TP group (replicated; FSDP
shards them over the data-parallel dimension when it is combined). Sequence parallelism for the
norms is not built (docs/distributed.md says why).

The fused QKV weight is laid out ``[q | k | v]``; a column-wise shard of it as it stands would give
rank 0 all the queries. ``interleave_qkv`` first reorders its rows so that each rank's contiguous
slice is ``[its q heads | its k heads | its v heads]`` (Megatron's per-group interleaving): the
model computes the same function, and ``SelfAttention`` reads its local head counts from the
output's width. Composed with FSDP2 (``fully_shard`` on the data-parallel mesh dimension) this is
the 2-D FSDP x TP layout torchtitan trains Llama-3-70B with.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from dbprofile.spec import ModelSpec, SpecError, get_layers
from dbprofile.torch_internals import dtensor_local

COLWISE, ROWWISE = "colwise", "rowwise"

ATTENTION_PLAN = {"qkv": COLWISE, "proj": ROWWISE}
MLP_PLANS = (
    {"gate": COLWISE, "up": COLWISE, "down": ROWWISE},  # SwiGLU (Llama)
    {"fc1": COLWISE, "fc2": ROWWISE},  # GELU MLP (GPT-2, ViT, DiT)
)


def transformer_block(layer: nn.Module) -> nn.Module | None:
    """The pre-norm block (``attn`` with ``qkv``/``proj``, and ``mlp``) inside a residual layer (the
    layer itself, or the one an AdaLN-Zero wrapper or checkpointed segment holds), else None."""
    for module in layer.modules():
        attn, mlp = getattr(module, "attn", None), getattr(module, "mlp", None)
        if isinstance(attn, nn.Module) and isinstance(mlp, nn.Module) and _mlp_plan(mlp) is not None:
            if all(isinstance(getattr(attn, name, None), nn.Linear) for name in ATTENTION_PLAN):
                return module
    return None


def _mlp_plan(mlp: nn.Module) -> dict[str, str] | None:
    for plan in MLP_PLANS:
        if all(isinstance(getattr(mlp, name, None), nn.Linear) for name in plan):
            return plan
    return None


def layer_plan(block: nn.Module) -> dict[str, str]:
    """``{submodule path: colwise | rowwise}`` of one block."""
    mlp = block.mlp
    assert isinstance(mlp, nn.Module)
    mlp_plan = _mlp_plan(mlp)
    assert mlp_plan is not None  # transformer_block found it
    return {**{f"attn.{k}": v for k, v in ATTENTION_PLAN.items()}, **{f"mlp.{k}": v for k, v in mlp_plan.items()}}


def check_tensor_parallel(spec: ModelSpec, model: nn.Module, tp: int) -> None:
    """Refuse, in one paragraph saying what would divide, a TP degree the model's layers cannot be split
    by: every layer needs the attention/MLP layout above, and ``tp`` must divide the query heads, the
    key/value heads and the MLP's inner width (each rank computes whole heads and an equal slice)."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise SpecError(f"The tensor-parallel degree (--tp) must be a positive integer; got {tp!r}.")
    if tp == 1:
        return
    for index, layer in enumerate(get_layers(model, spec.layers, spec.name)):
        block = transformer_block(layer)
        if block is None:
            raise SpecError(
                f"Tensor parallelism (--tp {tp}) shards a transformer layer's attention (a fused qkv and a proj "
                f"Linear) and MLP (gate/up/down or fc1/fc2 Linears); layer {index} of {spec.layers!r} in "
                f"{spec.name!r} has no such parts, so it cannot be split. Plan it without --tp (FSDP shards any "
                "layer: --zero 3)."
            )
        attn, mlp = block.attn, block.mlp
        assert isinstance(attn, nn.Module) and isinstance(mlp, nn.Module)
        heads, kv_heads = int(getattr(attn, "num_heads", 0)), int(getattr(attn, "num_kv_heads", 0))
        inner = getattr(mlp, "up", None) or mlp.fc1
        ffn = int(inner.out_features)  # type: ignore[union-attr, arg-type]
        bad = [
            f"{what} ({count})"
            for what, count in (("query heads", heads), ("key/value heads", kv_heads), ("MLP width", ffn))
            if count % tp
        ]
        if bad:
            fits = [d for d in range(2, max(heads, 2) + 1) if heads % d == 0 and kv_heads % d == 0 and ffn % d == 0]
            raise SpecError(
                f"A tensor-parallel degree of {tp} (--tp) does not divide the {' and the '.join(bad)} of "
                f"{spec.name!r}: each TP rank computes whole heads and an equal slice of the MLP. Degrees "
                f"that divide all three: {', '.join(map(str, fits)) or 'none above 1'}."
            )
        return  # the layers of one model share their shapes; the first one decides


def interleave_qkv(attn: nn.Module, tp: int) -> None:
    """Reorder the fused QKV projection's rows (and bias) from ``[q | k | v]`` to ``tp`` contiguous
    slices ``[q_r | k_r | v_r]``: the same function, ready to be sharded column-wise."""
    head_dim, heads, kv_heads = (int(getattr(attn, name)) for name in ("head_dim", "num_heads", "num_kv_heads"))
    qkv = attn.qkv
    assert isinstance(qkv, nn.Linear)  # transformer_block checked it
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    q_per, kv_per = q_rows // tp, kv_rows // tp
    order = []
    for r in range(tp):
        order.append(torch.arange(r * q_per, (r + 1) * q_per))
        order.append(q_rows + torch.arange(r * kv_per, (r + 1) * kv_per))
        order.append(q_rows + kv_rows + torch.arange(r * kv_per, (r + 1) * kv_per))
    index = torch.cat(order).to(qkv.weight.device)
    with torch.no_grad():
        for tensor in (qkv.weight, qkv.bias):
            if tensor is not None:
                tensor.copy_(tensor.index_select(0, index))


def parallelize_layers(layers: list[nn.Module], tp_mesh) -> int:
    """Shard every layer's attention and MLP over ``tp_mesh`` (a 1-D DeviceMesh); returns the count."""
    from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

    styles: dict[str, type[ParallelStyle]] = {COLWISE: ColwiseParallel, ROWWISE: RowwiseParallel}
    tp = tp_mesh.size()
    done = 0
    for layer in layers:
        block = transformer_block(layer)
        if block is None:
            continue
        attn = block.attn
        assert isinstance(attn, nn.Module)
        interleave_qkv(attn, tp)
        plan: dict[str, ParallelStyle] = {path: styles[style]() for path, style in layer_plan(block).items()}
        parallelize_module(block, tp_mesh, plan)
        done += 1
    return done


def meshes_of(params: list[nn.Parameter]) -> list:
    """The distinct device meshes of the parameters' gradients, None standing for plain tensors.
    Distinct by value: a real run's ``fully_shard`` calls may each hold their own mesh object over the
    same ranks (which DTensor treats as one mesh), so identity would split one mesh in two."""
    from torch.distributed.tensor import DTensor

    found: list = []
    for p in params:
        if p.grad is None:
            continue
        mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
        if not any(mesh == m for m in found):
            found.append(mesh)
    return found


def clip_over_meshes(params: list[nn.Parameter], max_norm: float) -> None:
    """``clip_grad_norm_`` for gradients on several meshes (FSDP x TP: the TP-split weights live on the
    2-D mesh, the norms and embeddings on the data-parallel one), which one ``torch.stack`` of their
    norms refuses (and TP alone: split weights as DTensors beside plain norms). Each gradient's norm is
    made whole (``full_tensor``: an all-reduce of one number), the total is the norm of those, and
    every local shard is scaled by the same factor, as torchtitan's ``clip_grad_norm_`` does for
    several meshes. Parameter by parameter, in the model's order, not grouped by mesh: each layer then
    adds the same ops at the same place in the step, which the planner's depth extrapolation needs
    (grouped by mesh, the optimizer phase was two growing runs and never extrapolated)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norms = []
    # DTensor warns that a norm Partial over both mesh dimensions takes two all-reduces; for one number
    # that is the right trade, and the warning would repeat for every parameter on every rank.
    quiet = logging.getLogger("torch.distributed.tensor._redistribute")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for g in grads:
            norm = torch.linalg.vector_norm(g, 2.0)
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    finally:
        quiet.setLevel(level)
    if not norms:
        return
    total = torch.linalg.vector_norm(torch.stack(norms))
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    with torch.no_grad():
        for g in grads:
            dtensor_local(g).mul_(factor)
