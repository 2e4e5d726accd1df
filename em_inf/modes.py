"""EM-INF's two modes side by side, and the one place a batch is split by mode.

Which parameters each mode takes (:data:`PARAMS`), which rows of a batch use which
mode (:func:`rows_by_mode`), and which in-place function runs a mode on the CPU
paths (:func:`in_place`). The vLLM core (:mod:`em_inf.core`), the transformers
processor (:mod:`em_inf.hf`) and the public functions (:mod:`em_inf.functional`)
all split and dispatch through these.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from em_inf import cpu_backend, torch_backend
from em_inf.config import MODES

#: Each mode's per-row parameters, in the order its functions take them.
PARAMS: dict[str, tuple[str, ...]] = {
    "logits": ("threshold", "kl_weight", "lr", "steps"),
    "temperature": ("threshold", "alpha", "t_min", "t_max"),
}
#: The mode code of a row that EM-INF leaves alone (others: an index into MODES).
LEFT_ALONE = -1


def param_dtype(name: str) -> torch.dtype:
    """The dtype the CPU paths take parameter ``name`` in: ``steps`` int64, the
    rest float32."""
    return torch.int64 if name == "steps" else torch.float32


def rows_by_mode(mode_codes: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The rows of each mode present in a batch, in :data:`MODES` order.

    Args:
        mode_codes: integer ``[N]``: each row's mode as an index into ``MODES``, or
            :data:`LEFT_ALONE`.

    Returns:
        ``(mode, rows)`` pairs, ``rows`` an int64 ``[n]`` array of row indices in
        ascending order; modes no row uses are left out.
    """
    pairs = []
    for code, mode in enumerate(MODES):
        rows = np.flatnonzero(mode_codes == code)
        if rows.size:
            pairs.append((mode, rows))
    return pairs


def in_place(backend: str, mode: str) -> Callable[..., torch.Tensor]:
    """The in-place function of ``mode`` on the ``"cpu"`` (compiled) or
    ``"torch"`` (eager) path; both take ``(logits, *PARAMS[mode], stats=...)``,
    the compiled one also ``source=`` (out of place: from ``source`` into
    ``logits``)."""
    module = cpu_backend if backend == "cpu" else torch_backend
    return module.adaptive_temperature_ if mode == "temperature" else module.em_inf_


def out_of_place(mode: str) -> Callable[..., torch.Tensor]:
    """The compiled kernels' function of ``mode`` that reads a float32 CPU batch
    where it lies and returns a new tensor: ``(logits, *PARAMS[mode], stats=...)``,
    each parameter a number or one value per row."""
    return (
        cpu_backend.adaptive_temperature
        if mode == "temperature"
        else cpu_backend.em_inf
    )
