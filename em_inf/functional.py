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
the CPU paths (both modes, compiled and eager). The compiled kernels read a float32
CPU input where it lies and write the new tensor (out of place, the bits of the
same call in place on a copy); other inputs are copied to float32 first. On the CPU
a result above 1 MiB takes the memory of such a result the caller has let go, when
one of its size is free, instead of faulting in fresh pages
(:mod:`em_inf.reused_results`).
"""

from __future__ import annotations

import torch

from em_inf import checks, modes, reused_results
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
    params = dict(threshold=threshold, kl_weight=kl_weight, lr=lr, steps=steps)
    return run_mode("logits", logits, params, stats=stats)


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
    params = dict(threshold=threshold, alpha=alpha, t_min=t_min, t_max=t_max)
    return run_mode("temperature", logits, params, stats=stats)


def run_mode(
    mode: str,
    logits: torch.Tensor,
    params: dict[str, Param],
    *,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`em_inf` (``mode == "logits"``) or :func:`adaptive_temperature`
    (``"temperature"``) with the parameters named in ``modes.PARAMS[mode]``."""
    checks.logits_batch(logits)
    backend = backend_for(logits.device)
    values = [params[name] for name in modes.PARAMS[mode]]
    if backend == "cpu" and _kernels_read(logits):
        # The kernels read logits where it lies and write a new tensor.
        return modes.out_of_place(mode)(logits, *values, stats=stats)
    rows, device = logits.shape[0], logits.device
    if device.type == "cpu":
        out = reused_results.new_float32(logits.shape)
    else:
        out = torch.empty(logits.shape, dtype=torch.float32, device=device)
    out.copy_(logits)
    if backend == "triton":
        return _run_triton(mode, out, params, stats)
    per_row = [
        checks.per_row(name, value, rows, device, modes.param_dtype(name))
        for name, value in zip(modes.PARAMS[mode], values, strict=True)
    ]
    return modes.in_place(backend, mode)(out, *per_row, stats=stats)


def _kernels_read(logits: torch.Tensor) -> bool:
    """Whether the CPU kernels can read ``logits`` as it is: float32, contiguous
    along the vocabulary."""
    return logits.dtype == torch.float32 and checks.contiguous_along_vocabulary(logits)


def _run_triton(
    mode: str,
    out: torch.Tensor,
    params: dict[str, Param],
    stats: torch.Tensor | None,
) -> torch.Tensor:
    """The Triton kernels on ``out`` in place, slot = row."""
    from em_inf.kernels import adaptive_temperature_rows_, em_inf_rows_

    rows, device = out.shape[0], out.device
    row_slot = torch.arange(rows, dtype=torch.int32, device=device)
    per_slot = {
        name: checks.per_row(
            name,
            params[name],
            rows,
            device,
            torch.int32 if name == "steps" else torch.float32,
        )
        for name in modes.PARAMS[mode]
    }
    if mode == "temperature":
        return adaptive_temperature_rows_(out, row_slot, **per_slot, stats=stats)
    steps = params["steps"]  # a number: the most steps known without a sync
    max_steps = None if isinstance(steps, torch.Tensor) else int(steps)
    return em_inf_rows_(out, row_slot, **per_slot, max_steps=max_steps, stats=stats)
