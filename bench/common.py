"""What the benchmarks share: their inputs, their clock and their record of the
machine. Imports only torch and numpy (``bench/gpu_check.py`` runs on the GPU
machine with torch, triton and numpy alone)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy
import torch


def make_logits(
    rows: int, vocab: int, *, seed: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Float32 ``[rows, vocab]`` logits from ``seed``: Gaussian, row ``i`` scaled by
    ``s_i`` in ``[2, 5]``, one token per row raised by up to 8 (so thresholds split
    a batch into rows EM-INF works on and rows already below them)."""
    generator = torch.Generator().manual_seed(seed)
    scale = 2 + 3 * torch.rand(rows, 1, generator=generator)
    logits = torch.randn(rows, vocab, generator=generator) * scale
    peaks = torch.randint(0, vocab, (rows,), generator=generator)
    logits[torch.arange(rows), peaks] += 8 * torch.rand(rows, generator=generator)
    return logits.to(device)


def time_call(fn: Callable[[], Any], cuda: bool) -> tuple[float, Any]:
    """Seconds one call of ``fn`` takes, and what it returned: on a GPU the work it
    queued, between two CUDA events; elsewhere the wall clock."""
    if not cuda:
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out
    begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    begin.record()
    out = fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3, out


def median_seconds(
    fn: Callable[[], Any], cuda: bool, reps: int, warmup: int, budget: float = 2.0
) -> float:
    """Median of :func:`time_call` over up to ``reps`` calls (at least 3; fewer than
    ``reps`` once they add up to ``budget`` seconds), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < reps and (
        len(times) < 3 or time.perf_counter() - started < budget
    ):
        times.append(time_call(fn, cuda)[0])
    return statistics.median(times)


def git_commit() -> str | None:
    """The checkout's commit (``None`` in a plain copy of the tree)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def environment(device: torch.device | str) -> dict[str, Any]:
    """The record every benchmark result carries: when, where, which versions and
    how busy the machine was."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(  # noqa: UP017 (3.10)
            timespec="seconds"
        ),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(device)
        if cuda
        else platform.processor() or platform.machine(),
        "sm_count": torch.cuda.get_device_properties(device).multi_processor_count
        if cuda
        else None,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def write_result(result: dict[str, Any], out: Path) -> None:
    """``result`` as indented JSON at ``out`` (its folder made); prints where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
