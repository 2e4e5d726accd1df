"""Short soaks side by side: which memory allocator keeps ``em-inf serve`` flat.

Runs :mod:`bench.load`'s request plan (the same seed, so the same requests) against
one server per configuration, one after the other: glibc's malloc as it comes,
glibc with ``MALLOC_ARENA_MAX=2``, tcmalloc preloaded (``LD_PRELOAD``, as vLLM's
CPU installation guide says), and glibc with a fixed mmap threshold
(``MALLOC_MMAP_THRESHOLD_=131072``: large buffers always mmapped, so returned when
freed), each with em-inf's processor and without it
(``bench/serve_without_processor.py``), both with oneDNN's own primitive cache
(1,024), and em-inf serve as it ships (``idletrim``: every process returns its
freed heap after 5 s idle, em_inf/heap_trim.py, and oneDNN keeps em-inf serve's
bounded number of primitives, server/cpu_defaults.py), or as it ships but with
oneDNN's own cache (``onednn1024``). The variables are set in the environment
the server starts with, so the API server and every engine process it spawns
inherit them; each process's ``/proc/<pid>/environ`` and ``/proc/<pid>/maps`` are
read back to record what was in effect (``allocator_seen`` in the JSON).

For each configuration it reports, after the warm-up (``--warmup`` requests, then
:data:`bench.load.SETTLE_S` seconds of quiet):

* ``slope_mib_per_1000``: the least-squares slope of RSS against requests done,
  per process kind (``api_server``, ``engine_core``, ``worker``, ``total``), over
  the samples taken under load after the warm-up;
* ``idle_growth_pct``: RSS growth between the idle reading after the warm-up and
  the idle reading after the run;
* ``tokens_per_s``: completion tokens per second of the measured part;
* ``heap_trims``: the idle trims the server logged, how many and what they
  returned (``idletrim`` only);
* with ``--trim``, ``after_trim``: RSS after ``malloc_trim(0)`` in every server
  process (through gdb) at the end: what glibc kept of freed memory.

Usage::

    python -m bench.soak --requests 1000 --warmup 200 --concurrency 64
    python -m bench.soak --configs glibc tcmalloc --requests 1500 --tag quick
    python -m bench.soak --configs glibc+idletrim --requests 10000 --warmup 1000
    python -m bench.soak --configs glibc+idletrim glibc+onednn1024 --tag onednn

Writes ``bench/results/soak_<tag>.<config>.json`` (with every RSS sample) and the
server's log as each configuration finishes, then ``bench/results/soak_<tag>.json``
(all of them) and its ``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.load import (
    RESULTS,
    SETTLE_S,
    drive,
    make_plan,
    memory_of,
    summarize,
)
from em_inf.heap_trim import DEFAULT_IDLE_S, IDLE_ENV
from em_inf.server.cpu_defaults import ONEDNN_CACHE_ENV, ONEDNN_OWN_CAPACITY
from em_inf_support.servers import Server, em_inf_server, http_server

TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)
#: The allocator settings compared; each also tells em-inf serve to leave the
#: allocator alone (``EM_INF_ALLOCATOR=system``) so that only this one is in effect.
ALLOCATORS = ("glibc", "arena2", "tcmalloc", "mmap128k")
KINDS = ("api_server", "engine_core", "worker", "other")
REPO = Path(__file__).resolve().parents[1]


def tcmalloc_path() -> str | None:
    return next((p for p in TCMALLOC_PATHS if os.path.exists(p)), None)


def allocator_environment(allocator: str) -> dict[str, str | None]:
    """Variables to set (``None``: to remove) for ``allocator``."""
    env: dict[str, str | None] = {
        "EM_INF_ALLOCATOR": "system",
        "MALLOC_ARENA_MAX": None,
        "MALLOC_MMAP_THRESHOLD_": None,
        "LD_PRELOAD": None,
    }
    if allocator == "arena2":
        env["MALLOC_ARENA_MAX"] = "2"
    elif allocator == "mmap128k":  # a fixed mmap threshold: no dynamic raise
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    elif allocator == "tcmalloc":
        path = tcmalloc_path()
        if path is None:
            raise SystemExit("no tcmalloc: apt-get install libtcmalloc-minimal4")
        env["LD_PRELOAD"] = path
    return env


#: What each configuration's name after the allocator means: em-inf's processor
#: or not, and em-inf serve's idle heap trim (em_inf/heap_trim.py) or not.
#: ``onednn_cache``: ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` in the server's
#: environment (``None``: unset, em-inf serve's own default; :data:`ONEDNN_OWN`:
#: oneDNN's own, as vLLM's server runs).
ONEDNN_OWN = str(ONEDNN_OWN_CAPACITY)
VARIANTS = {
    "proc": {"processor": True, "heap_trim_idle_s": "0", "onednn_cache": ONEDNN_OWN},
    "noproc": {"processor": False, "heap_trim_idle_s": "0", "onednn_cache": ONEDNN_OWN},
    "idletrim": {
        "processor": True,
        "heap_trim_idle_s": f"{DEFAULT_IDLE_S:g}",
        "onednn_cache": None,
    },
    "onednn1024": {
        "processor": True,
        "heap_trim_idle_s": f"{DEFAULT_IDLE_S:g}",
        "onednn_cache": ONEDNN_OWN,
    },
}
TRIM_LINE = re.compile(
    r"\((\w+) pid=\d+\).* (\d\d:\d\d:\d\d) \[heap_trim\.py:\d+\] "
    r"heap trim \(pid (\d+)\): resident (\d+) -> (\d+) MiB in ([\d.]+) ms"
)


def heap_trims(log_path: Path, first_line: int = 0) -> dict[str, Any]:
    """The idle trims the server logged from ``first_line`` of its log on: how
    many, the MiB they returned (resident before minus after), the longest, and
    each process's resident MiB right after each trim (``floors``: what it holds
    once its freed heap is returned, against the time of day)."""
    lines = log_path.read_text(errors="replace").splitlines()[first_line:]
    found = [m for m in map(TRIM_LINE.search, lines) if m]
    returned = [int(m.group(4)) - int(m.group(5)) for m in found]
    took = [float(m.group(6)) for m in found]
    floors: dict[str, list[tuple[str, int]]] = {}
    for m in found:
        floors.setdefault(m.group(1), []).append((m.group(2), int(m.group(5))))
    return {
        "count": len(found),
        "returned_mib": sum(returned),
        "largest_returned_mib": max(returned, default=0),
        "longest_ms": max(took, default=0.0),
        "floors": floors,
    }


def kind_of(process: dict[str, Any], root: int) -> str:
    if process["pid"] == root:
        return "api_server"
    if "EngineCore" in process["name"]:
        return "engine_core"
    if "Worker" in process["name"]:
        return "worker"
    return "other"


def by_kind(memory: dict[str, Any], root: int) -> dict[str, int]:
    rss = dict.fromkeys(KINDS, 0)
    for process in memory["processes"]:
        rss[kind_of(process, root)] += process["rss"]
    rss["total"] = memory["rss"]
    return rss


def allocator_seen(pid: int) -> list[dict[str, Any]]:
    """What each process of the server runs with: ``MALLOC_ARENA_MAX`` and
    ``LD_PRELOAD`` from its environment, and whether tcmalloc is mapped."""
    import psutil

    seen = []
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(OSError, psutil.Error):
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
            env = dict(e.decode(errors="replace").partition("=")[::2] for e in environ)
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
            seen.append(
                {
                    "pid": proc.pid,
                    "name": proc.name(),
                    # vLLM renames its engine processes (setproctitle), which
                    # overwrites /proc/<pid>/environ: "unreadable" there.
                    "MALLOC_ARENA_MAX": env.get("MALLOC_ARENA_MAX")
                    if "PATH" in env
                    else "unreadable",
                    "LD_PRELOAD": env.get("LD_PRELOAD")
                    if "PATH" in env
                    else "unreadable",
                    "tcmalloc_mapped": "libtcmalloc" in maps,
                }
            )
    return seen


class Sampler:
    """RSS per process kind every ``interval`` seconds, with requests done."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid, self.interval = pid, interval
        self.done, self.phase = 0, "warmup"
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.monotonic()

    def sample(self, phase: str | None = None) -> dict[str, int]:
        rss = by_kind(memory_of(self.pid), self.pid)
        self.samples.append(
            {
                "t_s": round(time.monotonic() - self._t0, 2),
                "done": self.done,
                "phase": phase or self.phase,
                "rss": rss,
            }
        )
        return rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.sample()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


def slope_per_1000(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``y`` (bytes) against ``x`` (requests), in MiB per
    1,000 requests."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return sxy / sxx * 1000 / 2**20


def server(
    processor: bool, env_changes: dict[str, str | None], log_path: Path
) -> contextlib.AbstractContextManager[Server]:
    """The server of one configuration on loopback: ``em-inf serve``, or vLLM's
    without the processor (``bench/serve_without_processor.py``)."""
    args = ["--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1"]
    if processor:
        return em_inf_server(args, log_path, env_changes=env_changes)
    command = [sys.executable, str(REPO / "bench/serve_without_processor.py"), *args]
    return http_server(command, log_path, env_changes=env_changes)


def trim(pid: int) -> dict[str, Any]:
    """Ask glibc to give its free heap back to the system (``malloc_trim(0)``) in
    every process of the server, through gdb; returns each call's answer."""
    import psutil

    root = psutil.Process(pid)
    answers = {}
    for proc in [root, *root.children(recursive=True)]:
        done = subprocess.run(
            ["gdb", "-p", str(proc.pid), "-batch", "-nx",
             "-ex", "call (int) malloc_trim(0)"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        said = [line for line in done.stdout.splitlines() if line.startswith("$")]
        answers[proc.pid] = said[-1] if said else done.stderr.strip()[-200:]
    return answers


def run_phase(
    sampler: Sampler,
    base_url: str,
    phase: str,
    jobs: list,
    done_before: int,
    total: int,
    name: str,
    args: argparse.Namespace,
) -> tuple[list, float, dict[str, int]]:
    """Send ``jobs`` (the ``phase`` part of the plan), then let the server settle
    :data:`SETTLE_S` seconds; returns the outcomes, the wall seconds and the idle
    RSS reading after them."""
    sampler.phase = phase

    def progress(count: int) -> None:
        sampler.done = done_before + count
        if sampler.done % 100 == 0:
            print(f"  {name}: {sampler.done}/{total}", flush=True)

    outcomes, wall = asyncio.run(
        drive(
            base_url, jobs, concurrency=args.concurrency,
            time_limit_s=args.time_limit, request_timeout_s=300.0, progress=progress,
        )
    )  # fmt: skip
    sampler.phase = "settle"
    time.sleep(SETTLE_S)
    return outcomes, wall, sampler.sample(f"idle_after_{phase}")


def memory_figures(
    samples: list[dict], before: dict, idle0: dict, idle1: dict, trimmed: dict | None
) -> dict[str, Any]:
    """RSS figures per process kind (and total), in MiB: the slope under load
    after the warm-up, the growth from the idle reading after the warm-up to the
    one at the end, the readings themselves, and what ``--trim`` left."""
    under_load = [s for s in samples if s["phase"] == "load"]
    keys = [*KINDS, "total"]
    return {
        "slope_mib_per_1000": {
            k: slope_per_1000([(s["done"], s["rss"][k]) for s in under_load])
            for k in keys
        },
        "idle_growth_pct": {
            k: 100.0 * (idle1[k] / idle0[k] - 1.0) if idle0[k] else None for k in keys
        },
        "idle_growth_mib": {k: (idle1[k] - idle0[k]) / 2**20 for k in keys},
        "rss_mib": {
            "before": {k: before[k] / 2**20 for k in keys},
            "idle_after_warmup": {k: idle0[k] / 2**20 for k in keys},
            "idle_end": {k: idle1[k] / 2**20 for k in keys},
        },
        "after_trim": None
        if trimmed is None
        else {
            "answers": trimmed["answers"],
            "rss_mib": {k: trimmed["rss"][k] / 2**20 for k in keys},
            "growth_over_idle_after_warmup_mib": {
                k: (trimmed["rss"][k] - idle0[k]) / 2**20 for k in keys
            },
        },
    }


def config_path(args: argparse.Namespace, name: str, ending: str) -> Path:
    """One configuration's file of the run tagged ``args.tag``:
    ``bench/results/soak_<tag>.<config>[+trim]<ending>``."""
    return RESULTS / f"soak_{args.tag}.{name}{'+trim' if args.trim else ''}{ending}"


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    allocator, _, variant = name.partition("+")
    processor = VARIANTS[variant]["processor"]
    env_changes = allocator_environment(allocator)
    env_changes[IDLE_ENV] = VARIANTS[variant]["heap_trim_idle_s"]
    env_changes[ONEDNN_CACHE_ENV] = VARIANTS[variant]["onednn_cache"]
    plan = make_plan(args.requests, args.seed)
    load_start = os.getloadavg()
    log_path = config_path(args, name, ".server.log")
    with server(processor, env_changes, log_path) as (base_url, pid):
        seen = allocator_seen(pid)
        with Sampler(pid, args.memory_interval) as sampler:
            before = sampler.sample("before")
            warm = run_phase(
                sampler, base_url, "warmup", plan[: args.warmup], 0, len(plan),
                name, args,
            )  # fmt: skip
            measured_from = len(log_path.read_text(errors="replace").splitlines())
            outcomes, wall, idle1 = run_phase(
                sampler, base_url, "load", plan[args.warmup :], len(warm[0]),
                len(plan), name, args,
            )  # fmt: skip
            trimmed = None
            if args.trim:
                answers = trim(pid)
                time.sleep(2)
                trimmed = {"answers": answers, "rss": sampler.sample("after_trim")}
    result = {
        "config": name,
        "allocator": allocator,
        "processor": processor,
        "environment": env_changes,
        "allocator_seen": seen,
        "requests": len(plan),
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        **memory_figures(sampler.samples, before, warm[2], idle1, trimmed),
        "heap_trims": {
            "whole_run": heap_trims(log_path),
            "after_warmup_idle_reading": heap_trims(log_path, measured_from),
        },
        "tokens_per_s": summarize(outcomes, wall)["tokens_per_s"],
        "summary_measured": summarize(outcomes, wall),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "finished_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "samples": sampler.samples,
    }
    config_path(args, name, ".json").write_text(json.dumps(result, indent=1))
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| configuration | requests | slope MiB/1000: API / core / worker / total "
        "| idle-to-idle growth | tokens/s | load avg (start, end) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["slope_mib_per_1000"]
        lines.append(
            f"| {r['config']} | {r['requests']} ({r['warmup']} warm-up) | "
            + " / ".join(
                "-" if s[k] is None else f"{s[k]:+.0f}"
                for k in ("api_server", "engine_core", "worker", "total")
            )
            + f" | {r['idle_growth_pct']['total']:+.1f}% "
            f"({r['idle_growth_mib']['total']:+.0f} MiB) | "
            f"{r['tokens_per_s']:.1f} | "
            f"{r['loadavg_start'][0]:.1f}, {r['loadavg_end'][0]:.1f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(20, 5))
    names = [r["config"] for r in results]
    width = 0.2
    for i, kind in enumerate(("api_server", "engine_core", "worker", "total")):
        values = [r["slope_mib_per_1000"][kind] or 0.0 for r in results]
        axes[0].bar([x + (i - 1.5) * width for x in range(len(results))], values,
                    width, label=kind)  # fmt: skip
    axes[0].set_xticks(range(len(results)), names, rotation=20)
    axes[0].axhline(0, color="grey", linewidth=0.5)
    axes[0].set_ylabel("RSS slope after warm-up (MiB per 1,000 requests)")
    axes[0].set_title("growth under load, per process kind")
    axes[0].legend()
    for axis, kind in ((axes[1], "total"), (axes[2], "worker")):
        for r in results:
            points = [s for s in r["samples"] if s["phase"] in ("warmup", "load")]
            done = [s["done"] for s in points]
            rss = [s["rss"][kind] / 2**20 for s in points]
            axis.plot(done, rss, label=r["config"])
        if results:
            axis.axvline(results[0]["warmup"], color="grey", linestyle=":")
        axis.set_xlabel("requests done")
        axis.set_ylabel(f"RSS, {kind} (MiB)")
        axis.set_title(f"{kind} RSS vs requests done (dotted: end of warm-up)")
        axis.legend(fontsize=8)
    fig.suptitle(
        f"SmolLM2-135M, {results[0]['concurrency']} concurrent clients, "
        f"{results[0]['requests']} requests: " + ", ".join(names)
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    everything = [f"{a}+{v}" for v in VARIANTS for a in ALLOCATORS]
    parser.add_argument(
        "--configs", nargs="+", default=everything,
        help=f"from {everything}; 'glibc' means 'glibc+proc'. proc: em-inf serve "
        "with --em-inf-heap-trim 0; noproc: vLLM alone (heap trim 0 too), both "
        "with oneDNN's own primitive cache; idletrim: em-inf serve's defaults (the "
        "idle heap trim on, oneDNN's cache bounded); onednn1024: those defaults "
        "but oneDNN's own cache",
    )  # fmt: skip
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-interval", type=float, default=5.0)
    parser.add_argument("--time-limit", type=float, default=3600.0)
    parser.add_argument("--tag", default="allocators")
    parser.add_argument(
        "--trim", action="store_true",
        help="at the end, malloc_trim(0) in every server process (gdb) and read "
        "RSS again: freed heap kept by malloc, or memory still in use",
    )  # fmt: skip
    parser.add_argument(
        "--combine", action="store_true",
        help="only combine the soak_<config>.json files already written",
    )  # fmt: skip
    args = parser.parse_args(argv)
    names = [c if "+" in c else c + "+proc" for c in args.configs]
    results = []
    for name in names:
        path = config_path(args, name, ".json")
        if args.combine:
            if path.exists():
                results.append(json.loads(path.read_text()))
            continue
        print(f"{name}: {args.requests} requests, uptime load {os.getloadavg()}")
        results.append(run_config(name, args))
        print(table(results[-1:]), flush=True)
    out = RESULTS / f"soak_{args.tag}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "soak",
                "table": table(results),
                "results": [
                    {k: v for k, v in r.items() if k != "samples"} for r in results
                ],
            },
            indent=1,
        )
    )
    with contextlib.suppress(ImportError):
        plot(results, out.with_suffix(".png"))
    print(table(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
