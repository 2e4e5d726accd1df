"""Bitwise batch invariance of the kernels, under Triton's interpreter: a row's
output bits do not depend on the other rows of its batch or on the batch size.

The temperature kernel is invariant always (one program per row, a block set by V).
The logits kernel's fast plan picks its block from the batch size, so it is
invariant when ``em_inf.backend.batch_invariant()`` is on (``EM_INF_BATCH_INVARIANT``
or ``VLLM_BATCH_INVARIANT``), which fixes the block by V. Runs in its own process
(see tests/kernel_helpers.py).
"""

from __future__ import annotations

from tests import kernel_helpers
from tests.kernel_helpers import (
    oracle_rows,
    slot_settings,
)

kernel_helpers.require_interpreter()

import pytest  # noqa: E402
import torch  # noqa: E402

from em_inf.config import PRESETS  # noqa: E402
from em_inf.kernels import em_inf_rows_  # noqa: E402
from em_inf.kernels._common import INVARIANT_BLOCK, plan_block  # noqa: E402
from em_inf.kernels.step import StepRunner  # noqa: E402
from tests.inputs import random_logits  # noqa: E402
from tests.oracle import assert_matches  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned_empty", "quiet_interpreter")

CPU = torch.device("cpu")
VOCAB = 5_000  # 3 chunks of the invariant block; the fast plan varies 1024-4096
#: One slot per setting: both modes, early stops, KL on and off, and one slot off.
CONFIGS = [
    PRESETS["default"],
    PRESETS["math"].replace(steps=2),
    PRESETS["default"].replace(threshold=0.0, kl_weight=0.0, lr=0.2),
    PRESETS["physics"].replace(threshold=2.5),
    PRESETS["adaptive-temperature"],
    PRESETS["adaptive-temperature"].replace(alpha=0.5, threshold=1.0),
    None,
]


def _pool(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten rows with a slot each: varied scales, ``-inf`` and ``finfo.min`` masks."""
    seeds = torch.randint(0, 2**31, (10,), generator=generator).tolist()
    logits = torch.cat(
        [
            random_logits(
                1, VOCAB, scale=1 + i, generator=torch.Generator().manual_seed(s)
            )
            for i, s in enumerate(seeds)
        ]
    )
    masks = torch.rand(logits.shape, generator=generator) < 0.2
    masks[:, 0] = False
    logits[:4][masks[:4]] = -torch.inf
    logits[4:7][masks[4:7]] = torch.finfo(torch.float32).min
    slots = torch.arange(10) % len(CONFIGS)
    return logits, slots


def _step(runner, logits, row_slot, settings, max_steps=4):
    out = logits.clone()
    runner.run(out, row_slot, max_steps, True, settings.tables(CPU), None)
    return out


def test_invariant_plan_depends_on_the_vocabulary_alone():
    blocks = {plan_block(rows, VOCAB, CPU, True) for rows in (1, 2, 7, 64, 1024)}
    assert blocks == {INVARIANT_BLOCK}
    fast = {plan_block(rows, VOCAB, CPU) for rows in (1, 2, 7, 64, 1024)}
    assert len(fast) > 1  # the fast plan does depend on the batch


@pytest.mark.parametrize("graphs", [False, True])
def test_each_row_alone_and_in_random_batches_is_bitwise_identical(
    monkeypatch, generator, graphs
):
    """Every row of random batches (1 to 64 rows drawn from the pool with
    repeats, in random order, both modes and an opted-out slot) against the same
    row processed alone; the alone results against the float64 oracle."""
    monkeypatch.setenv("EM_INF_BATCH_INVARIANT", "1")
    settings = slot_settings(CONFIGS)
    runner = StepRunner(CPU, graphs=graphs)
    logits, slots = _pool(generator)
    alone = torch.cat(
        [
            _step(runner, logits[i : i + 1], slots[i : i + 1], settings)
            for i in range(10)
        ]
    )
    assert_matches(
        kernel_helpers.restored_masks(alone, logits),
        oracle_rows(logits, slots.tolist(), CONFIGS),
    )
    # Graphs: 33 to 63 rows fill a bucket of 64 with padding rows.
    sizes = [int(torch.randint(1, 9, (), generator=generator))]
    sizes += [int(torch.randint(33, 64, (), generator=generator))] if graphs else [64]
    for size in sizes:
        pick = torch.randint(0, 10, (size,), generator=generator)
        batch = _step(runner, logits[pick], slots[pick], settings)
        for row, source in enumerate(pick.tolist()):
            assert torch.equal(batch[row], alone[source]), (size, row, source)


def test_logits_kernel_public_entry_is_invariant_in_invariant_mode(
    monkeypatch, generator
):
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    logits, _ = _pool(generator)
    params = {
        "threshold": torch.tensor([0.3, 0.0, 1.0]),
        "kl_weight": torch.tensor([0.05, 0.0, 0.01]),
        "lr": torch.tensor([0.1, 0.2, 0.05]),
        "steps": torch.tensor([3, 2, 4], dtype=torch.int32),
    }
    slots = torch.arange(10, dtype=torch.int32) % 3

    def run(rows):
        out = logits[rows].clone()
        em_inf_rows_(out, slots[rows], **params, max_steps=4)
        return out

    alone = torch.cat([run([i]) for i in range(10)])
    pick = torch.randint(0, 10, (24,), generator=generator)
    batch = run(pick)
    for row, source in enumerate(pick.tolist()):
        assert torch.equal(batch[row], alone[source]), (row, source)


def test_temperature_rows_are_invariant_in_the_fast_plan_too(monkeypatch, generator):
    monkeypatch.delenv("EM_INF_BATCH_INVARIANT", raising=False)
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    temperature_only = [PRESETS["adaptive-temperature"], CONFIGS[5]]
    settings = slot_settings(temperature_only)
    runner = StepRunner(CPU, graphs=False)
    logits, slots = _pool(generator)
    slots = slots % 2
    alone = torch.cat(
        [
            _step(runner, logits[i : i + 1], slots[i : i + 1], settings, 0)
            for i in range(10)
        ]
    )
    pick = torch.randint(0, 10, (17,), generator=generator)
    batch = _step(runner, logits[pick], slots[pick], settings, 0)
    for row, source in enumerate(pick.tolist()):
        assert torch.equal(batch[row], alone[source]), (row, source)
