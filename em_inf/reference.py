"""The authors' per-row algorithms, written the slow, obvious way: the test oracle and
the benchmark baseline. Nothing here is batched or fused, on purpose.

* :func:`em_inf_row`: EM-INF on one row of logits with autograd and
  ``torch.optim.Adam``, the loss ``H(q) + kl_weight * KL(p0 || q)``, the threshold
  checked before each step (the paper's loop).
* :func:`adaptive_temperature_row`: the paper's Algorithm 1, a bisection on the
  temperature.
* :func:`em_inf_oracle`, :func:`adaptive_temperature_oracle`,
  :func:`settings_oracle`: both, row by row in float64, on a ``[B, V]`` batch with
  per-row parameters or settings: the ground truth tests and
  benchmarks compare against, with :func:`mismatch` and the agreement standard
  (:data:`TV_TOL`, :data:`LOGIT_TOL`).

Both take a 1-D tensor and compute in its dtype (pass float64 for an oracle). One
deliberate difference from the published loop: it turns tokens masked to ``-inf``
into NaN (``0 * log 0`` in its KL term); here the loop runs on the row's finite
entries only and masked entries stay ``-inf``, which is what the published loop
computes for every finite entry.
"""

from __future__ import annotations

from typing import Any

import torch


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits)`` over the last dim; ``-inf``-safe."""
    logq = torch.log_softmax(logits, dim=-1)
    return -(logq.exp() * logq.masked_fill(logq == -torch.inf, 0.0)).sum(-1)


def em_inf_row(
    logits: torch.Tensor,
    *,
    threshold: float,
    kl_weight: float,
    lr: float,
    steps: int,
) -> torch.Tensor:
    """EM-INF on one row, as published.

    Args:
        logits: ``[V]`` floating tensor, raw (unscaled) logits; ``-inf`` = masked.

    Returns:
        ``[V]`` tensor of the same dtype: the optimised logits, or an unchanged copy
        when the row's entropy is already below ``threshold``.
    """
    out = logits.detach().clone()
    finite = torch.isfinite(out)
    z0 = out[finite]
    z = z0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)  # betas and eps: its own defaults
    p0 = torch.softmax(z0, dim=-1)
    log_p0 = torch.log_softmax(z0, dim=-1)
    with torch.enable_grad():
        for _ in range(steps):
            log_q = torch.log_softmax(z, dim=-1)
            q = log_q.exp()
            ent = -(q * log_q).sum()
            if ent.item() < threshold:
                break
            kl = (p0 * (log_p0 - log_q)).sum()
            loss = ent + kl_weight * kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    out[finite] = z.detach()
    return out


def adaptive_temperature_row(
    logits: torch.Tensor,
    *,
    threshold: float,
    alpha: float,
    t_min: float,
    t_max: float,
    max_iter: int = 100,
    tol: float = 0.1,
) -> torch.Tensor:
    """Algorithm 1 on one row: bisect ``T`` in ``[t_min, t_max]`` until
    ``|H(softmax(z / T)) - max(threshold, alpha * H0)| < tol``.

    The authors use ``max_iter=100, tol=0.1``; a test oracle passes a tiny ``tol``.

    Args:
        logits: ``[V]`` floating tensor, raw logits; ``-inf`` = masked.

    Returns:
        ``[V]`` tensor ``logits / T``, or an unchanged copy when ``H0 <= threshold``.
    """
    z = logits.detach().clone()
    h0 = entropy(z).item()
    if h0 <= threshold:
        return z
    target = max(threshold, alpha * h0)
    lo, hi = t_min, t_max
    temp = (lo + hi) / 2
    for _ in range(max_iter):
        temp = (lo + hi) / 2
        ent = entropy(z / temp).item()
        if abs(ent - target) < tol:
            break
        if ent > target:
            hi = temp
        else:
            lo = temp
    return z / temp


# -- the oracle on a batch, and the standard fast paths are held to ----------------

#: Agreement standard, per row: total-variation distance between the sampling
#: distributions (softmax of the logits) at most ``TV_TOL``, every finite logit
#: within ``LOGIT_TOL`` of the oracle's, ``-inf`` exactly where the oracle has it,
#: no NaN.
TV_TOL = 1e-5
LOGIT_TOL = 5e-3


def _row_value(value: float | torch.Tensor, row: int) -> float:
    return value[row].item() if isinstance(value, torch.Tensor) else value


def em_inf_oracle(logits: torch.Tensor, **params: float | torch.Tensor) -> torch.Tensor:
    """:func:`em_inf_row` in float64 on each row of ``[B, V]`` ``logits``.

    Args:
        params: ``threshold``, ``kl_weight``, ``lr``, ``steps``: numbers or ``[B]``
            tensors (one value per row).

    Returns:
        float64 ``[B, V]``.
    """
    return torch.stack(
        [
            em_inf_row(row.double(), **{k: _row_value(v, i) for k, v in params.items()})
            for i, row in enumerate(logits)
        ]
    )


def adaptive_temperature_oracle(
    logits: torch.Tensor, **params: float | torch.Tensor
) -> torch.Tensor:
    """:func:`adaptive_temperature_row` in float64 on each row of ``[B, V]``
    ``logits``, bisected to a tight tolerance (the authors stop at 0.1 nats) so it
    pins the exact root.

    Args:
        params: ``threshold``, ``alpha``, ``t_min``, ``t_max``: numbers or ``[B]``
            tensors.

    Returns:
        float64 ``[B, V]``.
    """
    return torch.stack(
        [
            adaptive_temperature_row(
                row.double(),
                **{k: _row_value(v, i) for k, v in params.items()},
                max_iter=200,
                tol=1e-9,
            )
            for i, row in enumerate(logits)
        ]
    )


def settings_oracle(logits: torch.Tensor, settings: Any) -> torch.Tensor:
    """The float64 oracle of ``[B, V]`` logits under EM-INF settings, per row.

    Args:
        settings: one :class:`~em_inf.config.EMInfConfig` (``None``: EM-INF off,
            the row comes back as it is) for every row, or a sequence with one per
            row; each row takes the oracle of its settings' ``mode``.

    Returns:
        float64 ``[B, V]``.
    """
    if settings is None or not isinstance(settings, list | tuple):
        settings = [settings] * logits.shape[0]
    rows = []
    for row, config in zip(logits, settings, strict=True):
        row = row.unsqueeze(0)
        if config is None:
            rows.append(row.double())
        elif config.mode == "temperature":
            rows.append(
                adaptive_temperature_oracle(
                    row,
                    threshold=config.threshold,
                    alpha=config.alpha,
                    t_min=config.t_min,
                    t_max=config.t_max,
                )
            )
        else:
            rows.append(
                em_inf_oracle(
                    row,
                    threshold=config.threshold,
                    kl_weight=config.kl_weight,
                    lr=config.lr,
                    steps=config.steps,
                )
            )
    return torch.cat(rows)


def mismatch(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    tv_tol: float = TV_TOL,
    logit_tol: float = LOGIT_TOL,
) -> str | None:
    """How ``actual`` (float32 ``[B, V]``) breaks the agreement standard against the
    float64 oracle's ``expected``, naming the first rows; ``None`` where it holds."""
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.dtype != torch.float32:
        return f"dtype {actual.dtype}, expected torch.float32"
    if torch.isnan(actual).any():
        return f"NaN in rows {torch.isnan(actual).any(-1).nonzero().flatten()[:5]}"
    same_inf = torch.isneginf(actual) == torch.isneginf(expected)
    if not same_inf.all():
        return f"-inf differs at {same_inf.logical_not().nonzero()[:5].tolist()}"
    finite = torch.isfinite(expected)
    err = torch.where(finite, (actual.double() - expected).abs(), 0.0)
    worst = err.amax(dim=-1)
    bad = (worst > logit_tol).nonzero().flatten()
    if bad.numel():
        return (
            f"rows {bad.tolist()[:5]}: logit error {worst[bad].tolist()[:5]} "
            f"> {logit_tol}"
        )
    tv = 0.5 * (
        torch.softmax(actual.double(), -1) - torch.softmax(expected.double(), -1)
    ).abs().sum(-1)
    bad = (tv > tv_tol).nonzero().flatten()
    if bad.numel():
        return f"rows {bad.tolist()[:5]}: TV {tv[bad].tolist()[:5]} > {tv_tol}"
    return None
