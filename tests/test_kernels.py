"""The Triton kernels (``em_inf.kernels``) against the float64 oracle, on CPU.

The kernels run under Triton's interpreter, which must be switched on before the
kernels module is first imported: run this module in the kernels' own pytest
process (``TRITON_INTERPRET=1 python -m pytest tests/test_kernels*.py``); without
the interpreter it fails at import (``kernel_helpers.require_interpreter``).

Every kernel call allocates its scratch with ``torch.empty``; the ``poisoned_empty``
fixture fills such buffers with NaN, so reading a partial no program wrote shows up
as NaN in the output.
"""

from __future__ import annotations

from tests import kernel_helpers

kernel_helpers.require_interpreter()

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from em_inf import backend, counters, cpu_backend, functional, reference  # noqa: E402
from em_inf.kernels import adaptive_temperature_rows_, em_inf_rows_  # noqa: E402
from em_inf.kernels.logits_mode import em_inf_rows_with_plan_  # noqa: E402
from em_inf.reference import entropy  # noqa: E402
from tests.inputs import mask_randomly, random_logits  # noqa: E402
from tests.kernel_helpers import (  # noqa: E402
    assert_temperature_tolerance,
    oracle_by_slot,
)
from tests.oracle import (  # noqa: E402
    adaptive_temperature_oracle,
    assert_matches,
    em_inf_oracle,
)

QWEN_VOCAB = 151_936


pytestmark = pytest.mark.usefixtures("poisoned_empty", "quiet_interpreter")


def _slot_params(slots: int, **values) -> dict[str, torch.Tensor]:
    """Per-slot ``[S]`` tensors (float32; ``steps`` int32) from numbers or lists."""
    out = {}
    for name, value in values.items():
        dtype = torch.int32 if name == "steps" else torch.float32
        out[name] = torch.as_tensor(value, dtype=dtype).expand(slots).contiguous()
    return out


def _run_em_inf(logits, row_slot, params, **kwargs):
    """The kernel on a copy of ``logits``; ``block`` / ``rows_per_launch`` go
    through the tuning entry point."""
    out = logits.clone()
    tuned = {"block", "rows_per_launch"} & set(kwargs)
    run = em_inf_rows_with_plan_ if tuned else em_inf_rows_
    returned = run(out, row_slot, **params, **kwargs)
    assert returned is out
    return out


# -- logits mode ------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, vocab, scale, steps, masked",
    [
        (2, QWEN_VOCAB, 3.0, 3, 0.0),
        (1, 152_064, 2.0, 5, 0.1),
        (3, 49_152, 1.0, 5, 0.0),
        (4, 32_003, 8.0, 3, 0.3),
        (5, 257, 2.0, 4, 0.0),
        (3, 4_097, 0.5, 2, 0.5),
    ],
)
def test_logits_kernel_matches_float64_reference(rows, vocab, scale, steps, masked):
    logits = random_logits(rows, vocab, scale=scale)
    if masked:
        logits = mask_randomly(logits, masked)
    params = _slot_params(rows, threshold=0.3, kl_weight=0.05, lr=0.1, steps=steps)
    row_slot = torch.arange(rows, dtype=torch.int32)
    out = _run_em_inf(logits, row_slot, params)
    assert_matches(out, oracle_by_slot(em_inf_oracle, logits, row_slot, params))


@pytest.mark.parametrize("kl_weight", [0.5, 50.0])
def test_logits_kernel_is_exact_on_near_flat_rows_with_a_large_kl_weight(
    kl_weight, generator
):
    # The gradient's KL term must be formed as lam (q - p0) (see test_functional).
    rows = 120
    logits = (torch.randn(rows, 3, generator=generator) * 1e-4).bfloat16().float()
    params = _slot_params(rows, threshold=0.0, kl_weight=kl_weight, lr=0.01, steps=3)
    row_slot = torch.arange(rows, dtype=torch.int32)
    out = _run_em_inf(logits, row_slot, params)
    assert_matches(out, oracle_by_slot(em_inf_oracle, logits, row_slot, params))


def test_logits_kernel_reads_parameters_through_row_slot():
    """Rows map to slots out of order, two rows share a slot (speculative decoding),
    slot -1 rows stay bit-identical; every slot has its own parameters, some with
    thresholds that stop rows early and ``steps`` from 0 to 6."""
    slots, vocab = 6, 6_001
    row_slot = torch.tensor([3, -1, 0, 5, 3, 1, -1, 2, 4], dtype=torch.int64)
    logits = random_logits(row_slot.numel(), vocab, scale=2.5)
    params = {
        "threshold": torch.rand(slots) * 3,
        "kl_weight": torch.rand(slots) * 0.1,
        "lr": torch.rand(slots) * 0.2 + 0.01,
        "steps": torch.tensor([0, 6, 3, 1, 5, 4], dtype=torch.int32),
    }
    out = _run_em_inf(logits, row_slot, params)
    untouched = row_slot < 0
    assert torch.equal(out[untouched], logits[untouched])
    expected = oracle_by_slot(em_inf_oracle, logits, row_slot, params)
    assert_matches(out[~untouched], expected[~untouched])
    assert torch.equal(out[row_slot == 0], logits[row_slot == 0])  # steps 0


@pytest.mark.parametrize("stop_after", [1, 2, 4])
def test_logits_kernel_stops_a_row_once_its_entropy_falls_below_threshold(stop_after):
    logits = random_logits(2, 20_000, scale=1.5)
    trajectory = [logits[0].double()] + [
        reference.em_inf_row(
            logits[0].double(), threshold=0.0, kl_weight=0.0, lr=0.5, steps=k
        )
        for k in range(1, stop_after + 1)
    ]
    h = [entropy(z).item() for z in trajectory]
    assert all(a > b + 0.01 for a, b in zip(h, h[1:], strict=False))
    # Steps 1..stop_after run; the check before the next one stops the row.
    threshold = (h[stop_after - 1] + h[stop_after]) / 2
    params = _slot_params(1, threshold=threshold, kl_weight=0.0, lr=0.5, steps=6)
    row_slot = torch.tensor([0, -1], dtype=torch.int32)
    out = _run_em_inf(logits, row_slot, params)
    assert_matches(out[:1], trajectory[-1][None])
    assert torch.equal(out[1], logits[1])


def test_logits_kernel_rows_below_threshold_come_back_bit_identical():
    logits = random_logits(6, 10_000, scale=2.0)
    logits[::2, 7] = 60.0  # near one-hot: entropy far below the threshold
    below = entropy(logits) < 0.3
    assert below[::2].all() and not below[1::2].any()
    params = _slot_params(6, threshold=0.3, kl_weight=0.05, lr=0.1, steps=3)
    out = _run_em_inf(logits, torch.arange(6, dtype=torch.int32), params)
    assert torch.equal(out[below], logits[below])
    assert not torch.equal(out[~below], logits[~below])


@pytest.mark.parametrize("fraction", [0.3, 0.999])
def test_logits_kernel_keeps_masked_tokens_masked(fraction):
    logits = mask_randomly(random_logits(3, 20_000), fraction)
    params = _slot_params(3, threshold=0.1, kl_weight=0.001, lr=0.1, steps=3)
    row_slot = torch.arange(3, dtype=torch.int32)
    out = _run_em_inf(logits, row_slot, params)
    assert torch.equal(torch.isneginf(out), torch.isneginf(logits))
    assert_matches(out, oracle_by_slot(em_inf_oracle, logits, row_slot, params))


def test_logits_kernel_leaves_fully_masked_rows_alone_without_nan():
    logits = random_logits(2, 5_000)
    logits[1] = -torch.inf
    params = _slot_params(2, threshold=0.0, kl_weight=0.05, lr=0.1, steps=3)
    out = _run_em_inf(logits, torch.arange(2, dtype=torch.int32), params)
    assert torch.isneginf(out[1]).all()
    single = {name: value[0].item() for name, value in params.items()}
    assert_matches(out[:1], em_inf_oracle(logits[:1], **single))


@pytest.mark.parametrize("scale", [1e-4, 50.0, 1e3])
def test_logits_kernel_extreme_logit_ranges(scale):
    logits = random_logits(2, 30_000, scale=scale)
    params = _slot_params(2, threshold=0.1, kl_weight=0.01, lr=0.05, steps=5)
    row_slot = torch.arange(2, dtype=torch.int32)
    out = _run_em_inf(logits, row_slot, params)
    assert_matches(out, oracle_by_slot(em_inf_oracle, logits, row_slot, params))


def test_logits_kernel_max_steps_caps_every_row():
    logits = random_logits(2, 3_000)
    params = _slot_params(2, threshold=0.0, kl_weight=0.05, lr=0.1, steps=[5, 1])
    row_slot = torch.arange(2, dtype=torch.int32)
    out = _run_em_inf(logits, row_slot, params, max_steps=2)
    capped = dict(params, steps=torch.tensor([2, 1], dtype=torch.int32))
    assert_matches(out, oracle_by_slot(em_inf_oracle, logits, row_slot, capped))


@pytest.mark.parametrize("block", [128, 1024])
def test_logits_kernel_result_does_not_depend_on_the_block_size(block):
    """Many small chunks (33 per row at block 128) or one: same answer."""
    logits = mask_randomly(random_logits(2, 4_099, scale=2.0), 0.2)
    params = _slot_params(2, threshold=0.2, kl_weight=0.02, lr=0.1, steps=3)
    row_slot = torch.arange(2, dtype=torch.int32)
    out = _run_em_inf(logits, row_slot, params, block=block)
    assert_matches(out, oracle_by_slot(em_inf_oracle, logits, row_slot, params))


def test_logits_kernel_in_row_groups_matches_one_launch_per_pass():
    logits = mask_randomly(random_logits(5, 3_001, scale=2.0), 0.1)
    row_slot = torch.tensor([2, -1, 0, 1, 2], dtype=torch.int32)
    params = {
        "threshold": torch.tensor([0.2, 50.0, 0.3]),
        "kl_weight": torch.tensor([0.01, 0.05, 0.0]),
        "lr": torch.tensor([0.1, 0.1, 0.05]),
        "steps": torch.tensor([3, 4, 2], dtype=torch.int32),
    }
    whole = _run_em_inf(logits, row_slot, params, block=1024)
    grouped = _run_em_inf(logits, row_slot, params, block=1024, rows_per_launch=2)
    assert torch.equal(grouped, whole)  # rows are independent: same arithmetic
    assert_matches(whole, oracle_by_slot(em_inf_oracle, logits, row_slot, params))


# -- temperature mode ---------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, vocab, scale", [(1, QWEN_VOCAB, 3.0), (3, 49_152, 1.0), (6, 999, 6.0)]
)
def test_temperature_kernel_matches_bisection(rows, vocab, scale):
    logits = mask_randomly(random_logits(rows, vocab, scale=scale), 0.2)
    params = _slot_params(rows, threshold=1e-5, alpha=0.85, t_min=0.01, t_max=1.0)
    row_slot = torch.arange(rows, dtype=torch.int32)
    out = logits.clone()
    adaptive_temperature_rows_(out, row_slot, **params)
    expected = oracle_by_slot(adaptive_temperature_oracle, logits, row_slot, params)
    assert_matches(out, expected)


def test_temperature_kernel_reaches_target_entropy_per_slot():
    slots, vocab = 8, 20_000
    row_slot = torch.tensor([4, 0, -1, 7, 1, 2, 3, 6, 5, 2, -1], dtype=torch.int32)
    logits = random_logits(row_slot.numel(), vocab, scale=2.0)
    params = {
        "threshold": torch.rand(slots) * 3,
        "alpha": torch.rand(slots) * 0.9 + 0.05,
        "t_min": torch.full((slots,), 1e-3),
        "t_max": torch.rand(slots) * 0.5 + 0.75,
    }
    params["threshold"][6] = 50.0  # above every row's entropy: untouched
    out = logits.clone()
    adaptive_temperature_rows_(out, row_slot, **params)
    assert not torch.isnan(out).any()
    h0 = entropy(logits.double())
    for row, slot in enumerate(row_slot.tolist()):
        if slot < 0 or h0[row] <= params["threshold"][slot]:
            assert torch.equal(out[row], logits[row]), row
            continue
        a_h0 = params["alpha"][slot].item() * h0[row].item()
        target = max(params["threshold"][slot].item(), a_h0)
        reached = entropy(out[row].double()).item()
        # The target is out of reach above t_max: the row is divided by t_max.
        top = entropy(logits[row].double() / params["t_max"][slot].item()).item()
        if top < target:
            torch.testing.assert_close(out[row], logits[row] / params["t_max"][slot])
        else:
            assert abs(reached - target) < 1e-4, (row, reached, target)


def test_temperature_kernel_clamps_to_t_min_when_target_out_of_reach():
    logits = torch.randn(2, 1_000) * 1e-3  # nearly uniform: entropy ~ log(1000)
    params = _slot_params(2, threshold=0.0, alpha=0.1, t_min=0.5, t_max=1.0)
    out = logits.clone()
    adaptive_temperature_rows_(out, torch.arange(2, dtype=torch.int32), **params)
    torch.testing.assert_close(out, logits / 0.5, rtol=1e-6, atol=0.0)


def test_temperature_kernel_leaves_fully_masked_rows_alone():
    logits = random_logits(2, 3_000)
    logits[0] = -torch.inf
    params = _slot_params(2, threshold=0.0, alpha=0.5, t_min=0.01, t_max=1.0)
    out = logits.clone()
    adaptive_temperature_rows_(out, torch.arange(2, dtype=torch.int32), **params)
    assert torch.isneginf(out[0]).all()
    assert not torch.isnan(out).any()
    assert entropy(out[1:].double()).item() < entropy(logits[1:].double()).item()


# -- argument checks ----------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(logits=torch.zeros(2, 8, dtype=torch.float64)), "float32"),
        (dict(logits=torch.zeros(8, 2).t()), "contiguous"),
        (dict(row_slot=torch.zeros(3, dtype=torch.int32)), "row_slot"),
        (dict(row_slot=torch.zeros(2)), "row_slot"),
        (dict(lr=torch.zeros(1, 1)), "lr"),
        (dict(steps=torch.zeros(1)), "steps"),
        (dict(stats=torch.zeros(3)), "stats"),
        (dict(stats=torch.zeros(4, dtype=torch.int64)), "stats"),
        (dict(stats=torch.zeros(counters.WIDTH)), "stats"),
        (dict(stats=torch.zeros(2, counters.WIDTH, dtype=torch.int64)), "stats"),
        (dict(stats=torch.zeros(2 * counters.WIDTH, dtype=torch.int64)[::2]), "stats"),
    ],
)
def test_logits_kernel_rejects_bad_arguments_naming_them(change, message):
    args = dict(
        logits=torch.zeros(2, 8),
        row_slot=torch.zeros(2, dtype=torch.int32),
        **_slot_params(1, threshold=0.3, kl_weight=0.05, lr=0.1, steps=3),
    )
    args.update(change)
    with pytest.raises(ValueError, match=message):
        em_inf_rows_(**args)


def test_logits_kernel_tuning_entry_point_rejects_a_bad_block():
    params = _slot_params(1, threshold=0.3, kl_weight=0.05, lr=0.1, steps=3)
    with pytest.raises(ValueError, match="block"):
        em_inf_rows_with_plan_(
            torch.zeros(2, 8), torch.zeros(2, dtype=torch.int32), **params, block=96
        )


# -- dispatch through em_inf.functional ------------------------------------------------


def test_functional_with_triton_backend_matches_reference(monkeypatch):
    monkeypatch.setenv("EM_INF_BACKEND", "triton")
    assert backend.backend_for("cpu") == "triton"
    logits = mask_randomly(random_logits(4, 7_000, scale=2.0), 0.1)
    em_params = dict(
        threshold=torch.tensor([0.3, 0.1, 50.0, 0.2]),
        kl_weight=0.01,
        lr=torch.tensor([0.1, 0.05, 0.1, 0.2]),
        steps=torch.tensor([3, 5, 3, 0]),
    )
    out = functional.em_inf(logits, **em_params)
    assert_matches(out, em_inf_oracle(logits, **em_params))
    t_params = dict(threshold=1e-5, alpha=torch.tensor([0.85, 0.5, 0.3, 0.9]))
    t_params |= dict(t_min=0.01, t_max=1.0)
    out = functional.adaptive_temperature(logits, **t_params)
    assert_matches(out, adaptive_temperature_oracle(logits, **t_params))


def test_functional_backend_choice(monkeypatch):
    monkeypatch.delenv("EM_INF_BACKEND", raising=False)
    compiled = cpu_backend.available()  # the compiled CPU kernels, where they build
    assert backend.backend_for("cpu") == ("cpu" if compiled else "torch")
    monkeypatch.setenv("EM_INF_BACKEND", "torch")
    assert backend.backend_for("cpu") == "torch"
    monkeypatch.setenv("EM_INF_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="EM_INF_BACKEND"):
        functional.em_inf(torch.zeros(1, 4), threshold=0, kl_weight=0, lr=1, steps=1)
    monkeypatch.setenv("EM_INF_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        backend.backend_for("cpu")


def test_importing_em_inf_functional_does_not_import_triton():
    code = (
        "import sys, em_inf, em_inf.functional; "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "assert 'em_inf.kernels' not in sys.modules"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# -- masks, statistics, the temperature tolerance -------------------------------------

F32_MIN = torch.finfo(torch.float32).min


@pytest.mark.parametrize("mask_value", [-torch.inf, F32_MIN, -2e37, -1e37])
def test_logits_kernel_treats_values_at_or_below_minus_1e37_as_masked(mask_value):
    logits = random_logits(3, 5_000, scale=2.0)
    masked = torch.rand(logits.shape) < 0.3
    masked[:, 0] = False
    logits[masked] = mask_value
    params = _slot_params(3, threshold=0.1, kl_weight=0.05, lr=0.1, steps=3)
    row_slot = torch.arange(3, dtype=torch.int32)
    out = _run_em_inf(logits, row_slot, params)
    assert torch.equal(out[masked], logits[masked])  # kept exactly
    as_inf = logits.masked_fill(masked, -torch.inf)
    expected = oracle_by_slot(em_inf_oracle, as_inf, row_slot, params)
    assert_matches(out.masked_fill(masked, -torch.inf), expected)


@pytest.mark.parametrize("mask_value", [-torch.inf, F32_MIN, -1e37])
def test_temperature_kernel_treats_values_at_or_below_minus_1e37_as_masked(mask_value):
    logits = random_logits(3, 5_000, scale=2.0)
    masked = torch.rand(logits.shape) < 0.3
    masked[:, 0] = False
    logits[masked] = mask_value
    params = _slot_params(3, threshold=1e-5, alpha=0.5, t_min=0.01, t_max=1.0)
    row_slot = torch.arange(3, dtype=torch.int32)
    out = logits.clone()
    adaptive_temperature_rows_(out, row_slot, **params)
    assert torch.equal(out[masked], logits[masked])
    as_inf = logits.masked_fill(masked, -torch.inf)
    expected = oracle_by_slot(adaptive_temperature_oracle, as_inf, row_slot, params)
    assert_matches(out.masked_fill(masked, -torch.inf), expected)


def test_logits_kernel_adds_its_counts_to_stats():
    """Rows: below the threshold from the start; threshold 0 (all 4 steps); one
    that stops after 2 steps; NaN input (restored); +inf input (restored); steps 0
    and slot -1 (not counted). The counts add to what ``stats`` held
    (tests/test_kernels_counters.py checks every column)."""
    vocab = 4_000
    logits = random_logits(7, vocab, scale=1.5)
    logits[0, 5] = 80.0  # one-hot: entropy ~0
    trajectory = [logits[2].double()] + [
        reference.em_inf_row(
            logits[2].double(), threshold=0.0, kl_weight=0.0, lr=0.5, steps=k
        )
        for k in (1, 2)
    ]
    h = [entropy(z).item() for z in trajectory]
    logits[3, 17] = torch.nan
    logits[4, 99] = torch.inf
    params = {
        "threshold": torch.tensor([0.3, 0.0, (h[1] + h[2]) / 2, 0.0, 0.0, 0.3]),
        "kl_weight": torch.tensor([0.05, 0.05, 0.0, 0.05, 0.05, 0.05]),
        "lr": torch.tensor([0.1, 0.1, 0.5, 0.1, 0.1, 0.1]),
        "steps": torch.tensor([3, 4, 6, 3, 3, 0], dtype=torch.int32),
    }
    row_slot = torch.tensor([0, 1, 2, 3, 4, 5, -1], dtype=torch.int32)
    stats = torch.zeros(counters.WIDTH, dtype=torch.int64)
    stats[:4] = torch.tensor([5, 7, 11, 13])
    with np.errstate(invalid="ignore"):  # the NaN and +inf rows' arithmetic
        out = _run_em_inf(logits, row_slot, params, stats=stats)
    assert stats[:4].tolist() == [5 + 1, 7 + 4 + 2, 11 + 2, 13 + 5]
    for row in (0, 3, 4, 5, 6):
        assert torch.equal(out[row].view(torch.int32), logits[row].view(torch.int32))
    assert_matches(out[2:3], trajectory[-1][None])


def test_temperature_kernel_adds_its_counts_to_stats():
    """Rows: at or below the threshold; two solved; NaN input (restored); a slot
    with threshold +inf (another mode's slot: not counted) and slot -1."""
    logits = random_logits(6, 3_000, scale=2.0)
    logits[0, 3] = 90.0
    logits[3, 8] = torch.nan
    params = {
        "threshold": torch.tensor([0.01, 1e-5, 1e-5, 1e-5, torch.inf]),
        "alpha": torch.full((5,), 0.7),
        "t_min": torch.full((5,), 0.01),
        "t_max": torch.full((5,), 1.0),
    }
    row_slot = torch.tensor([0, 1, 2, 3, 4, -1], dtype=torch.int32)
    stats = torch.zeros(counters.WIDTH, dtype=torch.int64)
    out = logits.clone()
    with np.errstate(invalid="ignore"):  # the NaN row's arithmetic
        adaptive_temperature_rows_(out, row_slot, **params, stats=stats)
    below, passes, restored, rows = stats[:4].tolist()
    assert (below, restored, rows) == (1, 1, 4)
    assert 2 <= passes <= 2 * 20  # two rows solved, a few passes each
    for row in (0, 3, 4, 5):
        assert torch.equal(out[row].view(torch.int32), logits[row].view(torch.int32))


def test_temperature_kernel_meets_the_entropy_tolerance(generator):
    """``|H(z / T) - target| <= TEMPERATURE_RTOL * target`` in float64 for the T the
    kernel applied (``kernel_helpers.assert_temperature_tolerance``); rows of scale
    0.3 to 30, alpha 0.05 to 0.95, all but two solved (not pinned at an end)."""
    rows, vocab = 12, 20_000
    scales = torch.tensor([0.3, 1.0, 3.0, 10.0, 30.0, 2.0] * 2)
    logits = torch.randn(rows, vocab, generator=generator) * scales[:, None]
    logits[:, 0] += 5.0
    alpha = torch.rand(rows, generator=generator) * 0.9 + 0.05
    params = {
        "threshold": torch.full((rows,), 1e-5),
        "alpha": alpha,
        "t_min": torch.full((rows,), 0.01),
        "t_max": torch.full((rows,), 1.0),
    }
    out = logits.clone()
    row_slot = torch.arange(rows, dtype=torch.int32)
    adaptive_temperature_rows_(out, row_slot, **params)
    solved = assert_temperature_tolerance(logits, out, row_slot, params)
    assert solved >= rows - 2
