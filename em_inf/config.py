"""EM-INF settings: one validated, immutable record, the authors' presets, and the
parsers that build it from keyword arguments, dicts (per request) and flat keys.

Every value is checked on construction; an invalid one raises :class:`ValueError`
naming the field and its allowed range, so per-request settings fail in vLLM's
``validate_params`` (an HTTP 400) and never inside the engine.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

Mode = Literal["logits", "temperature"]
MODES: tuple[str, ...] = ("logits", "temperature")

#: The key under which EM-INF settings travel in ``SamplingParams.extra_args`` and in
#: a request body; also the prefix of the flat ``vllm_xargs`` keys (``em_inf_lr``...).
REQUEST_KEY = "em_inf"
FLAT_PREFIX = REQUEST_KEY + "_"

#: Adam's constants in the fast paths (PyTorch's defaults, which the authors use).
#: The oracle (:mod:`em_inf.reference`) does not read these: it runs
#: ``torch.optim.Adam`` with its own defaults, so a wrong value here fails the tests.
ADAM_BETAS: tuple[float, float] = (0.9, 0.999)
ADAM_EPS = 1e-8

#: Temperature mode: the solved temperature gives an entropy within
#: ``TEMPERATURE_RTOL * target`` of the target ``max(threshold, alpha * H0)``, or
#: lies at the end of ``[t_min, t_max]`` nearer to it when the target is out of reach.
TEMPERATURE_RTOL = 1e-6


@dataclasses.dataclass(frozen=True)
class EMInfConfig:
    """Settings of one EM-INF application (engine-wide default or one request).

    Attributes:
        mode: ``"logits"``, the paper's EM-INF (Adam steps on the logits), or
            ``"temperature"``, its adaptive-temperature variant (Algorithm 1).
        threshold: entropy (nats) below which a row is left alone; ``delta``.
        kl_weight: weight of ``KL(p0 || q)`` in the logits-mode loss; ``lam``.
        lr: Adam learning rate of the logits mode; ``eta``.
        steps: most Adam steps per decoding step in the logits mode; ``n``.
        alpha: temperature mode: target entropy is ``max(threshold, alpha * H0)``.
        t_min, t_max: temperature mode: the interval the solved temperature lies in.
    """

    mode: Mode = "logits"
    threshold: float = 0.3
    kl_weight: float = 0.05
    lr: float = 0.1
    steps: int = 3
    alpha: float = 0.85
    t_min: float = 0.01
    t_max: float = 1.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check_field(field.name, getattr(self, field.name))
        if self.t_min > self.t_max:
            raise ValueError(
                f"em_inf: 't_min' ({self.t_min}) must not exceed 't_max' ({self.t_max})"
            )

    # -- construction ------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str = "default", **overrides: Any) -> EMInfConfig:
        """The named preset (see :data:`PRESETS`) with ``overrides`` applied."""
        if preset not in PRESETS:
            raise ValueError(
                f"em_inf: unknown preset {preset!r}; choose one of {sorted(PRESETS)}"
            )
        return PRESETS[preset].replace(**overrides)

    def replace(self, **overrides: Any) -> EMInfConfig:
        """A copy with ``overrides`` applied; unknown keys are rejected."""
        unknown = sorted(set(overrides) - set(FIELD_NAMES))
        if unknown:
            raise ValueError(
                f"em_inf: unknown setting(s) {unknown}; allowed: "
                f"{['preset', *FIELD_NAMES]}"
            )
        return dataclasses.replace(self, **overrides)

    def updated(self, settings: Mapping[str, Any]) -> EMInfConfig:
        """Apply a settings dict (optionally naming a ``preset``) on top of ``self``.

        A ``preset`` key replaces ``self`` by that preset before the other keys
        apply, so ``{"preset": "math", "lr": 0.05}`` means "math, but lr 0.05".
        """
        if not isinstance(settings, Mapping):
            raise ValueError(
                f"em_inf: settings must be an object/dict, got "
                f"{type(settings).__name__}"
            )
        settings = dict(settings)
        base = self
        if "preset" in settings:
            base = EMInfConfig.from_preset(_check_preset_name(settings.pop("preset")))
        return base.replace(**settings)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EMInfConfig))

# (type, low, high, low inclusive, high inclusive) per numeric field: what is
# meaningful, which also keeps float32 arithmetic finite for finite logits.
# - threshold: an entropy; no vocabulary comes near 1000 nats (log of a million
#   tokens is 13.8), and above log V EM-INF simply never acts.
# - kl_weight: at 1000 the KL term already outweighs the entropy by 10^4 or more
#   (the authors use 0 to 0.05).
# - lr: an Adam step moves a logit by about lr; at 100 one step reorders every
#   realistic row (the authors use 0.01 to 0.1).
# - steps: each step is a pass over the vocabulary for every token, and a
#   request's steps are paid by its whole batch (the authors use 3 to 5).
# - t_min, t_max: below 1e-4 sampling is greedy for any realistic logits and above
#   1e4 uniform; logits are divided by T, so the bounds also keep z / T finite.
_RANGES: dict[str, tuple[type, float, float, bool, bool]] = {
    "threshold": (float, 0.0, 1e3, True, True),
    "kl_weight": (float, 0.0, 1e3, True, True),
    "lr": (float, 0.0, 1e2, False, True),
    "steps": (int, 0, 100, True, True),
    "alpha": (float, 0.0, 1.0, False, True),
    "t_min": (float, 1e-4, 1e4, True, True),
    "t_max": (float, 1e-4, 1e4, True, True),
}
#: The most Adam steps a request may ask for (sizes the kernels' scratch).
MAX_STEPS = int(_RANGES["steps"][2])


def _describe_range(low: float, high: float, low_in: bool, high_in: bool) -> str:
    left = "[" if low_in else "("
    right = "]" if high_in else ")"
    return f"{left}{low:g}, {high:g}{right}"


def _check_field(name: str, value: Any) -> None:
    if name == "mode":
        if value not in MODES:
            raise ValueError(
                f"em_inf: 'mode' must be one of {list(MODES)}, got {value!r}"
            )
        return
    kind, low, high, low_in, high_in = _RANGES[name]
    allowed = _describe_range(low, high, low_in, high_in)
    # bool is an int subclass; True as a learning rate is a client bug, not 1.0.
    numeric = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise ValueError(
            f"em_inf: {name!r} must be {'an integer' if kind is int else 'a number'} "
            f"in {allowed}, got {value!r} ({type(value).__name__})"
        )
    ok_low = value >= low if low_in else value > low
    ok_high = value <= high if high_in else value < high
    if not (ok_low and ok_high) or (kind is float and math.isnan(value)):
        raise ValueError(f"em_inf: {name!r} must be in {allowed}, got {value!r}")


def _check_preset_name(value: Any) -> str:
    if not isinstance(value, str) or value not in PRESETS:
        raise ValueError(
            f"em_inf: unknown preset {value!r}; choose one of {sorted(PRESETS)}"
        )
    return value


#: The authors' settings (delta, lam, eta, n), from their public scripts; see
#: docs in README.md ("Presets"). Temperature-mode fields keep Algorithm 1's values
#: except ``threshold``, which the logits mode shares.
PRESETS: dict[str, EMInfConfig] = {
    # README entry point of the authors' code: their general default.
    "default": EMInfConfig(threshold=0.3, kl_weight=0.05, lr=0.1, steps=3),
    # Fallback defaults inside the authors' sampler.
    "sampler": EMInfConfig(threshold=0.3, kl_weight=0.001, lr=0.1, steps=5),
    # MATH500, AMC, AIME and LeetCode runs.
    "math": EMInfConfig(threshold=0.1, kl_weight=0.001, lr=0.1, steps=3),
    "code": EMInfConfig(threshold=0.1, kl_weight=0.001, lr=0.1, steps=3),
    # Minerva and OlympiadBench through the Qwen-Math harness.
    "qwen-math": EMInfConfig(threshold=0.3, kl_weight=0.01, lr=0.05, steps=3),
    # UGPhysics.
    "physics": EMInfConfig(threshold=0.1, kl_weight=0.0, lr=0.1, steps=5),
    # SciCode: the authors swept (0.05-0.5, 0.001-0.01, 0.01-0.1, 3-5); this is the
    # middle of that sweep, not a single published point.
    "scicode": EMInfConfig(threshold=0.1, kl_weight=0.001, lr=0.05, steps=5),
    # Algorithm 1 (adaptive temperature) with the authors' defaults.
    "adaptive-temperature": EMInfConfig(
        mode="temperature", threshold=1e-5, alpha=0.85, t_min=0.01, t_max=1.0
    ),
}

PRESET_SOURCES: dict[str, str] = {
    "default": "authors' README entry point (general default)",
    "sampler": "fallback defaults inside the authors' sampler",
    "math": "authors' MATH500 / AMC / AIME runs",
    "code": "authors' LeetCode runs",
    "qwen-math": "authors' Minerva / OlympiadBench runs (Qwen-Math harness)",
    "physics": "authors' UGPhysics runs",
    "scicode": "middle of the authors' SciCode sweep",
    "adaptive-temperature": "Algorithm 1 (adaptive temperature), authors' defaults",
}


def make_config(preset: str | None = None, **settings: Any) -> EMInfConfig:
    """Keyword form: ``make_config(preset="math", threshold=0.2)``."""
    base = EMInfConfig.from_preset(_check_preset_name(preset or "default"))
    return base.replace(**settings)


@dataclasses.dataclass(frozen=True)
class RequestSettings:
    """What one request asks of EM-INF, parsed and checked on its own: every check
    but the one that needs the engine's settings (``t_min <= t_max`` once they
    apply, in :meth:`resolve`).

    Attributes:
        switch: ``True`` / ``False`` where the request turns EM-INF on or off
            (giving settings turns it on), ``None`` where it does not say.
        preset: the preset the request's settings start from; ``None``: the
            engine's settings.
        overrides: field name -> value, each in its field's range.

    Raises:
        ValueError: when EM-INF is turned off and settings are given too.
    """

    switch: bool | None = None
    preset: str | None = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.switch is False and self.named():
            raise _off_with_settings(self.named())
        if self.switch is None and self.named():  # settings turn EM-INF on
            object.__setattr__(self, "switch", True)

    def named(self) -> list[str]:
        """The settings the request gives (``preset`` included), sorted."""
        preset = ["preset"] if self.preset is not None else []
        return sorted([*preset, *self.overrides])

    @classmethod
    def parse(cls, extra_args: Mapping[str, Any] | None) -> RequestSettings:
        """The EM-INF part of ``SamplingParams.extra_args``.

        Recognised: ``{"em_inf": {...settings...}}``, ``{"em_inf": true | false |
        "on" | "off" | 1 | 0}``, and flat keys ``em_inf_<field>`` / ``em_inf_preset``
        (what the OpenAI server's ``vllm_xargs`` can carry; numeric strings are
        converted). Other keys belong to vLLM and are ignored.

        Raises:
            ValueError: on any invalid setting, naming it.
        """
        if not extra_args:
            return cls()
        switch = extra_args.get(REQUEST_KEY)
        settings: dict[str, Any] = {}
        if isinstance(switch, Mapping):
            settings.update(switch)
            switch = True
        elif switch is not None:
            switch = _parse_switch(switch)
        settings.update(_flat_settings(extra_args))
        if switch is False and settings:  # said before any setting's own error
            raise _off_with_settings(sorted(settings))
        preset = None
        if "preset" in settings:
            preset = _check_preset_name(settings.pop("preset"))
        _check_overrides(settings)
        return cls(switch=switch, preset=preset, overrides=settings)

    def resolve(
        self, default: EMInfConfig, *, enabled: bool = True
    ) -> EMInfConfig | None:
        """The settings the request runs with on an engine whose settings are
        ``default`` (``None``: EM-INF off for it); ``enabled``: whether a request
        that says nothing gets EM-INF.

        Raises:
            ValueError: when the request's settings and ``default`` together are
                invalid (a ``t_min`` above the ``t_max``).
        """
        if self.switch is False:
            return None
        if self.switch is None:  # says nothing
            return default if enabled else None
        base = default if self.preset is None else PRESETS[self.preset]
        return base.replace(**self.overrides)

    def as_extra_args(self) -> dict[str, Any]:
        """The request's settings as flat ``extra_args`` keys (what ``vllm_xargs``
        carries), which :meth:`parse` reads back to an equal value."""
        if self.switch is False:
            return {REQUEST_KEY: "off"}
        flat = {FLAT_PREFIX + "preset": self.preset} if self.preset else {}
        flat.update({FLAT_PREFIX + name: v for name, v in self.overrides.items()})
        if self.switch and not flat:
            flat[REQUEST_KEY] = "on"
        return flat


def parse_request(
    extra_args: Mapping[str, Any] | None,
    default: EMInfConfig,
    *,
    enabled: bool = True,
) -> EMInfConfig | None:
    """The settings one request asks for, or ``None`` where EM-INF is off for it:
    ``RequestSettings.parse(extra_args).resolve(default, enabled=enabled)``.

    Args:
        extra_args: ``SamplingParams.extra_args`` (see :meth:`RequestSettings.parse`).
        default: the engine-wide settings; a request's own settings apply on top.
        enabled: whether a request that says nothing about EM-INF gets it;
            ``False`` makes EM-INF opt-in (``{"em_inf": true}`` or any setting).

    Raises:
        ValueError: on any invalid setting, naming it.
    """
    return RequestSettings.parse(extra_args).resolve(default, enabled=enabled)


def engine_settings(
    base: EMInfConfig, base_enabled: bool, additional: Mapping[str, Any] | None
) -> tuple[EMInfConfig, bool]:
    """Apply an engine's ``additional_config["em_inf"]`` on top of a class's settings.

    Returns:
        ``(settings, enabled)``.

    Raises:
        ValueError: naming the bad key, when the engine settings are invalid.
    """
    if not additional:
        return base, base_enabled
    if not isinstance(additional, Mapping):
        raise ValueError(
            f"additional_config[{REQUEST_KEY!r}] must be an object, got {additional!r}"
        )
    additional = dict(additional)
    enabled = additional.pop("enabled", base_enabled)
    if not isinstance(enabled, bool):
        raise ValueError(
            f"additional_config[{REQUEST_KEY!r}]['enabled'] must be true or false, "
            f"got {enabled!r}"
        )
    return base.updated(additional), enabled


def _parse_switch(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("on", "off", "true", "false"):
        return value.lower() in ("on", "true")
    raise ValueError(
        f"em_inf: 'em_inf' must be an object of settings, true/false, 'on'/'off' "
        f"or 1/0, got {value!r}"
    )


def _flat_settings(extra_args: Mapping[str, Any]) -> dict[str, Any]:
    """Settings given as flat keys (``em_inf_lr``...), by field name."""
    settings: dict[str, Any] = {}
    for key, value in extra_args.items():
        if key.startswith(FLAT_PREFIX):
            name = key[len(FLAT_PREFIX) :]
            if name not in ("preset", *FIELD_NAMES):
                raise ValueError(
                    f"em_inf: unknown setting {key!r}; allowed flat keys: "
                    f"{[FLAT_PREFIX + n for n in ('preset', *FIELD_NAMES)]}"
                )
            settings[name] = _coerce_flat(name, value)
    return settings


def _off_with_settings(names: list[str]) -> ValueError:
    return ValueError(
        f"em_inf: EM-INF is turned off for this request but settings {names} were given"
    )


def _check_overrides(overrides: Mapping[str, Any]) -> None:
    """Each override names a field and holds a value in its range."""
    unknown = sorted(map(str, set(overrides) - set(FIELD_NAMES)))
    if unknown:
        raise ValueError(
            f"em_inf: unknown setting(s) {unknown}; allowed: {['preset', *FIELD_NAMES]}"
        )
    for name in FIELD_NAMES:
        if name in overrides:
            _check_field(name, overrides[name])


def _coerce_flat(name: str, value: Any) -> Any:
    """Flat keys may arrive as strings (e.g. from a query string); convert them."""
    if not isinstance(value, str) or name in ("preset", "mode"):
        return value
    try:
        return int(value) if name == "steps" else float(value)
    except ValueError:
        raise ValueError(
            f"em_inf: {FLAT_PREFIX + name!r} must be numeric, got {value!r}"
        ) from None
