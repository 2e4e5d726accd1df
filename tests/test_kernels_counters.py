"""Every column of the kernels' counters (layout: ``em_inf.counters``) against the
float64 oracle, under Triton's interpreter.

Expected counts: each processed row's entropy before (of its input) and after (of
the oracle's result, ``em_inf.reference``), added with ``counters.add_row``;
``WORK`` of the logits mode from the oracle's trajectory (the steps it takes
before its entropy falls below the threshold). Checked: ``ROWS``, ``BELOW``,
``RESTORED`` and the logits mode's ``WORK`` exactly; every histogram bin exactly,
except that a row whose reference entropy lies within :data:`EDGE_SLACK` of a bin
edge may fall in either neighbouring bin; ``SUM_BEFORE`` / ``SUM_AFTER`` within
:data:`SUM_TOL` nats per row (float32 statistics against float64, and for the
entropy after, a float32 trajectory against the float64 oracle's) plus half a
unit per row for the rounding. The temperature mode's ``WORK`` (solver passes)
has no oracle: it is checked against its bounds and for being the same whether
a batch runs whole or split. Runs in its own process (see
tests/kernel_helpers.py).
"""

from __future__ import annotations

from tests import kernel_helpers

kernel_helpers.require_interpreter()

import types  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from em_inf import counters  # noqa: E402
from em_inf.kernels import adaptive_temperature_rows_, em_inf_rows_  # noqa: E402
from em_inf.kernels.logits_mode import em_inf_rows_with_plan_  # noqa: E402
from em_inf.kernels.step import StepRunner  # noqa: E402
from em_inf.kernels.temperature_mode import MAX_PASSES  # noqa: E402
from em_inf.reference import (  # noqa: E402
    adaptive_temperature_row,
    em_inf_row,
    entropy,
)
from tests.sync_detector import HostSyncDetector  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned_empty", "quiet_interpreter")

CPU = torch.device("cpu")
#: Rows whose reference entropy is this close to a bin edge may land either side.
EDGE_SLACK = 1e-4
#: Per-row tolerance of the entropy sums, in nats (seen: at most 3e-7 before;
#: 4e-6 after in the logits mode, a float32 trajectory against float64).
SUM_TOL = {"before": 1e-5, "after": 5e-5}
#: Per-row tolerance of the entropy after against that of the row returned.
OWN_TOL = 2e-5
VOCAB = 300  # 3 chunks of the logits kernel at block 128
BLOCK = 128


# -- the batch: rows of every kind, several rows per slot ------------------------


def _tables(slots: list[dict]) -> types.SimpleNamespace:
    """Per-slot device tables (``em_inf.core.SlotTables``' fields) from dicts: a
    slot without ``steps`` is off in the logits mode (0), one without ``alpha``
    off in the temperature mode (threshold ``+inf``)."""

    def column(name, default, dtype=torch.float32):
        return torch.tensor([s.get(name, default) for s in slots], dtype=dtype)

    logits = [s if "steps" in s else {} for s in slots]
    temp = [s if "alpha" in s else {} for s in slots]
    return types.SimpleNamespace(
        threshold=column("threshold", 0.0),
        kl_weight=column("kl_weight", 0.0),
        lr=column("lr", 0.0),
        steps=torch.tensor([s.get("steps", 0) for s in logits], dtype=torch.int32),
        temperature_threshold=torch.tensor(
            [s.get("threshold", torch.inf) for s in temp], dtype=torch.float32
        ),
        alpha=column("alpha", 0.5),
        t_min=column("t_min", 0.1),
        t_max=column("t_max", 1.0),
    )


def _entropy(row: torch.Tensor) -> float:
    """Entropy (nats) of a float64 row, masked entries ``-inf``; 0 if all are."""
    return entropy(row).item() if torch.isfinite(row).any() else 0.0


def _trajectory(row: torch.Tensor, slot: dict, steps: int) -> list[float]:
    """``H(z_k)`` for ``k = 0..steps`` of the oracle (never stopping)."""
    if not torch.isfinite(row).any():
        return [0.0] * (steps + 1)
    params = dict(threshold=-1.0, kl_weight=slot["kl_weight"], lr=slot["lr"])
    return [_entropy(em_inf_row(row, **params, steps=k)) for k in range(steps + 1)]


def _batch(generator: torch.Generator):
    """``(logits, row_slot, slots)``: a batch of ``VOCAB``-wide rows of every kind
    for both modes, rows sharing slots (speculative decoding), rows of slot -1 and
    of a slot that is off."""
    rows = 18
    scale = 0.5 + 3.0 * torch.rand(rows, 1, generator=generator)
    logits = torch.randn(rows, VOCAB, generator=generator) * scale
    logits[:, 0] += 4.0
    slots = [
        dict(threshold=0.0, kl_weight=0.05, lr=0.2, steps=3),  # 0: every step
        dict(threshold=20.0, kl_weight=0.05, lr=0.2, steps=3),  # 1: below
        dict(kl_weight=0.0, lr=0.5, steps=5),  # 2: stops early (threshold below)
        dict(threshold=0.0, kl_weight=0.1, lr=0.3, steps=1),  # 3: one step
        dict(threshold=0.05, alpha=0.6, t_min=0.05, t_max=1.0),  # 4: solved
        dict(threshold=20.0, alpha=0.6, t_min=0.05, t_max=1.0),  # 5: below
        dict(threshold=0.05, alpha=1.0, t_min=0.05, t_max=1.0),  # 6: T = 1
        dict(threshold=0.05, alpha=0.1, t_min=0.9, t_max=1.0),  # 7: pinned
        dict(threshold=0.0, alpha=1e-6, t_min=1e-4, t_max=1e-4),  # 8: overflow
        {},  # 9: off
    ]
    row_slot = [0, 0, 1, 2, 3, 0, 4, 4, 5, 6, 7, 8, 9, -1, 1, 5, 1, 4]
    logits[14] = -torch.inf  # all masked (logits mode: below)
    logits[15] = -torch.inf  # all masked (temperature mode: below)
    logits[16, 7] = torch.nan
    logits[17, 9] = torch.inf
    logits[11, :4] = torch.tensor([1e35, 1e35, 0.0, -1e35])  # b z overflows
    logits[11, 4:] = -torch.inf
    logits[1, 10:40] = torch.finfo(torch.float32).min  # partly masked
    # Slot 2 stops after two of its five steps: its threshold lies between the
    # entropies after steps 1 and 2 (well clear of both).
    h = _trajectory(_masked(logits[3]), slots[2], 2)
    slots[2]["threshold"] = (h[1] + h[2]) / 2
    return logits, torch.tensor(row_slot, dtype=torch.int32), slots


# -- the expected counts -------------------------------------------------------------


def _masked(row: torch.Tensor) -> torch.Tensor:
    """A row in float64 with its masked entries (<= -1e37) as ``-inf``."""
    row = row.double()
    return row.masked_fill(row <= kernel_helpers.MASK_LEVEL, -torch.inf)


def _expected(logits, row_slot, slots, mode, max_steps=None):
    """``(counts, rows)``: the oracle's counts (``WORK`` of the temperature mode
    left 0) and, per counted row, ``(before, after)`` (``None`` for NaN / +inf)."""
    counts = [0] * counters.WIDTH
    rows = []
    for i, s in enumerate(row_slot.tolist()):
        slot = slots[s] if s >= 0 else {}
        if mode == "logits":
            steps = min(slot.get("steps", 0), max_steps or 99)
            if steps <= 0:
                continue
        elif "alpha" not in slot:
            continue
        row = _masked(logits[i])
        if torch.isnan(row).any() or (row == torch.inf).any():
            counters.add_row(counts, None, None, below=False)
            counts[counters.RESTORED] += 1
            rows.append((None, None))
            continue
        before = _entropy(row)
        if mode == "logits":
            h = _trajectory(row, slot, steps)
            taken = next((k for k in range(steps) if h[k] < slot["threshold"]), steps)
            for k in range(steps):  # the test's rows stay clear of the threshold
                assert abs(h[k] - slot["threshold"]) > 1e-3, (i, k, h[k])
            after, below = h[taken], taken == 0
            counts[counters.WORK] += taken
        else:
            below = before <= slot["threshold"]
            out = row
            if not below:
                keys = ("threshold", "alpha", "t_min", "t_max")
                params = {k: slot[k] for k in keys}
                out = adaptive_temperature_row(row, **params, max_iter=200, tol=1e-9)
            if (out[torch.isfinite(row)].abs() > torch.finfo(torch.float32).max).any():
                out = row  # the kernel restores a row b z would overflow in float32
                counts[counters.RESTORED] += 1
            after = _entropy(out)
        counters.add_row(counts, before, after, below=below)
        rows.append((before, after))
    return counts, rows


def _near_edge(h: float) -> bool:
    return any(abs(h - edge) <= EDGE_SLACK for edge in counters.ENTROPY_EDGES)


def _check_histogram(got: list[int], entropies: list[float], what: str) -> None:
    """Bins exact, except rows near an edge, which may take either neighbour."""
    fixed = [0] * counters.N_BINS
    loose = []  # (first bin it may take, last)
    for h in entropies:
        b = counters.entropy_bin(h)
        if _near_edge(h):
            lo = counters.entropy_bin(h - EDGE_SLACK)
            loose.append((lo, counters.entropy_bin(h + EDGE_SLACK)))
        else:
            fixed[b] += 1
    rest = [g - f for g, f in zip(got, fixed, strict=True)]
    assert all(r >= 0 for r in rest), (what, got, fixed)
    # Place the loose rows (intervals of bins) greedily, earliest end first.
    for lo, hi in sorted(loose, key=lambda x: x[1]):
        b = next((b for b in range(lo, hi + 1) if rest[b] > 0), None)
        assert b is not None, (what, got, fixed, loose)
        rest[b] -= 1
    assert not any(rest), (what, got, fixed, loose)


def _check(stats: torch.Tensor, logits, row_slot, slots, mode, max_steps=None):
    """Every column of one mode's ``stats`` against the oracle (module docstring)."""
    counts, rows = _expected(logits, row_slot, slots, mode, max_steps)
    got = stats.tolist()
    exact = [counters.ROWS, counters.BELOW, counters.RESTORED]
    if mode == "logits":
        exact.append(counters.WORK)
    else:
        solved = counts[counters.ROWS] - counts[counters.BELOW]
        solved -= counts[counters.RESTORED]
        assert solved <= got[counters.WORK] <= MAX_PASSES * solved
    assert [got[c] for c in exact] == [counts[c] for c in exact], (got[:4], counts[:4])
    with_entropy = [r for r in rows if r[0] is not None]
    for k, name in enumerate(("before", "after")):
        values = [r[k] for r in with_entropy]
        first = counters.HIST_BEFORE if k == 0 else counters.HIST_AFTER
        _check_histogram(got[first : first + counters.N_BINS], values, name)
        column = counters.SUM_BEFORE if k == 0 else counters.SUM_AFTER
        allowed = len(values) * (SUM_TOL[name] * counters.FIXED_POINT + 0.5)
        error = abs(got[column] - counts[column])
        assert error <= allowed, (name, error, allowed)


def _own_after(stats, out, rows_counted) -> None:
    """``SUM_AFTER`` against the float64 entropy of the rows the kernel returned."""
    own = sum(counters.fixed_point(_entropy(_masked(out[i]))) for i in rows_counted)
    allowed = len(rows_counted) * (OWN_TOL * counters.FIXED_POINT + 0.5)
    assert abs(stats[counters.SUM_AFTER].item() - own) <= allowed


def _counted(logits, row_slot, slots, mode) -> list[int]:
    """Rows with an entropy that ``mode`` counts."""
    finite = ~(torch.isnan(logits) | (logits == torch.inf)).any(-1)
    key = "steps" if mode == "logits" else "alpha"
    return [
        i
        for i, s in enumerate(row_slot.tolist())
        if s >= 0 and slots[s].get(key) and finite[i]
    ]


def _run_logits(logits, row_slot, tables, stats, **plan):
    out = logits.clone()
    with np.errstate(invalid="ignore", over="ignore"):
        em_inf_rows_with_plan_(
            out,
            row_slot,
            tables.threshold,
            tables.kl_weight,
            tables.lr,
            tables.steps,
            max_steps=int(tables.steps.max()),
            stats=stats,
            **{"block": BLOCK, **plan},
        )
    return out


def _run_temperature(logits, row_slot, tables, stats):
    out = logits.clone()
    with np.errstate(invalid="ignore", over="ignore"):
        adaptive_temperature_rows_(
            out,
            row_slot,
            tables.temperature_threshold,
            tables.alpha,
            tables.t_min,
            tables.t_max,
            stats=stats,
        )
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))  # NaN rows too


def _zeros(*shape):
    return torch.zeros(*shape, counters.WIDTH, dtype=torch.int64)


# -- the tests ------------------------------------------------------------------------


def test_logits_kernel_counts_every_column(generator):
    """Rows below their threshold, running all their steps (3, and 1), stopping
    after 2 of 5, all masked, NaN and +inf in their input, rows of the other mode,
    of an off slot and of slot -1 (not counted), several rows per slot."""
    logits, row_slot, slots = _batch(generator)
    tables = _tables(slots)
    stats = _zeros()
    out = _run_logits(logits, row_slot, tables, stats)
    _check(stats, logits, row_slot, slots, "logits")
    _own_after(stats, out, _counted(logits, row_slot, slots, "logits"))
    # Nothing else than counting: the rows are what they are without stats.
    assert _same_bits(out, _run_logits(logits, row_slot, tables, None))


def test_temperature_kernel_counts_every_column(generator):
    """Rows solved, below their threshold, left at T = 1 (the solver's own
    evaluation is the entropy after), pinned at ``t_min``, restored because ``b z``
    overflows, all masked, NaN and +inf, rows of the other mode and off."""
    logits, row_slot, slots = _batch(generator)
    tables = _tables(slots)
    stats = _zeros()
    out = _run_temperature(logits, row_slot, tables, stats)
    _check(stats, logits, row_slot, slots, "temperature")
    _own_after(stats, out, _counted(logits, row_slot, slots, "temperature"))
    assert _same_bits(out, _run_temperature(logits, row_slot, tables, None))


def test_counts_do_not_depend_on_how_the_batch_is_split(generator):
    """The batch whole, in two launches, and (logits mode) in groups of 4 rows:
    the same counts, to the unit (integer sums of per-row values)."""
    logits, row_slot, slots = _batch(generator)
    tables = _tables(slots)
    whole, split, grouped = _zeros(2), _zeros(2), _zeros(2)
    _run_logits(logits, row_slot, tables, whole[0])
    _run_temperature(logits, row_slot, tables, whole[1])
    for part in (slice(0, 7), slice(7, None)):
        _run_logits(logits[part], row_slot[part], tables, split[0])
        _run_temperature(logits[part], row_slot[part], tables, split[1])
    _run_logits(logits, row_slot, tables, grouped[0], rows_per_launch=4)
    assert torch.equal(split, whole)
    assert torch.equal(grouped[0], whole[0])


def test_counts_follow_the_steps_cut_to_max_steps(generator):
    """``max_steps`` below a slot's steps cuts its work (and its entropy after)."""
    logits, row_slot, slots = _batch(generator)
    tables = _tables(slots)
    stats = _zeros()
    out = logits.clone()
    em_inf_rows_(
        out,
        row_slot,
        tables.threshold,
        tables.kl_weight,
        tables.lr,
        tables.steps,
        max_steps=2,
        stats=stats,
    )
    _check(stats, logits, row_slot, slots, "logits", max_steps=2)


@pytest.mark.parametrize("graphs", [False, True])
def test_step_runner_counts_both_modes_without_a_sync(monkeypatch, generator, graphs):
    """The processor's step (direct launches, or the indirect sequence a CUDA
    graph replays over a bucket of 32 rows) adds to ``[2, WIDTH]`` counters: row 0
    the logits mode's, row 1 the temperature mode's, the direct kernels' counts,
    with no host sync and no allocation (scratch reserved at start); two steps
    add up."""
    logits, row_slot, slots = _batch(generator)
    tables = _tables(slots)
    runner = StepRunner(CPU, graphs=graphs, max_rows=len(logits), n_cols=VOCAB)
    stats = _zeros(2)
    out = logits.clone()
    with (
        monkeypatch.context() as patched,
        HostSyncDetector() as detector,
        np.errstate(invalid="ignore", over="ignore"),
    ):
        patched.setattr(torch, "empty", _refuse_allocation)
        runner.run(out, row_slot, 5, True, tables, stats)
    assert detector.found == []
    assert not any(blocking for _, blocking in detector.copies)
    _check(stats[0], logits, row_slot, slots, "logits")
    _check(stats[1], logits, row_slot, slots, "temperature")
    direct = _zeros(2)
    block = runner._shape(len(logits), VOCAB, 5, True, row_slot).block
    _run_logits(logits, row_slot, tables, direct[0], block=block)
    _run_temperature(logits, row_slot, tables, direct[1])
    assert torch.equal(stats, direct)
    again = logits.clone()
    with np.errstate(invalid="ignore", over="ignore"):
        runner.run(again, row_slot, 5, True, tables, stats)
    assert _same_bits(again, out)
    assert torch.equal(stats, 2 * direct)


def test_step_runner_rejects_counters_of_the_old_layout():
    runner = StepRunner(CPU, graphs=False)
    logits = torch.zeros(1, 8)
    tables = _tables([dict(threshold=0.0, kl_weight=0.0, lr=0.1, steps=1)])
    with pytest.raises(ValueError, match="stats"):
        runner.run(logits, torch.zeros(1, dtype=torch.int32), 1, False, tables,
                   torch.zeros(2, 4, dtype=torch.int64))  # fmt: skip


def _refuse_allocation(*args, **kwargs):
    raise AssertionError("the step runner allocated during a step")
