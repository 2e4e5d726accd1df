"""Load, soak and settings isolation of ``em-inf serve``, as a benchmark with figures.

Starts ``em-inf serve`` on loopback (or drives one already running: ``--server URL``,
loopback only), then sends ``--requests`` requests from ``--concurrency`` concurrent
clients (the official ``openai`` client, no retries; ``httpx`` for bodies it cannot
send, such as a NaN), bounded by ``--time-limit``. The requests are a fixed mix drawn
from ``--seed``: chat and completions, streaming and not, ``n`` of 1 to 3, seeds, stop
strings, greedy and sampled, EM-INF's logits and temperature modes with random
settings, every preset, the server's defaults, ``"em_inf": false``, and about 10%
invalid settings (each must get HTTP 400 naming the field).

**Settings isolation.** About one request in six asks for the full first-token
distribution (``logprobs`` / ``top_logprobs`` = -1, i.e. every token, with
``--logprobs-mode processed_logprobs`` so the server returns the log-softmax of the
logits after EM-INF). Each is checked against the float64 oracle
(:func:`em_inf.reference.settings_oracle`) for its own settings, applied to the
model's own distribution for the same prompt: an ``"em_inf": false`` request of the
same prompt and endpoint in the same run (with processed logprobs and EM-INF off, the
processed distribution is the raw one; greedy rows are not divided by a
temperature). Those reference requests run throughout the load, several per prompt,
so the run also measures whether a prompt's raw first-token distribution depends on
the batch it was computed in (``reference_spread`` in the JSON: 0 means bit-identical
in every batch). A check passes when it meets the agreement standard
(:func:`em_inf.reference.mismatch`) against the oracle of one of its prompt's
reference rows. Checks run after the load, so they do not compete with the server.

**Memory.** The resident memory (RSS; PSS beside it) of the server process and every
process under it (vLLM's engine core) is sampled every ``--memory-interval`` seconds
with the number of requests done (the curve). Under load it swings by several
percent as large responses come and go, so growth is measured between two idle
readings: the warm-up (``--warmup`` requests) runs first and completes, and after
:data:`SETTLE_S` seconds of quiet memory is read; the rest of the run follows, and
after the same quiet memory is read again (``idle_growth``). The windowed growth of
the curve under load is reported too.

Usage::

    python -m bench.load --requests 200 --concurrency 16            # quick check
    python -m bench.load --requests 2000 --concurrency 64           # the load target
    python -m bench.load --requests 10000 --concurrency 64 --tag soak  # the soak
    python -m bench.load --server http://127.0.0.1:8000 --requests 500

Writes ``bench/results/load_<tag>.json`` and ``.png``; exits 1 when any request
failed unexpectedly or any check mismatched.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from em_inf import metrics as em_inf_metrics
from em_inf_support.metrics import metric_total
from em_inf_support.servers import em_inf_server, get_json, loopback_server_pid

#: Seconds of quiet before an idle memory reading (in-flight responses freed).
SETTLE_S = 10.0
#: Longest wait for EM-INF's series to take in the run's last rows.
SERIES_SETTLE_S = 40.0
RESULTS = Path(__file__).resolve().parent / "results"

PROMPTS = (
    "The capital of France is",
    "Solve for x: 3x + 5 = 20.",
    "def add(a, b):",
    "Write one sentence about the sea.",
    "List three primary colours.",
    "What is 12 + 30?",
    "Translate 'good morning' into French.",
    "A haiku about autumn:",
    "Explain gravity to a child.",
    "The quick brown fox",
    "Name a planet with rings.",
    "Once upon a time",
)
#: Prompts whose first-token distribution is checked (with both endpoints).
CHECKED_PROMPTS = PROMPTS[:6]
STOP_STRINGS = (["\n"], [".", "!"], ["\n\n", " and"], ["the"])
PRESET_NAMES = (
    "default",
    "sampler",
    "math",
    "code",
    "qwen-math",
    "physics",
    "scicode",
    "adaptive-temperature",
)

#: Invalid settings and the name the 400's message must carry.
INVALID = (
    ({"em_inf": {"threshold": -1}}, "'threshold'"),
    ({"em_inf": {"lr": 0}}, "'lr'"),
    ({"em_inf": {"steps": 101}}, "'steps'"),
    ({"em_inf": {"steps": 2.5}}, "'steps'"),
    ({"em_inf": {"kl_weight": 1e4}}, "'kl_weight'"),
    ({"em_inf": {"t_min": 2.0, "t_max": 1.0}}, "'t_min'"),
    ({"em_inf": {"alpha": 0}}, "'alpha'"),
    ({"em_inf": {"stepz": 3}}, "stepz"),
    ({"em_inf": {"preset": "nope"}}, "preset"),
    ({"em_inf": "maybe"}, "'em_inf'"),
    ({"vllm_xargs": {"em_inf_lr": "fast"}}, "em_inf_lr"),
    ({"em_inf": False, "vllm_xargs": {"em_inf_lr": 0.2}}, "turned off"),
    ({"em_inf": {"lr": math.nan}}, "'lr'"),  # JSON NaN: sent with httpx
    ({"em_inf": {"t_max": math.inf}}, "'t_max'"),  # JSON Infinity: httpx
)


# ----------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Planned:
    """One request of the run, fixed before it starts."""

    index: int
    endpoint: str  # "chat" | "completion"
    prompt: str
    stream: bool
    extra: dict[str, Any]  # body fields beyond the standard ones
    n: int = 1
    temperature: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    max_tokens: int = 8
    full_distribution: bool = False  # ask for every token's first logprob
    reference: bool = False  # EM-INF off and full distribution: a raw row
    expect_error: str | None = None  # invalid: the 400 must name this

    @property
    def kind(self) -> str:
        if self.expect_error is not None:
            return "invalid"
        if self.reference:
            return "reference"
        if self.full_distribution:
            return "checked"
        return "plain"


def random_settings(rng: random.Random, *, realistic: bool) -> Any:
    """A valid ``em_inf`` field: ``None`` (absent: server defaults), ``False``, a
    preset (sometimes with an override) or random settings of either mode.
    ``realistic=False`` also draws the edges of the accepted ranges."""
    roll = rng.random()
    if roll < 0.15:
        return None
    if roll < 0.3:
        return False
    if roll < 0.55:
        settings: dict[str, Any] = {"preset": rng.choice(PRESET_NAMES)}
        if rng.random() < 0.3:
            settings["threshold"] = round(rng.uniform(0.0, 2.0), 3)
        return settings
    if not realistic and rng.random() < 0.1:
        return rng.choice(
            [
                {"threshold": 0.0, "kl_weight": 1e3, "lr": 1e2, "steps": 100},
                {"threshold": 0.0, "kl_weight": 0.0, "lr": 1e2, "steps": 20},
                {"mode": "temperature", "threshold": 0.0, "t_min": 1e-4, "t_max": 1e-4},
                {"mode": "temperature", "alpha": 1e-6, "t_min": 1e4, "t_max": 1e4},
            ]
        )
    if roll < 0.8:
        return {
            "threshold": rng.choice([0.0, round(rng.uniform(0.0, 3.0), 3)]),
            "kl_weight": round(rng.uniform(0.0, 0.2), 4),
            "lr": round(rng.uniform(0.01, 0.5), 3),
            "steps": rng.randint(0, 6),
        }
    t_min = round(rng.uniform(0.01, 0.5), 3)
    return {
        "mode": "temperature",
        "threshold": round(rng.uniform(0.0, 1.0), 3),
        "alpha": round(rng.uniform(0.3, 1.0), 3),
        "t_min": t_min,
        "t_max": round(rng.uniform(t_min, 2.0), 3),
    }


def make_plan(requests: int, seed: int) -> list[Planned]:
    """``requests`` requests: first one reference per checked prompt and endpoint,
    then the mix (about 10% invalid, 11% checked, 6% more references)."""
    rng = random.Random(seed)
    keys = [(e, p) for p in CHECKED_PROMPTS for e in ("completion", "chat")]
    plan: list[Planned] = []

    def add(**fields: Any) -> None:
        plan.append(Planned(index=len(plan), **fields))

    for endpoint, prompt in keys[: max(0, requests)]:
        add(
            endpoint=endpoint,
            prompt=prompt,
            stream=False,
            extra={"em_inf": False},
            max_tokens=1,
            full_distribution=True,
            reference=True,
        )
    while len(plan) < requests:
        roll = rng.random()
        endpoint = rng.choice(["chat", "completion"])
        stream = rng.random() < 0.4
        if roll < 0.10:
            body, named = rng.choice(INVALID)
            add(
                endpoint=endpoint,
                prompt=rng.choice(PROMPTS),
                stream=stream,
                extra=dict(body),
                expect_error=named,
            )
        elif roll < 0.16:
            endpoint, prompt = rng.choice(keys)
            add(
                endpoint=endpoint,
                prompt=prompt,
                stream=stream,
                extra={"em_inf": False},
                max_tokens=1,
                full_distribution=True,
                reference=True,
            )
        elif roll < 0.27:
            endpoint, prompt = rng.choice(keys)
            settings = random_settings(rng, realistic=True)
            while settings is False:
                settings = random_settings(rng, realistic=True)
            add(
                endpoint=endpoint,
                prompt=prompt,
                stream=stream,
                extra={} if settings is None else {"em_inf": settings},
                temperature=rng.choice([0.0, 0.0, 0.7, 1.0]),
                seed=rng.randrange(2**31),
                max_tokens=rng.randint(1, 4),
                full_distribution=True,
            )
        else:
            settings = random_settings(rng, realistic=False)
            extra: dict[str, Any] = {} if settings is None else {"em_inf": settings}
            if rng.random() < 0.3:
                extra["ignore_eos"] = True
            temperature = rng.choice([0.0, 0.7, 1.0])
            add(
                endpoint=endpoint,
                prompt=rng.choice(PROMPTS),
                stream=stream,
                extra=extra,
                n=rng.choice([1, 1, 1, 1, 2, 3]) if temperature else 1,
                temperature=temperature,
                seed=rng.randrange(2**31) if rng.random() < 0.5 else None,
                stop=rng.choice(STOP_STRINGS) if rng.random() < 0.25 else None,
                max_tokens=rng.randint(2, 16),
            )
    return plan[:requests]


# ------------------------------------------------------------------ one request


@dataclasses.dataclass
class Outcome:
    """What one request got."""

    index: int
    kind: str
    endpoint: str
    stream: bool
    latency_s: float | None = None
    first_token_s: float | None = None
    completion_tokens: int = 0
    error: str | None = None  # unexpected: its class; None when as expected
    detail: str = ""
    # float32 [max token id + 1]: the processed logprob of every token (NaN: absent).
    first_row: Any = None
    done_at: float = 0.0


def _body(job: Planned, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": job.max_tokens,
        "temperature": job.temperature,
        "n": job.n,
        "stream": job.stream,
        **job.extra,
    }
    if job.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": job.prompt}]
    else:
        body["prompt"] = job.prompt
    if job.seed is not None:
        body["seed"] = job.seed
    if job.stop is not None:
        body["stop"] = job.stop
    if job.stream:
        body["stream_options"] = {"include_usage": True}
    if job.full_distribution:
        body["return_tokens_as_token_ids"] = True
        if job.endpoint == "chat":
            body.update(logprobs=True, top_logprobs=-1)
        else:
            body["logprobs"] = -1
    return body


def _token_id(token: str) -> int:
    return int(token.removeprefix("token_id:"))


def _dense_row(pairs: list[tuple[int, float]]) -> Any:
    """A float32 numpy row from ``(token id, logprob)`` pairs (NaN where absent):
    a few hundred KB per full-vocabulary response, not a dict of Python floats."""
    import numpy as np

    ids = np.fromiter((token for token, _ in pairs), dtype=np.int64, count=len(pairs))
    row = np.full(int(ids.max()) + 1 if len(ids) else 0, np.nan, dtype=np.float32)
    row[ids] = np.fromiter((lp for _, lp in pairs), dtype=np.float32, count=len(pairs))
    return row


def _first_row_from_chat(choice: Any) -> Any:
    entries = choice.logprobs.content[0].top_logprobs
    return _dense_row([(_token_id(e.token), e.logprob) for e in entries])


def _first_row_from_completion(choice: Any) -> Any:
    pairs = choice.logprobs.top_logprobs[0].items()
    return _dense_row([(_token_id(token), lp) for token, lp in pairs])


class BadResponse(Exception):
    """A 200 answer that breaks the API's promises (choices, finish, stop)."""


async def _send_openai(client: Any, job: Planned, model: str, out: Outcome) -> None:
    body = _body(job, model)
    standard = {
        k: body.pop(k)
        for k in list(body)
        if k
        in (
            "model",
            "max_tokens",
            "temperature",
            "n",
            "stream",
            "messages",
            "prompt",
            "seed",
            "stop",
            "stream_options",
            "logprobs",
            "top_logprobs",
        )
    }
    create = (
        client.chat.completions.create
        if job.endpoint == "chat"
        else client.completions.create
    )
    start = time.perf_counter()
    response = await create(**standard, extra_body=body)
    texts: dict[int, str] = {}
    finishes: dict[int, str | None] = {}
    first_row = None
    if job.stream:
        async for chunk in response:
            if out.first_token_s is None and chunk.choices:
                out.first_token_s = time.perf_counter() - start
            if chunk.usage is not None:
                out.completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                piece = (
                    choice.delta.content if job.endpoint == "chat" else choice.text
                ) or ""
                texts[choice.index] = texts.get(choice.index, "") + piece
                if choice.finish_reason is not None:
                    finishes[choice.index] = choice.finish_reason
                if job.full_distribution and first_row is None and choice.logprobs:
                    if job.endpoint == "chat" and choice.logprobs.content:
                        first_row = _first_row_from_chat(choice)
                    elif job.endpoint != "chat" and choice.logprobs.top_logprobs:
                        first_row = _first_row_from_completion(choice)
    else:
        if response.usage is not None:
            out.completion_tokens = response.usage.completion_tokens
        for choice in response.choices:
            texts[choice.index] = (
                choice.message.content if job.endpoint == "chat" else choice.text
            ) or ""
            finishes[choice.index] = choice.finish_reason
        if job.full_distribution:
            choice = response.choices[0]
            first_row = (
                _first_row_from_chat(choice)
                if job.endpoint == "chat"
                else _first_row_from_completion(choice)
            )
    out.latency_s = time.perf_counter() - start
    if sorted(finishes) != list(range(job.n)):
        raise BadResponse(f"choices {sorted(finishes)} for n={job.n}")
    if any(reason not in ("stop", "length") for reason in finishes.values()):
        raise BadResponse(f"finish reasons {finishes}")
    if job.stop:
        for index, text in texts.items():
            if any(s in text for s in job.stop):
                raise BadResponse(f"choice {index} holds a stop string: {text!r}")
    if job.full_distribution:
        if first_row is None:
            raise BadResponse("no first-token logprobs")
        out.first_row = first_row


async def _send_raw(http: Any, job: Planned, model: str, out: Outcome) -> None:
    """Bodies the openai client cannot send (NaN, Infinity): plain httpx."""
    path = "/v1/chat/completions" if job.endpoint == "chat" else "/v1/completions"
    content = json.dumps(_body(job, model))  # allow_nan: writes NaN / Infinity
    start = time.perf_counter()
    response = await http.post(
        path, content=content, headers={"content-type": "application/json"}
    )
    out.latency_s = time.perf_counter() - start
    if response.status_code != 400:
        raise BadResponse(f"HTTP {response.status_code} for an invalid body")
    message = response.json().get("error", {}).get("message", "")
    if job.expect_error not in message:
        raise BadResponse(f"400 without naming {job.expect_error}: {message!r}")


def _needs_raw(job: Planned) -> bool:
    text = json.dumps(job.extra)
    return "NaN" in text or "Infinity" in text


async def run_one(client: Any, http: Any, job: Planned, model: str) -> Outcome:
    """Send ``job``; classify anything unexpected in ``Outcome.error``."""
    import openai

    out = Outcome(job.index, job.kind, job.endpoint, job.stream)
    start = time.perf_counter()
    try:
        if _needs_raw(job):
            await _send_raw(http, job, model, out)
        else:
            await _send_openai(client, job, model, out)
            if job.expect_error is not None:
                out.error, out.detail = "invalid_accepted", json.dumps(job.extra)
    except openai.BadRequestError as error:
        out.latency_s = time.perf_counter() - start
        message = str(getattr(error, "message", error))
        if job.expect_error is None:
            out.error, out.detail = "http_400_unexpected", message[:300]
        elif job.expect_error not in message:
            out.error, out.detail = "http_400_unclear", message[:300]
    except openai.APITimeoutError:
        out.error = "timeout"
    except openai.APIConnectionError as error:
        out.error = "connection"
        out.detail = f"{error!r} caused by {error.__cause__!r}"[:300]
    except openai.APIStatusError as error:
        out.error = f"http_{error.status_code}"
        out.detail = str(error)[:300]
    except BadResponse as error:
        out.error, out.detail = "bad_response", str(error)[:300]
    except Exception as error:  # anything else is a finding too: keep its class
        out.error, out.detail = type(error).__name__, repr(error)[:300]
    out.done_at = time.monotonic()
    return out


async def drive(
    base_url: str,
    plan: list[Planned],
    *,
    concurrency: int,
    time_limit_s: float,
    request_timeout_s: float,
    progress: Any = None,
) -> tuple[list[Outcome], float]:
    """Send the plan from ``concurrency`` workers; returns outcomes and wall time.
    Requests not started before ``time_limit_s`` are not sent."""
    import httpx
    import openai

    # A fresh connection per request (loopback: a fraction of a millisecond). A
    # reused one races the server's keep-alive timeout (vLLM's
    # VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s, counted from when the server finished
    # sending): a client busy parsing full-vocabulary responses can send on a
    # connection the server is closing, and without retries that reads as a
    # connection error that is the client's own.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    client = openai.AsyncOpenAI(
        base_url=base_url + "/v1",
        api_key="unused",
        max_retries=0,
        timeout=request_timeout_s,
        http_client=httpx.AsyncClient(limits=limits, timeout=request_timeout_s),
    )
    http = httpx.AsyncClient(
        base_url=base_url, timeout=request_timeout_s, limits=limits
    )
    model = (await client.models.list()).data[0].id
    queue: asyncio.Queue[Planned] = asyncio.Queue()
    for job in plan:
        queue.put_nowait(job)
    outcomes: list[Outcome] = []
    start = time.monotonic()

    async def worker() -> None:
        while not queue.empty() and time.monotonic() - start < time_limit_s:
            job = queue.get_nowait()
            outcomes.append(await run_one(client, http, job, model))
            if progress is not None:
                progress(len(outcomes))

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
        await http.aclose()
    return sorted(outcomes, key=lambda o: o.index), time.monotonic() - start


# ---------------------------------------------------------------------- checking


def _row_tensor(row: Any, vocab: int) -> Any:
    """A first-token row as a float32 ``[vocab]`` tensor (NaN where absent)."""
    import torch

    out = torch.full((vocab,), math.nan, dtype=torch.float32)
    out[: len(row)] = torch.from_numpy(row)
    return out


def check_distributions(
    plan: list[Planned],
    outcomes: list[Outcome],
    defaults: dict[str, Any],
    enabled: bool,
    vocab: int,
) -> dict[str, Any]:
    """Every checked first-token row against the float64 oracle of its own settings
    (see the module docstring). Returns counts, the reference spread per prompt and
    the first failures."""
    from em_inf.config import EMInfConfig

    server = EMInfConfig(**defaults)
    by_index = {o.index: o for o in outcomes}
    references, reference_counts = _reference_rows(plan, by_index, vocab)
    counts = Counter()
    failures: list[str] = []
    for job in plan:
        out = by_index.get(job.index)
        if not job.full_distribution or out is None or out.first_row is None:
            continue
        actual = _row_tensor(out.first_row, vocab)
        refs = references.get((job.endpoint, job.prompt))
        _check_row(job, actual, refs, server, enabled, counts, failures)
    return {
        "counts": dict(counts),
        "reference_spread": _reference_spread(references, reference_counts),
        "failures": failures[:20],
    }


def _reference_rows(plan: list[Planned], by_index: dict[int, Outcome], vocab: int):
    """The reference rows of each ``(endpoint, prompt)``, identical ones once (they
    are bitwise identical when the raw logits do not depend on the batch): a dict
    of float32 ``[vocab]`` rows keyed by their bytes, and how many came back."""
    references: dict[tuple[str, str], dict[bytes, Any]] = {}
    reference_counts: Counter = Counter()
    for job in plan:
        out = by_index.get(job.index)
        if job.reference and out and out.error is None and out.first_row is not None:
            row = _row_tensor(out.first_row, vocab)
            key = (job.endpoint, job.prompt)
            references.setdefault(key, {}).setdefault(row.numpy().tobytes(), row)
            reference_counts[key] += 1
    return references, reference_counts


def _reference_spread(references, reference_counts) -> dict[str, dict]:
    """Per prompt: reference rows, distinct ones, their largest difference."""
    spread = {}
    for (endpoint, prompt), distinct in references.items():
        rows = list(distinct.values())
        worst = max(float((row - rows[0]).abs().nan_to_num(0.0).max()) for row in rows)
        spread[f"{endpoint}: {prompt}"] = {
            "rows": reference_counts[(endpoint, prompt)],
            "distinct_rows": len(rows),
            "max_abs_diff": worst,
        }
    return spread


def _check_row(
    job, actual, refs, server, enabled: bool, counts: Counter, failures: list
) -> None:
    """One request's first-token row (float32 ``[vocab]`` log-probabilities, NaN
    where none came back) against the oracle of its settings (the server's
    ``EMInfConfig`` updated by the request's ``em_inf`` field; ``enabled``: the
    server's default for requests without one) on each of its prompt's reference
    rows ``refs`` (``None``: none came back); the outcome counted in ``counts``, a
    failure described in ``failures``."""
    import torch

    from em_inf.reference import mismatch, settings_oracle

    if actual.isnan().any():
        counts["incomplete"] += 1
        failures.append(f"#{job.index}: not every token's logprob came back")
        return
    if refs is None:
        counts["no_reference"] += 1
        return
    field = job.extra.get("em_inf", enabled)
    config = (
        None if field is False else server if field is True else server.updated(field)
    )
    temperature = job.temperature if job.temperature > 0 else 1.0
    problems = []
    for reference in refs.values():
        expected = settings_oracle(reference.double()[None], config)[0]
        expected = torch.log_softmax(expected / temperature, -1)
        problem = mismatch(actual[None], expected[None])
        if problem is None:
            break
        problems.append(problem)
    else:
        counts["mismatch"] += 1
        failures.append(
            f"#{job.index} {job.endpoint} {job.prompt!r} T={job.temperature} "
            f"{json.dumps(job.extra)}: {problems[0]}"
        )
        return
    counts["references" if job.reference else "checked"] += 1
    if config is not None:
        first = next(iter(refs.values()))
        plain = torch.log_softmax(first.double() / temperature, -1)
        if mismatch(actual[None], plain[None]) is not None:
            counts["changed_by_em_inf"] += 1


# ------------------------------------------------------------------------ memory


def process_tree(pid: int) -> list[Any]:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def memory_of(pid: int) -> dict[str, Any]:
    """RSS and PSS (bytes) of ``pid`` and every process under it."""
    import psutil

    processes = []
    for proc in process_tree(pid):
        with contextlib.suppress(psutil.Error):
            info = proc.memory_full_info()
            processes.append(
                {
                    "pid": proc.pid,
                    "name": proc.name(),
                    "rss": info.rss,
                    "pss": getattr(info, "pss", None),
                }
            )
    return {
        "rss": sum(p["rss"] for p in processes),
        "pss": sum(p["pss"] or 0 for p in processes),
        "processes": processes,
    }


class MemorySampler:
    """Samples :func:`memory_of` every ``interval`` seconds in a thread, with the
    count of requests done at that moment."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid, self.interval = pid, interval
        self.done = 0
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._start = time.monotonic()

    def sample(self) -> dict[str, Any]:
        memory = memory_of(self.pid)
        entry = {
            "t_s": round(time.monotonic() - self._start, 2),
            "done": self.done,
            "rss": memory["rss"],
            "pss": memory["pss"],
        }
        self.samples.append(entry)
        return memory

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.sample()

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


def memory_growth(samples: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Growth of RSS (and PSS) after ``warmup`` requests, in percent: the median of
    the last tenth of the samples taken after the warm-up against the median of the
    first tenth (single samples swing by a few percent as large responses come and
    go)."""
    after = [s for s in samples if s["done"] >= warmup]
    if len(after) < 2:
        return {"warmup_requests": warmup, "note": "too few samples after warm-up"}
    window = max(1, len(after) // 10)
    first, last = after[:window], after[-window:]

    def growth(key: str) -> float:
        start = statistics.median(s[key] for s in first)
        return 100.0 * (statistics.median(s[key] for s in last) - start) / start

    return {
        "warmup_requests": warmup,
        "window_samples": window,
        "rss_after_warmup": statistics.median(s["rss"] for s in first),
        "rss_end": statistics.median(s["rss"] for s in last),
        "rss_max": max(s["rss"] for s in after),
        "rss_growth_pct": growth("rss"),
        "pss_growth_pct": growth("pss"),
    }


# ------------------------------------------------------------------------ report


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarize(outcomes: list[Outcome], wall_s: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.error is None and o.latency_s is not None]
    latencies = [o.latency_s for o in ok]
    by_kind: dict[str, Any] = {}
    for name, chosen in (
        ("all", ok),
        ("stream", [o for o in ok if o.stream]),
        ("non-stream", [o for o in ok if not o.stream]),
        ("invalid", [o for o in ok if o.kind == "invalid"]),
    ):
        values = [o.latency_s for o in chosen]
        by_kind[name] = {
            "count": len(values),
            "p50_s": percentile(values, 50),
            "p99_s": percentile(values, 99),
        }
    first = [o.first_token_s for o in ok if o.first_token_s is not None]
    # The first requests sent (plan order) beside the next ones: a first-request
    # cliff (anything built or compiled on first use) shows in "first_10".
    in_order = [o.latency_s for o in sorted(ok, key=lambda o: o.index)]
    cliff = {
        name: {
            "count": len(v),
            "p50_s": percentile(v, 50),
            "max_s": max(v, default=None),
        }
        for name, v in (("first_10", in_order[:10]), ("next_100", in_order[10:110]))
    }
    return {
        "requests_sent": len(outcomes),
        "requests_ok": len(ok),
        "wall_s": wall_s,
        "throughput_rps": len(outcomes) / wall_s if wall_s else None,
        "completion_tokens": sum(o.completion_tokens for o in ok),
        "tokens_per_s": sum(o.completion_tokens for o in ok) / wall_s
        if wall_s
        else None,
        "latency": by_kind,
        "stream_first_token": {
            "p50_s": percentile(first, 50),
            "p99_s": percentile(first, 99),
        },
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "first_requests": cliff,
        "kinds": dict(Counter(o.kind for o in outcomes)),
        "errors": dict(Counter(o.error for o in outcomes if o.error)),
        "error_examples": [
            f"#{o.index} {o.kind} {o.endpoint}: {o.error} {o.detail}"
            for o in outcomes
            if o.error
        ][:20],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    latencies = result["latencies_s"]
    for name, values in latencies.items():
        if values:
            ordered = sorted(values)
            axes[0].plot(
                ordered,
                [(i + 1) / len(ordered) for i in range(len(ordered))],
                label=f"{name} ({len(values)})",
            )
    axes[0].set_xscale("log")
    axes[0].set_xlabel("latency (s)")
    axes[0].set_ylabel("fraction of requests")
    axes[0].set_title("latency CDF")
    axes[0].legend()
    done = result["completions_over_time"]
    axes[1].plot([d[0] for d in done], [d[1] for d in done])
    axes[1].set_xlabel("time (s)")
    axes[1].set_ylabel("requests done")
    axes[1].set_title(f"throughput: {result['summary']['throughput_rps']:.2f} req/s")
    samples = result["memory"]["samples"]
    axes[2].plot(
        [s["done"] for s in samples], [s["rss"] / 2**20 for s in samples], label="RSS"
    )
    axes[2].plot(
        [s["done"] for s in samples], [s["pss"] / 2**20 for s in samples], label="PSS"
    )
    growth = result["memory"]["growth"]
    warmup = growth.get("warmup_requests")
    if warmup:
        axes[2].axvline(warmup, color="grey", linestyle=":", label="end of warm-up")
    axes[2].set_xlabel("requests done")
    axes[2].set_ylabel("server + engine memory (MiB)")
    idle = result["memory"]["idle_growth"]["rss_growth_pct"]
    axes[2].set_title(f"memory: RSS {idle:+.1f}% idle to idle after warm-up")
    axes[2].legend()
    plot_entropy(axes[3], result.get("em_inf_series"))
    fig.suptitle(
        f"em-inf serve under load: {result['args']['requests']} requests, "
        f"{result['args']['concurrency']} concurrent ({result['model']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_entropy(ax: Any, series: dict[str, Any] | None) -> None:
    """Rows per entropy bin before and after EM-INF, per mode, from what the
    server's /metrics gained during the run."""
    ax.set_xlabel("entropy bin (upper bound, nats)")
    ax.set_ylabel("share of the mode's rows")
    if not series or not any(m["rows"] for m in series.values()):
        ax.set_title("entropy: no EM-INF rows on /metrics")
        return
    titles = []
    for mode, figures in series.items():
        for name, style in (("entropy_before", ":"), ("entropy_after", "-")):
            histogram = figures[name]
            if not histogram["count"]:
                continue
            cumulative = [count for _, count in histogram["buckets"]]
            per_bin = [
                b - a for a, b in zip([0, *cumulative[:-1]], cumulative, strict=True)
            ]
            ax.plot(
                range(len(per_bin)),
                [n / histogram["count"] for n in per_bin],
                style,
                marker="o",
                label=f"{mode}, {name.removeprefix('entropy_')}",
            )
        means = [
            figures[name]["sum"] / figures[name]["count"]
            for name in ("entropy_before", "entropy_after")
            if figures[name]["count"]
        ]
        if len(means) == 2:
            titles.append(f"{mode} {means[0]:.2f} -> {means[1]:.2f}")
    bounds = [le for le, _ in next(iter(series.values()))["entropy_before"]["buckets"]]
    ax.set_xticks(range(len(bounds)))
    ax.set_xticklabels([f"{b:g}" for b in bounds], rotation=90, fontsize=7)
    ax.set_title("mean entropy (nats): " + ", ".join(titles))
    ax.legend(fontsize=8)


# -------------------------------------------------------------------------- main


def running_server_pid(base_url: str) -> int:
    """The pid of the server ``--server`` names (loopback only); exits otherwise."""
    try:
        return loopback_server_pid(base_url)
    except (ValueError, LookupError) as error:
        raise SystemExit(str(error)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", help="drive this running server (loopback URL)")
    parser.add_argument(
        "--model", help="model to serve (default: em-inf serve's default model)"
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--time-limit",
        type=float,
        default=3600.0,
        help="stop sending new requests after this many seconds",
    )
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="requests before memory growth is measured (default: 10%% of --requests)",
    )
    parser.add_argument("--memory-interval", type=float, default=5.0)
    parser.add_argument("--tag", default=None, help="output name: load_<tag>.json")
    parser.add_argument(
        "--results-dir", default=str(RESULTS), help="where load_<tag>.* go"
    )
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="extra em-inf serve argument (repeatable)",
    )
    return parser.parse_args(argv)


@dataclasses.dataclass
class LoadRun:
    """What one run against the server saw, before the checks."""

    base_url: str
    serve_command: str | None
    info: dict[str, Any]
    model: str
    outcomes: list[Outcome]
    wall_s: float
    memory_before: dict[str, Any]
    idle: list[dict[str, Any]]  # after the warm-up, at the end
    samples: list[dict[str, Any]]
    done_times: list[tuple[float, int]]
    preemptions: float
    running: float
    em_inf_series: dict[str, Any]  # what EM-INF's series on /metrics gained


def serve_args_of(args: argparse.Namespace) -> list[str]:
    """``em-inf serve`` arguments for a server this run starts."""
    return [
        *([args.model] if args.model else []),
        "--logprobs-mode",
        "processed_logprobs",
        "--max-logprobs",
        "-1",
        *[a for extra in args.serve_arg for a in shlex.split(extra)],
    ]


def run_load(
    args: argparse.Namespace, plan: list, warmup: int, log_path: Path
) -> LoadRun:
    """Start the server (or find ``--server``'s), drive the warm-up and the rest of
    ``plan`` with a quiet memory reading after each, and read its metrics."""
    with contextlib.ExitStack() as stack:
        if args.server:
            base_url, pid = args.server.rstrip("/"), running_server_pid(args.server)
            serve_command = None
        else:
            serve_args = serve_args_of(args)
            server = em_inf_server(serve_args, log_path, start_timeout_s=600.0)
            base_url, pid = stack.enter_context(server)
            serve_command = "em-inf serve " + shlex.join(serve_args)
        info = get_json(base_url + "/v1/em-inf")
        model = get_json(base_url + "/v1/models")["data"][0]["id"]
        series_before = em_inf_series(base_url)
        sampler = stack.enter_context(MemorySampler(pid, args.memory_interval))
        before = sampler.sample()
        print(
            f"sending {args.requests} requests from {args.concurrency} clients "
            f"to {base_url} ({model})",
            flush=True,
        )
        outcomes, wall, idle, done_times = drive_phases(
            args, base_url, (plan[:warmup], plan[warmup:]), sampler
        )
        return LoadRun(
            base_url=base_url,
            serve_command=serve_command,
            info=info,
            model=model,
            outcomes=outcomes,
            wall_s=wall,
            memory_before=before,
            idle=idle,
            samples=sampler.samples,
            done_times=done_times,
            preemptions=metric_total(base_url, "vllm:num_preemptions_total"),
            running=metric_total(base_url, "vllm:num_requests_running"),
            em_inf_series=series_gained(base_url, series_before),
        )


def em_inf_series(base_url: str) -> dict[str, Any]:
    """EM-INF's series on the server's /metrics (em_inf.metrics.snapshot's
    structure)."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as page:
        return em_inf_metrics.parse(page.read().decode())


def series_gained(base_url: str, before: dict[str, Any]) -> dict[str, Any]:
    """What EM-INF's series gained since ``before``, once they stop moving: the
    engine reports them once per ``VLLM_LOG_STATS_INTERVAL`` (10 s), the last
    interval when it has been idle that long."""
    deadline, last = time.monotonic() + SERIES_SETTLE_S, None
    while True:
        now = em_inf_series(base_url)
        if now == last or time.monotonic() > deadline:
            break
        last = now
        time.sleep(6.0)
    return em_inf_metrics.difference(now, before)


def drive_phases(
    args: argparse.Namespace, base_url: str, phases: tuple, sampler: MemorySampler
) -> tuple[list[Outcome], float, list[dict[str, Any]], list[tuple[float, int]]]:
    """Each phase's requests, then :data:`SETTLE_S` of quiet and a memory reading:
    the outcomes, the wall time, the idle readings and the completion curve."""
    done_times: list[tuple[float, int]] = []
    t0 = time.monotonic()

    def progress(count: int) -> None:
        sampler.done = count
        done_times.append((round(time.monotonic() - t0, 2), count))
        if count % max(1, args.requests // 20) == 0:
            print(f"  {count}/{args.requests} done", flush=True)

    outcomes, wall, idle = [], 0.0, []
    for phase in phases:
        already = len(outcomes)
        done, phase_wall = asyncio.run(
            drive(
                base_url,
                phase,
                concurrency=args.concurrency,
                time_limit_s=args.time_limit - wall,
                request_timeout_s=args.request_timeout,
                progress=lambda count, already=already: progress(already + count),
            )
        )
        outcomes += done
        wall += phase_wall
        time.sleep(SETTLE_S)
        idle.append(sampler.sample())
    return outcomes, wall, idle, done_times


def result_of(
    args: argparse.Namespace, run: LoadRun, warmup: int, started: dt.datetime, loadavg
) -> dict[str, Any]:
    """The run's JSON record, ``checks`` still to fill in."""
    import torch

    outcomes, idle = run.outcomes, run.idle
    vocab = max(
        (len(o.first_row) for o in outcomes if o.first_row is not None), default=0
    )
    return {
        "benchmark": "load",
        "started_utc": started.isoformat(timespec="seconds"),
        "args": vars(args),
        "server": args.server or run.serve_command,
        "model": run.model,
        "vocab": vocab,
        "em_inf_defaults": run.info["defaults"],
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "loadavg_start": loadavg[0],
            "loadavg_end": loadavg[1],
        },
        "summary": summarize(outcomes, run.wall_s),
        "checks": None,  # filled in below; the file is written before and after
        "engine": {
            "preemptions_total": run.preemptions,
            "requests_running_after": run.running,
        },
        "memory": {
            "before": run.memory_before,
            "after": idle[-1],
            "growth": memory_growth(run.samples, warmup),
            "idle_after_warmup": idle[0],
            "idle_end": idle[-1],
            "idle_growth": {
                f"{key}_growth_pct": 100.0 * (idle[1][key] / idle[0][key] - 1.0)
                for key in ("rss", "pss")
            },
            "samples": run.samples,
        },
        "latencies_s": {
            "stream": [
                o.latency_s
                for o in outcomes
                if o.error is None and o.stream and o.latency_s is not None
            ],
            "non-stream": [
                o.latency_s
                for o in outcomes
                if o.error is None and not o.stream and o.latency_s is not None
            ],
        },
        "completions_over_time": run.done_times,
        "em_inf_series": run.em_inf_series,
    }


def print_summary(result: dict[str, Any]) -> None:
    summary, counts = result["summary"], result["checks"]["counts"]
    print(
        json.dumps(
            {
                "requests": summary["requests_sent"],
                "unexpected_errors": summary["errors"],
                "p50_s": summary["latency_p50_s"],
                "p99_s": summary["latency_p99_s"],
                "throughput_rps": summary["throughput_rps"],
                "checks": counts,
                "memory_growth_under_load": result["memory"]["growth"].get(
                    "rss_growth_pct"
                ),
                "memory_growth_idle": result["memory"]["idle_growth"],
                "loadavg": [
                    result["machine"]["loadavg_start"],
                    result["machine"]["loadavg_end"],
                ],
            },
            indent=1,
        )
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"{args.requests}x{args.concurrency}"
    warmup = args.warmup if args.warmup is not None else args.requests // 10
    plan = make_plan(args.requests, args.seed)
    loadavg_start = list(os.getloadavg())
    started = dt.datetime.now(dt.UTC)
    run = run_load(args, plan, warmup, results / f"load_{tag}.server.log")
    loadavg = (loadavg_start, list(os.getloadavg()))
    result = result_of(args, run, warmup, started, loadavg)
    out_json = results / f"load_{tag}.json"
    out_json.write_text(json.dumps(result, indent=1))  # the run, before the checks
    info = run.info
    result["checks"] = check_distributions(
        plan,
        run.outcomes,
        info["defaults"],
        info["enabled_by_default"],
        result["vocab"],
    )
    out_json.write_text(json.dumps(result, indent=1))
    with contextlib.suppress(ImportError):
        plot(result, out_json.with_suffix(".png"))
    print_summary(result)
    print(f"wrote {out_json}")
    counts = result["checks"]["counts"]
    bad = (
        sum(result["summary"]["errors"].values())
        + counts.get("mismatch", 0)
        + counts.get("incomplete", 0)
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
