"""What EM-INF did, for operators: counters kept where the work happens, one log line
and the Prometheus series (:mod:`em_inf.metrics`) per interval.

Every step adds, per mode (logits, temperature), to the counters of
:mod:`em_inf.counters`: rows processed, rows left alone because their entropy
started below their threshold, work done (Adam steps, or temperature-solver passes),
rows restored by the fail-safe, and each row's entropy before and after EM-INF (sums
and histogram bins). Every backend adds them where it runs: on the kernel path the
kernels add to an int64 ``[2, WIDTH]`` tensor on the GPU with atomics (rows too:
under speculative decoding only the device knows how many rows each request has);
the CPU paths add to the same tensor in host memory.

Reading the GPU counters never waits: at vLLM's logging cadence
(``VLLM_LOG_STATS_INTERVAL``, 10 s by default) a step enqueues a non-blocking copy
into pinned memory and records an event; a later step whose ``Event.query()``
says the copy has landed reports the difference to the previous report. Counters
in host memory are read directly, and also by a background thread at the same
cadence, so that the last interval before an engine goes idle is reported too (on
the GPU it is reported at the next step). A report is one log line (logger
``vllm.em_inf``, so it appears wherever vLLM's own lines do: the engine core
process of ``em-inf serve`` or an offline ``LLM``; it follows vLLM's logging
settings ``VLLM_LOGGING_LEVEL``, ``VLLM_CONFIGURE_LOGGING``) and an increment of
the Prometheus series.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable

import numpy as np
import torch

from em_inf import staging
from em_inf.config import MODES
from em_inf.counters import (
    BELOW,
    FIXED_POINT,
    HIST_BEFORE,
    N_BINS,
    RESTORED,
    ROWS,
    SUM_AFTER,
    SUM_BEFORE,
    WIDTH,
    WORK,
)

logger = logging.getLogger("vllm.em_inf")
#: vLLM's logging interval variable and its default (seconds).
INTERVAL_ENV = "VLLM_LOG_STATS_INTERVAL"
DEFAULT_INTERVAL = 10.0
#: Least seconds between the idle reporter's looks (EMInfStats.report_when_idle).
IDLE_PERIOD = 1.0


def log_interval() -> float:
    """vLLM's stats logging interval (``VLLM_LOG_STATS_INTERVAL``, seconds)."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value > 0 else DEFAULT_INTERVAL


class EMInfStats:
    """Counters of one processor, reported per interval.

    Args:
        interval: seconds between reports (default: :func:`log_interval`).
        log: where a line goes (default: ``logger.info``).
        clock: monotonic seconds (for tests).
        publish: what else gets each report's ``[2, WIDTH]`` int64 differences
            (e.g. :func:`em_inf.metrics.publish`); ``None``: the log line only.
    """

    def __init__(
        self,
        interval: float | None = None,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        publish: Callable[[np.ndarray], None] | None = None,
    ) -> None:
        self.interval = log_interval() if interval is None else interval
        self._log = log or logger.info
        self._clock = clock
        self._publish = publish
        self._device_counters: torch.Tensor | None = None  # int64 [2, WIDTH]
        self._counted_on: torch.device | None = None  # its device
        self._reported = np.zeros((len(MODES), WIDTH), dtype=np.int64)
        self._reported_at = self._ticked_at = clock()
        # A snapshot in flight: (counts, event or None, time taken).
        self._pending: tuple | None = None
        self._snapshot: torch.Tensor | None = None  # pinned copy of the counters
        self._snapshot_np: np.ndarray | None = None
        self._mode_counters: tuple[torch.Tensor, ...] = ()
        self._lock = threading.Lock()  # tick() and the idle reporter
        self._idle_reporter: threading.Thread | None = None

    def counters(self, device: torch.device) -> torch.Tensor:
        """The int64 ``[2, WIDTH]`` counters on ``device`` (row 0 logits mode, row 1
        temperature mode; columns as in :mod:`em_inf.counters`). ``counters(d)[m]``
        is what a backend's ``stats`` argument takes."""
        if self._device_counters is None:
            self._device_counters = torch.zeros(
                (len(MODES), WIDTH), dtype=torch.int64, device=device
            )
            self._snapshot = staging.pinned_empty(
                (len(MODES), WIDTH), torch.int64, device
            )
            self._snapshot_np = self._snapshot.numpy()
            self._mode_counters = self._device_counters.unbind(0)
            self._counted_on = self._device_counters.device
        elif device != self._counted_on:  # (a tensor's .device is a torch call)
            raise ValueError(
                f"EM-INF stats are counted on {self._counted_on}, not {device}"
            )
        return self._device_counters

    def mode_counters(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``counters(device)``'s rows, one per mode in ``MODES`` order, as views
        made once (indexing the counters would be a torch operation per step)."""
        self.counters(device)
        return self._mode_counters

    def totals(self) -> np.ndarray:
        """Everything counted so far, int64 ``[2, WIDTH]``; waits for the device
        (for explicit reads, never called in a step)."""
        if self._device_counters is None:
            return np.zeros((len(MODES), WIDTH), dtype=np.int64)
        return self._device_counters.cpu().numpy().copy()

    def tick(self) -> None:
        """Once per step: report a snapshot that has landed, or take one when the
        interval has passed. Never waits for the device."""
        with self._lock:
            now = self._ticked_at = self._clock()
            if self._pending is None and now - self._reported_at >= self.interval:
                self._take_snapshot(now)
            if self._pending is not None:
                counts, event, taken_at = self._pending
                if event is None or event.query():
                    self._pending = None
                    self._report(counts, taken_at)

    def report_when_idle(self) -> None:
        """Start a daemon thread that reports host-memory counters when no step has
        run for an interval (at least :data:`IDLE_PERIOD`), so that an engine going
        idle still reports its last interval. GPU counters are left to
        :meth:`tick`: a copy from another thread could meet a CUDA graph capture.
        The thread holds these stats weakly and ends once they are gone."""
        if self._idle_reporter is not None:
            return
        self._idle_reporter = threading.Thread(
            target=_report_when_idle,
            args=(weakref.ref(self), max(self.interval, IDLE_PERIOD)),
            name="em-inf-stats",
            daemon=True,
        )
        self._idle_reporter.start()

    def _take_snapshot(self, now: float) -> None:
        event = None
        if self._device_counters is None:  # nothing counted yet
            counts = np.zeros((len(MODES), WIDTH), dtype=np.int64)
        elif self._device_counters.device.type == "cpu":
            counts = self._device_counters.numpy().copy()
        else:
            self._snapshot.copy_(self._device_counters, non_blocking=True)
            counts = self._snapshot_np  # valid once the copy has landed
            if self._device_counters.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
        self._pending = (counts, event, now)

    def _report(self, counts: np.ndarray, at: float) -> None:
        totals = counts.copy()
        delta = totals - self._reported
        elapsed = at - self._reported_at
        self._reported, self._reported_at = totals, at
        if delta[:, ROWS].sum() > 0:
            self._log(format_line(delta, elapsed))
            if self._publish is not None:
                self._publish(delta)


def _report_when_idle(stats_ref: weakref.ref, period: float) -> None:
    """:meth:`EMInfStats.report_when_idle`'s loop."""
    while True:
        time.sleep(period)
        stats = stats_ref()
        if stats is None:
            return
        idle = stats._clock() - stats._ticked_at >= period
        counters = stats._device_counters
        if idle and counters is not None and counters.device.type == "cpu":
            stats.tick()
        del stats, counters


def format_line(delta: np.ndarray, elapsed: float) -> str:
    """The log line for counter differences ``delta`` (int ``[2, WIDTH]``) over
    ``elapsed`` seconds."""

    def mean(mode: int, column: int, rows: int, scale: float = 1.0) -> float:
        return delta[mode, column] / scale / rows if rows else 0.0

    def part(mode: int, work: str) -> str:
        rows = delta[mode, ROWS]
        with_entropy = int(delta[mode, HIST_BEFORE : HIST_BEFORE + N_BINS].sum())
        before = mean(mode, SUM_BEFORE, with_entropy, FIXED_POINT)
        after = mean(mode, SUM_AFTER, with_entropy, FIXED_POINT)
        return (
            f"{MODES[mode]} mode {rows} rows "
            f"({delta[mode, BELOW]} already below threshold, "
            f"{mean(mode, WORK, rows):.2f} {work} per row, "
            f"entropy {before:.3f} -> {after:.3f} nats)"
        )

    return (
        f"EM-INF, last {elapsed:.1f} s: {part(0, 'Adam steps')}, "
        f"{part(1, 'solver passes')}, "
        f"{delta[:, RESTORED].sum()} rows restored by the fail-safe"
    )
