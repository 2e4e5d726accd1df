"""The ``EMInf`` processor through vLLM's real interface classes, without an engine:
the V2 adapter (CUDA's runner, driven here with CPU tensors), configured classes,
engine-wide settings. V1's bookkeeping is tests/test_processor_v1.py's (vLLM 0.34
has no V1); the version matrix runs this module on every supported release."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch
from packaging.version import Version
from vllm import __version__ as VLLM_VERSION
from vllm.v1.worker.gpu.sample.logits_processor import (
    LogitsContext,
)
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2Interface

from em_inf import PRESETS, EMInf
from em_inf.vllm_interfaces import v1_interface
from tests.inputs import random_logits
from tests.oracle import assert_matches, settings_oracle
from tests.processor_helpers import VOCAB, params, v2_context, v2_processor


def test_one_class_serves_every_runner_interface_this_vllm_has():
    """vLLM 0.34.0 removed Model Runner V1 and its processor interface (its release
    notes); every earlier supported release has both."""
    v1 = v1_interface()
    assert (v1 is not None) == (Version(VLLM_VERSION).release < (0, 34)), VLLM_VERSION
    for cls in (EMInf, EMInf(preset="math")):
        assert issubclass(cls, V2Interface)
        assert v1 is None or issubclass(cls, v1.LogitsProcessor)


def test_v2_rows_follow_their_slots_settings():
    proc = v2_processor()
    math = PRESETS["math"]
    assert proc.add_request(5, params({"em_inf": {"preset": "math"}}))
    assert not proc.add_request(2, params({"em_inf": False}))
    assert proc.add_request(0, params(None))  # engine default: "default" preset
    row_slots = [2, 5, 0, 5]  # rows are reordered against slots every step
    logits = random_logits(4, VOCAB)
    out = proc.apply(logits.clone(), v2_context(row_slots))
    expected = settings_oracle(logits, [None, math, PRESETS["default"], math])
    assert_matches(out, expected)
    assert torch.equal(out[0], logits[0])


def test_request_that_skipped_admission_runs_without_em_inf_and_others_keep_it():
    """Settings valid for the class but not for this engine (its ``t_min`` is
    above the request's ``t_max``) reach the engine only past admission: that
    request's row is left as it is, with one error logged, and the engine keeps
    serving the other rows of the batch with their settings."""
    import logging

    errors = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.ERROR:
                errors.append(record.getMessage())

    proc = v2_processor(em_inf={"t_min": 0.5})
    bad = params({"em_inf": {"mode": "temperature", "t_max": 0.3}})
    logger = logging.getLogger("vllm.em_inf")
    handler = Collect()
    logger.addHandler(handler)
    try:
        assert not proc.add_request(0, bad)
    finally:
        logger.removeHandler(handler)
    assert len(errors) == 1 and "t_max" in errors[0], errors
    assert proc.add_request(1, params({"em_inf": {"preset": "math"}}))
    logits = random_logits(2, VOCAB)
    out = proc.apply(logits.clone(), v2_context([0, 1]))
    assert torch.equal(out[0], logits[0])
    assert_matches(out[1:], settings_oracle(logits[1:], [PRESETS["math"]]))


def test_v2_recycled_slot_forgets_its_previous_request():
    proc = v2_processor()
    proc.add_request(1, params({"em_inf": {"preset": "physics"}}))
    assert not proc.add_request(1, params({"em_inf": "off"}))
    logits = random_logits(1, VOCAB)
    out = proc.apply(logits.clone(), v2_context([1]))
    assert torch.equal(out, logits)


def test_v2_speculative_rows_use_the_expanded_mapping():
    proc = v2_processor()
    proc.add_request(3, params({"em_inf": {"preset": "math"}}))
    proc.add_request(4, params({"em_inf": False}))
    ctx = v2_context([3, 4])
    expanded = torch.tensor([3, 3, 3, 4], dtype=torch.int32)  # 3 rows for slot 3
    ctx = LogitsContext(**{**ctx.__dict__, "expanded_idx_mapping": expanded})
    logits = random_logits(4, VOCAB)
    out = proc.apply(logits.clone(), ctx)
    math = PRESETS["math"]
    assert_matches(out, settings_oracle(logits, [math, math, math, None]))


def test_v2_warmup_request_without_extra_args_gets_the_engine_default():
    proc = v2_processor(em_inf={"enabled": False})
    assert not proc.add_request(0, params(None))
    proc = v2_processor(em_inf={"preset": "physics"})
    assert proc.add_request(0, params(None))


def test_configured_class_applies_its_settings_under_engine_overrides():
    cls = EMInf(preset="physics", lr=0.05)
    assert cls is EMInf(lr=0.05, preset="physics")
    assert cls.settings == PRESETS["physics"].replace(lr=0.05)
    proc = v2_processor(cls, em_inf={"steps": 2})
    proc.add_request(0, params(None))
    logits = random_logits(1, VOCAB)
    out = proc.apply(logits.clone(), v2_context([0]))
    assert_matches(out, settings_oracle(logits, [cls.settings.replace(steps=2)]))


def test_configured_class_off_by_default_makes_em_inf_opt_in():
    proc = v2_processor(EMInf(enabled=False))
    assert not proc.add_request(0, params(None))
    assert proc.add_request(1, params({"em_inf": True}))


def test_configured_class_survives_pickling_into_a_fresh_process():
    cls = EMInf(preset="math", threshold=0.25, enabled=False)
    payload = pickle.dumps(cls)
    code = (
        "import pickle, sys; cls = pickle.loads(sys.stdin.buffer.read()); "
        "print(cls.settings.threshold, cls.settings.kl_weight, cls.enabled)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], input=payload, capture_output=True, check=True
    )
    assert result.stdout.decode().split() == ["0.25", "0.001", "False"]
    assert pickle.loads(pickle.dumps(EMInf)) is EMInf


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(preset="nope"), "preset"),
        (dict(lr=0), "lr"),
        (dict(enabled="yes"), "enabled"),
        (dict(learning_rate=0.1), "learning_rate"),
    ],
)
def test_configured_class_rejects_bad_settings(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EMInf(**kwargs)


@pytest.mark.parametrize(
    "em_inf, field",
    [
        ({"threshold": -1}, "threshold"),
        ({"enabled": "no"}, "enabled"),
        ({"preset": "fast"}, "preset"),
        ({"step": 3}, "step"),
    ],
)
def test_bad_engine_settings_fail_at_engine_start(em_inf, field):
    with pytest.raises(ValueError, match=field):
        v2_processor(em_inf=em_inf)


def test_validate_params_names_the_bad_field():
    with pytest.raises(ValueError, match="kl_weight"):
        EMInf.validate_params(params({"em_inf": {"kl_weight": -0.5}}))
    EMInf.validate_params(params({"kv_transfer_params": {"x": 1}}))  # not ours


def test_v2_loader_accepts_the_qualified_name():
    from vllm.v1.worker.gpu.sample.logits_processor.loader import (
        _load_v2_logitsprocs_by_fqcns,
    )

    assert _load_v2_logitsprocs_by_fqcns(["em_inf:EMInf"]) == [EMInf]


# -- per-slot device tables (the kernel path's staging), on CPU tensors -------------


def _assert_tables(settings, configs):
    """The kernels' per-slot tables hold ``configs`` (``None``: EM-INF off): a slot
    outside a mode shows ``steps == 0`` / ``temperature_threshold == inf``, and
    the settings of the mode it uses."""
    tables = settings.tables(torch.device("cpu"))
    for slot, config in enumerate(configs):
        logits = config is not None and config.mode == "logits"
        temperature = config is not None and config.mode == "temperature"
        assert tables.steps[slot] == (config.steps if logits else 0), slot
        want = config.threshold if temperature else torch.inf
        assert tables.temperature_threshold[slot] == torch.tensor(want), slot
        fields = ("threshold", "kl_weight", "lr") if logits else ()
        fields += ("alpha", "t_min", "t_max") if temperature else ()
        for name in fields:
            want = torch.tensor(getattr(config, name), dtype=torch.float32)
            assert getattr(tables, name)[slot] == want, (slot, name)


def test_slot_settings_device_tables_follow_sets_moves_and_swaps():
    from em_inf.core import SlotSettings

    math, temperature = PRESETS["math"], PRESETS["adaptive-temperature"]
    physics = PRESETS["physics"]
    settings = SlotSettings(4, torch.device("cpu"))
    for slot, config in enumerate([math, None, temperature, physics]):
        settings.set(slot, config)
    _assert_tables(settings, [math, None, temperature, physics])
    settings.move(3, 1)  # 1 gets physics; 3 keeps a stale copy
    settings.set(3, None)
    settings.swap(0, 2)
    _assert_tables(settings, [temperature, physics, math, None])
    settings.set(2, physics)  # recycled
    _assert_tables(settings, [temperature, physics, physics, None])


def test_slot_settings_flush_copies_only_after_a_change():
    from em_inf.core import SlotSettings

    settings = SlotSettings(2, torch.device("cpu"))
    settings.set(0, PRESETS["math"])
    tables = settings.tables(torch.device("cpu"))
    tables.lr[0] = -1.0  # stands in for "not copied again"
    settings.flush()
    assert tables.lr[0] == -1.0
    settings.set(1, None)
    settings.flush()
    assert tables.lr[0] == PRESETS["math"].lr


def test_slot_settings_grow_past_their_slots_and_rebind():
    from em_inf.core import SlotSettings

    settings = SlotSettings(2, torch.device("cpu"))
    settings.set(0, PRESETS["math"])
    settings.set(9, PRESETS["adaptive-temperature"])
    assert settings.num_slots >= 10
    configs = [PRESETS["math"]] + [None] * 8 + [PRESETS["adaptive-temperature"]]
    _assert_tables(settings, configs)


def test_host_to_device_staging_reuses_its_buffer_when_copies_are_done():
    from em_inf.staging import HostToDevice

    staging = HostToDevice((3,), torch.int64, torch.device("cpu"))
    for step in range(3):
        staging.host()[:] = (step, step + 1, step + 2)
        staging.send()
        assert staging.device_tensor.tolist() == [step, step + 1, step + 2]
    assert staging.buffers == 1


# -- the operators' log line ----------------------------------------------------------


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_stats_log_one_line_per_interval_with_what_happened_since_the_last():
    from em_inf.counters import FIXED_POINT, HIST_BEFORE, SUM_AFTER, SUM_BEFORE
    from em_inf.stats import EMInfStats

    clock, lines, published = _Clock(), [], []
    stats = EMInfStats(
        interval=10.0, log=lines.append, clock=clock, publish=published.append
    )
    counters = stats.counters(torch.device("cpu"))
    counters[0, :4] += torch.tensor([2, 30, 1, 12])  # below, steps, restored, rows
    counters[0, HIST_BEFORE] += 11  # rows with an entropy (one restored for NaN)
    counters[0, SUM_BEFORE] += int(11 * 2.5 * FIXED_POINT)
    counters[0, SUM_AFTER] += int(11 * 0.25 * FIXED_POINT)
    counters[1, :4] += torch.tensor([1, 20, 0, 4])
    counters[1, HIST_BEFORE] += 4
    counters[1, SUM_BEFORE] += 4 * FIXED_POINT
    counters[1, SUM_AFTER] += 2 * FIXED_POINT
    stats.tick()
    assert lines == [] and published == []  # the interval has not passed
    clock.now += 10.0
    stats.tick()
    assert lines == [
        "EM-INF, last 10.0 s: logits mode 12 rows (2 already below threshold, "
        "2.50 Adam steps per row, entropy 2.500 -> 0.250 nats), temperature mode "
        "4 rows (1 already below threshold, 5.00 solver passes per row, entropy "
        "1.000 -> 0.500 nats), 1 rows restored by the fail-safe"
    ]
    assert len(published) == 1
    assert (published[0] == counters.numpy()).all()
    clock.now += 12.0
    stats.tick()  # nothing happened since: no line, nothing published
    assert len(lines) == 1 and len(published) == 1
    counters[0, 3] += 3
    clock.now += 10.0
    stats.tick()
    assert len(lines) == 2
    assert lines[1].startswith("EM-INF, last 10.0 s: logits mode 3 rows (0 already")
    assert "temperature mode 0 rows" in lines[1]
    assert published[1][0, 3] == 3 and published[1].sum() == 3


@pytest.mark.parametrize("value, interval", [("2.5", 2.5), ("0", 10.0), ("x", 10.0)])
def test_stats_interval_follows_vllm_log_stats_interval(monkeypatch, value, interval):
    from em_inf.stats import log_interval

    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", value)
    assert log_interval() == interval


def test_processor_logs_rows_per_mode_through_vllms_logger(
    monkeypatch, compiled_cpu_kernels
):
    """On the torch path the rows are counted on the host; the line goes to
    ``vllm.em_inf``, a child of vLLM's configured logger. (The kernels are loaded
    before the lines are collected: their build-or-load line comes once per
    process, from whichever test loads them first.)"""
    import logging

    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "1e-9")
    logger = logging.getLogger("vllm.em_inf")
    handler = Collect()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not the attribute: it clears the cache
    try:
        proc = v2_processor()
        proc.add_request(0, params({"em_inf": {"preset": "math"}}))
        proc.add_request(1, params({"em_inf": False}))
        proc.add_request(2, params({"em_inf": {"preset": "adaptive-temperature"}}))
        proc.apply_staged_writes()
        proc.apply(random_logits(3, VOCAB), v2_context([0, 1, 2]))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    started, line = lines  # the processor's start-up line, then the stats
    assert "on Model Runner V2" in started
    assert "logits mode 1 rows" in line and "temperature mode 1 rows" in line
