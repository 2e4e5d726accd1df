"""EMInfConfig: presets, construction, per-request parsing, and error messages."""

from __future__ import annotations

import math

import pytest

from em_inf.config import (
    FIELD_NAMES,
    PRESET_SOURCES,
    PRESETS,
    EMInfConfig,
    RequestSettings,
    make_config,
    parse_request,
)
from tests.published_presets import PUBLISHED, SCICODE_SWEEP


def test_presets_hold_the_authors_published_values():
    # Literal values from the authors' scripts and Algorithm 1, written out by hand
    # in tests/published_presets.py.
    assert set(PRESETS) == set(PUBLISHED)
    for name, values in PUBLISHED.items():
        assert PRESETS[name].as_dict() == values, name
    assert set(PRESET_SOURCES) == set(PRESETS)


def test_scicode_lies_inside_the_authors_sweep():
    """The authors published a sweep for SciCode, not a point (their table:
    delta 0.05-0.5, lam 0.001-0.01, eta 0.01-0.1, n 3-5)."""
    scicode = PRESETS["scicode"]
    for field, (low, high) in SCICODE_SWEEP.items():
        assert low <= getattr(scicode, field) <= high, field


def test_keyword_dict_and_preset_forms_agree():
    by_keywords = make_config(preset="math", lr=0.05)
    by_dict = EMInfConfig().updated({"preset": "math", "lr": 0.05})
    by_preset = EMInfConfig.from_preset("math", lr=0.05)
    assert by_keywords == by_dict == by_preset
    assert by_keywords.lr == 0.05 and by_keywords.threshold == 0.1


def test_a_preset_in_a_dict_replaces_the_base_before_overrides():
    base = PRESETS["physics"].replace(steps=9)
    assert base.updated({"preset": "default"}) == PRESETS["default"]
    assert base.updated({"lr": 0.2}) == PRESETS["physics"].replace(steps=9, lr=0.2)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("mode", "logit", ["mode", "logits", "temperature"]),
        ("threshold", -0.1, ["threshold", "[0, 1000]"]),
        ("threshold", 1e300, ["threshold", "[0, 1000]"]),
        ("threshold", math.nan, ["threshold"]),
        ("kl_weight", "0.1", ["kl_weight", "number"]),
        ("lr", 0.0, ["lr", "(0, 100]"]),
        ("lr", 101.0, ["lr", "(0, 100]"]),
        ("kl_weight", 1e4, ["kl_weight", "[0, 1000]"]),
        ("lr", True, ["lr"]),
        ("steps", 2.5, ["steps", "integer"]),
        ("steps", 101, ["steps", "[0, 100]"]),
        ("alpha", 0.0, ["alpha", "(0, 1]"]),
        ("alpha", 1.5, ["alpha"]),
        ("t_min", 0.0, ["t_min", "[0.0001, 10000]"]),
        ("t_max", 3e38, ["t_max", "[0.0001, 10000]"]),
        ("t_max", math.inf, ["t_max"]),
    ],
)
def test_invalid_values_name_the_field_and_range(field, value, words):
    with pytest.raises(ValueError) as err:
        EMInfConfig(**{field: value})
    for word in words:
        assert word in str(err.value)


def test_t_min_above_t_max_is_rejected():
    with pytest.raises(ValueError, match="t_min"):
        EMInfConfig(t_min=0.5, t_max=0.4)


def test_unknown_keys_and_presets_are_rejected_with_the_allowed_names():
    with pytest.raises(ValueError, match="learning_rate") as err:
        make_config(learning_rate=0.1)
    assert all(name in str(err.value) for name in FIELD_NAMES)
    with pytest.raises(ValueError, match="'fast'"):
        make_config(preset="fast")


@pytest.mark.parametrize(
    "extra_args, expected",
    [
        (None, PRESETS["math"]),
        ({}, PRESETS["math"]),
        ({"kv_transfer_params": {"a": 1}}, PRESETS["math"]),
        ({"em_inf": False}, None),
        ({"em_inf": "off"}, None),
        ({"em_inf": 0}, None),
        ({"em_inf": True}, PRESETS["math"]),
        ({"em_inf": "on"}, PRESETS["math"]),
        ({"em_inf": {"lr": 0.2}}, PRESETS["math"].replace(lr=0.2)),
        ({"em_inf": {"preset": "physics"}}, PRESETS["physics"]),
        (
            {"em_inf_preset": "physics", "em_inf_lr": 0.3},
            PRESETS["physics"].replace(lr=0.3),
        ),
        (
            {"em_inf_steps": "4", "em_inf_lr": "0.2"},
            PRESETS["math"].replace(steps=4, lr=0.2),
        ),
        (
            {"em_inf": {"lr": 0.2}, "em_inf_steps": 1},
            PRESETS["math"].replace(lr=0.2, steps=1),
        ),
    ],
)
def test_parse_request_with_an_engine_default(extra_args, expected):
    assert parse_request(extra_args, PRESETS["math"]) == expected


def test_parse_request_when_em_inf_is_opt_in_keeps_the_engine_settings():
    engine = PRESETS["physics"].replace(steps=2)
    assert parse_request(None, engine, enabled=False) is None
    assert parse_request({"em_inf_lr": 0.2, "x": 1}, engine, enabled=False) == (
        engine.replace(lr=0.2)
    )
    assert parse_request({"other": 1}, engine, enabled=False) is None
    assert parse_request({"em_inf": True}, engine, enabled=False) == engine
    assert parse_request({"em_inf": {"lr": 0.2}}, engine, enabled=False) == (
        engine.replace(lr=0.2)
    )


@pytest.mark.parametrize(
    "extra_args, words",
    [
        ({"em_inf": "maybe"}, ["em_inf", "on", "off"]),
        ({"em_inf": [1, 2]}, ["em_inf"]),
        ({"em_inf": 2}, ["em_inf"]),
        ({"em_inf_rate": 0.1}, ["em_inf_rate", "em_inf_lr"]),
        ({"em_inf_lr": "fast"}, ["em_inf_lr", "numeric"]),
        ({"em_inf": False, "em_inf_lr": 0.1}, ["off", "lr"]),
        ({"em_inf": {"preset": 3}}, ["preset"]),
        ({"em_inf": {"steps": -1}}, ["steps"]),
    ],
)
def test_parse_request_rejects_bad_input_with_a_clear_message(extra_args, words):
    with pytest.raises(ValueError) as err:
        parse_request(extra_args, PRESETS["default"])
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(
    "extra_args",
    [
        None,
        {"em_inf": False},
        {"em_inf": "on"},
        {"em_inf": {}},
        {"em_inf": {"preset": "physics", "lr": 0.3}},
        {"em_inf_steps": "4", "em_inf_mode": "temperature", "em_inf": 1},
        {"em_inf": {"lr": 0.2}, "em_inf_steps": 1, "kv_transfer_params": {}},
    ],
)
def test_request_settings_travel_as_flat_keys_unchanged(extra_args):
    """What a request asks for, written as flat keys (``vllm_xargs``) and read back,
    is the same value, and resolves to the same settings on every engine."""
    request = RequestSettings.parse(extra_args)
    travelled = RequestSettings.parse(request.as_extra_args())
    assert travelled == request
    for default, enabled in [(PRESETS["math"], True), (PRESETS["code"], False)]:
        assert travelled.resolve(default, enabled=enabled) == parse_request(
            extra_args, default, enabled=enabled
        )


def test_only_the_temperature_bounds_make_a_request_valid_for_one_engine_only():
    """A request's own checks need no engine; with the engine's settings applied,
    ``t_min <= t_max`` may still fail, naming both."""
    request = RequestSettings.parse({"em_inf": {"t_max": 0.02}})
    assert request.resolve(PRESETS["default"]) == PRESETS["default"].replace(t_max=0.02)
    with pytest.raises(ValueError, match="'t_max' \\(0.02\\)"):
        request.resolve(PRESETS["default"].replace(t_min=0.05))
    with pytest.raises(ValueError, match="turned off"):
        RequestSettings(switch=False, overrides={"lr": 0.1})
