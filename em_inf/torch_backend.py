"""Batched EM-INF in plain PyTorch: the CPU path and the GPU fallback.

Every row of a ``[B, V]`` batch is independent: its own parameters, entropy and early
stop. Gradients are closed-form (docs/algorithm.md):

    g = q * (E_q[z] - z) + kl_weight * (q - p0)

followed by a textbook Adam step. Masked tokens (``-inf``) have ``q = p0 = 0``, hence
``g = m = v = 0`` and an update of exactly 0: they stay ``-inf``.

Callers (:mod:`em_inf.functional`, :mod:`em_inf.core`) hand over validated inputs:
``logits`` is a contiguous float32 ``[B, V]`` tensor modified in place, and every
parameter a ``[B, 1]`` tensor on the same device (``steps`` as int64).
"""

from __future__ import annotations

import torch

from em_inf.config import ADAM_BETAS, ADAM_EPS

_NEG_BIG = torch.finfo(torch.float32).min

#: Rows are processed in chunks of about this many logits. Each step makes ~14
#: passes over several chunk-sized buffers; chunks that stay in cache beat one pass
#: over the whole batch from memory. Measured on 2 x86 cores (B = 8, 3 steps):
#: V = 49,152 10.3 -> 3.4 ms, V = 151,936 24.2 -> 11.2 ms; 2**18 and up lost most of
#: the gain, 2**15-2**16 (one row) were within 10% of 2**17.
CHUNK_ELEMENTS = 2**17


def _in_row_chunks(process_, logits: torch.Tensor, *params: torch.Tensor) -> None:
    """Apply the in-place ``process_(logits_rows, *param_rows)`` chunk by chunk."""
    rows = max(1, CHUNK_ELEMENTS // max(1, logits.shape[1]))
    for start in range(0, logits.shape[0], rows):
        chunk = slice(start, start + rows)
        process_(logits[chunk], *(param[chunk] for param in params))


def _softmax_stats(
    z: torch.Tensor, masked: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ``[b, V]`` logits: ``(zs, q, mean, entropy)``.

    ``zs = z - max(z)`` (with ``-inf`` clamped to a finite floor when ``masked``,
    so ``q * zs = 0`` for masked tokens), ``q = softmax(z)``, ``mean = E_q[zs]``
    and ``entropy = log sum exp(zs) - E_q[zs]``, both ``[b, 1]``. Five passes over
    the row: max, shift, exp, sum (then normalise), dot.

    The gradient is then formed as ``q * (mean - zs)``, equal to
    ``-q * (log q + H)``. Precision matters here: Adam divides by ``|g|``, so the
    relative error of ``g`` on tokens near the mean shows up in the logits. Raw
    logits near 30 cost ``30 * 2^-24`` of absolute error in ``z - E_q[z]``; shifted
    by the row max the top tokens sit near 0, and flat rows never subtract two
    large numbers (``log q + H`` would, at ``H ~ log V``).
    """
    zs = z - z.amax(dim=-1, keepdim=True)
    if masked:
        zs.clamp_(min=_NEG_BIG)
    q = torch.exp(zs)
    total = q.sum(-1, keepdim=True)
    q.div_(total)
    mean = torch.linalg.vecdot(q, zs).unsqueeze(-1)
    return zs, q, mean, torch.log(total) - mean


def em_inf_(
    logits: torch.Tensor,
    threshold: torch.Tensor,
    kl_weight: torch.Tensor,
    lr: torch.Tensor,
    steps: torch.Tensor,
) -> torch.Tensor:
    """EM-INF in place on ``logits`` (float32 ``[B, V]``); returns ``logits``.

    Rows whose entropy starts below ``threshold`` (or with ``steps == 0``) are not
    touched at all. Runs in row chunks of about :data:`CHUNK_ELEMENTS` logits.
    """
    _in_row_chunks(_em_inf_chunk_, logits, threshold, kl_weight, lr, steps)
    return logits


def _em_inf_chunk_(
    logits: torch.Tensor,
    threshold: torch.Tensor,
    kl_weight: torch.Tensor,
    lr: torch.Tensor,
    steps: torch.Tensor,
) -> None:
    """:func:`em_inf_` on one chunk of rows. Rows that take part run on a
    compacted sub-batch (the whole chunk when they all do). Each step is about 14
    elementwise passes over the sub-batch (5 for the softmax statistics, 2-3 for
    the gradient, 7 for Adam): on CPU the cost is memory traffic, so the update is
    arranged to need as few passes and temporaries as possible.
    """
    masked = bool(torch.isneginf(logits).any())
    zs, q, mean, ent = _softmax_stats(logits, masked)
    todo = (ent >= threshold) & (steps > 0)
    if not bool(todo.any()):
        return
    whole = bool(todo.all())
    rows = None if whole else todo.squeeze(1).nonzero().squeeze(1)

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x if whole else x[rows]

    z = logits if whole else logits[rows]
    zs, q, mean, ent = pick(zs), pick(q), pick(mean), pick(ent)
    threshold, kl_weight, lr, steps = (
        pick(threshold),
        pick(kl_weight),
        pick(lr),
        pick(steps),
    )
    p0 = q
    use_kl = bool((kl_weight != 0).any())
    exp_avg = torch.zeros_like(z)
    exp_avg_sq = torch.zeros_like(z)
    beta1, beta2 = ADAM_BETAS
    active = torch.ones_like(ent, dtype=torch.bool)
    for t in range(1, int(steps.max()) + 1):
        if t > 1:
            zs, q, mean, ent = _softmax_stats(z, masked)
        active &= (ent >= threshold) & (steps >= t)
        if not bool(active.any()):
            break
        # g = -q (log q + H) + lam (q - p0) = q (E_q[zs] - zs) + lam (q - p0).
        # The KL term is kept apart: q - p0 is small (exactly 0 at step 1), and
        # q (lam + ...) - lam p0 would cancel two terms of size lam q.
        grad = zs.neg_().add_(mean).mul_(q)
        if use_kl:
            grad.add_(torch.sub(q, p0).mul_(kl_weight))
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # z -= lr / bc1 * m / (sqrt(v / bc2) + eps)
        #    = m / ((sqrt(v) + eps sqrt(bc2)) / (lr sqrt(bc2) / bc1)); rows that
        # stopped get step size 0, hence a denominator of +inf and no update.
        sqrt_bc2 = (1 - beta2**t) ** 0.5
        step_size = (lr * (sqrt_bc2 / (1 - beta1**t))).masked_fill_(~active, 0.0)
        denom = exp_avg_sq.sqrt().add_(ADAM_EPS * sqrt_bc2).div_(step_size)
        z.addcdiv_(exp_avg, denom, value=-1.0)
    if not whole:
        logits[rows] = z


def adaptive_temperature_(
    logits: torch.Tensor,
    threshold: torch.Tensor,
    alpha: torch.Tensor,
    t_min: torch.Tensor,
    t_max: torch.Tensor,
) -> torch.Tensor:
    """Adaptive temperature in place on ``logits`` (float32 ``[B, V]``).

    Solves ``H(b) = max(threshold, alpha * H0)`` for the inverse temperature ``b``
    in ``[1 / t_max, 1 / t_min]`` with Newton's method on ``u = log b``, safeguarded
    by a bracket (a step that leaves it is replaced by bisection). ``H`` is
    non-increasing in ``b`` and ``dH/du = -b^2 Var_q(z)``; each pass needs one
    read of the row for ``sum exp(b z)``, ``E_q[z]`` and ``E_q[z^2]``. A target
    outside the reachable range gives the nearer end of the interval.
    Rows with ``H0 <= threshold`` are not touched. Runs in row chunks of about
    :data:`CHUNK_ELEMENTS` logits.

    The reductions run in float64: ``z / T`` puts the temperature's relative error
    on every logit times ``|z / T|`` (hundreds in the tail of a confident row), so
    ``T`` must be exact to ~1e-7, past what float32 sums resolve. Newton converges
    quadratically, so the tight ``tol`` costs one or two passes: 6-9 in all for a
    batch of 8 random rows (the slowest row sets it), against ~20 for bisection to
    1e-4 nats and ~35 to the same precision.
    """
    _in_row_chunks(_adaptive_temperature_chunk_, logits, threshold, alpha, t_min, t_max)
    return logits


#: Temperature solver: stop when the entropy is this close to its target (nats)...
_TEMPERATURE_TOL = 1e-9
#: ... or after this many passes (bisection from the widest bracket needs < 60).
_TEMPERATURE_MAX_PASSES = 60


def _adaptive_temperature_chunk_(
    logits: torch.Tensor,
    threshold: torch.Tensor,
    alpha: torch.Tensor,
    t_min: torch.Tensor,
    t_max: torch.Tensor,
) -> None:
    """:func:`adaptive_temperature_` on one chunk of rows."""
    shifted = (logits - logits.amax(dim=-1, keepdim=True)).double()  # -inf stays
    zfin = torch.where(torch.isfinite(shifted), shifted, 0.0)

    def entropy_and_slope(
        shifted: torch.Tensor, zfin: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        e = torch.exp(shifted * b)  # masked -> 0
        s = e.sum(-1, keepdim=True)
        ez = (e * zfin).sum(-1, keepdim=True) / s
        ez2 = (e * zfin * zfin).sum(-1, keepdim=True) / s
        var = (ez2 - ez * ez).clamp_(min=0.0)
        return torch.log(s) - b * ez, -(b * b) * var

    threshold, alpha, t_min, t_max = (
        x.double() for x in (threshold, alpha, t_min, t_max)
    )
    h0, _ = entropy_and_slope(shifted, zfin, torch.ones_like(threshold))
    rows = (h0 > threshold).squeeze(1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    shifted, zfin = shifted[rows], zfin[rows]
    target = torch.maximum(threshold[rows], alpha[rows] * h0[rows])
    lo = -torch.log(t_max[rows])  # u = log b, H decreasing in u
    hi = -torch.log(t_min[rows])
    u = torch.zeros_like(target).clamp_(lo, hi)  # start at T = 1, or the nearer end
    done = torch.zeros_like(target, dtype=torch.bool)
    lo_seen = torch.zeros_like(done)  # whether lo / hi are evaluated points yet
    hi_seen = torch.zeros_like(done)
    for _ in range(_TEMPERATURE_MAX_PASSES):
        ent, slope = entropy_and_slope(shifted, zfin, torch.exp(u))
        err = ent - target  # > 0: the root lies at larger u
        lo, lo_seen = torch.where(err > 0, u, lo), lo_seen | (err > 0)
        hi, hi_seen = torch.where(err < 0, u, hi), hi_seen | (err < 0)
        # Converged, or the root is pinned at an end of [1/t_max, 1/t_min].
        done |= (err.abs() < _TEMPERATURE_TOL) | (hi - lo < 1e-12)
        if bool(done.all()):
            break
        newton = u - err / slope
        inside = (newton > lo) & (newton < hi)  # False for NaN / inf too
        # Outside the bracket: try the end it points to once, then bisect.
        fallback = torch.where(
            (err > 0) & ~hi_seen,
            hi,
            torch.where((err < 0) & ~lo_seen, lo, (lo + hi) / 2),
        )
        u = torch.where(done, u, torch.where(inside, newton, fallback))
    logits[rows] = logits[rows] * torch.exp(u).float()
