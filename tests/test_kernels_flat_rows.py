"""``tests/test_flat_rows.py`` on the Triton kernels, under the interpreter (in the
kernels' own pytest process, like ``tests/test_kernels_properties.py``).

The property test is expected to fail until kernels/logits_mode.py changes two
things in its Adam replay (per-row scalars, and one subtraction reordered). Measured
on a patched copy over 1,000 seeded near-flat rows: TV p99 4.6e-4 -> 7.7e-5, max
0.16 -> 0.067, rows beyond the bound of tests/test_flat_rows.py 180 -> 0.

1. Bias corrections: ``1 - beta2^t`` is formed in float32 from ``beta2^t``
   (0.998 at t = 2), losing ~1e-5 of itself; every logit's step then carries that
   relative error (TV ~1e-6 on rows the loop gets to 1e-8). With
   ``geo = 1 + b + ... + b^(t-1)`` (``geo = geo * b + 1``, positive terms):
   ``lr a_t = lr / geo1`` and ``c_t = 1 / sqrt(geo2)``.
2. ``E_q[z] - z`` from raw logits: ``(shift_j + mean_y_j) - b_z`` rounds
   ``E_q[z]`` to the ulp of the row's max (1.9e-6 at 30), which Adam's ``|g| + eps``
   magnifies up to ``lr / eps`` on tokens near the mean. With
   ``b_y = b_z - shift_j`` (exact on near-flat rows):
   ``q = exp2((b_y - log_s_j) log2 e)`` and ``g = q (mean_y_j - b_y)``, at step 1
   and in the replayed steps.
"""

from __future__ import annotations

from tests import kernel_helpers

kernel_helpers.require_interpreter()

import pytest  # noqa: E402

from tests import test_flat_rows  # noqa: E402

# The interpreter evaluates both sides of tl.where with numpy (see
# tests/test_kernels_properties.py).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

TRITON_REASON = (
    "kernels/logits_mode.py: 1 - beta2^t in float32 and E_q[z] - z from raw logits "
    "(this module's docstring has the change)"
)


@pytest.mark.xfail(strict=True, reason=TRITON_REASON)
def test_no_further_from_the_oracle_than_float32_allows():
    test_flat_rows.test_no_further_from_the_oracle_than_float32_allows(path="triton")


def test_item_7_settings(seed: int):
    # Holds on the rows this test id draws; other draws find rows beyond the bound
    # (seed 502: TV 2.8e-4 against a bound of 2.2e-4), which the change removes.
    test_flat_rows.test_item_7_settings(path="triton", seed=seed)
