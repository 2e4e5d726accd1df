"""The agreement standard as a test assertion (the oracle itself, the tolerances and
the comparison live in :mod:`em_inf.reference`)."""

from __future__ import annotations

import torch

from em_inf.reference import (  # noqa: F401  (re-exported for the tests)
    LOGIT_TOL,
    TV_TOL,
    adaptive_temperature_oracle,
    em_inf_oracle,
    mismatch,
    settings_oracle,
)


def assert_matches(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    tv_tol: float = TV_TOL,
    logit_tol: float = LOGIT_TOL,
) -> None:
    """Check ``actual`` (float32 ``[B, V]``) against the float64 oracle, every row."""
    problem = mismatch(actual, expected, tv_tol=tv_tol, logit_tol=logit_tol)
    assert problem is None, problem
