"""What a vLLM CPU engine keeps per distinct token count: its RSS against the
number of different step sizes it has run, at one or more oneDNN primitive-cache
capacities.

vLLM's CPU linear layers run through oneDNN (``onednn_mm``), which builds a
primitive for every new row count ``M`` (the tokens of a step) and keeps it in
oneDNN's process-wide primitive cache (1,024 primitives unless
``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` says otherwise). Under a server's mixed load
the step sizes keep changing, so the worker's memory grows until that cache is
full. This script shows it without a server and without em-inf: one in-process
engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), one prefill step of ``m`` tokens at
a time; the resident size (after ``malloc_trim``, so that freed heap does not
count) first over repeats of one ``m``, then over ``--distinct`` new values.

    python -m bench.onednn_cache                       # default cache, and 64
    python -m bench.onednn_cache --capacities default 256 --distinct 320

Each capacity runs in a process of its own (oneDNN reads the variable once).
Output: ``bench/results/onednn_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from em_inf.heap_trim import malloc_trim, resident_bytes
from em_inf.models import prepare_default_model
from em_inf.server.cpu_defaults import ONEDNN_CACHE_ENV

FIRST_M = 18  # the token count repeated first; the distinct ones follow it
SAMPLE_EVERY = 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default model)")
    parser.add_argument("--capacities", nargs="+", default=["default", "64"])
    parser.add_argument("--distinct", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    model = args.model or str(prepare_default_model())
    if args.one:
        print(json.dumps(probe(model, args.distinct, args.repeats)))
        return 0
    result = {
        "kind": "onednn_cache",
        "model": model,
        "loadavg_start": list(os.getloadavg()),
        "runs": [run_capacity(model, c, args) for c in args.capacities],
        "loadavg_end": list(os.getloadavg()),
    }
    out = args.out or Path(__file__).resolve().parent / "results" / "onednn_cache.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    for run in result["runs"]:
        print(
            f"capacity {run['capacity']}: +{run['growth_mib'][-1][1]} MiB after "
            f"{run['growth_mib'][-1][0]} new token counts, "
            f"{run['repeats_growth_mib']} MiB over {args.repeats} repeats of one; "
            f"{run['seconds_per_step']:.3f} s per step"
        )
    print(f"wrote {out}")
    return 0


def run_capacity(model: str, capacity: str, args: argparse.Namespace) -> dict:
    """:func:`probe` in a child process with the cache ``capacity`` (``default``:
    the variable unset)."""
    env = {k: v for k, v in os.environ.items() if k != ONEDNN_CACHE_ENV}
    if capacity != "default":
        env[ONEDNN_CACHE_ENV] = capacity
    command = [sys.executable, "-m", "bench.onednn_cache", "--one", "--model", model]
    command += ["--distinct", str(args.distinct), "--repeats", str(args.repeats)]
    child = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return {"capacity": capacity, **json.loads(child.stdout.strip().splitlines()[-1])}


def probe(model: str, distinct: int, repeats: int) -> dict:
    """RSS growth (MiB) over ``repeats`` steps of one token count, then over
    ``distinct`` new ones, sampled every :data:`SAMPLE_EVERY`."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, max_model_len=FIRST_M + distinct + 8)
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def step(m: int) -> None:  # one prefill step of m tokens
        prompt = {"prompt_token_ids": [100 + i for i in range(m)]}
        llm.generate([prompt], params, use_tqdm=False)

    step(FIRST_M)
    start = _trimmed_rss_mib()
    for _ in range(repeats):
        step(FIRST_M)
    repeats_growth = round(_trimmed_rss_mib() - start, 1)
    start, growth, seconds = _trimmed_rss_mib(), [], 0.0
    for count, m in enumerate(range(FIRST_M + 1, FIRST_M + 1 + distinct), start=1):
        began = time.perf_counter()
        step(m)
        seconds += time.perf_counter() - began
        if count % SAMPLE_EVERY == 0 or count == distinct:
            growth.append((count, round(_trimmed_rss_mib() - start, 1)))
    return {
        "repeats_growth_mib": repeats_growth,
        "growth_mib": growth,
        "seconds_per_step": seconds / distinct,
    }


def _trimmed_rss_mib() -> float:
    """This process's resident size after giving freed heap back (MiB)."""
    trim = malloc_trim()
    if trim is None:
        raise SystemExit("this probe needs glibc's malloc_trim")
    trim()
    return resident_bytes() / 2**20


if __name__ == "__main__":
    sys.exit(main())
