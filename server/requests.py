"""Per-request EM-INF settings in an OpenAI request body: validation and translation.

A client may ask for EM-INF settings in two spellings:

* the body field ``"em_inf"`` (what ``extra_body={"em_inf": ...}`` in the official
  ``openai`` client sends): an object of settings ``{"preset": "math", "lr": 0.05}``,
  or a switch ``true`` / ``false`` / ``"on"`` / ``"off"`` / ``1`` / ``0``;
* vLLM's own ``vllm_xargs`` with flat keys ``em_inf_<field>`` / ``em_inf_preset`` and
  the switch ``"em_inf": "on" | "off"``.

vLLM drops unknown top-level fields, and ``vllm_xargs`` carries only strings and
numbers, so the body field is rewritten into flat ``vllm_xargs`` keys, which reach
the processor as ``SamplingParams.extra_args``. Everything is then validated with
:func:`em_inf.config.parse_request` against the server's defaults, the same call the
processor makes, so a bad value is refused here (HTTP 400) and never reaches the
engine. Pure Python; no vLLM import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from em_inf.config import FLAT_PREFIX, REQUEST_KEY, EMInfConfig

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


def _switch_to_xarg(value: bool | int | str) -> str | int:
    """``vllm_xargs`` holds no booleans: ``True`` / ``False`` travel as ``"on"`` /
    ``"off"``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


def body_field_to_xargs(value: Any) -> dict[str, Any]:
    """The flat ``vllm_xargs`` entries equivalent to a body's ``"em_inf"`` value.

    ``{"preset": "math", "lr": 0.05}`` -> ``{"em_inf_preset": "math",
    "em_inf_lr": 0.05}``; ``{}`` -> ``{"em_inf": "on"}``; ``false`` ->
    ``{"em_inf": "off"}``. Values are passed on unchecked (see :func:`translate_body`).
    """
    if isinstance(value, Mapping):
        if not value:
            return {REQUEST_KEY: "on"}
        return {FLAT_PREFIX + str(name): setting for name, setting in value.items()}
    return {REQUEST_KEY: _switch_to_xarg(value)}


def _has_em_inf_keys(xargs: Mapping[str, Any]) -> bool:
    return any(key == REQUEST_KEY or key.startswith(FLAT_PREFIX) for key in xargs)


def translate_body(
    body: dict[str, Any], settings: ServerSettings
) -> tuple[dict[str, Any], EMInfConfig | None]:
    """Validate a request body's EM-INF settings and move them into ``vllm_xargs``.

    Args:
        body: the decoded JSON request body (not modified).
        settings: the server's EM-INF settings, which requests resolve against
            exactly as in the processor.

    Returns:
        ``(new_body, settings)``: the body without ``"em_inf"`` and with its settings
        as flat ``vllm_xargs`` keys (the same object when there was nothing to move),
        and the settings this request will run with (``None``: EM-INF off for it).

    Raises:
        EMInfRequestError: invalid settings; the message names the setting.
    """
    xargs = body.get(XARGS_FIELD)
    if REQUEST_KEY not in body:
        if not isinstance(xargs, Mapping) or not _has_em_inf_keys(xargs):
            return body, settings.resolve(None)
        try:
            return body, settings.resolve(xargs)
        except ValueError as error:
            raise EMInfRequestError(str(error), XARGS_FIELD) from None

    value = body[REQUEST_KEY]
    if xargs is not None and not isinstance(xargs, Mapping):
        raise EMInfRequestError(
            f"{XARGS_FIELD!r} must be an object, got {type(xargs).__name__}",
            XARGS_FIELD,
        )
    new_body = {key: item for key, item in body.items() if key != REQUEST_KEY}
    if value is None:  # "em_inf": null says nothing
        merged = dict(xargs or {})
    else:
        # Check the body field on its own first: errors then speak its language
        # ("'threshold' must be ...") rather than the flat keys'.
        try:
            settings.resolve({REQUEST_KEY: value})
        except ValueError as error:
            raise EMInfRequestError(str(error), REQUEST_KEY) from None
        flat = body_field_to_xargs(value)
        merged = dict(xargs or {})
        clashes = sorted(
            key for key in flat if key in merged and merged[key] != flat[key]
        )
        if clashes:
            raise EMInfRequestError(
                f"em_inf: {clashes} given both in 'em_inf' and in {XARGS_FIELD!r} "
                "with different values; give each setting once",
                REQUEST_KEY,
            )
        merged.update(flat)
    try:
        resolved = settings.resolve(merged)
    except ValueError as error:
        raise EMInfRequestError(str(error), REQUEST_KEY) from None
    if merged:
        new_body[XARGS_FIELD] = merged
    else:
        new_body.pop(XARGS_FIELD, None)
    return new_body, resolved


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
