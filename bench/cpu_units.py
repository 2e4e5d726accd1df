"""What one core's vector units cost, and what each pass of the CPU kernels costs on
one thread, in cycles: the figures ``docs/cost-model.md`` reasons with.

Compiles and runs, for this machine:

* ``bench/cpu_units.c``: the clock (from a chain of dependent integer adds), then
  the throughput of each instruction the passes are made of (FMA, add, the exp's
  scaling, division, square root and their estimates), eight independent ones per
  loop turn. x86-64 with AVX2; the 512-bit rows only where the compiler targets
  AVX-512.
* ``bench/cpu_passes.c``: the kernels' own passes (``em_inf/cpu_kernels.c``
  included, built with the kernels' flags, one thread), each over one row of
  ``--vocab`` logits, in cycles per vector of logits at that clock.

Usage::

    python -m bench.cpu_units        # about ten seconds; nothing else should run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

from bench.common import write_result
from bench.latency import cpu_environment
from em_inf import cpu_build

UNITS = Path(__file__).with_name("cpu_units.c")
PASSES = Path(__file__).with_name("cpu_passes.c")
RESULTS = Path(__file__).with_name("results")
LANES_NOTE = "vector of logits (16 with AVX-512, 8 with AVX2)"


def _run(source: Path, flags: list[str], *args: str) -> dict[str, float]:
    """Compile ``source`` with ``flags``, run it with ``args``; its "name value"
    lines as a dict."""
    with tempfile.TemporaryDirectory() as folder:
        program = Path(folder) / source.stem
        subprocess.run(
            [cpu_build.compiler(), *flags, "-o", str(program), str(source), "-lm"],
            check=True,
        )
        printed = subprocess.run(
            [str(program), *args], check=True, capture_output=True, text=True
        ).stdout
    return {
        name: float(value)
        for name, value in (line.split() for line in printed.splitlines())
    }


def measure(
    vocab: int, kernels: Path | None = None
) -> dict[str, dict[str, float] | float]:
    """The clock (GHz), cycles per instruction, and the passes' cycles per vector
    (of the shipped kernels, or of the source ``kernels``)."""
    units = _run(UNITS, ["-O2", "-march=native"])
    clock = units.pop("clock_ghz")
    kernel_flags = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=fast"]
    shipped = cpu_build.flag_sets(cpu_build.cpu_description())[0]
    kernel_flags += [flag for flag in shipped if flag.startswith("-D")]  # as built
    if kernels is not None:
        kernel_flags.append(f'-DKERNELS_SOURCE="{kernels.resolve()}"')
    repetitions = str(max(20, 30_000_000 // vocab))
    passes = _run(PASSES, kernel_flags, str(vocab), repetitions, str(clock))
    return {"clock_ghz": clock, "instructions": units, "passes": passes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_units.json")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument(
        "--kernels", type=Path, help="another cpu_kernels.c to time the passes of"
    )
    args = parser.parse_args(argv)
    before = os.getloadavg()
    measured = measure(args.vocab, args.kernels)
    print(f"clock {measured['clock_ghz']:.2f} GHz")
    for name, value in measured["instructions"].items():
        unit = "turn" if name.endswith("_per_turn") else "instruction"
        print(f"{name:32s} {value:7.3f} cycles per {unit}")
    for name, value in measured["passes"].items():
        print(f"{name:32s} {value:7.2f} cycles per {LANES_NOTE}")
    result = {
        "load_average_before": before,
        "load_average_after": os.getloadavg(),
        "cpu": cpu_environment(),
        "vocab": args.vocab,
        "kernels": str(args.kernels or "em_inf/cpu_kernels.c"),
        "clock_ghz": measured["clock_ghz"],
        "cycles_per_instruction": measured["instructions"],
        "pass_cycles_per_vector": measured["passes"],
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
