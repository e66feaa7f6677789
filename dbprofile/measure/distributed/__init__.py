"""Per-rank measurement of sharded (FSDP2) and block-parallel training, merged on rank 0.

Modules by job: ``tracker`` (the sharded tracker), ``group`` (the process group), ``ranks``
(measuring each rank, simulating one for the planner, merging on rank 0) and ``launcher``
(starting torchrun).

``run_distributed()`` is called on EVERY rank of a process group (started by ``torchrun``, or
``launch()`` which starts ``torchrun`` itself). Each rank builds its trainer
(``dbprofile.methods.sharding``), runs the runner's protocol (warm-up steps for every unit, one
tracked step per unit, timed steps with the tracker paused) under a ``ShardedTracker``, and rank 0
gathers the ranks' ``Measurement``s (``torch.distributed.gather_object``) into one ``RunResult``
with a row per rank and technique (``extra``: ``rank``, ``world_size``, ``sharding``).

What a rank measures, in the usual categories: its shards of the parameters, gradients and
optimizer state (FSDP keeps them as DTensors; the tracker counts each rank's local shard), its own
activations and temporaries, and ``communication``: the buffers FSDP allocates for its collectives
(the all-gather input and output, the unsharded parameters copied out of it, the reduce-scatter
input), recognised by the ``FSDP::all_gather*`` and ``FSDP::post_backward_reduce`` regions FSDP
marks with ``record_function``. The reduce-scatter output becomes the sharded gradients and is
counted there. FSDP frees and re-allocates unsharded parameters with ``UntypedStorage.resize_``,
which no dispatch mode sees; like PyTorch's own ``torch.distributed._tools.mem_tracker.MemTracker``,
the tracker wraps ``resize_`` while it is active so those bytes come and go at the right instant.

Failures: a rank's error (its step raised, OOM, NaN) is its own row, reported by rank 0 with the
rank number; the other ranks' rows and the other techniques are kept. A rank that fails while
the others wait in a collective would hang them, so the process group has a timeout
(``timeout_s``); after such a failure the remaining techniques are not run (the group may be out
of step) and say so. Results travel on a separate gloo group, so they arrive even then.
"""

from dbprofile.measure.distributed.group import DEFAULT_TIMEOUT_S, in_torchrun, init_process_group
from dbprofile.measure.distributed.launcher import launch, launch_command, strip_nproc
from dbprofile.measure.distributed.ranks import measure_rank, representative_ranks, run_distributed, simulate_rank
from dbprofile.measure.distributed.tracker import ShardedTracker

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ShardedTracker",
    "in_torchrun",
    "init_process_group",
    "launch",
    "launch_command",
    "measure_rank",
    "representative_ranks",
    "run_distributed",
    "simulate_rank",
    "strip_nproc",
]
