"""Catch, on CPU tensors, what would make the host wait for a GPU.

On CUDA a step must never read a device value on the host (``.item()``, ``.cpu()``,
``.tolist()``, ``bool(t)``, ...), copy host data to the device from pageable memory
or with ``non_blocking=False``, or run an op whose output size depends on the data
(``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``). On CPU none of
these costs anything, and several (``.cpu()``, ``.numpy()`` on a CPU tensor) do not
even reach PyTorch's dispatcher, so :class:`HostSyncDetector` looks at both ends:

* the ``torch.Tensor`` methods that hand a value to the host are patched;
* a ``TorchDispatchMode`` sees every op, with its ``non_blocking`` flag;
* ``torch.as_tensor`` / ``torch.tensor`` with a ``device`` are host-to-device copies.

A call counts when the code that made it is not Triton's (the interpreter stands
in for the GPU and copies freely) and not PyTorch's own. ``numpy()`` is allowed on
em-inf's host staging buffers (made by ``em_inf.staging.pinned_empty``, pinned on
CUDA), which is what they are for; copies are listed with their flag so a test can
also require that a call makes none at all.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

_TORCH_DIR = os.path.dirname(torch.__file__)
_HERE = os.path.abspath(__file__)
#: Ops whose output size depends on the data: on CUDA they wait for the device.
_DATA_DEPENDENT = (
    "nonzero",
    "masked_select",
    "_unique",
    "unique_",
    "repeat_interleave",
)
_TO_HOST = ("cpu", "numpy", "tolist", "item", "__bool__", "__int__", "__float__")
_TO_HOST += ("__index__", "__array__")


def _caller() -> str | None:
    """``file:line`` of the code that called into torch, or ``None`` when that is
    Triton (its interpreter) or nothing outside torch."""
    frame = sys._getframe(2)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not (name.startswith(_TORCH_DIR) or name == _HERE):
            if f"{os.sep}triton{os.sep}" in name:
                return None
            return f"{os.path.relpath(name)}:{frame.f_lineno}"
        frame = frame.f_back
    return None


class _Ops(TorchDispatchMode):
    def __init__(self, detector: HostSyncDetector) -> None:
        super().__init__()
        self.detector = detector

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        where = _caller()
        if where is not None:
            if name.startswith("copy_") or name.startswith("_to_copy"):
                flag = args[2] if name.startswith("copy_") and len(args) > 2 else None
                blocking = not (flag or kwargs.get("non_blocking", False))
                self.detector.copies.append((where, blocking))
                if blocking:
                    self.detector.found.append(f"blocking copy ({name}) at {where}")
            elif name.startswith("_local_scalar_dense"):
                self.detector.found.append(f"device value read (item) at {where}")
            elif name.startswith(_DATA_DEPENDENT):
                self.detector.found.append(f"data-dependent size ({name}) at {where}")
        return func(*args, **kwargs)


class HostSyncDetector:
    """Context manager collecting :attr:`found` (what would sync on CUDA) and
    :attr:`copies` (every copy op: ``(where, blocking)``) while it is active."""

    def __init__(self) -> None:
        self.monkeypatch = pytest.MonkeyPatch()
        self.found: list[str] = []
        self.copies: list[tuple[str, bool]] = []
        self._host_buffers: set[int] = set()
        self._ops = _Ops(self)

    def __enter__(self) -> HostSyncDetector:
        for method in _TO_HOST:
            self._patch_method(method)
        self._patch_to()
        for factory in ("as_tensor", "tensor"):
            self._patch_factory(factory)
        self._track_host_buffers()
        self._ops.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ops.__exit__(*exc)
        self.monkeypatch.undo()

    def _patch_method(self, method: str) -> None:
        real = getattr(torch.Tensor, method)
        detector = self

        def wrapper(tensor, *args, **kwargs):
            where = _caller()
            allowed = method == "numpy" and id(tensor) in detector._host_buffers
            if where is not None and not allowed:
                detector.found.append(f"Tensor.{method}() at {where}")
            return real(tensor, *args, **kwargs)

        self.monkeypatch.setattr(torch.Tensor, method, wrapper)

    def _patch_to(self) -> None:
        real = torch.Tensor.to
        detector = self

        def to(tensor, *args, **kwargs):
            moves = "device" in kwargs or any(
                isinstance(a, torch.device | str | torch.Tensor) for a in args
            )
            where = _caller()
            if moves and where is not None and not kwargs.get("non_blocking", False):
                detector.found.append(f"blocking Tensor.to(device) at {where}")
            return real(tensor, *args, **kwargs)

        self.monkeypatch.setattr(torch.Tensor, "to", to)

    def _patch_factory(self, factory: str) -> None:
        real = getattr(torch, factory)
        detector = self

        def make(*args, **kwargs):
            where = _caller()
            if kwargs.get("device") is not None and where is not None:
                detector.found.append(f"torch.{factory}(..., device=) at {where}")
            return real(*args, **kwargs)

        self.monkeypatch.setattr(torch, factory, make)

    def _track_host_buffers(self) -> None:
        from em_inf import staging

        real = staging.pinned_empty
        detector = self

        def pinned_empty(*args, **kwargs):
            buffer = real(*args, **kwargs)
            detector._host_buffers.add(id(buffer))
            return buffer

        self.monkeypatch.setattr(staging, "pinned_empty", pinned_empty)
