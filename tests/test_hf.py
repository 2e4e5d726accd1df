"""``em_inf.hf.EMInfLogitsProcessor`` inside transformers' ``generate`` on the real
SmolLM2-135M-Instruct (float32, CPU), against the float64 oracle, and against vLLM
with ``EMInf`` on the same prompts (one engine start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from em_inf import PRESETS
from em_inf.config import make_config
from em_inf.hf import EMInfLogitsProcessor
from em_inf.models import prepare_default_model
from tests.inputs import mask_randomly, random_logits
from tests.oracle import assert_matches, settings_oracle

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Compute 17 * 3.",
    "Name three primary colours and say which one you like best, briefly.",
]
MATH = PRESETS["math"]
ADAPTIVE = PRESETS["default"].replace(mode="temperature", alpha=0.7)


class Recorder(transformers.LogitsProcessor):
    """Keeps a copy of the scores it is handed (placed before EM-INF: its input)."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.clone())
        return scores


# ----------------------------------------------------------- settings, no model


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, PRESETS["default"]),
        ({"preset": "math", "lr": 0.05}, MATH.replace(lr=0.05)),
        ({"mode": "temperature", "alpha": 0.7}, ADAPTIVE),
        ({"preset": "adaptive-temperature"}, PRESETS["adaptive-temperature"]),
    ],
)
def test_settings_and_presets_are_those_of_make_config(kwargs, expected):
    processor = EMInfLogitsProcessor(**kwargs)
    assert processor.settings == expected == make_config(**kwargs)
    assert processor.per_row is None and processor.temperature == 1.0


def test_per_row_entries_apply_on_top_of_the_processor_settings():
    processor = EMInfLogitsProcessor(
        preset="math",
        per_row=[
            {"lr": 0.05},
            {"preset": "physics"},
            False,
            True,
            "off",
            ADAPTIVE,
            None,
        ],
    )
    assert processor.per_row == (
        MATH.replace(lr=0.05),
        PRESETS["physics"],
        None,
        MATH,
        None,
        ADAPTIVE,
        None,
    )


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lr": -1}, "'lr'"),
        ({"steps": 2.5}, "'steps'"),
        ({"mode": "entropy"}, "'mode'"),
        ({"t_min": 0.5, "t_max": 0.2}, "'t_min'"),
        ({"preset": "nope"}, "preset"),
        ({"learning_rate": 0.1}, "learning_rate"),
        ({"temperature": 0}, "'temperature'"),
        ({"temperature": "0.1"}, "'temperature'"),
        (
            {"per_row": [{"lr": 0.1}, {"threshold": -1}]},
            "per_row[1]: em_inf: 'threshold'",
        ),
        ({"per_row": [{"preset": "nope"}]}, "per_row[0]: em_inf: unknown preset"),
        ({"per_row": [2]}, "per_row[0]"),
        ({"per_row": {"lr": 0.1}}, "per_row"),
        ({"per_row": []}, "per_row"),
    ],
)
def test_bad_settings_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError) as err:
        EMInfLogitsProcessor(**kwargs)
    assert field in str(err.value)


def test_per_row_must_fit_the_batch():
    processor = EMInfLogitsProcessor(per_row=[MATH, MATH, None])
    with pytest.raises(ValueError, match="per_row has 3 entries but the batch has 4"):
        processor(torch.zeros(4, 1, dtype=torch.long), torch.randn(4, 16))


# ------------------------------------------------------ random logits, no model


@pytest.mark.parametrize("repeat", [1, 3])
def test_mixed_rows_match_the_oracle(generator, repeat):
    """Per-prompt settings (both modes, EM-INF off) over ``repeat`` rows each, as
    ``num_return_sequences`` lays them out; masked entries included."""
    per_row = [MATH, None, ADAPTIVE, PRESETS["physics"]]
    rows = [config for config in per_row for _ in range(repeat)]
    logits = mask_randomly(random_logits(len(rows), 4099, generator=generator), 0.1)
    processor = EMInfLogitsProcessor(per_row=per_row, temperature=0.5)
    out = processor(torch.zeros(len(rows), 1, dtype=torch.long), logits)
    assert_matches(out * 0.5, settings_oracle(logits, rows))
    assert torch.equal(out[repeat : 2 * repeat], logits[repeat : 2 * repeat] / 0.5)


def test_log_probability_rows_leave_as_log_probabilities(generator):
    """Beam search hands processors log-probabilities: EM-INF sees the same
    distribution and returns the log-probabilities of the EM-INF distribution."""
    logits = random_logits(4, 4099, generator=generator)
    processor = EMInfLogitsProcessor(per_row=[MATH, ADAPTIVE])
    log_probs = torch.log_softmax(logits, dim=-1)
    out = processor(torch.zeros(4, 1, dtype=torch.long), log_probs)
    rows = [MATH, MATH, ADAPTIVE, ADAPTIVE]
    assert_matches(out, torch.log_softmax(settings_oracle(logits, rows), -1))


WITHOUT_TRANSFORMERS = """
import sys
sys.modules["transformers"] = None  # as if it were not installed
import em_inf, em_inf.functional
try:
    import em_inf.hf
except ImportError as err:
    print(err)
"""


def test_em_inf_imports_without_transformers():
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRANSFORMERS],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pip install 'em-inf[hf]'" in run.stdout


KERNEL_RUN = """
import json, sys, torch
from em_inf import functional
from em_inf.hf import EMInfLogitsProcessor
logits, per_row = torch.load(sys.argv[1]), json.loads(sys.argv[3])
assert functional.backend_for(logits.device) == "triton"
processor = EMInfLogitsProcessor(per_row=per_row, temperature=0.5)
out = processor(torch.zeros(len(logits), 1, dtype=torch.long), logits)
assert "em_inf.kernels" in sys.modules
torch.save(out, sys.argv[2])
"""


def test_triton_kernels_give_the_same_rows(generator, tmp_path):
    """The Triton path (what CUDA tensors take), run by Triton's interpreter in a
    process of its own (the interpreter switch is process-wide)."""
    per_row = [{"preset": "math"}, False, {"mode": "temperature", "alpha": 0.7}]
    rows = [config for config in (MATH, None, ADAPTIVE) for _ in range(2)]
    logits = mask_randomly(random_logits(len(rows), 4099, generator=generator), 0.1)
    torch.save(logits, tmp_path / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", EM_INF_BACKEND="triton")
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            KERNEL_RUN,
            tmp_path / "in.pt",
            tmp_path / "out.pt",
            json.dumps(per_row),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert_matches(out * 0.5, settings_oracle(logits, rows))


# ------------------------------------------------------------ SmolLM2, generate


@pytest.fixture(scope="module")
def model_dir():
    return prepare_default_model(progress=False)


@pytest.fixture(scope="module")
def model(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir, padding_side="left")


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    """The chat-templated questions as token ids (of different lengths)."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def padded(tokenizer, prompt_ids):
    """The prompts as one left-padded batch (``input_ids``, ``attention_mask``)."""
    batch = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the batch should need padding"
    return dict(batch)


def generate(model, padded, processors, **kwargs):
    """``model.generate`` on the padded batch, returning scores per step."""
    options = dict(
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    options.update(kwargs)
    with torch.no_grad():
        return model.generate(
            **padded,
            logits_processor=transformers.LogitsProcessorList(processors),
            **options,
        )


def test_greedy_padded_batch_matches_the_oracle_at_every_step(model, padded):
    """Left-padded batch, one setting per prompt (logits mode, temperature mode,
    off): every step's scores are the oracle's of the raw logits EM-INF was given,
    and greedy picks their argmax."""
    per_row = [MATH, ADAPTIVE, None]
    recorder = Recorder()
    out = generate(model, padded, [recorder, EMInfLogitsProcessor(per_row=per_row)])
    assert len(out.scores) == len(recorder.steps) == 6
    changed = 0
    for step, (raw, processed) in enumerate(
        zip(recorder.steps, out.scores, strict=True)
    ):
        expected = settings_oracle(raw, per_row)
        try:
            assert_matches(processed, expected)
        except AssertionError as err:
            raise AssertionError(f"step {step}: {err}") from None
        assert torch.equal(processed[2], raw[2]), "EM-INF off: scores untouched"
        new_tokens = out.sequences[:, padded["input_ids"].shape[1] + step]
        assert new_tokens.tolist() == processed.argmax(-1).tolist()
        changed += int((expected[:2] != raw[:2].double()).any(-1).sum())
    assert changed >= 6, "EM-INF should act on most steps of these rows"


@pytest.mark.parametrize("where", ["processor", "generate"])
def test_sampling_draws_from_em_inf_then_temperature(seed, model, padded, where):
    """The paper's order, EM-INF on the raw logits, then temperature 0.1: what
    ``generate`` samples from is ``softmax(EM-INF(z) / 0.1)``, with the temperature
    given to the processor (the documented way) or, on this transformers, to
    ``generate`` (it runs user processors before its own temperature warper).
    Each prompt's settings cover its num_return_sequences=2 rows."""
    torch.manual_seed(seed)
    per_row = [MATH, ADAPTIVE, PRESETS["default"]]
    recorder = Recorder()
    temperature = {"processor": 0.1, "generate": 1.0}[where]
    processor = EMInfLogitsProcessor(per_row=per_row, temperature=temperature)
    out = generate(
        model,
        padded,
        [recorder, processor],
        max_new_tokens=3,
        do_sample=True,
        top_k=0,
        temperature=0.1 if where == "generate" else 1.0,
        num_return_sequences=2,
    )
    rows = [config for config in per_row for _ in range(2)]
    for step, (raw, sampled_from) in enumerate(
        zip(recorder.steps, out.scores, strict=True)
    ):
        try:
            assert_matches(sampled_from, settings_oracle(raw, rows) / 0.1)
        except AssertionError as err:
            raise AssertionError(f"step {step}: {err}") from None


def test_beam_search_ranks_by_em_inf_log_probabilities(model, padded):
    """In beam search every beam's next-token scores are ``log_softmax`` of the
    EM-INF logits of its raw logits, what transformers adds to the beam scores."""
    per_row = [MATH, ADAPTIVE, PRESETS["default"]]
    recorder = Recorder()
    out = generate(
        model,
        padded,
        [recorder, EMInfLogitsProcessor(per_row=per_row)],
        max_new_tokens=3,
        num_beams=2,
        num_return_sequences=2,
        output_logits=True,
    )
    rows = [config for config in per_row for _ in range(2)]
    for step, (raw, log_probs) in enumerate(zip(out.logits, out.scores, strict=True)):
        try:
            assert_matches(
                log_probs, torch.log_softmax(settings_oracle(raw, rows), dim=-1)
            )
        except AssertionError as err:
            raise AssertionError(f"step {step}: {err}") from None
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            recorder.steps, [torch.log_softmax(r, -1) for r in out.logits], strict=True
        )
    )


# ------------------------------------------------------------ against vLLM


def test_greedy_tokens_and_distributions_match_vllm(model, padded, prompt_ids):
    """Float32 SmolLM2, greedy, the same token ids: transformers with
    ``EMInfLogitsProcessor`` and vLLM with ``EMInf`` pick the same tokens, and at
    every step vLLM's distribution is the float64 oracle's on vLLM's own raw logits
    (the README's standard, TV <= 1e-5; the raw logits are the engine's with
    ``"em_inf": false`` on each generated prefix). The two engines' float32 forward
    passes themselves differ (raw logits by ~1e-4 here): that is a model check, of
    the raw logits, within 1e-3."""
    from tests.vllm_engines import engine, full_vocab_params, processed_logits

    settings = [{"preset": "math"}, {"mode": "temperature", "alpha": 0.7}, {}]
    max_tokens = 8
    out = generate(
        model,
        padded,
        [EMInfLogitsProcessor(per_row=settings)],
        max_new_tokens=max_tokens,
        output_logits=True,
    )
    hf_tokens = out.sequences[:, padded["input_ids"].shape[1] :].tolist()
    vocab = model.config.vocab_size
    with engine(str(prepare_default_model(progress=False)), dtype="float32") as llm:
        outputs = llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids],
            [full_vocab_params({"em_inf": s}, max_tokens=max_tokens) for s in settings],
            use_tqdm=False,
        )
        generated = [list(output.outputs[0].token_ids) for output in outputs]
        prefixes = [
            (row, ids + generated[row][:position])
            for row, ids in enumerate(prompt_ids)
            for position in range(len(generated[row]))
        ]
        raw_outputs = llm.generate(
            [{"prompt_token_ids": ids} for _, ids in prefixes],
            [full_vocab_params({"em_inf": False})] * len(prefixes),
            use_tqdm=False,
        )
    raw_rows: dict[int, list[torch.Tensor]] = {row: [] for row in range(len(settings))}
    for (row, _), raw in zip(prefixes, raw_outputs, strict=True):
        raw_rows[row].append(processed_logits(raw.outputs[0], vocab)[0])
    for row, output in enumerate(outputs):
        vllm_tokens = generated[row]
        assert len(vllm_tokens) == max_tokens or (
            vllm_tokens[-1] == model.generation_config.eos_token_id
        )
        assert hf_tokens[row][: len(vllm_tokens)] == vllm_tokens, (
            f"prompt {row}: transformers {hf_tokens[row]} vs vLLM {vllm_tokens}"
        )
        vllm_scores = processed_logits(output.outputs[0], vocab)
        vllm_raw = torch.stack(raw_rows[row])
        config = make_config(**settings[row])
        try:
            assert_matches(vllm_scores, settings_oracle(vllm_raw, config))
            hf_raw = torch.stack([step[row] for step in out.logits])
            # The model check: log-probabilities within d = 1e-3 of each other
            # bound TV by 1 - exp(-d) < 1e-3 (TV = sum_i p_i (1 - q_i/p_i)+), so
            # the TV allowance adds nothing beyond the logprob bound.
            assert_matches(
                torch.log_softmax(vllm_raw, -1),
                torch.log_softmax(hf_raw[: len(vllm_tokens)].double(), -1),
                tv_tol=1e-3,
                logit_tol=1e-3,
            )
        except AssertionError as err:
            raise AssertionError(f"prompt {row}: {err}") from None
