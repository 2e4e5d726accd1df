"""Public batched EM-INF: ``[B, V]`` logits in, processed float32 ``[B, V]`` out.

Each parameter is a Python number (shared by all rows) or a ``[B]`` tensor (one value
per row). Rows are independent; a row already below its threshold (logits mode: its
starting entropy ``< threshold``; temperature mode: ``<= threshold``, as in the
paper) comes back bit-identical (as float32), masked entries (``-inf``, or at or
below ``-1e37``) keep their value, and no NaN is produced.

Backends (:func:`em_inf.backend.backend_for`): CUDA tensors run the fused Triton
kernels of :mod:`em_inf.kernels` (when ``triton`` is installed), CPU tensors the
compiled kernels of :mod:`em_inf.cpu_backend` (built on the first call, about a
second, then cached on disk), or the eager PyTorch code of :mod:`em_inf.torch_backend`
where those cannot be built. The environment variable ``EM_INF_BACKEND`` (``cpu`` |
``torch`` | ``triton`` | ``auto``, read at every call) forces one; the Triton kernels
run on CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``, set
before ``em_inf.kernels`` is first imported). Triton is imported lazily, on the first
kernel call, never at import time.

Every row's result is bitwise independent of the other rows and of the batch size on
the CPU paths (both modes, compiled and eager).
"""

from __future__ import annotations

import torch

from em_inf import cpu_backend, torch_backend
from em_inf.backend import backend_for

Param = float | int | torch.Tensor


def em_inf(
    logits: torch.Tensor,
    *,
    threshold: Param,
    kl_weight: Param,
    lr: Param,
    steps: Param,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """EM-INF (the paper's logits mode) on a batch.

    Args:
        logits: ``[B, V]`` float tensor of raw, unscaled logits; ``-inf`` = masked.
        threshold: entropy (nats); step ``t + 1`` runs while ``H(z_t) >=
            threshold`` (``delta``).
        kl_weight: weight of ``KL(p0 || q)`` (``lam``).
        lr: Adam learning rate (``eta``).
        steps: most Adam steps (``n``); integer.
        stats: optional int64 ``[counters.WIDTH]`` tensor on ``logits``' device
            that this call's counts are added to (:mod:`em_inf.counters`).

    Returns:
        A new float32 ``[B, V]`` tensor on ``logits``' device.
    """
    out = _float32_copy(logits)
    rows = out.shape[0]
    backend = backend_for(out.device)
    if backend == "triton":
        return _em_inf_triton(out, threshold, kl_weight, lr, steps, stats)
    return _eager_or_compiled(backend).em_inf_(
        out,
        _per_row("threshold", threshold, rows, out.device, torch.float32),
        _per_row("kl_weight", kl_weight, rows, out.device, torch.float32),
        _per_row("lr", lr, rows, out.device, torch.float32),
        _per_row("steps", steps, rows, out.device, torch.int64),
        stats=stats,
    )


def adaptive_temperature(
    logits: torch.Tensor,
    *,
    threshold: Param,
    alpha: Param,
    t_min: Param,
    t_max: Param,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """The paper's adaptive-temperature variant on a batch: each row with entropy
    ``H0 > threshold`` is divided by the ``T`` in ``[t_min, t_max]`` that gives
    entropy ``max(threshold, alpha * H0)`` (to a relative
    :data:`~em_inf.config.TEMPERATURE_RTOL`, or the nearer end of the interval when
    the target is out of reach).

    Args:
        logits: ``[B, V]`` float tensor of raw, unscaled logits; ``-inf`` = masked.
        stats: as in :func:`em_inf`.

    Returns:
        A new float32 ``[B, V]`` tensor on ``logits``' device.
    """
    out = _float32_copy(logits)
    rows = out.shape[0]
    backend = backend_for(out.device)
    if backend == "triton":
        return _adaptive_temperature_triton(out, threshold, alpha, t_min, t_max, stats)
    return _eager_or_compiled(backend).adaptive_temperature_(
        out,
        _per_row("threshold", threshold, rows, out.device, torch.float32),
        _per_row("alpha", alpha, rows, out.device, torch.float32),
        _per_row("t_min", t_min, rows, out.device, torch.float32),
        _per_row("t_max", t_max, rows, out.device, torch.float32),
        stats=stats,
    )


def _eager_or_compiled(backend: str):
    """The module of the ``cpu`` or ``torch`` backend (same entry points)."""
    return cpu_backend if backend == "cpu" else torch_backend


def _float32_copy(logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(
            f"logits must be a [B, V] tensor, got "
            f"{getattr(logits, 'shape', type(logits).__name__)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    return logits.to(torch.float32, copy=True).contiguous()


def _per_row(
    name: str, value: Param, rows: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """A number or ``[B]`` parameter as a ``[B, 1]`` ``dtype`` tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        if value.shape not in ((rows,), ()):
            raise ValueError(
                f"{name} must be a number or a [B] = [{rows}] tensor, "
                f"got shape {tuple(value.shape)}"
            )
        return value.to(device=device, dtype=dtype).expand(rows).reshape(rows, 1)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number or a tensor, got {value!r}")
    return torch.full((rows, 1), value, device=device, dtype=dtype)


def _per_slot(
    name: str, value: Param, rows: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """A scalar or ``[B]`` parameter as a contiguous ``[B]`` tensor (slot = row)."""
    return _per_row(name, value, rows, device, dtype).reshape(rows).contiguous()


def _max_steps(steps: Param, steps_per_row: torch.Tensor) -> int:
    if isinstance(steps, torch.Tensor):
        return int(steps_per_row.max()) if steps_per_row.numel() else 0
    return int(steps)


def _em_inf_triton(
    out: torch.Tensor,
    threshold: Param,
    kl_weight: Param,
    lr: Param,
    steps: Param,
    stats: torch.Tensor | None,
) -> torch.Tensor:
    from em_inf.kernels import em_inf_rows_

    rows, device = out.shape[0], out.device
    steps_per_row = _per_slot("steps", steps, rows, device, torch.int32)
    return em_inf_rows_(
        out,
        torch.arange(rows, dtype=torch.int32, device=device),
        _per_slot("threshold", threshold, rows, device, torch.float32),
        _per_slot("kl_weight", kl_weight, rows, device, torch.float32),
        _per_slot("lr", lr, rows, device, torch.float32),
        steps_per_row,
        max_steps=_max_steps(steps, steps_per_row),
        stats=stats,
    )


def _adaptive_temperature_triton(
    out: torch.Tensor,
    threshold: Param,
    alpha: Param,
    t_min: Param,
    t_max: Param,
    stats: torch.Tensor | None,
) -> torch.Tensor:
    from em_inf.kernels import adaptive_temperature_rows_

    rows, device = out.shape[0], out.device
    return adaptive_temperature_rows_(
        out,
        torch.arange(rows, dtype=torch.int32, device=device),
        _per_slot("threshold", threshold, rows, device, torch.float32),
        _per_slot("alpha", alpha, rows, device, torch.float32),
        _per_slot("t_min", t_min, rows, device, torch.float32),
        _per_slot("t_max", t_max, rows, device, torch.float32),
        stats=stats,
    )
