"""Compile the EM-INF kernels for a GPU without one, and report registers and spills.

Runs Triton's whole pipeline (``triton.compile(ASTSource(...), target=GPUTarget(...))``)
to PTX for every variant the processor and the public functions launch, then
``ptxas -v`` (the one bundled with Triton) to count registers, spills and shared
memory per thread. Any Triton works; to check the GPU machine's Triton, put that
version first on the path, e.g.::

    python -m venv /tmp/tri36 && /tmp/tri36/bin/pip install triton==3.6.0
    PYTHONPATH=/tmp/tri36/lib/python3.11/site-packages python \\
        bench/compile_kernels.py --arch 80 90 100 \\
        --out bench/results/compile_triton3.6.json

Needs torch (imported by the kernel modules), triton and numpy; no GPU, no vLLM.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real: before Triton loads

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

from em_inf.config import ADAM_BETAS, ADAM_EPS  # noqa: E402
from em_inf.kernels import logits_mode, temperature_mode  # noqa: E402
from em_inf.kernels._common import warps_for_held_chunk  # noqa: E402

QWEN_VOCAB = 151_936


def _signature(fn, types: dict[str, str], constexprs: dict) -> dict[str, str]:
    return {
        name: "constexpr" if name in constexprs else types[name]
        for name in fn.arg_names
    }


def _aligned(fn, pointers: list[str], divisible: list[str]) -> dict:
    """Triton's usual specialisation: 16-byte aligned pointers, sizes divisible by
    16 where V = 151,936 is."""
    return {
        (fn.arg_names.index(name),): [["tt.divisibility", 16]]
        for name in (*pointers, *divisible)
    }


def logits_variants():
    fn = logits_mode._em_inf_pass_kernel
    types = {
        "p_logits": "*fp32",
        "row_stride": "i32",
        "n_cols": "i32",
        "p_row_slot": "*i64",
        "p_launch": "*i64",
        "p_threshold": "*fp32",
        "p_kl_weight": "*fp32",
        "p_lr": "*fp32",
        "p_steps": "*i32",
        "p_part": "*fp32",
        "max_steps": "i32",
        "n_chunks": "i32",
        "pass_idx": "i32",
        "p_stats": "*i64",
        "p_ticket": "*fp32",
    }
    pointers = [n for n, t in types.items() if t.startswith("*")]
    for block, phase, indirect in itertools.product(
        (1024, 2048, 4096), (0, 1, 2), (False, True)
    ):
        n_chunks = -(-QWEN_VOCAB // block)
        constexprs = dict(
            BLOCK=block,
            C_POW2=max(16, triton.next_power_of_2(n_chunks)),
            PHASE=phase,
            BETA1=ADAM_BETAS[0],
            BETA2=ADAM_BETAS[1],
            EPS=ADAM_EPS,
            INDIRECT=indirect,
            SLOT_INT64=True,
            HAS_STATS=True,
        )
        name = f"logits block {block} phase {phase}{' indirect' if indirect else ''}"
        attrs = _aligned(fn, pointers, ["row_stride", "n_cols"])
        yield (
            name,
            fn,
            _signature(fn, types, constexprs),
            constexprs,
            attrs,
            warps_for_held_chunk(block),
        )


def temperature_variants():
    fn = temperature_mode._adaptive_temperature_kernel
    types = {
        "p_logits": "*fp32",
        "row_stride": "i32",
        "n_cols": "i32",
        "p_row_slot": "*i64",
        "p_launch": "*i64",
        "p_threshold": "*fp32",
        "p_alpha": "*fp32",
        "p_t_min": "*fp32",
        "p_t_max": "*fp32",
        "p_stats": "*i64",
    }
    pointers = [n for n, t in types.items() if t.startswith("*")]
    block = temperature_mode.block_for(QWEN_VOCAB)
    for indirect in (False, True):
        constexprs = dict(
            BLOCK=block,
            STEP_TOL=temperature_mode.STEP_TOL,
            MAX_PASSES=temperature_mode.MAX_PASSES,
            INDIRECT=indirect,
            SLOT_INT64=True,
            HAS_STATS=True,
        )
        name = f"temperature block {block}{' indirect' if indirect else ''}"
        attrs = _aligned(fn, pointers, ["row_stride", "n_cols"])
        warps = temperature_mode.warps_for_streamed_row(block)
        yield name, fn, _signature(fn, types, constexprs), constexprs, attrs, warps


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes per thread from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path if _takes_arch(get_ptxas) else get_ptxas().path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        result = subprocess.run(
            [ptxas, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
            check=True,
        )
    log = result.stderr
    registers = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_store_bytes": int(stores.group(1)) if stores else 0,
        "spill_load_bytes": int(loads.group(1)) if loads else 0,
    }


def _takes_arch(get_ptxas) -> bool:
    import inspect

    return bool(inspect.signature(get_ptxas).parameters)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows, failures = [], 0
    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        for name, fn, signature, constexprs, attrs, warps in itertools.chain(
            logits_variants(), temperature_variants()
        ):
            try:
                compiled = triton.compile(
                    ASTSource(fn, signature, constexprs, attrs),
                    target=target,
                    options={"num_warps": warps},
                )
                report = ptxas_report(compiled.asm["ptx"], arch)
                report["shared_bytes"] = compiled.metadata.shared
                error = None
            except Exception as exc:  # noqa: BLE001 (report every variant)
                report, error = {}, f"{type(exc).__name__}: {exc}"[:2000]
                failures += 1
            rows.append(
                {
                    "arch": arch,
                    "kernel": name,
                    "num_warps": warps,
                    **report,
                    "error": error,
                }
            )
            print(
                f"sm_{arch} {name:<36} warps {warps:>2}  "
                + (
                    f"regs {report['registers']:>3}  spills "
                    f"{report['spill_store_bytes']}/{report['spill_load_bytes']} B  "
                    f"smem {report['shared_bytes']} B"
                    if error is None
                    else f"FAILED {error.splitlines()[0]}"
                ),
                flush=True,
            )
    result = {"triton": triton.__version__, "kernels": rows, "failures": failures}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
