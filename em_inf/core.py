"""The batched core behind both vLLM adapters: per-slot settings and one call per
decoding step for every row that uses EM-INF.

A *slot* is where vLLM keeps a request between steps: the persistent-batch index on
Model Runner V1, the request-state slot on V2. Settings live in host (numpy) arrays
indexed by slot, so deciding which rows to process never syncs with the device.
"""

from __future__ import annotations

import numpy as np
import torch

from em_inf import functional
from em_inf.config import EMInfConfig


class SlotSettings:
    """EM-INF settings of the requests in an engine's batch, one entry per slot.

    Attributes (all ``[num_slots]`` numpy arrays):
        enabled: bool, whether the slot's request uses EM-INF.
        temperature_mode: bool, ``mode == "temperature"``.
        threshold, kl_weight, lr, alpha, t_min, t_max: float32.
        steps: int64.
    """

    _FLOAT_FIELDS = ("threshold", "kl_weight", "lr", "alpha", "t_min", "t_max")
    _ARRAYS = ("enabled", "temperature_mode", "steps", *_FLOAT_FIELDS)

    def __init__(self, num_slots: int) -> None:
        self.enabled = np.zeros(num_slots, dtype=bool)
        self.temperature_mode = np.zeros(num_slots, dtype=bool)
        self.steps = np.zeros(num_slots, dtype=np.int64)
        for name in self._FLOAT_FIELDS:
            setattr(self, name, np.zeros(num_slots, dtype=np.float32))

    def _arrays(self) -> list[np.ndarray]:
        return [getattr(self, name) for name in self._ARRAYS]

    def _ensure(self, slot: int) -> None:
        size = len(self.enabled)
        if slot < size:
            return
        grown = max(slot + 1, 2 * size)
        for name in self._ARRAYS:
            old = getattr(self, name)
            new = np.zeros(grown, dtype=old.dtype)
            new[:size] = old
            setattr(self, name, new)

    def set(self, slot: int, config: EMInfConfig | None) -> None:
        """Give ``slot`` the settings ``config``; ``None`` turns EM-INF off there."""
        self._ensure(slot)
        self.enabled[slot] = config is not None
        if config is None:
            return
        self.temperature_mode[slot] = config.mode == "temperature"
        self.steps[slot] = config.steps
        for name in self._FLOAT_FIELDS:
            getattr(self, name)[slot] = getattr(config, name)

    def move(self, src: int, dst: int) -> None:
        """Copy ``src``'s entry to ``dst`` (``src`` keeps a stale copy)."""
        self._ensure(max(src, dst))
        for array in self._arrays():
            array[dst] = array[src]

    def swap(self, a: int, b: int) -> None:
        self._ensure(max(a, b))
        for array in self._arrays():
            array[[a, b]] = array[[b, a]]


def apply_to_rows(
    logits: torch.Tensor, row_slots: np.ndarray, settings: SlotSettings
) -> torch.Tensor:
    """Run EM-INF in place on the rows of ``logits`` whose slot has it enabled.

    Args:
        logits: ``[N, V]`` float32 logits of this step (unscaled), on any device.
        row_slots: ``[N]`` integer numpy array, the slot of each row.
        settings: the per-slot settings.

    Returns:
        ``logits``, modified in place; rows of other slots are untouched.
    """
    enabled = settings.enabled[row_slots]
    if not enabled.any():
        return logits
    temperature_mode = settings.temperature_mode[row_slots]
    for use_temperature in (False, True):
        rows = np.flatnonzero(enabled & (temperature_mode == use_temperature))
        if rows.size == 0:
            continue
        slots = row_slots[rows]
        whole_batch = rows.size == logits.shape[0]
        index = None if whole_batch else torch.from_numpy(rows).to(logits.device)
        sub = logits if whole_batch else logits.index_select(0, index)

        def per_row(array: np.ndarray, slots: np.ndarray = slots) -> torch.Tensor:
            return torch.from_numpy(array[slots]).to(logits.device)

        if use_temperature:
            out = functional.adaptive_temperature(
                sub,
                threshold=per_row(settings.threshold),
                alpha=per_row(settings.alpha),
                t_min=per_row(settings.t_min),
                t_max=per_row(settings.t_max),
            )
        else:
            out = functional.em_inf(
                sub,
                threshold=per_row(settings.threshold),
                kl_weight=per_row(settings.kl_weight),
                lr=per_row(settings.lr),
                steps=per_row(settings.steps),
            )
        if whole_batch:
            logits.copy_(out)
        else:
            logits.index_copy_(0, index, out)
    return logits
