"""Per-request EM-INF settings in an OpenAI request body: validation and translation.

A client may ask for EM-INF settings in two spellings:

* the body field ``"em_inf"`` (what ``extra_body={"em_inf": ...}`` in the official
  ``openai`` client sends): an object of settings ``{"preset": "math", "lr": 0.05}``,
  or a switch ``true`` / ``false`` / ``"on"`` / ``"off"`` / ``1`` / ``0``;
* vLLM's own ``vllm_xargs`` with flat keys ``em_inf_<field>`` / ``em_inf_preset`` and
  the switch ``"em_inf": "on" | "off"``.

vLLM drops unknown top-level fields, and ``vllm_xargs`` carries only strings and
numbers, so the body field is rewritten into flat ``vllm_xargs`` keys, which reach
the processor as ``SamplingParams.extra_args``. Both spellings are parsed once into
one :class:`~em_inf.config.RequestSettings` and resolved against the server's
settings, which are the engine's, as the processor resolves them, so a bad value is
refused here (HTTP 400) and never reaches the engine. Pure Python; no vLLM import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from em_inf.config import FLAT_PREFIX, REQUEST_KEY, EMInfConfig, RequestSettings

from .settings import ServerSettings

#: The request-body field that holds vLLM's extra sampling arguments.
XARGS_FIELD = "vllm_xargs"

#: POST routes whose bodies carry sampling parameters (and ``vllm_xargs``).
GENERATION_PATHS: tuple[str, ...] = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
)


#: POST routes that take sampling parameters but no ``vllm_xargs``: an ``"em_inf"``
#: field there would be dropped by vLLM (the request would silently run with the
#: server's defaults), so it is refused, saying where the settings go instead.
UNSUPPORTED_PATHS: dict[str, str] = {
    "/v1/chat/completions/batch": "send each conversation to /v1/chat/completions",
    "/inference/v1/generate": (
        'give them as "sampling_params": {"extra_args": {"em_inf": {...}}}'
    ),
}


class EMInfRequestError(ValueError):
    """Invalid EM-INF settings in a request; ``param`` names the body field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _is_em_inf_key(key: str) -> bool:
    return key == REQUEST_KEY or key.startswith(FLAT_PREFIX)


def _parse(extra_args: Mapping[str, Any], param: str) -> RequestSettings:
    """``extra_args``' EM-INF settings; ``param``: the body field they came from.

    Raises:
        EMInfRequestError: invalid settings, naming the setting.
    """
    try:
        return RequestSettings.parse(extra_args)
    except ValueError as error:
        raise EMInfRequestError(str(error), param) from None


def _joined(field: RequestSettings, given: RequestSettings) -> RequestSettings:
    """The body field's settings together with those ``vllm_xargs`` already holds.

    Raises:
        EMInfRequestError: a setting (or the switch alone) given both ways with
            different values, or EM-INF turned off on one side with settings on
            the other.
    """
    clashes = [
        FLAT_PREFIX + name
        for name, value in field.overrides.items()
        if name in given.overrides and given.overrides[name] != value
    ]
    if None not in (field.preset, given.preset) and field.preset != given.preset:
        clashes.append(FLAT_PREFIX + "preset")
    switches = (field.switch, given.switch)
    if None not in switches and len(set(switches)) == 2:
        if not (field.named() or given.named()):  # else: "turned off", below
            clashes.append(REQUEST_KEY)
    if clashes:
        raise EMInfRequestError(
            f"em_inf: {sorted(clashes)} given both in 'em_inf' and in {XARGS_FIELD!r} "
            "with different values; give each setting once",
            REQUEST_KEY,
        )
    try:
        return RequestSettings(
            switch=False if False in switches else field.switch or given.switch,
            preset=field.preset or given.preset,
            overrides={**given.overrides, **field.overrides},
        )
    except ValueError as error:
        raise EMInfRequestError(str(error), REQUEST_KEY) from None


def translate_body(
    body: dict[str, Any], settings: ServerSettings
) -> tuple[dict[str, Any], EMInfConfig | None]:
    """Validate a request body's EM-INF settings and move them into ``vllm_xargs``.

    The body field and ``vllm_xargs`` are each parsed once
    (:class:`~em_inf.config.RequestSettings`); their union is resolved against the
    server's settings, as the processor resolves it in the engine, and written back
    as flat ``vllm_xargs`` keys.

    Args:
        body: the decoded JSON request body (not modified).
        settings: the server's EM-INF settings (the engine's).

    Returns:
        ``(new_body, settings)``: the body without ``"em_inf"`` and with its settings
        as flat ``vllm_xargs`` keys (the same object when there was nothing to move),
        and the settings this request will run with (``None``: EM-INF off for it).

    Raises:
        EMInfRequestError: invalid settings; the message names the setting.
    """
    xargs = body.get(XARGS_FIELD)
    if REQUEST_KEY not in body:
        if not isinstance(xargs, Mapping) or not any(map(_is_em_inf_key, xargs)):
            return body, settings.resolve(None)
        return body, _resolved(_parse(xargs, XARGS_FIELD), settings, XARGS_FIELD)
    if xargs is not None and not isinstance(xargs, Mapping):
        raise EMInfRequestError(
            f"{XARGS_FIELD!r} must be an object, got {type(xargs).__name__}",
            XARGS_FIELD,
        )
    xargs = dict(xargs or {})
    request = _parse(xargs, XARGS_FIELD)
    if body[REQUEST_KEY] is not None:  # "em_inf": null says nothing
        field = _parse({REQUEST_KEY: body[REQUEST_KEY]}, REQUEST_KEY)
        request = _joined(field, request)
    resolved = _resolved(request, settings, REQUEST_KEY)
    new_body = {key: item for key, item in body.items() if key != REQUEST_KEY}
    merged = {key: item for key, item in xargs.items() if not _is_em_inf_key(key)}
    merged.update(request.as_extra_args())
    if merged:
        new_body[XARGS_FIELD] = merged
    else:
        new_body.pop(XARGS_FIELD, None)
    return new_body, resolved


def _resolved(
    request: RequestSettings, settings: ServerSettings, param: str
) -> EMInfConfig | None:
    """``request`` resolved against the server's settings.

    Raises:
        EMInfRequestError: when the two together are invalid.
    """
    try:
        return settings.apply(request)
    except ValueError as error:
        raise EMInfRequestError(str(error), param) from None


def refuse_unsupported(path: str, body: dict[str, Any]) -> None:
    """Raise when ``body`` (for a route in :data:`UNSUPPORTED_PATHS`) asks for EM-INF
    settings that route cannot pass to the engine."""
    if REQUEST_KEY in body:
        route = next(route for route in UNSUPPORTED_PATHS if path.endswith(route))
        raise EMInfRequestError(
            f"em_inf: a top-level 'em_inf' field is not read on {route} (it takes "
            f"no vllm_xargs); {UNSUPPORTED_PATHS[route]}",
            REQUEST_KEY,
        )


def error_body(error: EMInfRequestError) -> dict[str, Any]:
    """The OpenAI error object for ``error`` (the shape vLLM answers errors with)."""
    return {
        "error": {
            "message": error.message,
            "type": "BadRequestError",
            "param": error.param,
            "code": 400,
        }
    }
