"""Shared by the kernel test modules (``tests/test_kernels*.py``), which run under
Triton's interpreter in a pytest process of their own (Makefile:
``TRITON_INTERPRET=1 python -m pytest tests/test_kernels*.py``), and by the GPU
tests (``tests/test_gpu.py``). Each kernel module calls :func:`require_interpreter`
before anything else: it fails the module (not a skip) unless the kernels really
run under the interpreter in this process.

Their fixtures (``poisoned_empty``, ``quiet_interpreter``) are in
``tests/conftest.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from em_inf.config import TEMPERATURE_RTOL, EMInfConfig
from em_inf.core import SlotSettings
from em_inf.reference import entropy, settings_oracle

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


def oracle_by_slot(oracle, logits, row_slot, params) -> torch.Tensor:
    """The float64 oracle (``em_inf_oracle`` or ``adaptive_temperature_oracle``) of
    every row with a slot, with that slot's entries of the per-slot ``params``
    (``[S]`` tensors; ``steps`` integer); slot -1 rows as they are. ``logits``:
    float32 ``[B, V]`` on any device, masked values (<= -1e37) taken as ``-inf``;
    ``row_slot``: integer ``[B]``. Returns float64 ``[B, V]`` on the CPU."""
    expected = logits.masked_fill(logits <= MASK_LEVEL, -torch.inf).double().cpu()
    for row, slot in enumerate(row_slot.tolist()):
        if slot >= 0:
            row_params = {
                k: (int(v[slot]) if k == "steps" else v[slot].item())
                for k, v in params.items()
            }
            expected[row] = oracle(expected[row : row + 1], **row_params)[0]
    return expected


def assert_temperature_tolerance(logits, out, row_slot, params) -> int:
    """``|H(z / T) - target| <= TEMPERATURE_RTOL * target`` in float64 for the T the
    temperature kernel applied to each row, up to what a float32 T resolves (one ulp
    of T moves H by ``|dH/du| 2^-23``). ``logits`` / ``out``: float32 ``[B, V]``
    before / after the kernel (any device, masks allowed); ``row_slot``: integer
    ``[B]``; ``params``: the kernel's per-slot ``[S]`` tensors. Rows without a slot,
    already below their threshold, or pinned at ``t_min`` / ``t_max`` (the target
    out of reach: not a root) are skipped. Returns how many rows were checked."""
    z = logits.masked_fill(logits <= MASK_LEVEL, -torch.inf).double().cpu()
    applied = out.double().cpu()
    solved = 0
    for row, slot in enumerate(row_slot.tolist()):
        if slot < 0:
            continue
        h0 = entropy(z[row]).item()
        threshold = params["threshold"][slot].item()
        if h0 <= threshold:
            continue
        target = max(threshold, params["alpha"][slot].item() * h0)
        top = z[row].abs().nan_to_num(posinf=0.0).argmax()
        b = (applied[row, top] / z[row, top]).item()
        t_min, t_max = params["t_min"][slot].item(), params["t_max"][slot].item()
        if not t_min * (1 + 1e-6) < 1 / b < t_max * (1 - 1e-6):
            continue
        finite = torch.isfinite(z[row])
        q = torch.softmax(z[row] * b, -1)[finite]
        zf = z[row][finite]
        slope = b * b * ((q * zf * zf).sum() - (q * zf).sum() ** 2).item()
        reached = entropy(z[row] * b).item()
        allowed = TEMPERATURE_RTOL * target + slope * 2.0**-23
        assert abs(reached - target) <= allowed, (row, reached, target, allowed)
        solved += 1
    return solved
