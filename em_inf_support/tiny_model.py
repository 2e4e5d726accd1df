"""The tiny random model the tests and benchmarks serve, built here in seconds.

``make_tiny_model(path)`` / ``tiny_model_dir()``: a tiny random Qwen2 (2 layers,
hidden 128, head_dim 64) with a wide vocabulary (151,936 by default, Qwen2.5's) and a
small byte-level BPE tokenizer, for fast tests where only shapes and speed matter.
Cached under em-inf's cache (``em_inf.models.cache_root()``) and built the way the
default model is (``em_inf.models.build_once``: a marker written last, a rename into
place, a file lock for concurrent builders).

Command line (prints the directory on stdout)::

    python -m em_inf_support.tiny_model [--vocab-size 151936]

Heavy imports (torch, transformers, tokenizers) happen inside the functions, so
importing this module is cheap.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from em_inf.models import Progress, build_once, cache_root, edit_json

TINY_MODEL_PREFIX = "tiny-qwen2"
TINY_VOCAB_SIZE = 151_936  # Qwen2.5's vocabulary width
# Weight init std of the tiny model. transformers' default (0.02) gives logits with
# std ~0.2, i.e. nearly uniform next-token distributions over 151,936 tokens; 0.1
# gives logits with std of order 1, so distributions have structure to sharpen.
TINY_INITIALIZER_RANGE = 0.1

TINY_RECIPE = "tiny-qwen2/v1"

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# ChatML, as used by Qwen2 and SmolLM2 (without a default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Text the tiny tokenizer's BPE merges are learnt from (any text works; all 256
# bytes are in its alphabet, so every string can be encoded).
TINY_CORPUS = (
    "The capital of France is Paris.",
    "What is 12 + 30? The answer is 42.",
    "Entropy minimization sharpens the next-token distribution at inference time.",
    "A language model assigns probabilities to the next token given the context.",
    "Solve for x: 3x + 5 = 20, so x = 5.",
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000",
)


def _train_tiny_tokenizer(out_dir: Path) -> dict[str, int]:
    """Train a byte-level BPE tokenizer and save it with a ChatML template.

    Returns the ids of the special tokens (``<|endoftext|>``, ``<|im_start|>``,
    ``<|im_end|>``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [END_OF_TEXT, IM_START, IM_END]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TINY_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        unk_token=None,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))

    def fix_tokenizer_config(config: dict) -> None:
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config["chat_template"] = CHATML_TEMPLATE
        for key in ("is_local", "local_files_only", "backend"):
            config.pop(key, None)

    edit_json(out_dir / "tokenizer_config.json", fix_tokenizer_config)
    (out_dir / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    return {token: backend.token_to_id(token) for token in specials}


def _save_tiny_weights(
    out_dir: Path,
    *,
    name: str,
    vocab_size: int,
    seed: int,
    special_ids: dict[str, int],
) -> None:
    """Save a random 2-layer Qwen2 (float32 safetensors) drawn from ``seed``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,  # head_dim 64: vLLM's CPU attention refuses 16
        max_position_embeddings=4096,
        initializer_range=TINY_INITIALIZER_RANGE,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=special_ids[IM_END],
        pad_token_id=special_ids[END_OF_TEXT],
        rope_theta=10_000.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=special_ids[IM_END], pad_token_id=special_ids[END_OF_TEXT]
    )
    model.save_pretrained(str(out_dir))

    def fix_config(saved: dict) -> None:
        rope = saved.get("rope_parameters") or {}
        saved.setdefault("rope_theta", float(rope.get("rope_theta", 10_000.0)))
        saved["_name_or_path"] = name

    edit_json(out_dir / "config.json", fix_config)


def make_tiny_model(
    path: str | os.PathLike[str], *, vocab_size: int = TINY_VOCAB_SIZE, seed: int = 0
) -> Path:
    """Build (once) a tiny random Qwen2 checkpoint at ``path`` for fast tests.

    The model: 2 layers, hidden 128, 2 attention heads and 1 KV head (head_dim 64),
    MLP 256, tied embeddings, ``vocab_size`` logits, float32 weights drawn from
    ``seed`` (the caller's RNG state is left untouched). The tokenizer: byte-level BPE
    (512 entries, so most logits columns are ids it never produces) trained on a few
    sentences, with ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos) and
    a ChatML chat template. Same ``seed`` and ``vocab_size`` give equal weights.

    Returns ``path`` as a ``Path``; an existing complete build there is reused as is.
    """
    if vocab_size < 512:
        raise ValueError(
            f"vocab_size must be >= 512 (the tokenizer's), got {vocab_size}"
        )
    target = Path(path)
    recipe = f"{TINY_RECIPE}/vocab={vocab_size}/seed={seed}"
    log = Progress(False, f"tiny model {target.name}")

    def build(staging: Path) -> None:
        special_ids = _train_tiny_tokenizer(staging)
        _save_tiny_weights(
            staging,
            name=target.name,
            vocab_size=vocab_size,
            seed=seed,
            special_ids=special_ids,
        )

    return build_once(target, recipe, build, log)


def tiny_model_dir(vocab_size: int = TINY_VOCAB_SIZE) -> Path:
    """The cached tiny model (seed 0) for ``vocab_size``, built on first use."""
    return make_tiny_model(
        cache_root() / f"{TINY_MODEL_PREFIX}-v{vocab_size}", vocab_size=vocab_size
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m em_inf_support.tiny_model``: build the tiny model, print its path."""
    parser = argparse.ArgumentParser(
        prog="python -m em_inf_support.tiny_model",
        description="Build (once) the tiny random Qwen2 the tests and benchmarks "
        "serve, and print its directory.",
    )
    parser.add_argument("--vocab-size", type=int, default=TINY_VOCAB_SIZE)
    args = parser.parse_args(argv)
    print(tiny_model_dir(args.vocab_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
