"""EM-INF in eager PyTorch: the CPU path where the compiled kernels of
:mod:`em_inf.cpu_backend` cannot be built, and the GPU fallback without Triton.

Every row of a ``[B, V]`` batch is independent: its own parameters, entropy and early
stop. Gradients are closed-form (docs/algorithm.md):

    g = q * (E_q[z] - z) + kl_weight * (q - p0),

followed by a textbook Adam step. Masked logits (``<= MASKED_AT``: ``-inf``,
``finfo(float32).min``...) have ``q = p0 = 0``, hence ``g = m = v = 0`` and an update
of exactly 0: they keep their input value.

Rows are processed one at a time, as ``[1, V]`` views: every reduction over a row
then has the same shape whatever the batch, so a row's bits never depend on the
other rows or on the batch size (batch invariance; they may change with torch's
thread count, which splits those reductions). Grouping rows saved little once a row
fills the cache (V >= 32k: within 10%), and made a row's bits depend on its group.

Fail-safe: a row whose input holds NaN or ``+inf`` is left as it is; a processed row
whose result would hold a non-finite value where its input was finite is restored to
its input. Both are counted (``RESTORED``).

Callers (:mod:`em_inf.functional`, :mod:`em_inf.core`) hand over validated inputs:
``logits`` is a float32 ``[B, V]`` tensor modified in place, and every parameter a
``[B, 1]`` (or ``[B]``) tensor (``steps`` integer). ``stats``, when given, is an int64
``[counters.WIDTH]`` tensor on ``logits``' device that the row's counts are added to
(:mod:`em_inf.counters`): rows processed, left alone below their threshold, Adam steps
(temperature mode: entropy evaluations) of the rows not restored, rows restored by the
fail-safe (or left alone for NaN / ``+inf``), and each row's entropy before and after.
Only with ``stats`` is the entropy of a row that ran all its steps computed (one more
softmax of the row).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from em_inf import counters
from em_inf.config import ADAM_BETAS, ADAM_EPS, TEMPERATURE_RTOL

#: Logits at or below this are masked.
MASKED_AT = -1e37
_NEG_BIG = torch.finfo(torch.float32).min
#: Temperature solver: most entropy evaluations per row (bisection alone needs < 30
#: to reach float32's resolution of 1/T from the widest bracket, [1e-4, 1e4]).
_TEMPERATURE_MAX_PASSES = 60


class _Counts:
    """One call's counts, in :mod:`em_inf.counters`' layout, added to ``stats`` at
    the end."""

    def __init__(self, wanted: bool) -> None:
        self.wanted = wanted  # whether entropies after are worth computing
        self.values = [0] * counters.WIDTH

    def row(self, before: float | None, after: float | None, below: bool = False):
        counters.add_row(self.values, before, after, below=below)

    def work(self, amount: int) -> None:
        self.values[counters.WORK] += amount

    def restored(self) -> None:
        self.values[counters.RESTORED] += 1

    def add_to(self, stats: torch.Tensor | None) -> None:
        if stats is not None:
            stats += torch.tensor(self.values, dtype=torch.int64, device=stats.device)


def _rows(param: torch.Tensor) -> list:
    """A per-row parameter as Python numbers."""
    return param.reshape(-1).tolist()


def _unusable(row: torch.Tensor) -> bool:
    """Whether the row holds NaN or +inf (then it is not processed)."""
    return bool((torch.isnan(row) | torch.isposinf(row)).any())


def _broken(row: torch.Tensor, original: torch.Tensor) -> bool:
    """Whether the result holds NaN, or an infinity where the input was finite."""
    return bool((~torch.isfinite(row) & torch.isfinite(original)).any()) or bool(
        torch.isnan(row).any()
    )


def _softmax_stats(
    z: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """For ``[1, V]`` logits: ``(zs, q, mean, entropy)``.

    ``zs = z - max(z)`` (``-inf`` clamped to a finite floor, so ``q * zs = 0`` for
    masked tokens), ``q = softmax(z)``, ``mean = E_q[zs]`` (``[1, 1]``) and the
    entropy ``log sum exp(zs) - E_q[zs]``.

    The gradient is then formed as ``q * (mean - zs)``, equal to
    ``-q * (log q + H)``. Precision matters here: Adam divides by ``|g|``, so the
    relative error of ``g`` on tokens near the mean shows up in the logits. Raw
    logits near 30 cost ``30 * 2^-24`` of absolute error in ``z - E_q[z]``; shifted
    by the row max the top tokens sit near 0, and flat rows never subtract two
    large numbers (``log q + H`` would, at ``H ~ log V``).
    """
    zs = (z - z.amax(dim=-1, keepdim=True)).clamp_(min=_NEG_BIG)
    q = torch.exp(zs)
    total = q.sum(-1, keepdim=True)
    q.div_(total)
    mean = torch.linalg.vecdot(q, zs).unsqueeze(-1)
    return zs, q, mean, float(torch.log(total) - mean)


def em_inf_(
    logits: torch.Tensor,
    threshold: torch.Tensor,
    kl_weight: torch.Tensor,
    lr: torch.Tensor,
    steps: torch.Tensor,
    *,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """EM-INF in place on ``logits`` (float32 ``[B, V]``), row by row; returns
    ``logits``. Rows whose entropy starts below ``threshold`` (or with
    ``steps == 0``) are not touched at all."""
    counts = _Counts(stats is not None)
    for row, args in enumerate(
        zip(_rows(threshold), _rows(kl_weight), _rows(lr), _rows(steps), strict=True)
    ):
        _em_inf_row_(logits[row : row + 1], *args, counts)
    counts.add_to(stats)
    return logits


def _em_inf_row_(
    z: torch.Tensor,
    threshold: float,
    kl_weight: float,
    lr: float,
    steps: int,
    counts: _Counts,
) -> None:
    """:func:`em_inf_` on one ``[1, V]`` row. Each step is about 14 elementwise
    passes over the row (5 for the softmax statistics, 2-3 for the gradient, 7 for
    Adam, 4 at step 1), arranged to need as few passes and temporaries as possible."""
    steps = int(steps)
    if steps <= 0:
        return
    if _unusable(z):
        counts.row(None, None)
        counts.restored()
        return
    if not bool((z > MASKED_AT).any()):  # nothing to change; entropy counts as 0
        counts.row(0.0, 0.0, below=0.0 < threshold)
        if not 0.0 < threshold:
            counts.work(steps)
        return
    zs, q, mean, ent = _softmax_stats(z)
    h0 = ent
    if ent < threshold:
        counts.row(h0, h0, below=True)
        return
    original = z.clone()
    p0 = q
    beta1, beta2 = ADAM_BETAS
    taken, stopped = 0, False
    for t in range(1, steps + 1):
        if t > 1:
            zs, q, mean, ent = _softmax_stats(z)
            if ent < threshold:
                stopped = True
                break
        taken = t
        # g = -q (log q + H) + lam (q - p0) = q (E_q[zs] - zs) + lam (q - p0).
        # The KL term is kept apart: q - p0 is small (exactly 0 at step 1), and
        # q (lam + ...) - lam p0 would cancel two terms of size lam q.
        grad = zs.neg_().add_(mean).mul_(q)
        if kl_weight != 0 and t > 1:
            grad.add_(torch.sub(q, p0).mul_(kl_weight))
        # Adam, its moments kept scaled (m / (1 - beta1), v / (1 - beta2)):
        #   z -= step m / (sqrt(v) sqrt_bc + eps),
        #   step = lr (1 - beta1) / (1 - beta1^t),
        #   sqrt_bc = sqrt((1 - beta2) / (1 - beta2^t)),
        # both factors 1 at t = 1, where z1 = z - lr g / (|g| + eps) rounds as
        # little as it can: a near-flat row's second step divides by |g1| ~ 1e-4
        # and magnifies every ulp of z1 (lr 5: ulp 4.8e-7) about 1e4 times.
        if t == 1:
            exp_avg, exp_avg_sq = grad, grad * grad
            z.addcdiv_(grad, grad.abs().add_(ADAM_EPS), value=-lr)
        else:
            torch.add(grad, exp_avg, alpha=beta1, out=exp_avg)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad)
            step = lr * (1 - beta1) / (1 - beta1**t)
            sqrt_bc = ((1 - beta2) / (1 - beta2**t)) ** 0.5
            denom = exp_avg_sq.sqrt().mul_(sqrt_bc).add_(ADAM_EPS)
            z.addcdiv_(exp_avg, denom, value=-step)
    if _broken(z, original):  # a NaN or inf on the way spreads to the end
        z.copy_(original)
        counts.row(h0, h0)
        counts.restored()  # its steps are undone, and not counted
        return
    counts.work(taken)
    if counts.wanted and not stopped:  # the entropy after the last step
        ent = _softmax_stats(z)[3]
    counts.row(h0, ent)


def adaptive_temperature_(
    logits: torch.Tensor,
    threshold: torch.Tensor,
    alpha: torch.Tensor,
    t_min: torch.Tensor,
    t_max: torch.Tensor,
    *,
    stats: torch.Tensor | None = None,
    inv_temperature: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adaptive temperature in place on ``logits`` (float32 ``[B, V]``), row by row;
    ``inv_temperature`` (float32 ``[B]``), when given, receives each row's ``1 / T``
    (1 where the row was left as it was).

    Solves ``H(b) = max(threshold, alpha * H0)`` for the inverse temperature ``b``
    in ``[1 / t_max, 1 / t_min]`` to a relative :data:`TEMPERATURE_RTOL`, with
    Newton's method on ``u = log b`` safeguarded by a bracket (a step that leaves it
    is replaced by bisection). ``H`` is non-increasing in ``b`` and
    ``dH/du = -b^2 Var_q(z)``; each pass needs one read of the row for
    ``sum exp(b z)``, ``E_q[z]`` and ``E_q[z^2]``. A target outside the reachable
    range gives the nearer end of the interval. Rows with ``H0 <= threshold`` are
    not touched.

    The reductions run in float64: ``z / T`` puts the temperature's relative error
    on every logit times ``|z / T|`` (hundreds in the tail of a confident row), so
    ``T`` must be exact to ~1e-7, past what float32 sums resolve. Newton converges
    quadratically: a handful of passes per row, against ~20 for bisection to 1e-4
    nats.
    """
    counts = _Counts(stats is not None)
    for row, args in enumerate(
        zip(_rows(threshold), _rows(alpha), _rows(t_min), _rows(t_max), strict=True)
    ):
        inv_t = _adaptive_temperature_row_(logits[row : row + 1], *args, counts)
        if inv_temperature is not None:
            inv_temperature[row] = inv_t
    counts.add_to(stats)
    return logits


def _adaptive_temperature_row_(
    z: torch.Tensor,
    threshold: float,
    alpha: float,
    t_min: float,
    t_max: float,
    counts: _Counts,
) -> float:
    """:func:`adaptive_temperature_` on one ``[1, V]`` row; returns the factor
    ``1 / T`` applied (1 where the row was left as it was)."""
    if _unusable(z):
        counts.row(None, None)
        counts.restored()
        return 1.0
    unmasked = z > MASKED_AT
    if not bool(unmasked.any()):  # entropy 0 <= any threshold
        counts.row(0.0, 0.0, below=True)
        return 1.0
    # In float64: z - max(z) overflows float32 for rows spanning more than its range.
    zs = torch.where(unmasked, z.double() - z.amax().double(), 0.0)

    def entropy_and_slope(b: float) -> tuple[float, float]:
        e = torch.where(unmasked, torch.exp(zs * b), 0.0)
        total = float(e.sum())
        ez = float(torch.linalg.vecdot(e, zs)) / total
        ez2 = float(torch.linalg.vecdot(e, zs * zs)) / total
        return math.log(total) - b * ez, -(b * b) * max(ez2 - ez * ez, 0.0)

    h0, slope = entropy_and_slope(1.0)
    if h0 <= threshold:
        counts.row(h0, h0, below=True)
        return 1.0
    target = max(threshold, alpha * h0)
    best_u, best_ent, passes = _solve_log_inverse_temperature(
        entropy_and_slope, h0, slope, target, t_min, t_max
    )
    inv_t = torch.tensor(math.exp(best_u), dtype=torch.float32, device=z.device)
    # At an end of [t_min, t_max], divide by that temperature: z / T rounds
    # correctly, z times float32(1 / T) can be off by most of an ulp.
    end = {-math.log(t_min): t_min, -math.log(t_max): t_max}.get(best_u)
    if end is None:
        scaled = torch.where(unmasked, z * inv_t, z)
    else:
        divisor = torch.tensor(end, dtype=torch.float32, device=z.device)
        scaled = torch.where(unmasked, z / divisor, z)
    if _broken(scaled, z):
        counts.row(h0, h0)
        counts.restored()  # its passes are not counted
        return 1.0
    counts.work(passes)
    z.copy_(scaled)
    counts.row(h0, best_ent)  # the solver's evaluation at the 1/T applied
    return float(inv_t)


def _solve_log_inverse_temperature(
    entropy_and_slope: Callable[[float], tuple[float, float]],
    h0: float,
    slope: float,
    target: float,
    t_min: float,
    t_max: float,
) -> tuple[float, float, int]:
    """Safeguarded Newton on ``u = log(1 / T)`` over ``[t_min, t_max]`` until the
    entropy is within half of ``TEMPERATURE_RTOL`` of ``target`` (or
    :data:`_TEMPERATURE_MAX_PASSES` passes). ``entropy_and_slope(b)``: the row's
    entropy at ``1 / T = b`` and its derivative in ``u``; ``h0, slope``: those at
    ``b = 1``. Returns the best ``u`` seen, its entropy, and the passes over the
    row (the one at ``b = 1`` included)."""
    lo, hi = sorted((-math.log(t_max), -math.log(t_min)))
    lo_seen = hi_seen = False  # whether lo / hi are evaluated points
    u, ent, passes = 0.0, h0, 1
    if not lo <= u <= hi:  # start at T = 1, or the nearer end
        u = min(max(u, lo), hi)
        ent, slope = entropy_and_slope(math.exp(u))
        passes += 1
    best_err, best_u, best_ent = math.inf, u, ent
    while True:  # H decreases in u: err > 0 means the root lies at a larger u
        err = ent - target
        if abs(err) <= best_err:  # ties: the later point (an end, when H is flat)
            best_err, best_u, best_ent = abs(err), u, ent
        # Half the tolerance: the other half covers this evaluation's rounding.
        if (
            abs(err) <= 0.5 * TEMPERATURE_RTOL * target
            or passes >= _TEMPERATURE_MAX_PASSES
        ):
            break
        if err > 0:
            lo, lo_seen = u, True
        else:
            hi, hi_seen = u, True
        if hi - lo <= 1e-12 * max(1.0, abs(u)):  # pinned at an end of the interval
            break
        step = u - err / slope if slope else math.nan
        if lo < step < hi:
            u = step
        elif err > 0 and not hi_seen:
            u = hi  # try the end it points to, once
        elif err < 0 and not lo_seen:
            u = lo
        else:
            u = (lo + hi) / 2
        ent, slope = entropy_and_slope(math.exp(u))
        passes += 1
    return best_u, best_ent, passes
