"""The Triton kernels' path on a GPU, against the float64 oracle (``gpu`` marker).

On a GPU machine (torch, Triton, numpy and pytest; no vLLM needed), from the
checkout's root::

    python -m pytest -m gpu tests/test_gpu.py

(the file is named because the other test modules import vLLM). Timing and the
sync audit are ``python -m bench.gpu_check``'s, not these tests'.

At V = 151,936 (the per-row TV <= 1e-5, finite logits within 5e-3 standard of
:func:`em_inf.reference.mismatch`): both kernels with rows mapped to per-slot
parameters out of order, a slot -1 row, a row below the threshold, ``-inf`` and
``finfo.min`` masks, the temperature mode's entropy tolerance; the fail-safe and
the ``stats`` counts; the accepted maxima (100 steps, lr 100, kl_weight 1000) on
hostile rows; the processor's step replayed as CUDA graphs against eager launches
(bitwise) and the oracle; batch invariance; :mod:`em_inf.functional` dispatching
to the kernels.

Without CUDA every test is skipped, naming the command above. Under Triton's
interpreter (``TRITON_INTERPRET=1``, in a process of its own) they run on CPU
tensors at small shapes instead: a rehearsal of the tests themselves, whose
results say nothing about a GPU.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from em_inf import backend, counters, functional
from em_inf_support import gpu_steps
from tests.inputs import mask_randomly, random_logits
from tests.kernel_helpers import (
    assert_temperature_tolerance,
    oracle_by_slot,
    restored_masks,
)
from tests.oracle import (
    adaptive_temperature_oracle,
    assert_matches,
    em_inf_oracle,
    settings_oracle,
)

CUDA = torch.cuda.is_available()
#: Without CUDA, Triton's interpreter runs the tests on CPU tensors (small shapes).
REHEARSAL = not CUDA and os.environ.get("TRITON_INTERPRET") == "1"
GPU_COMMAND = "python -m pytest -m gpu tests/test_gpu.py"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (CUDA or REHEARSAL),
        reason=f"no CUDA GPU here; on a GPU machine: {GPU_COMMAND}",
    ),
]

QWEN_VOCAB = 151_936
#: The vocabulary of the kernel, fail-safe and functional checks.
VOCAB = QWEN_VOCAB if CUDA else 4_099
#: The processor-step check's vocabulary (12 rows).
STEP_VOCAB = QWEN_VOCAB if CUDA else 2_000
#: The batch-invariance check's vocabulary (16 rows, batches of up to 64).
INVARIANCE_VOCAB = 8_192 if CUDA else 4_099
#: Rows of the kernel checks.
ROWS = 8 if CUDA else 4
F32 = torch.finfo(torch.float32)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(autouse=True)
def on_the_kernels(monkeypatch, device):
    """The Triton kernels for every path (CUDA takes them by default, CPU tensors
    only when forced) and the fast plan unless a test asks for the invariant one;
    under the interpreter, numpy's warnings off (it computes both sides of every
    select)."""
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    for name in backend.BATCH_INVARIANT_ENVS:
        monkeypatch.delenv(name, raising=False)
    if not CUDA:
        monkeypatch.setenv(backend.BACKEND_ENV, "triton")
    assert backend.backend_for(device) == "triton"
    with np.errstate(all="ignore"):
        yield


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two float32 tensors hold the same bits."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _per_slot(device, **columns) -> dict[str, torch.Tensor]:
    """Per-slot ``[S]`` parameter tensors on ``device`` (``steps`` int32)."""
    return {
        name: torch.as_tensor(
            values, dtype=torch.int32 if name == "steps" else torch.float32
        ).to(device)
        for name, values in columns.items()
    }


@pytest.fixture
def masked_batch(device, generator):
    """``ROWS`` rows of ``VOCAB`` float32 logits with ``-inf`` (5%) and
    ``finfo.min`` (2%) masks, row ``ROWS // 2`` confident (below every threshold);
    rows read ``ROWS + 1`` slots out of order, the last row slot -1. Returns the
    logits, the int32 ``[ROWS]`` mapping and the slot count."""
    logits = random_logits(ROWS, VOCAB, generator=generator).to(device)
    logits = mask_randomly(logits, 0.05, generator=generator)
    logits = mask_randomly(logits, 0.02, generator=generator, value=F32.min)
    logits[ROWS // 2, 11] = 80.0
    slots = ROWS + 1
    row_slot = torch.randperm(slots, generator=generator)[:ROWS]
    row_slot[-1] = -1
    return logits, row_slot.to(device, torch.int32), slots


@pytest.mark.parametrize("steps", [3, 5])
def test_logits_kernel_per_slot_parameters_and_masks(masked_batch, generator, steps):
    from em_inf.kernels import em_inf_rows_

    logits, row_slot, slots = masked_batch
    params = _per_slot(
        logits.device,
        threshold=torch.rand(slots, generator=generator) * 0.5,
        kl_weight=torch.rand(slots, generator=generator) * 0.05,
        lr=torch.rand(slots, generator=generator) * 0.1 + 0.05,
        steps=[steps] * slots,
    )
    out = logits.clone()
    em_inf_rows_(out, row_slot, **params, max_steps=steps)
    expected = oracle_by_slot(em_inf_oracle, logits, row_slot, params)
    assert_matches(restored_masks(out, logits).cpu(), expected)
    assert torch.equal(out[-1], logits[-1]), "slot -1 row changed"
    assert torch.equal(out[ROWS // 2], logits[ROWS // 2]), "row below changed"


def test_temperature_kernel_per_slot_parameters_masks_and_tolerance(
    masked_batch, generator
):
    from em_inf.kernels import adaptive_temperature_rows_

    logits, row_slot, slots = masked_batch
    params = _per_slot(
        logits.device,
        threshold=torch.rand(slots, generator=generator) * 0.5,
        alpha=torch.rand(slots, generator=generator) * 0.8 + 0.1,
        t_min=[0.01] * slots,
        t_max=[1.0] * slots,
    )
    out = logits.clone()
    adaptive_temperature_rows_(out, row_slot, **params)
    expected = oracle_by_slot(adaptive_temperature_oracle, logits, row_slot, params)
    assert_matches(restored_masks(out, logits).cpu(), expected)
    assert torch.equal(out[-1], logits[-1]), "slot -1 row changed"
    assert_temperature_tolerance(logits, out, row_slot, params)


def test_fail_safe_restores_and_counts_rows_in_both_kernels(device, generator):
    """NaN / +inf rows come back bit-identical and are counted; an overflowing
    temperature restores its row; the other rows' counts add up."""
    from em_inf.kernels import adaptive_temperature_rows_, em_inf_rows_

    logits = random_logits(4, 3_000, scale=1.0, generator=generator).to(device)
    logits[1, 5] = torch.nan
    logits[2, 9] = torch.inf
    logits[3, 1] = 200.0  # below every threshold
    slot = torch.zeros(4, dtype=torch.int32, device=device)
    stats = torch.zeros(counters.WIDTH, dtype=torch.int64, device=device)
    params = _per_slot(device, threshold=[0.3], kl_weight=[0.05], lr=[0.1], steps=[3])
    out = logits.clone()
    em_inf_rows_(out, slot, **params, max_steps=3, stats=stats)
    for row in (1, 2, 3):
        assert _bits_equal(out[row], logits[row]), f"row {row} changed"
    below, passes, restored, rows = stats.tolist()[:4]
    assert [below, passes, restored, rows] == [1, 3, 2, 4], stats.tolist()

    huge = torch.tensor([[1e35, 1e35, 0.0, -1e35]], device=device)
    stats.zero_()
    t_params = _per_slot(
        device, threshold=[0.0], alpha=[1e-6], t_min=[1e-4], t_max=[1e-4]
    )
    out = huge.clone()
    adaptive_temperature_rows_(out, slot[:1], **t_params, stats=stats)
    assert _bits_equal(out, huge) and stats.tolist()[2] == 1, stats.tolist()[:4]


def test_logits_kernel_at_the_accepted_maxima_on_hostile_rows(device, generator):
    """100 steps (10 under the interpreter, which replays k^2 / 2), lr 100,
    kl_weight 1000: finite wherever the input is finite, masks kept, nothing
    restored."""
    from em_inf.kernels import em_inf_rows_

    steps = 100 if CUDA else 10
    logits = random_logits(3, VOCAB, generator=generator).to(device)
    logits[0] = logits[0] * 1e30
    logits[1, ::3] = F32.min
    logits[2, 0] = F32.max * 0.9
    params = _per_slot(
        device, threshold=[0.0], kl_weight=[1e3], lr=[1e2], steps=[steps]
    )
    stats = torch.zeros(counters.WIDTH, dtype=torch.int64, device=device)
    out = logits.clone()
    row_slot = torch.zeros(3, dtype=torch.int32, device=device)
    em_inf_rows_(out, row_slot, **params, stats=stats)
    assert torch.isfinite(out[torch.isfinite(logits)]).all(), "non-finite output"
    restored_masks(out, logits)
    assert stats.tolist()[2] == 0, stats.tolist()


def _processor_steps(device, source, schedule, graphs: bool) -> list:
    """Each step of ``schedule`` through the processor's core
    (:class:`em_inf_support.gpu_steps.Harness`, a fresh ``StepRunner``): the float32
    ``[12, V]`` logits after it and its rows' settings."""
    from em_inf.kernels.step import StepRunner

    harness = gpu_steps.Harness(source, schedule, StepRunner(device, graphs=graphs))
    outputs, configs = [], {}
    for step in schedule:  # the harness takes them in this order
        configs.update(step.admitted)
        harness.em_inf_step()
        per_row = [configs[int(slot)] for slot in step.row_slots]
        outputs.append((harness.logits.clone(), per_row))
    return outputs


def test_processor_step_graphs_match_eager_bitwise_and_the_oracle(
    device, generator, seed, monkeypatch
):
    """The ``mixed`` workload (both modes, opted-out rows, speculative rows,
    admissions and removals every step) with the batch-invariant plan: CUDA-graph
    replays give the eager launches' bits, and both match the oracle."""
    monkeypatch.setenv("EM_INF_BATCH_INVARIANT", "1")
    schedule = gpu_steps.schedule("mixed", 12, 3, seed)
    logits = random_logits(12, STEP_VOCAB, generator=generator)
    source = mask_randomly(logits, 0.05, generator=generator).to(device)
    graphs = _processor_steps(device, source, schedule, graphs=True)
    eager = _processor_steps(device, source, schedule, graphs=False)
    for (g_out, per_row), (e_out, _) in zip(graphs, eager, strict=True):
        assert _bits_equal(g_out, e_out), "graph replay differs from eager"
        assert_matches(g_out.cpu(), settings_oracle(source.cpu(), per_row))


def _alone_and_in_batches(device, generator) -> list[tuple]:
    """16 rows (two slots in turn) through the logits kernel one at a time, and in
    batches of 1, 7 and 64 rows drawn from them: for each batch, its float32
    ``[n, V]`` output and the same rows' outputs alone."""
    from em_inf.kernels import em_inf_rows_

    pool = random_logits(16, INVARIANCE_VOCAB, generator=generator).to(device)
    params = _per_slot(
        device, threshold=[0.3, 0.0], kl_weight=[0.05, 0.0], lr=[0.1, 0.2],
        steps=[3, 2],
    )  # fmt: skip
    slots = (torch.arange(16, device=device) % 2).to(torch.int32)

    def run(rows: list[int]) -> torch.Tensor:
        out = pool[rows].clone()
        em_inf_rows_(out, slots[rows], **params, max_steps=3)
        return out

    alone = torch.cat([run([i]) for i in range(16)])
    picks = [torch.randint(0, 16, (n,), generator=generator) for n in (1, 7, 64)]
    return [(run(pick.tolist()), alone[pick.to(device)]) for pick in picks]


def test_batch_invariant_plan_keeps_every_rows_bits_in_any_batch(
    device, generator, monkeypatch
):
    monkeypatch.setenv("EM_INF_BATCH_INVARIANT", "1")
    for batch, alone in _alone_and_in_batches(device, generator):
        assert _bits_equal(batch, alone), "a row's bits changed with its batch"


def test_fast_plan_rows_agree_alone_and_in_batches(device, generator, record_property):
    """The fast plan may change a row's bits with its batch (not required):
    within the oracle's tolerance of the row alone; whether the bits held is
    recorded (``fast_plan_bitwise``), and a warning says when they did not."""
    pairs = _alone_and_in_batches(device, generator)
    for batch, alone in pairs:
        assert_matches(batch.cpu(), alone.double().cpu())
    bitwise = all(_bits_equal(batch, alone) for batch, alone in pairs)
    record_property("fast_plan_bitwise", bitwise)
    if not bitwise:
        warnings.warn(
            "the fast plan changed some row's bits with its batch", stacklevel=1
        )


def test_functional_dispatches_to_the_kernels_and_matches(device, generator):
    logits = random_logits(4, VOCAB, generator=generator).to(device)
    params = dict(threshold=0.3, kl_weight=0.05, lr=0.1, steps=3)
    out = functional.em_inf(logits, **params)
    assert_matches(out.cpu(), em_inf_oracle(logits.double().cpu(), **params))
