"""One-call GPU check of the Triton kernels: correctness first, then a timing table.

1. Correctness: :func:`em_inf.kernels.em_inf_rows_` and
   :func:`em_inf.kernels.adaptive_temperature_rows_` on fresh random logits
   (V = 151,936 with ``-inf`` masks, rows mapped to per-slot parameters, a slot
   ``-1`` row, rows below the threshold) against the authors' per-row loop
   (:mod:`em_inf.reference`) run in float64, held to the project's standard
   (:mod:`em_inf.reference`: per-row total variation <= 1e-5, finite logits within
   5e-3, ``-inf`` identical, no NaN). Also through :mod:`em_inf.functional`.
2. Timing (only when 1 passed; ``--time-anyway`` overrides): B in {1, 8, 64, 256},
   V = 151,936, the logits mode (preset ``default``: threshold 0.3, kl_weight 0.05,
   lr 0.1) at 3 and 5 steps and the temperature mode (preset
   ``adaptive-temperature``), for

   * ``triton``: the kernel, in place on a fresh copy of the logits each call; the
     copy is timed alone and subtracted;
   * ``torch``: :mod:`em_inf.functional` with ``EM_INF_BACKEND=torch`` (same GPU);
   * ``reference``: the per-row loop of :mod:`em_inf.reference` in float32 on the
     GPU (autograd + ``torch.optim.Adam``; bisection with the authors' tolerance).
     It is timed on up to ``--reference-rows`` rows and scaled linearly per row
     beyond that (marked ``extrapolated``: it runs rows one after another);
   * ``triton@<block>``, ``triton@rows<G>`` (logits mode): the kernel with each
     block size of ``--sweep-blocks``, and in groups of ``G`` rows whose logits
     fit in L2 between passes (``rows_per_launch``), to check the launch plan;
   * ``floor``: one read + one write of the logits at the copy bandwidth measured
     on a 1 GiB device-to-device copy (``copy`` is the measured copy of the actual
     ``[B, V]`` buffer, launch overhead included).

   Times are medians of CUDA-event timings of many calls (no L2 flush between
   calls: the same for every provider). Random logits are Gaussian with a
   per-row scale in [2, 5], every row far above the threshold: all steps run.

Writes ``bench/results/gpu_check_<gpu>_<timestamp>.json`` (GPU name, versions,
timestamp, every number) and prints the table and the issue's targets.

Runs without a GPU under Triton's interpreter on tiny shapes, to prove it end to
end::

    TRITON_INTERPRET=1 python bench/gpu_check.py --quick

Needs only torch, triton, numpy and em_inf's vLLM-free modules.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python bench/gpu_check.py`: make the repo importable
    sys.path.insert(0, str(REPO))


from bench.checkout import map_kernels_package  # noqa: E402

map_kernels_package()

from em_inf import backend, functional, reference  # noqa: E402
from em_inf.config import PRESETS  # noqa: E402
from em_inf.reference import (  # noqa: E402
    adaptive_temperature_oracle,
    em_inf_oracle,
    mismatch,
)

QWEN_VOCAB = 151_936


# -- inputs --------------------------------------------------------------------------


def make_logits(rows: int, vocab: int, device, seed: int) -> torch.Tensor:
    """Gaussian logits, per-row scale in [2, 5], one boosted token per row."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=gen) * 3 + 2
    logits = torch.randn(rows, vocab, generator=gen) * scale
    peaks = torch.randint(0, vocab, (rows,), generator=gen)
    logits[torch.arange(rows), peaks] += torch.rand(rows, generator=gen) * 8
    return logits.to(device)


def mask_some(logits: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(logits.shape, generator=gen) < fraction
    mask[:, 0] = False
    return logits.masked_fill(mask.to(logits.device), -torch.inf)


# -- correctness ---------------------------------------------------------------------


def _oracle_rows(oracle, logits, row_slot, params) -> torch.Tensor:
    expected = logits.double().clone()
    for row, slot in enumerate(row_slot.tolist()):
        if slot >= 0:
            one = {
                k: (int(v[slot]) if k == "steps" else v[slot].item())
                for k, v in params.items()
            }
            expected[row] = oracle(logits[row : row + 1].double(), **one)[0]
    return expected


def assert_ok(problem: str | None) -> None:
    """Raise the oracle mismatch ``problem`` (``None``: agreement)."""
    assert problem is None, problem


def check_correctness(device, vocab: int, rows: int, seed: int) -> list[dict]:
    """Every check as ``{"check", "ok", "error"}``; never raises on a mismatch."""
    from em_inf.kernels import adaptive_temperature_rows_, em_inf_rows_

    results = []

    def record(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
            results.append({"check": name, "ok": True, "error": None})
        except AssertionError as exc:  # a mismatch: report it, keep going
            results.append({"check": name, "ok": False, "error": str(exc)[:500]})
        print(f"  {'ok  ' if results[-1]['ok'] else 'FAIL'} {name}", flush=True)

    logits = mask_some(make_logits(rows, vocab, device, seed), 0.05, seed + 1)
    logits[rows // 2, 11] = 80.0  # a confident row: below every threshold
    slots = rows + 1
    # Rows read slots out of order; the last row opts out (slot -1).
    row_slot = torch.randperm(slots, generator=torch.Generator().manual_seed(seed))[
        :rows
    ].to(device, torch.int32)
    row_slot[-1] = -1
    gen = torch.Generator().manual_seed(seed + 2)

    for steps in (3, 5):
        params = {
            "threshold": (torch.rand(slots, generator=gen) * 0.5).to(device),
            "kl_weight": (torch.rand(slots, generator=gen) * 0.05).to(device),
            "lr": (torch.rand(slots, generator=gen) * 0.1 + 0.05).to(device),
            "steps": torch.full((slots,), steps, dtype=torch.int32).to(device),
        }

        def run_logits(params=params, steps=steps):
            out = logits.clone()
            em_inf_rows_(out, row_slot, **params, max_steps=steps)
            expected = _oracle_rows(em_inf_oracle, logits, row_slot, params)
            assert_ok(mismatch(out.cpu(), expected.cpu()))
            assert torch.equal(out[-1], logits[-1]), "slot -1 row changed"
            assert torch.equal(out[rows // 2], logits[rows // 2]), (
                "row below threshold changed"
            )

        record(f"logits mode, steps {steps}, per-slot params, masks", run_logits)

    t_params = {
        "threshold": (torch.rand(slots, generator=gen) * 0.5).to(device),
        "alpha": (torch.rand(slots, generator=gen) * 0.8 + 0.1).to(device),
        "t_min": torch.full((slots,), 0.01).to(device),
        "t_max": torch.full((slots,), 1.0).to(device),
    }

    def run_temperature():
        out = logits.clone()
        adaptive_temperature_rows_(out, row_slot, **t_params)
        expected = _oracle_rows(adaptive_temperature_oracle, logits, row_slot, t_params)
        assert_ok(mismatch(out.cpu(), expected.cpu()))
        assert torch.equal(out[-1], logits[-1]), "slot -1 row changed"

    record("temperature mode, per-slot params, masks", run_temperature)

    def run_functional():
        # CUDA takes Triton by default; CPU tensors only when forced (interpreter).
        os.environ.pop(backend.BACKEND_ENV, None)
        if device.type != "cuda":
            os.environ[backend.BACKEND_ENV] = "triton"
        try:
            assert backend.backend_for(device) == "triton"
            params = dict(threshold=0.3, kl_weight=0.05, lr=0.1, steps=3)
            small = logits[:4]
            out = functional.em_inf(small, **params)
            assert_ok(
                mismatch(out.cpu(), em_inf_oracle(small.double(), **params).cpu())
            )
        finally:
            os.environ.pop(backend.BACKEND_ENV, None)

    record("em_inf.functional dispatches to Triton and matches", run_functional)
    return results


# -- timing --------------------------------------------------------------------------


def median_seconds(
    fn: Callable[[], object], cuda: bool, reps: int, warmup: int
) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends, strict=True):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True)]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, cuda: bool, nbytes: int, reps: int) -> float:
    """Bytes per second moved (read + write) by a device-to-device copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), cuda, reps, warmup=3)
    return 2 * nbytes / seconds


def l2_rows(device, vocab: int) -> int:
    """Rows of ``vocab`` float32 logits that fill ~60% of the L2 cache."""
    l2_bytes = 50 << 20
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2_bytes = getattr(props, "L2_cache_size", l2_bytes) or l2_bytes
    return max(1, int(0.6 * l2_bytes) // (4 * vocab))


def time_batch(
    device, cuda: bool, rows: int, vocab: int, args, bandwidth: float
) -> list[dict]:
    from em_inf.kernels import adaptive_temperature_rows_, em_inf_rows_
    from em_inf.kernels._common import plan_chunks

    src = make_logits(rows, vocab, device, seed=rows)
    buf = torch.empty_like(src)
    row_slot = torch.arange(rows, dtype=torch.int32, device=device)
    reps, warmup = args.reps, args.warmup
    copy_s = median_seconds(lambda: buf.copy_(src), cuda, reps, warmup)
    floor_s = 2 * src.numel() * 4 / bandwidth
    rows_out = []

    planned_block = plan_chunks(rows, vocab, device)[0]

    def add(mode, steps, provider, seconds, extrapolated=False, raw=None):
        rows_out.append(
            {
                "mode": mode,
                "B": rows,
                "V": vocab,
                "steps": steps,
                "provider": provider,
                "us": seconds * 1e6,
                "extrapolated": extrapolated,
                "raw_us": None if raw is None else raw * 1e6,
                "planned_block": planned_block,
            }
        )

    ref_rows = min(rows, args.reference_rows)
    cases = [("logits", s) for s in args.steps] + [("temperature", None)]
    for mode, steps in cases:
        add(mode, steps, "floor", floor_s)
        add(mode, steps, "copy", copy_s)
        if mode == "logits":
            cfg = PRESETS["default"].replace(steps=steps)
            slot_params = {
                "threshold": torch.full((rows,), cfg.threshold, device=device),
                "kl_weight": torch.full((rows,), cfg.kl_weight, device=device),
                "lr": torch.full((rows,), cfg.lr, device=device),
                "steps": torch.full((rows,), steps, dtype=torch.int32, device=device),
            }
            fn_params = dict(
                threshold=cfg.threshold, kl_weight=cfg.kl_weight, lr=cfg.lr, steps=steps
            )

            def kernel(slot_params=slot_params, steps=steps):
                em_inf_rows_(buf.copy_(src), row_slot, **slot_params, max_steps=steps)

            def batched(fn_params=fn_params):
                functional.em_inf(src, **fn_params)

            def per_row(fn_params=fn_params):
                for row in src[:ref_rows]:
                    reference.em_inf_row(row, **fn_params)

        else:
            cfg = PRESETS["adaptive-temperature"]
            slot_params = {
                "threshold": torch.full((rows,), cfg.threshold, device=device),
                "alpha": torch.full((rows,), cfg.alpha, device=device),
                "t_min": torch.full((rows,), cfg.t_min, device=device),
                "t_max": torch.full((rows,), cfg.t_max, device=device),
            }
            fn_params = dict(
                threshold=cfg.threshold,
                alpha=cfg.alpha,
                t_min=cfg.t_min,
                t_max=cfg.t_max,
            )

            def kernel(slot_params=slot_params):
                adaptive_temperature_rows_(buf.copy_(src), row_slot, **slot_params)

            def batched(fn_params=fn_params):
                functional.adaptive_temperature(src, **fn_params)

            def per_row(fn_params=fn_params):
                for row in src[:ref_rows]:
                    reference.adaptive_temperature_row(row, **fn_params)

        raw = median_seconds(kernel, cuda, reps, warmup)
        add(mode, steps, "triton", max(raw - copy_s, 0.0), raw=raw)
        if mode == "logits":  # how the launch plan's block size matters
            for block in args.sweep_blocks:

                def swept(slot_params=slot_params, steps=steps, block=block):
                    em_inf_rows_(
                        buf.copy_(src),
                        row_slot,
                        **slot_params,
                        max_steps=steps,
                        block=block,
                    )

                raw = median_seconds(swept, cuda, reps, warmup)
                add(mode, steps, f"triton@{block}", max(raw - copy_s, 0.0), raw=raw)
            group = args.group_rows or l2_rows(device, vocab)
            if rows > group:  # row groups whose logits stay in L2 between passes

                def grouped(slot_params=slot_params, steps=steps, group=group):
                    em_inf_rows_(
                        buf.copy_(src),
                        row_slot,
                        **slot_params,
                        max_steps=steps,
                        rows_per_launch=group,
                    )

                raw = median_seconds(grouped, cuda, reps, warmup)
                add(mode, steps, f"triton@rows{group}", max(raw - copy_s, 0.0), raw=raw)
        os.environ[backend.BACKEND_ENV] = "torch"
        try:
            add(mode, steps, "torch", median_seconds(batched, cuda, reps, warmup))
        finally:
            os.environ.pop(backend.BACKEND_ENV, None)
        ref_reps = max(3, reps // 10)
        ref_s = median_seconds(per_row, cuda, ref_reps, warmup=1)
        add(mode, steps, "reference", ref_s * rows / ref_rows, ref_rows < rows, ref_s)
        print(f"  timed B={rows} {mode} steps={steps}", flush=True)
    return rows_out


# -- report --------------------------------------------------------------------------


def print_table(timings: list[dict], bandwidth: float) -> list[str]:
    print(f"\ncopy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")
    header = (
        f"{'mode':<12}{'steps':>6}{'B':>6}{'floor':>10}{'copy':>10}{'triton':>10}"
        f"{'torch':>11}{'reference':>13}{'tri/floor':>10}{'torch/tri':>10}"
        f"{'ref/tri':>9}"
    )
    print(header + "\n" + "-" * len(header))
    keyed = {}
    for row in timings:
        keyed[(row["mode"], row["steps"], row["B"], row["provider"])] = row
    lines = []
    for mode, steps, rows in sorted(
        {(r["mode"], r["steps"] or 0, r["B"]) for r in timings}
    ):
        steps_key = steps or None

        def us(provider, mode=mode, steps_key=steps_key, rows=rows):
            return keyed[(mode, steps_key, rows, provider)]["us"]

        ref = keyed[(mode, steps_key, rows, "reference")]
        tri = max(us("triton"), 1e-3)
        print(
            f"{mode:<12}{steps or '-':>6}{rows:>6}{us('floor'):>10.1f}"
            f"{us('copy'):>10.1f}{us('triton'):>10.1f}{us('torch'):>11.1f}"
            f"{ref['us']:>12.0f}{'*' if ref['extrapolated'] else ' '}"
            f"{tri / us('floor'):>10.2f}{us('torch') / tri:>10.1f}"
            f"{ref['us'] / tri:>9.0f}"
        )
        if mode == "logits" and steps == 3:
            if rows >= 64:
                ok = tri <= 2 * us("floor")
                lines.append(
                    f"{'MET ' if ok else 'MISS'} logits steps 3 B={rows}: triton "
                    f"{tri:.1f} us <= 2 x floor {2 * us('floor'):.1f} us"
                )
            if rows == 1:
                lines.append(
                    f"{'MET ' if tri < 25 else 'MISS'} logits steps 3 B=1: triton "
                    f"{tri:.1f} us < 25 us"
                )
            if rows == 64:
                lines.append(
                    f"{'MET ' if ref['us'] >= 50 * tri else 'MISS'} logits steps 3 "
                    f"B=64: reference / triton = {ref['us'] / tri:.0f} >= 50"
                )
                lines.append(
                    f"{'MET ' if us('torch') >= 5 * tri else 'MISS'} logits steps 3 "
                    f"B=64: torch / triton = {us('torch') / tri:.1f} >= 5"
                )
    print("(all in microseconds; * = reference scaled per row from fewer rows)")
    sweep = sorted(
        {r["provider"] for r in timings if r["provider"].startswith("triton@")}
    )
    if sweep:
        print(
            "\nlogits mode, triton by block size and by row groups kept in L2"
            " (us; * = the default plan's block):"
        )
        print(
            f"{'steps':>6}{'B':>6}"
            + "".join(f"{p:>14}" for p in sweep)
            + f"{'planned':>11}"
        )
        for steps, rows in sorted(
            {(r["steps"], r["B"]) for r in timings if r["mode"] == "logits"}
        ):
            default = keyed[("logits", steps, rows, "triton")]
            cells = []
            for provider in sweep:
                if ("logits", steps, rows, provider) not in keyed:
                    cells.append(f"{'-':>14}")
                    continue
                value = keyed[("logits", steps, rows, provider)]["us"]
                planned = provider == f"triton@{default['planned_block']}"
                cells.append(f"{value:>13.1f}{'*' if planned else ' '}")
            print(f"{steps:>6}{rows:>6}" + "".join(cells) + f"  {default['us']:>9.1f}")
    print("\n".join(lines))
    return lines


def environment(device) -> dict:
    import numpy
    import triton

    cuda = device.type == "cuda"
    return {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(  # noqa: UP017 (3.10)
            timespec="seconds"
        ),
        "device": torch.cuda.get_device_name(device)
        if cuda
        else platform.processor() or platform.machine(),
        "sm_count": torch.cuda.get_device_properties(device).multi_processor_count
        if cuda
        else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes (CPU interpreter check)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    parser.add_argument("--steps", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--reference-rows",
        type=int,
        default=8,
        help="most rows the per-row loop is timed on (scaled per row beyond)",
    )
    parser.add_argument("--check-rows", type=int, default=8)
    parser.add_argument(
        "--sweep-blocks",
        type=int,
        nargs="*",
        default=None,
        help="block sizes the logits kernel is also timed with "
        "(default 1024 2048 4096; 1024 with --quick)",
    )
    parser.add_argument(
        "--group-rows",
        type=int,
        default=None,
        help="rows per launch group for the L2 variant (default: ~60%% of L2)",
    )
    parser.add_argument("--time-anyway", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick and args.group_rows is None:
        args.group_rows = 2
    if args.sweep_blocks is None:
        args.sweep_blocks = [1024] if args.quick else [1024, 2048, 4096]
    if args.quick:
        args.batches, args.vocab, args.steps = [1, 4], 4_099, [3]
        args.reps, args.warmup, args.reference_rows, args.check_rows = 3, 1, 2, 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("no GPU: run with TRITON_INTERPRET=1 (and --quick)", file=sys.stderr)
        return 2
    env = environment(device)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}")
    started = time.perf_counter()

    check_vocab = QWEN_VOCAB if not args.quick else args.vocab
    print(f"correctness (V = {check_vocab}, {args.check_rows} rows, float64 oracle):")
    checks = check_correctness(device, check_vocab, args.check_rows, seed=1234)
    correct = all(c["ok"] for c in checks)

    timings, targets, bandwidth = [], [], None
    if correct or args.time_anyway:
        bandwidth = copy_bandwidth(
            device, cuda, nbytes=(1 << 30) if not args.quick else (64 << 20), reps=20
        )
        print("timing:")
        for rows in args.batches:
            timings += time_batch(device, cuda, rows, args.vocab, args, bandwidth)
        targets = print_table(timings, bandwidth)
        if not cuda:
            print("(Triton interpreter on CPU: the timings and targets mean nothing)")
    else:
        print("correctness failed: no timings reported (--time-anyway to force)")

    result = {
        "environment": env,
        "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
        },
        "correct": correct,
        "checks": checks,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "timings": timings,
        "targets": targets,
        "seconds": time.perf_counter() - started,
    }
    out = args.out
    if out is None:
        name = "".join(c if c.isalnum() else "-" for c in env["device"]).strip("-")
        stamp = env["timestamp"].replace(":", "").replace("-", "")
        quick = "_quick" if args.quick else ""
        out = REPO / "bench" / "results" / f"gpu_check_{name}{quick}_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out} ({result['seconds']:.0f} s)")
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
