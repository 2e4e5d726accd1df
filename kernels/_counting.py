"""Device-side counting shared by the EM-INF kernels: one row's contribution to one
mode's int64 ``[counters.WIDTH]`` counters (layout: :mod:`em_inf.counters`), added
with integer atomics, so the sums need no host sync and do not depend on the order
the programs run in.

The column indices, the entropy bins' edges and the fixed-point scale are
:mod:`em_inf.counters`' own values, made ``constexpr`` here: one source of truth.
"""

from __future__ import annotations

import triton
import triton.language as tl

from em_inf import counters

BELOW: tl.constexpr = tl.constexpr(counters.BELOW)
WORK: tl.constexpr = tl.constexpr(counters.WORK)
RESTORED: tl.constexpr = tl.constexpr(counters.RESTORED)
ROWS: tl.constexpr = tl.constexpr(counters.ROWS)
SUM_BEFORE: tl.constexpr = tl.constexpr(counters.SUM_BEFORE)
SUM_AFTER: tl.constexpr = tl.constexpr(counters.SUM_AFTER)
HIST_BEFORE: tl.constexpr = tl.constexpr(counters.HIST_BEFORE)
HIST_AFTER: tl.constexpr = tl.constexpr(counters.HIST_AFTER)
FIXED_POINT: tl.constexpr = tl.constexpr(float(counters.FIXED_POINT))
#: ``le`` bounds of the entropy bins (nats), compared in float32.
EDGES: tl.constexpr = tl.constexpr(tuple(float(e) for e in counters.ENTROPY_EDGES))
N_EDGES: tl.constexpr = tl.constexpr(len(counters.ENTROPY_EDGES))


@triton.jit
def entropy_bin(h):
    """Bin of the float32 entropy ``h``: how many edges lie strictly below it
    (:func:`em_inf.counters.entropy_bin`, with the edges rounded to float32)."""
    b = tl.zeros([], tl.int32)
    for i in tl.static_range(N_EDGES):
        b += (h > EDGES[i]).to(tl.int32)
    return b


@triton.jit
def fixed_point(h):
    """``h`` (nats, float32) in ``SUM_*`` units, rounded half away from zero in
    float64 (:func:`em_inf.counters.fixed_point`)."""
    x = h.to(tl.float64) * FIXED_POINT
    r = tl.floor(tl.abs(x) + 0.5)
    return tl.where(x < 0.0, -r, r).to(tl.int64)


@triton.jit
def add_entropy(p_stats, h, HIST: tl.constexpr, SUM: tl.constexpr):
    """One row's entropy ``h`` into ``SUM`` and its bin of ``HIST``."""
    tl.atomic_add(p_stats + SUM, fixed_point(h))
    tl.atomic_add(p_stats + HIST + entropy_bin(h), 1)


@triton.jit
def add_row(p_stats, below, work, restored, before, after, has_entropy, has_after):
    """One processed row: ``ROWS`` += 1, ``BELOW`` / ``RESTORED`` += the flags,
    ``WORK`` += ``work``; with ``has_entropy`` (false for NaN / ``+inf`` in the
    input) its entropy ``before`` and, with ``has_after`` (false where another
    program of the row adds it), ``after``."""
    tl.atomic_add(p_stats + ROWS, 1)
    if below:
        tl.atomic_add(p_stats + BELOW, 1)
    if work != 0:
        tl.atomic_add(p_stats + WORK, work.to(tl.int64))
    if restored:
        tl.atomic_add(p_stats + RESTORED, 1)
    if has_entropy:
        add_entropy(p_stats, before, HIST_BEFORE, SUM_BEFORE)
        if has_after:
            add_entropy(p_stats, after, HIST_AFTER, SUM_AFTER)
