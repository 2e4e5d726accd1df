"""Memory for large float32 results on the CPU, kept when the caller lets a result go
and handed to the next result of the same size.

glibc's malloc maps every allocation above 32 MiB (the most its mmap threshold rises
to on 64-bit Linux) afresh and unmaps it when it is freed, so a fresh result of that
size has each of its 4 KiB pages faulted in and zeroed by the kernel again, on every
call: ``[64, 151936]`` float32 is 37 MiB, 9,500 faults, about 7 ms of the logits
mode's 18.7 ms call on a 2-core Xeon. Smaller results come from malloc's heap, which
reuses the memory a freed result leaves as it is.

So a result above :data:`REUSED_ABOVE_BYTES` is a view of a block this module owns:
when the last tensor or array on that memory goes (the result, any view of it, a
numpy array made from it), the block comes back here, and the next result of the
same number of floats takes it, its pages present. At most one free block is kept:
the memory held beyond the caller's own results is at most one result
(:func:`held_bytes`; :func:`release` frees it). Such a result is an ordinary tensor
except that its storage cannot grow (``resize_`` to more elements raises).
"""

from __future__ import annotations

import collections
import math
import weakref

import torch

#: Results larger than this many bytes reuse a block (glibc maps anything larger
#: afresh for each allocation; at or below it its heap reuses freed memory).
REUSED_ABOVE_BYTES = 32 << 20

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
