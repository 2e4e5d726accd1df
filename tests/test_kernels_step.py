"""The processor's step runner (``em_inf.kernels.step``) under Triton's interpreter:
row buckets, the indirect launch sequence a CUDA graph replays (logits and mapping
read through device addresses, padding rows past the row count), its static
buffers, and agreement with the direct launches and the float64 oracle.

On CPU nothing can be captured: ``StepRunner(cpu, graphs=True)`` runs, every step,
exactly the launch sequence a graph would replay. Runs in its own process (see
tests/kernel_helpers.py).
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

from em_inf import counters  # noqa: E402
from em_inf.config import PRESETS  # noqa: E402
from em_inf.kernels import step  # noqa: E402
from em_inf.kernels._common import plan_block  # noqa: E402
from em_inf.kernels.step import StepRunner, bucket_rows, graphs_wanted  # noqa: E402
from tests.inputs import mask_randomly, random_logits  # noqa: E402
from tests.oracle import assert_matches  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned_empty", "quiet_interpreter")

CPU = torch.device("cpu")
CONFIGS = [
    PRESETS["math"],
    PRESETS["adaptive-temperature"].replace(alpha=0.6),
    None,
    PRESETS["default"].replace(steps=4, threshold=0.0),
    PRESETS["adaptive-temperature"],
]


def _run(runner, logits, row_slot, settings, stats=None, max_steps=4):
    """One step on a copy of ``logits``; returns it and the counters."""
    out = logits.clone()
    if stats is None:
        stats = torch.zeros(2, counters.WIDTH, dtype=torch.int64)
    runner.run(out, row_slot, max_steps, True, settings.tables(CPU), stats)
    return out, stats


@pytest.mark.parametrize(
    "rows, bucket", [(1, 1), (2, 2), (3, 4), (5, 8), (64, 64), (65, 128), (512, 512)]
)
def test_rows_round_up_to_a_power_of_two_bucket(rows, bucket):
    assert bucket_rows(rows) == bucket


def test_batches_above_the_largest_bucket_launch_directly():
    assert bucket_rows(step.GRAPH_MAX_ROWS + 1) is None


def test_graphs_only_on_cuda_and_only_unless_switched_off(monkeypatch):
    monkeypatch.delenv(step.GRAPHS_ENV, raising=False)
    assert graphs_wanted(torch.device("cuda"))
    assert not graphs_wanted(CPU)
    monkeypatch.setenv(step.GRAPHS_ENV, "0")
    assert not graphs_wanted(torch.device("cuda"))


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_graph_sequence_matches_direct_launches_bitwise(monkeypatch, slot_dtype):
    """Same block plan (batch-invariant mode), same arithmetic: the indirect
    sequence over a bucket of 8 rows gives the direct launches' bits and counts,
    and both match the oracle; rows share slots as under speculative decoding."""
    monkeypatch.setenv("EM_INF_BATCH_INVARIANT", "1")
    settings = slot_settings(CONFIGS)
    row_slot = torch.tensor([3, 0, 1, 2, 3, 4], dtype=slot_dtype)
    logits = mask_randomly(random_logits(6, 2_500), 0.1)
    direct, direct_stats = _run(
        StepRunner(CPU, graphs=False), logits, row_slot, settings
    )
    graph, graph_stats = _run(StepRunner(CPU, graphs=True), logits, row_slot, settings)
    assert torch.equal(graph, direct)
    assert torch.equal(graph_stats, direct_stats)
    assert_matches(graph, oracle_rows(logits, row_slot.tolist(), CONFIGS))
    # Rows counted per mode by the kernels: 3 logits-mode rows (slot 3 twice),
    # 2 temperature rows; slot 2 is off.
    assert graph_stats[:, counters.ROWS].tolist() == [3, 2]


def test_padding_rows_past_the_row_count_touch_nothing():
    """The logits and the mapping are views into longer buffers: rows past the
    batch (up to the bucket and beyond) hold valid-looking data that must stay."""
    settings = slot_settings(CONFIGS)
    storage = random_logits(8, 1_500)
    mapping = torch.tensor([0, 3, 1, 0, 0, 3, 4, 1], dtype=torch.int64)
    logits = storage[:3]  # bucket 4: program row 3 reads past the batch
    before = storage.clone()
    runner = StepRunner(CPU, graphs=True)
    runner.run(logits, mapping[:3], 4, True, settings.tables(CPU), None)
    assert torch.equal(storage[3:], before[3:])
    assert_matches(logits, oracle_rows(before[:3], [0, 3, 1], CONFIGS))


def test_replays_reuse_static_buffers_for_new_tensors_every_step():
    """Three steps of one shape: fresh logits and mapping tensors each time (new
    addresses), one set of static buffers, every step exact."""
    settings = slot_settings(CONFIGS)
    runner = StepRunner(CPU, graphs=True)
    stats = torch.zeros(2, counters.WIDTH, dtype=torch.int64)
    partials = set()
    for rows in (3, 4, 3):
        row_slot = torch.randint(0, len(CONFIGS), (rows,))
        logits = random_logits(rows, 1_200)
        out, _ = _run(runner, logits, row_slot, settings, stats)
        assert_matches(out, oracle_rows(logits, row_slot.tolist(), CONFIGS))
        (replay,) = runner._replays.values()
        partials.add(replay.partials[0].data_ptr())
    assert len(partials) == 1
    assert runner._launch.buffers == 1  # host staging reused (no copies in flight)


def test_new_device_tables_get_their_own_replay(monkeypatch):
    monkeypatch.setattr(step, "MAX_GRAPHS", 2)
    settings = slot_settings(CONFIGS)
    runner = StepRunner(CPU, graphs=True)
    stats = torch.zeros(2, counters.WIDTH, dtype=torch.int64)
    logits = random_logits(2, 700)
    row_slot = torch.tensor([0, 1])
    _run(runner, logits, row_slot, settings, stats)
    settings.set(40, PRESETS["math"])  # the slots grow: tables move
    out, _ = _run(runner, logits, row_slot, settings, stats)
    assert len(runner._replays) == 2
    assert_matches(out, oracle_rows(logits, [0, 1], CONFIGS))
    _run(runner, logits, row_slot, settings, stats, max_steps=3)  # a third shape
    assert len(runner._replays) == 2  # least recently used dropped


def test_non_contiguous_logits_take_the_direct_launches():
    settings = slot_settings(CONFIGS)
    wide = random_logits(3, 1_000)
    logits = wide[:, :900]  # row stride 1000 != V
    expected = oracle_rows(logits.contiguous(), [0, 3, 1], CONFIGS)
    runner = StepRunner(CPU, graphs=True)
    runner.run(logits, torch.tensor([0, 3, 1]), 4, True, settings.tables(CPU), None)
    assert not runner._replays
    assert_matches(logits.contiguous(), expected)


@pytest.mark.parametrize("graphs", [False, True])
def test_scratch_reserved_at_start_serves_every_step_without_allocating(
    monkeypatch, graphs
):
    """Given its bounds, a runner takes its scratch once, when it is made (vLLM
    makes the processor before it sizes its KV cache): steps of 1 to ``max_rows``
    rows then allocate nothing (``torch.empty`` raises) and give the bits of a
    runner that allocates per step."""
    monkeypatch.setenv("EM_INF_BATCH_INVARIANT", "1")
    settings = slot_settings(CONFIGS)
    tables = settings.tables(CPU)
    reserved = StepRunner(CPU, graphs=graphs, max_rows=6, n_cols=2_500)
    fresh = StepRunner(CPU, graphs=graphs)
    elements = reserved.scratch_elements(6, 2_500)
    assert reserved.device_bytes() == 4 * elements + 8 * 3
    assert fresh.device_bytes() == 8 * 3
    for rows in (1, 3, 6):
        row_slot = torch.randint(0, len(CONFIGS), (rows,))
        logits = random_logits(rows, 2_500)
        expected = logits.clone()
        fresh.run(expected, row_slot, 4, True, tables, None)
        got = logits.clone()
        with monkeypatch.context() as patched:
            patched.setattr(torch, "empty", _refuse_allocation)
            reserved.run(got, row_slot, 4, True, tables, None)
        assert torch.equal(got, expected), rows


def _refuse_allocation(*args, **kwargs):
    raise AssertionError("the step runner allocated during a step")


WARM_CONFIGS = [PRESETS["default"], PRESETS["adaptive-temperature"], None]
#: Slots per warmed shape (max_steps, temperature kernel): logits mode alone
#: (default preset, 3 steps, and EM-INF off), both modes, temperature alone.
WARM_SHAPES = {(3, False): [0, 2], (3, True): [0, 1, 2], (0, True): [1, 2]}


def test_warm_up_leaves_nothing_to_compile_or_capture_for_the_default_steps():
    """After ``warm_up(8 rows, V, 3 steps)``, steps of 1 to 8 rows in each of the
    three shapes find their replay made (on CUDA: compiled and captured) and add
    none; the counters are as they were before the warm-up; every step is exact."""
    settings = slot_settings(WARM_CONFIGS)
    tables = settings.tables(CPU)
    runner = StepRunner(CPU, graphs=True, max_rows=8, n_cols=600)
    stats = torch.zeros(2, counters.WIDTH, dtype=torch.int64)
    stats[0, 0], stats[1, 3] = 5, 7  # counts from earlier steps survive
    before = stats.clone()
    shapes = runner.warm_up(8, 600, 3, tables, stats)
    assert torch.equal(stats, before)
    assert [s.rows for s in shapes] == [r for r in (1, 2, 4, 8) for _ in range(3)]
    warmed = list(runner._replays)
    assert len(warmed) == len(shapes)
    for rows in range(1, 9):
        for (max_steps, temperature), slots in WARM_SHAPES.items():
            row_slot = torch.tensor(slots)[torch.randint(0, len(slots), (rows,))]
            logits = random_logits(rows, 600)
            out = logits.clone()
            runner.run(out, row_slot, max_steps, temperature, tables, stats)
            expected = oracle_rows(logits, row_slot.tolist(), WARM_CONFIGS)
            assert_matches(out, expected)
    assert list(runner._replays) == warmed


@pytest.mark.parametrize("graphs", [False, True])
def test_warm_up_rows_cover_every_block_plan_past_the_graphs(monkeypatch, graphs):
    """Without graphs (or past the largest bucket) the kernels compile one variant
    per block plan: the warm-up's row counts reach every plan that 1 to
    ``max_rows`` rows take, and ``max_rows`` itself."""
    monkeypatch.setattr(step, "GRAPH_MAX_ROWS", 4)
    runner = StepRunner(CPU, graphs=graphs)
    sizes = runner.warm_up_rows(40, 151_936)
    assert sizes == sorted(set(sizes)) and sizes[-1] == 40
    if graphs:
        assert sizes[:3] == [1, 2, 4]
    plans = {plan_block(r, 151_936, CPU) for r in sizes}
    low = 5 if graphs else 1
    assert {plan_block(r, 151_936, CPU) for r in range(low, 41)} <= plans
