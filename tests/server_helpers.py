"""The server tests' helpers: start and stop a real ``em-inf serve`` process, ask it
for whole first-token distributions, and compare them with the float64 oracle.

Starting and stopping the process is :mod:`em_inf_support.servers` (shared with
bench/): the server runs as a child process on loopback, in its own session (so
stopping it also stops vLLM's engine processes), with its output in a log file whose
tail is shown when it fails to come up.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import openai
import torch

from em_inf.config import PRESETS, EMInfConfig
from em_inf.reference import entropy
from em_inf_support.servers import em_inf_server
from tests.oracle import assert_matches, settings_oracle

T = TypeVar("T")

#: How long a condition the server reaches asynchronously (a Prometheus counter
#: after the response was sent) may take to appear before it counts as wrong.
SETTLE_TIMEOUT_S = 60.0


def settled(read: Callable[[], T], expected: T, timeout_s: float = SETTLE_TIMEOUT_S):
    """Poll ``read()`` until it returns ``expected`` (at most ``timeout_s``), and
    return its last value: the caller asserts on it, so a condition the server never
    reaches fails with what it showed last. vLLM updates its metrics after the
    response went out, so reading them once right after a response races."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def numa_nodes_of_allowed_cpus() -> int:
    """How many NUMA nodes hold a CPU this process may run on, read from sysfs
    here (not through em-inf): 1 where sysfs lists no nodes."""
    allowed = os.sched_getaffinity(0)
    nodes = 0
    for node in Path("/sys/devices/system/node").glob("node[0-9]*"):
        cpus: set[int] = set()
        with contextlib.suppress(OSError):
            for part in (node / "cpulist").read_text().strip().split(","):
                if part:
                    low, _, high = part.partition("-")
                    cpus.update(range(int(low), int(high or low) + 1))
        nodes += bool(cpus & allowed)
    return max(nodes, 1)


def interpreter_args() -> list[str]:
    """``--enforce-eager`` where vLLM's Triton kernels run under the interpreter
    (the Model Runner V2 runs of the version matrix, tests/vllm_layers.py): vLLM
    0.34's start-up warm-up compiles its grammar-bitmask kernel, which the
    interpreter refuses ("mask has unsupported dtype"); eager engines skip it."""
    return ["--enforce-eager"] if os.environ.get("TRITON_INTERPRET") == "1" else []


@contextlib.contextmanager
def running_server(
    args: Sequence[str],
    log_path: Path,
    *,
    env_changes: Mapping[str, str | None] | None = None,
) -> Iterator[str]:
    """Run ``em-inf serve <args> --host 127.0.0.1 --port <free>``; yield its base URL
    (:func:`em_inf_support.servers.em_inf_server`, with :func:`interpreter_args`)."""
    serve_args = [*args, *interpreter_args()]
    with em_inf_server(serve_args, log_path, env_changes=env_changes) as server:
        yield server.base_url


# ------------------------------------------ first-token distributions and the oracle

TINY_VOCAB = 512
SERVER_THRESHOLD = 0.25  # --em-inf-threshold of the tiny server (preset 'default')
SERVER_DEFAULT = PRESETS["default"].replace(threshold=SERVER_THRESHOLD)
PROMPTS = (
    "The capital of France is",
    "Solve for x: 3x + 5 = 20.",
    "def add(a, b):",
    "Entropy minimization sharpens",
    "The quick brown fox",
    "Numbers: 0 1 2 3",
    "A language model assigns",
    "What is 12 + 30?",
)
# The served model's own distribution against transformers': two engines' float32
# forward passes, not EM-INF (whose standard is the oracle's TV <= 1e-5). Logprobs
# within 1e-3 bound TV by 1 - exp(-1e-3) < 1e-3; the TV asked for is tighter still.
MODEL_LOGIT_TOL = 1e-3
MODEL_TV_TOL = 1e-4


def random_logits_settings(rng: random.Random, *, acting: bool = False) -> dict:
    """Fresh logits-mode settings; thresholds sometimes above the row's entropy.

    ``acting``: settings under which EM-INF must change every first-token row of the
    tiny model (at least one step, a threshold far below those rows' entropies,
    which are near log 512 = 6.2 nats; callers check ``entropy > threshold``).
    """
    if acting:
        threshold = rng.uniform(0.0, 1.0)
        steps = rng.randint(1, 5)
    else:
        threshold = rng.choice([0.0, rng.uniform(0.0, 4.0), 50.0])
        steps = rng.randint(0, 5)
    return {
        "threshold": threshold,
        "kl_weight": rng.uniform(0.0, 0.2),
        "lr": rng.uniform(0.01, 0.3),
        "steps": steps,
    }


#: A row EM-INF acted on differs from the model's own by at least this much in some
#: logprob (each Adam step moves almost every logit by about ``lr`` >= 0.01; see the
#: algorithm notes): a smaller change means EM-INF did not act.
ACTED_MIN_CHANGE = 1e-3


def assert_acted(actual: torch.Tensor, plain: torch.Tensor, config: EMInfConfig):
    """EM-INF changed ``plain`` (the model's own row) under ``config``: the test
    really exercised it."""
    assert float(entropy(plain.double())) > config.threshold, "test needs a real step"
    change = float((actual - plain).abs().max())
    assert change > ACTED_MIN_CHANGE, f"EM-INF changed nothing ({change:.3g})"


def row_from_top_logprobs(pairs) -> torch.Tensor:
    """``[V]`` float32 logprobs from ``(\"token_id:<id>\", logprob)`` pairs (all V)."""
    row = torch.full((TINY_VOCAB,), float("nan"), dtype=torch.float32)
    for token, logprob in pairs:
        row[int(token.removeprefix("token_id:"))] = logprob
    assert not row.isnan().any(), "the server did not return every token's logprob"
    return row


def first_token_row(
    client: openai.OpenAI, model: str, endpoint: str, prompt: str, extra: dict
) -> torch.Tensor:
    """The processed logprobs of the first generated token, all ``V`` of them."""
    extra = {"return_tokens_as_token_ids": True, **extra}
    if endpoint == "chat":
        response = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=1,
            temperature=0.0,
            logprobs=True,
            top_logprobs=-1,
            extra_body=extra,
        )
        top = response.choices[0].logprobs.content[0].top_logprobs
        return row_from_top_logprobs((entry.token, entry.logprob) for entry in top)
    response = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=1,
        temperature=0.0,
        logprobs=-1,
        extra_body=extra,
    )
    return row_from_top_logprobs(response.choices[0].logprobs.top_logprobs[0].items())


def expected_row(plain: torch.Tensor, config: EMInfConfig | None) -> torch.Tensor:
    """The reference's distribution (float64 logprobs) for ``config`` applied to the
    model's own logprobs ``plain`` (EM-INF is shift-invariant in the logits)."""
    if config is None:
        return plain.double()
    return torch.log_softmax(settings_oracle(plain[None], config)[0], dim=-1)


def assert_row(actual: torch.Tensor, expected: torch.Tensor, **tolerances) -> None:
    assert_matches(actual[None], expected[None], **tolerances)


#: ``em-inf serve`` flags of the tiny-model servers: float32 (comparable with
#: transformers), and every token's processed logprob on request.
FULL_DISTRIBUTION_ARGS = [
    "--dtype",
    "float32",
    "--max-logprobs",
    "-1",
    "--logprobs-mode",
    "processed_logprobs",
]


def assert_model_distribution_matches_transformers(plain_rows: dict, model_dir) -> None:
    """The served model's own first-token distribution (``"em_inf": false``) for
    ``PROMPTS[1]`` is transformers' on the same float32 checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt = PROMPTS[1]
    with torch.no_grad():
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        logits = hf_model(ids).logits[0, -1].double()
    assert_row(
        plain_rows[("completion", prompt)],
        torch.log_softmax(logits, -1),
        logit_tol=MODEL_LOGIT_TOL,
        tv_tol=MODEL_TV_TOL,
    )
