"""The compiled CPU kernels' counters (:mod:`em_inf.counters`), every column, against
the float64 oracle (:mod:`em_inf.reference`) and :func:`em_inf.counters.add_row`.

Each case is a batch of rows of known kinds: below their threshold, running all
their steps, stopping early (logits mode: the threshold lies between the oracle's
entropies after steps k - 1 and k), all masked, holding NaN or +inf, restored by the
fail-safe, and (logits mode) steps == 0, which is not processed. Expected counts:
``ROWS``, ``BELOW``, ``WORK``, ``RESTORED`` exactly; the entropy bins exactly except
for rows whose float64 entropy lies within :data:`EDGE_WINDOW` of an edge (either
neighbouring bin); the entropy sums within :data:`SUM_TOL_UNITS` per row.

The entropy before is the float64 entropy of the input row; after, that of the row
the kernel returned (logits mode) or of the input times the ``1 / T`` the kernel
applied, in float64 (temperature mode: the kernel takes the solver's evaluation at
that ``1 / T``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from em_inf import counters, cpu_backend
from em_inf.reference import em_inf_row, entropy

#: Entropy-sum tolerance, in SUM_* units (1e-6 nats) per row: both sides round each
#: row to a unit (0.5 each), and the kernels' float32 passes (float32 exp and block
#: sums, double accumulation) were measured within 0.03e-6 nats of the float64
#: entropy at V up to 151,936; 2 units leave room for harder rows.
SUM_TOL_UNITS = 2
#: Rows whose float64 entropy lies this close to a bin edge may land in either bin.
EDGE_WINDOW = 1e-4
FLOAT32_MIN = torch.finfo(torch.float32).min


@pytest.fixture(autouse=True, scope="module")
def every_row_measured():
    """The entropy after of every row (the CPU path samples logits-mode rows by
    default; test_the_logits_mode_measures_a_sample_of_rows tests the sample)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(counters.SAMPLE_ENV, "1")
        yield


pytestmark = pytest.mark.usefixtures("compiled_cpu_kernels")


@pytest.fixture
def threads():
    """Restores torch's thread count after a test changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@dataclass
class Expected:
    """One processed row's expected counts (entropies ``None``: NaN / +inf)."""

    before: float | None
    after: float | None
    below: bool = False
    work: int | None = 0  # None: not known exactly (temperature passes)
    restored: bool = False


def new_stats() -> torch.Tensor:
    return torch.zeros(counters.WIDTH, dtype=torch.int64)


def gaussian_row(gen: torch.Generator, vocab: int) -> torch.Tensor:
    """Gaussian logits, scale in [0.5, 5], one boosted token (some rows confident,
    some flat)."""
    scale = 0.5 + 4.5 * torch.rand((), generator=gen).item()
    row = torch.randn(vocab, generator=gen) * scale
    row[int(torch.randint(0, vocab, (), generator=gen))] += (
        4 * scale * torch.rand((), generator=gen).item()
    )
    if torch.rand((), generator=gen) < 0.5:  # some masked, -inf or float32's min
        hit = torch.rand(vocab, generator=gen) < 0.3
        hit[0] = False
        fill = -torch.inf if torch.rand((), generator=gen) < 0.5 else FLOAT32_MIN
        row = row.masked_fill(hit, fill)
    return row


def h64(row: torch.Tensor) -> float:
    return entropy(row.double()).item()


def unusable_row(gen: torch.Generator, vocab: int, value: float) -> torch.Tensor:
    row = torch.randn(vocab, generator=gen)
    row[int(torch.randint(0, vocab, (), generator=gen))] = value
    return row


# -- cases ---------------------------------------------------------------------------

LOGITS_KINDS = (
    "below", "all", "early", "all", "masked", "masked_work", "nan", "inf", "restore",
    "steps0", "early", "below",
)  # fmt: skip


def logits_case(seed: int, vocab: int):
    """(logits [B, V], params, expected per row (None: not processed))."""
    gen = torch.Generator().manual_seed(seed)
    rows, params, expected = [], [], []
    for kind in LOGITS_KINDS:
        kl = 0.1 * torch.rand((), generator=gen).item()
        lr = 0.05 + 0.15 * torch.rand((), generator=gen).item()
        steps = int(torch.randint(1, 6, (), generator=gen))
        row = gaussian_row(gen, vocab)
        h0 = h64(row)
        if kind == "early":
            k = int(torch.randint(2, 5, (), generator=gen))
            one = dict(threshold=-1.0, kl_weight=kl, lr=lr)
            h_prev = h64(em_inf_row(row.double(), **one, steps=k - 1))
            h_k = h64(em_inf_row(row.double(), **one, steps=k))
            if h_prev - h_k < 0.01:  # too flat a step to place a threshold in
                kind = "all"
            else:
                threshold, steps = (h_prev + h_k) / 2, k + 2
                expected.append(Expected(h0, None, work=k))
        if kind == "below":
            threshold = h0 + 0.05
            expected.append(Expected(h0, h0, below=True))
        elif kind == "all":
            threshold = 0.0  # no entropy is below 0: every step runs
            expected.append(Expected(h0, None, work=steps))
        elif kind in ("masked", "masked_work"):
            row = torch.full((vocab,), -torch.inf if kind == "masked" else FLOAT32_MIN)
            threshold = 0.5 if kind == "masked" else 0.0  # entropy 0: below 0.5
            below = kind == "masked"
            expected.append(Expected(0.0, 0.0, below=below, work=0 if below else steps))
        elif kind in ("nan", "inf"):
            row = unusable_row(gen, vocab, torch.nan if kind == "nan" else torch.inf)
            threshold = 0.0
            expected.append(Expected(None, None, restored=True))
        elif kind == "restore":  # the settings that found NaN: restored
            row = torch.randn(vocab, generator=gen) * 3
            h0 = h64(row)
            threshold, kl, lr, steps = 0.0, 3e38, 3e38, 50
            expected.append(Expected(h0, h0, restored=True))
        elif kind == "steps0":
            threshold, steps = 0.0, 0
            expected.append(None)
        rows.append(row)
        params.append((threshold, kl, lr, steps))
    columns = list(zip(*params, strict=True))
    return (
        torch.stack(rows),
        dict(
            threshold=torch.tensor(columns[0], dtype=torch.float32),
            kl_weight=torch.tensor(columns[1], dtype=torch.float32),
            lr=torch.tensor(columns[2], dtype=torch.float32),
            steps=torch.tensor(columns[3], dtype=torch.int64),
        ),
        expected,
    )


TEMPERATURE_KINDS = (
    "below", "moved", "moved", "masked", "nan", "inf", "restore", "moved", "below",
)  # fmt: skip


def temperature_case(seed: int, vocab: int):
    gen = torch.Generator().manual_seed(seed)
    rows, params, expected = [], [], []
    for kind in TEMPERATURE_KINDS:
        alpha = 0.2 + 0.75 * torch.rand((), generator=gen).item()
        t_min = 10 ** (-2 * torch.rand((), generator=gen).item())
        t_max = t_min + (3.0 - t_min) * torch.rand((), generator=gen).item()
        row = gaussian_row(gen, vocab)
        h0 = h64(row)
        threshold = 0.0
        if kind == "below":
            threshold = h0 + 0.05
            expected.append(Expected(h0, h0, below=True))
        elif kind == "moved":
            threshold = 0.3 * h0 * torch.rand((), generator=gen).item()
            expected.append(Expected(h0, None, work=None))
        elif kind == "masked":
            row = torch.full((vocab,), -torch.inf)
            expected.append(Expected(0.0, 0.0, below=True))
        elif kind in ("nan", "inf"):
            row = unusable_row(gen, vocab, torch.nan if kind == "nan" else torch.inf)
            expected.append(Expected(None, None, restored=True))
        elif kind == "restore":  # z / T past float32's range: restored
            row = torch.randn(vocab, generator=gen) * 3
            row[7] = -1e36
            h0 = h64(row)
            alpha, t_min, t_max = 0.5, 1e-4, 1e-4
            expected.append(Expected(h0, h0, restored=True))
        rows.append(row)
        params.append((threshold, alpha, t_min, t_max))
    columns = list(zip(*params, strict=True))
    names = ("threshold", "alpha", "t_min", "t_max")
    return (
        torch.stack(rows),
        {
            n: torch.tensor(c, dtype=torch.float32)
            for n, c in zip(names, columns, strict=True)
        },
        expected,
    )


def run(mode: str, logits: torch.Tensor, params: dict, **kwargs) -> torch.Tensor:
    out = logits.clone()
    columns = [params[k].reshape(-1, 1) for k in params]
    if mode == "logits":
        cpu_backend.em_inf_(out, *columns, **kwargs)
    else:
        cpu_backend.adaptive_temperature_(out, *columns, **kwargs)
    return out


# -- checking --------------------------------------------------------------------------


def bins_allowed(h: float) -> set[int]:
    return {
        counters.entropy_bin(h - EDGE_WINDOW),
        counters.entropy_bin(h + EDGE_WINDOW),
    }


def histogram_problem(got: list[int], entropies: list[float]) -> str | None:
    """Why ``got`` (N_BINS counts) is not the histogram of ``entropies``, each in
    one of its allowed bins; ``None`` where it is."""
    fixed = [0] * counters.N_BINS
    loose = []
    for h in entropies:
        allowed = sorted(bins_allowed(h))
        if len(allowed) == 1:
            fixed[allowed[0]] += 1
        else:
            loose.append(allowed)
    for choice in itertools.product(*loose):  # few rows lie near an edge
        want = fixed.copy()
        for b in choice:
            want[b] += 1
        if want == got:
            return None
    return f"histogram {got} != {fixed} (+ rows near an edge: {loose})"


def check_counts(stats: torch.Tensor, expected: list[Expected | None], seed) -> None:
    got = stats.tolist()
    want = [0] * counters.WIDTH
    for row in expected:
        if row is None:
            continue
        counters.add_row(want, row.before, row.after, below=row.below)
        want[counters.WORK] += row.work or 0
        want[counters.RESTORED] += int(row.restored)
    where = f"seed {seed}"
    exact = (counters.BELOW, counters.RESTORED, counters.ROWS)
    assert [got[c] for c in exact] == [want[c] for c in exact], where
    if all(row is None or row.work is not None for row in expected):
        assert got[counters.WORK] == want[counters.WORK], where
    entropies = [r for r in expected if r is not None and r.before is not None]
    for column in (counters.SUM_BEFORE, counters.SUM_AFTER):
        error = abs(got[column] - want[column])
        assert error <= SUM_TOL_UNITS * len(entropies), (where, column, error)
    for start, side in (
        (counters.HIST_BEFORE, "before"),
        (counters.HIST_AFTER, "after"),
    ):
        hist = got[start : start + counters.N_BINS]
        problem = histogram_problem(hist, [getattr(r, side) for r in entropies])
        assert problem is None, f"{where}, {side}: {problem}"


def fill_after(mode: str, expected, logits, out, inv_t) -> None:
    """The rows' entropy after, where it depends on what the kernel did."""
    for r, row in enumerate(expected):
        if row is not None and row.before is not None and row.after is None:
            if mode == "logits":
                row.after = h64(out[r])
            else:
                row.after = h64(logits[r].double() * float(inv_t[r]))


def single_row_stats(mode: str, logits: torch.Tensor, params: dict) -> list:
    """Each row's counts, from the kernel on that row alone."""
    alone = []
    for r in range(logits.shape[0]):
        stats = new_stats()
        run(mode, logits[r : r + 1], {k: v[r : r + 1] for k, v in params.items()},
            stats=stats)  # fmt: skip
        alone.append(stats)
    return alone


# -- tests -----------------------------------------------------------------------------

CASE_SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, database=None)


@CASE_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), vocab=st.sampled_from([257, 4_097, 30_000]))
def test_logits_mode_counts_every_column(seed, vocab):
    logits, params, expected = logits_case(seed, vocab)
    stats = new_stats()
    out = run("logits", logits, params, stats=stats)
    fill_after("logits", expected, logits, out, None)
    check_counts(stats, expected, seed)
    # Rows left alone are returned as they came, so their entropy after is before's.
    for r, row in enumerate(expected):
        if row is not None and (row.below or row.restored):
            assert torch.equal(out[r], logits[r]) or row.before is None, (seed, r)


@CASE_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), vocab=st.sampled_from([257, 4_097, 30_000]))
def test_temperature_mode_counts_every_column(seed, vocab):
    logits, params, expected = temperature_case(seed, vocab)
    stats = new_stats()
    inv_t = torch.zeros(logits.shape[0])
    out = run("temperature", logits, params, stats=stats, inv_temperature=inv_t)
    fill_after("temperature", expected, logits, out, inv_t)
    check_counts(stats, expected, seed)
    # Passes: each moved row's own (from a run on it alone), and none for the rest.
    alone = single_row_stats("temperature", logits, params)
    moved = [
        r for r, row in enumerate(expected) if row is not None and row.work is None
    ]
    passes = [int(alone[r][counters.WORK]) for r in moved]
    assert all(1 <= p <= 60 for p in passes), (seed, passes)
    assert stats[counters.WORK] == sum(passes), seed


@pytest.mark.parametrize("mode", ["logits", "temperature"])
def test_counts_at_a_real_vocabulary(seed, mode):
    """V = 151,936 (19 chunks): the online entropy of the last step combines chunks
    whose shifts differ; three rows on two threads take the split path for one."""
    case = logits_case if mode == "logits" else temperature_case
    logits, params, expected = case(seed, 151_936)
    keep = [0, 1, 2, 6] if mode == "logits" else [0, 1, 4]
    logits = logits[keep]
    params = {k: v[keep] for k, v in params.items()}
    expected = [expected[r] for r in keep]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stats = new_stats()
        inv_t = torch.zeros(len(keep))
        kwargs = {} if mode == "logits" else {"inv_temperature": inv_t}
        out = run(mode, logits, params, stats=stats, **kwargs)
    finally:
        torch.set_num_threads(before)
    fill_after(mode, expected, logits, out, inv_t)
    check_counts(stats, expected, seed)


@pytest.mark.parametrize("mode", ["logits", "temperature"])
def test_counts_do_not_depend_on_threads_or_batch(seed, threads, mode):
    """A batch's counts are exactly the sum of its rows' counts alone, on 1 and 2
    threads, in any order, any batch size and through a row index."""
    case = logits_case if mode == "logits" else temperature_case
    logits, params, _ = case(seed, 20_000)
    n = logits.shape[0]
    torch.set_num_threads(1)
    alone = single_row_stats(mode, logits, params)
    gen = torch.Generator().manual_seed(seed)
    for thread_count in (1, 2):
        torch.set_num_threads(thread_count)
        for size in (1, 3, n, 2 * n + 1):
            pick = torch.randint(0, n, (size,), generator=gen)
            stats = new_stats()
            run(mode, logits[pick], {k: v[pick] for k, v in params.items()},
                stats=stats)  # fmt: skip
            want = torch.stack([alone[int(r)] for r in pick]).sum(0)
            assert torch.equal(stats, want), (seed, thread_count, pick.tolist())
        pick = torch.randperm(n, generator=gen)[: n // 2]
        stats = new_stats()
        out = logits.clone()
        columns = [params[k][pick].reshape(-1, 1) for k in params]
        process = (
            cpu_backend.em_inf_
            if mode == "logits"
            else (cpu_backend.adaptive_temperature_)
        )
        process(out, *columns, rows=pick, stats=stats)
        want = torch.stack([alone[int(r)] for r in pick]).sum(0)
        assert torch.equal(stats, want), (seed, thread_count, pick.tolist())


def test_a_last_step_that_drops_the_top_far_still_counts_its_entropy(generator):
    """kl_weight 1e3, lr 1e2, two steps: the second pulls every row's top logit
    down by tens of nats, below the range the last step's online statistics keep
    (LOST_RANGE; an instrumented build took the recomputing pass on each row)."""
    rows, vocab = 6, 3_000
    logits = torch.randn(rows, vocab, generator=generator) * 3
    params = dict(
        threshold=torch.zeros(rows),
        kl_weight=torch.full((rows,), 1e3),
        lr=torch.full((rows,), 1e2),
        steps=torch.full((rows,), 2),
    )
    stats = new_stats()
    out = run("logits", logits, params, stats=stats)
    assert torch.isfinite(out).all()
    expected = [Expected(h64(logits[r]), h64(out[r]), work=2) for r in range(rows)]
    check_counts(stats, expected, "generator")


@pytest.mark.parametrize("mode", ["logits", "temperature"])
def test_without_stats_the_rows_come_back_the_same(seed, mode):
    """Counting changes nothing the kernels return."""
    case = logits_case if mode == "logits" else temperature_case
    logits, params, _ = case(seed, 4_097)
    counted = run(mode, logits, params, stats=new_stats())
    plain = run(mode, logits, params)
    assert torch.equal(torch.isnan(counted), torch.isnan(plain))
    assert torch.equal(counted.nan_to_num(), plain.nan_to_num())


def test_the_kernels_check_the_layout_against_counters_py():
    """The layout the C code writes (em_inf_stats_layout) is counters.py's."""
    library = cpu_backend.load()
    layout = torch.zeros(11, dtype=torch.int64)
    library.em_inf_stats_layout(len(counters.ENTROPY_EDGES), layout.data_ptr())
    assert layout[:9].tolist() == [
        counters.BELOW, counters.WORK, counters.RESTORED, counters.ROWS,
        counters.SUM_BEFORE, counters.SUM_AFTER, counters.HIST_BEFORE,
        counters.HIST_AFTER, counters.WIDTH,
    ]  # fmt: skip
    assert layout[9] == counters.FIXED_POINT


@pytest.mark.parametrize("sample", [2, 16])
def test_the_logits_mode_measures_a_sample_of_rows(generator, monkeypatch, sample):
    """With EM_INF_ENTROPY_SAMPLE=N a row's entropy after is counted exactly when
    its entropy before, in SUM units, is a multiple of N (read from the row's own
    SUM_BEFORE), with the value measuring every row gives; its entropy before
    always; the rows come back the same."""
    rows = torch.randn(160, 1_025, generator=generator) * 3
    params = [torch.full((1,), v) for v in (0.1, 0.05, 0.1)]
    steps = torch.full((1,), 3, dtype=torch.int64)
    taken = []
    for measured_every_row in (True, False):
        monkeypatch.setenv(
            counters.SAMPLE_ENV, "1" if measured_every_row else str(sample)
        )
        per_row, outs = [], []
        for row in rows:
            stats = torch.zeros(counters.WIDTH, dtype=torch.int64)
            out = row[None].clone()
            cpu_backend.em_inf_(out, *params, steps, stats=stats)
            per_row.append(stats)
            outs.append(out)
        taken.append((per_row, torch.cat(outs)))
    (all_stats, all_out), (some_stats, some_out) = taken
    assert torch.equal(all_out, some_out)
    after = slice(counters.HIST_AFTER, counters.HIST_AFTER + counters.N_BINS)
    chosen = 0
    for every, some in zip(all_stats, some_stats, strict=True):
        assert torch.equal(every[: counters.SUM_AFTER], some[: counters.SUM_AFTER])
        assert torch.equal(
            every[counters.HIST_BEFORE : after.start],
            some[counters.HIST_BEFORE : after.start],
        )
        if int(every[counters.SUM_BEFORE]) % sample == 0:
            chosen += 1
            assert torch.equal(every, some)
        else:
            assert int(some[counters.SUM_AFTER]) == 0 and int(some[after].sum()) == 0
    assert 0 < chosen < len(rows), chosen
