"""The processor's kernel path (what CUDA runs), here under Triton's interpreter:
rows reach the kernels through vLLM's row -> slot mapping, with both modes and
opted-out rows in one batch. Runs in its own process, like tests/test_kernels.py."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before em_inf.kernels imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from em_inf import PRESETS  # noqa: E402
from tests.oracle import adaptive_temperature_oracle, assert_matches  # noqa: E402
from tests.test_functional import random_logits  # noqa: E402
from tests.test_processor import (  # noqa: E402
    expected_rows,
    params,
    v2_context,
    v2_processor,
)


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("EM_INF_BACKEND", "triton")


def test_mixed_modes_and_opted_out_rows_in_one_batch():
    proc = v2_processor()
    temperature = PRESETS["adaptive-temperature"].replace(alpha=0.6)
    proc.add_request(6, params({"em_inf": {"preset": "math"}}))
    proc.add_request(1, params({"em_inf": False}))
    proc.add_request(
        3, params({"em_inf": {"preset": "adaptive-temperature", "alpha": 0.6}})
    )
    proc.add_request(0, params({"em_inf_lr": 0.05, "em_inf_steps": 5}))
    row_slots = [3, 6, 1, 0]
    logits = random_logits(4, 2_053)
    out = proc.apply(logits.clone(), v2_context(row_slots))
    expected = expected_rows(
        logits,
        [None, PRESETS["math"], None, PRESETS["default"].replace(lr=0.05, steps=5)],
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


def test_settings_changed_between_steps_reach_the_kernels():
    proc = v2_processor()
    proc.add_request(2, params({"em_inf": {"preset": "math"}}))
    logits = random_logits(1, 1_024)
    proc.apply(logits.clone(), v2_context([2]))
    proc.add_request(2, params({"em_inf": {"preset": "physics"}}))  # slot recycled
    out = proc.apply(logits.clone(), v2_context([2]))
    assert_matches(out, expected_rows(logits, [PRESETS["physics"]]))


def test_v1_runner_on_the_kernel_path_uses_batch_positions_as_slots():
    from vllm.v1.sample.logits_processor import BatchUpdate

    from em_inf import EMInf
    from tests.test_processor import make_config

    proc = EMInf(make_config(), torch.device("cpu"), False)
    proc.update_state(
        BatchUpdate(
            batch_size=3,
            removed=[],
            added=[
                (0, params({"em_inf": False}), [1], []),
                (1, params({"em_inf": {"preset": "physics"}}), [1], []),
                (2, params(None), [1], []),
            ],
            moved=[],
        )
    )
    logits = random_logits(3, 1_500)
    out = proc.apply(logits.clone())
    expected = expected_rows(logits, [None, PRESETS["physics"], PRESETS["default"]])
    assert_matches(out, expected)
