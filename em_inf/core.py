"""The batched core behind both vLLM adapters: per-slot settings and one call per
decoding step for every row that uses EM-INF.

A *slot* is where vLLM keeps a request between steps: the persistent-batch index on
Model Runner V1, the request-state slot on V2. Settings live in host (numpy) arrays
indexed by slot, so deciding which rows to process never syncs with the device.

Paths, chosen by :func:`em_inf.backend.backend_for`: on CUDA the Triton kernels
process the batch in place, reading each row's settings through a row -> slot index
from per-slot device tensors (mirrored from the host arrays when they change); on CPU
the compiled kernels process the rows that use EM-INF in place, by row index;
elsewhere (or where those cannot be built) those rows are gathered and run through
the eager PyTorch path.
"""

from __future__ import annotations

import numpy as np
import torch

from em_inf import cpu_backend, torch_backend
from em_inf.backend import backend_for
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
        self.version = 0  # bumped on every change; device mirrors compare it
        self._mirror: tuple[int, torch.device, dict[str, torch.Tensor]] | None = None
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
        self.version += 1
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
        self.version += 1
        for array in self._arrays():
            array[dst] = array[src]

    def swap(self, a: int, b: int) -> None:
        self._ensure(max(a, b))
        self.version += 1
        for array in self._arrays():
            array[[a, b]] = array[[b, a]]

    def on_device(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-slot ``[num_slots]`` kernel tables on ``device``, copied again only
        after a change: float32 settings and int64 ``steps``, masked per mode so
        that any row -> slot index can go to both kernels as it is. A slot outside
        the logits mode has ``steps = 0``; one outside the temperature mode has
        ``temperature_threshold = +inf``; both kernels leave such rows untouched.
        """
        if self._mirror is None or self._mirror[:2] != (self.version, device):
            logits_mode = self.enabled & ~self.temperature_mode
            temperature_mode = self.enabled & self.temperature_mode
            arrays = {name: getattr(self, name) for name in self._FLOAT_FIELDS}
            arrays["steps"] = np.where(logits_mode, self.steps, 0)
            arrays["temperature_threshold"] = np.where(
                temperature_mode, self.threshold, np.float32(np.inf)
            )
            tensors = {
                name: torch.from_numpy(array).to(device)
                for name, array in arrays.items()
            }
            self._mirror = (self.version, device, tensors)
        return self._mirror[2]


def apply_to_rows(
    logits: torch.Tensor,
    row_slots: np.ndarray,
    settings: SlotSettings,
    device_row_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run EM-INF in place on the rows of ``logits`` whose slot has it enabled.

    Args:
        logits: ``[N, V]`` float32 logits of this step (unscaled), on any device.
        row_slots: ``[N]`` integer numpy array, the slot of each row.
        settings: the per-slot settings.
        device_row_slots: the same mapping as an integer ``[N]`` tensor on
            ``logits``' device, where the caller has one (the kernel path uses it).

    Returns:
        ``logits``, modified in place; rows of other slots are untouched.
    """
    enabled = settings.enabled[row_slots]
    if not enabled.any():
        return logits
    backend = backend_for(logits.device)
    if backend == "triton":
        return _apply_kernels(logits, row_slots, enabled, settings, device_row_slots)
    return _apply_torch(logits, row_slots, enabled, settings, backend)


def _apply_torch(
    logits: torch.Tensor,
    row_slots: np.ndarray,
    enabled: np.ndarray,
    settings: SlotSettings,
    backend: str = "torch",
) -> torch.Tensor:
    """The CPU paths, in place: per mode, the rows that use it; the compiled
    kernels (``backend == "cpu"``) process them where they lie, the eager PyTorch
    path on the whole batch or on a gathered copy scattered back."""
    temperature_mode = settings.temperature_mode[row_slots]
    for use_temperature in (False, True):
        rows = np.flatnonzero(enabled & (temperature_mode == use_temperature))
        if rows.size == 0:
            continue
        slots = row_slots[rows]
        whole_batch = rows.size == logits.shape[0]
        index = None if whole_batch else torch.from_numpy(rows).to(logits.device)

        def per_row(array: np.ndarray, slots: np.ndarray = slots) -> torch.Tensor:
            """``[rows, 1]`` tensor of the rows' settings."""
            return torch.from_numpy(array[slots]).to(logits.device).unsqueeze(1)

        if backend == "cpu":
            process_ = (
                cpu_backend.adaptive_temperature_
                if use_temperature
                else cpu_backend.em_inf_
            )
            fields = (
                ("alpha", "t_min", "t_max")
                if use_temperature
                else ("kl_weight", "lr", "steps")
            )
            process_(
                logits,
                per_row(settings.threshold),
                *(per_row(getattr(settings, name)) for name in fields),
                rows=index,
            )
            continue
        sub = logits if whole_batch else logits.index_select(0, index)
        if use_temperature:
            torch_backend.adaptive_temperature_(
                sub,
                per_row(settings.threshold),
                per_row(settings.alpha),
                per_row(settings.t_min),
                per_row(settings.t_max),
            )
        else:
            torch_backend.em_inf_(
                sub,
                per_row(settings.threshold),
                per_row(settings.kl_weight),
                per_row(settings.lr),
                per_row(settings.steps),
            )
        if not whole_batch:
            logits.index_copy_(0, index, sub)
    return logits


def _apply_kernels(
    logits: torch.Tensor,
    row_slots: np.ndarray,
    enabled: np.ndarray,
    settings: SlotSettings,
    device_row_slots: torch.Tensor | None,
) -> torch.Tensor:
    """In place, one kernel launch sequence per mode present in the batch. The
    kernels read each row's settings through ``device_row_slots`` (vLLM V2's
    ``expanded_idx_mapping``; ``arange`` when rows are slots) from the per-mode
    tables, so nothing per step crosses from host to device."""
    from em_inf.kernels import adaptive_temperature_rows_, em_inf_rows_

    table = settings.on_device(logits.device)
    if device_row_slots is None:
        device_row_slots = torch.arange(logits.shape[0], device=logits.device)
    temperature_mode = settings.temperature_mode[row_slots]
    if (enabled & ~temperature_mode).any():
        em_inf_rows_(
            logits,
            device_row_slots,
            table["threshold"],
            table["kl_weight"],
            table["lr"],
            table["steps"],
            max_steps=int(settings.steps[row_slots[enabled & ~temperature_mode]].max()),
        )
    if (enabled & temperature_mode).any():
        adaptive_temperature_rows_(
            logits,
            device_row_slots,
            table["temperature_threshold"],
            table["alpha"],
            table["t_min"],
            table["t_max"],
        )
    return logits
