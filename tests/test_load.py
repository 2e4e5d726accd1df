"""A small run of ``bench/load.py`` against a real ``em-inf serve`` (issue 8).

200 requests from 16 concurrent clients (the official ``openai`` client, no
retries): chat and completions, streaming and not, ``n`` up to 3, seeds, stop
strings, both EM-INF modes, presets, ``"em_inf": false`` and about 10% invalid
settings. Nothing may fail unexpectedly (every invalid request gets a 400 naming its
field), and every request that asked for the full first-token distribution must
match the float64 oracle of its own settings (see :mod:`bench.load`). The server
serves the tiny random Qwen2 with a 512-token vocabulary in float32, so full
distributions are cheap; ``python bench/load.py`` runs the same on the default model.
"""

from __future__ import annotations

import asyncio

import pytest

from bench import load
from em_inf import models
from tests.server_helpers import (
    FULL_DISTRIBUTION_ARGS,
    TINY_VOCAB,
    running_server,
    settled,
)

REQUESTS = 200
CONCURRENCY = 16


@pytest.fixture(scope="module")
def load_server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("load-server") / "server.log"
    args = [str(models.tiny_model_dir(TINY_VOCAB)), *FULL_DISTRIBUTION_ARGS]
    args += ["--max-model-len", "512"]
    with running_server(args, log_path) as base_url:
        yield base_url


# Server start (at most 420 s) plus the load's own limit (time_limit_s=900 below).
@pytest.mark.timeout(1500)
def test_200_mixed_requests_fail_nothing_and_each_gets_its_own_settings(
    load_server, seed
):
    base_url = load_server
    pid = load.loopback_server_pid(base_url)
    info = load.get_json(base_url + "/v1/em-inf")
    plan = load.make_plan(REQUESTS, seed)
    before = load.memory_of(pid)
    outcomes, wall = asyncio.run(
        load.drive(
            base_url,
            plan,
            concurrency=CONCURRENCY,
            time_limit_s=900,
            request_timeout_s=300,
        )
    )
    after = load.memory_of(pid)
    summary = load.summarize(outcomes, wall)
    checks = load.check_distributions(
        plan, outcomes, info["defaults"], info["enabled_by_default"], TINY_VOCAB
    )
    report = (
        f"seed {seed}; {summary['requests_sent']} requests in {wall:.0f} s, "
        f"p50 {summary['latency_p50_s']:.3f} s, p99 {summary['latency_p99_s']:.3f} s; "
        f"RSS {before['rss'] / 2**20:.0f} -> {after['rss'] / 2**20:.0f} MiB; "
        f"checks {checks['counts']}"
    )
    print(report)
    assert summary["requests_sent"] == REQUESTS, report
    assert not summary["errors"], f"{report}\n" + "\n".join(summary["error_examples"])
    kinds = summary["kinds"]
    assert kinds.get("invalid", 0) >= REQUESTS // 20, kinds
    counts = checks["counts"]
    assert not counts.get("mismatch") and not counts.get("incomplete"), (
        f"{report}\n" + "\n".join(checks["failures"])
    )
    assert counts.get("checked", 0) == kinds.get("checked"), counts
    assert counts.get("changed_by_em_inf", 0) > 0, "no check saw EM-INF act"
    running = settled(
        lambda: load.metric_total(base_url, "vllm:num_requests_running"), 0
    )
    assert running == 0
