"""One-call GPU check of EM-INF's kernel path: correctness first, then what users pay.

1. Correctness (each check reports ok / FAIL and never stops the run), against the
   authors' per-row loop run in float64 (:mod:`em_inf.reference`; per-row TV <= 1e-5,
   finite logits within 5e-3, ``-inf`` kept, no NaN), V = 151,936:

   * both kernels with rows mapped to per-slot parameters out of order, a slot
     ``-1`` row, rows below the threshold, ``-inf`` and ``finfo.min`` masks; the
     temperature mode's entropy tolerance (``config.TEMPERATURE_RTOL``);
   * the fail-safe: NaN and ``+inf`` rows restored and counted, the accepted
     maxima (100 steps, lr 100, kl_weight 1000) finite; the ``stats`` counts;
   * the processor's step (:func:`em_inf.core.apply_to_rows`) replayed as CUDA
     graphs against the same step launched eagerly (bitwise, batch-invariant plan)
     and the oracle, with both modes, opted-out rows and speculative rows;
   * batch invariance: rows alone vs in batches, bitwise with the batch-invariant
     plan (required) and with the fast plan (recorded);
   * :mod:`em_inf.functional` dispatching to the kernels.

2. Timing (when 1 passed; ``--time-anyway`` overrides), B in {1, 8, 64, 256, 1024}:

   * ``processor``: host-inclusive wall time per decoding step of the processor's
     core on vLLM-like batches (:mod:`bench.gpu_steps`): the ``logits`` workload
     (preset ``default``, 3 steps) with CUDA graphs and with eager launches, and the
     ``mixed`` workload (half the rows off, both modes, speculative rows), every
     step with admissions and removals; each minus the same loop without EM-INF
     (fresh logits and the mapping upload, what vLLM does anyway);
   * ``triton``: the logits kernel alone (3 and 5 steps, the fast plan and the
     batch-invariant one, each block size, row groups kept in L2) and the
     temperature kernel, GPU time by CUDA events, the logits' refresh copy
     subtracted; ``torch``: :mod:`em_inf.functional` with ``EM_INF_BACKEND=torch``
     on the same GPU; ``reference``: the authors' per-row loop in float32 (timed on
     up to ``--reference-rows`` rows, scaled per row beyond: ``*``); ``floor``: one
     read + one write of the logits at the measured copy bandwidth.

   * ``first_steps``: each of a fresh step runner's first 10 processor steps and
     the next 100 (``mixed`` workload), without and then with the warm-up the
     processor runs while the engine starts (``StepRunner.warm_up``): the first
     request's cliff, and what the warm-up moves before ``/health``.

3. Sync check: 200 steps of the ``mixed`` workload at B = 64 under
   ``torch.cuda.set_sync_debug_mode("error")``, statistics snapshots included,
   while a dispatch hook audits every host <-> device copy (pinned and
   non-blocking, or it counts): 0 of each is the target.

Writes ``bench/results/gpu_check_<device>_<timestamp>.json`` (device, versions,
every number) and prints the tables next to the issue's targets. Runs without a
GPU under Triton's interpreter on tiny shapes, to prove it end to end::

    TRITON_INTERPRET=1 python -m bench.gpu_check --quick

Needs only torch, triton, numpy and a plain copy of this tree (no vLLM, no network).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench import gpu_steps
from bench.common import (
    environment,
    make_logits,
    median_seconds,
)
from em_inf import backend, counters, functional, reference
from em_inf.config import PRESETS, TEMPERATURE_RTOL
from em_inf.reference import (
    adaptive_temperature_oracle,
    em_inf_oracle,
    entropy,
    mismatch,
    settings_oracle,
)

REPO = Path(__file__).resolve().parents[1]

QWEN_VOCAB = 151_936
BATCHES = [1, 8, 64, 256, 1024]
F32 = torch.finfo(torch.float32)


# -- inputs --------------------------------------------------------------------------


def mask_some(logits: torch.Tensor, fraction: float, seed: int, value=-torch.inf):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(logits.shape, generator=gen) < fraction
    mask[:, 0] = False
    return logits.masked_fill(mask.to(logits.device), value)


def _as_masked(logits: torch.Tensor) -> torch.Tensor:
    """Values at or below -1e37 as -inf (what every path treats as masked)."""
    return logits.masked_fill(logits <= -1e37, -torch.inf)


def _oracle_rows(oracle, logits, row_slot, params) -> torch.Tensor:
    expected = _as_masked(logits).double().cpu().clone()
    for row, slot in enumerate(row_slot.tolist()):
        if slot >= 0:
            one = {
                k: (int(v[slot]) if k == "steps" else v[slot].item())
                for k, v in params.items()
            }
            expected[row] = oracle(expected[row : row + 1], **one)[0]
    return expected


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@contextlib.contextmanager
def kernel_backend(device: torch.device):
    """The processor's core on the kernels: CUDA takes them by default, CPU tensors
    only when forced (Triton's interpreter)."""
    os.environ.pop(backend.BACKEND_ENV, None)
    if device.type != "cuda":
        os.environ[backend.BACKEND_ENV] = "triton"
    try:
        assert backend.backend_for(device) == "triton"
        yield
    finally:
        os.environ.pop(backend.BACKEND_ENV, None)


# -- correctness ---------------------------------------------------------------------


class Checks:
    """Runs named checks, each recorded as ``{"check", "ok", "error"}``."""

    def __init__(self) -> None:
        self.results: list[dict] = []

    def run(self, name: str, fn: Callable[[], object]) -> None:
        try:
            fn()
            self.results.append({"check": name, "ok": True, "error": None})
        except AssertionError as exc:  # a mismatch: report it, keep going
            self.results.append({"check": name, "ok": False, "error": str(exc)[:800]})
        print(f"  {'ok  ' if self.results[-1]['ok'] else 'FAIL'} {name}", flush=True)

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.results)


def assert_ok(problem: str | None) -> None:
    """Raise the oracle mismatch ``problem`` (``None``: agreement)."""
    assert problem is None, problem


def check_kernels(checks: Checks, device, vocab: int, rows: int, seed: int) -> None:
    """Both kernels against the oracle; masks, tolerance, fail-safe, stats."""
    from em_inf.kernels import adaptive_temperature_rows_, em_inf_rows_

    logits = make_logits(rows, vocab, seed=seed, device=device)
    logits = mask_some(logits, 0.05, seed + 1)
    logits = mask_some(logits, 0.02, seed + 3, F32.min)
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
            assert torch.equal(out[logits <= -1e37], logits[logits <= -1e37])
            assert_ok(mismatch(_as_masked(out).cpu(), expected))
            assert torch.equal(out[-1], logits[-1]), "slot -1 row changed"
            assert torch.equal(out[rows // 2], logits[rows // 2]), "row below changed"

        checks.run(f"logits mode, steps {steps}, per-slot params, masks", run_logits)

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
        assert_ok(mismatch(_as_masked(out).cpu(), expected))
        assert torch.equal(out[-1], logits[-1]), "slot -1 row changed"
        check_temperature_tolerance(logits, out, row_slot, t_params)

    checks.run("temperature mode, per-slot params, masks, tolerance", run_temperature)
    checks.run("fail-safe and stats, both kernels", lambda: check_fail_safe(device))
    most = 100 if device.type == "cuda" else 10  # the interpreter replays k^2 / 2
    checks.run(
        f"logits mode at the accepted maxima ({most} steps, lr 100, kl_weight 1000)",
        lambda: check_extreme_settings(device, vocab, most),
    )


def check_temperature_tolerance(logits, out, row_slot, params) -> None:
    """|H(z / T) - target| <= TEMPERATURE_RTOL target in float64 for the applied T,
    up to what a float32 T resolves (|dH/du| 2^-23); rows pinned at an end skipped."""
    z = _as_masked(logits).double().cpu()
    applied = out.double().cpu()
    for row, slot in enumerate(row_slot.tolist()):
        if slot < 0:
            continue
        h0 = entropy(z[row]).item()
        threshold = params["threshold"][slot].item()
        if h0 <= threshold:
            continue
        target = max(threshold, params["alpha"][slot].item() * h0)
        top = z[row].abs().nan_to_num(posinf=0.0).argmax()
        b = (applied[row, top] / z[row, top]).item()
        t_min, t_max = params["t_min"][slot].item(), params["t_max"][slot].item()
        if not t_min * (1 + 1e-6) < 1 / b < t_max * (1 - 1e-6):
            continue
        finite = torch.isfinite(z[row])
        q = torch.softmax(z[row] * b, -1)[finite]
        zf = z[row][finite]
        slope = b * b * ((q * zf * zf).sum() - (q * zf).sum() ** 2).item()
        reached = entropy(z[row] * b).item()
        allowed = TEMPERATURE_RTOL * target + slope * 2.0**-23
        assert abs(reached - target) <= allowed, (row, reached, target, allowed)


def check_fail_safe(device) -> None:
    """NaN / +inf rows come back bit-identical and are counted; an overflowing
    temperature restores its row; the other rows' counts add up."""
    from em_inf.kernels import adaptive_temperature_rows_, em_inf_rows_

    logits = make_logits(4, 3_000, seed=7, device=device)
    logits[1, 5] = torch.nan
    logits[2, 9] = torch.inf
    logits[3, 1] = 200.0  # below every threshold
    slot = torch.zeros(4, dtype=torch.int32, device=device)
    stats = torch.zeros(counters.WIDTH, dtype=torch.int64, device=device)
    out = logits.clone()
    params = dict(threshold=0.3, kl_weight=0.05, lr=0.1, steps=3)
    em_inf_rows_(
        out,
        slot,
        **{
            k: torch.tensor(
                [v], device=device, dtype=torch.int32 if k == "steps" else None
            )
            for k, v in params.items()
        },
        max_steps=3,
        stats=stats,
    )
    for row in (1, 2, 3):
        assert _bits_equal(out[row], logits[row]), f"row {row} changed"
    assert stats.tolist()[:4] == [1, 3, 2, 4], stats.tolist()
    huge = torch.tensor([[1e35, 1e35, 0.0, -1e35]], device=device)
    stats.zero_()
    t_params = {
        "threshold": torch.zeros(1, device=device),
        "alpha": torch.full((1,), 1e-6, device=device),
        "t_min": torch.full((1,), 1e-4, device=device),
        "t_max": torch.full((1,), 1e-4, device=device),
    }
    out = huge.clone()
    adaptive_temperature_rows_(out, slot[:1], **t_params, stats=stats)
    assert _bits_equal(out, huge) and stats.tolist()[2] == 1, stats.tolist()[:4]


def check_extreme_settings(device, vocab: int, steps: int) -> None:
    """The accepted maxima on hostile rows: finite wherever the input is finite,
    masks kept, nothing restored."""
    from em_inf.kernels import em_inf_rows_

    logits = make_logits(3, vocab, seed=11, device=device)
    logits[0] = logits[0] * 1e30
    logits[1, ::3] = F32.min
    logits[2, 0] = F32.max * 0.9
    params = {
        "threshold": torch.zeros(1, device=device),
        "kl_weight": torch.full((1,), 1e3, device=device),
        "lr": torch.full((1,), 1e2, device=device),
        "steps": torch.full((1,), steps, dtype=torch.int32, device=device),
    }
    stats = torch.zeros(counters.WIDTH, dtype=torch.int64, device=device)
    out = logits.clone()
    em_inf_rows_(
        out, torch.zeros(3, dtype=torch.int32, device=device), **params, stats=stats
    )
    assert torch.isfinite(out[torch.isfinite(logits)]).all(), "non-finite output"
    masked = logits <= -1e37
    assert torch.equal(out[masked], logits[masked]), "a masked entry changed"
    assert stats.tolist()[2] == 0, stats.tolist()


def check_processor(checks: Checks, device, vocab: int, seed: int) -> None:
    """The processor's step through CUDA graphs vs eager launches vs the oracle."""
    from em_inf.kernels.step import StepRunner

    steps = gpu_steps.schedule("mixed", 12, 3, seed)

    def run(graphs: bool) -> list[tuple[torch.Tensor, list]]:
        """Each step's output and its rows' settings."""
        source = mask_some(make_logits(12, vocab, seed=seed, device=device), 0.05, seed)
        harness = gpu_steps.Harness(source, steps, StepRunner(device, graphs=graphs))
        outputs, configs = [], {}
        for step in steps:  # the harness takes them in this order
            configs.update(step.admitted)
            harness.em_inf_step()
            per_row = [configs[int(slot)] for slot in step.row_slots]
            outputs.append((harness.logits.clone(), per_row))
        return source, outputs

    def graphs_vs_eager():
        os.environ["EM_INF_BATCH_INVARIANT"] = "1"
        try:
            with kernel_backend(device):
                (source, graphs), (_, eager) = run(True), run(False)
        finally:
            os.environ.pop("EM_INF_BATCH_INVARIANT", None)
        for (g_out, per_row), (e_out, _) in zip(graphs, eager, strict=True):
            assert _bits_equal(g_out, e_out), "graph replay differs from eager"
            assert_ok(mismatch(g_out.cpu(), settings_oracle(source.cpu(), per_row)))

    checks.run(
        "processor step: CUDA graphs == eager (bitwise) == oracle", graphs_vs_eager
    )


def check_invariance(checks: Checks, device, vocab: int, seed: int) -> dict:
    """Rows alone vs in batches of 1-64 rows; returns whether the fast plan held."""
    from em_inf.kernels import em_inf_rows_

    pool = make_logits(16, vocab, seed=seed, device=device)
    params = {
        "threshold": torch.tensor([0.3, 0.0], device=device),
        "kl_weight": torch.tensor([0.05, 0.0], device=device),
        "lr": torch.tensor([0.1, 0.2], device=device),
        "steps": torch.tensor([3, 2], dtype=torch.int32, device=device),
    }
    slots = (torch.arange(16, device=device) % 2).to(torch.int32)
    gen = torch.Generator().manual_seed(seed)
    picks = [torch.randint(0, 16, (n,), generator=gen) for n in (1, 7, 64)]

    def invariant() -> bool:
        def run(rows):
            out = pool[rows].clone()
            em_inf_rows_(out, slots[rows], **params, max_steps=3)
            return out

        alone = torch.cat([run([i]) for i in range(16)])
        return all(
            _bits_equal(run(pick.tolist()), alone[pick.to(device)]) for pick in picks
        )

    fast = {}

    def with_plan(env: str | None):
        def check():
            if env:
                os.environ["EM_INF_BATCH_INVARIANT"] = "1"
            try:
                held = invariant()
            finally:
                os.environ.pop("EM_INF_BATCH_INVARIANT", None)
            if env:
                assert held, "a row's bits changed with its batch"
            else:
                fast["bitwise"] = held

        return check

    checks.run("batch invariance, batch-invariant plan (bitwise)", with_plan("1"))
    checks.run("batch invariance, fast plan (recorded, not required)", with_plan(None))
    return fast


def check_functional(checks: Checks, device, vocab: int, seed: int) -> None:
    logits = make_logits(4, vocab, seed=seed, device=device)

    def run():
        # CUDA takes Triton by default; CPU tensors only when forced (interpreter).
        os.environ.pop(backend.BACKEND_ENV, None)
        if device.type != "cuda":
            os.environ[backend.BACKEND_ENV] = "triton"
        try:
            assert backend.backend_for(device) == "triton"
            params = dict(threshold=0.3, kl_weight=0.05, lr=0.1, steps=3)
            out = functional.em_inf(logits, **params)
            assert_ok(
                mismatch(out.cpu(), em_inf_oracle(logits.double().cpu(), **params))
            )
        finally:
            os.environ.pop(backend.BACKEND_ENV, None)

    checks.run("em_inf.functional dispatches to Triton and matches", run)


# -- timing: the kernels ---------------------------------------------------------------


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


def time_kernels(device, cuda: bool, rows: int, vocab: int, args, bandwidth):
    """Kernel, torch-path, reference and floor times of one batch size."""
    from em_inf.kernels import adaptive_temperature_rows_
    from em_inf.kernels._common import INVARIANT_BLOCK, plan_block
    from em_inf.kernels.logits_mode import em_inf_rows_with_plan_

    src = make_logits(rows, vocab, seed=rows, device=device)
    buf = torch.empty_like(src)
    row_slot = torch.arange(rows, dtype=torch.int32, device=device)
    reps, warmup = args.reps, args.warmup
    copy_s = median_seconds(lambda: buf.copy_(src), cuda, reps, warmup)
    floor_s = 2 * src.numel() * 4 / bandwidth
    planned_block = plan_block(rows, vocab, device)
    counted = torch.zeros(counters.WIDTH, dtype=torch.int64, device=device)
    out = []

    def add(mode, steps, provider, seconds, extrapolated=False, raw=None):
        out.append(
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

    def add_kernel(mode, steps, provider, fn):
        raw = median_seconds(fn, cuda, reps, warmup)
        add(mode, steps, provider, max(raw - copy_s, 0.0), raw=raw)

    ref_rows = min(rows, args.reference_rows)
    for mode, steps in [("logits", s) for s in args.steps] + [("temperature", None)]:
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

            def kernel(
                block=None, group=None, slot_params=slot_params, steps=steps, stats=None
            ):
                em_inf_rows_with_plan_(
                    buf.copy_(src),
                    row_slot,
                    **slot_params,
                    max_steps=steps,
                    block=block,
                    rows_per_launch=group,
                    stats=stats,
                )

            add_kernel(mode, steps, "triton", kernel)
            # The same launches counting rows and entropies (what the processor
            # runs): the cost of EM-INF's metrics is this row against "triton".
            add_kernel(
                mode, steps, "triton+counting", lambda k=kernel: k(stats=counted)
            )
            add_kernel(
                mode, steps, "triton@invariant", lambda k=kernel: k(INVARIANT_BLOCK)
            )
            for block in args.sweep_blocks:
                add_kernel(
                    mode, steps, f"triton@{block}", lambda b=block, k=kernel: k(b)
                )
            group = args.group_rows or l2_rows(device, vocab)
            if rows > group:  # row groups whose logits stay in L2 between passes
                add_kernel(
                    mode,
                    steps,
                    f"triton@rows{group}",
                    lambda g=group, k=kernel: k(None, g),
                )

            def batched(fn_params=fn_params):
                functional.em_inf(src, **fn_params)

            def per_row(fn_params=fn_params):
                for row in src[:ref_rows]:
                    reference.em_inf_row(row, **fn_params)

        else:
            cfg = PRESETS["adaptive-temperature"]
            slot_params = {
                name: torch.full((rows,), getattr(cfg, name), device=device)
                for name in ("threshold", "alpha", "t_min", "t_max")
            }
            fn_params = {name: getattr(cfg, name) for name in slot_params}

            def kernel(slot_params=slot_params, stats=None):
                adaptive_temperature_rows_(
                    buf.copy_(src), row_slot, **slot_params, stats=stats
                )

            add_kernel(mode, steps, "triton", kernel)
            add_kernel(
                mode, steps, "triton+counting", lambda k=kernel: k(stats=counted)
            )

            def batched(fn_params=fn_params):
                functional.adaptive_temperature(src, **fn_params)

            def per_row(fn_params=fn_params):
                for row in src[:ref_rows]:
                    reference.adaptive_temperature_row(row, **fn_params)

        os.environ[backend.BACKEND_ENV] = "torch"
        try:
            add(mode, steps, "torch", median_seconds(batched, cuda, reps, warmup))
        finally:
            os.environ.pop(backend.BACKEND_ENV, None)
        ref_s = median_seconds(per_row, cuda, max(3, reps // 10), warmup=1)
        add(mode, steps, "reference", ref_s * rows / ref_rows, ref_rows < rows, ref_s)
        print(f"  timed kernels B={rows} {mode} steps={steps}", flush=True)
    return out


# -- timing: the processor's step --------------------------------------------------


def time_processor(device, rows: int, vocab: int, args) -> list[dict]:
    """Host-inclusive wall time per step of both workloads (see bench.gpu_steps)."""
    from em_inf.kernels.step import StepRunner

    out = []
    n_steps, warmup = args.processor_steps, args.warmup
    for kind, graphs in (("logits", True), ("logits", False), ("mixed", True)):
        steps = gpu_steps.schedule(kind, rows, 1 + warmup + 2 * n_steps, seed=rows)
        source = make_logits(rows, vocab, seed=rows, device=device)
        harness = gpu_steps.Harness(source, steps, StepRunner(device, graphs=graphs))
        with kernel_backend(device):
            base = harness.seconds_per_step(False, n_steps, warmup)
            total = harness.seconds_per_step(True, n_steps, warmup)
        out.append(
            {
                "workload": kind,
                "graphs": graphs,
                "B": rows,
                "V": vocab,
                "baseline_us": base * 1e6,
                "step_us": total * 1e6,
                "us": max(total - base, 0.0) * 1e6,
            }
        )
        print(
            f"  timed processor B={rows} {kind} graphs={graphs}: "
            f"{out[-1]['us']:.1f} us per step",
            flush=True,
        )
    return out


def first_steps(device, rows: int, vocab: int, n_first: int, n_next: int) -> list:
    """Wall time of each of a fresh step runner's first ``n_first`` processor steps
    and of the ``n_next`` after them (host-inclusive, synchronised per step), on
    :func:`bench.gpu_steps.schedule`'s ``mixed`` workload: without the start-up
    warm-up, then after ``StepRunner.warm_up`` as the processor runs it while the
    engine starts (its own seconds reported). Kernels compiled earlier in this
    process, or cached on disk by Triton, are not compiled again: the first row
    then shows capture, not compilation."""
    from em_inf.kernels.step import StepRunner

    out = []
    for warmed in (False, True):
        schedule = gpu_steps.schedule("mixed", rows, 1 + n_first + n_next, seed=rows)
        source = make_logits(rows, vocab, seed=rows, device=device)
        runner = StepRunner(device, graphs=True, max_rows=rows, n_cols=vocab)
        harness = gpu_steps.Harness(source, schedule, runner)
        with kernel_backend(device):
            started = time.perf_counter()
            if warmed:
                runner.warm_up(
                    rows,
                    vocab,
                    gpu_steps.LOGITS.steps,
                    harness.settings.tables(device),
                    harness.stats.counters(device),
                )
                gpu_steps._synchronize(device)
            warm_up_s = time.perf_counter() - started
            seconds = []
            for _ in range(n_first + n_next):
                started = time.perf_counter()
                harness.em_inf_step()
                gpu_steps._synchronize(device)
                seconds.append(time.perf_counter() - started)
        first, later = seconds[:n_first], seconds[n_first:]
        out.append(
            {
                "warm_up": warmed,
                "B": rows,
                "V": vocab,
                "warm_up_s": warm_up_s,
                f"first_{n_first}": {"p50_ms": 1e3 * statistics.median(first),
                                     "max_ms": 1e3 * max(first)},
                f"next_{n_next}": {"p50_ms": 1e3 * statistics.median(later),
                                   "max_ms": 1e3 * max(later)},
            }
        )  # fmt: skip
        print(
            f"  first steps B={rows} warm_up={warmed}: warm-up {warm_up_s:.2f} s, "
            f"first {n_first} p50 {out[-1][f'first_{n_first}']['p50_ms']:.2f} ms "
            f"(max {out[-1][f'first_{n_first}']['max_ms']:.2f}), next {n_next} p50 "
            f"{out[-1][f'next_{n_next}']['p50_ms']:.2f} ms",
            flush=True,
        )
    return out


# -- sync check ----------------------------------------------------------------------


class CopyAudit(TorchDispatchMode):
    """Counts host <-> device copies that would block the host: from or to
    pageable memory, or with ``non_blocking=False``."""

    def __init__(self) -> None:
        super().__init__()
        self.blocking: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        if name.startswith("copy_"):
            dst, src = args[0], args[1]
            non_blocking = (
                args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            )
            host = [t for t in (dst, src) if t.device.type == "cpu"]
            if host and dst.device != src.device:
                if not non_blocking or not all(t.is_pinned() for t in host):
                    self.blocking.append(f"{name} {src.device}->{dst.device}")
        elif name.startswith("_to_copy"):
            target = kwargs.get("device")
            if target is not None and torch.device(target) != args[0].device:
                if not kwargs.get("non_blocking", False):
                    self.blocking.append(f"{name} {args[0].device}->{target}")
        return func(*args, **kwargs)


def sync_check(device, vocab: int, rows: int, n_steps: int) -> dict:
    """``n_steps`` mixed-workload steps (graphs, statistics snapshots every few
    steps) under ``set_sync_debug_mode("error")`` and the copy audit."""
    from em_inf.kernels.step import StepRunner

    steps = gpu_steps.schedule("mixed", rows, n_steps + 2, seed=5)
    source = make_logits(rows, vocab, seed=5, device=device)
    harness = gpu_steps.Harness(
        source, steps, StepRunner(device, graphs=True), stats_interval=1e-3
    )
    with kernel_backend(device):
        return _sync_check(harness, device, n_steps, rows)


def _sync_check(harness, device, n_steps: int, rows: int) -> dict:
    harness.em_inf_step()  # first sight of the shape: compile + capture (one-off)
    gpu_steps._synchronize(device)
    cuda = device.type == "cuda"
    audit, syncs = CopyAudit(), []
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught, audit:
            warnings.simplefilter("always")
            for _ in range(n_steps):
                harness.em_inf_step()
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    gpu_steps._synchronize(device)
    if cuda and not syncs:  # the strict mode too: any sync raises
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(min(n_steps, 20)):
                harness.em_inf_step()
        except RuntimeError as error:
            syncs.append(str(error))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {
        "steps": n_steps,
        "B": rows,
        "sync_debug_mode": "warn + error" if cuda else "n/a (no CUDA)",
        "synchronizing_calls": len(syncs),
        "sync_messages": syncs[:5],
        "blocking_copies": len(audit.blocking),
        "blocking_copy_examples": audit.blocking[:5],
        "log_lines": len(harness.lines),
        "log_line_example": harness.lines[-1] if harness.lines else None,
    }


# -- report --------------------------------------------------------------------------


def device_memory(device, vocab: int, batches: list[int]) -> list[dict]:
    """em-inf's device memory per row bucket: what the step runner reserves at
    start-up for steps of up to ``rows`` rows (the scratch, sized for every step
    count a request may ask), and on CUDA what the device lost from that and from
    running and capturing one step per shape (``torch.cuda.mem_get_info``: graph
    pools and driver memory included)."""
    from em_inf.core import SlotSettings
    from em_inf.kernels.step import StepRunner

    slots = SlotSettings(1, device)
    slots.set(0, PRESETS["default"].replace(steps=5, threshold=0.0))
    tables = slots.tables(device)
    rows_out = []
    for rows in batches:
        free_before = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        runner = StepRunner(
            device, graphs=device.type == "cuda", max_rows=rows, n_cols=vocab
        )
        source = torch.randn(rows, vocab, device=device)
        row_slot = torch.zeros(rows, dtype=torch.int32, device=device)
        for _ in range(2):  # the first step runs eagerly, then it is captured
            runner.run(source.clone(), row_slot, 5, True, tables, None)
        measured = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            measured = free_before - torch.cuda.mem_get_info(device)[0]
            measured -= source.numel() * 4 * 2  # the inputs and their clone
        rows_out.append(
            {
                "rows": rows,
                "reserved_bytes": runner.device_bytes(),
                "device_bytes_after_steps": measured,
            }
        )
        print(
            f"  B={rows:<4} reserved {runner.device_bytes() / 2**20:8.2f} MiB"
            + ("" if measured is None else f", device lost {measured / 2**20:8.2f} MiB")
        )
        del runner, source
    return rows_out


def print_kernel_table(timings: list[dict], bandwidth: float) -> dict:
    print(f"\ncopy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")
    header = (
        f"{'mode':<12}{'steps':>6}{'B':>6}{'floor':>10}{'triton':>10}{'invariant':>11}"
        f"{'torch':>11}{'reference':>13}{'tri/floor':>10}{'torch/tri':>10}"
        f"{'counting':>10}"
    )
    print(header + "\n" + "-" * len(header))
    keyed = {(r["mode"], r["steps"], r["B"], r["provider"]): r for r in timings}
    for mode, steps, rows in sorted(
        {(r["mode"], r["steps"] or 0, r["B"]) for r in timings}
    ):
        key = (mode, steps or None, rows)
        tri = max(keyed[(*key, "triton")]["us"], 1e-3)
        inv = keyed.get((*key, "triton@invariant"))
        ref = keyed[(*key, "reference")]
        print(
            f"{mode:<12}{steps or '-':>6}{rows:>6}{keyed[(*key, 'floor')]['us']:>10.1f}"
            f"{tri:>10.1f}{inv['us'] if inv else float('nan'):>11.1f}"
            f"{keyed[(*key, 'torch')]['us']:>11.1f}"
            f"{ref['us']:>12.0f}{'*' if ref['extrapolated'] else ' '}"
            f"{tri / keyed[(*key, 'floor')]['us']:>10.2f}"
            f"{keyed[(*key, 'torch')]['us'] / tri:>10.1f}"
            f"{100 * (keyed[(*key, 'triton+counting')]['us'] / tri - 1):>9.1f}%"
        )
    print(
        "(microseconds of GPU time; * = reference scaled per row from fewer rows;\n"
        " counting: the cost of counting rows and entropies, in % of triton)"
    )
    sweep = sorted(
        {r["provider"] for r in timings if r["provider"].startswith("triton@")}
    )
    print("\nlogits mode, triton by plan (us; * = the fast plan's block):")
    print(f"{'steps':>6}{'B':>6}" + "".join(f"{p:>18}" for p in sweep))
    for steps, rows in sorted(
        {(r["steps"], r["B"]) for r in timings if r["mode"] == "logits"}
    ):
        planned = keyed[("logits", steps, rows, "triton")]["planned_block"]
        cells = []
        for provider in sweep:
            row = keyed.get(("logits", steps, rows, provider))
            mark = "*" if provider == f"triton@{planned}" else " "
            cells.append(f"{row['us']:>17.1f}{mark}" if row else f"{'-':>18}")
        print(f"{steps:>6}{rows:>6}" + "".join(cells))
    return keyed


def print_processor_table(processor: list[dict], keyed: dict) -> None:
    print("\nprocessor step, host-inclusive wall time per step minus the harness (us):")
    header = (
        f"{'B':>6}{'harness':>10}{'logits+graphs':>15}{'logits eager':>14}"
        f"{'mixed+graphs':>14}{'kernels alone':>15}"
    )
    print(header + "\n" + "-" * len(header))
    by = {(p["workload"], p["graphs"], p["B"]): p for p in processor}
    for rows in sorted({p["B"] for p in processor}):
        kernel = keyed.get(("logits", 3, rows, "triton"))
        print(
            f"{rows:>6}{by[('logits', True, rows)]['baseline_us']:>10.1f}"
            f"{by[('logits', True, rows)]['us']:>15.1f}"
            f"{by[('logits', False, rows)]['us']:>14.1f}"
            f"{by[('mixed', True, rows)]['us']:>14.1f}"
            f"{kernel['us'] if kernel else float('nan'):>15.1f}"
        )


def targets(keyed: dict, processor: list[dict], sync: dict | None) -> list[str]:
    """The issue's targets (logits mode, 3 steps, V = 151,936), each MET or MISS."""
    lines = []

    def line(ok: bool, text: str) -> None:
        lines.append(f"{'MET ' if ok else 'MISS'} {text}")

    by = {(p["workload"], p["graphs"], p["B"]): p["us"] for p in processor}
    if ("logits", True, 1) in by:
        us = by[("logits", True, 1)]
        line(
            us <= 25,
            f"processor path B=1: {us:.1f} us <= 25 us (goal 10: "
            f"{'met' if us <= 10 else 'not met'})",
        )
    for rows in sorted({k[2] for k in keyed if k[0] == "logits" and k[1] == 3}):
        tri = keyed[("logits", 3, rows, "triton")]["us"]
        floor = keyed[("logits", 3, rows, "floor")]["us"]
        if rows >= 64:
            line(
                tri <= 2 * floor,
                f"kernels B={rows}: {tri / floor:.2f}x the "
                f"read-once-write-once floor <= 2x (goal 1.3x)",
            )
        if rows == 64:
            torch_us = keyed[("logits", 3, rows, "torch")]["us"]
            line(
                torch_us >= 5 * tri,
                f"B=64: torch path / kernels = {torch_us / max(tri, 1e-3):.1f} >= 5",
            )
            if ("logits", True, 64) in by:
                proc = by[("logits", True, 64)]
                line(
                    proc <= 1.1 * tri,
                    f"B=64: processor path {proc:.1f} us within "
                    f"10% of the kernels alone {tri:.1f} us",
                )
    if sync is not None:
        total = sync["synchronizing_calls"] + sync["blocking_copies"]
        line(
            total == 0,
            f"sync check: {sync['synchronizing_calls']} synchronizing "
            f"calls and {sync['blocking_copies']} blocking copies in "
            f"{sync['steps']} steps (target 0)",
        )
    print("\n" + "\n".join(lines))
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes (CPU interpreter check)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    parser.add_argument("--steps", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--processor-steps", type=int, default=100)
    parser.add_argument("--first-steps", type=int, default=10)
    parser.add_argument("--next-steps", type=int, default=100)
    parser.add_argument("--sync-steps", type=int, default=200)
    parser.add_argument("--sync-batch", type=int, default=64)
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
        args.processor_steps, args.sync_steps, args.sync_batch = 2, 4, 4
        args.first_steps, args.next_steps = 2, 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("no GPU: run with TRITON_INTERPRET=1 (and --quick)", file=sys.stderr)
        return 2
    if not cuda:  # the interpreter computes both sides of every select with numpy
        numpy.seterr(all="ignore")
    env = environment(device)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}")
    started = time.perf_counter()

    check_vocab = QWEN_VOCAB if not args.quick else args.vocab
    print(f"correctness (V = {check_vocab}, float64 oracle):")
    checks = Checks()
    check_kernels(checks, device, check_vocab, args.check_rows, seed=1234)
    check_processor(checks, device, check_vocab if not args.quick else 2_000, seed=3)
    fast_plan = check_invariance(checks, device, args.vocab if args.quick else 8_192, 9)
    check_functional(checks, device, check_vocab, seed=4)

    kernels, processor, sync, lines, bandwidth, memory = [], [], None, [], None, []
    first = []
    if checks.ok or args.time_anyway:
        bandwidth = copy_bandwidth(
            device, cuda, nbytes=(1 << 30) if not args.quick else (64 << 20), reps=20
        )
        print(f"first steps ({args.first_steps} then {args.next_steps}):")
        for rows in args.batches:
            first += first_steps(
                device, rows, args.vocab, args.first_steps, args.next_steps
            )
        print("timing:")
        for rows in args.batches:
            kernels += time_kernels(device, cuda, rows, args.vocab, args, bandwidth)
            processor += time_processor(device, rows, args.vocab, args)
        print(f"em-inf device memory (V = {args.vocab}):")
        memory = device_memory(device, args.vocab, args.batches)
        print(f"sync check ({args.sync_steps} steps, B = {args.sync_batch}):")
        sync = sync_check(device, args.vocab, args.sync_batch, args.sync_steps)
        print(f"  {sync}")
        keyed = print_kernel_table(kernels, bandwidth)
        print_processor_table(processor, keyed)
        lines = targets(keyed, processor, sync)
        if not cuda:
            print("(Triton interpreter on CPU: the timings and targets mean nothing)")
    else:
        print("correctness failed: no timings reported (--time-anyway to force)")

    result = {
        "environment": env,
        "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
        },
        "correct": checks.ok,
        "checks": checks.results,
        "fast_plan_batch_invariant": fast_plan.get("bitwise"),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "timings": kernels,
        "processor": processor,
        "first_steps": first,
        "sync_check": sync,
        "device_memory": memory,
        "targets": lines,
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
    return 0 if checks.ok else 1


if __name__ == "__main__":
    sys.exit(main())
