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

from em_inf import cpu_backend
from em_inf.backend import backend_for
from em_inf.config import MODES, EMInfConfig
from em_inf.modes import LEFT_ALONE, PARAMS, in_place, param_dtype, rows_by_mode
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
_TEMPERATURE_ROW = _TABLE_ROWS.index("temperature_threshold")
#: The host table's rows after the device rows: one bool flag per slot, kept in the
#: first byte of each 4-byte cell.
_FLAG_ROWS = ("enabled", "temperature_mode")
#: The host table's float32 rows that come from a request's settings as they are.
_FLOAT_FIELDS = ("threshold", "kl_weight", "lr", "alpha", "t_min", "t_max")


class ModeRows(NamedTuple):
    """The rows of a batch that use one mode, as the CPU paths run them."""

    mode: str
    code: int  # the mode's index in MODES (its row of the counters)
    index: torch.Tensor | None  # int64 [n] rows on the logits' device; None: all
    params: tuple[torch.Tensor, ...]  # PARAMS[mode], [n] columns (param_dtype)
    kernels: cpu_backend.RowsCall | None  # the compiled kernels on them (CPU only)


class SlotSettings:
    """EM-INF settings of the requests in an engine's batch, one entry per slot.

    Everything lives once, in one host table, float32 ``[10, S]``: its first 8
    rows are the device table exactly as the kernels read it (:class:`SlotTables`
    order, ``steps`` as int32 bits and 0 outside the logits mode,
    ``temperature_threshold`` +inf outside the temperature mode), the last two the
    flags in :data:`_FLAG_ROWS`. A slot is one column, so moving or swapping
    requests copies columns, and a slot without EM-INF is the column of an unused
    slot (zeros, ``temperature_threshold`` +inf).

    Attributes (read-only ``[num_slots]`` numpy views of the table, replaced when
    the table grows):
        enabled: bool, whether the slot's request uses EM-INF.
        temperature_mode: bool, whether it uses the temperature mode.
        steps: int32, its logits-mode steps (0 unless it uses the logits mode).
        threshold, kl_weight, lr, alpha, t_min, t_max: float32, its settings (0
            where EM-INF is off).
        temperature_threshold: float32, ``threshold`` where the slot uses the
            temperature mode, else +inf.

    On the kernel path, :meth:`bind` gives the settings a device; every change is
    then staged and reaches the device tables at the next :meth:`flush` (vLLM's
    staging hook) as one non-blocking copy of the table's device rows: 32 KiB at
    1,024 slots costs one ``cudaMemcpyAsync`` like a single slot would, while
    copying only the changed slots would need a scatter kernel.
    """

    enabled: np.ndarray
    temperature_mode: np.ndarray
    steps: np.ndarray
    threshold: np.ndarray
    kl_weight: np.ndarray
    lr: np.ndarray
    alpha: np.ndarray
    t_min: np.ndarray
    t_max: np.ndarray
    temperature_threshold: np.ndarray

    def __init__(self, num_slots: int, device: torch.device | None = None) -> None:
        self._table = self._empty_table(num_slots)
        self._make_views()
        self._staging: HostToDevice | None = None
        self._tables: SlotTables | None = None
        self._dirty = False
        self._version = 0  # counts changes: a batch's ModeRows are made again
        self._mode_rows: tuple[tuple, tuple[ModeRows, ...]] | None = None
        if device is not None:
            self.bind(device)

    @property
    def num_slots(self) -> int:
        return self._table.shape[1]

    @staticmethod
    def _empty_table(num_slots: int) -> np.ndarray:
        """The float32 ``[10, num_slots]`` host table of unused slots."""
        table = np.zeros((len(_TABLE_ROWS) + len(_FLAG_ROWS), num_slots), np.float32)
        table[_TEMPERATURE_ROW] = np.inf
        return table

    def _make_views(self) -> None:
        """Writable ``[S]`` views of the table's rows by name (``self._rows``) and
        read-only ones as the attributes."""
        table = self._table
        rows = {name: table[_TABLE_ROWS.index(name)] for name in _FLOAT_FIELDS}
        rows["steps"] = table[_STEPS_ROW].view(np.int32)
        rows["temperature_threshold"] = table[_TEMPERATURE_ROW]
        for index, name in enumerate(_FLAG_ROWS, start=len(_TABLE_ROWS)):
            rows[name] = table[index].view(np.bool_)[::4]
        self._rows = rows
        for name, row in rows.items():
            view = row.view()
            view.flags.writeable = False
            setattr(self, name, view)

    def _ensure(self, slot: int) -> None:
        size = self.num_slots
        if slot < size:
            return
        table = self._empty_table(max(slot + 1, 2 * size))
        table[:, :size] = self._table
        self._table = table
        self._make_views()
        if self._staging is not None:  # new tables, new address
            self.bind(self._staging.device_tensor.device)

    def set(self, slot: int, config: EMInfConfig | None) -> None:
        """Give ``slot`` the settings ``config``; ``None`` turns EM-INF off there."""
        self._ensure(slot)
        self._table[:, slot] = 0
        self._table[_TEMPERATURE_ROW, slot] = np.inf
        if config is not None:
            rows = self._rows
            rows["enabled"][slot] = True
            for name in _FLOAT_FIELDS:
                rows[name][slot] = getattr(config, name)
            if config.mode == "temperature":
                rows["temperature_mode"][slot] = True
                rows["temperature_threshold"][slot] = config.threshold
            else:
                rows["steps"][slot] = config.steps
        self._changed()

    def move(self, src: int, dst: int) -> None:
        """Copy ``src``'s entry to ``dst`` (``src`` keeps a stale copy)."""
        self._ensure(max(src, dst))
        self._table[:, dst] = self._table[:, src]
        self._changed()

    def swap(self, a: int, b: int) -> None:
        self._ensure(max(a, b))
        self._table[:, [a, b]] = self._table[:, [b, a]]
        self._changed()

    def _changed(self) -> None:
        """A slot's settings changed: stage the device tables, make ModeRows anew."""
        self._dirty = True
        self._version += 1

    def mode_rows(
        self, row_slots: np.ndarray, device: torch.device
    ) -> tuple[ModeRows, ...]:
        """The rows of a batch that use each mode, with their settings, for the CPU
        paths (:func:`apply_to_rows`); none when no row uses EM-INF.

        Args:
            row_slots: integer numpy ``[N]``, the slot of each row.
            device: where the logits are (the columns and index go there).

        Made again only when the slots or any setting changed since the last call
        (a decoding step usually repeats the last batch): the dozen numpy and
        torch operations that make them were most of a step's Python, which right
        after the model's forward pass took 0.45-0.48 ms with them and 0.23-0.26
        ms without (8 rows of 49,152, one thread; ``bench/python_overhead.py``).
        On the CPU each carries the compiled kernels' call on its rows
        (:class:`em_inf.cpu_backend.RowsCall`), its arguments checked once.
        """
        key = (row_slots.dtype, row_slots.tobytes(), self._version, device)
        if self._mode_rows is None or self._mode_rows[0] != key:
            self._mode_rows = (key, self._make_mode_rows(row_slots, device))
        return self._mode_rows[1]

    def _make_mode_rows(
        self, row_slots: np.ndarray, device: torch.device
    ) -> tuple[ModeRows, ...]:
        mode_codes = np.where(
            self.enabled[row_slots],
            self.temperature_mode[row_slots].astype(np.int8),
            LEFT_ALONE,
        )
        made = []
        for mode, rows in rows_by_mode(mode_codes):
            slots = row_slots[rows]
            params = tuple(
                _column(getattr(self, name)[slots], name, device)
                for name in PARAMS[mode]
            )
            every_row = rows.size == len(row_slots)
            index = None if every_row else torch.from_numpy(rows).to(device)
            kernels = (
                cpu_backend.RowsCall(mode, index, params)
                if device.type == "cpu"
                else None
            )
            made.append(ModeRows(mode, MODES.index(mode), index, params, kernels))
        return tuple(made)

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
        np.copyto(self._staging.host(), self._table[: len(_TABLE_ROWS)])
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
    backend: str | None = None,
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
        backend: without a runner, the backend the caller chose once (the
            processor, when the engine made it); ``None``: ``backend_for`` now.

    Returns:
        ``logits``, modified in place; rows of other slots are untouched.
    """
    if logits.shape[0] == 0:
        return logits
    if runner is not None:
        return _apply_kernels(logits, request_slots, settings, row_slots, stats, runner)
    backend = backend or backend_for(logits.device)
    if backend == "triton":
        return _apply_kernels(logits, request_slots, settings, row_slots, stats, None)
    if row_slots is None or len(request_slots) == logits.shape[0]:
        host_rows = np.asarray(request_slots)
    elif not settings.enabled[request_slots].any():
        return logits  # spares the copy of the rows' slots from the device
    else:  # torch path with speculative rows (CPU, or the forced CUDA fallback)
        host_rows = row_slots.cpu().numpy()
    # The compiled kernels run on the CPU only: no need to ask the logits (a torch
    # call per step, ~10 us right after the forward pass).
    device = cpu_backend.CPU if backend == "cpu" else logits.device
    counters = None if stats is None else stats.mode_counters(device)
    for rows in settings.mode_rows(host_rows, device):
        _apply_torch(logits, rows, backend, counters)
    return logits


def _apply_torch(
    logits: torch.Tensor,
    rows: ModeRows,
    backend: str,
    counters: tuple[torch.Tensor, ...] | None,
) -> None:
    """The CPU paths, in place, on one mode's rows: the compiled kernels
    (``backend == "cpu"``) process them where they lie, through the call made with
    the rows (:class:`em_inf.cpu_backend.RowsCall`), the eager PyTorch path the
    whole batch or a gathered copy scattered back. ``counters``: each mode's int64
    ``[WIDTH]`` counters (:mod:`em_inf.counters`) or ``None``."""
    stats = None if counters is None else counters[rows.code]
    if backend == "cpu":
        rows.kernels(logits, stats)
        return
    run = in_place(backend, rows.mode)
    if rows.index is None:
        run(logits, *rows.params, stats=stats)
    else:
        sub = logits.index_select(0, rows.index)
        run(sub, *rows.params, stats=stats)
        logits.index_copy_(0, rows.index, sub)


def _column(values: np.ndarray, name: str, device: torch.device) -> torch.Tensor:
    """A parameter's ``[n]`` values (a fresh numpy array) as the CPU paths take
    them (:func:`em_inf.modes.param_dtype`), on ``device``; on the CPU the array's
    own memory, converted in numpy: no torch operation per parameter and step."""
    dtype = np.int64 if param_dtype(name) == torch.int64 else np.float32
    column = torch.from_numpy(values.astype(dtype, copy=False))
    return column if device.type == "cpu" else column.to(device)


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
    max_steps = int(settings.steps[request_slots].max())
    temperature = bool(settings.temperature_mode[request_slots].any())
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
