"""EM-INF in a real vLLM engine on a real instruction-tuned model,
SmolLM2-135M-Instruct (bf16, vocabulary 49,152), prepared locally."""

from __future__ import annotations

import pytest
import torch

from em_inf import PRESETS
from em_inf.models import prepare_default_model
from tests.oracle import assert_matches, settings_oracle
from tests.vllm_engines import engine, full_vocab_params, generate, processed_logits

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Compute 17 * 3. Show your reasoning briefly.",
]
CASES = [
    ("off", {"em_inf": False}, None),
    ("math", {"em_inf": {"preset": "math"}}, PRESETS["math"]),
    ("default", None, PRESETS["default"]),
    (
        "temperature",
        {"em_inf": {"mode": "temperature", "alpha": 0.7}},
        PRESETS["default"].replace(mode="temperature", alpha=0.7),
    ),
]


@pytest.fixture(scope="module")
def llm():
    with engine(str(prepare_default_model()), max_model_len=512) as llm:
        yield llm


@pytest.fixture(scope="module")
def vocab_size(llm):
    return llm.llm_engine.model_config.get_vocab_size()


def chat_prompt(llm, question: str) -> str:
    """The model's chat template applied to one user turn, as text."""
    messages = [{"role": "user", "content": question}]
    return llm.get_tokenizer().apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )


def test_first_token_logits_match_reference(llm, vocab_size):
    prompts = [chat_prompt(llm, q) for q in QUESTIONS]
    requests = [
        (p, name, extra) for p in range(len(prompts)) for name, extra, _ in CASES
    ]
    outputs = generate(
        llm,
        [prompts[p] for p, _, _ in requests],
        [full_vocab_params(extra) for _, _, extra in requests],
    )
    got = {
        (p, name): processed_logits(out, vocab_size)
        for (p, name, _), out in zip(requests, outputs, strict=True)
    }
    for p in range(len(prompts)):
        raw = got[(p, "off")]
        for name, _, config in CASES[1:]:
            assert_matches(got[(p, name)], settings_oracle(raw, config))


def test_greedy_em_inf_answer_stays_sensible(llm):
    from vllm import SamplingParams

    prompt = chat_prompt(llm, QUESTIONS[0])
    params = SamplingParams(
        max_tokens=24, temperature=0.0, extra_args={"em_inf": {"preset": "math"}}
    )
    (out,) = generate(llm, [prompt], [params])
    assert "Paris" in out.text, out.text


def test_em_inf_at_temperature_0_1_is_sharper_than_plain_sampling(llm, vocab_size):
    """What the paper runs: EM-INF, then sampling at T = 0.1. The entropy of what
    vLLM samples from drops at every step where EM-INF acts."""
    prompt = chat_prompt(llm, QUESTIONS[1])
    on = full_vocab_params({"em_inf": {"preset": "default"}}, max_tokens=1)
    off = full_vocab_params({"em_inf": False}, max_tokens=1)
    plain, sharpened = (
        processed_logits(out, vocab_size)
        for out in generate(llm, [prompt] * 2, [off, on])
    )

    def entropy(z):
        logq = torch.log_softmax(z.double(), -1)
        return -(logq.exp() * logq.nan_to_num(neginf=0.0)).sum()

    assert entropy(sharpened) < entropy(plain)
