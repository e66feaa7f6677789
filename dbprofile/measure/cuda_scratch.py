"""Scratch memory CUDA kernels take and give back inside one op, predicted from the op's
shapes, for fake runs that stand for a CUDA device.

No tensor ever holds this memory, so a fake run cannot see it, yet it counts in
``max_memory_allocated`` at the instant of the op and can make the caching allocator reserve
new segments. On an H200 (reports/gpu-validation-h200-2.md) the largest such allocations in
training steps of ViT-B/16, DiT-B/2 and GPT-2 were the global staging buffers of PyTorch's
reduction kernel (``aten/src/ATen/native/cuda/Reduce.cuh``): a bias gradient, i.e. a ``sum``
over the batch and sequence of a (tokens x features) gradient, splits each output's inputs
over many thread blocks, which combine through a buffer of
``sizeof(accumulator) x outputs x blocks per output x block width x output vector size``
bytes, plus one int semaphore per block column. 132 MiB for a 3072-wide bias of ViT-B/16,
per layer and step, whatever the batch size.

``reduction_scratch`` follows ``setReduceConfig``: TensorIterator's dimension order
(reduced dimensions first, then by stride) and coalescing, the vectorisation choice, the
block shape (at most 512 threads, split by the output vector size), the split of the inputs
across warps, and the number of blocks per output from the device's multiprocessors (132 on
an H100 SXM / H200, 2048 threads each). ``attention_backward_scratch`` is the workspace of attention's backward, fitted to the same
traces. Known limitations: reductions beyond 32-bit indexing (split into several launches),
Welford (var/std) and index-returning (argmax, max.dim) reductions are not modelled; nor is
the workspace of convolutions (cuDNN's algorithm choice; 15 to 57 MiB once per step for the
patch embeddings of ViT-B/16 and DiT-B/2) or of attention on other GPUs than sm90.
"""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_MULTIPROCESSORS = 132
"""H100 SXM and H200: 132 streaming multiprocessors (torch.cuda.get_device_properties)."""
MAX_THREADS_PER_MULTIPROCESSOR = 2048
"""maxThreadsPerMultiProcessor on sm80 and sm90."""
MAX_NUM_THREADS = 512
"""mnt_wrapper<T>::MAX_NUM_THREADS for real types: threads in one reduction block."""
WARP_SIZE = 32
VT0 = 4
"""Values each thread loads per iteration (``vt0``), also the input vector size."""
MIN_VALUES_PER_THREAD = 16
MAX_VALUES_PER_THREAD = 256

_aten = torch.ops.aten
# Reductions through gpu_reduce_kernel whose accumulator is float (double for double inputs).
_FLOAT_ACCUMULATING = {
    _aten.sum.dim_IntList,
    _aten.sum.default,
    _aten.mean.dim,
    _aten.mean.default,
    _aten.linalg_vector_norm.default,
}
# Reductions whose accumulator is the input type itself.
_SAME_TYPE_ACCUMULATING = {_aten.amax.default, _aten.amin.default}


def _last_pow2(n: int, cap: int) -> int:
    """``n < cap ? largest power of two <= n : cap`` (cap a power of two)."""
    while cap > 1 and n < cap:
        cap //= 2
    return cap


def _div_up(a: int, b: int) -> int:
    return -(-a // b)


def _iterator_dims(shape: list[int], strides: list[int], reduced: set[int]) -> list[tuple[int, int, bool]]:
    """TensorIterator's view of a reduction: (size, input stride, reduced?) per dimension,
    fastest first, reduced dimensions in front, size-1 and contiguous neighbours coalesced."""
    dims = [(s, st, i in reduced) for i, (s, st) in enumerate(zip(shape, strides)) if s != 1]
    # Reduced dimensions go first; within each group, ascending input stride (ties: smaller size).
    dims.sort(key=lambda d: (not d[2], d[1], d[0]))
    out: list[tuple[int, int, bool]] = []
    for size, stride, red in dims:
        if out:
            psize, pstride, pred = out[-1]
            # Neighbours merge when the input is contiguous across them and both are reduced or
            # both kept (the output's stride is 0 on reduced dimensions and contiguous otherwise).
            if pred == red and pstride * psize == stride:
                out[-1] = (psize * size, pstride, red)
                continue
        out.append((size, stride, red))
    return out


def _output_vec_size(num_outputs_dim: int, kept: list[tuple[int, int, bool]]) -> int:
    vec = 4
    for n in (num_outputs_dim, *[st for _, st, _ in kept[1:]]):
        while vec > 1 and n % vec != 0:
            vec //= 2
    return vec


def reduction_scratch(
    shape: list[int],
    strides: list[int],
    reduced_dims: list[int],
    accumulator_bytes: int,
    multiprocessors: int = DEFAULT_MULTIPROCESSORS,
) -> tuple[int, int]:
    """(staging buffer bytes, semaphore bytes) one CUDA reduction allocates; (0, 0) if none.
    ``strides`` in elements; ``reduced_dims`` empty means every dimension."""
    ndim = len(shape)
    reduced = {d % ndim for d in reduced_dims} if ndim else set()
    if not reduced_dims and ndim:
        reduced = set(range(ndim))
    numel = 1
    for s in shape:
        numel *= s
    if numel == 0:
        return 0, 0
    num_outputs = 1
    for i, s in enumerate(shape):
        if i not in reduced:
            num_outputs *= s
    inputs_per_output = numel // num_outputs
    dims = _iterator_dims(list(shape), list(strides), reduced)
    num_reduce = sum(1 for d in dims if d[2])
    if not dims:
        return 0, 0
    fastest_reduced = num_reduce == len(dims) or dims[0][1] < dims[num_reduce][1]
    if fastest_reduced:
        dim0, dim1, fastest_stride = inputs_per_output, num_outputs, dims[0][1]
    else:
        dim0, dim1, fastest_stride = num_outputs, inputs_per_output, dims[num_reduce][1]
    output_vec = 1
    if fastest_stride == 1:
        if fastest_reduced and dim0 >= 128 and num_reduce == 1:
            dim0 //= VT0
        elif not fastest_reduced:
            output_vec = _output_vec_size(dims[num_reduce][0], dims[num_reduce:])
            dim0 //= output_vec
    max_threads = MAX_NUM_THREADS // output_vec
    dim0_pow2, dim1_pow2 = _last_pow2(dim0, max_threads), _last_pow2(dim1, max_threads)
    block_width = min(dim0_pow2, WARP_SIZE)
    block_height = min(dim1_pow2, max_threads // block_width)
    block_width = min(dim0_pow2, max_threads // block_height)
    num_threads = block_width * block_height
    step_input = step_output = 1
    block_x_reduce = fastest_reduced
    if fastest_reduced:
        step_input *= block_width
    else:
        step_output *= block_width
    values_per_thread = _div_up(inputs_per_output, step_input)
    split_across_warps = values_per_thread >= min(block_height * 16, MAX_VALUES_PER_THREAD)
    if split_across_warps:
        step_input *= block_height
    else:
        step_output *= block_height
    target_grid = multiprocessors * (MAX_THREADS_PER_MULTIPROCESSOR // num_threads)
    grid_x = _div_up(num_outputs // output_vec, step_output)
    values_per_thread = _div_up(inputs_per_output, step_input)
    if not (split_across_warps and values_per_thread >= MAX_VALUES_PER_THREAD and grid_x <= target_grid):
        return 0, 0
    ctas = max(
        _div_up(values_per_thread, MAX_VALUES_PER_THREAD),
        min(_div_up(target_grid, grid_x), _div_up(values_per_thread, MIN_VALUES_PER_THREAD)),
    )
    if ctas <= 1:
        return 0, 0
    buffer = accumulator_bytes * num_outputs * ctas
    if not block_x_reduce:
        buffer *= block_width * output_vec
    return buffer, 4 * grid_x


ATTENTION_KEY_TILE = 256
"""Rows per tile of memory-efficient attention's backward workspace (fitted, see below)."""


def attention_backward_scratch(
    batch: int, heads: int, seq: int, head_dim: int, dtype: torch.dtype, masked: bool
) -> int:
    """The workspace of scaled-dot-product attention's backward on an sm90 GPU (H100, H200).

    Fitted to the H200 allocator traces (head dim 64; ViT-B/16 197 tokens, DiT-B/2 256, GPT-2
    1024, batch 4 to 64), where each layer's attention backward made one allocation beside its
    gradients:

    - cuDNN attention (bf16/fp16) without a mask: an fp32 dQ accumulator and one fp32 value
      per row, plus 256 bytes, ``batch * heads * seq * (head_dim + 1) * 4 + 256`` (requested
      25559296 bytes for DiT-B/2 at batch 32; 19668992, 25559552 and 12780032 bytes after
      rounding for ViT-B/16 and DiT-B/2 at batch 32 and GPT-2 at batch 4, each to the byte);
    - memory-efficient attention at fp32: ``batch * heads * ceil(seq / 256) * (256 * head_dim
      * 4 + 64)`` bytes (25190400 for ViT-B/16 and DiT-B/2 at batch 32, 12595200 for GPT-2).

    Which backend runs is the fake run's choice (dbprofile.measure.cuda_attention); a masked cuDNN call
    and memory-efficient attention at fp16/bf16 are not modelled (0).
    """
    if dtype in (torch.bfloat16, torch.float16) and not masked:
        return batch * heads * seq * (head_dim + 1) * 4 + 256
    if dtype == torch.float32:
        return batch * heads * _div_up(seq, ATTENTION_KEY_TILE) * (ATTENTION_KEY_TILE * head_dim * 4 + 64)
    return 0


FLASH_ROWS_ROUNDING = 128
"""flash_api.cpp (mha_bwd) rounds the query length up to a multiple of 128..."""
FLASH_HEAD_ROUNDING = 32
"""...and the head dimension up to a multiple of 32 (256 above 192)."""


def flash_backward_scratch(batch: int, heads: int, seq: int, head_dim: int) -> list[int]:
    """The buffers flash attention's backward allocates and drops inside the op (FlashAttention-2's
    ``mha_bwd`` in PyTorch's flash_api.cpp): ``softmax_d``, fp32 (batch, heads, rounded rows), then
    the fp32 dQ accumulator (batch, rounded rows, heads, rounded head dim). From the source, not yet
    checked against a trace (the H200 runs used cuDNN and memory-efficient attention)."""
    rows = _div_up(seq, FLASH_ROWS_ROUNDING) * FLASH_ROWS_ROUNDING
    width = _div_up(head_dim, FLASH_HEAD_ROUNDING) * FLASH_HEAD_ROUNDING if head_dim <= 192 else 256
    return [batch * heads * rows * 4, batch * rows * heads * width * 4]


# Each backend's backward op -> the position of its attention bias (None: the backend takes none).
_ATTENTION_BACKWARD = {
    getattr(_aten, name).default: bias
    for name, bias in (
        ("_scaled_dot_product_cudnn_attention_backward", 8),
        ("_scaled_dot_product_efficient_attention_backward", 4),
        ("_scaled_dot_product_flash_attention_backward", None),
    )
    if hasattr(_aten, name)
}


def _attention_backward(func: Any, args: tuple) -> list[int]:
    """The workspace of the backward of the backend the fake run chose (dbprofile.measure.cuda_attention)."""
    q = args[1] if len(args) > 1 else None
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        return []
    batch, heads, seq, head_dim = q.shape
    bias = _ATTENTION_BACKWARD[func]
    if bias is None:
        return flash_backward_scratch(batch, heads, seq, head_dim)
    masked = len(args) > bias and args[bias] is not None
    if bias == 4 and q.dtype != torch.float32:  # memory-efficient at fp16/bf16: not modelled
        return []
    nbytes = attention_backward_scratch(batch, heads, seq, head_dim, q.dtype, masked)
    return [nbytes] if nbytes else []


_EFFICIENT_ATTENTION = getattr(_aten, "_scaled_dot_product_efficient_attention", None)


def op_host_outputs(func: Any, out: Any) -> list[torch.Tensor]:
    """Outputs a CUDA kernel keeps in host memory: memory-efficient attention's RNG seed and offset
    (0-dim int64 CPU tensors outside CUDA-graph capture; its fake kernel makes them beside the
    output). The H200 traces agree: no 8-byte device allocation in the fp32 (memory-efficient)
    runs, one per call in the bf16 (cuDNN, which keeps them on the device) ones."""
    if _EFFICIENT_ATTENTION is not None and func is _EFFICIENT_ATTENTION.default and isinstance(out, tuple):
        return [t for t in out[2:4] if isinstance(t, torch.Tensor)]
    return []


_CONTIGUOUS_INPUTS = {
    # op -> positions of the inputs its CUDA kernel makes contiguous (``expect_contiguous``)
    _aten.native_layer_norm.default: (0,),
    _aten.native_layer_norm_backward.default: (0, 1),
    # cuDNN convolutions take their gradient in the weight's memory format (contiguous here).
    _aten.convolution_backward.default: (0,),
}


def op_input_copies(func: Any, args: tuple) -> list[int]:
    """Bytes of the contiguous copies a CUDA kernel makes of its non-contiguous inputs before it
    writes its outputs, freed when it returns. Layer norm's kernels do so (``expect_contiguous``):
    DiT's residual stream keeps the patch embedding's transposed layout through every residual
    add, and on the H200 each layer norm of DiT-B/2 at batch 32 copied its 24 MiB input (fp32
    [32, 256, 768]) before its output, in forward and backward; the CPU kernels seen by a fake
    run make no such copy."""
    positions = _CONTIGUOUS_INPUTS.get(func, ())
    return [
        t.numel() * t.element_size()
        for i in positions
        if i < len(args)
        for t in (args[i],)
        if isinstance(t, torch.Tensor) and not t.is_contiguous()
    ]


def op_scratch_allocations(func: Any, args: tuple, kwargs: dict) -> list[int]:
    """The transient allocations (bytes, in order) a CUDA kernel makes inside ``func`` after its
    outputs."""
    if func in _ATTENTION_BACKWARD:
        return _attention_backward(func, args)
    if func in _FLOAT_ACCUMULATING or func in _SAME_TYPE_ACCUMULATING:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.is_sparse:
            return []
        if func in _SAME_TYPE_ACCUMULATING:
            acc = x.element_size()
        else:
            acc = 8 if x.dtype in (torch.float64, torch.complex128) else 4
        dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if func is _aten.linalg_vector_norm.default:
            dims = kwargs.get("dim", args[2] if len(args) > 2 else None)
        if isinstance(dims, int):
            dims = [dims]
        dims = list(dims) if dims else []
        buffer, semaphores = reduction_scratch(list(x.shape), list(x.stride()), dims, acc)
        # Two allocations, the staging buffer then the semaphores (Reduce.cuh reduce_buffers).
        return [buffer, semaphores] if buffer else []
    return []
