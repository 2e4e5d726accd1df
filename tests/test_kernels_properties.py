"""The properties of ``tests/test_properties.py`` on the Triton kernels, on CPU.

``em_inf.functional`` dispatches to the kernels with ``EM_INF_BACKEND=triton``; on
CPU tensors they run under Triton's interpreter, which must be on before the kernels
are first imported, so this module runs in the kernels' own pytest process (see the
Makefile's ``test``) and fails at import without it
(``kernel_helpers.require_interpreter``). The tests are imported from
``tests/test_properties.py``, which gives them a smaller example budget under the
interpreter. Batch invariance
is checked with ``EM_INF_BATCH_INVARIANT=1``: the kernels' fast plan may depend on
the batch size, and only that switch promises bits independent of it.
"""

from __future__ import annotations

from tests import kernel_helpers

kernel_helpers.require_interpreter()

import pytest  # noqa: E402

from tests.test_properties import (  # noqa: E402, F401  (collected here too)
    test_a_rows_result_does_not_depend_on_its_batch,
    test_finite_wherever_the_input_was_finite,
    test_masked_entries_keep_their_exact_input_value,
    test_rows_holding_nan_or_inf_come_back_as_they_went_in,
    test_rows_left_alone_come_back_bit_identical,
    test_vocabulary_extremes_at_the_edges_of_the_ranges,
    test_within_the_oracle_standard_where_float32_resolves_the_row,
)

# The interpreter evaluates both sides of tl.where with numpy, so hostile logits
# make numpy warn about overflow in lanes whose value is discarded; the properties
# themselves catch any NaN or infinity that reaches the output.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def on_the_kernels(request, monkeypatch):
    """Every test here runs ``em_inf.functional`` on the kernels."""
    monkeypatch.setenv("EM_INF_BACKEND", "triton")
    if request.function is test_a_rows_result_does_not_depend_on_its_batch:
        monkeypatch.setenv("EM_INF_BATCH_INVARIANT", "1")
