"""Does where a batch of logits lies in memory change how fast the CPU kernels run?

The logits mode streams each row of logits beside five rows of its own scratch
(``em_inf/cpu_kernels.c``: the copy kept for the fail-safe, ``p0``, ``e`` and Adam's
``m`` and ``v``). Their addresses modulo 4 KiB decide how fast the passes run, and
the caller chooses where the logits lie. This script moves one ``[B, V]`` batch
through a 4 KiB page, 64 bytes at a time (the tensor starts ``k * 64`` bytes after
a page boundary, ``k = 0 .. 63``), and times the logits mode (3 steps, the grid's
settings) at each start on ``--threads`` threads (1 by default: vLLM's CPU worker
runs the kernels on one).

With ``--base``, a second build (another ``cpu_kernels.c``, compiled with the same
compiler and flags) runs at every start too, interleaved with the shipped one:
``git show 1b02bb3:em_inf/cpu_kernels.c > /tmp/before.c`` gives the kernels from
before their scratch was placed against each row.

Per build and vocabulary: the median call at each start, the fastest and slowest
start, and the starts at least 10% slower than the median start (the calls of one
start vary by about 5% on a quiet 2-core VM). Writes
``bench/results/scratch_placement.json`` (``--out``) and a PNG beside it.

Usage::

    python -m bench.scratch_placement --base /tmp/before.c    # about 30 seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from bench.common import make_logits, write_result
from bench.latency import Case, kernel_entry, probe_record
from em_inf import cpu_backend, cpu_build

RESULTS = Path(__file__).with_name("results")
PAGE = 4096
STEP = 64  # bytes between two starts
SLOW = 1.10  # a start this much slower than the median start is reported


def starts() -> list[int]:
    """The starts measured, in bytes after a page boundary."""
    return list(range(0, PAGE, STEP))


def batch_at(buffer: torch.Tensor, start: int, logits: torch.Tensor) -> torch.Tensor:
    """A ``[B, V]`` view of float32 ``buffer`` (page-aligned storage, at least
    ``logits.numel() + PAGE / 4`` floats) starting ``start`` bytes in."""
    offset = start // 4
    return buffer[offset : offset + logits.numel()].view(logits.shape)


def page_aligned_floats(count: int) -> torch.Tensor:
    """A float32 ``[count]`` view whose first element lies on a 4 KiB boundary."""
    storage = torch.empty(count + PAGE // 4, dtype=torch.float32)
    skip = (-storage.data_ptr()) % PAGE // 4
    return storage[skip : skip + count]


def measure_vocab(
    vocab: int, batch: int, steps: int, libraries: dict, rounds: int, seed: int
) -> list[dict]:
    """Every build at every start, ``rounds`` calls each: which start goes first
    rotates from round to round and the builds alternate. One row per build."""
    case = Case("logits", batch, vocab, steps)
    logits = make_logits(batch, vocab, seed=seed)
    process, columns = kernel_entry(case)
    buffer = page_aligned_floats(logits.numel() + PAGE // 4)
    positions = starts()
    samples = {name: {s: [] for s in positions} for name in libraries}
    names = list(libraries)
    for round_ in range(rounds):
        turn = round_ % len(positions)
        for index, start in enumerate(positions[turn:] + positions[:turn]):
            work = batch_at(buffer, start, logits)
            order = names if (round_ + index) % 2 == 0 else names[::-1]
            for name in order:
                work.copy_(logits)
                with cpu_backend.kernels_from(libraries[name]):
                    began = time.perf_counter()
                    process(work, *columns)
                    samples[name][start].append(time.perf_counter() - began)
    rows = []
    for name in names:
        median_ms = [1e3 * statistics.median(samples[name][s]) for s in positions]
        typical = statistics.median(median_ms)
        rows.append(
            {
                "build": name,
                "vocab": vocab,
                "batch": batch,
                "steps": steps,
                "rounds": rounds,
                "start_bytes": positions,
                "median_ms": median_ms,
                "fastest_ms": min(median_ms),
                "slowest_ms": max(median_ms),
                "median_over_starts_ms": typical,
                "slow_starts_bytes": [
                    s
                    for s, ms in zip(positions, median_ms, strict=True)
                    if ms >= SLOW * typical
                ],
            }
        )
    return rows


def summary_line(row: dict) -> str:
    slow = row["slow_starts_bytes"]
    return (
        f"{row['build']:8s} V={row['vocab']:<7d} B={row['batch']}"
        f"  fastest {row['fastest_ms']:.3f} ms"
        f"  median {row['median_over_starts_ms']:.3f}"
        f"  slowest {row['slowest_ms']:.3f}"
        f" (x{row['slowest_ms'] / row['fastest_ms']:.2f})"
        f"  starts >= {SLOW:.2f}x the median: {len(slow)} of {len(starts())}"
        + (f" {slow}" if slow else "")
    )


def plot(result: dict, path: Path) -> None:
    """Median call time against the batch's start in its page: one panel per
    vocabulary, one line per build."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocabs = list(dict.fromkeys(r["vocab"] for r in result["rows"]))
    fig, axes = plt.subplots(
        1, len(vocabs), squeeze=False, figsize=(5 * len(vocabs), 3.4)
    )
    for ax, vocab in zip(axes[0], vocabs, strict=True):
        for row in (r for r in result["rows"] if r["vocab"] == vocab):
            ax.plot(
                row["start_bytes"], row["median_ms"], marker=".", label=row["build"]
            )
        ax.set_xlabel("logits' start after a page boundary (bytes)")
        ax.set_ylabel("ms per call (median)")
        ax.set_title(
            f"logits mode, 3 steps, B={result['batch']}, V={vocab:,}", fontsize=9
        )
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{result['threads']} thread(s), {result['environment'].get('device', '')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="another cpu_kernels.c to compare")
    parser.add_argument("--vocab", type=int, nargs="+", default=[49_152, 151_936])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15, help="calls per start")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "scratch_placement.json")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    libraries = {"shipped": cpu_backend.open_library(cpu_build.build().path)}
    if args.base is not None:
        libraries["base"] = cpu_backend.open_library(cpu_build.build(args.base).path)
    load_before = os.getloadavg()
    rows = []
    for vocab in args.vocab:
        for row in measure_vocab(
            vocab, args.batch, args.steps, libraries, args.rounds, args.seed
        ):
            rows.append(row)
            print(summary_line(row), flush=True)
    result = probe_record(
        "bench.scratch_placement",
        argv,
        load_before,
        rows,
        kind="scratch_placement",
        base=None if args.base is None else str(args.base),
        batch=args.batch,
        threads=args.threads,
    )
    write_result(result, args.out)
    if not args.no_plot:
        plot(result, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
