"""The ``EMInf`` processor built through vLLM's real interface classes, without an
engine: configs, a V2 processor on CPU tensors, V2 step contexts, request params."""

from __future__ import annotations

import numpy as np
import torch
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.v1.worker.gpu.sample.logits_processor import (
    LogitsContext,
    LogitsProcRequestState,
)

from em_inf import EMInf

VOCAB = 3_001


def make_config(em_inf=None, max_num_seqs=8) -> VllmConfig:
    """A ``VllmConfig`` with ``additional_config={"em_inf": em_inf}``."""
    config = VllmConfig(additional_config={"em_inf": em_inf} if em_inf else {})
    config.scheduler_config.max_num_seqs = max_num_seqs
    return config


def v2_processor(cls=EMInf, **config) -> EMInf:
    """``cls`` built as Model Runner V2 builds it, for CPU tensors of ``VOCAB``."""
    state = LogitsProcRequestState(
        device=torch.device("cpu"),
        max_num_reqs=8,
        vocab_size=VOCAB,
        all_token_ids=None,
        prompt_len=None,
        prefill_len=None,
        total_len=None,
    )
    return cls(make_config(**config), state)


def v2_context(row_slots) -> LogitsContext:
    """V2's step context for rows with these slots (one row per request)."""
    slots = torch.tensor(row_slots, dtype=torch.int32)
    return LogitsContext(
        expanded_idx_mapping=slots,
        idx_mapping=slots,
        idx_mapping_np=np.asarray(row_slots, dtype=np.int32),
        expanded_local_pos=torch.zeros_like(slots),
        input_ids=torch.zeros_like(slots),
        pos=torch.zeros_like(slots),
        seq_lens_upper_bound_np=np.ones(len(row_slots), dtype=np.int32),
    )


def params(extra_args=None) -> SamplingParams:
    """``SamplingParams`` carrying ``extra_args``."""
    return SamplingParams(extra_args=extra_args)
