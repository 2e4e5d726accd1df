"""What EM-INF did, for operators: counters kept where the work happens, one log line
per interval.

Every step adds, per mode (logits, temperature), to four counters: rows left
alone because their entropy started below their threshold, work done (Adam steps,
or temperature-solver passes), rows restored by the fail-safe, and rows processed.
On the kernel path the kernels add to an int64 ``[2, 4]`` tensor on the GPU with
atomics (rows too: under speculative decoding only the device knows how many rows
each request has); the torch path counts its rows on the host.

Reading the GPU counters never waits: at vLLM's logging cadence
(``VLLM_LOG_STATS_INTERVAL``, 10 s by default) a step enqueues a non-blocking copy
into pinned memory and records an event; a later step whose ``Event.query()``
says the copy has landed logs the difference to the previous line. The line goes
to logger ``vllm.em_inf``, so it appears wherever vLLM's own lines do (the engine
core process of ``em-inf serve`` or an offline ``LLM``, which em-inf's own log
handler does not reach) and follows vLLM's logging settings
(``VLLM_LOGGING_LEVEL``, ``VLLM_CONFIGURE_LOGGING``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from em_inf import staging

logger = logging.getLogger("vllm.em_inf")

MODES = ("logits", "temperature")
#: Counter columns: the three of every backend's ``stats`` argument, then rows.
BELOW, WORK, RESTORED, ROWS = range(4)
#: vLLM's logging interval variable and its default (seconds).
INTERVAL_ENV = "VLLM_LOG_STATS_INTERVAL"
DEFAULT_INTERVAL = 10.0


def log_interval() -> float:
    """vLLM's stats logging interval (``VLLM_LOG_STATS_INTERVAL``, seconds)."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value > 0 else DEFAULT_INTERVAL


class EMInfStats:
    """Counters of one processor, and its periodic log line.

    Args:
        interval: seconds between lines (default: :func:`log_interval`).
        log: where a line goes (default: ``logger.info``).
        clock: monotonic seconds (for tests).
    """

    def __init__(
        self,
        interval: float | None = None,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = log_interval() if interval is None else interval
        self._log = log or logger.info
        self._clock = clock
        self._device: torch.Tensor | None = None  # int64 [2, 4]
        self._host_rows = np.zeros(len(MODES), dtype=np.int64)
        self._reported = np.zeros((len(MODES), 4), dtype=np.int64)
        self._reported_at = clock()
        # A snapshot in flight: (pinned copy, event or None, host rows, time).
        self._pending: tuple | None = None
        self._snapshot: torch.Tensor | None = None  # pinned copy of the counters
        self._snapshot_np: np.ndarray | None = None

    def counters(self, device: torch.device) -> torch.Tensor:
        """The int64 ``[2, 4]`` counters on ``device`` (row 0 logits mode, row 1
        temperature mode; columns :data:`BELOW`, :data:`WORK`, :data:`RESTORED`,
        :data:`ROWS`). ``counters(d)[m, :3]`` is what a backend's ``stats``
        argument takes."""
        if self._device is None:
            self._device = torch.zeros(
                (len(MODES), 4), dtype=torch.int64, device=device
            )
            self._snapshot = staging.pinned_empty((len(MODES), 4), torch.int64, device)
            self._snapshot_np = self._snapshot.numpy()
        elif self._device.device != device:
            raise ValueError(
                f"EM-INF stats are counted on {self._device.device}, not {device}"
            )
        return self._device

    def count_rows(self, logits_rows: int, temperature_rows: int) -> None:
        """Rows processed on the torch path (counted on the host)."""
        self._host_rows[0] += logits_rows
        self._host_rows[1] += temperature_rows

    def tick(self) -> None:
        """Once per step: report a snapshot that has landed, or take one when the
        interval has passed. Never waits for the device."""
        now = self._clock()
        if self._pending is None and now - self._reported_at >= self.interval:
            self._take_snapshot(now)
        if self._pending is not None:
            counts, event, host_rows, taken_at = self._pending
            if event is None or event.query():
                self._pending = None
                self._report(counts, host_rows, taken_at)

    def _take_snapshot(self, now: float) -> None:
        event = None
        if self._device is None:  # nothing counted on a device
            counts = np.zeros((len(MODES), 4), dtype=np.int64)
        else:
            self._snapshot.copy_(self._device, non_blocking=True)
            counts = self._snapshot_np  # valid once the copy has landed
            if self._device.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
        self._pending = (counts, event, self._host_rows.copy(), now)

    def _report(self, device_counts: np.ndarray, host_rows: np.ndarray, at: float):
        totals = device_counts.copy()
        totals[:, ROWS] += host_rows
        delta = totals - self._reported
        elapsed = at - self._reported_at
        self._reported, self._reported_at = totals, at
        if delta[:, ROWS].sum() > 0:
            self._log(format_line(delta, elapsed))


def format_line(delta: np.ndarray, elapsed: float) -> str:
    """The log line for counter differences ``delta`` (int ``[2, 4]``) over
    ``elapsed`` seconds."""

    def mean(mode: int) -> float:
        rows = delta[mode, ROWS]
        return delta[mode, WORK] / rows if rows else 0.0

    return (
        f"EM-INF, last {elapsed:.1f} s: "
        f"logits mode {delta[0, ROWS]} rows "
        f"({delta[0, BELOW]} already below threshold, "
        f"{mean(0):.2f} Adam steps per row), "
        f"temperature mode {delta[1, ROWS]} rows "
        f"({delta[1, BELOW]} already below threshold, "
        f"{mean(1):.2f} solver passes per row), "
        f"{delta[:, RESTORED].sum()} rows restored by the fail-safe"
    )
