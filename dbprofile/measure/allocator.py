"""A model of PyTorch's CUDA caching allocator, to predict ``max_memory_reserved`` from a
sequence of allocations and frees (a fake run's, or one recorded on a GPU).

``max_memory_allocated`` is a sum of live blocks, which a tensor tracker can count; what
decides an out-of-memory error is the memory the allocator has *reserved* from the driver
(``cudaMalloc``'d segments), and that depends on the order of allocations: how requests are
rounded, which cached block serves a request, and when a new segment must be made. This
module replays that logic, following ``c10/cuda/CUDACachingAllocator.cpp`` (PyTorch 2.x,
default configuration: no expandable segments, no ``max_split_size_mb``, no
``roundup_power2_divisions``, one stream):

- a request is rounded up to a multiple of 512 bytes (``kMinBlockSize``);
- requests of at most 1 MiB (``kSmallSize``) are served from the small pool, whose segments
  are 2 MiB (``kSmallBuffer``); larger requests from the large pool, whose segments are
  20 MiB (``kLargeBuffer``) for requests under 10 MiB (``kMinLargeAlloc``) and the request
  rounded up to 2 MiB (``kRoundLarge``) otherwise;
- a request takes the smallest cached free block of its pool that is large enough (ties by
  address: ``BlockComparatorSize``); only when none is, a new segment is allocated;
- a block larger than the request is split when the remainder is at least 512 bytes (small
  pool) or more than 1 MiB (large pool); otherwise the whole block is handed out;
- a freed block merges with free neighbours of its segment; segments are given back only by
  ``empty_cache`` (and the out-of-memory retry path, which a successful run never takes).

Checked against the allocator's own event traces recorded on an H200 (tests/data/, see
tests/test_allocator.py): replaying a real run's allocation sequence reproduces its peak
reserved bytes. Known limitations: several streams (each stream has its own free blocks),
expandable segments and the allocator settings above are not modelled; segment addresses
from the driver are unknown, so ties between equal free blocks are broken by the order the
segments were made.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

MIN_BLOCK_BYTES = 512
"""kMinBlockSize: every request is rounded up to a multiple of this."""
SMALL_REQUEST_BYTES = 1 << 20
"""kSmallSize: requests up to this size come from the small pool (and large-pool blocks are
split only when more than this would remain)."""
SMALL_SEGMENT_BYTES = 2 << 20
"""kSmallBuffer: the size of every small-pool segment."""
LARGE_SEGMENT_BYTES = 20 << 20
"""kLargeBuffer: the segment made for a large-pool request under MIN_LARGE_ALLOC_BYTES."""
MIN_LARGE_ALLOC_BYTES = 10 << 20
"""kMinLargeAlloc: requests from this size on get a segment of their own size, rounded."""
LARGE_ROUND_BYTES = 2 << 20
"""kRoundLarge: the rounding of such a segment."""


def round_request(nbytes: int) -> int:
    """The block size the allocator hands out for ``nbytes`` (before any split remainder)."""
    if nbytes < MIN_BLOCK_BYTES:
        return MIN_BLOCK_BYTES
    return -(-nbytes // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES


def segment_size(block_bytes: int) -> int:
    """The cudaMalloc size when no cached block can serve a request of ``block_bytes``."""
    if block_bytes <= SMALL_REQUEST_BYTES:
        return SMALL_SEGMENT_BYTES
    if block_bytes < MIN_LARGE_ALLOC_BYTES:
        return LARGE_SEGMENT_BYTES
    return -(-block_bytes // LARGE_ROUND_BYTES) * LARGE_ROUND_BYTES


@dataclass(eq=False)
class _Block:
    addr: int
    size: int
    small: bool
    segment: int
    allocated: bool = False
    handle: int = -1
    prev: _Block | None = None
    next: _Block | None = None

    def key(self) -> tuple[int, int]:
        return (self.size, self.addr)


@dataclass
class AllocatorStats:
    """Bytes in integers: what ``torch.cuda.memory_stats`` would say after the replay."""

    allocated_bytes: int = 0
    reserved_bytes: int = 0
    peak_allocated_bytes: int = 0
    peak_reserved_bytes: int = 0
    segments: int = 0
    segment_sizes: list[int] = field(default_factory=list)

    def figures(self) -> dict[str, int]:
        """What a measurement keeps of the replay (``extra['allocator_model']``)."""
        return {
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "segments": self.segments,
        }


class CachingAllocatorModel:
    """Replays ``malloc(nbytes) -> handle`` and ``free(handle)``; see the module docstring.

    Example::

        alloc = CachingAllocatorModel()
        a = alloc.malloc(3 << 20)      # a 20 MiB segment, a 3 MiB block split off it
        alloc.free(a)
        alloc.stats.peak_reserved_bytes  # 20971520
    """

    def __init__(self, record: bool = False) -> None:
        self._free: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
        # ``record``: every malloc and free in ``events`` as an AllocationRecorder keeps them (the
        # depth extrapolation extends a shallow trace's sequence to the full depth).
        self.events: list[tuple[int, int]] | None = [] if record else None
        self.parts: Any = None
        """What made the recorded events, where a replay says (dbprofile.measure.warmup.ReplayParts)."""
        self._free_blocks: dict[tuple[int, int], _Block] = {}
        self._segments: dict[int, list[_Block]] = {}
        self._next_addr = 1 << 40
        self.stats = AllocatorStats()

    # ------------------------------------------------------------ public

    def malloc(self, nbytes: int) -> _Block:
        size = round_request(int(nbytes))
        small = size <= SMALL_REQUEST_BYTES
        block = self._take_free(size, small)
        if block is None:
            block = self._new_segment(segment_size(size), small)
        remaining = block.size - size
        if remaining >= MIN_BLOCK_BYTES if small else remaining > SMALL_REQUEST_BYTES:
            rest = _Block(block.addr + size, remaining, small, block.segment, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._insert_free(rest)
        block.allocated = True
        if self.events is not None:
            block.handle = len(self.events)
            self.events.append((block.handle, int(nbytes)))
        stats = self.stats
        stats.allocated_bytes += block.size
        stats.peak_allocated_bytes = max(stats.peak_allocated_bytes, stats.allocated_bytes)
        return block

    def free(self, block: _Block) -> None:
        if not block.allocated:
            raise ValueError("block freed twice")
        block.allocated = False
        if self.events is not None:
            self.events.append((block.handle, FREED))
        self.stats.allocated_bytes -= block.size
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated:
                self._remove_free(neighbour)
                if neighbour is block.prev:
                    block.addr = neighbour.addr
                    block.prev = neighbour.prev
                    if neighbour.prev is not None:
                        neighbour.prev.next = block
                else:
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
                block.size += neighbour.size
        self._insert_free(block)

    def add_segment(self, segment_bytes: int, allocated_bytes: int, small: bool) -> _Block | None:
        """Start from a segment that already exists (e.g. one holding a cuBLAS workspace): one
        allocated block at its start, the rest free. Returns the allocated block, if any."""
        block = self._new_segment(int(segment_bytes), small)
        if allocated_bytes <= 0:
            self._insert_free(block)
            return None
        size = round_request(int(allocated_bytes))
        if size < block.size:
            rest = _Block(block.addr + size, block.size - size, small, block.segment, prev=block)
            block.next, block.size = rest, size
            self._insert_free(rest)
        block.allocated = True
        self.stats.allocated_bytes += block.size
        self.stats.peak_allocated_bytes = max(self.stats.peak_allocated_bytes, self.stats.allocated_bytes)
        return block

    def empty_cache(self) -> None:
        """Give back every segment with nothing allocated in it (``torch.cuda.empty_cache``)."""
        for block in list(self._free_blocks.values()):
            if block.prev is None and block.next is None:
                self._remove_free(block)
                self.stats.reserved_bytes -= block.size
                self.stats.segments -= 1

    def reset_peaks(self) -> None:
        self.stats.peak_allocated_bytes = self.stats.allocated_bytes
        self.stats.peak_reserved_bytes = self.stats.reserved_bytes

    # ------------------------------------------------------------ internals

    def _new_segment(self, nbytes: int, small: bool) -> _Block:
        addr = self._next_addr
        # Segments never touch, so blocks of two segments never merge.
        self._next_addr += nbytes + LARGE_ROUND_BYTES
        block = _Block(addr, nbytes, small, segment=addr)
        stats = self.stats
        stats.reserved_bytes += nbytes
        stats.segments += 1
        stats.segment_sizes.append(nbytes)
        stats.peak_reserved_bytes = max(stats.peak_reserved_bytes, stats.reserved_bytes)
        return block

    def _take_free(self, size: int, small: bool) -> _Block | None:
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i == len(pool):
            return None
        key = pool.pop(i)
        return self._free_blocks.pop(key)

    def _insert_free(self, block: _Block) -> None:
        key = block.key()
        bisect.insort(self._free[block.small], key)
        self._free_blocks[key] = block

    def _remove_free(self, block: _Block) -> None:
        key = block.key()
        pool = self._free[block.small]
        i = bisect.bisect_left(pool, key)
        del pool[i]
        del self._free_blocks[key]


class AllocationRecorder:
    """Stands in for ``CachingAllocatorModel`` in the tracker: records every ``malloc(nbytes)`` and
    ``free(handle)`` in order instead of placing them, so that a sequence can be checked and replayed
    later, in another order (dbprofile.measure.warmup builds a warm-up's allocations this way).
    ``events`` holds ``(handle, nbytes)`` for a malloc and ``(handle, FREED)`` for a free."""

    def __init__(self) -> None:
        self.events: list[tuple[int, int]] = []
        self._next = 0

    def malloc(self, nbytes: int) -> int:
        handle = self._next
        self._next += 1
        self.events.append((handle, int(nbytes)))
        return handle

    def free(self, handle: int) -> None:
        self.events.append((handle, FREED))

    def position(self) -> int:
        return len(self.events)


FREED = -1
"""The size an ``AllocationRecorder`` event has when it frees its handle."""


def replay(alloc: CachingAllocatorModel, events: list[tuple[int, int]], live: dict[int, _Block]) -> None:
    """Apply recorded events to ``alloc``; ``live`` maps the handles malloc'ed and not yet freed to
    their blocks (a free of a handle not in it raises KeyError)."""
    for handle, nbytes in events:
        if nbytes == FREED:
            alloc.free(live.pop(handle))
        else:
            live[handle] = alloc.malloc(nbytes)
