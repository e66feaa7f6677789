"""Host-side copies that an offloading technique keeps off the device (``db:B+offload``'s block
state, ``offload``'s saved activations). On CUDA they are pinned, so the copies in and out are
DMA transfers; on a CPU "device" (CPU runs, fake runs) they are separate tensors that the memory
tracker must still tell apart from device memory: ``holds(tensor)`` is what a trainer's
``host_resident`` answers with."""

from __future__ import annotations

import weakref

import torch


def storage_key(tensor: torch.Tensor) -> int:
    """The StorageImpl's address: shared by views, defined for fake tensors too."""
    return tensor.untyped_storage()._cdata


class HostCopies:
    """Makes host copies for ``device`` and remembers their storages."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._storages: set[int] = set()
        self._making = False

    def copy_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """A new host tensor holding ``tensor``'s values (contiguous)."""
        # While the copy is made, holds() says so: a tracker that sees the new storage at once
        # (before it is registered below) must never count it as device memory, not even for an
        # instant (a fake run's allocator model would place it in a device segment).
        self._making = True
        try:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=self.device.type == "cuda")
        finally:
            self._making = False
        key = storage_key(host)
        self._storages.add(key)
        # A freed copy's address may be reused by a device tensor made later (an activation copy
        # freed in the backward, a gradient allocated after it): its key must go with it.
        weakref.finalize(host.untyped_storage(), self._storages.discard, key)
        host.copy_(tensor)
        return host

    def holds(self, tensor: torch.Tensor) -> bool:
        return self._making or storage_key(tensor) in self._storages
