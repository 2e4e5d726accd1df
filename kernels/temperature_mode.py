"""EM-INF's ``temperature`` mode (the paper's Algorithm 1) as one Triton kernel.

Per row: ``H0 = H(softmax(z))``; a row with ``H0 <= threshold`` is left alone;
otherwise the inverse temperature ``b`` in ``[1 / t_max, 1 / t_min]`` with
``H(softmax(b z)) = max(threshold, alpha * H0)`` is found and the row becomes ``b z``.
The solver is :func:`em_inf.torch_backend.adaptive_temperature_`'s: Newton on
``u = log b`` with ``dH/du = -b^2 Var_q(z)``, safeguarded by a bracket (a step
leaving it tries the unseen end once, then bisects), stopping at ``|H - target| <
1e-5`` or a bracket narrower than ``1e-7``. Each evaluation is one pass over the row
for ``sum e``, ``sum e y``, ``sum e y^2`` with ``y = z - max z <= 0``,
``e = exp(b y)``: ``H = log S - b E[y]``, ``Var = E[y^2] - E[y]^2``.

Design: one launch, one program per row, the solver loop inside the kernel.
Unlike the logits mode the number of passes is data-dependent (4 to 9 on Gaussian
logits of scale 0.3-10 at V = 50,000, up to 13 seen; see the module docstring of
the tests), so a chunked grid would need a host-side launch per pass (about 10
launches of ~4 us each) or a device sync. One program per row streams its row
from L2 on every pass after the first: per pass and row, V loads and V
exponentials; on an H100 one SM retires 16 exponentials per clock, i.e. ~5 us per
pass at V = 151,936, so a row costs ~30-45 us whatever the batch, and batches of
132+ rows keep every SM busy. Small batches leave SMs idle, but finish in about
the time the launches alone of a chunked design would take.

Memory traffic per row: one read for the max, one per solver pass (the ``b = 1``
pass gives ``H0`` and, when ``1`` lies in the interval, the first iterate), one
read + one write for the scaling; nothing else, no scratch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from em_inf.kernels._common import (
    check_logits,
    check_row_slot,
    check_slot_param,
    next_power_of_2,
)

#: Solver stop: a Newton step (or bracket) in ``u = log b`` below this changes
#: every logit by a relative 1e-7; and the most passes a row may take.
STEP_TOL = 1e-7
MAX_PASSES = 60
_BLOCK_MAX = 4096


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
    solver cannot resolve ``H - target`` below it. Per-lane (``[BLOCK]``) sums,
    reduced once at the end; a row without finite entries gives ``(0, 0, 0)``.
    """
    b_log2e = b * 1.4426950408889634  # exp(b y) = exp2(b log2(e) y): one MUFU op
    acc_top = tl.zeros([BLOCK], dtype=tl.float32)
    acc_rest = tl.zeros([BLOCK], dtype=tl.float32)
    acc_y = tl.zeros([BLOCK], dtype=tl.float32)
    acc_yy = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        o_v = start + tl.arange(0, BLOCK)
        b_z = tl.load(p_row + o_v, mask=o_v < n_cols, other=float("-inf"))
        b_finite = b_z > float("-inf")
        b_y = tl.where(b_finite, b_z - row_max, 0.0)  # <= 0
        b_e = tl.where(b_finite, tl.exp2(b_log2e * b_y), 0.0)
        b_top = b_finite & (b_y == 0.0)
        acc_top += b_top.to(tl.float32)
        acc_rest += tl.where(b_top, 0.0, b_e)
        acc_y += b_e * b_y
        acc_yy += b_e * b_y * b_y
    n_top = tl.sum(acc_top, axis=0)
    rest = tl.sum(acc_rest, axis=0)
    has_mass = n_top > 0
    s = tl.where(has_mass, n_top + rest, 1.0)
    log_s = _log1p(tl.maximum(n_top - 1.0, 0.0) + rest)
    mean_y = tl.sum(acc_y, axis=0) / s  # <= 0
    var_y = tl.maximum(tl.sum(acc_yy, axis=0) / s - mean_y * mean_y, 0.0)
    ent = tl.where(has_mass, log_s - b * mean_y, 0.0)
    noise = 4e-7 * (log_s - b * mean_y)
    return ent, -(b * b) * var_y, noise


@triton.jit
def _adaptive_temperature_kernel(
    p_logits,  # float32 [N, V], row stride `row_stride`; modified in place
    row_stride,
    n_cols,
    p_row_slot,  # int32/int64 [N]: slot of each row, -1 = leave the row alone
    p_threshold,  # float32 [S]
    p_alpha,  # float32 [S]
    p_t_min,  # float32 [S]
    p_t_max,  # float32 [S]
    BLOCK: tl.constexpr,
    STEP_TOL: tl.constexpr,
    MAX_PASSES: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    slot = tl.load(p_row_slot + i_row).to(tl.int64)
    if slot < 0:
        return
    p_row = p_logits + i_row * row_stride

    # Pass 1: the row max, so that every later exponent b (z - max) is <= 0.
    acc_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        o_v = start + tl.arange(0, BLOCK)
        b_z = tl.load(p_row + o_v, mask=o_v < n_cols, other=float("-inf"))
        acc_max = tl.maximum(acc_max, b_z)
    row_max = tl.max(acc_max, axis=0)
    row_max = tl.where(row_max > float("-inf"), row_max, 0.0)

    # Pass 2: H0 at b = 1.
    one = tl.full([], 1.0, tl.float32)
    h0, slope0, noise0 = _entropy_and_slope(p_row, n_cols, row_max, one, BLOCK)
    threshold = tl.load(p_threshold + slot)
    if h0 <= threshold:
        return
    target = tl.maximum(threshold, tl.load(p_alpha + slot) * h0)

    # Safeguarded Newton on u = log b; H is non-increasing in u.
    lo = -tl.log(tl.load(p_t_max + slot))
    hi = -tl.log(tl.load(p_t_min + slot))
    u = tl.minimum(tl.maximum(0.0 * one, lo), hi)  # T = 1, or the nearer end
    ent = h0
    slope = slope0
    noise = noise0
    if u != 0.0:
        ent, slope, noise = _entropy_and_slope(p_row, n_cols, row_max, tl.exp(u), BLOCK)
    lo_seen = tl.full([], 0, tl.int1)  # whether lo / hi are evaluated points yet
    hi_seen = tl.full([], 0, tl.int1)
    n_passes = tl.full([], 1, tl.int32)
    go = n_passes > 0
    while go:
        err = ent - target  # > 0: the root lies at larger u
        lo = tl.where(err > 0, u, lo)
        lo_seen = lo_seen | (err > 0)
        hi = tl.where(err < 0, u, hi)
        hi_seen = hi_seen | (err < 0)
        newton = u - err / slope
        inside = (newton > lo) & (newton < hi)  # False for NaN / inf too
        # Done: H - target below float32 resolution, a Newton step too small to
        # matter (|du| = relative change of every logit), or the root pinned at an
        # end of [1/t_max, 1/t_min].
        done = (tl.abs(err) <= noise) | (inside & (tl.abs(newton - u) < STEP_TOL))
        done = done | (hi - lo < STEP_TOL) | (n_passes >= MAX_PASSES)
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
            ent, slope, noise = _entropy_and_slope(
                p_row, n_cols, row_max, tl.exp(u), BLOCK
            )
            n_passes += 1

    # Last pass: z <- b z (masked entries stay -inf).
    b = tl.exp(u)
    for start in range(0, n_cols, BLOCK):
        o_v = start + tl.arange(0, BLOCK)
        m_v = o_v < n_cols
        b_z = tl.load(p_row + o_v, mask=m_v, other=float("-inf"))
        tl.store(p_row + o_v, b_z * b, mask=m_v)


def adaptive_temperature_rows_(
    logits: torch.Tensor,
    row_slot: torch.Tensor,
    threshold: torch.Tensor,
    alpha: torch.Tensor,
    t_min: torch.Tensor,
    t_max: torch.Tensor,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Adaptive temperature in place on a batch, per-row parameters read by slot.

    Args:
        logits: float32 ``[N, V]`` raw logits (contiguous along V), modified in place;
            ``-inf`` = masked, stays ``-inf``.
        row_slot: int32/int64 ``[N]``: the parameter slot of each row (vLLM's
            ``expanded_idx_mapping``); ``-1`` leaves the row untouched. Slots
            must be below ``S`` (not checked: that would need a device sync).
        threshold, alpha, t_min, t_max: float32 ``[S]`` per-slot settings.
        validate: check the per-slot tensors; see
            :func:`em_inf.kernels.em_inf_rows_`.

    Returns:
        ``logits``: each row with ``H0 > threshold`` divided by the solved ``T``
        (target entropy within 1e-5 nats, or the nearer end of ``[t_min, t_max]``
        when out of reach); other rows bit-identical.
    """
    check_logits(logits)
    check_row_slot(row_slot, logits)
    if validate:
        for name, value in (
            ("threshold", threshold),
            ("alpha", alpha),
            ("t_min", t_min),
            ("t_max", t_max),
        ):
            check_slot_param(name, value, logits, (torch.float32,))
    n_rows, n_cols = logits.shape
    if n_rows == 0 or n_cols == 0:
        return logits
    block = min(_BLOCK_MAX, max(128, next_power_of_2(n_cols)))
    _adaptive_temperature_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        n_cols,
        row_slot,
        threshold,
        alpha,
        t_min,
        t_max,
        BLOCK=block,
        STEP_TOL=STEP_TOL,
        MAX_PASSES=MAX_PASSES,
        num_warps=8 if block >= 2048 else 4,
    )
    return logits
