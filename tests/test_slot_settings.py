"""SlotSettings' one host table: its read-only views, the device tables copied
from it and the rows of a batch per mode made from it (kept while nothing changes)
agree with a plain model of per-slot dicts after any sequence of sets, moves,
swaps and growth (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from em_inf.config import MODES, EMInfConfig
from em_inf.core import SlotSettings, SlotTables
from em_inf.modes import PARAMS

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
MOST_SLOTS = 25
slots = st.integers(0, MOST_SLOTS - 1)
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


def _check_mode_rows(table: SlotSettings, model: list[dict], batch: np.ndarray) -> None:
    """``mode_rows`` of a batch whose rows are the slots in ``batch`` (those the
    table has): per mode in ``MODES`` order, the rows whose slot uses it and their
    settings, as the model has them now; the same object when asked again with
    nothing changed."""
    model = _padded(table, model)
    row_slots = batch[batch < table.num_slots]
    made = table.mode_rows(row_slots, CPU)
    assert table.mode_rows(row_slots, CPU) is made
    expected: dict[str, list[int]] = {}
    for row, slot in enumerate(row_slots):
        if model[slot]["enabled"]:
            mode = "temperature" if model[slot]["temperature_mode"] else "logits"
            expected.setdefault(mode, []).append(row)
    assert [rows.mode for rows in made] == [m for m in MODES if m in expected]
    for rows in made:
        chosen = expected[rows.mode]
        assert rows.code == MODES.index(rows.mode)
        if len(chosen) == len(row_slots):
            assert rows.index is None
        else:
            assert rows.index.tolist() == chosen
        for name, column in zip(PARAMS[rows.mode], rows.params, strict=True):
            kind = np.int64 if name == "steps" else np.float32
            want = np.array([model[row_slots[r]][name] for r in chosen], kind)
            np.testing.assert_array_equal(column.numpy(), want, err_msg=name)


@settings(max_examples=150, deadline=None)
@given(
    num_slots=st.integers(0, 6),
    bind=st.booleans(),
    operations=operations,
    batch=st.lists(slots, min_size=1, max_size=8),
    batch_dtype=st.sampled_from([np.int32, np.int64]),
)
def test_views_and_device_tables_follow_any_sets_moves_swaps_and_growth(
    num_slots, bind, operations, batch, batch_dtype
):
    """``bind``: device tables from the start, checked after every operation (so
    growth rebinds them); else bound and checked at the end only. The rows per
    mode of a batch of the drawn slots (any order, repeats) followed by every
    slot are checked after every operation."""
    batch = np.array(batch + list(range(MOST_SLOTS)), dtype=batch_dtype)
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
        _check_mode_rows(table, model, batch)
        if bind:
            _check_device(table, model)
    _check_device(table, model)


def test_views_are_read_only():
    table = SlotSettings(2)
    table.set(0, EMInfConfig())
    for name in VIEWS:
        with pytest.raises(ValueError, match="read-only"):
            getattr(table, name)[0] = 1


def test_batches_with_the_same_bytes_in_other_dtypes_are_told_apart():
    """int64 [1] and int32 [1, 0] are the same eight bytes."""
    table = SlotSettings(2)
    table.set(1, EMInfConfig(steps=4))
    (one,) = table.mode_rows(np.array([1], np.int64), CPU)
    (two,) = table.mode_rows(np.array([1, 0], np.int32), CPU)
    assert one.index is None and two.index.tolist() == [0]


@pytest.mark.parametrize("change", ["set", "move", "swap"])
def test_the_rows_per_mode_are_made_again_after_each_kind_of_change(change):
    """Against a table given the same settings directly."""
    first, other = EMInfConfig(steps=4), EMInfConfig(steps=2, lr=0.5)
    table = SlotSettings(3)
    table.set(0, first)
    batch = np.arange(3)
    table.mode_rows(batch, CPU)
    if change == "set":
        table.set(1, other)
        now = [first, other, None]
    elif change == "move":
        table.move(0, 1)
        now = [first, first, None]
    else:
        table.swap(0, 2)
        now = [None, None, first]
    fresh = SlotSettings(3)
    for slot, config in enumerate(now):
        fresh.set(slot, config)
    got, want = table.mode_rows(batch, CPU), fresh.mode_rows(batch, CPU)
    assert [(r.mode, r.code) for r in got] == [(r.mode, r.code) for r in want]
    for mine, theirs in zip(got, want, strict=True):
        assert (mine.index is None) == (theirs.index is None)
        if mine.index is not None:
            assert torch.equal(mine.index, theirs.index)
        for a, b in zip(mine.params, theirs.params, strict=True):
            assert torch.equal(a, b)
