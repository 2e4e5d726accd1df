"""Shared by the kernel test modules (``tests/test_kernels*.py``), which run under
Triton's interpreter in a pytest process of their own (Makefile:
``TRITON_INTERPRET=1 python -m pytest tests/test_kernels*.py``). Each module calls
:func:`require_interpreter` before anything else: it fails the module (not a skip)
unless the kernels really run under the interpreter in this process.

Their fixtures (``poisoned_empty``, ``quiet_interpreter``) are in
``tests/conftest.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from em_inf.config import EMInfConfig
from em_inf.core import SlotSettings
from em_inf.reference import settings_oracle

#: Values at or below this count as masked in every path.
MASK_LEVEL = -1e37


#: The command that runs the kernels' tests.
INTERPRETER_COMMAND = "TRITON_INTERPRET=1 python -m pytest tests/test_kernels*.py"


def require_interpreter() -> None:
    """Fail the calling module (at import: a collection error, never a skip) unless
    the Triton kernels run under the interpreter here.

    Two checks, neither on Triton's private names: ``TRITON_INTERPRET=1`` was in
    the environment (Triton reads it when the kernels are defined), and a kernel
    really runs on CPU tensors and matches the float64 oracle. A kernel compiled
    for a GPU cannot take CPU tensors, so a process that imported
    ``em_inf.kernels`` before the variable was set fails the second check.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail(
            f"the kernels' tests need Triton's interpreter: {INTERPRETER_COMMAND}",
            pytrace=False,
        )
    from em_inf.kernels import em_inf_rows_

    config = EMInfConfig(threshold=0.1, kl_weight=0.05, lr=0.1, steps=2)
    logits = torch.linspace(-2.0, 2.0, 64).reshape(2, 32).contiguous()
    expected = settings_oracle(logits, config)
    out = logits.clone()
    try:
        em_inf_rows_(
            out,
            torch.zeros(2, dtype=torch.int64),
            torch.tensor([config.threshold], dtype=torch.float32),
            torch.tensor([config.kl_weight], dtype=torch.float32),
            torch.tensor([config.lr], dtype=torch.float32),
            torch.tensor([config.steps], dtype=torch.int64),
        )
    except Exception as error:  # noqa: BLE001  (any failure means: not interpreted)
        pytest.fail(
            "the Triton kernels do not run on CPU tensors in this process "
            f"({type(error).__name__}: {error}); they were compiled without the "
            f"interpreter (em_inf.kernels imported before TRITON_INTERPRET=1 was "
            f"set?). Run: {INTERPRETER_COMMAND}",
            pytrace=False,
        )
    from em_inf.reference import mismatch

    problem = mismatch(out, expected)
    if problem is not None:
        pytest.fail(f"the interpreted kernel disagrees with the oracle: {problem}")


def slot_settings(configs: list[EMInfConfig | None]) -> SlotSettings:
    """Per-slot settings (slot ``i`` gets ``configs[i]``), bound to the CPU."""
    settings = SlotSettings(len(configs), torch.device("cpu"))
    for slot, config in enumerate(configs):
        settings.set(slot, config)
    return settings


def oracle_rows(logits: torch.Tensor, row_slots, configs) -> torch.Tensor:
    """The float64 oracle of each row under its slot's settings (slot -1 or
    ``None``: the row as it is); masked values (<= -1e37) as ``-inf``."""
    masked = logits.masked_fill(logits <= MASK_LEVEL, -torch.inf)
    per_row = [None if s < 0 else configs[s] for s in list(row_slots)]
    return settings_oracle(masked, per_row)


def restored_masks(out: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``out`` with masked entries as ``-inf``, after checking they kept their
    input value exactly."""
    masked = logits <= MASK_LEVEL
    assert torch.equal(out[masked], logits[masked]), "a masked entry changed"
    return out.masked_fill(masked, -torch.inf)
