"""What the functional API's new tensor costs on the CPU: the ways to fill it, side
by side, and what fresh memory costs by itself.

``em_inf.functional`` returns a new float32 tensor. For each batch size this script
times, interleaved call by call (``--rounds`` rounds, medians with the 20th and 80th
percentiles), the compiled kernels (logits mode, 3 steps) producing that tensor:

* ``copy, then in place``: the batch copied into a new tensor
  (``logits.clone()``), which the kernels then process in place (em-inf before
  round 11);
* ``out of place``: the kernels read the batch where it lies and write a new
  ``torch.empty`` tensor (``cpu_backend.em_inf_(out, ..., source=logits)``, what
  the functional API does now);
* ``out of place, populated``: the same after ``madvise(MADV_POPULATE_WRITE)`` on
  the new tensor (its pages faulted in by one system call; Linux 5.14+);
* with ``--huge-pages`` also ``out of place, huge pages``: after
  ``madvise(MADV_HUGEPAGE)`` on the new tensor's whole 2 MiB pages (what PyTorch
  does for every allocation behind ``THP_MEM_ALLOC_ENABLE=1``); left out by
  default, as on a virtual machine that returns freed memory to its host its
  first calls can take several times longer and slow the other ways' calls too.

Then, per batch size and thread count, ``torch.empty(shape).fill_(0)`` against
``fill_(0)`` of a tensor that exists: what faulting in a new tensor's pages costs.
Writes ``bench/results/new_tensor.json`` (``--out``).

Usage::

    python -m bench.new_tensor            # about 20 seconds; nothing else should run
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import make_logits, write_result
from bench.latency import Case, kernel_entry, probe_record

RESULTS = Path(__file__).with_name("results")
VOCAB = 151_936
#: madvise advice (linux/mman.h) and the pages each applies to.
MADV_HUGEPAGE, HUGE_PAGE = 14, 2 << 20
MADV_POPULATE_WRITE, PAGE = 23, 4096


def advise(tensor: torch.Tensor, advice: int, page: int) -> None:
    """``madvise(advice)`` over the whole ``page``-byte pages inside ``tensor``."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end > start and libc.madvise(start, end - start, advice) != 0:
        raise OSError(ctypes.get_errno(), f"madvise({advice})")


def ways(batch: int, huge_pages: bool = False) -> dict[str, Callable[[], torch.Tensor]]:
    """The ways to produce the kernels' result for a ``[batch, VOCAB]`` batch in a
    new tensor."""
    logits = make_logits(batch, VOCAB)
    process, columns = kernel_entry(Case("logits", batch, VOCAB, 3))

    def copy_first() -> torch.Tensor:
        return process(logits.clone(), *columns)

    def out_of_place(*advice: int) -> torch.Tensor:
        out = torch.empty_like(logits)
        if advice:
            advise(out, *advice)
        return process(out, *columns, source=logits)

    calls = {
        "copy, then in place": copy_first,
        "out of place": out_of_place,
        "out of place, populated": lambda: out_of_place(MADV_POPULATE_WRITE, PAGE),
    }
    if huge_pages:
        calls["out of place, huge pages"] = lambda: out_of_place(
            MADV_HUGEPAGE, HUGE_PAGE
        )
    return calls


def median_row(times: list[float], **fields: object) -> dict:
    low, _, _, high = statistics.quantiles(times, n=5)
    return {
        **fields,
        "median_ms": statistics.median(times),
        "p20_ms": low,
        "p80_ms": high,
    }


def measure_ways(
    batches: list[int], rounds: int, huge_pages: bool = False
) -> list[dict]:
    rows = []
    for batch in batches:
        calls = ways(batch, huge_pages)
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                began = time.perf_counter()
                result = call()
                samples[name].append(1e3 * (time.perf_counter() - began))
                del result  # freed before the next call, as a caller's would be
        rows += [
            median_row(times, batch=batch, way=name, rounds=rounds)
            for name, times in samples.items()
        ]
    return rows


def measure_faults(batches: list[int], rounds: int) -> list[dict]:
    rows = []
    threads_before = torch.get_num_threads()
    try:
        for batch in batches:
            for threads in sorted({1, threads_before}):
                torch.set_num_threads(threads)
                existing = torch.empty(batch, VOCAB)
                new, old = [], []
                for _ in range(rounds):
                    began = time.perf_counter()
                    torch.empty(batch, VOCAB).fill_(0.0)
                    new.append(1e3 * (time.perf_counter() - began))
                    began = time.perf_counter()
                    existing.fill_(0.0)
                    old.append(1e3 * (time.perf_counter() - began))
                for name, times in (("new tensor", new), ("existing tensor", old)):
                    fields = dict(batch=batch, threads=threads, fill=name)
                    rows.append(median_row(times, **fields, rounds=rounds))
    finally:
        torch.set_num_threads(threads_before)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--huge-pages", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "new_tensor.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    way_rows = measure_ways(args.batch, args.rounds, args.huge_pages)
    fault_rows = measure_faults(args.batch, args.rounds)
    for row in way_rows:
        print(
            f"B={row['batch']:<3d} {row['way']:26s} {row['median_ms']:8.3f} ms"
            f" (p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f})"
        )
    for row in fault_rows:
        print(
            f"B={row['batch']:<3d} {row['threads']} thread(s), fill_(0) of the "
            f"{row['fill']:16s} {row['median_ms']:8.3f} ms"
        )
    result = probe_record(
        "bench.new_tensor",
        argv,
        load_before,
        way_rows + fault_rows,
        kind="new_tensor",
        vocab=VOCAB,
        threads=torch.get_num_threads(),
    )
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
