"""The device mesh of a distributed run or simulation: one data-parallel dimension, or two
(``dp`` x ``tp``) when tensor parallelism splits each layer over ``tp`` ranks, made the way
torchtitan makes its mesh (``init_device_mesh`` with named dimensions, TP innermost so a TP
group is the ranks of one node)."""

from __future__ import annotations

from dbprofile.spec import SpecError


def check_mesh(world_size: int, tp: int, pp: int = 1) -> int:
    """The data-parallel degree ``world_size / (tp * pp)``, or SpecError when the mesh's product
    cannot equal the world size."""
    for name, value in (("--tp", tp), ("--pp", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"{name} must be a positive integer; got {value!r}.")
    if world_size % (tp * pp):
        raise SpecError(
            f"A mesh of tensor-parallel degree {tp} x pipeline degree {pp} cannot cover a world size of "
            f"{world_size}: the data-parallel degree world_size / (tp x pp) must be a whole number, and "
            f"{world_size} / {tp * pp} is not. Pass a world size that is a multiple of {tp * pp}, or a --tp / --pp "
            f"whose product divides {world_size}."
        )
    return world_size // (tp * pp)


def make_meshes(device_type: str, world_size: int, tp: int = 1):
    """(data-parallel mesh, tensor-parallel mesh or None) over the current process group's ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    dp = check_mesh(world_size, tp)
    if tp == 1:
        return init_device_mesh(device_type, (world_size,)), None
    mesh = init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))
    return mesh["dp"], mesh["tp"]
