"""The server's EM-INF defaults: one record shared by the CLI, the middleware (request
settings and ``GET /v1/em-inf``) and, through ``additional_config``, the processor.

``em-inf serve`` hands the same ``additional_config["em_inf"]`` object to the engine
(``--additional-config``) and to the middleware, through the environment variable
:data:`SETTINGS_ENV`: vLLM builds ``--middleware`` classes with the app alone, and the
environment is public, set before vLLM starts and inherited by every process it
spawns, with no reliance on how vLLM's app keeps its state.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from em_inf.config import (
    PRESET_SOURCES,
    PRESETS,
    REQUEST_KEY,
    EMInfConfig,
    RequestSettings,
    engine_settings,
)

#: Environment variable holding ``additional_config["em_inf"]`` as JSON.
SETTINGS_ENV = "EM_INF_SERVER_SETTINGS"


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Engine-wide EM-INF settings of one server.

    Attributes:
        engine_config: ``additional_config["em_inf"]`` as handed to the engine
            (``preset``, overridden fields, ``enabled``).
        config: the resolved default settings.
        enabled: whether requests that say nothing about EM-INF get it; when
            ``False`` it is opt-in per request.
    """

    engine_config: Mapping[str, Any]
    config: EMInfConfig
    enabled: bool

    @classmethod
    def from_engine_config(
        cls, engine_config: Mapping[str, Any] | None
    ) -> ServerSettings:
        """Resolve ``additional_config["em_inf"]`` exactly as the processor does.

        Raises:
            ValueError: naming the bad key.
        """
        engine_config = dict(engine_config or {})
        config, enabled = engine_settings(PRESETS["default"], True, engine_config)
        return cls(engine_config=engine_config, config=config, enabled=enabled)

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None
    ) -> ServerSettings:
        """The settings ``em-inf serve`` put in :data:`SETTINGS_ENV` (the package
        defaults when it is unset, e.g. under a plain ``vllm serve``).

        Raises:
            ValueError: naming the variable and the bad key.
        """
        text = (os.environ if environ is None else environ).get(SETTINGS_ENV)
        if not text:
            return cls.from_engine_config({})
        try:
            engine_config = json.loads(text)
            if not isinstance(engine_config, dict):
                raise ValueError(f"must be a JSON object, got {text!r}")
            return cls.from_engine_config(engine_config)
        except ValueError as error:
            raise ValueError(f"{SETTINGS_ENV}: {error}") from None

    def environment(self) -> dict[str, str]:
        """The environment that hands these settings to the middleware."""
        return {SETTINGS_ENV: json.dumps(dict(self.engine_config))}

    @property
    def preset(self) -> str:
        """The preset the defaults start from."""
        return str(self.engine_config.get("preset", "default"))

    def resolve(self, extra_args: Mapping[str, Any] | None) -> EMInfConfig | None:
        """The settings a request with these ``extra_args`` runs with (``None``:
        EM-INF off), exactly as the processor resolves them.

        Raises:
            ValueError: naming the bad setting.
        """
        return self.apply(RequestSettings.parse(extra_args))

    def apply(self, request: RequestSettings) -> EMInfConfig | None:
        """The settings ``request`` runs with on this server (``None``: EM-INF off).

        Raises:
            ValueError: when the request's settings and the server's together are
                invalid.
        """
        return request.resolve(self.config, enabled=self.enabled)

    def describe(self) -> dict[str, Any]:
        """The JSON document of ``GET /v1/em-inf``."""
        import em_inf

        return {
            "object": "em_inf.settings",
            "version": em_inf.__version__,
            "vllm_version": _vllm_version(),
            "enabled_by_default": self.enabled,
            "preset": self.preset,
            "defaults": self.config.as_dict(),
            "presets": {
                name: {"settings": preset.as_dict(), "source": PRESET_SOURCES[name]}
                for name, preset in PRESETS.items()
            },
            "request": {
                "body_field": REQUEST_KEY,
                "settings": ["preset", *EMInfConfig().as_dict()],
                "switch": [True, False, "on", "off"],
            },
        }


def _vllm_version() -> str | None:
    try:
        from vllm import __version__
    except ImportError:  # the route is served by vLLM, so this is only defensive
        return None
    return str(__version__)
