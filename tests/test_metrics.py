"""What EM-INF counts, against the float64 oracle: every backend's counters for
known rows, the vLLM processor's series as this process reads them
(:func:`em_inf.metrics.snapshot`), and the Hugging Face processor's
:meth:`~em_inf.hf.EMInfLogitsProcessor.metrics`. The same series on a real
server's /metrics: tests/test_server.py (and with two tensor-parallel workers,
tests/test_server_tensor_parallel.py)."""

from __future__ import annotations

import gc
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from em_inf import metrics
from em_inf.config import PRESETS
from em_inf.counters import (
    ENTROPY_EDGES,
    HIST_AFTER,
    HIST_BEFORE,
    N_BINS,
    RESTORED,
    ROWS,
    SAMPLE_ENV,
    WIDTH,
    entropy_bin,
    fixed_point,
)
from tests import metrics_helpers
from tests.processor_helpers import VOCAB, params, v2_context, v2_processor

BACKENDS = ["torch", "cpu"]


def random_cases(rng: random.Random, vocab: int, count: int) -> list:
    """``count`` (float32 ``[V]`` logits, settings) pairs over both modes, with rows
    below their threshold and logits-mode rows running all their steps or stopping
    early."""
    cases = []
    for _ in range(count):
        scale = rng.choice([0.5, 2.0, 6.0])
        row = torch.randn(
            vocab, generator=torch.Generator().manual_seed(rng.randrange(2**31))
        )
        row = (row * scale).float()
        if rng.random() < 0.5:
            config = PRESETS["default"].replace(
                threshold=rng.choice([0.05, rng.uniform(0.5, 4.0), 50.0]),
                lr=rng.uniform(0.05, 0.5),
                steps=rng.randint(1, 6),
                kl_weight=rng.choice([0.0, 0.01]),
            )
        else:
            config = PRESETS["adaptive-temperature"].replace(
                threshold=rng.choice([0.1, rng.uniform(0.5, 3.0), 50.0]),
                alpha=rng.uniform(0.2, 0.9),
            )
        cases.append((row, config))
    return cases


def _run_backend(cases, backend: str, monkeypatch) -> np.ndarray:
    """The ``[2, WIDTH]`` counters of running every case through the functional
    API on ``backend``, one call per case."""
    from em_inf import functional

    monkeypatch.setenv("EM_INF_BACKEND", backend)
    monkeypatch.setenv(SAMPLE_ENV, "1")  # every row's entropy after
    counters = torch.zeros((2, WIDTH), dtype=torch.int64)
    for row, config in cases:
        if config.mode == "logits":
            functional.em_inf(
                row[None],
                threshold=config.threshold,
                kl_weight=config.kl_weight,
                lr=config.lr,
                steps=config.steps,
                stats=counters[0],
            )
        else:
            functional.adaptive_temperature(
                row[None],
                threshold=config.threshold,
                alpha=config.alpha,
                t_min=config.t_min,
                t_max=config.t_max,
                stats=counters[1],
            )
    return counters.numpy()


def _avoid_edges(cases):
    """The cases whose oracle entropies (before and after) are not within
    ENTROPY_TOL of a bin edge, and whose Adam steps the oracle can count."""
    kept = []
    for row, config in cases:
        try:
            expected = metrics_helpers.expected_counts([(row, config)])
        except AssertionError:  # an entropy at the threshold: steps ambiguous
            continue
        figures = expected[config.mode]
        near = any(
            abs(h - edge) <= metrics_helpers.ENTROPY_TOL
            for h in figures.before + figures.after
            for edge in ENTROPY_EDGES
        )
        if not near:
            kept.append((row, config))
    return kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_counts_every_column_as_the_oracle(backend, seed, monkeypatch):
    """Rows processed, below threshold, Adam steps, restored, and the entropies'
    bins and sums, of one call per row, against the oracle."""
    rng = random.Random(seed)
    cases = _avoid_edges(random_cases(rng, 257, 24))
    counters = _run_backend(cases, backend, monkeypatch)
    expected = metrics_helpers.expected_counts(cases)
    actual = metrics.summary(counters)
    metrics_helpers.assert_counts(actual, expected)
    # Exact bins: no row lies near an edge.
    for index, mode in enumerate(("logits", "temperature")):
        figures = expected[mode]
        for first, entropies in (
            (HIST_BEFORE, figures.before),
            (HIST_AFTER, figures.after),
        ):
            bins = np.bincount([entropy_bin(h) for h in entropies], minlength=N_BINS)
            assert (counters[index, first : first + N_BINS] == bins).all(), (
                f"seed {seed}: {mode} bins {counters[index, first : first + N_BINS]} "
                f"!= {bins}"
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_an_entropy_count_as_restored_only(backend, monkeypatch):
    """A row holding NaN or +inf: processed, restored, no entropy; an all-masked
    row: entropy 0 before and after."""
    from em_inf import functional

    monkeypatch.setenv("EM_INF_BACKEND", backend)
    rows = torch.zeros((3, 64))
    rows[0, 5] = float("nan")
    rows[1, 7] = float("inf")
    rows[2] = float("-inf")
    for mode, call, extra in (
        (0, functional.em_inf, {"kl_weight": 0.0, "lr": 0.1, "steps": 3}),
        (
            1,
            functional.adaptive_temperature,
            {"alpha": 0.5, "t_min": 0.1, "t_max": 1.0},
        ),
    ):
        counters = torch.zeros((2, WIDTH), dtype=torch.int64)
        call(rows, threshold=0.1, **extra, stats=counters[mode])
        got = counters[mode]
        assert int(got[ROWS]) == 3 and int(got[RESTORED]) == 2
        assert int(got[HIST_BEFORE]) == 1 and int(got[HIST_AFTER]) == 1  # bin of 0
        assert int(got[HIST_BEFORE : HIST_BEFORE + N_BINS].sum()) == 1
        assert int(counters[1 - mode].abs().sum()) == 0


def test_vllm_processor_series_are_the_oracles(seed, monkeypatch):
    """A Model Runner V2 processor over several steps: what
    :func:`em_inf.metrics.snapshot` reads (this process's series) is the oracle's
    count of every row, EM-INF-off rows left out."""
    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "1e-9")  # report every step
    monkeypatch.setenv(SAMPLE_ENV, "1")
    rng = random.Random(seed)
    cases = _avoid_edges(random_cases(rng, VOCAB, 8))
    gc.collect()  # other tests' processors, whose idle reporters would add rows
    before = metrics.snapshot()
    proc = v2_processor()
    expected_cases = []
    for _ in range(2):
        slots = list(range(len(cases) + 1))
        for slot, (_, config) in enumerate(cases):
            proc.add_request(slot, params({"em_inf": config.as_dict()}))
        proc.add_request(len(cases), params({"em_inf": False}))
        proc.apply_staged_writes()
        logits = torch.stack([row for row, _ in cases] + [cases[0][0]])
        proc.apply(logits, v2_context(slots))
        expected_cases += [*cases, (cases[0][0], None)]
    actual = metrics.difference(metrics.snapshot(), before)
    metrics_helpers.assert_counts(
        actual, metrics_helpers.expected_counts(expected_cases)
    )


def test_hf_processor_keeps_the_same_figures(seed, monkeypatch):
    monkeypatch.setenv(SAMPLE_ENV, "1")
    from em_inf.hf import EMInfLogitsProcessor

    rng = random.Random(seed)
    cases = _avoid_edges(random_cases(rng, 129, 12))
    per_row = [config.as_dict() for _, config in cases] + [None]
    processor = EMInfLogitsProcessor(per_row=per_row)
    scores = torch.stack([row for row, _ in cases] + [cases[0][0]])
    processor(torch.zeros((len(per_row), 1), dtype=torch.long), scores)
    expected = metrics_helpers.expected_counts([*cases, (cases[0][0], None)])
    metrics_helpers.assert_counts(processor.metrics(), expected)


def test_fixed_point_and_bins_follow_prometheus_le():
    for edge in ENTROPY_EDGES:
        assert entropy_bin(edge) == ENTROPY_EDGES.index(edge)  # le: edge is inside
        assert (
            entropy_bin(math.nextafter(edge, math.inf)) == ENTROPY_EDGES.index(edge) + 1
        )
    assert entropy_bin(1e9) == N_BINS - 1
    assert fixed_point(1.2345675) == 1234568 and fixed_point(0.0) == 0


def test_grafana_dashboard_queries_only_series_em_inf_exports():
    """Every series the dashboard in docs/ queries is one the processor publishes
    (checked against the names prometheus_client writes, with their suffixes)."""
    import re
    from pathlib import Path

    from prometheus_client import CollectorRegistry, generate_latest

    metrics.publish(np.ones((2, WIDTH), dtype=np.int64))  # make every series exist
    registry = CollectorRegistry()
    for collector in {metrics._series[name] for name in metrics._series}:
        registry.register(collector)
    exported = set(
        re.findall(r"^(em_inf_\w+)", generate_latest(registry).decode(), re.M)
    )
    dashboard = Path(__file__).parents[1] / "docs" / "grafana" / "em-inf-dashboard.json"
    queried = set(re.findall(r"em_inf_\w+", dashboard.read_text()))
    assert queried, "the dashboard queries no EM-INF series"
    assert queried <= exported, queried - exported


def test_share_across_processes_makes_one_directory_and_keeps_the_users(
    monkeypatch, tmp_path
):
    """A fresh directory, the same one again after a restart of the process (the
    allocator's re-exec of em-inf serve), and a directory the user set kept."""
    for name in (metrics.MULTIPROC_ENV, metrics._OWNED_ENV):
        monkeypatch.setenv(name, "")  # recorded, so that teardown restores it
        monkeypatch.delenv(name)
    made = metrics.share_across_processes()
    assert Path(made).is_dir() and os.environ[metrics.MULTIPROC_ENV] == made
    assert metrics.share_across_processes() == made  # as after the restart
    os.rmdir(made)
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    monkeypatch.delenv(metrics._OWNED_ENV)
    assert metrics.share_across_processes() == str(tmp_path)
    assert metrics._OWNED_ENV not in os.environ
