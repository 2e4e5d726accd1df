"""A server's Prometheus ``/metrics`` page, read with ``prometheus_client``'s parser
(installed with vLLM).

Series are found by their sample names as the page writes them: a counter's
``<name>_total``, a gauge's ``<name>``, a histogram's ``<name>_bucket`` /
``_sum`` / ``_count`` (asked for by ``<name>``). Labels select series: every label
given must match, others are free, and the matching series are added up (vLLM
labels its series with the model's name and the engine's index).
"""

from __future__ import annotations

import dataclasses
import math
import urllib.request
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class HistogramValue:
    """One histogram's state: cumulative counts per upper bound (``le``, ``+Inf``
    as ``math.inf``, ascending), the sum and the count of its observations."""

    buckets: dict[float, float]
    sum: float
    count: float


class Metrics:
    """The samples of one ``/metrics`` page."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.samples = [
            sample
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def select(self, name: str, labels: dict[str, str]) -> list:
        """The samples named ``name`` whose labels include ``labels``."""
        return [
            sample
            for sample in self.samples
            if sample.name == name
            and all(sample.labels.get(key) == value for key, value in labels.items())
        ]

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` with ``labels`` (0 when none)."""
        return _sum(self.select(name, labels))

    def counter(self, name: str, **labels: str) -> float:
        """A counter's value (``name`` with or without ``_total``), summed over
        the series with ``labels``; ``KeyError`` when the page has none."""
        full = name if name.endswith("_total") else name + "_total"
        found = self.select(full, labels)
        if not found:
            raise KeyError(f"no {full} series with labels {labels} on the page")
        return _sum(found)

    def histogram(self, name: str, **labels: str) -> HistogramValue:
        """A histogram's buckets, sum and count, summed over the series with
        ``labels``; ``KeyError`` when the page has none."""
        count = self.select(name + "_count", labels)
        if not count:
            raise KeyError(f"no {name} histogram with labels {labels} on the page")
        buckets: dict[float, float] = {}
        for sample in self.select(name + "_bucket", labels):
            bound = float(sample.labels["le"])  # "+Inf" -> inf
            buckets[bound] = buckets.get(bound, 0.0) + sample.value
        return HistogramValue(
            buckets=dict(sorted(buckets.items())),
            sum=_sum(self.select(name + "_sum", labels)),
            count=_sum(count),
        )


def _sum(samples: Iterable) -> float:
    return math.fsum(sample.value for sample in samples)


def read_metrics(base_url: str) -> Metrics:
    """``GET <base_url>/metrics``, parsed."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as page:
        return Metrics(page.read().decode())


def metric_total(base_url: str, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` (with ``labels``) on the server's
    ``/metrics`` page; 0 when it has none."""
    return read_metrics(base_url).total(name, **labels)
