"""Decoding settings compared by the accuracy benchmark.

A setting is a sampling temperature plus what EM-INF does for the request: off
(``{"em_inf": False}``) or a settings dict (``{"em_inf": {...}}``), which travels in
``SamplingParams.extra_args`` offline and in the request body (``extra_body``) online.

Built-in names:

* ``greedy``: temperature 0, EM-INF off (one run; seeds do not matter).
* ``sample``: temperature ``--temperature`` (0.1), EM-INF off: the baseline.
* ``em-inf``: the paper's EM-INF (logits mode, ``--em-inf``, default preset
  ``math``), then temperature 0.1, as in every official EM-INF run.
* ``adaptive``: the adaptive-temperature variant (preset ``adaptive-temperature``,
  ``--adaptive``); the engine then samples from ``softmax(z / T)`` at temperature 1.

``--setting NAME=JSON`` adds any other, e.g.
``'em-inf-default={"temperature": 0.1, "em_inf": {"preset": "default"}}'``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from em_inf.config import EMInfConfig


@dataclasses.dataclass(frozen=True)
class Setting:
    """One decoding setting.

    Attributes:
        name: label in tables and plots.
        temperature: the engine's sampling temperature (0 = greedy).
        em_inf: EM-INF settings for the request (validated), or ``None`` for off.
    """

    name: str
    temperature: float
    em_inf: dict[str, Any] | None = None

    @property
    def seeded(self) -> bool:
        """Whether the outcome depends on the seed (not for greedy decoding)."""
        return self.temperature > 0

    def request_value(self) -> dict[str, Any] | bool:
        """What goes under ``"em_inf"`` in ``extra_args`` / the request body."""
        return dict(self.em_inf) if self.em_inf is not None else False

    def resolved(self) -> dict[str, Any] | None:
        """The full EM-INF settings this request runs with, for the report."""
        if self.em_inf is None:
            return None
        return EMInfConfig.from_preset("default").updated(self.em_inf).as_dict()


BUILTIN_NAMES = ("greedy", "sample", "em-inf", "adaptive")


def _check_em_inf(name: str, value: Any) -> dict[str, Any] | None:
    if value is False or value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"setting {name!r}: 'em_inf' must be an object or false")
    try:
        EMInfConfig.from_preset("default").updated(value)
    except ValueError as error:
        raise ValueError(f"setting {name!r}: {error}") from None
    return dict(value)


def custom_setting(spec: str) -> Setting:
    """``NAME=JSON`` with JSON ``{"temperature": float, "em_inf": {...} | false}``."""
    name, sep, body = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"--setting must look like NAME=JSON, got {spec!r}")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as error:
        raise ValueError(f"--setting {name!r}: invalid JSON ({error})") from None
    unknown = sorted(set(data) - {"temperature", "em_inf"})
    if unknown:
        raise ValueError(f"--setting {name!r}: unknown keys {unknown}")
    temperature = float(data.get("temperature", 0.1))
    if temperature < 0:
        raise ValueError(f"--setting {name!r}: temperature must be >= 0")
    return Setting(name, temperature, _check_em_inf(name, data.get("em_inf")))


def build_settings(
    names: list[str],
    *,
    temperature: float = 0.1,
    em_inf: dict[str, Any] | None = None,
    adaptive: dict[str, Any] | None = None,
    adaptive_temperature: float = 1.0,
    custom: list[str] = (),
) -> list[Setting]:
    """The settings to run, built-ins (``names``) first, then ``custom`` specs."""
    em_inf = {"preset": "math"} if em_inf is None else em_inf
    adaptive = {"preset": "adaptive-temperature"} if adaptive is None else adaptive
    adaptive_mode = EMInfConfig.from_preset("default").updated(adaptive).mode
    if adaptive_mode != "temperature":
        raise ValueError(f"--adaptive must select mode 'temperature', got {adaptive}")
    em_inf_mode = EMInfConfig.from_preset("default").updated(em_inf).mode
    if em_inf_mode != "logits":
        raise ValueError(f"--em-inf must select mode 'logits', got {em_inf}")
    builtins = {
        "greedy": Setting("greedy", 0.0),
        "sample": Setting("sample", temperature),
        "em-inf": Setting("em-inf", temperature, _check_em_inf("em-inf", em_inf)),
        "adaptive": Setting(
            "adaptive", adaptive_temperature, _check_em_inf("adaptive", adaptive)
        ),
    }
    settings = []
    for name in names:
        if name not in builtins:
            raise ValueError(
                f"unknown setting {name!r}; built-ins are {list(BUILTIN_NAMES)}, "
                f"others go in --setting NAME=JSON"
            )
        settings.append(builtins[name])
    settings += [custom_setting(spec) for spec in custom]
    seen = [s.name for s in settings]
    duplicates = sorted({n for n in seen if seen.count(n) > 1})
    if duplicates:
        raise ValueError(f"setting names must be unique, repeated: {duplicates}")
    return settings
