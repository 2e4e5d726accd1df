"""EM-INF's ``temperature`` mode (the paper's Algorithm 1) as one Triton kernel.

Per row: ``H0 = H(softmax(z))``; a row with ``H0 <= threshold`` is left alone;
otherwise the inverse temperature ``b`` in ``[1 / t_max, 1 / t_min]`` with
``H(softmax(b z)) = max(threshold, alpha * H0)`` is found and the row becomes ``b z``.
The solver is :func:`em_inf.torch_backend.adaptive_temperature_`'s: Newton on
``u = log b`` with ``dH/du = -b^2 Var_q(z)``, safeguarded by a bracket (a step
leaving it tries the unseen end once, then bisects), stopping when ``H - target`` is
below float32's resolution of ``H`` (``4e-7 H``, under
:data:`em_inf.config.TEMPERATURE_RTOL`), when a Newton step changes every logit by
less than a relative ``1e-7``, or when the bracket is that narrow. Each evaluation
is one pass over the row for ``sum e``, ``sum e y``, ``sum e y^2`` with
``y = z - max z <= 0``, ``e = exp(b y)``: ``H = log S - b E[y]``,
``Var = E[y^2] - E[y]^2``. The per-lane sums are reduced across lanes in float64,
which halves the error of ``H`` (and of the solved ``T``) for the cost of a few
thousand conversions per pass.

Design: one launch, one program per row, the solver loop inside the kernel.
Unlike the logits mode the number of passes is data-dependent (4 to 9 on Gaussian
logits of scale 0.3-10 at V = 50,000, up to 13 seen), so a chunked grid would
need a host-side launch per pass or a device sync. One program per row streams its
row from L2 on every pass after the first: per pass and row, V loads and V
exponentials, so a row costs a few passes of V / 16 MUFU clocks on one SM whatever
the batch, and batches of one row per SM or more keep the card busy. A row's
arithmetic never depends on the other rows or on the batch size (bitwise batch
invariant): the block depends on V alone.

Fail-safe and masks: entries at or below ``-1e37`` (``-inf``, ``finfo(float32).min``)
are masked: they count as probability 0 and keep their value. A row holding NaN or
``+inf``, one whose entropy evaluates to NaN, and one whose scaled logits would
overflow (``b max|z|`` beyond float32) comes back as it went in, and is counted.

Memory traffic per row: one read for the max, one per solver pass (the ``b = 1``
pass gives ``H0`` and, when ``1`` lies in the interval, the first iterate), one
read + one write for the scaling; nothing else, no scratch.

Counting (optional ``stats``, one mode's int64 ``[counters.WIDTH]``, layout in
:mod:`em_inf.counters`): the row's one program adds ``ROWS``, ``BELOW``, ``WORK``
(solver passes), ``RESTORED`` and the entropies with integer atomics
(:mod:`em_inf.kernels._counting`). Before: ``H0`` of the ``b = 1`` pass. After: a
row left alone or restored keeps ``H0``; otherwise the entropy at the final ``b``
from the solver's last evaluation when that was at exactly this ``b``, else
(usually: the last Newton step is taken without evaluating it) folded into the
scaling pass, which then also sums ``e`` and ``e y`` (one exponential per logit
more). Without ``stats`` none of this is compiled in (``HAS_STATS``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from em_inf import checks
from em_inf.kernels import _counting
from em_inf.kernels._common import next_power_of_2

#: Solver stop: a Newton step (or bracket) in ``u = log b`` below this changes
#: every logit by a relative 1e-7; and the most passes a row may take.
STEP_TOL = 1e-7
MAX_PASSES = 60
_BLOCK_MAX = 4096
MASKED: tl.constexpr = tl.constexpr(-1.0e38)
MASKED_CUT: tl.constexpr = tl.constexpr(-1.0e37)


@triton.jit
def _log1p(x):
    """``log(1 + x)`` for ``x >= 0`` to a few ulp (Goldberg's trick, no libdevice)."""
    one_plus = 1.0 + x
    den = tl.where(one_plus == 1.0, 1.0, one_plus - 1.0)
    return tl.where(one_plus == 1.0, x, tl.log(one_plus) * (x / den))


@triton.jit
def _entropy_and_slope(p_row, n_cols, row_max, b, BLOCK: tl.constexpr):
    """``(H, dH/du, noise)`` of ``softmax(b z)`` for one row, ``u = log b``, one pass.

    With ``y = z - max z <= 0`` and ``e = exp(b y)``: ``S = sum e``,
    ``H = log S - b E[y]``, ``dH/du = -b^2 Var[y]``. ``S = n_top + rest`` (``n_top``
    entries at the max, ``e = 1``), so ``log S = log1p(n_top - 1 + rest)`` keeps its
    relative precision on confident rows (``H ~ 1e-4``), where ``log`` of a sum
    near 1 would lose it. ``noise`` is the float32 rounding level of ``H``: the
    solver cannot resolve ``H - target`` below it. Per-lane (``[BLOCK]``) float32
    sums, reduced across lanes in float64; masked entries (at or below ``-1e37``)
    count as ``e = 0``; a row without unmasked entries gives ``(0, 0, 0)``.
    """
    b_log2e = b * 1.4426950408889634  # exp(b y) = exp2(b log2(e) y): one MUFU op
    acc_top = tl.zeros([BLOCK], dtype=tl.float32)
    acc_rest = tl.zeros([BLOCK], dtype=tl.float32)
    acc_y = tl.zeros([BLOCK], dtype=tl.float32)
    acc_yy = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        o_v = start + tl.arange(0, BLOCK)
        b_z = tl.load(p_row + o_v, mask=o_v < n_cols, other=float("-inf"))
        b_live = b_z > MASKED_CUT
        # y >= MASKED keeps e y and e y^2 at 0, never NaN, where e underflows.
        b_y = tl.where(b_live, tl.maximum(b_z - row_max, MASKED), 0.0)  # <= 0
        b_e = tl.where(b_live, tl.exp2(b_log2e * b_y), 0.0)
        b_top = b_live & (b_y == 0.0)
        acc_top += b_top.to(tl.float32)
        acc_rest += tl.where(b_top, 0.0, b_e)
        b_ey = b_e * b_y
        acc_y += b_ey
        acc_yy += b_ey * b_y
    n_top = tl.sum(acc_top, axis=0)
    rest = tl.sum(acc_rest.to(tl.float64), axis=0).to(tl.float32)
    sum_y = tl.sum(acc_y.to(tl.float64), axis=0)
    sum_yy = tl.sum(acc_yy.to(tl.float64), axis=0)
    has_mass = n_top > 0
    s = tl.where(has_mass, n_top + rest, 1.0)
    log_s = _log1p(tl.maximum(n_top - 1.0, 0.0) + rest)
    mean_y = (sum_y / s).to(tl.float32)  # <= 0
    var_y = tl.maximum((sum_yy / s).to(tl.float32) - mean_y * mean_y, 0.0)
    ent = tl.where(has_mass, log_s - b * mean_y, 0.0)
    noise = 4e-7 * (log_s - b * mean_y)
    return ent, -(b * b) * var_y, noise


@triton.jit
def _scale_row(p_row, n_cols, b, BLOCK: tl.constexpr):
    """``z <- b z`` in place (masked entries keep their value)."""
    for start in range(0, n_cols, BLOCK):
        o_v = start + tl.arange(0, BLOCK)
        m_v = o_v < n_cols
        b_z = tl.load(p_row + o_v, mask=m_v, other=float("-inf"))
        b_live = b_z > MASKED_CUT
        tl.store(p_row + o_v, tl.where(b_live, b_z, 0.0) * b, mask=m_v & b_live)


@triton.jit
def _scale_row_entropy(p_row, n_cols, row_max, b, BLOCK: tl.constexpr):
    """:func:`_scale_row`, returning ``H(softmax(b z))`` summed on the way as
    :func:`_entropy_and_slope` does (``n_top``, ``log1p``, float64 lane sums)."""
    b_log2e = b * 1.4426950408889634
    acc_top = tl.zeros([BLOCK], dtype=tl.float32)
    acc_rest = tl.zeros([BLOCK], dtype=tl.float32)
    acc_y = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        o_v = start + tl.arange(0, BLOCK)
        m_v = o_v < n_cols
        b_z = tl.load(p_row + o_v, mask=m_v, other=float("-inf"))
        b_live = b_z > MASKED_CUT
        tl.store(p_row + o_v, tl.where(b_live, b_z, 0.0) * b, mask=m_v & b_live)
        b_y = tl.where(b_live, tl.maximum(b_z - row_max, MASKED), 0.0)  # <= 0
        b_e = tl.where(b_live, tl.exp2(b_log2e * b_y), 0.0)
        b_top = b_live & (b_y == 0.0)
        acc_top += b_top.to(tl.float32)
        acc_rest += tl.where(b_top, 0.0, b_e)
        acc_y += b_e * b_y
    n_top = tl.sum(acc_top, axis=0)
    rest = tl.sum(acc_rest.to(tl.float64), axis=0).to(tl.float32)
    sum_y = tl.sum(acc_y.to(tl.float64), axis=0)
    has_mass = n_top > 0
    s = tl.where(has_mass, n_top + rest, 1.0)
    log_s = _log1p(tl.maximum(n_top - 1.0, 0.0) + rest)
    mean_y = (sum_y / s).to(tl.float32)
    return tl.where(has_mass, log_s - b * mean_y, 0.0)


@triton.jit
def _adaptive_temperature_kernel(
    p_logits,  # float32 [N, V], row stride `row_stride`; modified in place
    row_stride,
    n_cols,
    p_row_slot,  # int32/int64 [N]: slot of each row, -1 = leave the row alone
    p_launch,  # INDIRECT: int64 [3] = logits address, row_slot address, rows
    p_threshold,  # float32 [S]
    p_alpha,  # float32 [S]
    p_t_min,  # float32 [S]
    p_t_max,  # float32 [S]
    p_stats,  # HAS_STATS: int64 [counters.WIDTH], added to
    BLOCK: tl.constexpr,
    STEP_TOL: tl.constexpr,
    MAX_PASSES: tl.constexpr,
    INDIRECT: tl.constexpr,  # read logits / row_slot / rows through p_launch
    SLOT_INT64: tl.constexpr,  # INDIRECT: row_slot's dtype
    HAS_STATS: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    if INDIRECT:  # see kernels.logits_mode: a CUDA graph over a bucket of rows
        if i_row >= tl.load(p_launch + 2):
            return
        p_z = tl.load(p_launch).to(tl.pointer_type(tl.float32))
        if SLOT_INT64:
            p_slot = tl.load(p_launch + 1).to(tl.pointer_type(tl.int64))
        else:
            p_slot = tl.load(p_launch + 1).to(tl.pointer_type(tl.int32))
    else:
        p_z = p_logits
        p_slot = p_row_slot
    slot = tl.load(p_slot + i_row).to(tl.int64)
    if slot < 0:
        return
    threshold = tl.load(p_threshold + slot)
    if threshold == float("inf"):  # the slot does not use this mode
        return
    no_work = tl.zeros([], tl.int32)
    p_row = p_z + i_row * row_stride

    # Pass 1: the row's unmasked max and min (the min bounds b |z| for the
    # overflow check), and whether it holds NaN or +inf (then it is restored).
    acc_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    acc_min = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    acc_bad = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n_cols, BLOCK):
        o_v = start + tl.arange(0, BLOCK)
        b_z = tl.load(p_row + o_v, mask=o_v < n_cols, other=float("-inf"))
        b_live = b_z > MASKED_CUT
        acc_bad |= ((b_z != b_z) | (b_z == float("inf"))).to(tl.int32)
        acc_max = tl.maximum(acc_max, tl.where(b_live, b_z, float("-inf")))
        acc_min = tl.minimum(acc_min, tl.where(b_live, b_z, float("inf")))
    if tl.max(acc_bad, axis=0) > 0:
        if HAS_STATS:  # no entropy: ROWS and RESTORED only
            zero = tl.zeros([], tl.float32)
            _counting.add_row(p_stats, False, no_work, True, zero, zero, False, False)
        return
    row_max = tl.max(acc_max, axis=0)
    row_min = tl.min(acc_min, axis=0)
    row_max = tl.where(row_max > float("-inf"), row_max, 0.0)
    row_min = tl.where(row_min < float("inf"), row_min, 0.0)

    # Pass 2: H0 at b = 1.
    one = tl.full([], 1.0, tl.float32)
    h0, slope0, noise0 = _entropy_and_slope(p_row, n_cols, row_max, one, BLOCK)
    if h0 <= threshold:
        if HAS_STATS:
            _counting.add_row(p_stats, True, no_work, False, h0, h0, True, True)
        return
    target = tl.maximum(threshold, tl.load(p_alpha + slot) * h0)

    # Safeguarded Newton on u = log b; H is non-increasing in u.
    t_min = tl.load(p_t_min + slot)
    t_max = tl.load(p_t_max + slot)
    u_lo = -tl.log(t_max)
    u_hi = -tl.log(t_min)
    lo = u_lo
    hi = u_hi
    u = tl.minimum(tl.maximum(0.0 * one, lo), hi)  # T = 1, or the nearer end
    ent = h0
    slope = slope0
    noise = noise0
    b_ent = one  # HAS_STATS: the b that `ent` was evaluated at
    if u != 0.0:
        b_try = tl.exp(u)
        ent, slope, noise = _entropy_and_slope(p_row, n_cols, row_max, b_try, BLOCK)
        if HAS_STATS:
            b_ent = b_try
    lo_seen = tl.full([], 0, tl.int1)  # whether lo / hi are evaluated points yet
    hi_seen = tl.full([], 0, tl.int1)
    failed = h0 != h0
    n_passes = tl.full([], 1, tl.int32)
    go = n_passes > 0
    while go:
        failed = failed | (ent != ent)
        err = ent - target  # > 0: the root lies at larger u
        lo = tl.where(err > 0, u, lo)
        lo_seen = lo_seen | (err > 0)
        hi = tl.where(err < 0, u, hi)
        hi_seen = hi_seen | (err < 0)
        # A flat H (slope 0, e.g. a row gone one-hot) sends Newton out of the
        # bracket, to the fallback.
        newton = u - err / tl.where(slope < 0.0, slope, -1e-30)
        inside = (newton > lo) & (newton < hi)  # False for NaN / inf too
        # Done: H - target below float32 resolution, a Newton step too small to
        # matter (|du| = relative change of every logit), or the root pinned at an
        # end of [1/t_max, 1/t_min].
        done = (tl.abs(err) <= noise) | (inside & (tl.abs(newton - u) < STEP_TOL))
        done = done | (hi - lo < STEP_TOL) | (n_passes >= MAX_PASSES) | failed
        # The last Newton step is taken without evaluating it (quadratic
        # convergence makes it the most accurate iterate).
        fallback = tl.where(
            (err > 0) & ~hi_seen,
            hi,
            tl.where((err < 0) & ~lo_seen, lo, 0.5 * (lo + hi)),
        )
        u = tl.where(inside, newton, tl.where(done, u, fallback))
        go = ~done
        if go:
            b_try = tl.exp(u)
            ent, slope, noise = _entropy_and_slope(p_row, n_cols, row_max, b_try, BLOCK)
            if HAS_STATS:
                b_ent = b_try
            n_passes += 1

    # Last pass: z <- b z (masked entries keep their value), unless that
    # overflows float32 or the solver met a NaN: then the row stays as it is.
    # At an end of the interval b is 1 / t exactly (not exp(-log t)).
    b = tl.where(u == u_hi, 1.0 / t_min, tl.where(u == u_lo, 1.0 / t_max, tl.exp(u)))
    failed = failed | (tl.abs(row_max * b) == float("inf"))
    failed = failed | (tl.abs(row_min * b) == float("inf"))
    if failed:
        if HAS_STATS:  # restored: the entropy stays H0 (none if H0 is NaN)
            finite = h0 == h0
            _counting.add_row(p_stats, False, no_work, True, h0, h0, finite, finite)
        return
    if HAS_STATS:
        # The entropy after: the solver's last evaluation if it was at this b,
        # else summed while scaling.
        after = ent
        if b != b_ent:
            after = _scale_row_entropy(p_row, n_cols, row_max, b, BLOCK)
        else:
            _scale_row(p_row, n_cols, b, BLOCK)
        _counting.add_row(p_stats, False, n_passes, False, h0, after, True, True)
    else:
        _scale_row(p_row, n_cols, b, BLOCK)


def block_for(n_cols: int) -> int:
    """Logits per loop iteration of the temperature kernel (a function of V)."""
    return min(_BLOCK_MAX, max(128, next_power_of_2(n_cols)))


def warps_for_streamed_row(block: int) -> int:
    """Warps per program of the temperature kernel, which streams its row
    ``block`` logits at a time: 8 values per thread, so that the four per-lane
    accumulators and their float64 reduction stay in registers without spilling
    (bench/README.md, "GPU", has the register counts)."""
    return max(4, min(16, block // 256))


def launch_rows(
    grid_rows: int,
    n_cols: int,
    row_stride: int,
    target: tuple[torch.Tensor, torch.Tensor] | torch.Tensor,
    threshold: torch.Tensor,
    alpha: torch.Tensor,
    t_min: torch.Tensor,
    t_max: torch.Tensor,
    stats: torch.Tensor | None,
    *,
    slot_int64: bool = False,
) -> None:
    """The one launch of the temperature mode, arguments unchecked; ``target`` and
    ``stats`` (int64 ``[counters.WIDTH]`` or ``None``) as in
    :func:`em_inf.kernels.logits_mode.launch_passes`. A slot whose ``threshold``
    is ``+inf`` is left alone (and not counted)."""
    block = block_for(n_cols)
    indirect = isinstance(target, torch.Tensor)
    logits, row_slot = (target, target) if indirect else target
    _adaptive_temperature_kernel[(grid_rows,)](
        logits,
        row_stride,
        n_cols,
        row_slot,
        target if indirect else row_slot,
        threshold,
        alpha,
        t_min,
        t_max,
        stats if stats is not None else threshold,
        BLOCK=block,
        STEP_TOL=STEP_TOL,
        MAX_PASSES=MAX_PASSES,
        INDIRECT=indirect,
        SLOT_INT64=slot_int64,
        HAS_STATS=stats is not None,
        num_warps=warps_for_streamed_row(block),
    )


def adaptive_temperature_rows_(
    logits: torch.Tensor,
    row_slot: torch.Tensor,
    threshold: torch.Tensor,
    alpha: torch.Tensor,
    t_min: torch.Tensor,
    t_max: torch.Tensor,
    *,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adaptive temperature in place on a batch, per-row parameters read by slot.

    Args:
        logits: float32 ``[N, V]`` raw logits (contiguous along V), modified in place;
            entries at or below ``-1e37`` are masked and keep their value.
        row_slot: int32/int64 ``[N]``: the parameter slot of each row (vLLM's
            ``expanded_idx_mapping``); ``-1`` leaves the row untouched. Slots
            must be below ``S`` (not checked: that would need a device sync).
        threshold, alpha, t_min, t_max: float32 ``[S]`` per-slot settings.
        stats: the temperature mode's counters, a contiguous int64
            ``[counters.WIDTH]`` tensor on the logits' device (layout:
            :mod:`em_inf.counters`), added to with device atomics, no sync. Every
            processed row (slot ``>= 0``, finite ``threshold``) adds 1 to
            ``ROWS``; ``BELOW``: rows at or below their threshold; ``WORK``:
            solver passes (entropy evaluations) of the rows scaled; ``RESTORED``:
            rows restored by the fail-safe (NaN / ``+inf`` in the input: counted
            in ``ROWS`` and ``RESTORED`` only); ``SUM_*`` / ``HIST_*``: the
            entropy of each row before and of the row returned. ``None``: nothing
            counted, nothing extra computed.

    Returns:
        ``logits``: each row with ``H0 > threshold`` divided by the solved ``T``
        (entropy within :data:`em_inf.config.TEMPERATURE_RTOL` of the target as far
        as a float32 ``T`` resolves it, or the nearer end of ``[t_min, t_max]`` when
        out of reach); other rows bit-identical.
    """
    checks.in_place_logits(logits)
    checks.row_slot(row_slot, logits)
    for name, value in (
        ("threshold", threshold),
        ("alpha", alpha),
        ("t_min", t_min),
        ("t_max", t_max),
    ):
        checks.slot_param(name, value, logits, (torch.float32,))
    checks.stats(stats, logits)
    n_rows, n_cols = logits.shape
    if n_rows == 0 or n_cols == 0:
        return logits
    launch_rows(
        n_rows,
        n_cols,
        logits.stride(0),
        (logits, row_slot),
        threshold,
        alpha,
        t_min,
        t_max,
        stats,
    )
    return logits
