"""The float64 oracle and the agreement standard every fast path is held to.

Standard (per row): total-variation distance between the two sampling
distributions <= 1e-5, every finite logit within 5e-3, ``-inf`` exactly where the
oracle has it, no NaN anywhere.
"""

from __future__ import annotations

import torch

from em_inf import reference

TV_TOL = 1e-5
LOGIT_TOL = 5e-3


def _row_param(value, i):
    return value[i].item() if isinstance(value, torch.Tensor) else value


def em_inf_oracle(logits: torch.Tensor, **params) -> torch.Tensor:
    """``reference.em_inf_row`` in float64 on each row of ``[B, V]`` logits."""
    return torch.stack(
        [
            reference.em_inf_row(
                row.double(), **{k: _row_param(v, i) for k, v in params.items()}
            )
            for i, row in enumerate(logits)
        ]
    )


def adaptive_temperature_oracle(logits: torch.Tensor, **params) -> torch.Tensor:
    """The bisection of ``reference.adaptive_temperature_row`` in float64, run to
    a tight tolerance (the authors stop at 0.1 nats) so it pins the exact root."""
    return torch.stack(
        [
            reference.adaptive_temperature_row(
                row.double(),
                **{k: _row_param(v, i) for k, v in params.items()},
                max_iter=200,
                tol=1e-9,
            )
            for i, row in enumerate(logits)
        ]
    )


def assert_matches(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    tv_tol: float = TV_TOL,
    logit_tol: float = LOGIT_TOL,
) -> None:
    """Check ``actual`` (float32 ``[B, V]``) against the float64 oracle, every row."""
    assert actual.shape == expected.shape
    assert actual.dtype == torch.float32
    assert not torch.isnan(actual).any(), "NaN in output"
    same_inf = torch.isneginf(actual) == torch.isneginf(expected)
    assert same_inf.all(), f"-inf differs at {same_inf.logical_not().nonzero()[:5]}"
    finite = torch.isfinite(expected)
    err = torch.where(finite, (actual.double() - expected).abs(), 0.0)
    worst = err.amax(dim=-1)
    bad = (worst > logit_tol).nonzero().flatten()
    assert bad.numel() == 0, (
        f"rows {bad.tolist()[:5]}: logit error {worst[bad].tolist()[:5]} > {logit_tol}"
    )
    tv = 0.5 * (
        torch.softmax(actual.double(), -1) - torch.softmax(expected, -1)
    ).abs().sum(-1)
    bad = (tv > tv_tol).nonzero().flatten()
    assert bad.numel() == 0, f"rows {bad.tolist()[:5]}: TV {tv[bad].tolist()[:5]}"


def settings_oracle(logits: torch.Tensor, settings) -> torch.Tensor:
    """The float64 oracle of ``[B, V]`` logits under EM-INF settings per row.

    Args:
        settings: one ``EMInfConfig`` (or ``None``: EM-INF off) for every row, or a
            sequence with one of them per row.
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
