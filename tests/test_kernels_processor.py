"""The processor's kernel path (what CUDA runs), here under Triton's interpreter:
rows reach the kernels through vLLM's row -> slot mapping (also with speculative
rows), both modes and opted-out rows in one batch, per-slot settings staged through
vLLM's hooks, no host sync anywhere in a step, and the operators' log line.

Runs in its own process (see tests/kernel_helpers.py).
"""

from __future__ import annotations

import logging

from tests import kernel_helpers
from tests.kernel_helpers import (
    oracle_rows,
)

kernel_helpers.require_interpreter()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from vllm.v1.sample.logits_processor import (  # noqa: E402
    BatchUpdate,
    MoveDirectionality,
)
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext  # noqa: E402

from em_inf import PRESETS, EMInf  # noqa: E402
from tests.inputs import random_logits  # noqa: E402
from tests.oracle import (  # noqa: E402
    adaptive_temperature_oracle,
    assert_matches,
    settings_oracle,
)
from tests.processor_helpers import (  # noqa: E402
    make_config,
    params,
    v2_context,
    v2_processor,
)
from tests.sync_detector import HostSyncDetector  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned_empty", "quiet_interpreter")

MATH, PHYSICS, DEFAULT = PRESETS["math"], PRESETS["physics"], PRESETS["default"]
TEMPERATURE = PRESETS["adaptive-temperature"]


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("EM_INF_BACKEND", "triton")


class LogLines(logging.Handler):
    """The lines logger ``vllm.em_inf`` emits (vLLM's logger does not propagate)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def em_inf_log(monkeypatch):
    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "1e-9")  # a line every step
    handler = LogLines()
    logger = logging.getLogger("vllm.em_inf")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def spec_context(request_slots, rows_per_request) -> LogitsContext:
    """A V2 context with speculative rows: request ``i`` owns
    ``rows_per_request[i]`` consecutive rows (int64 mapping, as vLLM builds it)."""
    expanded = np.repeat(request_slots, rows_per_request)
    ctx = v2_context(request_slots)
    mapping = torch.tensor(expanded, dtype=torch.int64)
    return LogitsContext(
        **{
            **ctx.__dict__,
            "expanded_idx_mapping": mapping,
            "idx_mapping": torch.tensor(request_slots, dtype=torch.int64),
            "expanded_local_pos": torch.zeros_like(mapping, dtype=torch.int32),
        }
    )


def v1_update(proc, removed=(), added=(), moved=()):
    proc.update_state(
        BatchUpdate(
            batch_size=8,
            removed=list(removed),
            added=[(i, params(extra), [1], []) for i, extra in added],
            moved=list(moved),
        )
    )


def test_mixed_modes_and_opted_out_rows_in_one_batch():
    proc = v2_processor()
    temperature = TEMPERATURE.replace(alpha=0.6)
    proc.add_request(6, params({"em_inf": {"preset": "math"}}))
    proc.add_request(1, params({"em_inf": False}))
    proc.add_request(
        3, params({"em_inf": {"preset": "adaptive-temperature", "alpha": 0.6}})
    )
    proc.add_request(0, params({"em_inf_lr": 0.05, "em_inf_steps": 5}))
    proc.apply_staged_writes()
    row_slots = [3, 6, 1, 0]
    logits = random_logits(4, 2_053)
    out = proc.apply(logits.clone(), v2_context(row_slots))
    expected = settings_oracle(
        logits, [None, MATH, None, DEFAULT.replace(lr=0.05, steps=5)]
    )
    expected[0] = adaptive_temperature_oracle(
        logits[:1],
        threshold=temperature.threshold,
        alpha=temperature.alpha,
        t_min=temperature.t_min,
        t_max=temperature.t_max,
    )[0]
    assert_matches(out, expected)
    assert torch.equal(out[2], logits[2])


def test_v2_speculative_rows_follow_the_device_mapping_without_a_host_copy():
    """Three rows for slot 5 (draft tokens), one for slot 0, two for the opted-out
    slot 2: the host decides from the three requests alone, the kernels read the
    six rows' slots from the int64 device mapping."""
    proc = v2_processor()
    proc.add_request(5, params({"em_inf": {"preset": "math"}}))
    proc.add_request(2, params({"em_inf": False}))
    proc.add_request(0, params({"em_inf": {"preset": "adaptive-temperature"}}))
    proc.apply_staged_writes()
    ctx = spec_context([5, 0, 2], [3, 1, 2])
    logits = random_logits(6, 1_500)
    with HostSyncDetector() as detector:
        out = proc.apply(logits.clone(), ctx)
    assert detector.found == []
    assert detector.copies == []  # the settings went over in apply_staged_writes
    configs = {5: MATH, 0: TEMPERATURE, 2: None}
    assert_matches(out, oracle_rows(logits, [5, 5, 5, 0, 2, 2], configs))


def test_v2_admissions_reach_the_device_in_the_staging_hook_only():
    """``apply_staged_writes`` sends the settings (one non-blocking copy, no host
    reads); ``apply`` then copies nothing. Over three steps: admissions, a
    recycled slot that must forget its previous request, a new slot, and a step
    without admissions (no copy at all)."""
    proc = v2_processor()
    steps = [
        # (admitted: slot -> em_inf settings, this step's request slots)
        (
            {5: {"preset": "math"}, 2: False, 0: {"preset": "adaptive-temperature"}},
            [5, 0, 2],
        ),
        ({5: {"preset": "physics"}, 7: {"preset": "default"}}, [7, 5, 0, 2]),
        ({}, [0, 7, 5]),
    ]
    configs = {}
    for admitted, request_slots in steps:
        with HostSyncDetector() as detector:
            for slot, extra in admitted.items():
                proc.add_request(slot, params({"em_inf": extra}))
                configs[slot] = None if extra is False else PRESETS[extra["preset"]]
            proc.apply_staged_writes()
        assert detector.found == []
        assert [blocking for _, blocking in detector.copies] == (
            [False] if admitted else []
        )
        logits = random_logits(len(request_slots), 1_200)
        with HostSyncDetector() as detector:
            out = proc.apply(logits.clone(), v2_context(request_slots))
        assert (detector.found, detector.copies) == ([], [])
        assert_matches(out, oracle_rows(logits, request_slots, configs))


def test_v1_batch_updates_reach_the_kernels_without_a_host_sync():
    """Admissions, a removal, a move into the freed slot, a swap and a recycled
    slot through ``update_state`` (which sends the settings: one non-blocking
    copy); each step's ``apply`` copies nothing and matches the oracle."""
    proc = EMInf(make_config(), torch.device("cpu"), False)
    steps = [
        (
            dict(
                added=[
                    (0, {"em_inf": {"preset": "math"}}),
                    (1, {"em_inf": False}),
                    (2, {"em_inf": {"preset": "adaptive-temperature"}}),
                    (3, None),
                ]
            ),
            [MATH, None, TEMPERATURE, DEFAULT],
        ),
        (
            # 1 finishes, 3 moves into its place, then 0 and 2 swap.
            dict(
                removed=[1],
                moved=[
                    (3, 1, MoveDirectionality.UNIDIRECTIONAL),
                    (0, 2, MoveDirectionality.SWAP),
                ],
            ),
            [TEMPERATURE, DEFAULT, MATH],
        ),
        # Slot 3, freed by the move, is recycled by a new request.
        (
            dict(added=[(3, {"em_inf": {"preset": "physics"}})]),
            [TEMPERATURE, DEFAULT, MATH, PHYSICS],
        ),
    ]
    for update, rows in steps:
        with HostSyncDetector() as detector:
            v1_update(proc, **update)
        assert detector.found == []
        assert [blocking for _, blocking in detector.copies] == [False]
        logits = random_logits(len(rows), 1_100)
        with HostSyncDetector() as detector:
            out = proc.apply(logits.clone())
        assert (detector.found, detector.copies) == ([], [])
        assert_matches(out, oracle_rows(logits, list(range(len(rows))), rows))


def test_the_detector_catches_what_would_sync_a_gpu():
    """What the old processor did (``expanded_idx_mapping.cpu().numpy()``,
    ``torch.from_numpy(...).to(device)``) and the other host reads."""
    mapping = torch.tensor([3, 3, 1])
    cases = {
        "cpu": lambda: mapping.cpu().numpy(),
        "to": lambda: torch.from_numpy(np.arange(3)).to(mapping.device),
        "item": lambda: mapping[0].item(),
        "bool": lambda: bool(mapping.any()),
        "tolist": lambda: mapping.tolist(),
        "nonzero": lambda: mapping.nonzero(),
        "as_tensor": lambda: torch.as_tensor([1, 2], device=mapping.device),
        "copy": lambda: torch.empty(3, dtype=torch.int64).copy_(mapping),
    }
    for name, call in cases.items():
        with HostSyncDetector() as detector:
            call()
        assert detector.found, name
    with HostSyncDetector() as detector:
        torch.empty(3, dtype=torch.int64).copy_(mapping, non_blocking=True)
    assert detector.found == [] and len(detector.copies) == 1


def test_log_line_counts_rows_per_mode_including_speculative_rows(em_inf_log):
    """Slot 5 (3 rows, threshold 0: every step runs), slot 0 (temperature, one
    one-hot row: below its threshold), slot 2 off (2 rows, not counted)."""
    proc = v2_processor()
    proc.add_request(5, params({"em_inf": {"preset": "math", "threshold": 0.0}}))
    proc.add_request(0, params({"em_inf": {"preset": "adaptive-temperature"}}))
    proc.add_request(2, params({"em_inf": False}))
    proc.apply_staged_writes()
    logits = random_logits(6, 900)
    logits[3, 4] = 200.0  # slot 0's row: entropy ~0
    proc.apply(logits.clone(), spec_context([5, 0, 2], [3, 1, 2]))
    started, reserved, line = em_inf_log  # start-up lines, then the stats
    assert "on Model Runner V2" in started and "triton backend" in started
    assert "MiB of cpu memory reserved" in reserved
    assert "logits mode 3 rows (0 already below threshold, 3.00 Adam steps" in line
    assert "temperature mode 1 rows (1 already below threshold" in line
    assert "0 rows restored by the fail-safe" in line
    logits = random_logits(6, 900)
    logits[0, 1] = torch.nan
    with np.errstate(invalid="ignore"):
        proc.apply(logits.clone(), spec_context([5, 0, 2], [3, 1, 2]))
    assert "1 rows restored by the fail-safe" in em_inf_log[-1]
