"""Host-to-device copies that never make the host wait, the way vLLM's sampling states
do it: values are written into a pinned host buffer and copied with
``non_blocking=True`` on the current stream.

A non-blocking copy reads its pinned source when the GPU reaches it, possibly after
the host has moved on to the next step, so a buffer may be written again only once
its copy has run: each copy records a CUDA event, and :meth:`HostToDevice.host`
hands out the oldest buffer whose event has completed (``Event.query()``, which does
not wait), or a new one when all are still in flight (in vLLM at most two steps are,
so two or three buffers suffice). Without CUDA there is nothing to pin and the copy
is an ordinary one.
"""

from __future__ import annotations

import numpy as np
import torch


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    """A host tensor for copies to or from ``device``: pinned where ``device`` is a
    CUDA device (and pinning works), plain host memory otherwise."""
    if device.type == "cuda":
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:  # no pinnable memory (e.g. some containers): plain
            pass
    return torch.empty(shape, dtype=dtype)


class HostToDevice:
    """A device tensor fed from the host without synchronising.

    Usage, once per update: ``buf = staging.host()`` (a numpy view to fill in
    full), then ``staging.send()``, which enqueues the copy into :attr:`device_tensor`.

    Attributes:
        device_tensor: the ``shape`` / ``dtype`` tensor on the device (its address never
            changes: kernels and CUDA graphs may hold on to it).
    """

    def __init__(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> None:
        self.device_tensor = torch.zeros(shape, dtype=dtype, device=device)
        self._cuda = device.type == "cuda"
        # (host tensor, its numpy view, the event recorded after its last copy)
        self._ring: list[tuple[torch.Tensor, np.ndarray, torch.cuda.Event | None]] = []
        self._next = 0
        self._grow()  # the first buffer now, not in a step

    def _grow(self) -> None:
        target = self.device_tensor
        buffer = pinned_empty(tuple(target.shape), target.dtype, target.device)
        event = torch.cuda.Event() if self._cuda else None
        self._ring.append((buffer, buffer.numpy(), event))
        self._next = len(self._ring) - 1

    def host(self) -> np.ndarray:
        """A host buffer (numpy view, same shape and dtype) safe to overwrite now."""
        for offset in range(len(self._ring)):
            index = (self._next + offset) % len(self._ring)
            event = self._ring[index][2]
            if event is None or event.query():  # never recorded: True
                self._next = index
                return self._ring[index][1]
        self._grow()
        return self._ring[self._next][1]

    def send(self) -> None:
        """Copy the buffer last handed out by :meth:`host` to :attr:`device_tensor`,
        without waiting (on the current stream)."""
        buffer, _, event = self._ring[self._next]
        self.device_tensor.copy_(buffer, non_blocking=True)
        if event is not None:
            event.record()
        self._next = (self._next + 1) % len(self._ring)

    @property
    def buffers(self) -> int:
        """How many host buffers the ring holds (grows only while copies lag)."""
        return len(self._ring)
