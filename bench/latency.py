"""Latency of the ways to apply EM-INF to one ``[B, V]`` batch of logits.

Implementations (all timed in one process on the same inputs, interleaved call by
call so that load from other processes hits them alike):

* ``reference``: the authors' per-row loop (:mod:`em_inf.reference`, autograd +
  ``torch.optim.Adam`` / bisection with their tolerance 0.1), float32, CPU.
* ``cpu``: :mod:`em_inf.functional` on CPU tensors with the compiled CPU kernels,
  called as a caller calls it: they are what CPU tensors get by default, so the call
  is timed alone (forced with ``EM_INF_BACKEND=cpu`` around each call only where the
  environment chose another backend; the variable's writes then count in its time).
* ``torch``: the same on the eager PyTorch path (``EM_INF_BACKEND=torch``: the
  fallback where the kernels cannot be compiled).
* ``floor``: the machine's floor for the batch: one compiled pass that takes ``exp``
  of every logit and sums each row (``em_inf.cpu_backend.exp_floor``). Every row of
  the results also gives its time in floors (``x_floor``).
* ``torch-cuda``: the eager path on CUDA tensors (GPU only), forced with
  ``EM_INF_BACKEND=torch``.
* ``triton``: :mod:`em_inf.functional` on CUDA tensors, which dispatches to the
  Triton kernels of :mod:`em_inf.kernels` (GPU only).
* with ``--counting``: ``cpu-kernel`` and ``cpu-kernel+counting``, the compiled
  kernels called directly (``em_inf.cpu_backend``, a copy of the logits into a
  preallocated buffer, then the call in place) with ``stats=None`` and with one
  mode's ``[counters.WIDTH]`` counters: the cost of counting (the entropy after,
  sums and bins) is their difference. ``--impls`` times only the implementations
  named (``floor`` always runs where the kernels do: the ``x_floor`` column).

``--breakdown`` adds where the compiled path's time goes, for B = 8 at the largest V:
a row left alone (the scan and the first statistics pass), then each Adam step (one
update and one statistics pass), and one temperature-solver pass, in ms and in
floors. The environment records the CPU model, the load average at start and end,
and the time the kernels' compile adds to an engine's start (cold, and cached).

Grid: B in {1, 8, 64}, V in {49,152 (SmolLM2), 151,936 (Qwen2.5)}; the logits mode
(preset ``default``: threshold 0.3, kl_weight 0.05, lr 0.1) at 3 and 5 steps, and the
adaptive-temperature mode (preset ``adaptive-temperature``). Inputs are Gaussian
logits with a per-row scale in [2, 5]: every row starts far above the threshold, so
every step runs (the worst case). The grid is swept three times (``--passes``) and each
cell pools its samples, so a burst of load from other processes hits only part of
them. Reported per cell: median, 20th and 80th percentile
of the call time, the speed-up over ``reference`` from the same run, the achieved
bandwidth against the floor of one read and one write of the logits
(``2 * B * V * 4`` bytes), the largest difference from the reference output, and
the median number of minor page faults the process took during a call (fresh pages
faulted in: a new result whose memory malloc gave back to the system; printed where
it is not 0).

Usage::

    python -m bench.latency --quick          # CPU, under a minute on 2 cores
    python -m bench.latency --breakdown      # CPU, full grid (3 passes), ~5 minutes
    python -m bench.latency --out bench/results/latency_gpu.json   # on a GPU box
    python -m bench.latency --counting --impls cpu-kernel cpu-kernel+counting \
        --vocab 151936 --steps 3 --threads 1      # the cost of counting, CPU

Writes JSON (``--out``) and a PNG next to it (``bench/plots.py`` redraws it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import common
from bench.common import make_logits, time_call
from em_inf import backend, counters, cpu_backend, cpu_build, functional, reference
from em_inf.config import PRESETS

VOCABS = (49_152, 151_936)
BATCHES = (1, 8, 64)
STEPS = (3, 5)


@dataclasses.dataclass(frozen=True)
class Case:
    """One cell of the grid: a mode (and step count) at one shape."""

    mode: str  # "logits" or "temperature"
    batch: int
    vocab: int
    steps: int | None  # logits mode only

    @property
    def label(self) -> str:
        steps = f", steps {self.steps}" if self.steps else ""
        return f"{self.mode}{steps}, B={self.batch}, V={self.vocab}"


def _logits_params(steps: int) -> dict:
    preset = PRESETS["default"]
    return {
        "threshold": preset.threshold,
        "kl_weight": preset.kl_weight,
        "lr": preset.lr,
        "steps": steps,
    }


def _temperature_params() -> dict:
    preset = PRESETS["adaptive-temperature"]
    return {
        "threshold": preset.threshold,
        "alpha": preset.alpha,
        "t_min": preset.t_min,
        "t_max": preset.t_max,
    }


def implementations(
    case: Case, logits: torch.Tensor, cuda: bool, counting: bool = False
) -> dict[str, Callable]:
    """Zero-argument callables, each computing the case's output from ``logits``
    (with ``counting``, also the kernels called directly without and with
    ``stats``)."""
    if case.mode == "logits":
        params = _logits_params(case.steps)

        def ref() -> torch.Tensor:
            return torch.stack([reference.em_inf_row(row, **params) for row in logits])

        def batched(x: torch.Tensor) -> torch.Tensor:
            return functional.em_inf(x, **params)
    else:
        params = _temperature_params()

        def ref() -> torch.Tensor:
            return torch.stack(
                [reference.adaptive_temperature_row(row, **params) for row in logits]
            )

        def batched(x: torch.Tensor) -> torch.Tensor:
            return functional.adaptive_temperature(x, **params)

    def forced(name: str, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with _forced_backend(name):
                return batched(x)

        return run

    impls: dict[str, Callable] = {"reference": ref}
    if cpu_backend.available():
        if backend.backend_for(logits.device) == "cpu":
            impls["cpu"] = lambda: batched(logits)
        else:
            impls["cpu"] = forced("cpu", logits)
    impls["torch"] = forced("torch", logits)
    if cpu_backend.available():
        impls["floor"] = lambda: cpu_backend.exp_floor(logits)
    if counting and cpu_backend.available():
        impls["cpu-kernel"] = _kernel_call(case, logits, None)
        stats = torch.zeros(counters.WIDTH, dtype=torch.int64)
        impls["cpu-kernel+counting"] = _kernel_call(case, logits, stats)
    if cuda:
        on_gpu = logits.cuda()
        impls["torch-cuda"] = forced("torch", on_gpu)
        impls["triton"] = lambda: batched(on_gpu)
    return impls


def kernel_entry(case: Case) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor]]:
    """The compiled kernels' entry point for ``case``'s mode and its per-row
    parameter columns (``[B, 1]``, the grid's settings)."""
    if case.mode == "logits":
        params = _logits_params(case.steps)
        dtypes = {"steps": torch.int64}
        process = cpu_backend.em_inf_
    else:
        params = _temperature_params()
        dtypes = {}
        process = cpu_backend.adaptive_temperature_
    columns = [
        torch.full((case.batch, 1), value, dtype=dtypes.get(name, torch.float32))
        for name, value in params.items()
    ]
    return process, columns


def _kernel_call(
    case: Case, logits: torch.Tensor, stats: torch.Tensor | None
) -> Callable[[], torch.Tensor]:
    """The compiled kernels on ``case`` called directly: ``logits`` copied into a
    buffer of its own, then processed there in place, counting into ``stats``."""
    work = torch.empty_like(logits)
    process, columns = kernel_entry(case)

    def run() -> torch.Tensor:
        work.copy_(logits)
        process(work, *columns, stats=stats)
        return work

    return run


@contextlib.contextmanager
def _forced_backend(name: str) -> Iterator[None]:
    """Force :mod:`em_inf.functional`'s backend (it reads the variable per call)."""
    previous = os.environ.get(backend.BACKEND_ENV)
    os.environ[backend.BACKEND_ENV] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ[backend.BACKEND_ENV]
        else:
            os.environ[backend.BACKEND_ENV] = previous


def _time_case(
    case: Case,
    repeats: int,
    cuda: bool,
    skip_reference: bool,
    min_seconds: float,
    max_repeats: int,
    counting: bool = False,
    only: list[str] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[int]], dict[str, torch.Tensor]]:
    """Seconds per call of every implementation on ``case``, the minor page faults
    the process took during each call, and the implementations' outputs.

    Rounds (one call of each implementation, in rotating order) run until there
    are ``repeats`` of them and the round time has added up to ``min_seconds``, or
    ``max_repeats`` rounds: cheap cells get many samples, costly ones few.
    """
    logits = make_logits(case.batch, case.vocab)
    impls = implementations(case, logits, cuda, counting)
    if skip_reference:
        impls.pop("reference")
    if only:
        impls = {k: v for k, v in impls.items() if k in only or k == "floor"}
    names = list(impls)
    outputs: dict[str, torch.Tensor] = {}
    for name in names:  # warm-up (and Triton compilation)
        _, outputs[name] = time_call(impls[name], cuda)
    times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    rep, spent = 0, 0.0
    while rep < max_repeats and (rep < repeats or spent < min_seconds):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            faults_before = _minor_faults()
            seconds, _ = time_call(impls[name], cuda)
            faults[name].append(_minor_faults() - faults_before)
            times[name].append(seconds)
            spent += seconds
        rep += 1
    return times, faults, outputs


def _minor_faults() -> int:
    """Minor page faults this process (all its threads) has taken so far: a fresh
    page faulted in and zeroed by the kernel, about 0.6 us each on the Xeon."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _rows(
    case: Case,
    times: dict[str, list[float]],
    faults: dict[str, list[int]],
    outputs: dict[str, torch.Tensor],
) -> list[dict]:
    """One result row per implementation of ``case``."""
    ref_median = statistics.median(times["reference"]) if "reference" in times else None
    floor = statistics.median(times["floor"]) if "floor" in times else None
    min_bytes = 2 * case.batch * case.vocab * 4
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        q20, q80 = (float(q) for q in np.quantile(samples, [0.2, 0.8]))
        diff = None
        if (
            "reference" in outputs
            and name not in ("reference", "floor")
            and case.mode == "logits"
        ):
            diff = float((outputs[name].cpu() - outputs["reference"]).abs().max())
        rows.append(
            {
                "mode": case.mode,
                "batch": case.batch,
                "vocab": case.vocab,
                "steps": case.steps,
                "impl": name,
                "device": "cuda" if name in ("torch-cuda", "triton") else "cpu",
                "median_ms": 1e3 * median,
                "min_ms": 1e3 * min(samples),
                "p20_ms": 1e3 * q20,
                "p80_ms": 1e3 * q80,
                "repeats": len(samples),
                "minor_faults_median": statistics.median(faults[name]),
                "speedup_vs_reference": ref_median / median if ref_median else None,
                "floor_ms": 1e3 * floor if floor else None,
                "x_floor": median / floor if floor else None,
                "achieved_GBps": min_bytes / median / 1e9,
                "max_abs_diff_vs_reference": diff,
            }
        )
    return rows


def measure_grid(
    cases: list[Case],
    *,
    repeats: int,
    cuda: bool,
    no_reference_above: int = 64,
    min_seconds: float = 0.0,
    max_repeats: int = 200,
    passes: int = 1,
    log: Callable[[str], None] | None = None,
    counting: bool = False,
    only: list[str] | None = None,
) -> list[dict]:
    """Time every case ``passes`` times over, the whole grid once per pass, and pool
    the samples: a burst of load from other processes then hits only part of a
    cell's samples instead of all of them. Each pass takes ``repeats / passes`` (at
    least 1) rounds and ``min_seconds / passes`` per cell."""
    times: dict[Case, dict[str, list[float]]] = {}
    faults: dict[Case, dict[str, list[int]]] = {}
    outputs: dict[Case, dict[str, torch.Tensor]] = {}
    for _ in range(passes):
        for case in cases:
            case_times, case_faults, case_outputs = _time_case(
                case,
                max(1, -(-repeats // passes)),
                cuda,
                case.batch > no_reference_above,
                min_seconds / passes,
                max(1, max_repeats // passes),
                counting,
                only,
            )
            outputs.setdefault(case, case_outputs)
            for name, samples in case_times.items():
                times.setdefault(case, {}).setdefault(name, []).extend(samples)
                faults.setdefault(case, {}).setdefault(name, []).extend(
                    case_faults[name]
                )
    rows = []
    for case in cases:
        case_rows = _rows(case, times[case], faults[case], outputs[case])
        rows += case_rows
        if log:
            log(
                f"{case.label:45s} "
                + "  ".join(
                    f"{r['impl']} {r['median_ms']:.2f} ms"
                    + (
                        f" ({r['speedup_vs_reference']:.1f}x)"
                        if r["impl"] not in ("reference", "floor")
                        and r["speedup_vs_reference"]
                        else ""
                    )
                    + (
                        f" [{r['minor_faults_median']:g} page faults]"
                        if r["minor_faults_median"]
                        else ""
                    )
                    for r in case_rows
                )
            )
    return rows


def measure(
    case: Case,
    repeats: int,
    cuda: bool,
    skip_reference: bool,
    min_seconds: float = 0.0,
    max_repeats: int = 200,
) -> list[dict]:
    """Time every implementation on one case; one row per implementation."""
    times, faults, outputs = _time_case(
        case, repeats, cuda, skip_reference, min_seconds, max_repeats
    )
    return _rows(case, times, faults, outputs)


def breakdown(batch: int, vocab: int, repeats: int = 30) -> dict:
    """Where the compiled path's time goes on a ``[batch, vocab]`` batch (in place,
    no copies; ms and floors, from the fastest of ``repeats`` interleaved calls,
    the least disturbed by other processes): a call that leaves every row alone
    (the scan and the first statistics pass), calls of 1, 2, 3 Adam steps
    (threshold 0: every row takes every step), and a temperature call divided by
    its solver passes."""
    logits = make_logits(batch, vocab)
    work = logits.clone()

    def column(value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.full((batch, 1), value, dtype=dtype)

    def logits_call(threshold: float, steps: int) -> Callable[[], None]:
        params = (column(threshold), column(0.05), column(0.1))
        return lambda: cpu_backend.em_inf_(work, *params, column(steps, torch.int64))

    preset = PRESETS["adaptive-temperature"]
    temperature_params = [
        column(v) for v in (preset.threshold, preset.alpha, preset.t_min, preset.t_max)
    ]
    stats = torch.zeros(counters.WIDTH, dtype=torch.int64)

    def temperature_call() -> None:
        work.copy_(logits)
        cpu_backend.adaptive_temperature_(work, *temperature_params, stats=stats)

    calls = {
        "floor": lambda: cpu_backend.exp_floor(logits),
        "copy": lambda: work.copy_(logits),
        "left_alone": logits_call(1e9, 3),
        **{f"steps_{n}": logits_call(0.0, n) for n in (1, 2, 3)},
        "temperature": temperature_call,
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):  # interleaved, like the grid
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    ms = {name: 1e3 * min(samples) for name, samples in times.items()}
    passes_per_row = float(stats[counters.WORK]) / (repeats * batch)
    floor = ms["floor"]
    parts = {
        "scan + first statistics pass (row left alone)": ms["left_alone"],
        "first Adam step (update)": ms["steps_1"] - ms["left_alone"],
        "each further step (statistics + update)": (ms["steps_3"] - ms["steps_1"]) / 2,
        "temperature: per solver pass (copy excluded)": (ms["temperature"] - ms["copy"])
        / passes_per_row,
    }
    return {
        "batch": batch,
        "vocab": vocab,
        "floor_ms": floor,
        "calls_ms": ms,
        "temperature_passes_per_row": passes_per_row,
        "parts_ms": parts,
        "parts_in_floors": {name: value / floor for name, value in parts.items()},
    }


def counting_overhead(rows: list[dict]) -> list[dict]:
    """Per cell, the kernels' median time without and with counting, and the
    difference in % of the time without."""
    cells: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = (row["mode"], row["steps"], row["batch"], row["vocab"])
        cells.setdefault(key, {})[row["impl"]] = row
    out = []
    for (mode, steps, batch, vocab), impls in cells.items():
        if "cpu-kernel" in impls and "cpu-kernel+counting" in impls:
            plain = impls["cpu-kernel"]["median_ms"]
            counted = impls["cpu-kernel+counting"]["median_ms"]
            out.append(
                {
                    "mode": mode,
                    "steps": steps,
                    "batch": batch,
                    "vocab": vocab,
                    "plain_ms": plain,
                    "counting_ms": counted,
                    "overhead_pct": 100 * (counted - plain) / plain,
                }
            )
    return out


def cpu_environment() -> dict:
    """The CPU (model, vector extensions), torch's thread count, and which CPU path
    em-inf takes here (``cpu``: the compiled kernels; ``torch``: eager, and why)."""
    description = cpu_build.cpu_description()
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in description.splitlines()
            if line.lower().startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    flags = description.split()
    return {
        "cpu_model": model,
        "cpu_vector_extensions": [
            f
            for f in ("avx2", "fma", "avx512f", "avx512bw", "asimd", "sve")
            if f in flags
        ],
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_backend": backend.backend_for("cpu"),
        "cpu_backend_unavailable": cpu_backend.unavailable_reason(),
        "cpu_kernels_march": os.environ.get(cpu_build.ARCH_ENV) or "native",
        "cpu_kernels_sqrt": "estimate"
        if cpu_build.SQRT_ESTIMATE_FLAG in cpu_build.flag_sets(description)[0]
        else "divider",
        "cpu_kernels_lanes": cpu_backend.vector_lanes()
        if cpu_backend.available()
        else None,
    }


def kernel_build_seconds() -> dict[str, float] | None:
    """What compiling the CPU kernels adds to an engine's start: a cold build (an
    empty cache) and a cached one (the cache found), in seconds."""
    previous = os.environ.get("EM_INF_CACHE")
    try:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["EM_INF_CACHE"] = cache
            cold = cpu_build.build()
            cached = cpu_build.build()
    except cpu_build.BuildError:
        return None
    finally:
        if previous is None:
            os.environ.pop("EM_INF_CACHE", None)
        else:
            os.environ["EM_INF_CACHE"] = previous
    return {"cold": round(cold.seconds, 3), "cached": round(cached.seconds, 4)}


def environment(cuda: bool) -> dict:
    return {
        **common.environment("cuda" if cuda else "cpu"),
        **cpu_environment(),
        "cpu_kernels_build_s": kernel_build_seconds(),
    }


def probe_record(
    module: str,
    argv: list[str] | None,
    load_before: tuple[float, float, float],
    rows: list[dict],
    **fields: Any,
) -> dict:
    """What a probe of the CPU kernels (``bench.kernel_ab``, ``bench.idle_gap``,
    ``bench.scratch_placement``) writes: the command (``python -m MODULE ...``),
    its own ``fields``, the load average before and after, the machine, its
    ``rows``."""
    return {
        "command": " ".join([f"python -m {module}", *(argv or sys.argv[1:])]),
        **fields,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "environment": environment(cuda=False),
        "rows": rows,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("logits", "temperature"),
        default=["logits", "temperature"],
    )
    parser.add_argument("--repeats", type=int, default=7, help="least timed rounds")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=2.0,
        help="keep timing a cell until its rounds add up to this (at most 200)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="B in {1, 8}, 3 repeats: a CPU smoke run of about two minutes",
    )
    parser.add_argument(
        "--no-reference-above",
        type=int,
        default=64,
        help="skip the per-row reference loop for B above this (it is slow)",
    )
    parser.add_argument(
        "--passes",
        type=int,
        default=3,
        help="sweeps over the whole grid; each cell's samples are pooled",
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds, discarded")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads first (default: torch's; 1 gives steadier "
        "figures on a machine busy with other work)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the compiled path's passes (B = 8, the largest V)",
    )
    parser.add_argument(
        "--counting",
        action="store_true",
        help="also time the compiled kernels called directly with stats=None and "
        "with stats (cpu-kernel, cpu-kernel+counting): the cost of counting",
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        help="time only these implementations (and floor)",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch = [b for b in args.batch if b <= 8] or [1, 8]
        args.repeats = min(args.repeats, 3)
        args.min_seconds = min(args.min_seconds, 0.5)
        args.passes = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "auto" and torch.cuda.is_available()
    out = args.out or Path(__file__).resolve().parent / "results" / (
        "latency_gpu.json" if cuda else "latency_cpu.json"
    )
    started = time.time()
    loadavg_start = list(os.getloadavg())
    _print_machine(loadavg_start)
    # Warm-up, discarded: the process's first seconds of torch work run slow (thread
    # pools, allocator, page faults), which would land on the first cell alone.
    measure(Case("logits", 8, 49_152, 3), 1, cuda, False, min_seconds=args.warmup)
    rows = measure_grid(
        _cases(args),
        repeats=args.repeats,
        cuda=cuda,
        no_reference_above=args.no_reference_above,
        min_seconds=args.min_seconds,
        passes=args.passes,
        log=lambda line: print(line, flush=True),
        counting=args.counting,
        only=args.impls,
    )
    result = {
        "kind": "latency",
        "command": "python -m bench.latency "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "started_utc": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(),
        "seconds": round(time.time() - started, 1),
        "environment": {**environment(cuda), "loadavg_start": loadavg_start},
        "params": {
            "logits": _logits_params(0) | {"steps": args.steps},
            "temperature": _temperature_params(),
            "inputs": "Gaussian logits, per-row scale uniform in [2, 5], seed 0",
        },
        "rows": rows,
    }
    if args.counting:
        result["counting_overhead"] = _counting_overhead(rows)
    if args.breakdown and cpu_backend.available():
        result["breakdown"] = _breakdown(8, max(args.vocab))
    result["environment"]["loadavg_end"] = list(os.getloadavg())
    _write(result, out, plot=not args.no_plot)
    return 0


def _cases(args: argparse.Namespace) -> list[Case]:
    """The grid's cells: every mode x vocabulary x batch (x steps, logits mode)."""
    return [
        Case(mode, batch, vocab, steps)
        for mode in args.modes
        for vocab in args.vocab
        for batch in args.batch
        for steps in (args.steps if mode == "logits" else [None])
    ]


def _print_machine(loadavg: list[float]) -> None:
    cpu = cpu_environment()
    print(
        f"CPU {cpu['cpu_model']} ({', '.join(cpu['cpu_vector_extensions'])}), "
        f"{cpu['torch_threads']} threads; kernels -march={cpu['cpu_kernels_march']}, "
        f"{cpu['cpu_kernels_lanes']} lanes, square root by the "
        f"{cpu['cpu_kernels_sqrt']}; load average {loadavg}",
        flush=True,
    )


def _counting_overhead(rows: list[dict]) -> list[dict]:
    """:func:`counting_overhead` of the grid, printed."""
    overhead = counting_overhead(rows)
    for row in overhead:
        print(
            f"counting: {row['mode']:11s} steps {row['steps']!s:4s} "
            f"B={row['batch']:<3d} V={row['vocab']}: "
            f"{row['plain_ms']:.3f} -> {row['counting_ms']:.3f} ms "
            f"({row['overhead_pct']:+.2f}%)"
        )
    return overhead


def _breakdown(batch: int, vocab: int) -> dict:
    """:func:`breakdown` at ``[batch, vocab]``, printed."""
    parts = breakdown(batch, vocab)
    for name, value in parts["parts_ms"].items():
        floors = parts["parts_in_floors"][name]
        print(f"breakdown: {name:48s} {value:7.3f} ms  {floors:5.2f} floors")
    return parts


def _write(result: dict, out: Path, plot: bool) -> None:
    """``result`` as JSON at ``out``, and its plot next to it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    if not plot:
        return
    try:
        from bench.plots import plot_latency
    except ImportError as error:  # e.g. no matplotlib on a bare GPU box
        print(f"no plot ({error}); redraw with: python -m bench.plots {out}")
        return
    png = out.with_suffix(".png")
    plot_latency(result, png)
    print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
