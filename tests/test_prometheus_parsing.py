"""em_inf_support.metrics reads a Prometheus page as prometheus_client writes it:
vLLM's series (names with colons, a counter's ``_total`` and ``_created``, gauges)
and the shape of EM-INF's own (counters and histograms labelled by mode)."""

from __future__ import annotations

import math

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from em_inf_support.metrics import HistogramValue, Metrics


@pytest.fixture
def page() -> Metrics:
    registry = CollectorRegistry()
    labels = {"model_name": "tiny", "engine": "0"}
    preemptions = Counter(
        "vllm:num_preemptions", "preemptions", list(labels), registry=registry
    )
    preemptions.labels(**labels).inc(3)
    running = Gauge(
        "vllm:num_requests_running", "running", list(labels), registry=registry
    )
    running.labels(**labels).set(2)
    rows = Counter("em_inf_rows_total", "rows", ["mode"], registry=registry)
    rows.labels(mode="logits").inc(5)
    rows.labels(mode="temperature").inc(7)
    steps = Counter("em_inf_adam_steps_total", "steps", registry=registry)
    steps.inc(11)
    entropy = Histogram(
        "em_inf_entropy_before_nats",
        "entropy",
        ["mode"],
        buckets=(0.5, 1.0, 2.0),
        registry=registry,
    )
    for value in (0.25, 0.75, 1.5, 9.0):
        entropy.labels(mode="logits").observe(value)
    entropy.labels(mode="temperature").observe(0.1)
    return Metrics(generate_latest(registry).decode())


def test_counters_and_gauges_by_name_and_labels(page):
    assert page.total("vllm:num_preemptions_total") == 3
    assert page.counter("vllm:num_preemptions") == 3
    assert page.total("vllm:num_requests_running", model_name="tiny") == 2
    assert page.total("vllm:num_requests_running", model_name="other") == 0
    assert page.counter("em_inf_rows_total", mode="logits") == 5
    assert page.counter("em_inf_rows_total", mode="temperature") == 7
    assert page.counter("em_inf_rows_total") == 12
    assert page.counter("em_inf_adam_steps_total") == 11
    assert page.total("em_inf_rows_below_threshold_total") == 0
    with pytest.raises(KeyError, match="em_inf_rows_restored_total"):
        page.counter("em_inf_rows_restored_total", mode="logits")


def test_histograms_by_name_and_labels(page):
    assert page.histogram("em_inf_entropy_before_nats", mode="logits") == (
        HistogramValue(
            buckets={0.5: 1.0, 1.0: 2.0, 2.0: 3.0, math.inf: 4.0}, sum=11.5, count=4.0
        )
    )
    temperature = page.histogram("em_inf_entropy_before_nats", mode="temperature")
    assert (temperature.count, temperature.sum) == (1.0, 0.1)
    with pytest.raises(KeyError, match="em_inf_entropy_after_nats"):
        page.histogram("em_inf_entropy_after_nats", mode="logits")
