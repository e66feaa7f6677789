"""Canary for the private PyTorch behaviour dbprofile relies on (dbprofile/torch_internals.py).

If one of these fails after a PyTorch upgrade, the tracker's numbers can no longer be trusted:
fix torch_internals.py (and the tracker) before anything else.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

from dbprofile import torch_internals as private


def test_fake_tensor_mode_makes_fake_tensors_with_real_storage_sizes():
    with private.fake_tensor_mode():
        t = torch.empty(100, 3)
        lin = torch.nn.Linear(8, 8)
    assert private.is_fake(t) and private.is_fake(lin.weight)
    assert t.untyped_storage().nbytes() == 1200
    assert not private.is_fake(torch.ones(1))


def test_fake_device_is_what_a_fake_tensor_answers_prim_device():
    """The tracking mode answers a fake tensor's prim.device itself (torch_internals.fake_device); it
    must be the answer the dispatch would give, inside a kernel's invocation (meta) and outside it."""
    from torch._subclasses.fake_tensor import in_kernel_invocation_manager

    with private.fake_tensor_mode() as mode:
        t = torch.empty(4, device="cpu")
        assert private.fake_device(t) == torch.ops.prim.device.default(t) == torch.device("cpu")
        with in_kernel_invocation_manager(mode):
            assert private.fake_device(t) == torch.ops.prim.device.default(t) == torch.device("meta")
    assert private.fake_device(torch.ones(1)) is None


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW"])
@pytest.mark.parametrize("implementation", ["foreach", "loop", "fused"])
def test_state_initialisation_only_makes_a_first_steps_state_and_leaves_the_parameters(optimizer, implementation):
    """Fake runs make AdamW's state through its step with the update skipped: the state must be the one
    a real first step makes (names, shapes, dtypes, devices), the parameters untouched, and the update
    back in place afterwards (a later step changes the parameters)."""
    kwargs = {"foreach": implementation == "foreach", "fused": implementation == "fused" or None}

    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        opt = getattr(torch.optim, optimizer)(model.parameters(), lr=0.1, weight_decay=0.1, **kwargs)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        return model, opt

    stepped_model, stepped = model_and_optimizer()
    stepped.step()
    model, opt = model_and_optimizer()
    before = [p.detach().clone() for p in model.parameters()]
    with private.state_initialisation_only(opt) as skipped:
        opt.step()
    assert skipped
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))

    def layout(o):
        return [
            {k: (v.shape, v.dtype, v.device) for k, v in o.state[p].items()}
            for g in o.param_groups
            for p in g["params"]
        ]

    assert layout(opt) == layout(stepped) and all(layout(opt))
    opt.step()  # the update is back
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_state_initialisation_only_steps_in_full_for_other_optimizers():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    with private.state_initialisation_only(opt) as skipped:
        opt.step()
    assert not skipped and "momentum_buffer" in opt.state[p] and not torch.equal(p.detach(), torch.ones(3))


def test_dispatch_mode_sees_every_op_output():
    seen = []

    class Spy(private.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen.append(str(func))
            return out

    with Spy():
        torch.ones(3).exp().sum()
    assert any("ones" in s for s in seen) and any("exp" in s for s in seen)


def test_storage_object_lives_while_a_tensor_uses_it_and_weakref_fires_on_free():
    for make in (lambda: torch.randn(10), lambda: _fake_randn(10)):
        fired = []
        t = make()
        ref = weakref.ref(t.untyped_storage(), lambda _r, fired=fired: fired.append(1))
        view = t[2:]
        assert view.untyped_storage() is ref()  # views share one Python storage object
        del t
        assert not fired
        del view
        assert fired == [1]


def _fake_randn(n):
    with private.fake_tensor_mode():
        return torch.randn(n)


def test_outer_saved_tensor_hook_sees_non_reentrant_checkpoint_inputs():
    packed = []
    lin = torch.nn.Linear(4, 4)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        hidden = torch.randn(2, 4, requires_grad=True) * 2
        checkpoint(lin, hidden, use_reentrant=False)
    assert torch.Size([2, 4]) in packed


def test_profiler_allocator_events_are_readable():
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t = torch.empty(1000)
        del t
    allocs = private.profiler_allocations(prof)
    assert (4000 in [n for _, n in allocs]) and (-4000 in [n for _, n in allocs])


def test_profiler_allocations_of_an_unfinished_profile_says_so():
    with pytest.raises(RuntimeError, match="needs a finished profile"):
        private.profiler_allocations(profile(activities=[ProfilerActivity.CPU], profile_memory=True))


def test_active_fake_mode_detects_the_mode():
    assert private.active_fake_mode() is None
    with private.fake_tensor_mode() as mode:
        assert private.active_fake_mode() is mode


def test_memory_history_api_takes_the_arguments_the_snapshot_code_passes():
    """dbprofile.measure.snapshot records with these keywords and dumps to a file name; the GPU test
    (tests/test_gpu.py) checks the file memory_viz reads."""
    import inspect

    record = inspect.signature(torch.cuda.memory._record_memory_history).parameters
    assert {"enabled", "context", "stacks", "max_entries"} <= set(record)
    assert list(inspect.signature(torch.cuda.memory._dump_snapshot).parameters)[0] == "filename"
    for name in ("start_cuda_memory_history", "stop_cuda_memory_history", "dump_cuda_memory_snapshot"):
        assert callable(getattr(private, name))


def test_outside_fake_mode_makes_real_tensors_inside_a_fake_run():
    with private.fake_tensor_mode():
        with private.outside_fake_mode():
            inner = torch.linspace(0, 1, 3)
            assert not private.is_fake(inner) and inner[1].item() == 0.5
        assert private.is_fake(torch.zeros(2))


def test_flop_formulas_dbprofile_uses_still_exist():
    # dbprofile.measure.flops applies PyTorch's formula table and its attention formulas to the CPU kernel.
    aten = torch.ops.aten
    assert aten.mm in private.flop_registry and aten.convolution_backward in private.flop_registry
    assert private.sdpa_flop_count((2, 4, 16, 8), (2, 4, 16, 8), (2, 4, 16, 8)) == 2 * 2 * 8 * 16 * 16 * 8
    assert private.sdpa_backward_flop_count((2, 4, 16, 8), (2, 4, 16, 8), (2, 4, 16, 8), (2, 4, 16, 8)) > 0
    # The CPU's fused attention kernel, which scaled_dot_product_attention runs on fake CPU tensors.
    assert hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu")
    assert hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


def test_dtensor_local_is_the_shard_to_local_views_and_plain_tensors_pass_through():
    import torch.distributed as dist
    import torch.distributed.fsdp  # noqa: F401 - registers the 'fake' backend
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=4)
    try:
        mesh = init_device_mesh("cpu", (4,))
        param = torch.nn.Parameter(DTensor.from_local(torch.zeros(3, 5), mesh, [Shard(0)]))
        local = private.dtensor_local(param)
        # the same storage as the public to_local(), which hands a parameter out as a fresh view
        with torch.no_grad():
            public = param.to_local()
        assert local.untyped_storage().data_ptr() == public.untyped_storage().data_ptr()
        assert local.untyped_storage().nbytes() == 3 * 5 * 4
        assert not isinstance(local, DTensor)
    finally:
        dist.destroy_process_group()
    plain = torch.ones(2)
    assert private.dtensor_local(plain) is plain


def test_sdpa_backend_ops_run_on_fake_tensors_with_a_backward_each():
    ops = private.sdpa_backend_ops()
    assert set(ops) == {"flash", "efficient", "cudnn", "math"}
    with private.fake_tensor_mode():
        q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        outs = [
            ops["flash"](q, k, v, 0.0),
            ops["efficient"](q, k, v, None, True),
            ops["cudnn"](q, k, v, None, True),
            ops["math"](q, k, v),
        ]
        for out in outs:
            assert out[0].shape == q.shape and out[0].grad_fn is not None


def test_function_modes_lists_the_active_torch_function_modes():
    class Mode(torch.overrides.TorchFunctionMode):
        pass

    mode = Mode()
    assert mode not in private.function_modes()
    with mode:
        assert private.function_modes()[-1] is mode


def test_fsdp_over_tensor_parallel_on_fake_tensors_needs_the_mesh_concatenation_outside_fake_mode():
    """FSDP2 of a TP DTensor parameter joins the meshes with DeviceMesh._concatenate, whose rank lookup
    (``nonzero``) has no fake shape; torch_internals.device_meshes_outside_fake_mode lets it run."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from dbprofile.measure.fake import fake_mode
    from dbprofile.torch_internals import device_meshes_outside_fake_mode

    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=4)
    try:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        with fake_mode():
            for works in (False, True):
                layer = nn.Linear(8, 8)
                parallelize_module(layer, mesh["tp"], ColwiseParallel())
                if not works:
                    with pytest.raises(Exception, match="nonzero"):
                        fully_shard(layer, mesh=mesh["dp"])
                    continue
                with device_meshes_outside_fake_mode():
                    fully_shard(layer, mesh=mesh["dp"])
                assert layer.weight.to_local().shape == (2, 8)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("shape", "count", "dim"),
    [((10, 3), 4, 0), ((64,), 64, 0), ((3, 5), 8, 0), ((0, 4), 4, 0), ((7,), 3, 0), ((4, 9), 2, 1), ((130, 2), 64, 0)],
)
def test_fsdp_shards_by_narrow_hands_out_the_chunks_fsdp_makes(shape, count, dim):
    """FSDP2's ``_chunk_with_empty`` (torch.chunk, padded with empty tensors) and the narrowed chunks
    that replace it inside ``fsdp_shards_by_narrow``: the same views (sizes, strides, offsets, storage),
    uneven and empty chunks included; the function is put back after the context."""
    from torch.distributed.fsdp._fully_shard import _fsdp_common, _fsdp_param

    tensor = torch.randn(*shape)
    chunks = _fsdp_common._chunk_with_empty(tensor, count, dim)
    with private.fsdp_shards_by_narrow():
        narrowed = _fsdp_param._chunk_with_empty(tensor, count, dim)
    assert _fsdp_param._chunk_with_empty is _fsdp_common._chunk_with_empty
    assert len(narrowed) == len(chunks) == count
    for i, chunk in enumerate(chunks):
        view = narrowed[i]
        assert (view.shape, view.stride(), view.storage_offset()) == (
            chunk.shape,
            chunk.stride(),
            chunk.storage_offset(),
        )
        if chunk.numel():
            assert view.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
    assert narrowed[-1].shape == chunks[-1].shape
