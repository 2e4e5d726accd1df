"""The Python around the compiled kernels: what a public call costs beyond the
kernels' own ctypes call, back to back and right after other work took the caches.

Two calls, each timed against the bare ctypes call of the same kernels on the same
data (``em_inf_logits`` with its arguments built once), interleaved call by call:

* ``functional [1, 151936]``: :func:`em_inf.functional.em_inf` as
  ``bench/latency.py``'s grid times it (torch's threads, a new tensor), back to
  back and right after one pass of the authors' loop (:mod:`em_inf.reference`) on
  the same row;
* ``vLLM step [8, 49152]``: :func:`em_inf.core.apply_to_rows`, what the processor
  runs each step (the ``math`` preset in every slot, counters on, one thread as in
  vLLM's CPU worker), back to back and right after a ``--forward-mib`` MiB matrix
  product and the logits written (the model's forward pass, which takes the caches
  before the processor runs, and its last layer).

Reports the medians of ``--rounds`` calls each and their difference, the Python's
share. Writes ``bench/results/python_overhead.json`` (``--out``).

Usage::

    python -m bench.python_overhead     # about 20 seconds; nothing else should run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.common import make_logits, write_result
from bench.latency import probe_record
from em_inf import counters, cpu_backend, functional, reference
from em_inf.config import ADAM_BETAS, ADAM_EPS, PRESETS
from em_inf.core import SlotSettings, apply_to_rows
from em_inf.stats import EMInfStats

RESULTS = Path(__file__).with_name("results")


class BareCall:
    """The kernels' ctypes call on ``out`` (from ``source``, or in place) with every
    argument built once, what no Python around it can undercut. Make it after one
    public call, which sizes the kernels' scratch."""

    def __init__(
        self,
        out: torch.Tensor,
        source: torch.Tensor | None,
        params: dict,
        stats: torch.Tensor | None,
    ) -> None:
        rows, vocab = out.shape
        self.library = cpu_backend.load()
        self.columns = [
            torch.full((rows,), float(params[name]))
            for name in ("threshold", "kl_weight", "lr")
        ]
        self.columns.append(
            torch.full((rows,), int(params["steps"]), dtype=torch.int64)
        )
        self.edges = torch.tensor(counters.ENTROPY_EDGES, dtype=torch.float64)
        self.arguments = (
            out.data_ptr(),
            None,
            rows,
            vocab,
            out.stride(0),
            None if source is None else source.data_ptr(),
            0 if source is None else source.stride(0),
            *(column.data_ptr() for column in self.columns),
            ADAM_BETAS[0],
            ADAM_BETAS[1],
            ADAM_EPS,
            cpu_backend.scratch_buffer().data_ptr(),
            None if stats is None else stats.data_ptr(),
            self.edges.data_ptr(),
            self.edges.numel(),
            counters.logits_after_sample(),
            torch.get_num_threads(),
        )

    def __call__(self) -> None:
        self.library.em_inf_logits(*self.arguments)


def logits_settings(preset: str) -> dict:
    """A logits-mode preset's settings as the functional API takes them."""
    config = PRESETS[preset]
    return {
        name: getattr(config, name)
        for name in ("threshold", "kl_weight", "lr", "steps")
    }


def timed_pair(
    public: Callable[[], object],
    bare: Callable[[], None],
    before: Callable[[], object],
    rounds: int,
) -> tuple[float, float]:
    """Median ms of ``public`` and of ``bare``, each call right after ``before``."""
    times: dict[str, list[float]] = {"public": [], "bare": []}
    for _ in range(rounds):
        for name, call in (("public", public), ("bare", bare)):
            before()
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3)
    return statistics.median(times["public"]), statistics.median(times["bare"])


def functional_case(rounds: int) -> list[dict]:
    logits = make_logits(1, 151_936)
    params = logits_settings("default")  # bench/latency.py's: 3 steps
    out = torch.empty_like(logits)

    def public() -> torch.Tensor:
        return functional.em_inf(logits, **params)

    def authors() -> torch.Tensor:
        return reference.em_inf_row(logits[0], **params)

    public()
    bare = BareCall(out, logits, params, None)
    return [
        _row("functional [1, 151936]", gap, *timed_pair(public, bare, before, rounds))
        for gap, before in (
            ("back to back", public),
            ("after the authors' loop", authors),
        )
    ]


class VllmStep:
    """A vLLM step on the CPU paths, as the processor runs it: ``rows`` requests
    with the ``math`` preset, counters on. ``public`` runs
    :func:`em_inf.core.apply_to_rows` on ``logits`` in place, ``bare`` the same
    kernels' ctypes call (made after one public call, which sizes the scratch)."""

    def __init__(self, rows: int = 8, vocab: int = 49_152) -> None:
        self.source = make_logits(rows, vocab)
        self.logits = self.source.clone()
        self.settings = SlotSettings(rows)
        for slot in range(rows):
            self.settings.set(slot, PRESETS["math"])
        self.stats = EMInfStats()
        self.slots, self.row_slots = np.arange(rows), torch.arange(rows)
        self.public()
        counted = self.stats.counters(self.logits.device)[0]
        self.bare = BareCall(self.logits, None, logits_settings("math"), counted)

    def public(self) -> None:
        apply_to_rows(
            self.logits,
            self.slots,
            self.settings,
            self.row_slots,
            stats=self.stats,
            backend="cpu",
        )
        self.stats.tick()

    def again(self) -> None:
        """The logits back as they came (the kernels work on them in place)."""
        self.logits.copy_(self.source)


def vllm_step_case(rounds: int, forward_mib: int) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step = VllmStep()
        side = int((forward_mib * 2**20 / 4 / 3) ** 0.5)
        weights = torch.randn(side, side)

        def forward() -> None:  # then the logits, as the model's last layer writes them
            (weights @ weights).sum()
            step.again()

        return [
            _row(
                "vLLM step [8, 49152]",
                gap,
                *timed_pair(step.public, step.bare, before, rounds),
            )
            for gap, before in (
                ("back to back", step.again),
                ("after a forward pass", forward),
            )
        ]
    finally:
        torch.set_num_threads(threads)


def _row(call: str, gap: str, public_ms: float, bare_ms: float) -> dict:
    return {
        "call": call,
        "gap": gap,
        "public_ms": public_ms,
        "kernels_ctypes_call_ms": bare_ms,
        "python_ms": public_ms - bare_ms,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--forward-mib", type=int, default=48)
    parser.add_argument("--out", type=Path, default=RESULTS / "python_overhead.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    rows = functional_case(args.rounds) + vllm_step_case(args.rounds, args.forward_mib)
    for row in rows:
        print(
            f"{row['call']:24} {row['gap']:26} public {row['public_ms']:.3f} ms"
            f"  kernels' call {row['kernels_ctypes_call_ms']:.3f} ms"
            f"  Python {row['python_ms'] * 1e3:.0f} us"
        )
    write_result(
        probe_record(
            "bench.python_overhead",
            argv,
            load_before,
            rows,
            forward_mib=args.forward_mib,
            rounds=args.rounds,
        ),
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
