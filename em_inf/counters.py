"""The layout of EM-INF's counters: what every backend adds, per mode, for the rows
it processes.

One mode's counters are an int64 ``[WIDTH]`` vector (the processor keeps ``[2,
WIDTH]``: row 0 logits mode, row 1 temperature mode):

====================  ==================================================================
``BELOW``             rows left alone: their entropy started below their threshold
``WORK``              Adam steps (logits mode) or temperature-solver passes, of the
                      rows not restored
``RESTORED``          rows restored by the fail-safe (or left as they are for NaN /
                      ``+inf`` in their input)
``ROWS``              rows processed (every row of the mode, the three kinds above
                      included)
``SUM_BEFORE``        sum of the rows' entropy before EM-INF, in units of
                      ``1 / FIXED_POINT`` nats (each row's entropy rounded to the
                      nearest unit first, so the sum is exact and order-free)
``SUM_AFTER``         the same, of the entropy of the row EM-INF returns
``HIST_BEFORE + b``   rows whose entropy before is in bin ``b`` (:func:`entropy_bin`)
``HIST_AFTER + b``    the same, after
====================  ==================================================================

A row EM-INF leaves as it was (below its threshold, restored, all masked) has the
same entropy after as before. A row holding NaN or ``+inf`` is counted in ``ROWS``
and ``RESTORED`` only: it has no entropy. Entropies are in nats; a row whose every
logit is masked has entropy 0.

Bins follow Prometheus' histogram convention: bin ``b`` holds the entropies ``h``
with ``ENTROPY_EDGES[b - 1] < h <= ENTROPY_EDGES[b]``; the last bin, ``b ==
len(ENTROPY_EDGES)``, is ``+Inf``. The edges cover 0 to ``log V`` of today's
vocabularies (``log 151,936 = 11.93``; ``log 262,144 = 12.48``), finer where
EM-INF's thresholds live (0.1 to 1 nat).
"""

from __future__ import annotations

import bisect
import math
import os

BELOW, WORK, RESTORED, ROWS, SUM_BEFORE, SUM_AFTER = range(6)
#: Upper bounds (``le``) of the entropy bins, in nats; ``+Inf`` is implied.
ENTROPY_EDGES: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
    2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 14.0,
)  # fmt: skip
N_BINS = len(ENTROPY_EDGES) + 1
HIST_BEFORE = 6
HIST_AFTER = HIST_BEFORE + N_BINS
WIDTH = HIST_AFTER + N_BINS
#: Units of ``SUM_BEFORE`` / ``SUM_AFTER`` per nat.
FIXED_POINT = 1_000_000
#: How many logits-mode rows the compiled CPU kernels measure the entropy after
#: EM-INF of, one in N (``1``: all of them).
SAMPLE_ENV = "EM_INF_ENTROPY_SAMPLE"
DEFAULT_CPU_SAMPLE = 16


def logits_after_sample() -> int:
    """One in how many logits-mode rows the compiled CPU kernels measure the entropy
    after of (``EM_INF_ENTROPY_SAMPLE``, read at every call; 16 by default).

    The rows are those whose entropy before, in ``SUM`` units, is a multiple of it:
    a choice that depends on the row alone (batch- and thread-invariant) and not on
    its entropy's size. A row that runs all its Adam steps pays one more
    exponential per logit for the entropy after (+17% of the logits mode's time on
    AVX-512; the kernels' arithmetic, not their memory traffic, is the floor there),
    so the CPU path measures a sample: ``SUM_AFTER`` and ``HIST_AFTER`` then cover
    those rows (their count is the histogram's), ``SUM_BEFORE`` and ``HIST_BEFORE``
    every row. The temperature mode, the Triton kernels and the PyTorch path
    measure every row (it costs them nothing, or nothing measurable)."""
    value = os.environ.get(SAMPLE_ENV, "").strip()
    try:
        sample = int(value) if value else DEFAULT_CPU_SAMPLE
    except ValueError:
        sample = 0
    if sample < 1:
        raise ValueError(f"{SAMPLE_ENV} must be a positive integer, got {value!r}")
    return sample


def entropy_bin(entropy: float) -> int:
    """The bin of ``entropy`` (nats): the number of edges strictly below it."""
    return bisect.bisect_left(ENTROPY_EDGES, entropy)


def fixed_point(entropy: float) -> int:
    """``entropy`` (nats) in ``SUM_*`` units, rounded half away from zero (C's
    ``llround``)."""
    scaled = entropy * FIXED_POINT
    return int(math.copysign(math.floor(abs(scaled) + 0.5), scaled))


def add_row(
    counts: list[int], before: float | None, after: float | None, *, below: bool
) -> None:
    """Add one processed row to one mode's ``counts`` (``WIDTH`` ints): its entropy
    ``before`` and ``after`` (``None``: the row held NaN / ``+inf``) and whether it
    was left alone below its threshold. ``WORK`` and ``RESTORED`` are the caller's."""
    counts[ROWS] += 1
    if before is None or after is None:
        return
    counts[BELOW] += int(below)
    counts[SUM_BEFORE] += fixed_point(before)
    counts[SUM_AFTER] += fixed_point(after)
    counts[HIST_BEFORE + entropy_bin(before)] += 1
    counts[HIST_AFTER + entropy_bin(after)] += 1
