"""What the batched entry points accept, checked in one place for every path: the
public functions (:mod:`em_inf.functional`), the compiled CPU kernels
(:mod:`em_inf.cpu_backend`) and the Triton kernels (:mod:`em_inf.kernels`).

Each check raises ``ValueError`` naming the argument, what it must be and what it
got, before any kernel sees the data (a kernel given the wrong layout would read or
write the wrong bytes).
"""

from __future__ import annotations

import functools
import math

import torch

from em_inf import counters
from em_inf.config import MODES


def logits_batch(logits: torch.Tensor) -> None:
    """``logits`` is a floating ``[N, V]`` tensor (any float dtype: the public
    functions copy it to float32)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(
            f"logits must be a [N, V] tensor, got "
            f"{getattr(logits, 'shape', type(logits).__name__)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def contiguous_along_vocabulary(logits: torch.Tensor) -> bool:
    """Whether the entries of each row of ``[N, V]`` ``logits`` are adjacent in
    memory (rows may be strided), as the kernels address them."""
    return logits.shape[1] <= 1 or logits.stride(1) == 1


def in_place_logits(logits: torch.Tensor, device_type: str | None = None) -> None:
    """``logits`` can be processed in place by a kernel: a float32 ``[N, V]`` tensor,
    contiguous along the vocabulary (rows may be strided), on a ``device_type``
    device when given."""
    logits_batch(logits)
    if logits.dtype != torch.float32:
        raise ValueError(
            f"logits must be float32 (modified in place), got {logits.dtype}"
        )
    if device_type is not None and logits.device.type != device_type:
        raise ValueError(f"logits must be on the {device_type}, got {logits.device}")
    if not contiguous_along_vocabulary(logits):
        raise ValueError(
            f"logits must be contiguous along the vocabulary, got strides "
            f"{tuple(logits.stride())}"
        )


def readable_logits(logits: torch.Tensor, name: str = "logits") -> None:
    """``logits`` (called ``name`` in errors) can be read by the CPU kernels where
    it lies: a float32 CPU ``[N, V]`` tensor, contiguous along the vocabulary
    (rows may be strided)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(
            f"{name} must be a [N, V] tensor, got "
            f"{getattr(logits, 'shape', type(logits).__name__)}"
        )
    if logits.dtype != torch.float32 or not logits.is_cpu:
        raise ValueError(
            f"{name} must be a float32 CPU tensor, got {logits.dtype} on "
            f"{logits.device}"
        )
    if not contiguous_along_vocabulary(logits):
        raise ValueError(
            f"{name} must be contiguous along the vocabulary, got strides "
            f"{tuple(logits.stride())}"
        )


def source_logits(source: torch.Tensor, logits: torch.Tensor) -> None:
    """``source`` can be read by the CPU kernels computing ``logits`` out of place
    (:func:`readable_logits`, of ``logits``' shape), sharing no memory with
    ``logits`` (which the kernels write while they read ``source``)."""
    if not isinstance(source, torch.Tensor) or source.shape != logits.shape:
        raise ValueError(
            f"source must be a tensor of logits' shape {tuple(logits.shape)}, got "
            f"{getattr(source, 'shape', type(source).__name__)}"
        )
    readable_logits(source, "source")
    if _spans_overlap(source, logits):
        raise ValueError("source must not share memory with logits")


def _spans_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges two non-empty ``[N, V]`` tensors' elements span
    overlap."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a_start, b_start = a.data_ptr(), b.data_ptr()
    return a_start < b_start + _span_bytes(b) and b_start < a_start + _span_bytes(a)


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes from a non-empty ``[N, V]`` tensor's first element to past its last."""
    (rows, vocab), (row_stride, stride) = t.shape, t.stride()
    return ((rows - 1) * row_stride + (vocab - 1) * stride + 1) * t.element_size()


def per_row(
    name: str,
    value: float | int | torch.Tensor,
    rows: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A parameter given as one number for every row, or one value per row (a
    ``[rows]`` or ``[rows, 1]`` tensor, or a 0-d one), as a contiguous ``[rows]``
    ``dtype`` tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.expand(rows)
        if value.shape not in ((rows,), (rows, 1)):
            raise ValueError(
                f"{name} must be a number or one parameter per row ([{rows}]), "
                f"got shape {tuple(value.shape)}"
            )
        if (
            value.dtype == dtype
            and value.device == device
            and value.shape == (rows,)
            and value.is_contiguous()
        ):
            return value  # as the kernels take it: no torch operation per call
        return value.to(device=device, dtype=dtype).reshape(rows).contiguous()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number or a tensor, got {value!r}")
    return _shared_column(value, math.copysign(1.0, value), rows, device, dtype)


@functools.lru_cache(maxsize=256)
def _shared_column(
    value: float | int,
    sign: float,
    rows: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``value`` in every entry of a ``[rows]`` tensor, made once per key and shared
    by the calls that ask for it (every path only reads its parameter columns), so
    that a call given Python numbers runs no torch operation for them. ``sign``
    keeps -0.0 and 0.0, equal as keys, apart."""
    return torch.full((rows,), value, device=device, dtype=dtype)


def row_slot(row_slot: torch.Tensor, logits: torch.Tensor) -> None:
    """``row_slot``: the contiguous int32 or int64 ``[N]`` slot of each row."""
    if not isinstance(row_slot, torch.Tensor) or row_slot.shape != (logits.shape[0],):
        raise ValueError(
            f"row_slot must be a [N] = [{logits.shape[0]}] tensor, got "
            f"{getattr(row_slot, 'shape', type(row_slot).__name__)}"
        )
    if row_slot.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"row_slot must be int32 or int64, got {row_slot.dtype}")
    if row_slot.numel() > 1 and row_slot.stride(0) != 1:
        raise ValueError(
            f"row_slot must be contiguous, got stride {row_slot.stride(0)}"
        )
    same_device("row_slot", row_slot, logits)


def slot_param(
    name: str,
    value: torch.Tensor,
    logits: torch.Tensor,
    dtypes: tuple[torch.dtype, ...],
) -> None:
    """``value``: a contiguous per-slot ``[S]`` tensor of one of ``dtypes``."""
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        raise ValueError(
            f"{name} must be a per-slot [S] tensor, got "
            f"{getattr(value, 'shape', type(value).__name__)}"
        )
    if value.dtype not in dtypes:
        raise ValueError(
            f"{name} must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}"
        )
    if value.stride(0) != 1 and value.numel() > 1:
        raise ValueError(f"{name} must be contiguous, got stride {value.stride(0)}")
    same_device(name, value, logits)


def row_output(name: str, out: torch.Tensor, rows: int, logits: torch.Tensor) -> None:
    """``out`` can receive one float32 value per processed row: a contiguous
    ``[rows]`` float32 tensor on the logits' device."""
    if (
        not isinstance(out, torch.Tensor)
        or out.dtype != torch.float32
        or out.shape != (rows,)
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"{name} must be a contiguous float32 [{rows}] tensor, got "
            f"{getattr(out, 'dtype', type(out).__name__)} "
            f"{tuple(getattr(out, 'shape', ()))}"
        )
    same_device(name, out, logits)


def stats(
    stats: torch.Tensor | None, logits: torch.Tensor, *, both_modes: bool = False
) -> None:
    """``stats``: ``None`` or counters on the logits' device (layout:
    :mod:`em_inf.counters`): one mode's, a contiguous int64 ``[counters.WIDTH]``
    tensor, or with ``both_modes`` an int64 ``[2, counters.WIDTH]`` one with
    contiguous rows (row ``i`` for mode ``config.MODES[i]``)."""
    if stats is None:
        return
    shape = (len(MODES), counters.WIDTH) if both_modes else (counters.WIDTH,)
    if (
        not isinstance(stats, torch.Tensor)
        or stats.shape != shape
        or stats.dtype != torch.int64
    ):
        raise ValueError(
            f"stats must be an int64 {list(shape)} tensor (em_inf.counters), "
            f"got {getattr(stats, 'dtype', type(stats).__name__)} "
            f"{tuple(getattr(stats, 'shape', ()))}"
        )
    if stats.stride(-1) != 1:
        raise ValueError(
            f"stats must have contiguous rows, got strides {stats.stride()}"
        )
    same_device("stats", stats, logits)


def same_device(name: str, value: torch.Tensor, logits: torch.Tensor) -> None:
    if value.device != logits.device:
        raise ValueError(
            f"{name} is on {value.device} but logits are on {logits.device}"
        )
