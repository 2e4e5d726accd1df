"""SlotSettings' one host table: its read-only views and the device tables copied
from it agree with a plain model of per-slot dicts after any sequence of sets,
moves, swaps and growth (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from em_inf.config import EMInfConfig
from em_inf.core import SlotSettings, SlotTables

CPU = torch.device("cpu")
FIELDS = ("threshold", "kl_weight", "lr", "alpha", "t_min", "t_max")
#: A slot without EM-INF (never set, or set to ``None``).
OFF = {
    "enabled": False,
    "temperature_mode": False,
    "steps": 0,
    "temperature_threshold": math.inf,
    **dict.fromkeys(FIELDS, 0.0),
}


def entry(config: EMInfConfig | None) -> dict:
    """The reference model of one slot given ``config``: its field values."""
    if config is None:
        return dict(OFF)
    temperature = config.mode == "temperature"
    return {
        "enabled": True,
        "temperature_mode": temperature,
        "steps": 0 if temperature else config.steps,
        "temperature_threshold": config.threshold if temperature else math.inf,
        **{name: getattr(config, name) for name in FIELDS},
    }


def _positive(high: float) -> st.SearchStrategy[float]:
    return st.floats(0.0, high, exclude_min=True)


configs = st.one_of(
    st.none(),
    st.builds(
        EMInfConfig,
        mode=st.sampled_from(["logits", "temperature"]),
        threshold=st.floats(0.0, 1e3),
        kl_weight=st.floats(0.0, 1e3),
        lr=_positive(1e2),
        steps=st.integers(0, 100),
        alpha=_positive(1.0),
        t_min=st.floats(1e-4, 1.0),
        t_max=st.floats(1.0, 1e4),
    ),
)
slots = st.integers(0, 24)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), slots, configs),
        st.tuples(st.just("move"), slots, slots),
        st.tuples(st.just("swap"), slots, slots),
        st.tuples(st.just("flush")),
    ),
    max_size=30,
)


VIEWS = {
    "enabled": np.bool_,
    "temperature_mode": np.bool_,
    "steps": np.int32,
    "temperature_threshold": np.float32,
    **dict.fromkeys(FIELDS, np.float32),
}


def _padded(table: SlotSettings, model: list[dict]) -> list[dict]:
    """``model`` up to the table's slots: those past its end are :data:`OFF`."""
    assert table.num_slots >= len(model)
    return model + [OFF] * (table.num_slots - len(model))


def _check_views(table: SlotSettings, model: list[dict]) -> None:
    """Every view equals the model at every slot, with its dtype."""
    model = _padded(table, model)
    for name, dtype in VIEWS.items():
        view = getattr(table, name)
        assert view.dtype == dtype, name
        want = np.array([slot[name] for slot in model], dtype=dtype)
        np.testing.assert_array_equal(view, want, err_msg=name)


def _check_device(table: SlotSettings, model: list[dict]) -> None:
    """Every device table (:class:`SlotTables`) equals the model at every slot:
    float32, ``steps`` int32."""
    model = _padded(table, model)
    device = table.tables(CPU)
    for name in SlotTables._fields:
        tensor = getattr(device, name)
        assert tensor.dtype == (torch.int32 if name == "steps" else torch.float32)
        want = np.array([slot[name] for slot in model], dtype=VIEWS[name])
        np.testing.assert_array_equal(tensor.numpy(), want, err_msg=name)


@settings(max_examples=150, deadline=None)
@given(num_slots=st.integers(0, 6), bind=st.booleans(), operations=operations)
def test_views_and_device_tables_follow_any_sets_moves_swaps_and_growth(
    num_slots, bind, operations
):
    """``bind``: device tables from the start, checked after every operation (so
    growth rebinds them); else bound and checked at the end only."""
    table = SlotSettings(num_slots, CPU if bind else None)
    model = [dict(OFF) for _ in range(num_slots)]
    for kind, *args in operations:
        if kind == "flush":
            table.flush()
            continue
        used = args[:1] if kind == "set" else args
        model += [dict(OFF) for _ in range(max(used) + 1 - len(model))]
        if kind == "set":
            slot, config = args
            table.set(slot, config)
            model[slot] = entry(config)
        elif kind == "move":
            src, dst = args
            table.move(src, dst)
            model[dst] = dict(model[src])
        else:
            a, b = args
            table.swap(a, b)
            model[a], model[b] = model[b], model[a]
        _check_views(table, model)
        if bind:
            _check_device(table, model)
    _check_device(table, model)


def test_views_are_read_only():
    table = SlotSettings(2)
    table.set(0, EMInfConfig())
    for name in VIEWS:
        with pytest.raises(ValueError, match="read-only"):
            getattr(table, name)[0] = 1
