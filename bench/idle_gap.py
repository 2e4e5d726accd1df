"""What the first call after a gap costs: the same call back to back, and after the
process spent a few milliseconds elsewhere (busy in a Python loop that touches
almost no memory, or asleep).

In vLLM the processor runs once per step, right after the model's forward pass, and
``bench/latency.py``'s grid calls each implementation after the others; both see
the kernels after a gap. This script times, per call and per gap, the first call
after the gap (``--rounds`` times, median and fastest):

* ``torch add [64]``: one small torch operation (no em-inf code);
* ``kernels [1, 8192]`` and ``kernels [1, 151936]``: the compiled kernels, logits
  mode, 3 steps, called directly (``cpu_backend.em_inf_``) on a batch copied into
  place before the gap;
* ``kernels [1, 151936], scratch read``: the same with the batch and the kernels'
  scratch read (summed) after the gap, untimed, just before the call;
* ``floor [1, 151936]``: the exp pass ``bench/latency.py`` counts floors in.

Gaps: none (back to back), a Python loop on the clock for 2, 5, 10, 20 and 40 ms
(``spin``), ``sleep 20 ms``, and ``48 MiB written`` (a torch fill: the caches
emptied of the call's data with next to no time passing). One thread
(``--threads``), as in vLLM's CPU worker; ``--batch`` rows instead of 1 (the grid's
B = 8 with 2 threads: ``--batch 8 --threads 2``). Writes
``bench/results/idle_gap.json`` (``--out``).

Usage::

    python -m bench.idle_gap        # about 20 seconds; nothing else should run
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import make_logits, write_result
from bench.latency import Case, kernel_entry, probe_record
from em_inf import cpu_backend

RESULTS = Path(__file__).with_name("results")


def spin(seconds: float) -> None:
    """Keep the process busy in Python for ``seconds``, touching almost no memory."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@functools.cache
def _evicting() -> torch.Tensor:
    """48 MiB of float32, made once: writing it empties the caches."""
    return torch.empty(48 << 18)


GAPS: dict[str, Callable[[], None]] = {
    "none": lambda: None,
    **{f"spin {ms} ms": (lambda s=ms / 1e3: spin(s)) for ms in (2, 5, 10, 20, 40)},
    "sleep 20 ms": lambda: time.sleep(0.020),
    "48 MiB written": lambda: _evicting().fill_(1.0),
}


Call = tuple[Callable[[], None], Callable[[], None], Callable[[], None]]


def kernel_calls(batch: int, vocab: int, read_first: bool = False) -> Call:
    """(before the gap, after it, timed): the kernels on a ``[batch, vocab]``
    batch, logits mode, 3 steps. The batch is copied into place before the gap; with
    ``read_first``, the batch and the kernels' scratch are read (summed) after it,
    untimed, so that the timed call finds them in the caches."""
    case = Case("logits", batch, vocab, 3)
    logits = make_logits(batch, vocab)
    work = torch.empty_like(logits)
    process, columns = kernel_entry(case)

    def read() -> None:
        if read_first:
            work.sum()
            cpu_backend.scratch_buffer().sum()

    return (lambda: work.copy_(logits)), read, (lambda: process(work, *columns))


def calls(batch: int = 1) -> dict[str, Call]:
    small = torch.randn(64)
    nothing = lambda: None  # noqa: E731
    large = make_logits(batch, 151_936)
    return {
        "torch add [64]": (nothing, nothing, lambda: small.add(1.0)),
        f"kernels [{batch}, 8192]": kernel_calls(batch, 8192),
        f"kernels [{batch}, 151936]": kernel_calls(batch, 151_936),
        f"kernels [{batch}, 151936], scratch read": kernel_calls(
            batch, 151_936, read_first=True
        ),
        f"floor [{batch}, 151936]": (
            nothing,
            nothing,
            lambda: cpu_backend.exp_floor(large),
        ),
    }


def measure(rounds: int, batch: int = 1) -> list[dict]:
    """Every call after every gap, ``rounds`` times; gaps interleaved per round."""
    rows = []
    for name, (before, after, call) in calls(batch).items():
        before()
        call()  # first use: builds, allocations
        samples: dict[str, list[float]] = {gap: [] for gap in GAPS}
        for _ in range(rounds):
            for gap, wait in GAPS.items():
                before()
                wait()
                after()
                began = time.perf_counter()
                call()
                samples[gap].append(1e3 * (time.perf_counter() - began))
        for gap, times in samples.items():
            rows.append(
                {
                    "call": name,
                    "gap": gap,
                    "rounds": rounds,
                    "median_ms": statistics.median(times),
                    "fastest_ms": min(times),
                }
            )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="rows per call")
    parser.add_argument("--out", type=Path, default=RESULTS / "idle_gap.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = measure(args.rounds, args.batch)
    back_to_back = {r["call"]: r["median_ms"] for r in rows if r["gap"] == "none"}
    for row in rows:
        ratio = row["median_ms"] / back_to_back[row["call"]]
        print(
            f"{row['call']:36s} {row['gap']:12s} {row['median_ms']:8.3f} ms"
            f" (fastest {row['fastest_ms']:.3f})  x{ratio:.2f}"
        )
    result = probe_record(
        "bench.idle_gap",
        argv,
        load_before,
        rows,
        kind="idle_gap",
        threads=args.threads,
        batch=args.batch,
    )
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
