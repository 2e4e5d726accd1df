"""A small run of ``bench/load.py`` against a real ``em-inf serve`` (issue 8).

200 requests from 16 concurrent clients (the official ``openai`` client, no
retries): chat and completions, streaming and not, ``n`` up to 3, seeds, stop
strings, both EM-INF modes, presets, ``"em_inf": false`` and about 10% invalid
settings. Nothing may fail unexpectedly (every invalid request gets a 400 naming its
field), and every request that asked for the full first-token distribution must
match the float64 oracle of its own settings (see ``bench/load.py``). The server
serves the tiny random Qwen2 with a 512-token vocabulary in float32, so full
distributions are cheap; ``python -m bench.load`` runs the same on the default model.

The benchmark runs as it does by hand, ``python -m bench.load --server URL``, in a
process of its own (tests do not import bench), and the test reads the JSON it
writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from em_inf_support.metrics import metric_total
from em_inf_support.tiny_model import tiny_model_dir
from tests.server_helpers import (
    FULL_DISTRIBUTION_ARGS,
    TINY_VOCAB,
    running_server,
    settled,
)

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 200
CONCURRENCY = 16
TIME_LIMIT_S = 900


@pytest.fixture(scope="module")
def load_server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("load-server") / "server.log"
    args = [str(tiny_model_dir(TINY_VOCAB)), *FULL_DISTRIBUTION_ARGS]
    args += ["--max-model-len", "512"]
    with running_server(args, log_path) as base_url:
        yield base_url


def run_bench_load(base_url: str, seed: int, results: Path) -> tuple[dict, str]:
    """``python -m bench.load --server base_url ...``: its JSON and its output."""
    command = [sys.executable, "-m", "bench.load", "--server", base_url]
    command += ["--requests", str(REQUESTS), "--concurrency", str(CONCURRENCY)]
    command += ["--seed", str(seed), "--time-limit", str(TIME_LIMIT_S)]
    command += ["--request-timeout", "300", "--tag", "test"]
    command += ["--results-dir", str(results)]
    done = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT_S + 300,
    )
    output = (done.stdout + done.stderr)[-4000:]
    out_json = results / "load_test.json"
    assert out_json.is_file(), (
        f"bench.load wrote no JSON (exit {done.returncode}):\n{output}"
    )
    return json.loads(out_json.read_text()), output


# Server start (at most 420 s) plus the load's own limit (TIME_LIMIT_S) and its
# two quiet memory readings.
@pytest.mark.timeout(1500)
def test_200_mixed_requests_fail_nothing_and_each_gets_its_own_settings(
    load_server, seed, tmp_path
):
    base_url = load_server
    result, output = run_bench_load(base_url, seed, tmp_path)
    summary, checks = result["summary"], result["checks"]
    memory = result["memory"]
    report = (
        f"seed {seed}; {summary['requests_sent']} requests in "
        f"{summary['wall_s']:.0f} s, p50 {summary['latency_p50_s']:.3f} s, "
        f"p99 {summary['latency_p99_s']:.3f} s; RSS "
        f"{memory['before']['rss'] / 2**20:.0f} -> "
        f"{memory['after']['rss'] / 2**20:.0f} MiB; checks {checks['counts']}"
    )
    print(report)
    assert result["vocab"] == TINY_VOCAB, output
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
    running = settled(lambda: metric_total(base_url, "vllm:num_requests_running"), 0)
    assert running == 0
    # EM-INF's series on /metrics took in the run's rows (the entropy after is a
    # sample of the logits-mode rows on the CPU path), and EM-INF lowered entropy.
    series = result["em_inf_series"]["logits"]
    assert series["rows"] > 0, result["em_inf_series"]
    before, after = series["entropy_before"], series["entropy_after"]
    assert before["count"] == series["rows"], series
    assert 0 < after["count"] <= series["rows"], series
    assert after["sum"] / after["count"] < before["sum"] / before["count"], series
