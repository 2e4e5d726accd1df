"""Start ``em-inf serve``: resolve the model and engine defaults, register EM-INF
with the engine, and run vLLM's API server in this process.

The engine is vLLM's (``build_async_engine_client``), the HTTP app is vLLM's
(``build_app`` + ``init_app_state``, see :mod:`em_inf.server.app`) and so is the
HTTP server (``serve_http``). EM-INF joins through vLLM's stock extension points:
``--logits-processors em_inf:EMInf`` and ``--additional-config '{"em_inf": ...}'``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

from em_inf.config import FIELD_NAMES

from . import vllm_compat
from .cli_args import engine_config_from_args, flag_name
from .settings import ServerSettings

logger = logging.getLogger("em_inf.server")

PROCESSOR = "em_inf:EMInf"
# Other spellings of the same processor a user may already have passed.
_PROCESSOR_ALIASES = {PROCESSOR, "em_inf.processor:EMInf", "em_inf.EMInf"}

# CPU engine defaults, used only when the user sized neither the KV cache nor the
# memory fraction: vLLM's 0.92 of host memory is refused on a busy machine, and
# 1 GiB of KV cache holds ~40k tokens of SmolLM2-135M (docs/environment.md).
CPU_MEMORY_FRACTION = 0.3
CPU_KV_CACHE_BYTES = 1 << 30
# Context length for the default model (trained to 8192): room for a chat, and a
# faster start and smaller footprint on a laptop. --max-model-len overrides it.
DEFAULT_MODEL_MAX_LEN = 4096


class StartupError(RuntimeError):
    """A problem the person starting the server must fix; the message says how."""


# ----------------------------------------------------------------------- preparing


def prepare(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> ServerSettings:
    """Check ``args``, fill in em-inf's defaults and register EM-INF (in place).

    Returns:
        The server's EM-INF settings.

    Raises:
        StartupError: with a message for the user.
    """
    try:
        vllm_compat.get("validate_parsed_serve_args")(args)
    except (ValueError, TypeError, KeyError) as error:
        raise StartupError(str(error)) from None
    try:
        settings = ServerSettings.from_engine_config(engine_config_from_args(args))
    except ValueError as error:
        raise StartupError(_settings_message(error)) from None
    _refuse_unsupported_modes(args)
    if not args.headless:
        _check_port_free(args)
    _resolve_model(args)
    _apply_cpu_defaults(args, parser)
    _register_processor(args, settings)
    return settings


def _settings_message(error: ValueError) -> str:
    """Name the flag as well as the setting: "... (--em-inf-threshold)"."""
    message = f"invalid EM-INF server setting: {error}"
    named = re.search(r"'(\w+)'", str(error))
    if named and named.group(1) in ("preset", "enabled", *FIELD_NAMES):
        flag = flag_name("default" if named.group(1) == "enabled" else named.group(1))
        message += f" (check {flag} and --additional-config)"
    return message


def _refuse_unsupported_modes(args: argparse.Namespace) -> None:
    if args.api_server_count is not None and args.api_server_count > 1:
        raise StartupError(
            "em-inf serve runs one API server process (vLLM's internal load balancer "
            "still drives every data-parallel engine); drop --api-server-count "
            f"{args.api_server_count}"
        )
    if getattr(args, "grpc", False):
        raise StartupError("em-inf serve speaks HTTP only; drop --grpc")
    if getattr(args, "data_parallel_multi_port_external_lb", False):
        raise StartupError(
            "--data-parallel-multi-port-external-lb starts one API server per "
            "engine, which em-inf serve does not; use --data-parallel-size alone"
        )


def _check_port_free(args: argparse.Namespace) -> None:
    """Fail now, not after minutes of model preparation, when the port is taken."""
    if args.uds:
        return
    host = args.host or ""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, args.port))
        except OSError as error:
            raise StartupError(_port_message(args, error)) from None


def _port_message(args: argparse.Namespace, error: OSError) -> str:
    where = f"{args.host or '0.0.0.0'}:{args.port}"
    if error.errno != errno.EADDRINUSE:
        return f"cannot listen on {where}: {error.strerror or error}"
    owner = ""
    find = vllm_compat.optional("find_process_using_port")
    if find is not None:
        try:
            process = find(args.port)
            if process is not None:
                owner = f" by process {process.pid} ({' '.join(process.cmdline())})"
        except Exception:  # psutil may lack the rights to look; the hint still helps
            owner = ""
    return (
        f"port {args.port} is already in use{owner}; stop that server or choose "
        f"another port with --port (could not listen on {where})"
    )


def _resolve_model(args: argparse.Namespace) -> None:
    """``MODEL`` or, without one, the default model (prepared on first use)."""
    if args.model_tag is not None:
        args.model = args.model_tag
        _check_local_model(args.model)
        return
    from em_inf import models

    try:
        model_dir = models.prepare_default_model(progress=True)
    except models.ModelPreparationError as error:
        raise StartupError(f"cannot prepare the default model: {error}") from None
    args.model = str(model_dir)
    if args.served_model_name is None:
        args.served_model_name = [models.DEFAULT_MODEL_NAME]
    if args.max_model_len is None:
        args.max_model_len = DEFAULT_MODEL_MAX_LEN


def _check_local_model(model: str) -> None:
    """A MODEL that is spelled as a path must exist; hub ids are left to vLLM."""
    path = Path(model).expanduser()
    if path.exists():
        if (
            path.is_dir()
            and not any(path.glob("*.json"))
            and not any(path.glob("*.gguf"))
        ):
            raise StartupError(
                f"model directory {path} holds no config.json: not a model "
                "checkpoint (expected a Hugging Face model directory)"
            )
        return
    looks_local = model.startswith(("/", ".", "~")) or model.count("/") > 1
    if looks_local:
        raise StartupError(
            f"model not found: {path} does not exist (give a local model "
            "directory or a Hugging Face model id such as Qwen/Qwen2.5-7B-Instruct)"
        )


def _apply_cpu_defaults(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    user_sized = (
        args.kv_cache_memory_bytes is not None
        or os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        or args.gpu_memory_utilization != parser.get_default("gpu_memory_utilization")
    )
    if not user_sized:
        args.gpu_memory_utilization = CPU_MEMORY_FRACTION
        args.kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        logger.info(
            "CPU engine: reserving %.1f GiB for the KV cache "
            "(--kv-cache-memory-bytes or --gpu-memory-utilization change it)",
            CPU_KV_CACHE_BYTES / (1 << 30),
        )
    if args.enable_chunked_prefill is None:
        # vllm-cpu 0.32 kills its engine on a seeded request whose prompt is
        # prefilled in chunks ("CPU Generator does not use offset"): one client's
        # `seed` must not take the server down for everyone.
        args.enable_chunked_prefill = False
        logger.info(
            "CPU engine: chunked prefill off (seeded requests crash vllm-cpu's "
            "chunked prefill); --enable-chunked-prefill turns it on"
        )
    _check_cpu_memory(args)


def _check_cpu_memory(args: argparse.Namespace) -> None:
    """The CPU engine's own memory check, made before the model is loaded."""
    import psutil

    memory = psutil.virtual_memory()
    wanted = args.kv_cache_memory_bytes
    what = "--kv-cache-memory-bytes"
    if wanted is None and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        wanted = int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) << 30
        what = "VLLM_CPU_KVCACHE_SPACE"
    if wanted is None:
        wanted = int(memory.total * args.gpu_memory_utilization)
        what = "--gpu-memory-utilization"
    if wanted > memory.available:
        raise StartupError(
            f"not enough memory: {what} asks for {wanted / (1 << 30):.1f} GiB but "
            f"only {memory.available / (1 << 30):.1f} GiB of "
            f"{memory.total / (1 << 30):.1f} GiB is free; lower it (e.g. "
            "--kv-cache-memory-bytes 1G) or free memory"
        )


def _register_processor(args: argparse.Namespace, settings: ServerSettings) -> None:
    processors = list(args.logits_processors or [])
    if not any(
        isinstance(entry, str) and entry in _PROCESSOR_ALIASES for entry in processors
    ):
        processors.append(PROCESSOR)
    args.logits_processors = processors
    additional = dict(args.additional_config or {})
    additional["em_inf"] = dict(settings.engine_config)
    args.additional_config = additional


# ------------------------------------------------------------------------- running


def run(args: argparse.Namespace, settings: ServerSettings) -> None:
    """Run the server until it is stopped (SIGINT / SIGTERM).

    Raises:
        StartupError: for failures a person can fix (port, model, memory).
    """
    if args.headless:  # engines only, no HTTP: vLLM's own loop does it all
        vllm_compat.get("run_headless")(args)
        return
    import uvloop

    try:
        uvloop.run(serve(args, settings))
    except OSError as error:
        if error.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise StartupError(_port_message(args, error)) from None
        raise
    except RuntimeError as error:
        if "initialization failed" in str(error):
            raise StartupError(_engine_failure_message(error)) from None
        raise


def _engine_failure_message(error: Exception) -> str:
    return (
        f"the engine could not start ({error}). Its own error is printed above. "
        "Common causes: not enough memory (lower --gpu-memory-utilization or "
        "--max-model-len, or set --kv-cache-memory-bytes), a model this vLLM "
        "cannot load (check the model directory and --trust-remote-code), or "
        "another process holding the accelerator"
    )


async def serve(args: argparse.Namespace, settings: ServerSettings) -> None:
    """Engine, vLLM's app with EM-INF attached, and the HTTP server, in this process."""
    from .app import build_em_inf_app

    # Until the HTTP server installs its own handlers, SIGTERM aborts start-up.
    signal.signal(signal.SIGTERM, _interrupt_startup)
    listen_address, sock = vllm_compat.get("setup_server")(args, reuse_port=False)
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                engine_client = await stack.enter_async_context(
                    vllm_compat.get("build_async_engine_client")(args)
                )
            except (OSError, ValueError) as error:  # config, model files, hub
                raise StartupError(_model_failure_message(args, error)) from error
            app = await build_em_inf_app(engine_client, args, settings)
            logger.info(
                "EM-INF %s by default (preset %r: %s); serving %s at %s/v1",
                "on" if settings.enabled else "off (opt-in per request)",
                settings.preset,
                settings.config.as_dict(),
                args.model,
                listen_address,
            )
            shutdown = await vllm_compat.get("serve_http")(
                app, sock=sock, **_http_options(args)
            )
        await shutdown
    finally:
        sock.close()


def _interrupt_startup(*_: Any) -> None:
    raise KeyboardInterrupt("terminated")


def _model_failure_message(args: argparse.Namespace, error: Exception) -> str:
    return (
        f"cannot set up the engine for model {args.model!r}: "
        f"{type(error).__name__}: {error}\nIf the model is not found: give a local "
        "model directory, or a Hugging Face model id this machine can reach "
        "(with HF_HUB_OFFLINE=1 only models already in the hub cache)"
    )


def _http_options(args: argparse.Namespace) -> dict[str, Any]:
    """uvicorn options from vLLM's server flags, as ``vllm serve`` passes them."""
    import vllm.envs as envs

    options: dict[str, Any] = {
        "enable_ssl_refresh": args.enable_ssl_refresh,
        "host": args.host,
        "port": args.port,
        "log_level": args.uvicorn_log_level,
        "access_log": not args.disable_uvicorn_access_log,
        "timeout_keep_alive": envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
        "ssl_keyfile": args.ssl_keyfile,
        "ssl_certfile": args.ssl_certfile,
        "ssl_ca_certs": args.ssl_ca_certs,
        "ssl_cert_reqs": args.ssl_cert_reqs,
        "ssl_ciphers": getattr(args, "ssl_ciphers", None),
        "h11_max_incomplete_event_size": getattr(
            args, "h11_max_incomplete_event_size", None
        ),
        "h11_max_header_count": getattr(args, "h11_max_header_count", None),
    }
    log_config = vllm_compat.optional("get_uvicorn_log_config")
    if log_config is not None and (config := log_config(args)) is not None:
        options["log_config"] = config
    return options
