"""bench/latency.py and bench/e2e.py helpers, run for real on small shapes."""

from __future__ import annotations

import json
import math
import mmap
import os
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import latency
from bench.plots import main as plots_main
from em_inf import backend, cpu_backend


def test_inputs_are_reproducible_and_far_above_every_threshold():
    logits = latency.make_logits(4, 5000, seed=3)
    assert logits.shape == (4, 5000) and logits.dtype == torch.float32
    assert torch.equal(logits, latency.make_logits(4, 5000, seed=3))
    log_q = torch.log_softmax(logits, dim=-1)
    entropy = -(log_q.exp() * log_q).sum(-1)
    assert bool((entropy > 1.0).all())  # every row runs every step


@pytest.mark.parametrize("mode,steps", [("logits", 3), ("temperature", None)])
def test_measure_times_every_implementation_on_the_same_case(mode, steps):
    case = latency.Case(mode, batch=3, vocab=2048, steps=steps)
    rows = latency.measure(case, repeats=2, cuda=False, skip_reference=False)
    assert [r["impl"] for r in rows] == ["reference", "cpu", "torch", "floor"]
    ref, *fast, floor = rows
    for row in rows:
        assert row["repeats"] == 2
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["achieved_GBps"] > 0
        assert row["floor_ms"] == pytest.approx(floor["median_ms"])
        assert row["x_floor"] == pytest.approx(row["median_ms"] / floor["median_ms"])
        assert row["minor_faults_median"] >= 0
    assert ref["speedup_vs_reference"] == pytest.approx(1.0)
    for row in fast:
        assert row["speedup_vs_reference"] == pytest.approx(
            ref["median_ms"] / row["median_ms"]
        )
        if mode == "logits":  # the batched paths agree with the per-row loop
            assert row["max_abs_diff_vs_reference"] < 1e-3


def test_page_faults_counted_are_the_fresh_pages_touched():
    pages = 512
    with mmap.mmap(-1, pages * mmap.PAGESIZE) as fresh:
        fresh.madvise(mmap.MADV_NOHUGEPAGE)  # one 4 KiB fault per page
        before = latency._minor_faults()
        for page in range(pages):
            fresh[page * mmap.PAGESIZE] = 1
        taken = latency._minor_faults() - before
    assert pages <= taken < pages + 64, f"{taken} faults for {pages} fresh pages"


@pytest.mark.parametrize("chosen", [None, "torch"])
def test_cpu_cell_forces_the_backend_only_where_the_environment_chose_another(
    chosen, monkeypatch
):
    """The cell times what a caller pays: no write of EM_INF_BACKEND around the call
    when the compiled kernels are the default, a forced call when they are not;
    either way the compiled kernels' output."""
    if not cpu_backend.available():
        pytest.skip(cpu_backend.unavailable_reason())
    if chosen is None:
        monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(backend.BACKEND_ENV, chosen)
    entered = []
    real = latency._forced_backend

    def counted(name):
        entered.append(name)
        return real(name)

    monkeypatch.setattr(latency, "_forced_backend", counted)
    case = latency.Case("logits", batch=3, vocab=2048, steps=3)
    logits = latency.make_logits(3, 2048, seed=5)
    out = latency.implementations(case, logits, cuda=False)["cpu"]()
    assert entered == ([] if chosen is None else ["cpu"])
    assert os.environ.get(backend.BACKEND_ENV) == chosen
    process, columns = latency.kernel_entry(case)
    expected = logits.clone()
    process(expected, *columns)
    assert torch.equal(out, expected)


def test_grid_passes_pool_their_samples_per_cell():
    cases = [
        latency.Case("logits", batch=2, vocab=512, steps=3),
        latency.Case("temperature", batch=2, vocab=512, steps=None),
    ]
    rows = latency.measure_grid(cases, repeats=4, cuda=False, passes=2)
    impls = ["reference", "cpu", "torch", "floor"]
    assert [(r["mode"], r["impl"]) for r in rows] == [
        (mode, impl) for mode in ("logits", "temperature") for impl in impls
    ]
    assert all(r["repeats"] == 4 for r in rows)  # 2 rounds in each of 2 passes
    skipped = latency.measure_grid(
        cases[:1], repeats=1, cuda=False, no_reference_above=1
    )
    assert [r["impl"] for r in skipped] == impls[1:]
    assert skipped[0]["speedup_vs_reference"] is None


def test_latency_cli_writes_json_and_a_plot_drawn_from_it(tmp_path):
    out = tmp_path / "latency.json"
    argv = ["--batch", "2", "--vocab", "1024", "--steps", "3", "--repeats", "1"]
    argv += ["--min-seconds", "0", "--warmup", "0", "--passes", "2", "--breakdown"]
    assert latency.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "latency"
    cells = {(r["mode"], r["impl"]) for r in result["rows"]}
    assert cells == {
        (mode, impl)
        for mode in ("logits", "temperature")
        for impl in ("reference", "cpu", "torch", "floor")
    }
    env = result["environment"]
    assert env["cpu_backend"] == "cpu" and env["cpu_model"]
    assert len(env["loadavg_start"]) == len(env["loadavg_end"]) == 3
    # Both builds were timed (which is faster is the machine's business, not a
    # property of the report: a loaded machine may stall the cached one).
    build = env["cpu_kernels_build_s"]
    assert set(build) == {"cold", "cached"}
    assert all(math.isfinite(t) and t >= 0 for t in build.values()), build
    assert result["breakdown"]["floor_ms"] > 0  # (differences of noisy times)
    assert len(result["breakdown"]["parts_in_floors"]) == 4
    png = out.with_suffix(".png")
    png.unlink()
    assert plots_main([str(out)]) == 0  # redraw from the JSON alone
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_e2e_metrics_come_from_vllm_request_timestamps():
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.v1.metrics.stats import RequestStateStats

    from bench.e2e import run_metrics

    def output(first: float, last: float, tokens: int) -> RequestOutput:
        stats = RequestStateStats(first_token_ts=first, last_token_ts=last)
        completion = CompletionOutput(
            index=0,
            text="",
            token_ids=list(range(tokens)),
            cumulative_logprob=None,
            logprobs=None,
        )
        return RequestOutput("r", None, [1], None, [completion], True, metrics=stats)

    # Two requests of 11 tokens: 10 decode steps each, 0.5 s and 1.0 s of decoding.
    metrics = run_metrics([output(1.0, 1.5, 11), output(1.0, 2.0, 11)], wall=2.5)
    assert metrics["generated_tokens"] == 22
    # decode rates 10 / 0.5 s and 10 / 1.0 s: 30 tokens/s together; the first
    # tokens' times do not enter (a request admitted later is not idle time)
    assert metrics["decode_tokens_per_s"] == pytest.approx(10 / 0.5 + 10 / 1.0)
    later = run_metrics([output(1.0, 1.5, 11), output(1.4, 2.4, 11)], wall=2.5)
    assert later["decode_tokens_per_s"] == pytest.approx(10 / 0.5 + 10 / 1.0)
    assert metrics["inter_token_latency_ms"] == pytest.approx(75.0)  # median of 50, 100
    assert metrics["end_to_end_tokens_per_s"] == pytest.approx(22 / 2.5)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(0.5, 1.5), min_size=1, max_size=120),
    st.sampled_from([0.9, 0.95, 0.99]),
)
def test_e2e_median_interval_is_the_sign_tests(values, confidence):
    from fractions import Fraction

    from bench.e2e import median_interval

    n, tail = len(values), Fraction((1 - confidence) / 2)

    def below(k: int) -> Fraction:  # P(Binomial(n, 1/2) < k), exactly
        return sum((Fraction(math.comb(n, i), 2**n) for i in range(k)), Fraction(0))

    k = max(k for k in range(n // 2 + 1) if below(k) <= tail)
    ordered = sorted(values)
    expected = None if k == 0 else (ordered[k - 1], ordered[n - k])
    interval = median_interval(values, confidence)
    assert interval == expected, (values, confidence, k)
    if interval is not None:
        assert interval[0] <= statistics.median(values) <= interval[1]
