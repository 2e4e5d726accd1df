"""Memory for float32 results on the CPU above 1 MiB, kept when the caller lets a
result go and handed to the next result of the same size.

A fresh result of that size may have each of its 4 KiB pages faulted in and zeroed
by the kernel again, on every call, because glibc's malloc gives such memory back to
the system when it is freed:

* above 32 MiB (the most its mmap threshold rises to on 64-bit Linux) it maps every
  allocation afresh and unmaps it when freed: ``[64, 151936]`` float32 is 37 MiB,
  9,500 faults, about 7 ms of the logits mode's 18.7 ms call on a 2-core Xeon;
* below that the memory comes from its heap, but a free that leaves more than its
  trim threshold (twice the mmap threshold) at the heap's top gives that top back:
  in ``bench/latency.py``'s rotation of ``[8, 151936]`` calls (4.9 MB results), the
  temperature mode's call faulted 1,155 pages on every call, 2.0 ms instead of
  1.3 ms, depending only on what the other calls had left on the heap.

So a result above :data:`REUSED_ABOVE_BYTES` is a view of a block this module owns:
when the last tensor or array on that memory goes (the result, any view of it, a
numpy array made from it), the block comes back here, and the next result of the
same number of floats takes it, its pages present. At most one free block is kept:
the memory held beyond the caller's own results is at most one result
(:func:`held_bytes`; :func:`release` frees it). Such a result is an ordinary tensor
except that its storage cannot grow (``resize_`` to more elements raises). Taking a
block costs about 2 us more than ``torch.empty``; at or below 1 MiB (``[1, 151936]``
is 0.6 MB) the faults it could save are at most 256, and were none in the median
call of the same rotation.
"""

from __future__ import annotations

import collections
import math
import weakref

import torch

#: Results larger than this many bytes reuse a block.
REUSED_ABOVE_BYTES = 1 << 20

# The block freed last, for the next result of its size. deque's append and pop
# are atomic, so a result freed on any thread (or by the garbage collector in the
# middle of a call here) needs no lock.
_free: collections.deque[torch.Tensor] = collections.deque(maxlen=1)


def new_float32(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 CPU tensor of ``shape``: above
    :data:`REUSED_ABOVE_BYTES`, on the memory of a result freed before when one of
    the same size is free."""
    count = math.prod(shape)
    if 4 * count <= REUSED_ABOVE_BYTES:
        return torch.empty(shape, dtype=torch.float32)
    block = _take(count)
    array = block.numpy()  # the result's storage holds this array, which holds block
    weakref.finalize(array, _free.append, block).atexit = False
    return torch.from_numpy(array).view(shape)


def _take(count: int) -> torch.Tensor:
    """The free block if it has ``count`` floats, else a new one (a free block of
    another size is freed first)."""
    try:
        block = _free.pop()
    except IndexError:
        return torch.empty(count, dtype=torch.float32)
    if block.numel() == count:
        return block
    del block
    return torch.empty(count, dtype=torch.float32)


def held_bytes() -> int:
    """Bytes held for the next large result (0 or one result's)."""
    return sum(4 * block.numel() for block in tuple(_free))


def release() -> None:
    """Free the block held for the next large result, if any."""
    _free.clear()
