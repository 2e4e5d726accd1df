"""em_inf.functional against the authors' loop evaluated in float64, on both CPU
paths: the compiled kernels and the eager PyTorch fallback."""

from __future__ import annotations

import pytest
import torch

from em_inf import checks, counters, cpu_backend, functional, torch_backend
from em_inf.reference import entropy
from tests.inputs import mask_randomly, random_logits
from tests.oracle import adaptive_temperature_oracle, assert_matches, em_inf_oracle

QWEN_VOCAB = 151_936


@pytest.fixture(autouse=True, params=["cpu", "torch"])
def cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on the compiled CPU kernels and on the eager PyTorch path."""
    monkeypatch.setenv("EM_INF_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize(
    "rows, vocab, scale",
    [(1, QWEN_VOCAB, 3.0), (3, 49_152, 1.0), (5, 32_003, 8.0), (8, 257, 2.0)],
)
@pytest.mark.parametrize("steps", [3, 5])
def test_em_inf_matches_float64_reference(rows, vocab, scale, steps):
    logits = random_logits(rows, vocab, scale=scale)
    params = dict(threshold=0.3, kl_weight=0.05, lr=0.1, steps=steps)
    assert_matches(functional.em_inf(logits, **params), em_inf_oracle(logits, **params))


def test_em_inf_per_row_parameters_match_reference():
    rows = 12
    logits = random_logits(rows, 4_001, scale=2.5)
    params = dict(
        threshold=torch.rand(rows) * 2,
        kl_weight=torch.rand(rows) * 0.1,
        lr=torch.rand(rows) * 0.2 + 0.01,
        steps=torch.randint(0, 7, (rows,)),
    )
    assert_matches(functional.em_inf(logits, **params), em_inf_oracle(logits, **params))


@pytest.mark.parametrize("fraction", [0.3, 0.999])
def test_em_inf_keeps_masked_tokens_masked(fraction):
    logits = mask_randomly(random_logits(4, 20_000), fraction)
    params = dict(threshold=0.1, kl_weight=0.001, lr=0.1, steps=3)
    out = functional.em_inf(logits, **params)
    assert torch.equal(torch.isneginf(out), torch.isneginf(logits))
    assert_matches(out, em_inf_oracle(logits, **params))


def test_em_inf_rows_below_threshold_come_back_bit_identical():
    logits = random_logits(6, 10_000, scale=2.0)
    logits[::2, 7] = 60.0  # near one-hot: entropy far below the threshold
    ent = entropy(logits)
    out = functional.em_inf(logits, threshold=0.3, kl_weight=0.05, lr=0.1, steps=3)
    below = ent < 0.3
    assert below[::2].all() and not below[1::2].any()
    assert torch.equal(out[below], logits[below])
    assert not torch.equal(out[~below], logits[~below])


@pytest.mark.parametrize("scale, steps", [(1e-4, 3), (50.0, 5), (1e3, 5)])
def test_em_inf_extreme_logit_ranges(scale, steps):
    # Flat rows are ill-conditioned for any float32 loop: their gradients sit below
    # Adam's eps, where an error dz in a logit returns as lr * q * dz / eps in the
    # next update (x150 per step at V = 30k, lr = 0.05). Three steps keep float32
    # rounding within the standard; five amplify it past 5e-3 on rare draws (the
    # published float32 loop is off by ~0.2 on these rows at any step count).
    logits = random_logits(3, 30_000, scale=scale)
    params = dict(threshold=0.1, kl_weight=0.01, lr=0.05, steps=steps)
    assert_matches(functional.em_inf(logits, **params), em_inf_oracle(logits, **params))


@pytest.mark.parametrize("kl_weight", [0.5, 5.0, 50.0])
def test_em_inf_is_exact_on_near_flat_rows_with_a_large_kl_weight(kl_weight, generator):
    # Near-flat rows (logits ~1e-4, rounded through bfloat16): the KL gradient
    # lam (q - p0) must be formed as such; q (lam + E_q[z] - z) - lam p0 cancels two
    # terms of size lam q and was off by TV ~2e-3 at lam = 50.
    logits = (torch.randn(300, 3, generator=generator) * 1e-4).bfloat16().float()
    params = dict(threshold=0.0, kl_weight=kl_weight, lr=0.01, steps=3)
    out = functional.em_inf(logits, **params)
    assert_matches(out, em_inf_oracle(logits, **params))


def test_em_inf_accepts_half_precision_and_returns_float32():
    logits = random_logits(2, 5_000).to(torch.bfloat16)
    params = dict(threshold=0.3, kl_weight=0.05, lr=0.1, steps=3)
    out = functional.em_inf(logits, **params)
    assert out.dtype == torch.float32
    assert_matches(out, em_inf_oracle(logits.float(), **params))


def test_em_inf_does_not_modify_its_input():
    logits = random_logits(3, 1_000)
    before = logits.clone()
    functional.em_inf(logits, threshold=0.1, kl_weight=0.0, lr=0.1, steps=3)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("mode", ["logits", "temperature"])
def test_rows_are_read_where_they_lie(mode):
    """A float32 batch whose rows lie apart (a slice of a wider tensor), which the
    compiled path reads in place of a copy: the bits of its contiguous copy."""
    wide = random_logits(5, 3_000, scale=2.0)
    logits = wide[:, 7:2_007]
    assert logits.stride(0) != logits.shape[1]
    if mode == "logits":
        params = dict(threshold=0.1, kl_weight=0.05, lr=0.1, steps=3)
        run = functional.em_inf
    else:
        params = dict(threshold=0.1, alpha=0.5, t_min=0.01, t_max=1.0)
        run = functional.adaptive_temperature
    before = wide.clone()
    out = run(logits, **params)
    assert torch.equal(out, run(logits.contiguous(), **params))
    assert torch.equal(wide, before)


@pytest.mark.parametrize(
    "rows, vocab, scale", [(1, QWEN_VOCAB, 3.0), (4, 49_152, 1.0), (6, 999, 6.0)]
)
def test_adaptive_temperature_matches_bisection(rows, vocab, scale):
    logits = mask_randomly(random_logits(rows, vocab, scale=scale), 0.2)
    params = dict(threshold=1e-5, alpha=0.85, t_min=0.01, t_max=1.0)
    out = functional.adaptive_temperature(logits, **params)
    assert_matches(out, adaptive_temperature_oracle(logits, **params))


def test_adaptive_temperature_reaches_target_entropy_within_1e_4():
    rows = 16
    logits = random_logits(rows, 50_000, scale=2.0)
    alpha = torch.rand(rows) * 0.9 + 0.05
    threshold = torch.rand(rows) * 3
    out = functional.adaptive_temperature(
        logits, threshold=threshold, alpha=alpha, t_min=1e-3, t_max=1.0
    )
    h0 = entropy(logits.double())
    target = torch.maximum(threshold.double(), alpha.double() * h0)
    reached = entropy(out.double())
    moved = h0 > threshold.double()
    assert moved.any()
    assert ((reached - target).abs()[moved] < 1e-4).all()
    assert torch.equal(out[~moved], logits[~moved])


def test_adaptive_temperature_clamps_to_t_min_when_target_out_of_reach():
    logits = torch.randn(2, 1_000) * 1e-3  # nearly uniform: entropy ~ log(1000)
    out = functional.adaptive_temperature(
        logits, threshold=0.0, alpha=0.1, t_min=0.5, t_max=1.0
    )
    torch.testing.assert_close(out, logits / 0.5, rtol=1e-6, atol=0.0)


def test_adaptive_temperature_pins_a_flat_row_at_t_min_like_the_oracle():
    # Entropy log V at every temperature: the target is out of reach and the
    # authors' bisection ends at t_min (a row of 1e4 + 1e-4 noise is flat in float32).
    logits = torch.stack([torch.full((65,), 3.0), torch.full((65,), 1e4)])
    params = dict(threshold=0.3, alpha=0.85, t_min=0.01, t_max=1.0)
    out = functional.adaptive_temperature(logits, **params)
    assert_matches(out, adaptive_temperature_oracle(logits, **params))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(threshold=torch.ones(3)), "threshold"),
        (dict(lr="fast"), "lr"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, message):
    params = dict(threshold=0.3, kl_weight=0.05, lr=0.1, steps=3) | kwargs
    with pytest.raises(ValueError, match=message):
        functional.em_inf(torch.zeros(2, 10), **params)


def test_a_number_for_every_row_is_one_shared_column_that_no_path_writes(generator):
    """A parameter given as a number becomes a column made once and shared by the
    calls that give the same number (they then run no torch operation for it), so
    no path may write one: after both modes run on hostile rows, each column
    still holds its number. -0.0 and 0.0, equal as keys, get a column each."""
    cpu = torch.device("cpu")
    logits = random_logits(4, 1_000, scale=4.0, generator=generator)
    logits[0] = torch.nan
    settings = dict(threshold=0.0, kl_weight=0.25, lr=1e30, steps=7)
    temperature = dict(threshold=0.0, alpha=0.5, t_min=0.01, t_max=0.5)
    functional.em_inf(logits, **settings)
    functional.adaptive_temperature(logits, **temperature)
    for name, value in (settings | temperature).items():
        dtype = torch.int64 if name == "steps" else torch.float32
        column = checks.per_row(name, value, 4, cpu, dtype)
        assert column is checks.per_row(name, value, 4, cpu, dtype)
        assert torch.equal(column, torch.full((4,), value, dtype=dtype)), name
    zero, negative_zero = (
        checks.per_row("lr", value, 4, cpu, torch.float32) for value in (0.0, -0.0)
    )
    assert not torch.signbit(zero).any() and torch.signbit(negative_zero).all()


def test_adaptive_temperature_needs_far_fewer_passes_than_bisection(cpu_path):
    """Each solver pass reads a row once; bisection to the solver's tolerance
    would take ~35 passes per row (~20 to the authors' 0.1 nats); the safeguarded
    Newton steps need a handful."""
    rows, vocab = 8, 20_000
    logits = random_logits(rows, vocab, scale=2.0)
    stats = torch.zeros(counters.WIDTH, dtype=torch.int64)
    backend = cpu_backend if cpu_path == "cpu" else torch_backend
    backend.adaptive_temperature_(
        logits,
        torch.full((rows, 1), 1e-5),
        torch.rand(rows, 1) * 0.8 + 0.1,
        torch.full((rows, 1), 0.01),
        torch.full((rows, 1), 1.0),
        stats=stats,
    )
    below, passes, restored = stats[:3].tolist()
    assert below == 0 and restored == 0
    # The first pass measures H0 at T = 1; the rest are solver passes.
    assert 2 * rows <= passes <= 8 * rows, passes


@pytest.mark.parametrize("cpu_path", ["cpu", "torch"])
def test_a_temperature_at_an_end_of_the_interval_divides_exactly(cpu_path, generator):
    """Where the solver ends at t_min or t_max (here the only temperature allowed),
    every unmasked logit is z / T rounded once, bit for bit: multiplying by
    float32(1 / T) instead is off by most of an ulp (9216 / 10 came back as
    921.60004, not 921.59998)."""
    backend = cpu_backend if cpu_path == "cpu" else torch_backend
    logits = torch.randn(6, 257, generator=generator) * 3
    logits[0, :2] = torch.tensor([9216.0, 9208.0])
    logits[1, 5] = -torch.inf
    for t in (10.0, 0.3, 7.0):
        out = logits.clone()
        ones = torch.ones(6, 1)
        backend.adaptive_temperature_(out, ones * 0.0, ones * 0.5, ones * t, ones * t)
        expected = torch.where(logits > -1e37, logits / torch.tensor(t), logits)
        assert torch.equal(out, expected), (t, (out != expected).nonzero()[:5])
