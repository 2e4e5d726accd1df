"""EM-INF's ``logits`` mode as Triton kernels: Adam steps on ``H(q) + lam KL(p0||q)``.

Design (one decoding step, ``n`` = the largest ``steps`` of the batch):

* ``n + 1`` launches of one kernel over a 2-D grid ``(rows, chunks)``, a chunk
  being ``BLOCK`` consecutive logits of one row (``kernels._common.plan_block``).
  Pass ``k < n`` writes, per chunk, the partial softmax statistics of ``z_k`` (the
  logits after ``k`` Adam steps): chunk max ``m_c``, ``s_c = sum exp(z - m_c)``,
  ``w_c = sum exp(z - m_c) (z - m_c)``. The last pass writes ``z_s`` (``s`` = the
  steps the row actually takes) in place.
* Why several launches: step ``k + 1`` needs ``logsumexp(z_k)`` and ``H(z_k)``,
  reductions over the whole row, and the row is split over many programs so that
  batch 1 still spreads over the card. Programs of one launch cannot wait for each
  other without a grid-wide barrier, which needs every program resident at once
  (not true at B x chunks in the thousands) and deadlocks Triton's sequential CPU
  interpreter. The kernel boundary is that barrier: ``n`` dependent reductions
  plus the write make ``n + 1`` launches, the least a split row allows. (The
  processor replays them as one CUDA graph: :mod:`em_inf.kernels.step`.)
* The "small finishing step" of each reduction is folded into its consumers: every
  program of pass ``k + 1`` combines its row's ``chunks`` partials itself
  (``_row_stats``: three loads of ``chunks`` floats and three block reductions,
  read from L2) instead of a separate launch.
* No ``[B, V]`` scratch: the logits keep ``z0`` until the last pass, and every
  program rebuilds its chunk's ``z_k``, Adam moments ``m, v`` and ``p0`` in
  registers from ``z0`` and the per-row scalars of earlier passes
  (docs/cost-model.md). The only scratch is the partials, ``[N, n + 1, 3,
  chunks]`` float32 (slot ``n``: the partials of the returned row, for counting),
  ``3 (n + 1) / BLOCK`` of the logits' size, and one float32 ticket per row.
* Early exits: a row whose slot is ``-1`` or whose ``steps`` is 0 returns at
  once in every pass; a row whose entropy fell below its threshold before step
  ``k + 1`` stops in pass ``k + 1`` (writing a stop marker, ``m_c = +inf``, so later
  passes see it in one combine) and never loads its logits again; a row below the
  threshold from the start is never written (bit-identical).
* Fail-safe: the logits keep ``z0`` until the last pass, so a row is restored by
  not writing it. A chunk holding NaN or ``+inf`` reports ``s_c = NaN``; a row
  whose statistics of any pass are not finite stops (marker) and is not written
  in the last pass. The last step's arithmetic cannot leave the finite range from
  finite inputs: the entropy gradient ``q (E_q[z] - z)`` is formed only where
  ``q > 0``, where ``|E_q[z] - z| <= ~116`` in float32 (``q`` underflows below
  ``z - max z = -104``), so ``|g| <= 116 + lam``, and Adam's bias-corrected step
  is at most ``~2.3 lr`` per step (Cauchy-Schwarz on the moments with
  ``beta1^2 < beta2``): with the accepted ranges (lr <= 100, steps <= 100) a
  logit moves by at most ~2.3e4, which cannot overflow float32. Exponents are
  formed as ``(z - c) log2(e)``, never ``z log2(e) - c log2(e)`` (which overflows
  for ``|z| > 2.3e38``).
* Masks: entries at or below ``-1e37`` (``-inf``, ``finfo(float32).min``, ...)
  count as masked: they become the finite ``MASKED`` in registers, so their
  ``q``, ``p0``, ``g`` and update are exactly 0, and they are never stored back.
* Counting (optional ``stats``, one mode's int64 ``[counters.WIDTH]``, layout in
  :mod:`em_inf.counters`): in the last pass the first program of each processed
  row (slot ``>= 0``, ``steps > 0``) adds ``ROWS``, ``BELOW``, ``WORK`` (its steps),
  ``RESTORED`` and its entropy before (``H(z0)``, from the first pass's partials)
  with integer atomics (:mod:`em_inf.kernels._counting`): no host sync, and the
  sums do not depend on the order. The entropy after, with no extra pass: a row
  left alone or restored has its entropy before; a row that stopped early below
  its threshold has ``H(z_k)``, which the statistics pass that stopped it
  computed; a row that ran all its steps has ``H(z_s)`` folded into the last
  pass: every program writes its chunk's partials of ``z_s`` (one more slot of
  the scratch), takes a ticket (a float32 atomic per row, reset by the first
  pass), and the program that takes the last ticket combines the row's partials
  in chunk order (``_row_stats``, the same fixed order whoever is last) and adds
  it. Without ``stats`` none of this is compiled in (``HAS_STATS``).

Cost per decoding step, ``n`` steps, ``B x V`` float32 logits (``4 B V`` bytes):

* Memory: ``n`` read passes for the statistics, then one read + one write, i.e.
  ``(n + 2) 4 B V`` bytes against the floor ``2 * 4 B V`` (2.5x at n = 3). The
  re-reads are served from L2 while the batch fits (50 MB on an H100: B <= ~64 at
  V = 151,936), so DRAM sees little more than the floor there.
* Compute: pass ``k`` replays ``k`` Adam steps per element, ``n (n + 1) / 2``
  steps in all (6 at n = 3). A replayed step costs 3 MUFU ops per element (exp2,
  sqrt, rsqrt; the MUFU pipe retires 16 per clock per SM) and ~12 FMA-pipe ops;
  with the statistics' exp2 that is 18 MUFU ops per element at n = 3. The MUFU
  pipe, not DRAM, bounds the kernel from B ~ 64 up and for n = 5 (bench/README.md,
  "GPU", has the figures for one card).
* Launch: ``n + 1`` kernel launches; at B = 1 the GPU work per pass is a few
  microseconds, so host launch overhead sets the latency unless the sequence is
  replayed as a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from em_inf import checks
from em_inf.backend import batch_invariant
from em_inf.config import ADAM_BETAS, ADAM_EPS
from em_inf.kernels import _counting
from em_inf.kernels._common import (
    check_block,
    next_power_of_2,
    plan_block,
    warps_for_held_chunk,
)

_PHASE_FIRST, _PHASE_MIDDLE, _PHASE_FINAL = 0, 1, 2
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
#: Stand-in for masked logits inside the kernel, and the level at or below which a
#: value counts as masked (never stored back).
MASKED: tl.constexpr = tl.constexpr(-1.0e38)
MASKED_CUT: tl.constexpr = tl.constexpr(-1.0e37)


@triton.jit
def _row_stats(p_part, n_chunks, C_POW2: tl.constexpr):
    """One row's softmax statistics at one pass, from its chunk partials.

    ``p_part`` points at ``[3, n_chunks]`` float32: chunk max ``m_c``,
    ``s_c = sum exp(z - m_c)``, ``w_c = sum exp(z - m_c) (z - m_c)``. With the row
    max ``M`` and ``d_c = m_c - M``: ``S = sum e^{d_c} s_c`` and
    ``W = sum e^{d_c} (w_c + d_c s_c) = sum exp(z - M) (z - M)``.

    Returns ``(M, log S, E_q[z - M] = W / S, H = log S - W / S, ok)``, so that
    ``log q = (z - M) - log S`` and ``log q + H = (z - M) - E_q[z - M]``: the
    gradient is formed from differences of small numbers, never from
    ``logsumexp`` and ``H`` separately (at |z| ~ 10 their float32 rounding, ~1e-6,
    is as large as ``log q + H`` on a nearly flat row). Where the pass wrote the
    marker ``m_c = +inf`` (the row had stopped), ``H = -1``: below every threshold.
    An all-masked row gives ``M = log S = 0``. ``ok`` is false when a chunk
    reported non-finite statistics (``s_c = NaN``: NaN or ``+inf`` in its input).
    """
    o_c = tl.arange(0, C_POW2)
    m_c = o_c < n_chunks
    b_max = tl.load(p_part + o_c, mask=m_c, other=float("-inf"))  # [C_POW2]
    b_sum = tl.load(p_part + n_chunks + o_c, mask=m_c, other=0.0)
    b_wsum = tl.load(p_part + 2 * n_chunks + o_c, mask=m_c, other=0.0)
    row_max = tl.max(b_max, axis=0)
    live = row_max < float("inf")
    shift = tl.where((row_max > float("-inf")) & live, row_max, 0.0)
    has = (b_max > float("-inf")) & (b_max < float("inf"))
    b_d = tl.where(has, b_max - shift, 0.0)  # <= 0; -inf if the range overflows
    b_scale = tl.where(has, tl.exp(b_d), 0.0)
    s = tl.sum(b_scale * b_sum, axis=0)  # NaN if any s_c is (0 * NaN = NaN)
    w = tl.sum(tl.where(b_scale > 0.0, b_scale * (b_wsum + b_d * b_sum), 0.0), axis=0)
    ok = (s == s) & (w == w)
    s = tl.where(s > 0, s, 1.0)
    log_s = tl.log(s)
    mean_y = w / s
    return shift, log_s, mean_y, tl.where(live, log_s - mean_y, -1.0), ok


@triton.jit
def _chunk_partials(b_z):
    """Partial softmax statistics of one chunk ``b_z`` (masked entries at
    ``MASKED``): ``(m_c, s_c, w_c)``; a chunk with no unmasked entry reports max
    ``-inf`` and zero sums."""
    chunk_max = tl.max(b_z, axis=0)
    has = chunk_max > MASKED_CUT
    shift = tl.where(has, chunk_max, 0.0)
    b_y = tl.maximum(b_z - shift, MASKED)  # finite: e * y is 0, never NaN
    b_e = tl.exp2(b_y * LOG2E)
    s_c = tl.where(has, tl.sum(b_e, axis=0), 0.0)
    w_c = tl.where(has, tl.sum(b_e * b_y, axis=0), 0.0)
    return tl.where(has, chunk_max, float("-inf")), s_c, w_c


@triton.jit
def _replay_adam_steps(
    b_z,
    p_part_row,
    n_chunks,
    n_apply,
    shift0,
    log_s0,
    mean_y0,
    h0,
    ok,
    threshold,
    lam,
    lr,
    C_POW2: tl.constexpr,
    BETA1: tl.constexpr,
    BETA2: tl.constexpr,
    EPS: tl.constexpr,
    HAS_STATS: tl.constexpr,
):
    """Adam steps 1..``n_apply`` (``n_apply >= 1``) of one chunk, replayed in
    registers: the one replay of every pass after the first (statistics of z_k,
    and the write); a row that stops on the way keeps the z of its last step.

    ``b_z``: float32 ``[BLOCK]``, the chunk of z0 (masked entries at ``MASKED``);
    ``p_part_row``: the row's float32 ``[max_steps + 1, 3, n_chunks]`` partials,
    pass j's read for step j + 1; ``shift0, log_s0, mean_y0, h0, ok``: the row's
    statistics of z0 (:func:`_row_stats`); ``threshold, lam, lr``: the slot's
    float32 settings. Returns ``(b_z, ok, active, taken, h_stop)``: the chunk
    after the steps, whether every statistics read was finite, whether the row is
    still running, the int64 count of steps it took, and (``HAS_STATS``) H(z_j) of
    the pass that stopped it (``h0`` if none did).

    Per step, with the row scalars of z_j (M_j = max, S_j = sum exp(z - M_j),
    E_j = E_q[z]):
      q = exp2((z - M_j - log S_j) log2(e))
      g = -q (log q + H) + lam (q - p0) = q (E_j - z) + lam (q - p0)
    (the KL term kept apart: q - p0 is small and exactly 0 at step 1, where
    q (lam + E_j - z) - lam p0 would cancel two terms of size lam q; the entropy
    term only where q > 0, where E_j - z cannot overflow). Adam moments are kept
    scaled, m' = m / (1 - b1) and v' = v / (1 - b2), so each update is one FMA;
    the bias-corrected step is
      z -= lr a_t m' / (c_t sqrt(v') + eps),
      a_t = (1 - b1) / (1 - b1^t),  c_t = sqrt((1 - b2) / (1 - b2^t))
    (each from its geometric sum, 1 + b + ... + b^(t-1) = (1 - b^t) / (1 - b)),
    with 1 / x as rsqrt(x * x) (one MUFU op, no IEEE division fix-ups).
    """
    # Step 1: q = p0 and lam (q - p0) = 0; m' = g, v' = g^2, a_1 = c_1 = 1:
    # z1 = z0 - lr g / (|g| + eps). E_q[z] - z is taken on shifted logits
    # y = z - M (exact near the row's top), not as a difference of two large z.
    b_y = b_z - shift0
    b_p0 = tl.exp2((b_y - log_s0) * LOG2E)
    b_g = tl.where(b_p0 > 0.0, b_p0 * (mean_y0 - b_y), 0.0)
    b_m = b_g
    b_v = b_g * b_g
    b_den = tl.abs(b_g) + EPS
    b_z = b_z - lr * b_g * tl.math.rsqrt(b_den * b_den)
    # (1 - beta^t) / (1 - beta) as the sum 1 + beta + ... + beta^(t-1): float32
    # loses most of 1 - 0.999^t to cancellation, the sum keeps it.
    geo1 = tl.full([], 1.0, tl.float32)
    geo2 = tl.full([], 1.0, tl.float32)
    active = tl.full([], 1, tl.int1)
    taken = tl.full([], 1, tl.int64)  # steps this row takes
    h_stop = h0  # HAS_STATS: H(z_j) of the pass that stopped the row
    for j in range(1, n_apply):
        p_part_j = p_part_row + j * 3 * n_chunks
        shift_j, log_s_j, mean_y_j, h_j, ok_j = _row_stats(p_part_j, n_chunks, C_POW2)
        ok = ok & ok_j
        if HAS_STATS:
            h_stop = tl.where(active & ok_j & (h_j < threshold), h_j, h_stop)
        active = active & ok_j & (h_j >= threshold)
        taken += active.to(tl.int64)
        geo1 = geo1 * BETA1 + 1.0
        geo2 = geo2 * BETA2 + 1.0
        step_scale = lr / geo1  # lr a_t
        c_t = 1.0 / tl.sqrt(geo2)
        b_y = b_z - shift_j
        b_q = tl.exp2((b_y - log_s_j) * LOG2E)
        b_g = tl.where(b_q > 0.0, b_q * (mean_y_j - b_y), 0.0) + lam * (b_q - b_p0)
        b_m = b_m * BETA1 + b_g
        b_v = b_v * BETA2 + b_g * b_g
        b_den = tl.sqrt(b_v) * c_t + EPS
        b_step = step_scale * (b_m * tl.math.rsqrt(b_den * b_den))
        b_z = tl.where(active, b_z - b_step, b_z)
    return b_z, ok, active, taken, h_stop


@triton.jit(do_not_specialize=["pass_idx", "max_steps"])
def _em_inf_pass_kernel(
    p_logits,  # float32 [N, V], row stride `row_stride`; z0 in, result out
    row_stride,
    n_cols,
    p_row_slot,  # int32/int64 [N]: slot of each row, -1 = leave the row alone
    p_launch,  # INDIRECT: int64 [3] = logits address, row_slot address, rows
    p_threshold,  # float32 [S]
    p_kl_weight,  # float32 [S]
    p_lr,  # float32 [S]
    p_steps,  # int32/int64 [S]
    p_part,  # float32 [N, max_steps + 1, 3, n_chunks]: chunk partials of each pass
    max_steps,
    n_chunks,
    pass_idx,  # this pass: statistics of z_{pass_idx}, or the write when FINAL
    p_stats,  # HAS_STATS: int64 [counters.WIDTH], added to
    p_ticket,  # HAS_STATS: float32 [N], programs of the row done with the last pass
    BLOCK: tl.constexpr,
    C_POW2: tl.constexpr,
    PHASE: tl.constexpr,  # 0: stats of z0; 1: stats of z_k, k >= 1; 2: write
    BETA1: tl.constexpr,
    BETA2: tl.constexpr,
    EPS: tl.constexpr,
    INDIRECT: tl.constexpr,  # read logits / row_slot / rows through p_launch
    SLOT_INT64: tl.constexpr,  # INDIRECT: row_slot's dtype
    HAS_STATS: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    i_chunk = tl.program_id(1)
    # Direct: the arguments are the tensors. Indirect (a CUDA graph replayed on
    # new tensors every step): their addresses and the row count are read from
    # p_launch; the grid covers a bucket of rows, and rows past the count exit.
    if INDIRECT:
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
    n_steps = tl.minimum(tl.load(p_steps + slot).to(tl.int32), max_steps)
    if PHASE == 2:
        if n_steps <= 0:
            return
    else:
        if n_steps <= pass_idx:  # the row needs no statistics of z_{pass_idx}
            return
    p_part_row = p_part + i_row * ((max_steps + 1) * 3 * n_chunks)
    p_part_out = p_part_row + pass_idx * 3 * n_chunks + i_chunk

    # Step j + 1 runs while H(z_j) >= threshold. Pass k checks H(z_{k-1}) (one
    # combine of chunk partials); a row that stopped before, or whose statistics
    # are not finite, writes the marker m_c = +inf instead of statistics, so later
    # passes see the stop in pass k - 1 alone and never read statistics that were
    # not computed.
    threshold = tl.load(p_threshold + slot)
    if PHASE == 1:
        p_prev = p_part_row + (pass_idx - 1) * 3 * n_chunks
        _, _, _, h_prev, ok_prev = _row_stats(p_prev, n_chunks, C_POW2)
        if (h_prev < threshold) | (ok_prev == 0):
            tl.store(p_part_out, float("inf"))
            tl.store(p_part_out + n_chunks, 0.0)
            tl.store(p_part_out + 2 * n_chunks, 0.0)
            return
    if PHASE == 0:
        if HAS_STATS:
            if i_chunk == 0:  # the last pass counts the row's programs from 0
                tl.store(p_ticket + i_row, 0.0)
    if PHASE != 0:
        shift0, log_s0, mean_y0, h0, ok = _row_stats(p_part_row, n_chunks, C_POW2)
        if PHASE == 2:
            # Below the threshold from the start (left alone), or restored
            # (statistics of z0 not finite: NaN / +inf in the input, no
            # entropy): z0 stays. The first program of the row counts it.
            if (ok == 0) | (h0 < threshold):
                if HAS_STATS:
                    if i_chunk == 0:
                        no_work = tl.zeros([], tl.int64)
                        _counting.add_row(p_stats, ok, no_work, ok == 0, h0, h0, ok, ok)
                return

    o_v = i_chunk * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    m_v = o_v < n_cols
    p_row = p_z + i_row * row_stride
    b_raw = tl.load(p_row + o_v, mask=m_v, other=float("-inf"))  # [BLOCK]
    # Masked entries become the finite MASKED: exp2 of (MASKED - c) log2(e) is 0 and
    # every product with it stays finite, so their q, p0, g and update are exactly
    # 0 without a select per step; they are never stored back.
    b_z = tl.maximum(b_raw, MASKED)

    if PHASE != 0:
        # Replay Adam steps 1..k of this chunk in registers: k = pass_idx, or the
        # row's steps in the last pass (the one replay: _replay_adam_steps).
        if PHASE == 2:
            n_apply = n_steps
        else:
            n_apply = pass_idx
        lam = tl.load(p_kl_weight + slot)
        lr = tl.load(p_lr + slot)
        b_z, ok, active, taken, h_stop = _replay_adam_steps(
            b_z, p_part_row, n_chunks, n_apply, shift0, log_s0, mean_y0, h0, ok,
            threshold, lam, lr, C_POW2, BETA1, BETA2, EPS, HAS_STATS,
        )  # fmt: skip

    if PHASE == 2:
        if ok:
            tl.store(p_row + o_v, b_z, mask=m_v & (b_z > MASKED_CUT))
        if HAS_STATS:
            # A row that ran all its steps: H(z_s) was never computed. Every
            # program writes its chunk's partials of z_s into slot max_steps and
            # takes a ticket; the last one combines them (in chunk order, like
            # every statistics pass) and adds the entropy after.
            ran_all = ok & active
            if ran_all:
                m_out, s_c, w_c = _chunk_partials(b_z)
                p_last = p_part_row + max_steps * 3 * n_chunks
                tl.store(p_last + i_chunk, m_out)
                tl.store(p_last + n_chunks + i_chunk, s_c)
                tl.store(p_last + 2 * n_chunks + i_chunk, w_c)
                tl.debug_barrier()  # every thread's stores before the release
                ticket = tl.atomic_add(p_ticket + i_row, 1.0)  # acq_rel, gpu
                if ticket == n_chunks - 1:
                    _, _, _, h_last, _ = _row_stats(p_last, n_chunks, C_POW2)
                    _counting.add_entropy(
                        p_stats, h_last, _counting.HIST_AFTER, _counting.SUM_AFTER
                    )
            if i_chunk == 0:
                # Restored rows (statistics went non-finite on the way; z0 is
                # still in place) keep their entropy and count no work.
                after = tl.where(ok, h_stop, h0)
                work = tl.where(ok, taken, 0)
                _counting.add_row(
                    p_stats, False, work, ok == 0, h0, after, True, ran_all == 0
                )
    else:
        # Chunk partials of z_{pass_idx} (online softmax, one chunk); one
        # holding NaN or +inf (only z0 can) reports s_c = NaN.
        m_out, s_c, w_c = _chunk_partials(b_z)
        if PHASE == 0:
            b_bad = (b_raw != b_raw) | (b_raw == float("inf"))
            bad = tl.max(b_bad.to(tl.int32), axis=0) > 0
            m_out = tl.where(bad, 0.0, m_out)
            s_c = tl.where(bad, float("nan"), s_c)
        tl.store(p_part_out, m_out)
        tl.store(p_part_out + n_chunks, s_c)
        tl.store(p_part_out + 2 * n_chunks, w_c)


def launch_passes(
    grid_rows: int,
    n_cols: int,
    row_stride: int,
    target: tuple[torch.Tensor, torch.Tensor] | torch.Tensor,
    threshold: torch.Tensor,
    kl_weight: torch.Tensor,
    lr: torch.Tensor,
    steps: torch.Tensor,
    partials: torch.Tensor,
    max_steps: int,
    block: int,
    stats: torch.Tensor | None,
    tickets: torch.Tensor | None = None,
    *,
    slot_int64: bool = False,
) -> None:
    """The ``max_steps + 1`` launches of one decoding step, arguments unchecked.

    Args:
        grid_rows: rows of the grid (``N``, or the bucket of a CUDA graph).
        target: ``(logits, row_slot)`` (direct), or an int64 ``[3]`` device tensor
            holding the logits' address, ``row_slot``'s address and the row count
            (indirect: what :mod:`em_inf.kernels.step` captures in a graph;
            ``slot_int64`` then gives ``row_slot``'s dtype).
        partials: float32 ``[grid_rows, max_steps + 1, 3, chunks]`` scratch
            (:func:`scratch`).
        stats: one mode's int64 ``[counters.WIDTH]`` counters to add to
            (:mod:`em_inf.counters`), or ``None``: nothing counted.
        tickets: float32 ``[grid_rows]`` scratch, needed with ``stats``.
    """
    n_chunks = -(-n_cols // block)
    indirect = isinstance(target, torch.Tensor)
    logits, row_slot = (target, target) if indirect else target
    launch_args = target if indirect else row_slot
    consts = dict(
        BLOCK=block,
        C_POW2=max(16, next_power_of_2(n_chunks)),
        BETA1=ADAM_BETAS[0],
        BETA2=ADAM_BETAS[1],
        EPS=ADAM_EPS,
        INDIRECT=indirect,
        SLOT_INT64=slot_int64,
        HAS_STATS=stats is not None,
        num_warps=warps_for_held_chunk(block),
    )
    if stats is not None and tickets is None:
        raise ValueError("counting (stats) needs the tickets scratch")
    launch = _em_inf_pass_kernel[(grid_rows, n_chunks)]
    args = (logits, row_stride, n_cols, row_slot, launch_args)
    args += (threshold, kl_weight, lr, steps, partials, max_steps, n_chunks)
    counting = (stats, tickets) if stats is not None else (partials, partials)
    for pass_idx in range(max_steps):
        phase = _PHASE_FIRST if pass_idx == 0 else _PHASE_MIDDLE
        launch(*args, pass_idx, *counting, PHASE=phase, **consts)
    launch(*args, max_steps, *counting, PHASE=_PHASE_FINAL, **consts)


def scratch_elements(rows: int, max_steps: int, n_chunks: int) -> int:
    """float32 elements of the logits kernel's scratch for ``rows`` rows:
    ``rows x (max_steps + 1) x 3 x n_chunks`` partials, then ``rows`` tickets."""
    return rows * ((max_steps + 1) * 3 * n_chunks + 1)


def scratch(
    buffer: torch.Tensor, rows: int, max_steps: int, n_chunks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partials, tickets)``, views of the flat float32 ``buffer`` (at least
    :func:`scratch_elements`): partials ``[rows, max_steps + 1, 3, n_chunks]``
    (slot ``max_steps``: the returned rows' partials, for counting) and tickets
    ``[rows]``."""
    n_part = rows * (max_steps + 1) * 3 * n_chunks
    partials = buffer[:n_part].view(rows, max_steps + 1, 3, n_chunks)
    return partials, buffer[n_part : n_part + rows]


def em_inf_rows_(
    logits: torch.Tensor,
    row_slot: torch.Tensor,
    threshold: torch.Tensor,
    kl_weight: torch.Tensor,
    lr: torch.Tensor,
    steps: torch.Tensor,
    *,
    max_steps: int | None = None,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """EM-INF (logits mode) in place on a batch, per-row parameters read by slot.

    Args:
        logits: float32 ``[N, V]`` raw logits (contiguous along V), modified in place;
            entries at or below ``-1e37`` (``-inf``, ``finfo(float32).min``) are
            masked and keep their value.
        row_slot: int32/int64 ``[N]``: the parameter slot of each row (vLLM's
            ``expanded_idx_mapping``); ``-1`` leaves the row untouched. Slots
            must be below ``S`` (not checked: that would need a device sync).
        threshold, kl_weight, lr: float32 ``[S]`` per-slot ``delta``, ``lam``, ``eta``.
        steps: int32/int64 ``[S]`` per-slot most Adam steps ``n``.
        max_steps: host-side upper bound of ``steps`` over the rows' slots; it sets
            the number of launches (``max_steps + 1``). Pass it (vLLM keeps the
            per-slot values on the host) to avoid a device sync; ``None`` reads
            ``steps.max()`` from the device. Slots with more steps are cut to it.
        stats: the logits mode's counters, a contiguous int64
            ``[counters.WIDTH]`` tensor on the logits' device (layout:
            :mod:`em_inf.counters`), added to with device atomics, no sync. Every
            processed row (slot ``>= 0``, ``steps > 0``) adds 1 to ``ROWS``;
            ``BELOW``: rows below their threshold from the start; ``WORK``: Adam
            steps taken; ``RESTORED``: rows restored by the fail-safe (a row whose
            input holds NaN or ``+inf``, counted in ``ROWS`` and ``RESTORED``
            only, or whose statistics went non-finite, comes back as it went in);
            ``SUM_*`` / ``HIST_*``: the entropy of each row before and of the row
            returned. ``None``: nothing counted, nothing extra computed.

    Returns:
        ``logits``. Rows whose entropy starts below their threshold, rows with
        ``steps == 0``, rows with slot ``-1`` and restored rows are bit-identical.
        Bitwise batch invariant when :func:`em_inf.backend.batch_invariant` is on
        (the block plan then depends on ``V`` alone).
    """
    return em_inf_rows_with_plan_(
        logits,
        row_slot,
        threshold,
        kl_weight,
        lr,
        steps,
        max_steps=max_steps,
        stats=stats,
    )


def em_inf_rows_with_plan_(
    logits: torch.Tensor,
    row_slot: torch.Tensor,
    threshold: torch.Tensor,
    kl_weight: torch.Tensor,
    lr: torch.Tensor,
    steps: torch.Tensor,
    *,
    max_steps: int | None = None,
    stats: torch.Tensor | None = None,
    block: int | None = None,
    rows_per_launch: int | None = None,
) -> torch.Tensor:
    """:func:`em_inf_rows_` with the launch plan's tuning knobs (for
    ``bench/gpu_check.py`` and tests, not a public API).

    Args:
        block: logits per program (a power of two, 128 to 8192); ``None``: the plan
            of :func:`em_inf.kernels._common.plan_block`.
        rows_per_launch: process the batch in groups of this many rows, each
            with its own ``max_steps + 1`` launches, so that a group's logits
            stay in L2 between passes; ``None``: the whole batch at once. It
            trades DRAM re-reads for launches.
    """
    checks.in_place_logits(logits)
    checks.row_slot(row_slot, logits)
    for name, value in (("threshold", threshold), ("kl_weight", kl_weight), ("lr", lr)):
        checks.slot_param(name, value, logits, (torch.float32,))
    checks.slot_param("steps", steps, logits, (torch.int32, torch.int64))
    checks.stats(stats, logits)
    if max_steps is None:
        max_steps = int(steps.max()) if steps.numel() else 0
    n_rows, n_cols = logits.shape
    if n_rows == 0 or n_cols == 0 or max_steps <= 0:
        return logits
    group = n_rows if rows_per_launch is None else max(1, int(rows_per_launch))
    group = min(group, n_rows)
    if block is None:
        block = plan_block(group, n_cols, logits.device, batch_invariant())
    else:
        block = check_block(block)
    n_chunks = -(-n_cols // block)
    partials, tickets = scratch(
        torch.empty(
            scratch_elements(group, max_steps, n_chunks),
            dtype=torch.float32,
            device=logits.device,
        ),
        group,
        max_steps,
        n_chunks,
    )
    # Row groups run one after another on the stream, reusing `partials`.
    for start in range(0, n_rows, group):
        rows = logits[start : start + group]
        launch_passes(
            rows.shape[0],
            n_cols,
            logits.stride(0),
            (rows, row_slot[start : start + group]),
            threshold,
            kl_weight,
            lr,
            steps,
            partials,
            max_steps,
            block,
            stats,
            tickets,
        )
    return logits
