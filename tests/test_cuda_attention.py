"""The attention kernel a CUDA target runs (dbprofile.measure.cuda_attention): the backend
PyTorch's sdp_utils.cpp picks, and what one call saves for backward under each backend, against a
hand computation from the kernels' outputs (and the H200 traces where they cover it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dbprofile.measure.cuda_attention import CUDNN, EFFICIENT, FLASH, MATH, AttentionCall, CudaAttention, choose_backend
from dbprofile.measure.cuda_scratch import op_host_outputs
from dbprofile.measure.fake import fake_mode

B, H, T, D = 2, 12, 100, 64
SM90, SM80, SM75 = (9, 0), (8, 0), (7, 5)
TRACES = Path(__file__).parent / "data" / "h200_allocator_traces.npz"


def _qkv(dtype=torch.float32, head_dim=D, seq=T):
    return [torch.randn(B, H, seq, head_dim, dtype=dtype, requires_grad=True) for _ in range(3)]


def _call(dtype=torch.float32, *, head_dim=D, masked=False, dropout_p=0.0, is_causal=False) -> AttentionCall:
    with fake_mode():
        q, k, v = _qkv(dtype, head_dim)
    return AttentionCall(q, k, v, masked, dropout_p, is_causal, enable_gqa=False, training=True)


@pytest.mark.parametrize(
    ("capability", "call", "backend"),
    [
        # sm90 (H100, H200): cuDNN first (cuDNN newer than 9.15.0), as the H200 traces show for bf16.
        (SM90, {"dtype": torch.bfloat16}, CUDNN),
        (SM90, {"dtype": torch.bfloat16, "masked": True}, CUDNN),
        (SM90, {"dtype": torch.bfloat16, "dropout_p": 0.125}, CUDNN),  # a multiple of 1/16
        (SM90, {"dtype": torch.bfloat16, "dropout_p": 0.1}, FLASH),  # GPT-2's attn_pdrop: not for cuDNN
        (SM90, {"dtype": torch.bfloat16, "dropout_p": 0.1, "masked": True}, EFFICIENT),  # flash takes no mask
        (SM90, {"dtype": torch.float32}, EFFICIENT),  # flash and cuDNN are fp16/bf16 only
        (SM90, {"dtype": torch.float32, "head_dim": 6}, MATH),  # not a multiple of 4
        (SM90, {"dtype": torch.bfloat16, "head_dim": 160}, FLASH),  # over cuDNN's 128
        # sm80 (A100): flash first.
        (SM80, {"dtype": torch.bfloat16}, FLASH),
        (SM80, {"dtype": torch.bfloat16, "masked": True}, EFFICIENT),
        # sm75 (T4): no bf16 in any fused kernel.
        (SM75, {"dtype": torch.bfloat16}, MATH),
        (SM75, {"dtype": torch.float16}, EFFICIENT),
    ],
)
def test_backend_follows_pytorchs_rules(capability, call, backend):
    assert choose_backend(_call(**call), capability) == backend


def test_a_calls_facts_pick_the_backend_its_tensors_pick_and_outlive_them():
    """The planner keeps each run's attention calls as facts (no tensors) and asks them which backend
    another GPU picks (planner.entries._read): they must answer as the call does, on every GPU."""
    import pickle

    from dbprofile.gpus import GPUS
    from dbprofile.measure.cuda_attention import Decisions

    calls = [
        _call(dtype, head_dim=head_dim, masked=masked, dropout_p=dropout)
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
        for head_dim in (6, 64, 160, 200)
        for masked in (False, True)
        for dropout in (0.0, 0.1)
    ]
    capabilities = sorted({gpu.compute_capability for gpu in GPUS.values()})
    for call in calls:
        facts = pickle.loads(pickle.dumps(call.facts()))
        assert facts == call.facts() and hash(facts) == hash(call.facts())
        assert [choose_backend(facts, c) for c in capabilities] == [choose_backend(call, c) for c in capabilities]
    bf16 = Decisions(SM80, frozenset({_call(torch.bfloat16).facts()}))
    assert bf16.same_on((8, 9)) and not bf16.same_on(SM90)  # flash on both 8.x; cuDNN on sm90
    assert Decisions(SM90, frozenset({_call(torch.float32).facts()})).same_on(SM80)  # memory-efficient


def _saved(dtype, capability=SM90, *, head_dim=D, mask=None, **kwargs):
    """(shape, dtype, storage bytes) of what one emulated call saves for backward, inputs excluded,
    and the backend it recorded."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with fake_mode():
        q, k, v = _qkv(dtype, head_dim)
        inputs = {id(t.untyped_storage()) for t in (q, k, v)}
        attention = CudaAttention(capability)
        with attention, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
        assert out.shape == (B, H, T, head_dim) and out.dtype == dtype
        rows = [
            (tuple(t.shape), t.dtype, t.untyped_storage().nbytes())
            for t in saved
            if id(t.untyped_storage()) not in inputs
        ]
    (backend,) = attention.backends.values()
    return backend, sorted(rows, key=repr)  # autograd's order of saving is no part of the count


def test_flash_saves_output_logsumexp_and_its_rng_state():
    backend, rows = _saved(torch.bfloat16, dropout_p=0.1, is_causal=True)
    assert backend == FLASH
    assert rows == sorted(
        [
            ((B, H, T, D), torch.bfloat16, B * H * T * D * 2),  # the output
            ((B, H, T), torch.float32, B * H * T * 4),  # log-sum-exp, one per row
            ((2,), torch.uint64, 16),  # philox seed and offset (rng_state, on the device)
            ((), torch.uint64, 8),
        ],
        key=repr,
    )


def test_flash_pads_the_head_dimension_to_a_multiple_of_8_and_saves_the_padded_inputs():
    backend, rows = _saved(torch.bfloat16, head_dim=60, dropout_p=0.1)
    assert backend == FLASH
    padded = ((B, H, T, 64), torch.bfloat16, B * H * T * 64 * 2)
    assert rows.count(padded) == 4  # q, k and v padded, and the padded output
    assert ((B, H, T), torch.float32, B * H * T * 4) in rows


def test_memory_efficient_attention_pads_its_logsumexp_to_32_rows():
    backend, rows = _saved(torch.float32, dropout_p=0.1)
    assert backend == EFFICIENT
    assert rows == sorted(
        [
            ((B, H, T, D), torch.float32, B * H * T * D * 4),
            ((B, H, 128), torch.float32, B * H * 128 * 4),  # ceil(100 / 32) * 32 rows
            ((), torch.int64, 8),  # seed and offset: host tensors on CUDA (op_host_outputs)
            ((), torch.int64, 8),
        ],
        key=repr,
    )


def test_memory_efficient_attention_saves_a_boolean_mask_as_an_additive_one_padded_to_8():
    with fake_mode():
        mask = torch.ones(T, T, dtype=torch.bool).tril()
    backend, rows = _saved(torch.float32, mask=mask)
    assert backend == EFFICIENT
    # 0 / -inf in fp32; its rows' stride (100) is not a multiple of 8, so it is padded to 104 columns
    # and sliced back, then expanded over batch and heads (a view: no bytes of its own).
    assert ((B, H, T, T), torch.float32, T * 104 * 4) in rows


def test_cudnn_saves_output_and_a_column_of_logsumexp():
    backend, rows = _saved(torch.bfloat16)
    assert backend == CUDNN
    assert rows == sorted(
        [
            ((B, H, T, D), torch.bfloat16, B * H * T * D * 2),
            ((B, H, T, 1), torch.float32, B * H * T * 4),
            ((), torch.int64, 8),  # seed and offset, on the device
            ((), torch.int64, 8),
        ],
        key=repr,
    )


def test_math_saves_the_attention_weights_in_fp32():
    backend, rows = _saved(torch.bfloat16, SM75)
    assert backend == MATH
    # The math kernel computes fp16/bf16 inputs in fp32 (attention.cpp, on any device).
    assert ((B, H, T, T), torch.float32, B * H * T * T * 4) in rows


def test_only_memory_efficient_attention_keeps_its_rng_state_on_the_host():
    with fake_mode():
        q, k, v = _qkv()
        out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.1)
        flash = torch.ops.aten._scaled_dot_product_flash_attention(*(t.bfloat16() for t in (q, k, v)), 0.1)
    assert [
        tuple(t.shape) for t in op_host_outputs(torch.ops.aten._scaled_dot_product_efficient_attention.default, out)
    ] == [(), ()]
    assert op_host_outputs(torch.ops.aten._scaled_dot_product_flash_attention.default, flash) == []


@pytest.mark.parametrize(
    ("run", "dtype", "tokens", "rows"),
    [
        # ViT-B/16 fp32 at batch 32 (memory-efficient): 197 tokens -> a log-sum-exp of 224 rows.
        ("vit-b16|32|ckpt|fp32", torch.float32, 197, 224),
        # DiT-B/2 bf16 at batch 32 (cuDNN): 256 tokens, one value per row.
        ("dit-b2|32|db:4|bf16", torch.bfloat16, 256, 256),
    ],
)
def test_logsumexp_sizes_are_allocations_the_h200_made(run, dtype, tokens, rows):
    data = np.load(TRACES)
    requested = set(data[run + "|size"][data[run + "|action"] == 0].tolist())
    with fake_mode():
        q, k, v = (torch.randn(32, 12, tokens, 64, dtype=dtype, requires_grad=True) for _ in range(3))
        with CudaAttention(SM90):
            out = F.scaled_dot_product_attention(q, k, v)
    lse = out.grad_fn._saved_log_sumexp if dtype == torch.float32 else out.grad_fn._saved_logsumexp
    assert lse.untyped_storage().nbytes() == 32 * 12 * rows * 4
    assert lse.untyped_storage().nbytes() in requested
    # The recorded runs' RNG state: cuDNN's two 8-byte scalars on the device, none for memory-efficient.
    assert (8 in requested) == (dtype == torch.bfloat16)


def test_a_plan_names_the_backend_of_each_attention_call_site_once():
    from dbprofile.planner import plan

    result = plan("vit-tiny", 2, device="H100-80GB", techniques="e2e,ckpt", search_max_batch=False)
    ((site, backend),) = result.model_info["attention_backends"].items()
    assert site.startswith("dbprofile/models/common.py:") and backend == EFFICIENT
    assert all("attention_backends" not in entry.extra for entry in result.entries)
    assert "attention_backends" not in plan("vit-tiny", 2, device="cpu", techniques="e2e").model_info


def test_attention_computed_by_the_model_itself_keeps_its_t_by_t_weights():
    saved: list[torch.Tensor] = []
    with fake_mode():
        q, k, v = _qkv()
        attention = CudaAttention(SM90)
        with attention, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            torch.softmax(q @ k.transpose(-2, -1) / D**0.5, dim=-1) @ v  # eager attention, as on a GPU
    assert attention.backends == {}
    assert any(tuple(t.shape) == (B, H, T, T) for t in saved)


@pytest.mark.parametrize(("dtype", "backend"), [(torch.float32, EFFICIENT), (torch.bfloat16, CUDNN)])
def test_grouped_query_attention_trains_through_each_fused_backend(dtype, backend):
    with fake_mode():
        q = torch.randn(B, 8, T, D, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(B, 2, T, D, dtype=dtype, requires_grad=True) for _ in range(2))
        with CudaAttention(SM90) as attention:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.sum().backward()
    assert list(attention.backends.values()) == [backend]
    assert k.grad is not None and k.grad.shape == k.shape and q.grad.shape == q.shape
