"""End-to-end cost of EM-INF in vLLM: decode throughput and per-token latency of ONE
engine serving requests with EM-INF on and off (a per-request switch).

For each model, one ``vllm.LLM(model, logits_processors=[EMInf])`` is started; for
each batch size B, B distinct chat prompts are generated with ``ignore_eos=True`` and
a fixed ``max_tokens`` at temperature 0.1, once with ``extra_args={"em_inf": {...}}``
(default ``{"preset": "math"}``) and once with ``{"em_inf": False}``. On and off
alternate (on, off, off, on, on, ...) so that drifting load from other processes hits
both alike.

Per run, from vLLM's per-request timestamps (``disable_log_stats=False``): each
request's decode rate = (tokens - 1) / (last token - first token); inter-token
latency = the median request's 1 / rate; decode throughput = the sum of the
requests' rates (for a batch decoding in step, its tokens per second; one span from
the earliest first token to the latest last one would also count the prefill of
the requests admitted later, which moved it by up to 26% from run to run). Wall
time of the whole ``generate`` call is kept too. The on/off throughput ratio is
the median of the repeats' ratios, each between an on run and the off run beside
it, with a 95% interval for that median from the repeats' order statistics (the
sign test's: distribution-free, it needs at least 6 repeats; with 60 it spans the
22nd to the 39th smallest ratio).

Each row also records the machine's floor for its ``[batch, vocab]`` logits (one
compiled exp pass, ``floor_ms``); the environment records the CPU model, which CPU
path em-inf takes (``cpu_backend``), the time the CPU kernels' compile adds to an
engine's start (cold and cached), the ``VLLM_CPU_*`` variables set (how vLLM's CPU
worker binds its threads, e.g. ``VLLM_CPU_OMP_THREADS_BIND=0-1`` for both cores of
a 2-core machine) and the load average at start and end.

Models: ``smollm2`` (SmolLM2-135M-Instruct, vocabulary 49,152, from
``em_inf.models.prepare_default_model()``), ``tiny`` (a 2-layer random Qwen2 with
Qwen2.5's 151,936 vocabulary, where the logits, not the model, dominate), or a path.

Usage::

    python -m bench.e2e --quick                       # ~5 minutes on 2 CPU cores
    python -m bench.e2e                               # batch 1, 8, 32; both models
    python -m bench.e2e --models /path/to/model --batch 8 --em-inf '{"lr": 0.05}'

Writes ``bench/results/e2e_<device>.json`` (``--out``) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

TOPICS = (
    "the water cycle",
    "how a bicycle works",
    "the history of paper",
    "volcanoes",
    "why the sky is blue",
    "honey bees",
    "the Roman roads",
    "how vaccines work",
    "black holes",
    "the printing press",
    "photosynthesis",
    "the Great Wall",
    "how bread rises",
    "electric motors",
    "coral reefs",
    "the first computers",
    "how rainbows form",
    "the Silk Road",
    "tides",
    "how airplanes fly",
    "the immune system",
    "glaciers",
    "the invention of the telephone",
    "deserts",
    "how magnets work",
    "the Moon landing",
    "earthquakes",
    "how plants drink water",
    "the number zero",
    "solar panels",
    "migrating birds",
    "the human heart",
)


def chat_prompts(tokenizer: Any, batch: int) -> list[dict[str, list[int]]]:
    """``batch`` distinct chat prompts, tokenized with the model's template."""
    prompts = []
    for i in range(batch):
        topic = TOPICS[i % len(TOPICS)]
        suffix = "" if i < len(TOPICS) else f" (version {i // len(TOPICS) + 1})"
        messages = [{"role": "user", "content": f"Explain {topic} in detail.{suffix}"}]
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        prompts.append(
            {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
        )
    return prompts


def run_metrics(outputs: list[Any], wall: float) -> dict[str, float]:
    """Decode throughput and latency of one ``generate`` call from its outputs."""
    itls, tokens = [], 0
    for output in outputs:
        stats = output.metrics
        generated = len(output.outputs[0].token_ids)
        tokens += generated
        if stats is None or generated < 2:
            continue
        itls.append((stats.last_token_ts - stats.first_token_ts) / (generated - 1))
    if itls:
        itl_ms = 1e3 * statistics.median(itls)
        rate = sum(1 / itl if itl > 0 else float("nan") for itl in itls)
    else:  # no per-request timestamps: fall back to wall time
        itl_ms = 1e3 * wall / max(1, tokens / len(outputs))
        rate = (tokens - len(outputs)) / wall
    return {
        "wall_s": wall,
        "generated_tokens": tokens,
        "decode_tokens_per_s": rate,
        "inter_token_latency_ms": itl_ms,
        "end_to_end_tokens_per_s": tokens / wall,
    }


def median_interval(
    values: list[float], confidence: float = 0.95
) -> tuple[float, float] | None:
    """A ``confidence`` interval for the median of the distribution ``values`` were
    drawn from, independently: ``(x_(k), x_(n+1-k))`` of the sorted values with the
    largest ``k`` such that ``P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2``
    (each value lies below the median with probability 1/2, whatever the
    distribution). ``None`` when ``n`` is too small for any ``k`` (below 6 at 95%)."""
    n, tail = len(values), (1 - confidence) / 2
    below, k = 0.0, 0  # below = P(Binomial(n, 1/2) < k + 1) as k grows
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if below > tail:
            break
        k += 1
    if k == 0:
        return None
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def _median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def start_engine(model: str, args: argparse.Namespace, device: str):
    """``vllm.LLM`` for ``model`` with EM-INF's processor and the run's engine
    arguments; returns it and the seconds it took to start."""
    import vllm

    from em_inf import EMInf

    engine_args: dict[str, Any] = {
        "max_model_len": args.max_model_len,
        "seed": 0,
        "disable_log_stats": False,
        "max_num_seqs": max(args.batch),
    }
    if device == "cpu":
        engine_args["gpu_memory_utilization"] = args.gpu_memory_utilization
        engine_args["kv_cache_memory_bytes"] = 1 << 30
    engine_args.update(json.loads(args.engine_args))
    started = time.time()
    llm = vllm.LLM(model=model, logits_processors=[EMInf], **engine_args)
    return llm, time.time() - started


def bench_model(
    model: str, label: str, args: argparse.Namespace, device: str
) -> list[dict[str, Any]]:
    """Start one engine for ``model`` and measure every batch size with it."""
    from vllm import SamplingParams

    llm, load_s = start_engine(model, args, device)
    tokenizer = llm.get_tokenizer()
    vocab = llm.llm_engine.model_config.get_vocab_size()
    em_inf_on = json.loads(args.em_inf)

    def generate(prompts: list, on: bool, max_tokens: int) -> dict[str, float]:
        params = SamplingParams(
            temperature=args.temperature,
            max_tokens=max_tokens,
            ignore_eos=True,
            extra_args={"em_inf": em_inf_on if on else False},
        )
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        lengths = {len(o.outputs[0].token_ids) for o in outputs}
        if lengths != {max_tokens}:
            raise RuntimeError(
                f"expected {max_tokens} tokens per request, got {lengths}"
            )
        return run_metrics(outputs, wall)

    warm = chat_prompts(tokenizer, min(8, max(args.batch)))
    for on in (True, False):  # warm-up: compilation, caches, first-call costs
        generate(warm, on, 8)
    rows = []
    for batch in args.batch:
        prompts = chat_prompts(tokenizer, batch)
        runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
        for rep in range(args.repeats):
            order = ("on", "off") if rep % 2 == 0 else ("off", "on")
            for which in order:
                runs[which].append(generate(prompts, which == "on", args.max_tokens))
        row = batch_row(runs, batch, vocab, label, model, args)
        row["engine_load_s"] = load_s
        rows.append(row)
    llm.llm_engine.engine_core.shutdown()  # before the next model's engine starts
    return rows


def batch_row(
    runs: dict[str, list[dict[str, float]]],
    batch: int,
    vocab: int,
    label: str,
    model: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One batch size's figures from its repeated runs with EM-INF on and off
    (medians, each repeat's on/off ratio, their median and its 95% interval);
    printed as one line."""
    on, off = _median_of(runs["on"]), _median_of(runs["off"])
    paired = [
        a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
        for a, b in zip(runs["on"], runs["off"], strict=True)
    ]
    interval = median_interval(paired)
    row = {
        "floor_ms": floor_ms(batch, vocab),
        "model": label,
        "model_path": model,
        "vocab": vocab,
        "batch": batch,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "on": on,
        "off": off,
        "throughput_ratio_on_off": statistics.median(paired),
        "throughput_ratio_interval_95": interval,
        "throughput_ratio_per_repeat": paired,
        "latency_ratio_on_off": on["inter_token_latency_ms"]
        / off["inter_token_latency_ms"],
        "runs": runs,
    }
    print(
        f"{label:12s} B={batch:3d}  off {off['decode_tokens_per_s']:7.1f} tok/s "
        f"{off['inter_token_latency_ms']:7.1f} ms/tok | on "
        f"{on['decode_tokens_per_s']:7.1f} tok/s "
        f"{on['inter_token_latency_ms']:7.1f} ms/tok | on/off throughput "
        f"{100 * row['throughput_ratio_on_off']:.1f}% "
        f"(median's 95% interval {_percent_range(interval)}, "
        f"repeats {_percent_range((min(paired), max(paired)))})",
        flush=True,
    )
    return row


def _percent_range(bounds: tuple[float, float] | None) -> str:
    if bounds is None:
        return "n/a"
    return f"{100 * bounds[0]:.1f}-{100 * bounds[1]:.1f}%"


def floor_ms(batch: int, vocab: int, repeats: int = 50) -> float | None:
    """The machine's floor for one step's logits: one compiled pass taking exp of
    every logit of a ``[batch, vocab]`` batch, the fastest of ``repeats`` (taken
    beside an idle engine, whose threads may still hold the cores; ``None`` where
    the CPU kernels are unavailable)."""
    import torch

    from em_inf import cpu_backend

    if not cpu_backend.available():
        return None
    logits = torch.randn(batch, vocab)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        cpu_backend.exp_floor(logits)
        times.append(time.perf_counter() - started)
    return 1e3 * min(times)


def resolve_model(name: str) -> tuple[str, str]:
    """(path, label) for ``smollm2``, ``tiny`` or a path / hub id."""
    from em_inf import models
    from em_inf_support.tiny_model import tiny_model_dir

    if name == "smollm2":
        return str(models.prepare_default_model()), "SmolLM2-135M"
    if name == "tiny":
        return str(tiny_model_dir(151_936)), "tiny-V151936"
    return name, Path(name.rstrip("/")).name or name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "tiny"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument(
        "--em-inf",
        default='{"preset": "math"}',
        help="JSON settings of the 'on' requests",
    )
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--engine-args", default="{}", help="JSON, more vllm.LLM args")
    parser.add_argument(
        "--quick", action="store_true", help="batch 1 and 8, 16 tokens, 2 repeats"
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch = [b for b in args.batch if b <= 8] or [1, 8]
        args.max_tokens = min(args.max_tokens, 16)
        args.repeats = min(args.repeats, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.time()
    loadavg_start = list(os.getloadavg())
    rows = []
    for name in args.models:  # one engine at a time
        path, label = resolve_model(name)
        rows += bench_model(path, label, args, device)
    import vllm

    from bench.latency import environment

    result = {
        "kind": "e2e",
        "command": "python -m bench.e2e "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "started_utc": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(),
        "seconds": round(time.time() - started, 1),
        "environment": {
            **environment(device == "cuda"),
            "vllm": vllm.__version__,
            # how vLLM's CPU worker binds its threads, where the caller set it
            "vllm_cpu_environment": {
                name: value
                for name, value in os.environ.items()
                if name.startswith("VLLM_CPU_")
            },
            "loadavg_start": loadavg_start,
            "loadavg_end": list(os.getloadavg()),
        },
        "em_inf_on": json.loads(args.em_inf),
        "temperature": args.temperature,
        "rows": rows,
    }
    out = args.out or Path(__file__).resolve().parent / "results" / f"e2e_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    if not args.no_plot:
        from bench.plots import plot_e2e

        plot_e2e(result, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
