"""EM-INF's Prometheus series, and reading them back.

Series (one prefix, ``em_inf_``; a ``mode`` label, ``logits`` or ``temperature``;
no per-request labels):

==============================================  ======================================
``em_inf_rows_total{mode}``                     rows processed
``em_inf_rows_below_threshold_total{mode}``     rows left alone: entropy already below
                                                the threshold
``em_inf_rows_restored_total{mode}``            rows restored by the fail-safe
``em_inf_adam_steps_total``                     Adam steps (logits mode)
``em_inf_temperature_solver_passes_total``      solver passes (temperature mode)
``em_inf_entropy_before_nats{mode}``            histogram: each row's entropy before
``em_inf_entropy_after_nats{mode}``             histogram: the same after EM-INF
==============================================  ======================================

The processor adds to them once per reporting interval (:mod:`em_inf.stats`), in
the process where it runs (vLLM's engine core or a worker; with tensor
parallelism, rank 0 only). For ``/metrics`` to show them, the API server must read
that process's values: ``em-inf serve`` runs vLLM with ``prometheus_client``'s
multiprocess mode (:func:`share_across_processes`), which vLLM's ``/metrics``
supports. Offline engines: :func:`snapshot`.

prometheus_client's histograms take one observation at a time; the kernels have
already binned the rows, so :func:`publish` adds each bin's count and the sum to the
histogram's own values (its ``_buckets`` and ``_sum``, the values ``observe``
adds to), the same in memory and in multiprocess mode.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np

from em_inf.config import MODES
from em_inf.counters import (
    BELOW,
    ENTROPY_EDGES,
    FIXED_POINT,
    HIST_AFTER,
    HIST_BEFORE,
    N_BINS,
    RESTORED,
    ROWS,
    SUM_AFTER,
    SUM_BEFORE,
    WORK,
)

PREFIX = "em_inf_"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The directory :func:`share_across_processes` made (so that a process that
#: starts itself again, as ``em-inf serve`` does for its allocator, still removes it).
_OWNED_ENV = "EM_INF_PROMETHEUS_DIR_MADE"
_series: dict[str, Any] | None = None


def _make_series() -> dict[str, Any]:
    """The series, registered in prometheus_client's default registry (made on the
    first report, after ``PROMETHEUS_MULTIPROC_DIR`` is settled)."""
    from prometheus_client import Counter, Histogram

    buckets = (*ENTROPY_EDGES, math.inf)
    return {
        "rows": Counter(
            "em_inf_rows", "Rows (next-token distributions) EM-INF processed", ["mode"]
        ),
        "below": Counter(
            "em_inf_rows_below_threshold",
            "Rows EM-INF left alone: their entropy started below the threshold",
            ["mode"],
        ),
        "restored": Counter(
            "em_inf_rows_restored",
            "Rows EM-INF's fail-safe restored to the model's logits",
            ["mode"],
        ),
        "adam": Counter("em_inf_adam_steps", "Adam steps taken (logits mode)"),
        "passes": Counter(
            "em_inf_temperature_solver_passes",
            "Entropy evaluations of the temperature solver (temperature mode)",
        ),
        "before": Histogram(
            "em_inf_entropy_before_nats",
            "Entropy of each processed row before EM-INF, in nats",
            ["mode"],
            buckets=buckets,
        ),
        "after": Histogram(
            "em_inf_entropy_after_nats",
            "Entropy of each processed row after EM-INF, in nats",
            ["mode"],
            buckets=buckets,
        ),
    }


def publish(delta: np.ndarray) -> None:
    """Add counter differences ``delta`` (int64 ``[2, WIDTH]``, rows as
    :data:`em_inf.config.MODES`) to the series."""
    global _series
    if _series is None:
        _series = _make_series()
    series = _series
    for index, mode in enumerate(MODES):
        row = delta[index]
        if not row[ROWS]:
            continue
        series["rows"].labels(mode).inc(int(row[ROWS]))
        series["below"].labels(mode).inc(int(row[BELOW]))
        series["restored"].labels(mode).inc(int(row[RESTORED]))
        series["adam" if mode == "logits" else "passes"].inc(int(row[WORK]))
        for name, first, total in (
            ("before", HIST_BEFORE, SUM_BEFORE),
            ("after", HIST_AFTER, SUM_AFTER),
        ):
            histogram = series[name].labels(mode)
            for bin_index in range(N_BINS):
                if row[first + bin_index]:
                    histogram._buckets[bin_index].inc(int(row[first + bin_index]))
            histogram._sum.inc(int(row[total]) / FIXED_POINT)


def share_across_processes() -> str:
    """Make the processes started from now on (vLLM's engine core and workers)
    write their series where this process can read them: prometheus_client's
    multiprocess mode, in a fresh directory removed when this process exits.
    Call it before vLLM starts its engine (``em-inf serve`` does, before it
    imports vLLM). Returns the directory; a ``PROMETHEUS_MULTIPROC_DIR`` already
    set is kept (and then not removed)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        if os.environ.get(_OWNED_ENV) == directory:  # ours, this process re-exec'd
            atexit.register(_remove_from, os.getpid(), directory)
        return directory
    directory = tempfile.mkdtemp(prefix="em-inf-metrics-")
    os.environ[MULTIPROC_ENV] = os.environ[_OWNED_ENV] = directory
    atexit.register(_remove_from, os.getpid(), directory)
    return directory


def _remove_from(pid: int, directory: str) -> None:
    """Remove ``directory`` when process ``pid`` exits (not when a process forked
    from it does: it inherits the exit handler while the server still runs)."""
    if os.getpid() == pid:
        shutil.rmtree(directory, ignore_errors=True)


def snapshot() -> dict[str, dict[str, Any]]:
    """EM-INF's series as this process can see them: its own (an engine in this
    process) and, with ``PROMETHEUS_MULTIPROC_DIR`` set, every process's. Per mode:
    ``rows``, ``below_threshold``, ``restored``, ``work`` (Adam steps or solver
    passes), and ``entropy_before`` / ``entropy_after``: ``{"buckets": [[le,
    cumulative count], ...], "sum": nats, "count": rows}``."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    families = []
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        families = list(registry.collect())
    else:
        families = list(REGISTRY.collect())
    return from_families(families)


def parse(text: str) -> dict[str, dict[str, Any]]:
    """:func:`snapshot`'s structure from a ``/metrics`` page (Prometheus text)."""
    from prometheus_client.parser import text_string_to_metric_families

    return from_families(text_string_to_metric_families(text))


def from_families(families: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """:func:`snapshot`'s structure from prometheus_client metric families (EM-INF's
    are picked out; absent series read as zero)."""
    samples = [
        sample
        for family in families
        if family.name.startswith(PREFIX)
        for sample in family.samples
    ]
    return {mode: _mode_snapshot(samples, mode) for mode in MODES}


def _mode_snapshot(samples: list[Any], mode: str) -> dict[str, Any]:
    def value(name: str, labels: dict[str, str]) -> float:
        return sum(s.value for s in samples if s.name == name and s.labels == labels)

    def histogram(name: str) -> dict[str, Any]:
        buckets = dict.fromkeys((*ENTROPY_EDGES, math.inf), 0)
        for sample in samples:
            if sample.name == f"{name}_bucket" and sample.labels.get("mode") == mode:
                buckets[float(sample.labels["le"])] += int(sample.value)
        return {
            "buckets": [[le, count] for le, count in buckets.items()],
            "sum": value(f"{name}_sum", {"mode": mode}),
            "count": int(value(f"{name}_count", {"mode": mode})),
        }

    work = "em_inf_adam_steps" if mode == "logits" else "em_inf_temperature_solver"
    work += "_total" if mode == "logits" else "_passes_total"
    return {
        "rows": int(value("em_inf_rows_total", {"mode": mode})),
        "below_threshold": int(
            value("em_inf_rows_below_threshold_total", {"mode": mode})
        ),
        "restored": int(value("em_inf_rows_restored_total", {"mode": mode})),
        "work": int(value(work, {})),
        "entropy_before": histogram("em_inf_entropy_before_nats"),
        "entropy_after": histogram("em_inf_entropy_after_nats"),
    }


def difference(after: dict, before: dict) -> dict[str, dict[str, Any]]:
    """``after - before``, per mode, of two :func:`snapshot`-structured readings
    (e.g. what a run added to a server's series)."""
    result = {}
    for mode in MODES:
        new, old = after[mode], before[mode]
        result[mode] = {
            key: new[key] - old[key]
            for key in ("rows", "below_threshold", "restored", "work")
        }
        for name in ("entropy_before", "entropy_after"):
            result[mode][name] = {
                "buckets": [
                    [le, count - previous]
                    for (le, count), (_, previous) in zip(
                        new[name]["buckets"], old[name]["buckets"], strict=True
                    )
                ],
                "sum": new[name]["sum"] - old[name]["sum"],
                "count": new[name]["count"] - old[name]["count"],
            }
    return result


def summary(totals: np.ndarray) -> dict[str, dict[str, Any]]:
    """:func:`snapshot`'s structure for counters ``totals`` (int64 ``[2, WIDTH]``),
    e.g. a Hugging Face processor's."""
    result = {}
    for index, mode in enumerate(MODES):
        row = totals[index]

        def histogram(first: int, total: int, row: np.ndarray = row) -> dict[str, Any]:
            cumulative = np.cumsum(row[first : first + N_BINS])
            edges = (*ENTROPY_EDGES, math.inf)
            return {
                "buckets": [
                    [le, int(c)] for le, c in zip(edges, cumulative, strict=True)
                ],
                "sum": int(row[total]) / FIXED_POINT,
                "count": int(cumulative[-1]),
            }

        result[mode] = {
            "rows": int(row[ROWS]),
            "below_threshold": int(row[BELOW]),
            "restored": int(row[RESTORED]),
            "work": int(row[WORK]),
            "entropy_before": histogram(HIST_BEFORE, SUM_BEFORE),
            "entropy_after": histogram(HIST_AFTER, SUM_AFTER),
        }
    return result
