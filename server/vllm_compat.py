"""The pieces of vLLM's OpenAI-compatible server that ``em-inf serve`` builds on.

vLLM moves its serving modules (``vllm.entrypoints.openai.*`` ->
``vllm.entrypoints.launchers.*`` / ``vllm.entrypoints.serve.*``, and on vLLM's
development branch ``vllm.frontend.entrypoints.*``); each name below is looked up at
the home of the vLLM em-inf is tested with (0.32) first, then at the others, so one
em-inf release runs across ``vllm>=0.32,<0.34``. Imports happen on first use: importing
this module costs nothing.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

# name -> candidate "module:attribute" locations, newest first.
_LOCATIONS: dict[str, tuple[str, ...]] = {
    "FlexibleArgumentParser": (
        "vllm.utils.argparse_utils:FlexibleArgumentParser",
        "vllm.foundation.utilities.argparse_utils:FlexibleArgumentParser",
        "vllm.utils:FlexibleArgumentParser",
    ),
    "make_arg_parser": (
        "vllm.entrypoints.launchers.cli_args:make_arg_parser",
        "vllm.frontend.entrypoints.launchers.cli_args:make_arg_parser",
        "vllm.entrypoints.openai.cli_args:make_arg_parser",
    ),
    "validate_parsed_serve_args": (
        "vllm.entrypoints.launchers.cli_args:validate_parsed_serve_args",
        "vllm.frontend.entrypoints.launchers.cli_args:validate_parsed_serve_args",
        "vllm.entrypoints.openai.cli_args:validate_parsed_serve_args",
    ),
    "cli_env_setup": (
        "vllm.entrypoints.serve.utils.api_utils:cli_env_setup",
        "vllm.frontend.entrypoints.serve.utils.api_utils:cli_env_setup",
        "vllm.entrypoints.utils:cli_env_setup",
    ),
    "build_app": (
        "vllm.entrypoints.launchers.app:build_app",
        "vllm.frontend.entrypoints.launchers.app:build_app",
        "vllm.entrypoints.openai.api_server:build_app",
    ),
    "init_app_state": (
        "vllm.entrypoints.launchers.api_server.app_state:init_app_state",
        "vllm.frontend.entrypoints.launchers.api_server.app_state:init_app_state",
        "vllm.entrypoints.openai.api_server:init_app_state",
    ),
    "build_async_engine_client": (
        "vllm.entrypoints.launchers.api_server.entry:build_async_engine_client",
        "vllm.frontend.entrypoints.launchers.api_server.entry:build_async_engine_client",
        "vllm.entrypoints.openai.api_server:build_async_engine_client",
    ),
    "setup_server": (
        "vllm.entrypoints.launchers.launcher:setup_server",
        "vllm.frontend.entrypoints.launchers.launcher:setup_server",
        "vllm.entrypoints.openai.api_server:setup_server",
    ),
    "serve_http": (
        "vllm.entrypoints.launchers.launcher:serve_http",
        "vllm.frontend.entrypoints.launchers.launcher:serve_http",
        "vllm.entrypoints.launcher:serve_http",
    ),
    "get_uvicorn_log_config": (
        "vllm.entrypoints.launchers.utils.server_utils:get_uvicorn_log_config",
        "vllm.frontend.entrypoints.launchers.utils.server_utils:get_uvicorn_log_config",
        "vllm.entrypoints.utils:get_uvicorn_log_config",
    ),
    "run_headless": ("vllm.entrypoints.cli.serve:run_headless",),
    "configure_logging_from_args": ("vllm.logger:configure_logging_from_args",),
    "find_process_using_port": (
        "vllm.utils.network_utils:find_process_using_port",
        "vllm.utils:find_process_using_port",
    ),
}


@cache
def get(name: str) -> Any:
    """The vLLM object called ``name`` (see ``_LOCATIONS``), from wherever this vLLM
    keeps it.

    Raises:
        ImportError: listing every place tried, when this vLLM has none of them.
    """
    tried = []
    for location in _LOCATIONS[name]:
        module_name, attribute = location.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            tried.append(f"{location} ({error})")
            continue
        if hasattr(module, attribute):
            return getattr(module, attribute)
        tried.append(f"{location} (no such attribute)")
    raise ImportError(
        f"em-inf: this vLLM has no {name!r} where em-inf looks for it; em-inf "
        f"supports vllm>=0.32,<0.34. Tried: {'; '.join(tried)}"
    )


def optional(name: str) -> Any | None:
    """Like :func:`get`, ``None`` where this vLLM lacks ``name``."""
    try:
        return get(name)
    except ImportError:
        return None
