"""The CPU paths: the compiled kernels (em_inf.cpu_backend) against the float64
oracle, their fail-safe and counts, their compile step and cache, the eager fallback
where they cannot be built, and bitwise batch invariance on both CPU paths."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from em_inf import backend, counters, cpu_backend, cpu_build, torch_backend
from em_inf.config import TEMPERATURE_RTOL, EMInfConfig
from em_inf.core import SlotSettings, apply_to_rows
from em_inf.reference import entropy
from tests.oracle import adaptive_temperature_oracle, assert_matches, em_inf_oracle

#: The tests that run without the compiled kernels (the fallback test makes its own
#: process in which they cannot be built).
RUNS_WITHOUT_KERNELS = {"test_without_a_compiler_the_eager_path_runs_after_one_warning"}


@pytest.fixture(autouse=True)
def compiled_kernels(request: pytest.FixtureRequest) -> None:
    """Every other test here needs the compiled kernels, and a machine with a C
    compiler (CI's) must build them: where they do not build, each such test fails
    with the compiler's reason instead of being skipped."""
    if request.node.originalname not in RUNS_WITHOUT_KERNELS:
        request.getfixturevalue("compiled_cpu_kernels")


BACKENDS = {"cpu": cpu_backend, "torch": torch_backend}
FLOAT32_MIN = torch.finfo(torch.float32).min


def new_stats(path: str, *values: int) -> torch.Tensor:
    """One mode's counters (every path counts every column of
    :mod:`em_inf.counters`), starting at ``values`` (then zeros)."""
    stats = torch.zeros(counters.WIDTH, dtype=torch.int64)
    stats[: len(values)] = torch.tensor(values, dtype=torch.int64)
    return stats


def draw_logits(generator: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    """Gaussian logits, per-row scale in [0.5, 6], one boosted token per row (some
    rows confident, some flat)."""
    scale = 0.5 + 5.5 * torch.rand(rows, 1, generator=generator)
    logits = torch.randn(rows, vocab, generator=generator) * scale
    peaks = torch.randint(0, vocab, (rows,), generator=generator)
    boost = torch.rand(rows, generator=generator) * 4 * scale.squeeze(1)
    logits[torch.arange(rows), peaks] += boost
    return logits


def mask(
    generator: torch.Generator, logits: torch.Tensor, fraction: float, value: float
) -> torch.Tensor:
    """Set about ``fraction`` of each row to ``value`` (``-inf`` or float32's
    min), keeping entry 0."""
    hit = torch.rand(logits.shape, generator=generator) < fraction
    hit[:, 0] = False
    return logits.masked_fill(hit, value)


def logits_params(generator: torch.Generator, rows: int) -> dict[str, torch.Tensor]:
    """Per-row logits-mode settings across the accepted ranges' useful part."""
    return dict(
        threshold=torch.rand(rows, generator=generator) * 2.0,
        kl_weight=torch.rand(rows, generator=generator) * 0.1,
        lr=torch.rand(rows, generator=generator) * 0.2 + 0.01,
        steps=torch.randint(0, 7, (rows,), generator=generator),
    )


def temperature_params(
    generator: torch.Generator, rows: int
) -> dict[str, torch.Tensor]:
    t_min = 10 ** (-3 * torch.rand(rows, generator=generator))
    return dict(
        threshold=torch.rand(rows, generator=generator) * 1.5,
        alpha=torch.rand(rows, generator=generator) * 0.9 + 0.05,
        t_min=t_min,
        t_max=t_min + (1.5 - t_min) * torch.rand(rows, generator=generator),
    )


def run(
    path: str, mode: str, logits: torch.Tensor, params: dict, **kwargs
) -> torch.Tensor:
    """One backend entry point on a float32 copy of ``logits``."""
    out = logits.float().clone()
    columns = [params[k].reshape(-1, 1) for k in params]
    module = BACKENDS[path]
    if mode == "logits":
        module.em_inf_(out, *columns, **kwargs)
    else:
        module.adaptive_temperature_(out, *columns, **kwargs)
    return out


def oracle(mode: str, logits: torch.Tensor, params: dict) -> torch.Tensor:
    """The float64 oracle, with masked logits (<= -1e37) kept as they are: the
    authors' temperature loop divides finfo(float32).min by T like any logit."""
    if mode == "logits":
        expected = em_inf_oracle(logits, **params)
    else:
        expected = adaptive_temperature_oracle(logits, **params)
    return torch.where(logits <= -1e37, logits.double(), expected)


# -- fidelity ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, vocab",
    [(5, 1), (6, 3), (8, 257), (6, 4_097), (3, 49_152), (2, 151_936), (2, 152_064)],
)
@pytest.mark.parametrize("mode", ["logits", "temperature"])
def test_compiled_path_matches_the_float64_oracle(generator, rows, vocab, mode):
    logits = draw_logits(generator, rows, vocab)
    if vocab > 3:
        logits[: rows // 2] = mask(generator, logits[: rows // 2], 0.3, -torch.inf)
        logits[rows // 2 :] = mask(generator, logits[rows // 2 :], 0.3, FLOAT32_MIN)
    params = (logits_params if mode == "logits" else temperature_params)(
        generator, rows
    )
    out = run("cpu", mode, logits, params)
    assert_matches(out, oracle(mode, logits, params))
    masked = logits <= -1e37
    assert torch.equal(out[masked], logits[masked])  # masked logits keep their value


@pytest.mark.parametrize("mode", ["logits", "temperature"])
def test_rows_left_alone_come_back_bit_identical(generator, mode):
    rows, vocab = 8, 5_000
    logits = draw_logits(generator, rows, vocab)
    logits[::2, 11] = 80.0  # near one-hot: entropy far below every threshold
    stats = new_stats("cpu")
    if mode == "logits":
        params = dict(
            threshold=torch.full((rows,), 0.3),
            kl_weight=torch.full((rows,), 0.05),
            lr=torch.full((rows,), 0.1),
            steps=torch.tensor([3, 3, 3, 0, 3, 3, 3, 3]),  # row 3: steps == 0
        )
    else:
        params = dict(
            threshold=torch.full((rows,), 0.3),
            alpha=torch.full((rows,), 0.5),
            t_min=torch.full((rows,), 0.05),
            t_max=torch.full((rows,), 1.0),
        )
    out = run("cpu", mode, logits, params, stats=stats)
    left_alone = entropy(logits.double()) < 0.3
    assert left_alone[::2].all() and not left_alone[1::2].any()
    if mode == "logits":
        left_alone[3] = True
    assert torch.equal(out[left_alone], logits[left_alone])
    assert not torch.equal(out[~left_alone], logits[~left_alone])
    assert stats[counters.BELOW] == rows // 2  # the steps == 0 row not counted
    assert stats[counters.RESTORED] == 0
    assert stats[counters.ROWS] == (rows - 1 if mode == "logits" else rows)


def test_early_stop_counts_the_steps_taken(generator):
    """A row stops once its entropy is below its threshold: the steps counted are
    the oracle's (how many steps the authors' loop runs)."""
    rows, vocab = 6, 2_000
    logits = draw_logits(generator, rows, vocab) * 3
    h0 = entropy(logits.double())
    params = dict(
        threshold=(h0 * 0.97).float(),  # a step or two gets each row below it
        kl_weight=torch.zeros(rows),
        lr=torch.full((rows,), 0.05),
        steps=torch.full((rows,), 20),
    )
    stats = new_stats("cpu")
    out = run("cpu", "logits", logits, params, stats=stats)
    assert_matches(out, em_inf_oracle(logits, **params))
    expected_steps = 0  # the oracle's: step t runs while H(z after t - 1) >= threshold
    for row in range(rows):
        one = {k: v[row].item() for k, v in params.items()}
        taken = 0
        while taken < 20:
            z = em_inf_oracle(logits[row : row + 1], **(one | {"steps": taken}))
            if entropy(z[0]) < one["threshold"]:
                break
            taken += 1
        expected_steps += taken
    assert stats[:4].tolist() == [0, expected_steps, 0, rows]
    assert rows <= expected_steps < 20 * rows


@pytest.mark.parametrize("path", ["cpu", "torch"])
def test_temperature_meets_the_stated_tolerance(generator, path):
    """|H(z / T) - target| <= TEMPERATURE_RTOL * target for the T each row got
    (exactly, in float64), and the row returned is z * (1 / T) in float32."""
    rows, vocab = 32, 30_000
    logits = draw_logits(generator, rows, vocab)
    params = temperature_params(generator, rows)
    params["t_min"] = torch.full((rows,), 1e-3)  # every target within reach
    params["t_max"] = torch.full((rows,), 10.0)
    inv_t = torch.full((rows,), torch.nan)
    out = run(path, "temperature", logits, params, inv_temperature=inv_t)
    h0 = entropy(logits.double())
    target = torch.maximum(params["threshold"].double(), params["alpha"].double() * h0)
    moved = h0 > params["threshold"].double()
    assert moved.sum() > rows // 2
    assert (inv_t[~moved] == 1).all()
    reached = entropy(logits.double() * inv_t.double()[:, None])
    error = ((reached - target).abs() / target)[moved]
    assert (error <= TEMPERATURE_RTOL).all(), error.max()
    assert torch.equal(out, logits * inv_t[:, None])


def _bench_like_temperature_rows(
    generator: torch.Generator, rows: int, alpha: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Gaussian rows of a real vocabulary's width, each with its own scale in
    [2, 5], and the temperature mode's parameters with a tiny threshold (the
    target is ``alpha * H0``)."""
    logits = torch.randn(rows, 151_936, generator=generator) * (
        2 + 3 * torch.rand(rows, 1, generator=generator)
    )
    params = dict(
        threshold=torch.full((rows,), 1e-5),
        alpha=torch.full((rows,), alpha),
        t_min=torch.full((rows,), 0.01),
        t_max=torch.full((rows,), 1.0),
    )
    return logits, params


def test_the_temperature_solver_needs_about_three_passes_on_ordinary_rows(generator):
    """Halley's step (the pass gives the entropy's curvature too) gets rows of a
    real vocabulary's width from T = 1 to 1e-6 of the paper's default target
    (alpha = 0.85) in about three passes, the first at T = 1 included (Newton's
    steps: about four)."""
    rows = 16
    logits, params = _bench_like_temperature_rows(generator, rows, alpha=0.85)
    stats = new_stats("cpu")
    run("cpu", "temperature", logits, params, stats=stats)
    below, passes, restored = stats[:3].tolist()
    assert below == restored == 0
    assert passes <= 3.25 * rows, passes / rows  # Newton's steps: 3.9 per row


def test_far_temperature_targets_are_met_in_few_passes(generator):
    """alpha = 0.2: about five passes per row, the later ones after short steps,
    where a pass leaves out e zs^3 and the curvature is the slopes' secant: every
    row within TEMPERATURE_RTOL of its target, in as few passes as with the
    curvature summed on every pass (5.2 per row on these rows either way)."""
    rows = 16
    logits, params = _bench_like_temperature_rows(generator, rows, alpha=0.2)
    stats = new_stats("cpu")
    inv_t = torch.full((rows,), torch.nan)
    run("cpu", "temperature", logits, params, stats=stats, inv_temperature=inv_t)
    below, passes, restored = stats[:3].tolist()
    assert below == restored == 0
    assert passes <= 5.5 * rows, passes / rows
    target = 0.2 * entropy(logits.double())
    reached = entropy(logits.double() * inv_t.double()[:, None])
    assert ((reached - target).abs() / target <= TEMPERATURE_RTOL).all()


def test_exp_is_accurate_and_zero_for_masked_logits():
    x = torch.cat(
        [
            -torch.linspace(0, 87, 200_001),
            torch.tensor([-87.5, -100.0, -1e30, FLOAT32_MIN, -torch.inf]),
        ]
    )
    got = cpu_backend.exp(x).double()
    want = torch.exp(x.double())
    normal = x > -87
    relative = ((got - want).abs() / want)[normal]
    assert relative.max() < 4 * 2.0**-24, relative.max()  # within 4 half-ulps
    assert (got[~normal] == 0).all()


# -- fail-safe and counts --------------------------------------------------------------


def hostile_batch(generator: torch.Generator, vocab: int) -> torch.Tensor:
    """Rows at the edges of float32, then a row holding NaN and one holding +inf."""
    rows = [
        (torch.rand(vocab, generator=generator) * 2 - 1) * 3.4e38,  # huge scale
        torch.randn(vocab, generator=generator) * 1e-30,  # tiny scale: flat
        torch.randn(vocab, generator=generator) + 1e4,  # a common offset
        torch.randn(vocab, generator=generator).half().float() * 6e4,  # float16 max
        torch.full((vocab,), 2.0),  # flat
        torch.randn(vocab, generator=generator) * 1e-6 + 5.0,  # near ties
        (torch.randn(vocab, generator=generator) * 3).bfloat16().float(),
        torch.full((vocab,), -torch.inf),  # all masked
    ]
    one = torch.full((vocab,), FLOAT32_MIN)
    one[vocab // 2] = 1.0  # one unmasked entry
    rows.append(one)
    nan = torch.randn(vocab, generator=generator)
    nan[3] = torch.nan
    inf = torch.randn(vocab, generator=generator)
    inf[-1] = torch.inf
    rows += [nan, inf]
    return torch.stack(rows)


UNUSABLE = 2  # the NaN and +inf rows at the end of hostile_batch


@pytest.mark.parametrize("path", ["cpu", "torch"])
@pytest.mark.parametrize(
    "mode, settings",
    [
        ("logits", dict(threshold=0.0, kl_weight=0.05, lr=0.1, steps=3)),
        ("logits", dict(threshold=0.0, kl_weight=3e38, lr=3e38, steps=50)),
        ("logits", dict(threshold=0.0, kl_weight=1e3, lr=1e2, steps=100)),
        ("temperature", dict(threshold=0.0, alpha=0.5, t_min=1e-4, t_max=1e-4)),
        ("temperature", dict(threshold=0.0, alpha=1.0, t_min=1e4, t_max=1e4)),
        ("temperature", dict(threshold=0.0, alpha=0.1, t_min=3e38, t_max=3e38)),
    ],
)
def test_hostile_rows_and_settings_never_give_nan(generator, path, mode, settings):
    """Every row comes back either exactly as it went in, or finite exactly where it
    was finite with its masked logits kept; rows holding NaN or +inf are left as
    they are and counted."""
    logits = hostile_batch(generator, 1_000)
    rows = logits.shape[0]
    params = {k: torch.full((rows,), float(v)) for k, v in settings.items()}
    stats = new_stats(path)
    out = run(path, mode, logits, params, stats=stats)
    nan_in = torch.isnan(logits)
    assert torch.equal(torch.isnan(out), nan_in)  # no NaN but the input's own
    unchanged = ((out == logits) | nan_in).all(dim=1)
    finite_where_it_was = (torch.isfinite(out) == torch.isfinite(logits)).all(dim=1)
    assert (unchanged | finite_where_it_was).all(), (unchanged, finite_where_it_was)
    masked = logits <= -1e37
    assert torch.equal(out[masked], logits[masked])
    assert unchanged[-UNUSABLE:].all()
    assert UNUSABLE <= stats[2] <= rows


@pytest.mark.parametrize("path", ["cpu", "torch"])
@pytest.mark.parametrize("mode", ["logits", "temperature"])
def test_rows_that_would_break_are_restored_exactly_and_counted(generator, path, mode):
    """The settings of the report that found NaN (lr = kl_weight = 3e38), and a
    temperature that takes every logit past float32's range: each row comes back
    bit for bit as it went in, counted once, its steps not counted."""
    rows = 5
    logits = torch.randn(rows, 3_000, generator=generator) * 3
    logits[1] = mask(generator, logits[1:2], 0.5, -torch.inf)[0]
    if mode == "logits":
        settings = dict(threshold=0.0, kl_weight=3e38, lr=3e38, steps=50)
    else:
        logits[:, 7] = -1e36  # unmasked; divided by T = 1e-4, past float32's range
        settings = dict(threshold=0.0, alpha=0.5, t_min=1e-4, t_max=1e-4)
    params = {k: torch.full((rows,), float(v)) for k, v in settings.items()}
    stats = new_stats(path, 1, 2, 3)
    out = run(path, mode, logits, params, stats=stats)
    assert torch.equal(out, logits)
    assert stats[:3].tolist() == [1, 2, 3 + rows]


def test_stats_add_to_what_is_there(generator):
    logits = draw_logits(generator, 4, 3_000)
    stats = torch.arange(counters.WIDTH) * 10
    params = dict(
        threshold=torch.zeros(4),
        kl_weight=torch.full((4,), 0.01),
        lr=torch.full((4,), 0.1),
        steps=torch.tensor([1, 2, 3, 0]),
    )
    alone = torch.zeros(counters.WIDTH, dtype=torch.int64)
    run("cpu", "logits", logits, params, stats=alone)
    assert alone[:4].tolist() == [0, 6, 0, 3]  # the steps == 0 row not counted
    run("cpu", "logits", logits, params, stats=stats)
    assert torch.equal(stats, torch.arange(counters.WIDTH) * 10 + alone)


def test_row_index_processes_rows_where_they_lie(generator):
    logits = draw_logits(generator, 10, 4_097)
    rows = torch.tensor([7, 2, 5])
    params = logits_params(generator, 3)
    params["steps"] = torch.full((3,), 3)
    params["threshold"] = torch.zeros(3)
    out = logits.clone()
    cpu_backend.em_inf_(out, *(params[k].reshape(-1, 1) for k in params), rows=rows)
    alone = run("cpu", "logits", logits[rows], params)
    assert torch.equal(out[rows], alone)
    others = torch.ones(10, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(out[others], logits[others])


@pytest.mark.parametrize("mode", ["logits", "temperature"])
@pytest.mark.parametrize("rows", [None, [6, 1, 4]], ids=["every-row", "index"])
def test_a_rows_call_gives_the_entry_points_bits_and_counts_step_after_step(
    generator, mode, rows
):
    """RowsCall (the vLLM step's compiled path) against em_inf_ /
    adaptive_temperature_ with the same rows, settings and counters, over steps
    with new logits and with the counters swapped for others between steps. Its
    columns are given as float64 [n, 1] tensors and dropped: it keeps the
    converted ones it points to."""
    batch, vocab = 8, 3_001
    index = None if rows is None else torch.tensor(rows)
    count = batch if index is None else len(rows)
    params = (logits_params if mode == "logits" else temperature_params)(
        generator, count
    )
    kept = {k: v.clone() for k, v in params.items()}
    call = cpu_backend.RowsCall(
        mode,
        index,
        [v.double().reshape(-1, 1) if k != "steps" else v for k, v in params.items()],
    )
    del params
    torch.empty(count * 64).fill_(torch.nan)  # reuse freed memory with garbage
    first, second = (torch.zeros(counters.WIDTH, dtype=torch.int64) for _ in "ab")
    expected = [torch.zeros(counters.WIDTH, dtype=torch.int64) for _ in "ab"]
    entry = (
        cpu_backend.em_inf_ if mode == "logits" else cpu_backend.adaptive_temperature_
    )
    columns = [v.reshape(-1, 1) for v in kept.values()]
    for step, stats in enumerate((first, first, second)):
        logits = draw_logits(generator, batch, vocab)
        want, got = logits.clone(), logits.clone()
        entry(want, *columns, rows=index, stats=expected[stats is second])
        call(got, stats)
        assert torch.equal(got, want), f"step {step}"
    assert torch.equal(first, expected[0]) and torch.equal(second, expected[1])


def test_a_rows_call_refuses_logits_it_was_not_made_for():
    ones = torch.ones(3)
    every_row = cpu_backend.RowsCall("logits", None, [ones, ones, ones, ones.long()])
    some_rows = cpu_backend.RowsCall(
        "logits", torch.tensor([4, 0, 2]), [ones, ones, ones, ones.long()]
    )
    logits = torch.zeros(5, 8)
    for call, bad, message in [
        (every_row, logits, "5 rows; these settings are for exactly 3"),
        (every_row, logits[:2], "2 rows; these settings are for exactly 3"),
        (some_rows, logits[:4], "4 rows; these settings are for at least 5"),
        (every_row, logits[:3].double(), "float32"),
        (every_row, logits[:3].t(), "contiguous along the vocabulary"),
        (every_row, logits.as_strided((3, 8), (4, 1)), "must not overlap"),
        (every_row, logits[:3].to("meta"), "on the cpu"),
    ]:
        with pytest.raises(ValueError, match=message):
            call(bad)
    with pytest.raises(ValueError, match="stats"):
        every_row(logits[:3], torch.zeros(counters.WIDTH))
    every_row(logits[:3], torch.zeros(counters.WIDTH, dtype=torch.int64))
    with pytest.raises(ValueError, match="stats"):  # checked again when it changes
        every_row(logits[:3], torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="one parameter per row"):
        cpu_backend.RowsCall("logits", None, [ones, ones, torch.ones(2), ones.long()])
    for rows in (torch.tensor([0, 1]), torch.tensor([0, -1, 2])):
        with pytest.raises(ValueError, match="indices >= 0, one per parameter"):
            cpu_backend.RowsCall("logits", rows, [ones, ones, ones, ones.long()])


def test_bad_arguments_are_named():
    logits = torch.zeros(2, 8)
    ones = torch.ones(2, 1)
    with pytest.raises(ValueError, match="float32"):
        cpu_backend.em_inf_(logits.double(), ones, ones, ones, ones.long())
    with pytest.raises(ValueError, match="one parameter per row"):
        cpu_backend.em_inf_(logits, torch.ones(3, 1), ones, ones, ones.long())
    with pytest.raises(ValueError, match="rows"):
        cpu_backend.em_inf_(
            logits, ones, ones, ones, ones.long(), rows=torch.tensor([0, 2])
        )
    for stats in (
        torch.zeros(counters.WIDTH),  # float
        torch.zeros(3, dtype=torch.int64),  # the old layout
        torch.zeros(2, counters.WIDTH, dtype=torch.int64),  # both modes
        torch.zeros(2 * counters.WIDTH, dtype=torch.int64)[::2],  # not contiguous
    ):
        with pytest.raises(ValueError, match="stats"):
            cpu_backend.em_inf_(logits, ones, ones, ones, ones.long(), stats=stats)


# -- out of place ---------------------------------------------------------------------


def out_of_place_batch(generator: torch.Generator, vocab: int) -> torch.Tensor:
    """Ordinary rows (some masked), rows EM-INF leaves alone, then hostile_batch's
    edge rows (all masked, NaN, +inf, ...)."""
    ordinary = row_pool(generator, 6, vocab)
    return torch.cat([ordinary, hostile_batch(generator, vocab)])


def bits(x: torch.Tensor) -> torch.Tensor:
    """float32 as its bit patterns: NaN compares equal to the same NaN."""
    return x.contiguous().view(torch.int32)


@pytest.mark.parametrize("mode", ["logits", "temperature"])
@pytest.mark.parametrize("vocab", [1_000, 151_936])
@pytest.mark.parametrize("thread_count", [1, 2, 3])
@pytest.mark.parametrize("hostile_settings", [False, True])
def test_out_of_place_gives_the_in_place_bits(
    generator, threads, mode, vocab, thread_count, hostile_settings
):
    """From source into a NaN-filled tensor: every row written, each with the bits
    the call in place gives it (rows processed, left alone, restored by the
    fail-safe, holding NaN), the same counts, and source not written. With 2 and 3
    threads the rows left over are split among them (at V = 151,936, where a
    thread's share fits in L2, every row may be)."""
    torch.set_num_threads(thread_count)
    logits = out_of_place_batch(generator, vocab)
    rows = logits.shape[0]
    if hostile_settings:  # most rows break and are restored
        settings = (
            dict(threshold=0.0, kl_weight=3e38, lr=3e38, steps=50)
            if mode == "logits"
            else dict(threshold=0.0, alpha=0.5, t_min=1e-4, t_max=1e-4)
        )
        params = {k: torch.full((rows,), float(v)) for k, v in settings.items()}
    else:
        params = (logits_params if mode == "logits" else temperature_params)(
            generator, rows
        )
    in_place_stats, out_stats = new_stats("cpu"), new_stats("cpu")
    expected = run("cpu", mode, logits, params, stats=in_place_stats)
    source = logits.clone()
    out = torch.full_like(logits, torch.nan)
    columns = [params[k].reshape(-1, 1) for k in params]
    if mode == "logits":
        cpu_backend.em_inf_(out, *columns, stats=out_stats, source=source)
    else:
        cpu_backend.adaptive_temperature_(out, *columns, stats=out_stats, source=source)
    assert torch.equal(bits(source), bits(logits))
    differing = (bits(out) != bits(expected)).any(dim=1).nonzero().flatten()
    assert differing.numel() == 0, f"rows {differing.tolist()} of {rows} differ"
    assert torch.equal(out_stats, in_place_stats)


def test_out_of_place_with_a_row_index_writes_only_those_rows(generator):
    logits = draw_logits(generator, 10, 4_097)
    rows = torch.tensor([7, 2, 5])
    params = logits_params(generator, 3)
    params["steps"] = torch.tensor([3, 0, 2])  # row 2 is not processed: copied
    columns = [params[k].reshape(-1, 1) for k in params]
    expected = logits.clone()
    cpu_backend.em_inf_(expected, *columns, rows=rows)
    out = torch.full_like(logits, torch.nan)
    cpu_backend.em_inf_(out, *columns, rows=rows, source=logits.clone())
    assert torch.equal(out[rows], expected[rows])
    others = torch.ones(10, dtype=torch.bool)
    others[rows] = False
    assert torch.isnan(out[others]).all()


def test_a_source_the_kernels_cannot_read_is_refused():
    logits = torch.zeros(2, 8)
    ones = torch.ones(2, 1)
    wide = torch.zeros(2, 16)
    for source, error in [
        (torch.zeros(3, 8), "shape"),
        (torch.zeros(2, 8, dtype=torch.float64), "float32"),
        (wide[:, ::2], "contiguous along the vocabulary"),
        (logits, "share memory"),
        (torch.zeros(4, 8)[1:3], None),  # a view of other memory is fine
    ]:
        if error is None:
            cpu_backend.em_inf_(logits, ones, ones, ones, ones.long(), source=source)
            continue
        with pytest.raises(ValueError, match=f"source .*{error}"):
            cpu_backend.em_inf_(logits, ones, ones, ones, ones.long(), source=source)
    both = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="share memory"):  # overlapping rows
        cpu_backend.em_inf_(both[1:], ones, ones, ones, ones.long(), source=both[:2])


@pytest.mark.parametrize("mode", ["logits", "temperature"])
@pytest.mark.parametrize("given", ["numbers", "per-row tensors"])
def test_a_new_tensor_gives_the_in_place_bits(generator, mode, given):
    """em_inf / adaptive_temperature (the functional API's compiled path) read a
    batch with strided rows where it lies, leave it unwritten, and return the bits
    and counts the call in place gives a copy, every kind of row included, with
    the parameters given as numbers or as one value per row."""
    logits = out_of_place_batch(generator, 4_097)
    rows, vocab = logits.shape
    if given == "numbers":
        values = (0.3, 0.05, 0.1, 3) if mode == "logits" else (0.3, 0.5, 0.05, 1.0)
        params = {
            name: torch.full((rows,), value)
            for name, value in zip(("a", "b", "c", "d"), values, strict=True)
        }
    else:
        params = (logits_params if mode == "logits" else temperature_params)(
            generator, rows
        )
        values = tuple(params.values())
    in_place_stats, new_tensor_stats = new_stats("cpu"), new_stats("cpu")
    expected = run("cpu", mode, logits, params, stats=in_place_stats)
    wide = torch.full((rows, 2 * vocab), torch.nan)
    wide[:, :vocab] = logits
    source = wide[:, :vocab]
    function = (
        cpu_backend.em_inf if mode == "logits" else cpu_backend.adaptive_temperature
    )
    out = function(source, *values, stats=new_tensor_stats)
    assert torch.equal(bits(wide[:, :vocab]), bits(logits))
    assert torch.isnan(wide[:, vocab:]).all()
    differing = (bits(out) != bits(expected)).any(dim=1).nonzero().flatten()
    assert differing.numel() == 0, f"rows {differing.tolist()} of {rows} differ"
    assert torch.equal(new_tensor_stats, in_place_stats)


@pytest.mark.parametrize("mode", ["logits", "temperature"])
def test_a_batch_the_kernels_cannot_read_where_it_lies_is_refused(mode):
    function = (
        cpu_backend.em_inf if mode == "logits" else cpu_backend.adaptive_temperature
    )
    values = (0.3, 0.05, 0.1, 3) if mode == "logits" else (0.3, 0.5, 0.05, 1.0)
    for logits, error in [
        (torch.zeros(8), r"a \[N, V\] tensor"),
        (torch.zeros(2, 8, dtype=torch.float64), "a float32 CPU tensor"),
        (torch.zeros(2, 16)[:, ::2], "contiguous along the vocabulary"),
    ]:
        with pytest.raises(ValueError, match=f"logits must be {error}"):
            function(logits, *values)
    with pytest.raises(ValueError, match="threshold"):
        function(torch.zeros(2, 8), torch.ones(3), *values[1:])


# -- batch invariance -----------------------------------------------------------------


@pytest.fixture
def threads():
    """Restores torch's thread count after a test changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def row_pool(generator: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    logits = draw_logits(generator, rows, vocab)
    logits[1::4] = mask(generator, logits[1::4], 0.2, -torch.inf)
    logits[2::4] = mask(generator, logits[2::4], 0.5, FLOAT32_MIN)
    logits[3::8, 5] = 90.0  # confident: left alone
    return logits


@pytest.mark.parametrize("path", ["cpu", "torch"])
@pytest.mark.parametrize("mode", ["logits", "temperature"])
@pytest.mark.parametrize("vocab", [4_097, 49_152])
def test_a_rows_bits_do_not_depend_on_its_batch(generator, threads, path, mode, vocab):
    """Each row alone, then in random batches of 1 to 64 pool rows (mixed settings
    and masks, rows repeated, different thread counts): bitwise the same."""
    pool_size = 12
    pool = row_pool(generator, pool_size, vocab)
    draw = logits_params if mode == "logits" else temperature_params
    params = draw(generator, pool_size)
    alone = torch.cat(
        [
            run(
                path,
                mode,
                pool[i : i + 1],
                {k: v[i : i + 1] for k, v in params.items()},
            )
            for i in range(pool_size)
        ]
    )
    # The compiled kernels do not depend on the thread count either (a row's
    # reductions run over the same chunks in the same order, split or not); the
    # eager path's torch reductions do, so it keeps torch's.
    default = torch.get_num_threads()
    if path == "cpu":
        plan = [(1, 1), (2, 2), (3, 3), (5, 2), (64, 3), (64, 1)]
    else:
        plan = [(2, default), (64, default)]
    for size, thread_count in plan:
        torch.set_num_threads(thread_count)
        pick = torch.randint(0, pool_size, (size,), generator=generator)
        out = run(path, mode, pool[pick], {k: v[pick] for k, v in params.items()})
        differs = (out != alone[pick]).any(dim=1).nonzero().flatten()
        assert differs.numel() == 0, (
            f"batch of {size} on {thread_count} threads: rows {pick[differs].tolist()}"
        )


@pytest.mark.parametrize("mode", ["logits", "temperature"])
def test_rows_split_among_threads_keep_one_threads_bits(generator, threads, mode):
    """Rows of a real vocabulary's width, 19 chunks with a short last one, so that
    the threads' chunk ranges of a split row are balanced in logits, not in
    chunks: a row shared by 2 or 3 threads (alone, or left over after one row per
    thread, or, in logits mode where a core's L2 holds half of what a row's update
    streams, every row of the batch) comes back with the bits one thread gives it."""
    rows, vocab = 4, 151_936
    logits = torch.randn(rows, vocab, generator=generator) * 3
    logits[1] = mask(generator, logits[1:2], 0.3, -torch.inf)[0]
    draw = logits_params if mode == "logits" else temperature_params
    params = draw(generator, rows)
    if mode == "logits":
        params["steps"] = torch.full((rows,), 3)
    torch.set_num_threads(1)
    alone = run("cpu", mode, logits, params)
    for thread_count, size in [(2, 1), (3, 1), (2, 3), (3, 4), (2, 4)]:
        torch.set_num_threads(thread_count)
        part = {k: v[:size] for k, v in params.items()}
        out = run("cpu", mode, logits[:size], part)
        assert torch.equal(out, alone[:size]), (thread_count, size)


@pytest.mark.parametrize("vocab", [4_097, 49_152])
def test_where_the_logits_lie_changes_no_bit_and_no_byte_past_the_scratch(
    generator, threads, monkeypatch, vocab
):
    """The kernels place their scratch rows against each row of logits (2 KiB from
    it modulo 4 KiB). The same batch started at every 64 bytes of a page, on one
    thread and on two (two rows one per thread, one split), comes back with the
    bits it has at its own address, and the bytes after the scratch the kernels
    asked for keep their pattern."""
    rows = 3
    logits = row_pool(generator, rows, vocab)
    params = logits_params(generator, rows)
    params["steps"] = torch.full((rows,), 3)
    columns = [params[k].reshape(-1, 1) for k in params]
    expected = run("cpu", "logits", logits, params)
    storage = torch.empty(rows * vocab + 2048, dtype=torch.float32)
    page = storage[(-storage.data_ptr()) % 4096 // 4 :]
    library = cpu_backend.load()
    for thread_count in (1, 2):
        torch.set_num_threads(thread_count)
        needed = library.em_inf_scratch_bytes(vocab, thread_count)
        guarded = torch.full((needed + 8192,), 0xA5, dtype=torch.uint8)
        monkeypatch.setattr(
            cpu_backend, "_scratch", cpu_backend.Scratch.of(guarded[:needed])
        )
        for start in range(0, 4096, 64):
            out = page[start // 4 : start // 4 + rows * vocab].view(rows, vocab)
            out.copy_(logits)
            cpu_backend.em_inf_(out, *columns)
            where = f"start {start} bytes into a page, {thread_count} thread(s)"
            differs = (out != expected).any(dim=1).nonzero().flatten().tolist()
            assert not differs, f"{where}: rows {differs} differ"
            assert (guarded[needed:] == 0xA5).all(), f"{where}: wrote past the scratch"


@pytest.mark.parametrize("path", ["cpu", "torch"])
def test_mixed_modes_through_the_processor_core_are_batch_invariant(
    generator, monkeypatch, path
):
    """apply_to_rows (what vLLM calls) with both modes, EM-INF off and settings per
    slot: every row equals that row processed in a batch of its own."""
    monkeypatch.setenv(backend.BACKEND_ENV, path)
    vocab, slots = 3_001, 16
    pool = row_pool(generator, slots, vocab)
    settings = SlotSettings(slots)
    choices = [
        None,
        EMInfConfig(threshold=0.1, kl_weight=0.001, lr=0.1, steps=3),
        EMInfConfig(threshold=0.3, kl_weight=0.05, lr=0.05, steps=5),
        EMInfConfig(mode="temperature", threshold=1e-5, alpha=0.85),
        EMInfConfig(mode="temperature", threshold=0.5, alpha=0.3, t_min=0.1),
    ]
    for slot in range(slots):
        settings.set(slot, choices[int(torch.randint(0, 5, (), generator=generator))])
    alone = []
    for slot in range(slots):
        row = pool[slot : slot + 1].clone()
        apply_to_rows(row, np.array([slot]), settings)
        alone.append(row)
    alone = torch.cat(alone)
    for size in (5, 16, 40):
        row_slots = torch.randint(0, slots, (size,), generator=generator).numpy()
        batch = pool[row_slots].clone()
        apply_to_rows(batch, row_slots, settings)
        assert torch.equal(batch, alone[row_slots]), size


# -- compile step, cache and fallback -------------------------------------------------


def test_build_is_cached_and_rebuilt_for_another_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("EM_INF_CACHE", str(tmp_path))
    first = cpu_build.build()
    assert first.compiled and first.path.parent == tmp_path / "cpu-kernels"
    again = cpu_build.build()
    assert not again.compiled and again.path == first.path
    monkeypatch.setenv(cpu_build.COMPILER_ENV, "cc")  # another compiler: another key
    other = cpu_build.build()
    assert other.path != first.path
    assert sorted(p.suffix for p in first.path.parent.iterdir()) == [".so", ".so"]


def test_the_target_cpu_can_be_chosen(monkeypatch):
    cpu = "model name : test\nflags : fpu avx2 avx512f"
    monkeypatch.delenv(cpu_build.ARCH_ENV, raising=False)
    assert "-march=native" in cpu_build.flag_sets(cpu)[0]
    monkeypatch.setenv(cpu_build.ARCH_ENV, "x86-64-v3")
    best = cpu_build.flag_sets(cpu)[0]
    assert "-march=x86-64-v3" in best and "-march=native" not in best
    assert not any(flag.startswith("-mprefer-vector-width") for flag in best)


LANES_SCRIPT = "from em_inf import cpu_backend; print(cpu_backend.vector_lanes())"


FIDELITY_TESTS = (
    "compiled_path_matches or exp_is_accurate or (hostile and cpu) "
    "or (bits_do_not_depend and cpu and 4097) or out_of_place"
)


def _fidelity_tests_pass_with(env_vars: dict[str, str], tmp_path, lanes: int) -> None:
    """This module's fidelity and invariance tests, run in a process whose kernels
    are built (into ``tmp_path``) with ``env_vars`` set and have ``lanes`` lanes."""
    env = dict(os.environ)
    env.update({**env_vars, "EM_INF_CACHE": str(tmp_path)})
    built = subprocess.run(
        [sys.executable, "-c", LANES_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert built.stdout.strip() == str(lanes), built.stderr  # really that build
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
        + ["-k", FIDELITY_TESTS],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or " avx2" not in cpu_build.cpu_description(),
    reason="the AVX2 build needs an x86-64 CPU with AVX2",
)
def test_the_avx2_build_passes_the_fidelity_tests(tmp_path):
    """The build for CPUs without AVX-512 (8 lanes, the generic exp), built on this
    machine and run through this module's fidelity and invariance tests."""
    _fidelity_tests_pass_with({cpu_build.ARCH_ENV: "x86-64-v3"}, tmp_path, lanes=8)


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or " avx512f" not in cpu_build.cpu_description(),
    reason="the square root's two ways are those of the AVX-512 build",
)
def test_the_square_root_not_chosen_here_passes_the_fidelity_tests(tmp_path):
    """Whichever way of taking the update's square root this CPU does not get by
    default (the suite's other tests run the one it gets), built and run through
    this module's fidelity and invariance tests."""
    default = cpu_build.sqrt_method(cpu_build.cpu_description())
    other = next(c for c in cpu_build.SQRT_CHOICES if c != default)
    _fidelity_tests_pass_with({cpu_build.SQRT_ENV: other}, tmp_path, lanes=16)


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or " avx512f" not in cpu_build.cpu_description(),
    reason="the square root's two ways are those of the AVX-512 build",
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_estimated_square_root_is_as_close_to_the_oracle_as_the_divider(
    tmp_path, monkeypatch, seed
):
    """Both ways of taking the update's square root, built side by side, five Adam
    steps of every row against the float64 oracle: in each row the estimate's
    largest error is within 2 ulps (of the row's largest logit) of the divider's.
    Float32 rounding alone puts both 3-1000 ulps from the oracle (a near-flat row
    magnifies its first step's ulps); the estimate without its Newton step is
    14-134 ulps worse than the divider in some row of every seed tried."""
    monkeypatch.setenv("EM_INF_CACHE", str(tmp_path))
    text = cpu_build.SOURCE.read_text()
    logits = draw_logits(torch.Generator().manual_seed(seed), 8, 8192)
    settings = {"threshold": 0.0, "kl_weight": 0.0, "lr": 0.1, "steps": 5}
    expected = em_inf_oracle(logits.double(), **settings)
    top = expected.abs().amax(dim=1, keepdim=True).float()
    ulp = (torch.nextafter(top, torch.tensor(float("inf"))) - top).double()
    errors = {}
    for name, line in [
        ("divider", "#undef EM_INF_SQRT_ESTIMATE"),
        ("estimate", "#define EM_INF_SQRT_ESTIMATE 1"),
    ]:
        source = tmp_path / f"{name}.c"
        source.write_text(f"{line}\n{text}")
        library = cpu_backend.open_library(cpu_build.build(source).path)
        with cpu_backend.kernels_from(library):
            actual = cpu_backend.em_inf_(logits.clone(), **settings)
        errors[name] = ((actual.double() - expected).abs() / ulp).amax(dim=1)
    worse = errors["estimate"] - errors["divider"]
    assert float(worse.max()) <= 2.0, (
        f"seed {seed}: per-row errors in ulps, divider {errors['divider'].tolist()}, "
        f"estimate {errors['estimate'].tolist()}"
    )


def test_the_square_root_is_chosen_by_vendor_unless_configured(monkeypatch):
    intel = "vendor_id : GenuineIntel\nflags : fpu avx2 avx512f"
    amd = "vendor_id : AuthenticAMD\nflags : fpu avx2 avx512f"
    monkeypatch.delenv(cpu_build.SQRT_ENV, raising=False)
    monkeypatch.delenv(cpu_build.ARCH_ENV, raising=False)
    assert cpu_build.sqrt_method(intel) == "estimate"
    assert cpu_build.sqrt_method(amd) == "divider"
    on_x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert ("-DEM_INF_SQRT_ESTIMATE" in cpu_build.flag_sets(intel)[0]) == on_x86
    assert "-DEM_INF_SQRT_ESTIMATE" not in cpu_build.flag_sets(amd)[0]
    monkeypatch.setenv(cpu_build.SQRT_ENV, "Divider")
    assert cpu_build.sqrt_method(intel) == "divider"
    assert "-DEM_INF_SQRT_ESTIMATE" not in cpu_build.flag_sets(intel)[0]
    monkeypatch.setenv(cpu_build.SQRT_ENV, "estimate")
    assert cpu_build.sqrt_method(amd) == "estimate"
    monkeypatch.setenv(cpu_build.ARCH_ENV, "x86-64-v3")  # no AVX-512: no estimate
    assert "-DEM_INF_SQRT_ESTIMATE" not in cpu_build.flag_sets(intel)[0]
    monkeypatch.setenv(cpu_build.SQRT_ENV, "rsqrt")
    with pytest.raises(cpu_build.BuildError, match="EM_INF_CPU_SQRT='rsqrt'"):
        cpu_build.sqrt_method(intel)


CONSECUTIVE_SPLIT_ROWS_SCRIPT = textwrap.dedent(
    """
    import torch
    from em_inf import cpu_backend
    rows, vocab = 5, 4097
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1)) * 3
    logits[3, 11] = float("nan")  # the first row left over: done after its scan
    params = dict(threshold=0.0, kl_weight=0.0, lr=0.1, steps=3)
    torch.set_num_threads(1)
    alone = cpu_backend.em_inf_(logits.clone(), **params)
    torch.set_num_threads(3)
    for call in range(2000):
        out = cpu_backend.em_inf_(logits.clone(), **params)
        same = (out == alone) | (out.isnan() & alone.isnan())
        assert bool(same.all()), f"call {call}: {(~same).any(1).nonzero().tolist()}"
    print("done")
    """
)


def test_consecutive_split_rows_neither_deadlock_nor_change_bits():
    """Two rows left over after one row per thread (5 rows, 3 threads) run one
    after the other by all threads, the first done right after its scan: a thread
    that started the second row's scan while another still read the first row's
    Partials deadlocked the kernels (within 60 s in every run without the barrier
    between split rows). 2,000 calls in a process of their own, each with the bits
    one thread gives."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", CONSECUTIVE_SPLIT_ROWS_SCRIPT],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("2,000 calls did not finish in 120 s: the kernels deadlocked")
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-3000:]


FALLBACK_SCRIPT = textwrap.dedent(
    """
    import logging, torch
    from em_inf import backend, functional, reference
    logging.basicConfig(level=logging.WARNING, format="WARNING %(message)s")
    assert backend.backend_for("cpu") == "torch"
    logits = torch.randn(3, 2_000, generator=torch.Generator().manual_seed(0)) * 3
    params = dict(threshold=0.1, kl_weight=0.01, lr=0.1, steps=3)
    for _ in range(2):
        out = functional.em_inf(logits, **params)
    assert reference.mismatch(out, reference.em_inf_oracle(logits, **params)) is None
    backend.prepare_backend("cpu")
    try:
        import os
        os.environ["EM_INF_BACKEND"] = "cpu"
        backend.backend_for("cpu")
    except ValueError as err:
        assert "unavailable" in str(err), err
    else:
        raise AssertionError("EM_INF_BACKEND=cpu without kernels did not raise")
    print("OK")
    """
)


def test_without_a_compiler_the_eager_path_runs_after_one_warning(tmp_path):
    env = dict(os.environ)
    env.update(EM_INF_CC=str(tmp_path / "no-such-cc"), EM_INF_CACHE=str(tmp_path))
    env.pop(backend.BACKEND_ENV, None)
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "OK"
    warnings = [line for line in done.stderr.splitlines() if "em-inf" in line]
    assert len(warnings) == 1, done.stderr
    assert "eager PyTorch path" in warnings[0] and "no-such-cc" in warnings[0]


# -- in a vLLM engine -----------------------------------------------------------------

ENGINE_PROMPTS = ("The quick brown fox", "a b c d e f g h", "Numbers: 1 2 3 4 5 6")
FILLER_PROMPTS = ("Entropy is", "Hello there, how are you today?")
ENGINE_SETTINGS = (
    EMInfConfig.from_preset("math"),
    EMInfConfig(threshold=0.0, kl_weight=0.01, lr=0.2, steps=5),
    EMInfConfig.from_preset("adaptive-temperature", alpha=0.5),
)


@pytest.fixture(scope="module")
def tiny_engine():
    from em_inf_support.tiny_model import TINY_VOCAB_SIZE, tiny_model_dir
    from tests.vllm_engines import engine

    with engine(str(tiny_model_dir(TINY_VOCAB_SIZE)), dtype="float32") as llm:
        yield llm


def test_in_an_engine_a_requests_em_inf_ignores_its_neighbours(tiny_engine, generator):
    """A request's EM-INF logits are bitwise em_inf.functional applied alone to the
    raw logits of an identical request with EM-INF off in the same batch, whatever
    else the batch holds. (The model's forward need not be batch invariant; the
    two identical requests in one batch get identical raw logits, which the test
    checks first.)"""
    from em_inf import functional
    from em_inf_support.tiny_model import TINY_VOCAB_SIZE
    from tests.vllm_engines import full_vocab_params, generate, processed_logits

    def params(config: EMInfConfig | None):
        extra = {"em_inf": False if config is None else config.as_dict()}
        return full_vocab_params(extra)

    def expected(raw: torch.Tensor, config: EMInfConfig) -> torch.Tensor:
        if config.mode == "temperature":
            return functional.adaptive_temperature(
                raw,
                threshold=config.threshold,
                alpha=config.alpha,
                t_min=config.t_min,
                t_max=config.t_max,
            )
        return functional.em_inf(
            raw,
            threshold=config.threshold,
            kl_weight=config.kl_weight,
            lr=config.lr,
            steps=config.steps,
        )

    pairs = [("on", k) for k in range(3)] + [("off", k) for k in range(3)]
    fillers = [("filler", k) for k in range(9)]
    batches = [
        [("on", 0), ("off", 0), ("off", 0)],
        pairs + fillers[:4],
        pairs + fillers,
    ]
    for batch in batches[1:]:
        order = torch.randperm(len(batch), generator=generator).tolist()
        batch[:] = [batch[i] for i in order]
    for batch in batches:
        requests = []
        for kind, k in batch:
            if kind == "filler":
                prompt = FILLER_PROMPTS[k % 2]
                config = ENGINE_SETTINGS[k % 3] if k % 4 else None
            else:
                prompt = ENGINE_PROMPTS[k]
                config = ENGINE_SETTINGS[k] if kind == "on" else None
            requests.append((prompt, params(config)))
        outputs = generate(tiny_engine, *zip(*requests, strict=True))
        logits = [processed_logits(out, TINY_VOCAB_SIZE) for out in outputs]
        raw: dict[int, torch.Tensor] = {}
        for (kind, k), row in zip(batch, logits, strict=True):
            if kind == "off":
                assert torch.equal(raw.setdefault(k, row), row), "twins differ"
        for (kind, k), row in zip(batch, logits, strict=True):
            if kind == "on":
                assert not torch.equal(row, raw[k])  # EM-INF did something
                want = expected(raw[k], ENGINE_SETTINGS[k])
                assert torch.equal(row, want), (len(batch), k)
