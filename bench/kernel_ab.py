"""Two builds of the CPU kernels side by side: does a change to ``cpu_kernels.c``
make them faster, and does it change their results?

Builds the shipped source (or ``--base``) and a variant of it with the same
compiler and flags, loads both into one process and, for each case (mode, batch,
warm or cold), calls them in turn on the same logits, ``--rounds`` times each, so
that whatever else the machine does falls on both alike. Reports each build's
median and fastest call, the variant's time over the base's, and how far the
variant's output is from the base's (logits at different bits, the largest
difference in ulps of the row's largest logit, and the largest total variation
between the two softmaxes). A variant that should not change the numerics must
show 0 everywhere.

*warm*: the call follows the copy of the batch into its buffer, nothing else.
*cold*: between the copy and the call, ``--evict-mib`` MiB of other memory are
written (as the model's forward pass does before the processor runs in vLLM), which
evicts the row and the kernels' scratch from the caches.

The variant is a whole source file or a patch against ``em_inf/cpu_kernels.c``
(``git diff`` output; applied with ``git apply`` to a copy of the base).
``bench/kernel_variants/`` keeps the patches measured so far, and
``bench/results/kernel_ab_<name>.json`` what they measured.

Usage::

    python -m bench.kernel_ab /tmp/variant.c                 # ~1 minute
    python -m bench.kernel_ab bench/kernel_variants/fused_update_statistics.patch \
        --out bench/results/kernel_ab_fused_update_statistics.json

Times nothing else running; the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from bench.common import make_logits, write_result
from bench.latency import Case, kernel_entry, probe_record
from em_inf import cpu_backend, cpu_build

RESULTS = Path(__file__).with_name("results")


def variant_source(variant: Path, base: Path, folder: Path) -> Path:
    """``variant`` itself, or, for a ``.patch``, ``base`` with the patch applied (a
    copy in ``folder``, at the path the patch names)."""
    if variant.suffix != ".patch":
        return variant
    target = folder / cpu_build.SOURCE.relative_to(cpu_build.SOURCE.parents[1])
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(base, target)
    subprocess.run(
        ["git", "apply", str(variant.resolve())],
        cwd=folder,
        check=True,
        capture_output=True,
    )
    return target


def compare(base: torch.Tensor, variant: torch.Tensor) -> dict:
    """How far ``variant``'s ``[B, V]`` float32 output is from ``base``'s: logits at
    different bits, the largest difference in ulps of each row's largest finite |logit|,
    and the largest total variation between the rows' softmaxes."""
    same = (base == variant) | (base.isnan() & variant.isnan())
    finite = torch.where(base.isfinite(), base.abs(), 0.0)
    scale = finite.amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    ulp = torch.nextafter(scale, torch.tensor(float("inf"))) - scale
    diff = (base.double() - variant.double()).abs().nan_to_num(nan=float("inf"))
    diff = diff.masked_fill(same, 0.0)  # -inf (masked) in both: no difference
    tv = 0.5 * (base.double().softmax(1) - variant.double().softmax(1)).abs().sum(1)
    return {
        "logits_differing": int((~same).sum()),
        "max_ulps_of_row_max": float((diff / ulp.double()).amax()),
        "max_total_variation": float(tv.nan_to_num(nan=1.0).amax()),
    }


def measure_case(
    case: Case, libraries: list, rounds: int, evict_mib: int, seed: int
) -> dict:
    """Both builds on ``case``, called in turn (which goes first alternates from
    round to round): times (ms) and the variant's output against the base's."""
    logits = make_logits(case.batch, case.vocab, seed=seed)
    process, columns = kernel_entry(case)
    work = [torch.empty_like(logits) for _ in libraries]
    other = torch.empty(evict_mib * 2**18, dtype=torch.float32) if evict_mib else None
    samples: list[list[float]] = [[] for _ in libraries]
    for round_ in range(rounds):
        order = (
            range(len(libraries))
            if round_ % 2 == 0
            else reversed(range(len(libraries)))
        )
        for i in order:  # each build first in every other round
            library = libraries[i]
            work[i].copy_(logits)
            if other is not None:
                other.fill_(float(round_))
            with cpu_backend.kernels_from(library):
                started = time.perf_counter()
                process(work[i], *columns)
                samples[i].append(time.perf_counter() - started)
    median = [1e3 * statistics.median(s) for s in samples]
    fastest = [1e3 * min(s) for s in samples]
    return {
        "mode": case.mode,
        "steps": case.steps,
        "batch": case.batch,
        "vocab": case.vocab,
        "condition": "cold" if evict_mib else "warm",
        "rounds": rounds,
        "base_median_ms": median[0],
        "variant_median_ms": median[1],
        "base_min_ms": fastest[0],
        "variant_min_ms": fastest[1],
        "ratio_median": median[1] / median[0],
        "ratio_min": fastest[1] / fastest[0],
        "output": compare(work[0], work[1]),
    }


def _line(case: Case, row: dict) -> str:
    """One printed row: both builds' medians, the ratios, the output's difference."""
    out = row["output"]
    return (
        f"{case.label:38s} {row['condition']:4s}"
        f"  base {row['base_median_ms']:8.3f} ms"
        f"  variant {row['variant_median_ms']:8.3f} ms  x{row['ratio_median']:.3f}"
        f" (fastest x{row['ratio_min']:.3f})"
        f"  differing {out['logits_differing']}"
        f"  max {out['max_ulps_of_row_max']:.2f} ulp"
        f"  TV {out['max_total_variation']:.1e}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "variant", type=Path, help="the changed cpu_kernels.c, or a patch to the base"
    )
    parser.add_argument("--base", type=Path, default=cpu_build.SOURCE)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--steps", type=int, default=3, help="logits mode's Adam steps")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("logits", "temperature"),
        default=["logits", "temperature"],
    )
    parser.add_argument(
        "--rounds", type=int, default=40, help="calls of each build per case"
    )
    parser.add_argument(
        "--evict-mib",
        type=int,
        default=16,
        help="cold calls: MiB written before each (0: none)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "kernel_ab.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        variant = variant_source(args.variant, args.base, Path(folder))
        built = [cpu_build.build(path) for path in (args.base, variant)]
    libraries = [cpu_backend.open_library(b.path) for b in built]
    load_before = os.getloadavg()
    rows = []
    for mode in args.modes:
        for batch in args.batch:
            case = Case(
                mode, batch, args.vocab, args.steps if mode == "logits" else None
            )
            for evict in (0, args.evict_mib) if args.evict_mib else (0,):
                row = measure_case(case, libraries, args.rounds, evict, args.seed)
                rows.append(row)
                print(_line(case, row), flush=True)
    result = probe_record(
        "bench.kernel_ab",
        argv,
        load_before,
        rows,
        base=str(args.base),
        variant=str(args.variant),
        base_sha256=hashlib.sha256(args.base.read_bytes()).hexdigest(),
        variant_sha256=hashlib.sha256(args.variant.read_bytes()).hexdigest(),
        evict_mib=args.evict_mib,
    )
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
