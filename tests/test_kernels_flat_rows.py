"""``tests/test_flat_rows.py`` on the Triton kernels, under the interpreter (in the
kernels' own pytest process, like ``tests/test_kernels_properties.py``).

Two things in the kernel's Adam replay keep it there (kernels/logits_mode.py,
``_replay_adam_steps``); without them, over 1,000 seeded near-flat rows, TV p99 was
4.6e-4 (7.7e-5 with), max 0.16 (0.067), rows beyond the bound of
tests/test_flat_rows.py 180 (0):

1. Bias corrections from geometric sums: ``1 - beta2^t`` formed in float32 from
   ``beta2^t`` (0.998 at t = 2) loses ~1e-5 of itself, and every logit's step
   carries that relative error. ``geo = 1 + b + ... + b^(t-1)`` (positive terms)
   gives ``lr a_t = lr / geo1`` and ``c_t = 1 / sqrt(geo2)``.
2. ``E_q[z] - z`` on shifted logits: ``(shift_j + mean_y_j) - b_z`` rounds
   ``E_q[z]`` to the ulp of the row's max (1.9e-6 at 30), which Adam's
   ``|g| + eps`` magnifies up to ``lr / eps`` on tokens near the mean;
   ``b_y = b_z - shift_j`` is exact on near-flat rows.
"""

from __future__ import annotations

from tests import kernel_helpers

kernel_helpers.require_interpreter()

import pytest  # noqa: E402

from tests import test_flat_rows  # noqa: E402

# The interpreter evaluates both sides of tl.where with numpy (see
# tests/test_kernels_properties.py).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_no_further_from_the_oracle_than_float32_allows():
    test_flat_rows.test_no_further_from_the_oracle_than_float32_allows(path="triton")


def test_item_7_settings(seed: int):
    test_flat_rows.test_item_7_settings(path="triton", seed=seed)
