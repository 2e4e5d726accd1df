"""When an OpenMP team's second thread starts work after the process spent a while
elsewhere: what a two-thread call of the CPU kernels waits for before its first
barrier.

Compiles and runs ``bench/thread_wake.c``: per gap (none, a 20 ms busy loop, a 2 ms
and a 30 ms sleep), ``--rounds`` parallel regions of two threads, each passing
``--barriers`` barriers with about 20 us of arithmetic before each. Reports the
later thread's entry delay (median, 90th percentile, largest), the region's median
time and the share of regions in which both threads ran on one CPU. Writes
``bench/results/thread_wake.json`` (``--out``).

Usage::

    python -m bench.thread_wake     # about 10 seconds; nothing else should run
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bench.common import write_result
from bench.cpu_units import _run
from bench.latency import probe_record

SOURCE = Path(__file__).with_name("thread_wake.c")
RESULTS = Path(__file__).with_name("results")
GAPS = ("none", "spin_20ms", "sleep_2ms", "sleep_30ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--barriers", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS / "thread_wake.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    printed = _run(SOURCE, ["-O2", "-fopenmp"], str(args.rounds), str(args.barriers))
    rows = [
        {
            "gap": gap,
            **{
                field: printed[f"{gap}_{field}"]
                for field in (
                    "delay_median_us",
                    "delay_p90_us",
                    "delay_max_us",
                    "region_median_us",
                    "one_cpu_share",
                )
            },
        }
        for gap in GAPS
    ]
    for row in rows:
        print(
            f"{row['gap']:11} second thread in after {row['delay_median_us']:7.1f} us"
            f" (p90 {row['delay_p90_us']:.1f}, max {row['delay_max_us']:.1f})"
            f"  region {row['region_median_us']:7.1f} us"
            f"  both on one CPU in {row['one_cpu_share']:.0%}"
        )
    write_result(
        probe_record(
            "bench.thread_wake",
            argv,
            load_before,
            rows,
            rounds=args.rounds,
            barriers=args.barriers,
        ),
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
