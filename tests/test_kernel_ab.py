"""bench/kernel_ab.py: two builds of the CPU kernels side by side. Its comparison of
outputs must see every changed logit, and a variant given as a patch must be the
patched source, run through the real build and the real kernels. And the other
probes of the kernels (bench/cpu_units.py, bench/scratch_placement.py,
bench/idle_gap.py, bench/new_tensor.py, bench/python_overhead.py,
bench/thread_wake.py) measure what they say, with the real kernels."""

from __future__ import annotations

import json
import math
import platform
import subprocess
from pathlib import Path

import pytest
import torch

from bench import (
    cpu_units,
    idle_gap,
    kernel_ab,
    new_tensor,
    python_overhead,
    scratch_placement,
    thread_wake,
)
from bench.common import make_logits
from bench.latency import Case
from em_inf import cpu_backend, cpu_build, functional

pytestmark = pytest.mark.skipif(
    not cpu_backend.available(), reason="the compiled CPU kernels are unavailable"
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compare_sees_every_changed_logit(seed):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 1000, generator=generator) * 5
    base[:, :10] = float("-inf")  # masked in both: not a difference
    variant = base.clone()
    assert kernel_ab.compare(base, variant) == {
        "logits_differing": 0,
        "max_ulps_of_row_max": 0.0,
        "max_total_variation": 0.0,
    }, f"seed {seed}"
    picked = torch.randperm(4 * 990, generator=generator)[:5]  # distinct, unmasked
    rows, cols = picked // 990, 10 + picked % 990
    for steps, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True), 1):
        value = variant[r, c]
        for _ in range(steps):
            value = torch.nextafter(value, torch.tensor(float("inf")))
        variant[r, c] = value
    out = kernel_ab.compare(base, variant)
    changed = int((variant != base).sum())
    assert out["logits_differing"] == changed, f"seed {seed}"
    # each changed logit moved by at most 5 of its own ulps, which are at most one
    # ulp of its row's largest |logit|
    assert 0 < out["max_ulps_of_row_max"] <= 5, f"seed {seed}: {out}"
    assert out["max_total_variation"] > 0, f"seed {seed}"


def _patch_changing(text: str, old: str, new: str, folder: Path) -> Path:
    """A git-style patch that replaces ``old`` by ``new`` in the shipped source."""
    shipped = cpu_build.SOURCE.read_text()
    assert shipped.count(old) == 1, f"{old!r} not once in the source"
    root = cpu_build.SOURCE.parents[1]
    changed = folder / "changed" / cpu_build.SOURCE.relative_to(root)
    original = folder / "original" / cpu_build.SOURCE.relative_to(root)
    for path, content in ((changed, shipped.replace(old, new)), (original, shipped)):
        path.parent.mkdir(parents=True)
        path.write_text(content)
    diff = subprocess.run(
        ["git", "diff", "--no-index", "original", "changed"],
        cwd=folder,
        capture_output=True,
        text=True,
    ).stdout
    patch = folder / f"{text}.patch"
    relative = cpu_build.SOURCE.relative_to(root).as_posix()
    patch.write_text(
        diff.replace(f"a/original/{relative}", f"a/{relative}").replace(
            f"b/changed/{relative}", f"b/{relative}"
        )
    )
    return patch


@pytest.mark.parametrize("mode", ["logits", "temperature"])
def test_a_patched_variant_is_built_run_and_compared(tmp_path, mode):
    """A patch that leaves the numerics alone (a comment) gives the base's bits; one
    that changes the exp's polynomial changes them; the built kernels are back in
    place afterwards."""
    built = cpu_backend.load()
    case = Case(mode, 3, 4096, 3 if mode == "logits" else None)
    outputs = {}
    for name, old, new in [
        ("comment", "/* Logits at or below this are masked. */", "/* Masked. */"),
        ("polynomial", "0.49999994f", "0.4999f"),
    ]:
        patch = _patch_changing(name, old, new, tmp_path / name)
        source = kernel_ab.variant_source(
            patch, cpu_build.SOURCE, tmp_path / f"{name}-src"
        )
        assert source.read_text() == cpu_build.SOURCE.read_text().replace(old, new)
        libraries = [
            cpu_backend.open_library(cpu_build.build(path).path)
            for path in (cpu_build.SOURCE, source)
        ]
        row = kernel_ab.measure_case(case, libraries, rounds=2, evict_mib=1, seed=7)
        assert row["condition"] == "cold" and row["rounds"] == 2
        assert all(row[k] > 0 for k in ("base_median_ms", "variant_median_ms"))
        outputs[name] = row["output"]
        assert cpu_backend.load() is built
    assert outputs["comment"]["logits_differing"] == 0, outputs
    assert outputs["polynomial"]["logits_differing"] > 0, outputs


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or " avx2" not in cpu_build.cpu_description(),
    reason="bench/cpu_units.c is x86-64 assembly with AVX2",
)
def test_the_unit_and_pass_probes_build_against_the_kernels_and_report_every_row():
    """bench/cpu_units.py compiles its probe and bench/cpu_passes.c (which calls the
    kernels' own passes) and reads back a finite, positive figure for each."""
    measured = cpu_units.measure(vocab=4096)
    assert 0.5 < measured["clock_ghz"] < 10
    assert {"ymm_fma", "ymm_div", "ymm_sqrt"} <= set(measured["instructions"])
    assert set(measured["passes"]) == {
        "exp_pass",
        "scan",
        "statistics_with_copy",
        "statistics",
        "update_step_1",
        "update_second_step",
        "update_further_step",
        "update_last_step",
        "temperature_pass",
        "temperature_pass_without_third",
    }
    for name, value in {**measured["instructions"], **measured["passes"]}.items():
        assert math.isfinite(value), (name, value)
        # the updates' figures have the copy that restores their inputs taken off
        assert name.startswith("update") or value > 0, (name, value)


def test_scratch_placement_puts_the_batch_where_it_says_and_times_every_start():
    """Each start is the batch's offset into a page, to the byte, holding the batch
    itself; both builds (here the same one twice) get a time at every start."""
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(3))
    buffer = scratch_placement.page_aligned_floats(logits.numel() + 1024)
    for start in scratch_placement.starts():
        view = scratch_placement.batch_at(buffer, start, logits)
        view.copy_(logits)
        assert view.data_ptr() % 4096 == start
        assert torch.equal(view, logits)
    library = cpu_backend.load()
    rows = scratch_placement.measure_vocab(
        1000, 2, 3, {"a": library, "b": library}, rounds=2, seed=0
    )
    assert [r["build"] for r in rows] == ["a", "b"]
    for row in rows:
        assert row["start_bytes"] == scratch_placement.starts()
        assert len(row["median_ms"]) == 4096 // 64
        assert all(math.isfinite(ms) and ms > 0 for ms in row["median_ms"])


@pytest.mark.parametrize("batch", [1, 2])
def test_idle_gap_times_every_call_after_every_gap(batch):
    rows = idle_gap.measure(rounds=1, batch=batch)
    cells = {(row["call"], row["gap"]) for row in rows}
    calls = idle_gap.calls(batch)
    assert cells == {(call, gap) for call in calls for gap in idle_gap.GAPS}
    assert f"floor [{batch}, 151936]" in calls
    assert all(row["median_ms"] > 0 for row in rows)


def test_new_tensor_times_ways_that_give_the_same_bits():
    """Every way bench/new_tensor.py times gives the batch's result bit for bit,
    and each gets a time."""
    results = [call() for call in new_tensor.ways(2).values()]
    for result in results[1:]:
        assert torch.equal(result.view(torch.int32), results[0].view(torch.int32))
    rows = new_tensor.measure_ways([1], rounds=5)
    assert [row["way"] for row in rows] == list(new_tensor.ways(1))
    assert all(0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"] for row in rows)


def test_python_overhead_times_the_same_kernels_on_the_same_data_both_ways():
    """The bare ctypes call bench/python_overhead.py times against each public call
    writes that call's bits (so the difference is the Python around them), and
    every cell gets a time, torch's thread count restored after the vLLM step."""
    logits = make_logits(2, 4_096)
    params = python_overhead.logits_settings("default")
    expected = functional.em_inf(logits, **params)
    out = torch.full_like(logits, torch.nan)
    python_overhead.BareCall(out, logits, params, None)()
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
    step = python_overhead.VllmStep(rows=2, vocab=4_096)
    step.again()
    step.public()
    public_bits = step.logits.clone()
    step.again()
    step.bare()
    assert torch.equal(step.logits.view(torch.int32), public_bits.view(torch.int32))
    assert not torch.equal(public_bits, step.source)  # EM-INF changed the rows
    threads = torch.get_num_threads()
    rows = python_overhead.functional_case(rounds=1)
    rows += python_overhead.vllm_step_case(rounds=1, forward_mib=1)
    assert torch.get_num_threads() == threads
    assert [row["gap"] for row in rows] == [
        "back to back",
        "after the authors' loop",
        "back to back",
        "after a forward pass",
    ]
    for row in rows:
        assert row["public_ms"] > 0 and row["kernels_ctypes_call_ms"] > 0, row


def test_thread_wake_reports_every_gap(tmp_path):
    """bench/thread_wake.py compiles its OpenMP probe and reads back, per gap, a
    second thread's entry delay no larger than its region, and a share."""
    out = tmp_path / "thread_wake.json"
    assert (
        thread_wake.main(["--rounds", "3", "--barriers", "2", "--out", str(out)]) == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [row["gap"] for row in rows] == list(thread_wake.GAPS)
    for row in rows:
        assert 0 <= row["delay_median_us"] <= row["delay_max_us"], row
        assert row["delay_median_us"] <= row["region_median_us"], row
        assert 0 <= row["one_cpu_share"] <= 1, row
