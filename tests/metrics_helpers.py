"""What EM-INF's series must show for known rows, from the float64 oracle, and how
a server's ``/metrics`` is compared with it.

A case is one processed row: the model's own logprobs ``[V]`` (float32) and the
settings it ran with. Expected per mode: rows, rows below threshold, rows restored,
Adam steps (the oracle's: step ``t + 1`` runs while ``H(z_t) >= threshold``), and
the oracle's entropies before and after. Solver passes are the implementation's
own count (a float64 oracle bisects; the kernels use a Newton-type solver): they
are taken from em-inf's CPU path on the same row.

Bins: a row whose oracle entropy lies within :data:`ENTROPY_TOL` of an edge may
land in either neighbour (float32 kernels against a float64 oracle, and the served
model's logits against transformers'); every other row's bin is exact.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from em_inf import functional, metrics
from em_inf.config import MODES, EMInfConfig
from em_inf.counters import ENTROPY_EDGES, WIDTH, WORK
from em_inf.reference import em_inf_oracle, entropy, settings_oracle
from tests.server_helpers import settled

#: Largest difference between the served row's entropy and the oracle's (nats).
ENTROPY_TOL = 1e-3


@dataclass
class Expected:
    """One mode's expected figures."""

    rows: int = 0
    below_threshold: int = 0
    restored: int = 0
    work: int = 0
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)


def expected_counts(
    cases: list[tuple[torch.Tensor, EMInfConfig | None]],
) -> dict[str, Expected]:
    """The figures for ``cases`` (``None`` settings: EM-INF off, not counted)."""
    result = {mode: Expected() for mode in MODES}
    for plain, config in cases:
        if config is None or (config.mode == "logits" and config.steps == 0):
            continue
        row = plain.double()[None]
        h0 = float(entropy(row)[0])
        after = float(entropy(settings_oracle(row, config))[0])
        mode = result[config.mode]
        mode.rows += 1
        mode.before.append(h0)
        mode.after.append(after)
        if config.mode == "logits":
            below = h0 < config.threshold
            mode.work += 0 if below else adam_steps(row, config)
        else:
            below = h0 <= config.threshold
            mode.work += solver_passes(plain, config)
        mode.below_threshold += below
    return result


def adam_steps(row: torch.Tensor, config: EMInfConfig) -> int:
    """Adam steps the oracle takes on ``row`` (float64 ``[1, V]``), whose entropy
    starts at or above the threshold: one, then one more while the entropy of the
    last step's logits stays at or above it."""
    params = {"threshold": config.threshold, "kl_weight": config.kl_weight}
    params["lr"] = config.lr
    taken = 1
    while taken < config.steps:
        z = em_inf_oracle(row, **params, steps=taken)
        h = float(entropy(z)[0])
        assert abs(h - config.threshold) > ENTROPY_TOL, (
            f"entropy {h} after {taken} steps is too near the threshold "
            f"{config.threshold} to count steps exactly: choose other settings"
        )
        if h < config.threshold:
            break
        taken += 1
    return taken


def solver_passes(plain: torch.Tensor, config: EMInfConfig) -> int:
    """The temperature solver's passes on ``plain`` (float32 ``[V]``), as em-inf's
    CPU path counts them."""
    stats = torch.zeros(WIDTH, dtype=torch.int64)
    functional.adaptive_temperature(
        plain[None],
        threshold=config.threshold,
        alpha=config.alpha,
        t_min=config.t_min,
        t_max=config.t_max,
        stats=stats,
    )
    return int(stats[WORK])


#: Seconds between two equal readings that count as quiet: the engine reports once
#: a second in these tests (VLLM_LOG_STATS_INTERVAL=1), and an idle engine within
#: about two.
QUIET_S = 3.0


def quiet(read: Callable[[], dict], timeout_s: float = 60.0) -> dict:
    """``read()`` once two readings :data:`QUIET_S` apart agree: rows of earlier
    requests still to be reported would otherwise land in what a test counts."""
    deadline = time.monotonic() + timeout_s
    last = read()
    while True:
        time.sleep(QUIET_S)
        now = read()
        if now == last or time.monotonic() > deadline:
            return now
        last = now


def series(base_url: str) -> dict[str, dict[str, Any]]:
    """EM-INF's series on ``base_url``'s ``/metrics``
    (:func:`em_inf.metrics.snapshot`'s structure)."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as page:
        return metrics.parse(page.read().decode())


def assert_settles_to(read: Callable[[], dict], before: dict, expected: dict):
    """Wait until ``read()`` (series in :func:`em_inf.metrics.snapshot`'s
    structure) has gained the rows ``expected`` (:func:`expected_counts`) counts
    since ``before``, then check every figure of what it gained."""

    def counted() -> dict:
        now = read()
        return {mode: now[mode]["rows"] - before[mode]["rows"] for mode in now}

    rows = {mode: figures.rows for mode, figures in expected.items()}
    assert settled(counted, rows) == rows
    assert_counts(metrics.difference(read(), before), expected)


def assert_counts(actual: dict[str, dict[str, Any]], expected: dict[str, Expected]):
    """Every figure of ``actual`` (an :func:`em_inf.metrics.difference`) against
    ``expected``."""
    for mode in MODES:
        got, want = actual[mode], expected[mode]
        counts = {k: got[k] for k in ("rows", "below_threshold", "restored", "work")}
        wanted = {
            "rows": want.rows,
            "below_threshold": want.below_threshold,
            "restored": want.restored,
            "work": want.work,
        }
        assert counts == wanted, f"{mode} mode: {counts} != {wanted}"
        for name, entropies in (
            ("entropy_before", want.before),
            ("entropy_after", want.after),
        ):
            _assert_histogram(f"{mode} {name}", got[name], entropies)


def _assert_histogram(what: str, histogram: dict[str, Any], entropies: list[float]):
    assert histogram["count"] == len(entropies), (what, histogram["count"])
    tol = ENTROPY_TOL * max(len(entropies), 1)
    assert math.isclose(histogram["sum"], sum(entropies), abs_tol=tol), (
        what,
        histogram["sum"],
        sum(entropies),
    )
    edges = [*ENTROPY_EDGES, math.inf]
    assert [le for le, _ in histogram["buckets"]] == edges, what
    for le, cumulative in histogram["buckets"]:
        surely = sum(h + ENTROPY_TOL <= le for h in entropies)
        possibly = sum(h - ENTROPY_TOL <= le for h in entropies)
        assert surely <= cumulative <= possibly, (
            f"{what}: {cumulative} rows at or below {le} nats, expected "
            f"{surely}..{possibly} from the oracle's entropies {sorted(entropies)}"
        )
