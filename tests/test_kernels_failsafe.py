"""The kernels' fail-safe and hostile inputs, under Triton's interpreter.

Properties checked on every row of batches of hostile logits (huge and tiny
scales, flat and near-flat rows, near ties, large offsets, float16 and bfloat16
values, ``-inf`` / ``finfo.min`` masks, one unmasked entry, all masked, NaN and
``+inf``) under settings drawn from the edges of the accepted ranges:

* no NaN anywhere; finite wherever the input was finite;
* masked entries (at or below ``-1e37``) keep their exact input value;
* a row holding NaN or ``+inf`` comes back bit-identical, and every row that comes
  back restored is counted in ``RESTORED`` (:mod:`em_inf.counters`), every row in
  ``ROWS``, every row with an entropy (not NaN / ``+inf``) in both histograms;
* where float32 resolves the row (moderate scales), the oracle standard.

The interpreter evaluates both sides of every ``tl.where`` with numpy, so the
discarded side of a guarded operation may overflow there: these tests silence
numpy's floating-point errors (the GPU computes the same selects). Runs in its
own process (see tests/kernel_helpers.py).
"""

from __future__ import annotations

from tests import kernel_helpers

kernel_helpers.require_interpreter()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from em_inf import counters  # noqa: E402
from em_inf.kernels import adaptive_temperature_rows_, em_inf_rows_  # noqa: E402
from em_inf.reference import (  # noqa: E402
    adaptive_temperature_oracle,
    em_inf_oracle,
    entropy,
    mismatch,
)

pytestmark = pytest.mark.usefixtures("poisoned_empty")

F32 = torch.finfo(torch.float32)
MASK_LEVEL = kernel_helpers.MASK_LEVEL


@pytest.fixture(autouse=True)
def silent_numpy():
    with np.errstate(all="ignore"):
        yield


def hostile_rows(vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Named ``[vocab]`` float32 rows; ``resolved_*`` ones are within float32's
    reach of the oracle standard."""

    def randn(scale: float = 1.0) -> torch.Tensor:
        return torch.randn(vocab, generator=generator) * scale

    masks = torch.rand(vocab, generator=generator) < 0.3
    masks[0] = False
    rows = {
        "resolved_gauss": randn(3.0),
        "resolved_near_flat": randn(1e-6),
        "resolved_flat": torch.zeros(vocab),
        "resolved_ties": torch.round(randn(2.0)),
        "resolved_inf_mask": randn(3.0).masked_fill(masks, -torch.inf),
        "resolved_min_mask": randn(3.0).masked_fill(masks, F32.min),
        "resolved_bf16": randn(4.0).bfloat16().float(),
        "tiny": randn(1e-30),
        "huge": randn(1e30),
        "near_max": randn(1.0).sign() * F32.max * 0.9,
        "max_and_min_mask": randn(1.0).sign().mul(F32.max).masked_fill(masks, F32.min),
        "offset": randn(3.0) + 1e4,
        "float16_max": (randn(1.0).sign() * 65504.0).half().float(),
        "one_unmasked": torch.full((vocab,), -torch.inf).index_fill(
            0, torch.tensor([0]), 1.0
        ),
        "all_masked": torch.full((vocab,), -torch.inf),
        "all_min": torch.full((vocab,), F32.min),
        "nan": randn(2.0).index_fill(0, torch.tensor([vocab // 2]), torch.nan),
        "pos_inf": randn(2.0).index_fill(0, torch.tensor([vocab - 1]), torch.inf),
    }
    return rows


def _named(names: list[str], rows: torch.Tensor) -> list[str]:
    return [name for name, flag in zip(names, rows.tolist(), strict=True) if flag]


def _check_properties(out: torch.Tensor, logits: torch.Tensor, names: list[str]):
    """The properties every path keeps. Returns ``(bad_input, identical)``: rows
    holding NaN or ``+inf``, and rows that came back bit-identical."""
    bad_input = (torch.isnan(logits) | (logits == torch.inf)).any(-1)
    identical = (out.view(torch.int32) == logits.view(torch.int32)).all(-1)
    assert identical[bad_input].all(), "a NaN / +inf row was changed"
    new_nan = torch.isnan(out).any(-1) & ~bad_input
    assert not new_nan.any(), f"NaN in {_named(names, new_nan)}"
    lost = (torch.isfinite(logits) & ~torch.isfinite(out)).any(-1)
    assert not lost.any(), f"non-finite in {_named(names, lost)}"
    masked = logits <= MASK_LEVEL
    assert torch.equal(out[masked], logits[masked]), "a masked entry changed"
    return bad_input, identical


def _check_counts(stats, n, bad_input, identical):
    """Every row counted once, restored rows between the NaN / ``+inf`` ones and
    the bit-identical ones, and every row with an entropy in both histograms."""
    assert stats[counters.ROWS] == n
    assert bad_input.sum() <= stats[counters.RESTORED] <= identical.sum()
    with_entropy = n - int(bad_input.sum())
    before = stats[counters.HIST_BEFORE : counters.HIST_AFTER]
    assert before.sum() == with_entropy
    assert stats[counters.HIST_AFTER :].sum() == with_entropy
    assert (stats >= 0).all()


@pytest.mark.parametrize("vocab", [1, 37, 3_000])
def test_logits_kernel_stays_finite_at_the_edges_of_the_accepted_ranges(
    vocab, generator
):
    rows = hostile_rows(vocab, generator)
    names = list(rows)
    logits = torch.stack(list(rows.values()))
    n = len(names)
    # Per row: threshold 0 (always runs), and kl_weight, lr, steps at the edges.
    params = {
        "threshold": torch.zeros(n),
        "kl_weight": torch.tensor([(0.0, 1e3, 0.05)[i % 3] for i in range(n)]),
        "lr": torch.tensor([(1e2, 1e-6, 0.1, 1e2)[i % 4] for i in range(n)]),
        "steps": torch.tensor([(1, 3, 5)[i % 3] for i in range(n)], dtype=torch.int32),
    }
    stats = torch.zeros(counters.WIDTH, dtype=torch.int64)
    out = logits.clone()
    em_inf_rows_(out, torch.arange(n, dtype=torch.int32), **params, stats=stats)
    bad_input, identical = _check_properties(out, logits, names)
    _check_counts(stats, n, bad_input, identical)
    for i, name in enumerate(names):
        if name.startswith("resolved") and params["steps"][i] <= 5:
            one = {k: v[i].item() for k, v in params.items()}
            expected = em_inf_oracle(
                logits[i : i + 1].masked_fill(
                    logits[i : i + 1] <= MASK_LEVEL, -torch.inf
                ),
                **one,
            )
            got = out[i : i + 1].masked_fill(
                logits[i : i + 1] <= MASK_LEVEL, -torch.inf
            )
            assert mismatch(got, expected) is None, (name, one, mismatch(got, expected))


def test_logits_kernel_stays_finite_for_many_steps_at_the_largest_lr():
    """30 steps of lr 100 (the accepted maximum) with kl_weight 1000: every logit
    moves by at most ~2.3 lr per step, far from float32's range. (Pass k replays
    k steps, so the interpreter's cost grows with the square of the steps;
    ``tests/test_gpu.py`` runs the accepted maximum, 100 steps, on a GPU.)"""
    logits = torch.tensor(
        [[2.0, -5.0, 1e-3, 7.0, -9e36, 1e-30, F32.min, 0.5, 3.0, 3.0]]
    )
    params = {
        "threshold": torch.zeros(1),
        "kl_weight": torch.full((1,), 1e3),
        "lr": torch.full((1,), 1e2),
        "steps": torch.full((1,), 30, dtype=torch.int32),
    }
    stats = torch.zeros(counters.WIDTH, dtype=torch.int64)
    out = logits.clone()
    em_inf_rows_(out, torch.zeros(1, dtype=torch.int32), **params, stats=stats)
    _check_properties(out, logits, ["extreme"])
    assert stats[:4].tolist() == [0, 30, 0, 1]
    assert not torch.equal(out, logits)


@pytest.mark.parametrize("vocab", [1, 37, 3_000])
def test_temperature_kernel_stays_finite_at_the_edges_of_the_accepted_ranges(
    vocab, generator
):
    rows = hostile_rows(vocab, generator)
    names = list(rows)
    logits = torch.stack(list(rows.values()))
    n = len(names)
    t_ends = ((1e-4, 1e-4), (1e4, 1e4), (1e-4, 1e4), (0.01, 1.0))
    params = {
        "threshold": torch.zeros(n),
        "alpha": torch.tensor([(1e-6, 1.0, 0.85)[i % 3] for i in range(n)]),
        "t_min": torch.tensor([t_ends[i % 4][0] for i in range(n)]),
        "t_max": torch.tensor([t_ends[i % 4][1] for i in range(n)]),
    }
    stats = torch.zeros(counters.WIDTH, dtype=torch.int64)
    out = logits.clone()
    adaptive_temperature_rows_(
        out, torch.arange(n, dtype=torch.int32), **params, stats=stats
    )
    bad_input, identical = _check_properties(out, logits, names)
    _check_counts(stats, n, bad_input, identical)
    for i, name in enumerate(names):
        if name.startswith("resolved") and params["t_min"][i] >= 0.01:
            one = {k: v[i].item() for k, v in params.items()}
            masked = logits[i : i + 1].masked_fill(
                logits[i : i + 1] <= MASK_LEVEL, -torch.inf
            )
            got = out[i : i + 1].masked_fill(
                logits[i : i + 1] <= MASK_LEVEL, -torch.inf
            )
            expected = adaptive_temperature_oracle(masked, **one)
            assert mismatch(got, expected) is None, (name, one, mismatch(got, expected))


def test_overflowing_temperature_restores_the_whole_row():
    """T = 1e-4 on logits near 1e35 (two tied at the top: entropy log 2): b z
    overflows float32, so the row comes back as it went in (not partly scaled) and
    is counted."""
    logits = torch.tensor([[1e35, 1e35, 0.0, -1e35], [1.0, 2.0, 3.0, 4.0]])
    params = {
        "threshold": torch.zeros(1),
        "alpha": torch.full((1,), 1e-6),
        "t_min": torch.full((1,), 1e-4),
        "t_max": torch.full((1,), 1e-4),
    }
    stats = torch.zeros(counters.WIDTH, dtype=torch.int64)
    out = logits.clone()
    adaptive_temperature_rows_(
        out, torch.zeros(2, dtype=torch.int32), **params, stats=stats
    )
    assert torch.equal(out[0], logits[0])
    assert torch.allclose(out[1], logits[1] * 1e4)
    below, work, restored, rows = stats[:4].tolist()
    assert (below, restored, rows) == (0, 1, 2)
    assert work >= 1  # row 1's solver passes; none for the restored row
    assert stats[counters.HIST_BEFORE :].sum() == 2 * 2
    # Row 0 keeps its entropy (log 2, the two tied maxima), row 1 is scaled.
    h = [entropy(logits[0].double()).item(), entropy(out[1].double()).item()]
    fixed = [counters.fixed_point(v) for v in h]
    assert (
        abs(
            stats[counters.SUM_BEFORE]
            - fixed[0]
            - counters.fixed_point(entropy(logits[1].double()).item())
        )
        <= 20
    )
    assert abs(stats[counters.SUM_AFTER] - sum(fixed)) <= 20


@pytest.mark.parametrize("poisoned_pass", [0, 1, 2])
def test_non_finite_statistics_of_any_pass_restore_the_row(monkeypatch, poisoned_pass):
    """A row whose statistics of pass k turn non-finite (forced here: one chunk
    partial of row 0 set to NaN right after pass k) is not written: it keeps z0
    and is counted; row 1 is processed as usual."""
    from em_inf.kernels import logits_mode

    real_kernel = logits_mode._em_inf_pass_kernel

    class PoisonAfterPass:
        def __getitem__(self, grid):
            launch = real_kernel[grid]

            def run(*args, **kwargs):
                launch(*args, **kwargs)
                partials, pass_idx = args[9], args[12]
                if kwargs["PHASE"] != 2 and pass_idx == poisoned_pass:
                    partials[0, pass_idx, 1, 1] = torch.nan

            return run

    monkeypatch.setattr(logits_mode, "_em_inf_pass_kernel", PoisonAfterPass())
    logits = torch.randn(2, 3_000) * 3
    params = {
        "threshold": torch.zeros(2),
        "kl_weight": torch.full((2,), 0.05),
        "lr": torch.full((2,), 0.1),
        "steps": torch.tensor([3, 3], dtype=torch.int32),
    }
    stats = torch.zeros(counters.WIDTH, dtype=torch.int64)
    out = logits.clone()
    logits_mode.em_inf_rows_with_plan_(
        out, torch.arange(2, dtype=torch.int32), **params, stats=stats, block=1024
    )
    assert torch.equal(out[0], logits[0])
    one = {k: v[1].item() for k, v in params.items()}
    assert mismatch(out[1:], em_inf_oracle(logits[1:], **one)) is None
    assert stats[:4].tolist() == [0, 3, 1, 2]
    # The restored row keeps its entropy (after == before), except where pass 0's
    # statistics are poisoned: then, as for NaN in its input, it has none.
    h = [counters.fixed_point(entropy(z.double()).item()) for z in (logits[0], out[1])]
    expected = h[1] + (h[0] if poisoned_pass else 0)
    assert abs(stats[counters.SUM_AFTER] - expected) <= 40
    assert stats[counters.HIST_AFTER :].sum() == (2 if poisoned_pass else 1)
