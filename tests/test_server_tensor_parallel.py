"""``em-inf serve MODEL --tensor-parallel-size 2`` on a CPU machine, as a user runs it.

vLLM binds each CPU worker's threads to a NUMA node of its own and refuses to start
with fewer nodes than workers; ``em-inf serve`` then splits the allowed cores among
the workers itself (``VLLM_CPU_OMP_THREADS_BIND``, left to the user when set). The
server here starts without that variable, on the tiny random Qwen2 (vocabulary 512,
float32, ``processed_logprobs``: see tests/test_server.py), and every first-token
distribution is checked against the float64 oracle for its own settings, on both
workers' shared output.
"""

from __future__ import annotations

import random
import re
import urllib.request

import openai
import pytest

from em_inf.counters import SAMPLE_ENV
from em_inf.server.cpu_defaults import THREADS_BIND_ENV
from em_inf_support.tiny_model import tiny_model_dir
from tests import metrics_helpers
from tests.server_helpers import (
    FULL_DISTRIBUTION_ARGS,
    PROMPTS,
    SERVER_DEFAULT,
    SERVER_THRESHOLD,
    TINY_VOCAB,
    assert_acted,
    assert_model_distribution_matches_transformers,
    assert_row,
    expected_row,
    first_token_row,
    numa_nodes_of_allowed_cpus,
    random_logits_settings,
    running_server,
)


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory):
    model_dir = tiny_model_dir(TINY_VOCAB)
    log_path = tmp_path_factory.mktemp("tp-server") / "server.log"
    args = [str(model_dir), *FULL_DISTRIBUTION_ARGS, "--tensor-parallel-size", "2"]
    args += ["--max-model-len", "512", "--em-inf-threshold", str(SERVER_THRESHOLD)]
    # EM-INF's series reach /metrics once per interval: 1 s for the test.
    environment = {
        THREADS_BIND_ENV: None,
        "VLLM_LOG_STATS_INTERVAL": "1",
        SAMPLE_ENV: "1",  # every row's entropy after
    }
    with running_server(args, log_path, env_changes=environment) as base_url:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        yield base_url, client, model, model_dir, log_path


@pytest.fixture(scope="module")
def plain_rows(tp_server):
    _, client, model, _, _ = tp_server
    return {
        (endpoint, prompt): first_token_row(
            client, model, endpoint, prompt, {"em_inf": False}
        )
        for endpoint in ("chat", "completion")
        for prompt in PROMPTS[:4]
    }


def test_two_workers_each_bound_to_their_own_cores(tp_server):
    base_url, _, _, _, log_path = tp_server
    log = log_path.read_text(errors="replace")
    with urllib.request.urlopen(base_url + "/health", timeout=30) as response:
        assert response.status == 200
    bound = re.search(rf"{THREADS_BIND_ENV}=(\S+)", log)
    assert "Not enough allowed NUMA nodes" not in log
    if numa_nodes_of_allowed_cpus() >= 2:  # a node per worker: vLLM's own binding
        assert bound is None, bound.group(0)
        return
    assert bound is not None, f"one NUMA node and no {THREADS_BIND_ENV} in the log"
    shares = bound.group(1).split("|")
    assert len(shares) == 2 and shares[0] != shares[1], bound.group(0)
    for rank in (0, 1):
        assert re.search(rf"local_rank={rank}, core ids=\[", log), log[-3000:]


def test_model_distribution_matches_transformers(tp_server, plain_rows):
    """The two workers together compute the model's own distribution."""
    assert_model_distribution_matches_transformers(plain_rows, tp_server[3])


@pytest.mark.parametrize("endpoint", ["chat", "completion"])
def test_every_request_matches_the_oracle_for_its_own_settings(
    seed, tp_server, plain_rows, endpoint
):
    _, client, model, _, _ = tp_server
    rng = random.Random(seed)
    cases = [({}, SERVER_DEFAULT)]
    cases.append(
        ({"em_inf": {"preset": "math"}}, SERVER_DEFAULT.updated({"preset": "math"}))
    )
    cases.append(
        (
            {"em_inf": {"mode": "temperature", "t_min": 0.5}},
            SERVER_DEFAULT.updated({"mode": "temperature", "t_min": 0.5}),
        )
    )
    for _ in range(3):
        settings = random_logits_settings(rng, acting=True)
        cases.append(({"em_inf": settings}, SERVER_DEFAULT.replace(**settings)))
    for extra, config in cases:
        prompt = rng.choice(PROMPTS[:4])
        actual = first_token_row(client, model, endpoint, prompt, extra)
        plain = plain_rows[(endpoint, prompt)]
        try:
            assert_row(actual, expected_row(plain, config))
            assert_acted(actual, plain, config)  # every case here makes EM-INF act
        except AssertionError as error:
            raise AssertionError(
                f"{endpoint} {prompt!r} with {extra}: {error}"
            ) from None


def test_metrics_count_each_row_once_across_both_workers(seed, tp_server, plain_rows):
    """Both workers run the processor on every row; only rank 0 counts it: /metrics
    shows each row once, as the oracle counts it."""
    base_url, client, model, _, _ = tp_server
    rng = random.Random(seed)
    extras = [{}, {"em_inf": {"mode": "temperature"}}, {"em_inf": False}]
    extras.append({"em_inf": random_logits_settings(rng, acting=True)})
    before = metrics_helpers.quiet(lambda: metrics_helpers.series(base_url))
    cases = []
    for extra in extras:
        prompt = rng.choice(PROMPTS[:4])
        first_token_row(client, model, "completion", prompt, extra)
        em_inf = extra.get("em_inf", {})
        config = None if em_inf is False else SERVER_DEFAULT.updated(em_inf)
        cases.append((plain_rows[("completion", prompt)], config))
    expected = metrics_helpers.expected_counts(cases)

    metrics_helpers.assert_settles_to(
        lambda: metrics_helpers.series(base_url), before, expected
    )
