"""Shared by the kernel test modules (``tests/test_kernels*.py``), which run under
Triton's interpreter in a pytest process of their own (Makefile): importing this
module switches the interpreter on, so import it before anything imports Triton.

Their fixtures (``poisoned_empty``, ``quiet_interpreter``) are in
``tests/conftest.py``.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before em_inf.kernels imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from em_inf.config import EMInfConfig  # noqa: E402
from em_inf.core import SlotSettings  # noqa: E402
from em_inf.reference import settings_oracle  # noqa: E402

#: Values at or below this count as masked in every path.
MASK_LEVEL = -1e37


def require_interpreter() -> None:
    """Skip the calling module when the kernels were compiled without the
    interpreter (another module imported them first in this process)."""
    from em_inf.kernels import logits_mode

    if not type(logits_mode._em_inf_pass_kernel).__name__.startswith("Interpreted"):
        pytest.skip(
            "em_inf.kernels was imported before TRITON_INTERPRET=1 was set; run "
            "tests/test_kernels*.py in their own pytest process",
            allow_module_level=True,
        )


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
