"""Near-flat rows at a large learning rate: every path against the float32 loop.

Rows of 2 to 16 logits within a small spread (1e-4 to 0.3) around an offset, given
in float16, bfloat16 or float32, logits mode with lr up to 10, kl_weight 0 or not,
1 to 5 steps. Such rows are badly conditioned in float32: the first step moves every
logit by about ``lr`` (Adam's first step is ``lr g / (|g| + eps)``), so ``z1`` is
held to the ulp of ``lr`` (4.8e-7 at lr 5), while the second step divides by
``|g1| ~ spread / V``: it magnifies each ulp of ``z1`` ~1e4 times. Issue 23, item 7
found a V = 3 float16 row (threshold 0.5, kl_weight 0, lr 5, 2 steps) 4.7e-4 (TV)
from the float64 oracle where the authors' float32 loop was 9.7e-5 from it.

No float32 computation can be no further than that loop on *every* such row: the
loop's own roundings sometimes cancel. Even the best float32 implementation there
is, exact arithmetic with ``z``, ``m`` and ``v`` rounded to the nearest float32
after each step, is further from the oracle than the loop on 40 of 400 rows of
item 7's settings (up to 5.5e-4). The assertion is therefore against the larger of
two float32 yardsticks, both computed on the same float32 input with the settings
as float32 (what the paths see):

* the authors' loop run in float32 (:func:`em_inf.reference.em_inf_row`);
* the **float32-storage envelope** (:func:`storage_envelope`): the largest TV from
  the oracle among float64 runs of the same loop whose ``z``, ``m`` and ``v`` are
  rounded to float32 after every step, to nearest once and to a neighbour drawn at
  random (either side) :data:`ENVELOPE_RUNS` times: the spread that holding the
  iterates in float32 causes, whatever the arithmetic.

Slack, two parts (TV moves by at most the largest error of a logit): one float32
ulp of the largest logit of the oracle's answer (:func:`output_ulp`: the paths
return float32), and the roundings of the paths' own arithmetic, which the envelope
leaves out: :data:`STEP_ROUNDINGS` roundings of 2^-24 of each step's size (up to
~``lr``) per step, ``steps * 4 * 2^-24 * lr`` (2.4e-6 at item 7's settings). Over
1,000 seeded rows drawn like these none of the CPU kernels and the eager path went
beyond the bound; their TV was at most 1.12 times the larger yardstick, by at most
1.6e-8, and at most 1.0 times it wherever it exceeded 1e-6.

Rows whose threshold decision float32 cannot make (the float64 oracle changes when
the threshold moves by ``tests.test_properties.ENTROPY_MARGIN``) are left out
here; ``tests/test_properties.py`` (property 4) judges those.

The Triton kernels run the same test under the interpreter from
``tests/test_kernels_flat_rows.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from unittest import mock

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from em_inf import functional
from em_inf.config import ADAM_BETAS, ADAM_EPS, EMInfConfig
from em_inf.reference import em_inf_row
from tests.test_properties import (
    DTYPES,
    INTERPRETED,
    PROPERTY_SETTINGS,
    _f32,
    row_errors,
    row_reference,
    threshold_is_ambiguous,
)

#: Runs of the envelope with each stored value rounded to a random float32
#: neighbour (one more rounds to nearest).
ENVELOPE_RUNS = 32
#: Roundings a path's own arithmetic may put on a logit per step, each relative
#: 2^-24 of the step (Adam's normalised step moves a logit by up to ~lr).
STEP_ROUNDINGS = 4
#: Item 7's settings, and how many seeded rows :func:`test_item_7_settings` draws.
ITEM_7 = EMInfConfig(threshold=0.5, kl_weight=0.0, lr=5.0, steps=2)
ITEM_7_ROWS = 200
#: Offsets of the rows: around 0 (tiny ulps), 1, 3, 10 and 30 (the ulp of float16
#: and bfloat16 logits there, up to 0.125), and a negative one.
OFFSETS = (0.0, 1.0, 3.0, 10.0, 30.0, -7.0)


@dataclasses.dataclass(frozen=True)
class FlatRow:
    """One near-flat row and its settings (see :func:`make`)."""

    vocab: int
    dtype: str
    offset: float
    spread_exp: float  # logits within offset +- 10 ** spread_exp
    threshold_fraction: float  # threshold = this times the row's entropy
    kl_weight: float
    lr: float
    steps: int
    seed: int


def make(row: FlatRow) -> tuple[torch.Tensor, EMInfConfig]:
    """``(logits, config)``: ``[1, V]`` logits in the row's dtype and its settings,
    the threshold a fraction of the row's float64 entropy (a flat row sits near
    ``log V``, above every threshold a request would choose)."""
    gen = torch.Generator().manual_seed(row.seed)
    noise = 2 * torch.rand(row.vocab, generator=gen, dtype=torch.float64) - 1
    values = row.offset + 10.0**row.spread_exp * noise
    logits = values.to(DTYPES[row.dtype]).unsqueeze(0)
    log_q = torch.log_softmax(logits.double(), -1)
    h0 = float(-(log_q.exp() * log_q).sum())
    config = EMInfConfig(
        threshold=row.threshold_fraction * h0,
        kl_weight=row.kl_weight,
        lr=row.lr,
        steps=row.steps,
    )
    return logits, config


def _log_uniform(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(math.log10(low), math.log10(high)).map(lambda e: 10.0**e)


flat_rows = st.builds(
    FlatRow,
    vocab=st.integers(2, 16),
    dtype=st.sampled_from(list(DTYPES)),
    offset=st.sampled_from(OFFSETS),
    spread_exp=st.floats(-4.0, -0.5),
    threshold_fraction=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    kl_weight=st.one_of(st.just(0.0), _log_uniform(1e-2, 10.0)),
    lr=st.one_of(st.sampled_from([5.0, 10.0]), _log_uniform(0.1, 10.0)),
    steps=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)


Rounding = Callable[[torch.Tensor], torch.Tensor]


def to_nearest(value: torch.Tensor) -> torch.Tensor:
    """float64 ``value`` rounded to the nearest float32, as float64."""
    return value.float().double()


def to_a_neighbour(gen: torch.Generator) -> Rounding:
    """Rounding of float64 values to a float32 neighbour, each drawn from ``gen``:
    the float32 at or above the value, or the one at or below it."""

    def rounding(value: torch.Tensor) -> torch.Tensor:
        nearest = value.float()
        above = torch.where(
            nearest.double() < value,
            torch.nextafter(nearest, torch.tensor(math.inf)),
            nearest,
        )
        below = torch.where(
            nearest.double() > value,
            torch.nextafter(nearest, torch.tensor(-math.inf)),
            nearest,
        )
        up = torch.rand(value.shape, generator=gen) < 0.5
        return torch.where(up, above, below).double()

    return rounding


def stored_in_float32(
    x: torch.Tensor, config: EMInfConfig, rounding: Rounding
) -> torch.Tensor:
    """The authors' loop in float64 on float32 ``[V]`` ``x`` (no masks), its
    logits and Adam moments passed through ``rounding`` after every step.
    Closed-form gradient ``q (E_q[z] - z) + lam (q - p0)``, textbook Adam: with
    no rounding it is :func:`em_inf_row` in float64 (checked by
    :func:`test_the_envelope_without_rounding_is_the_oracle`).

    Returns:
        float64 ``[V]``.
    """
    beta1, beta2 = ADAM_BETAS
    threshold = _f32(config.threshold)
    lam, lr = _f32(config.kl_weight), _f32(config.lr)
    z = x.double()
    p0 = torch.softmax(z, -1)
    m = torch.zeros_like(z)
    v = torch.zeros_like(z)
    for t in range(1, config.steps + 1):
        zs = z - z.max()
        log_q = torch.log_softmax(zs, -1)
        q = log_q.exp()
        if float(-(q * log_q).sum()) < threshold:
            break
        g = q * ((q * zs).sum() - zs) + lam * (q - p0)
        m = rounding(beta1 * m + (1 - beta1) * g)
        v = rounding(beta2 * v + (1 - beta2) * g * g)
        denom = (v / (1 - beta2**t)).sqrt() + ADAM_EPS
        z = rounding(z - lr / (1 - beta1**t) * m / denom)
    return z


def storage_envelope(
    x: torch.Tensor, config: EMInfConfig, oracle: torch.Tensor, seed: int
) -> float:
    """The largest TV from ``oracle`` of :func:`stored_in_float32` rounding to
    nearest, and to random neighbours (:data:`ENVELOPE_RUNS` runs from ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    runs = [stored_in_float32(x, config, to_nearest)]
    runs += [
        stored_in_float32(x, config, to_a_neighbour(gen)) for _ in range(ENVELOPE_RUNS)
    ]
    return max(row_errors(run, oracle).tv for run in runs)


def output_ulp(oracle: torch.Tensor) -> float:
    """One float32 ulp of the largest logit magnitude of the oracle's answer: the
    TV that rounding the answer to float32 may cost."""
    largest = oracle.abs().max().float()
    return float(torch.nextafter(largest, torch.tensor(math.inf)) - largest)


def on_path(path: str, logits: torch.Tensor, config: EMInfConfig) -> torch.Tensor:
    """``em_inf.functional.em_inf`` on ``path`` (``EM_INF_BACKEND``)."""
    with mock.patch.dict(os.environ, {"EM_INF_BACKEND": path}):
        return functional.em_inf(
            logits,
            threshold=config.threshold,
            kl_weight=config.kl_weight,
            lr=config.lr,
            steps=config.steps,
        )


def bound_problem(
    out: torch.Tensor, x: torch.Tensor, config: EMInfConfig, seed: int
) -> str | None:
    """Why float32 ``[V]`` ``out`` (a path's answer on float32 input ``x``) is
    further from the float64 oracle than the module's bound allows; ``None`` where
    it is not."""
    threshold = _f32(config.threshold)
    oracle = row_reference(x, config, torch.float64, threshold)
    ours = row_errors(out, oracle).tv
    loop = row_errors(row_reference(x, config, torch.float32, threshold), oracle).tv
    envelope = storage_envelope(x, config, oracle, seed)
    slack = output_ulp(oracle) + config.steps * STEP_ROUNDINGS * 2**-24 * config.lr
    allowed = max(loop, envelope) + slack
    if ours <= allowed:
        return None
    return (
        f"TV {ours:.3g} from the float64 oracle > {allowed:.3g}: the authors' float32 "
        f"loop {loop:.3g}, float32-storage envelope {envelope:.3g}, slack {slack:.3g}"
    )


@pytest.fixture(scope="module", params=["cpu", "torch"])
def path(request) -> str:
    """The CPU kernels and the eager path (the kernels: their own module)."""
    return request.param


@settings(PROPERTY_SETTINGS, max_examples=30 if INTERPRETED else 300)
@given(row=flat_rows)
def test_no_further_from_the_oracle_than_float32_allows(path: str, row: FlatRow):
    """Every path's TV from the float64 oracle is at most the larger of the
    authors' float32 loop's and the float32-storage envelope's, plus one output
    ulp (module docstring)."""
    logits, config = make(row)
    x = logits.float()[0]
    assume(not threshold_is_ambiguous(x, config))
    out = on_path(path, logits, config)[0]
    problem = bound_problem(out, x, config, row.seed)
    assert problem is None, f"{path}: {problem}"


def test_item_7_settings(path: str, seed: int):
    """Item 7's settings on :data:`ITEM_7_ROWS` near-flat V = 3 float16 rows drawn
    from ``seed``, as one batch: every row within the bound. (Over such rows the
    paths' TV is no worse than the loop's in distribution, but not on every draw of
    200: both tails are set by the same float32 conditioning.)"""
    gen = torch.Generator().manual_seed(seed)
    spreads = 10.0 ** torch.empty(ITEM_7_ROWS, 1).uniform_(-3.5, -1.0, generator=gen)
    pick = torch.randint(len(OFFSETS), (ITEM_7_ROWS, 1), generator=gen)
    noise = 2 * torch.rand(ITEM_7_ROWS, 3, generator=gen) - 1
    logits = (torch.tensor(OFFSETS)[pick] + spreads * noise).half()
    out = on_path(path, logits, ITEM_7)
    problems = [
        f"row {r} {x.tolist()}: {problem}"
        for r, x in enumerate(logits.float())
        if (problem := bound_problem(out[r], x, ITEM_7, seed + r))
    ]
    assert not problems, f"{path}, seed {seed}: " + "; ".join(problems[:3])


@given(row=flat_rows)
@settings(PROPERTY_SETTINGS, max_examples=50)
def test_the_envelope_without_rounding_is_the_oracle(row: FlatRow):
    """:func:`stored_in_float32` with its roundings left out is the float64
    oracle: the envelope measures the roundings, nothing else."""
    logits, config = make(row)
    x = logits.float()[0]
    oracle = em_inf_row(
        x.double(),
        threshold=_f32(config.threshold),
        kl_weight=_f32(config.kl_weight),
        lr=_f32(config.lr),
        steps=config.steps,
    )
    exact = stored_in_float32(x, config, lambda value: value)
    assert row_errors(exact, oracle).tv < 1e-12
