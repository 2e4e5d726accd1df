"""The batched core behind both vLLM adapters: per-slot settings and one call per
decoding step for every row that uses EM-INF.

A *slot* is where vLLM keeps a request between steps: the persistent-batch index on
Model Runner V1, the request-state slot on V2. Settings live in host (numpy) arrays
indexed by slot, so deciding what to launch never syncs with the device.

Paths, chosen by :func:`em_inf.backend.backend_for`: on CUDA the Triton kernels
process the batch in place (:mod:`em_inf.kernels.step`), reading each row's settings
through the row -> slot mapping vLLM keeps on the device from per-slot device
tables; on CPU the compiled kernels (:mod:`em_inf.cpu_backend`) process the rows
that use EM-INF where they lie, by row index; elsewhere (or where those cannot be
built) the rows are gathered and run through the eager PyTorch path. The device
tables are refreshed in vLLM's own hook for it (``apply_staged_writes`` /
``update_state``) by a non-blocking copy from pinned memory
(:class:`em_inf.staging.HostToDevice`): nothing in a step waits for the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from em_inf import cpu_backend, torch_backend
from em_inf.backend import backend_for
from em_inf.config import EMInfConfig
from em_inf.staging import HostToDevice

if TYPE_CHECKING:
    from em_inf.kernels.step import StepRunner
    from em_inf.stats import EMInfStats


class SlotTables(NamedTuple):
    """The kernels' per-slot ``[S]`` settings on the device, masked per mode so that
    any row -> slot mapping can go to both kernels as it is: a slot outside the
    logits mode has ``steps = 0``, one outside the temperature mode
    ``temperature_threshold = +inf``; both kernels leave such rows alone."""

    threshold: torch.Tensor  # float32
    kl_weight: torch.Tensor  # float32
    lr: torch.Tensor  # float32
    steps: torch.Tensor  # int32
    temperature_threshold: torch.Tensor  # float32
    alpha: torch.Tensor  # float32
    t_min: torch.Tensor  # float32
    t_max: torch.Tensor  # float32


#: Rows of the packed ``[8, S]`` float32 device table, in :class:`SlotTables` order
#: (``steps`` is stored as int32 bits).
_TABLE_ROWS = SlotTables._fields
_STEPS_ROW = _TABLE_ROWS.index("steps")


class SlotSettings:
    """EM-INF settings of the requests in an engine's batch, one entry per slot.

    Attributes (all ``[num_slots]`` numpy arrays):
        enabled: bool, whether the slot's request uses EM-INF.
        temperature_mode: bool, ``mode == "temperature"``.
        threshold, kl_weight, lr, alpha, t_min, t_max: float32.
        steps: int64.
        logits_steps: int64, ``steps`` where the slot uses the logits mode, else 0.
        temperature_on: bool, whether the slot uses the temperature mode.

    On the kernel path, :meth:`bind` gives the settings a device; every change is
    then staged and reaches the device tables at the next :meth:`flush` (vLLM's
    staging hook) as one non-blocking copy of the whole ``[8, S]`` table: 32 KiB at
    1,024 slots costs one ``cudaMemcpyAsync`` like a single slot would, while
    copying only the changed slots would need a scatter kernel.
    """

    _FLOAT_FIELDS = ("threshold", "kl_weight", "lr", "alpha", "t_min", "t_max")
    _ARRAYS = ("enabled", "temperature_mode", "steps", *_FLOAT_FIELDS)
    _DERIVED = ("logits_steps", "temperature_on")

    def __init__(self, num_slots: int, device: torch.device | None = None) -> None:
        self.enabled = np.zeros(num_slots, dtype=bool)
        self.temperature_mode = np.zeros(num_slots, dtype=bool)
        self.steps = np.zeros(num_slots, dtype=np.int64)
        for name in self._FLOAT_FIELDS:
            setattr(self, name, np.zeros(num_slots, dtype=np.float32))
        self.logits_steps = np.zeros(num_slots, dtype=np.int64)
        self.temperature_on = np.zeros(num_slots, dtype=bool)
        self._table = self._empty_table(num_slots)  # host copy of the device table
        self._staging: HostToDevice | None = None
        self._tables: SlotTables | None = None
        self._dirty = False
        if device is not None:
            self.bind(device)

    @property
    def num_slots(self) -> int:
        return len(self.enabled)

    def _ensure(self, slot: int) -> None:
        size = self.num_slots
        if slot < size:
            return
        grown = max(slot + 1, 2 * size)
        for name in (*self._ARRAYS, *self._DERIVED):
            old = getattr(self, name)
            new = np.zeros(grown, dtype=old.dtype)
            new[:size] = old
            setattr(self, name, new)
        table = self._empty_table(grown)
        table[:, :size] = self._table
        self._table = table
        if self._staging is not None:  # new tables, new address
            self.bind(self._staging.device_tensor.device)

    @staticmethod
    def _empty_table(num_slots: int) -> np.ndarray:
        """The ``[8, S]`` table of unused slots: steps 0, temperature threshold +inf."""
        table = np.zeros((len(_TABLE_ROWS), num_slots), dtype=np.float32)
        table[_TABLE_ROWS.index("temperature_threshold")] = np.inf
        return table

    def _changed(self, slots: list[int]) -> None:
        """Refresh the derived arrays and the table columns of ``slots``, and stage
        the device tables."""
        for slot in slots:
            on = bool(self.enabled[slot])
            temperature = on and bool(self.temperature_mode[slot])
            self.temperature_on[slot] = temperature
            self.logits_steps[slot] = self.steps[slot] if on and not temperature else 0
            self._table[:, slot] = (
                self.threshold[slot],
                self.kl_weight[slot],
                self.lr[slot],
                0.0,  # steps: int32 bits, written below
                self.threshold[slot] if temperature else np.inf,
                self.alpha[slot],
                self.t_min[slot],
                self.t_max[slot],
            )
            self._table[_STEPS_ROW].view(np.int32)[slot] = self.logits_steps[slot]
        self._dirty = True

    def set(self, slot: int, config: EMInfConfig | None) -> None:
        """Give ``slot`` the settings ``config``; ``None`` turns EM-INF off there."""
        self._ensure(slot)
        self.enabled[slot] = config is not None
        if config is not None:
            self.temperature_mode[slot] = config.mode == "temperature"
            self.steps[slot] = config.steps
            for name in self._FLOAT_FIELDS:
                getattr(self, name)[slot] = getattr(config, name)
        self._changed([slot])

    def move(self, src: int, dst: int) -> None:
        """Copy ``src``'s entry to ``dst`` (``src`` keeps a stale copy)."""
        self._ensure(max(src, dst))
        for name in self._ARRAYS:
            array = getattr(self, name)
            array[dst] = array[src]
        self._changed([dst])

    def swap(self, a: int, b: int) -> None:
        self._ensure(max(a, b))
        for name in self._ARRAYS:
            array = getattr(self, name)
            array[[a, b]] = array[[b, a]]
        self._changed([a, b])

    # -- device tables (kernel path) ------------------------------------------------
    def bind(self, device: torch.device) -> None:
        """Keep device tables on ``device`` (allocated now, filled at the next
        :meth:`flush`)."""
        self._staging = HostToDevice(
            (len(_TABLE_ROWS), self.num_slots), torch.float32, torch.device(device)
        )
        table = self._staging.device_tensor
        self._tables = SlotTables(
            *(
                table[i].view(torch.int32) if i == _STEPS_ROW else table[i]
                for i in range(len(_TABLE_ROWS))
            )
        )
        self._dirty = True

    def device_bytes(self) -> int:
        """Device memory of the bound tables (0 when none is bound)."""
        if self._staging is None:
            return 0
        target = self._staging.device_tensor
        return target.numel() * target.element_size()

    def flush(self) -> None:
        """Send staged changes to the device tables: one non-blocking copy from
        pinned memory, nothing when nothing changed or no device is bound."""
        if not self._dirty or self._staging is None:
            return
        np.copyto(self._staging.host(), self._table)
        self._staging.send()
        self._dirty = False

    def tables(self, device: torch.device) -> SlotTables:
        """The device tables on ``device``, up to date (bound and flushed here if
        the caller has not done so in a staging hook)."""
        if self._tables is None or self._staging.device_tensor.device != device:
            self.bind(device)
        self.flush()
        return self._tables


def apply_to_rows(
    logits: torch.Tensor,
    request_slots: np.ndarray,
    settings: SlotSettings,
    row_slots: torch.Tensor | None = None,
    *,
    stats: EMInfStats | None = None,
    runner: StepRunner | None = None,
) -> torch.Tensor:
    """Run EM-INF in place on the rows of ``logits`` whose slot has it enabled.

    Args:
        logits: ``[N, V]`` float32 logits of this step (unscaled), on any device.
        request_slots: integer numpy ``[R]``: the slots of the batch's requests
            (vLLM V2's ``idx_mapping_np``). What to launch is decided from these,
            on the host.
        settings: the per-slot settings.
        row_slots: integer ``[N]`` tensor on ``logits``' device, the slot of each
            row (V2's ``expanded_idx_mapping``; several rows per request under
            speculative decoding). ``None``: row ``i`` is request ``i`` (``R == N``).
        stats: counters to add this step to (no sync on the kernel path).
        runner: the kernel path's step runner (CUDA graphs); given, it selects the
            kernel path without asking :func:`em_inf.backend.backend_for`;
            ``None``: the backend's choice, eager launches on the kernel path.

    Returns:
        ``logits``, modified in place; rows of other slots are untouched.
    """
    if logits.shape[0] == 0:
        return logits
    backend = "triton" if runner is not None else backend_for(logits.device)
    if backend == "triton":
        return _apply_kernels(logits, request_slots, settings, row_slots, stats, runner)
    if not settings.enabled[request_slots].any():
        return logits
    if row_slots is None or len(request_slots) == logits.shape[0]:
        host_rows = np.asarray(request_slots)
    else:  # torch path with speculative rows (CPU, or the forced CUDA fallback)
        host_rows = row_slots.cpu().numpy()
    enabled = settings.enabled[host_rows]
    counters = None if stats is None else stats.counters(logits.device)
    return _apply_torch(logits, host_rows, enabled, settings, backend, counters)


def _apply_torch(
    logits: torch.Tensor,
    row_slots: np.ndarray,
    enabled: np.ndarray,
    settings: SlotSettings,
    backend: str,
    counters: torch.Tensor | None,
) -> torch.Tensor:
    """The CPU paths, in place: per mode, the rows that use it; the compiled
    kernels (``backend == "cpu"``) process them where they lie, the eager PyTorch
    path on the whole batch or on a gathered copy scattered back. ``counters``:
    the int64 ``[2, WIDTH]`` counters (:mod:`em_inf.counters`) or ``None``."""
    temperature_mode = settings.temperature_mode[row_slots]
    for mode, use_temperature in enumerate((False, True)):
        rows = np.flatnonzero(enabled & (temperature_mode == use_temperature))
        if rows.size == 0:
            continue
        slots = row_slots[rows]
        whole_batch = rows.size == logits.shape[0]
        index = None if whole_batch else torch.from_numpy(rows).to(logits.device)
        stats = None if counters is None else counters[mode]

        def per_row(array: np.ndarray, slots: np.ndarray = slots) -> torch.Tensor:
            """``[rows, 1]`` tensor of the rows' settings."""
            return torch.from_numpy(array[slots]).to(logits.device).unsqueeze(1)

        fields = (
            ("alpha", "t_min", "t_max")
            if use_temperature
            else ("kl_weight", "lr", "steps")
        )
        params = [per_row(settings.threshold)]
        params += [per_row(getattr(settings, name)) for name in fields]
        if backend == "cpu":
            process_ = (
                cpu_backend.adaptive_temperature_
                if use_temperature
                else cpu_backend.em_inf_
            )
            process_(logits, *params, rows=index, stats=stats)
            continue
        process_ = (
            torch_backend.adaptive_temperature_
            if use_temperature
            else torch_backend.em_inf_
        )
        sub = logits if whole_batch else logits.index_select(0, index)
        process_(sub, *params, stats=stats)
        if not whole_batch:
            logits.index_copy_(0, index, sub)
    return logits


def _apply_kernels(
    logits: torch.Tensor,
    request_slots: np.ndarray,
    settings: SlotSettings,
    row_slots: torch.Tensor | None,
    stats: EMInfStats | None,
    runner: StepRunner | None,
) -> torch.Tensor:
    """In place, one launch sequence for both modes (:mod:`em_inf.kernels.step`):
    the host decides from ``request_slots`` how many logits-mode passes run and
    whether the temperature kernel does; the kernels read each row's settings
    through ``row_slots`` from the device tables and count rows themselves."""
    max_steps = int(settings.logits_steps[request_slots].max())
    temperature = bool(settings.temperature_on[request_slots].any())
    if max_steps == 0 and not temperature:
        return logits
    if runner is None:
        runner = _eager_runner(logits.device)
    if row_slots is None:  # rows are the requests: their slots, copied once
        row_slots = torch.as_tensor(request_slots, device=logits.device)
    elif not row_slots.is_contiguous():
        row_slots = row_slots.contiguous()
    runner.run(
        logits,
        row_slots,
        max_steps,
        temperature,
        settings.tables(logits.device),
        None if stats is None else stats.counters(logits.device),
    )
    return logits


_EAGER_RUNNERS: dict[torch.device, StepRunner] = {}


def _eager_runner(device: torch.device) -> StepRunner:
    from em_inf.kernels.step import StepRunner

    if device not in _EAGER_RUNNERS:
        _EAGER_RUNNERS[device] = StepRunner(device, graphs=False)
    return _EAGER_RUNNERS[device]
