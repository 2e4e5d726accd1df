"""ASGI middleware that moves a request's ``"em_inf"`` field into ``vllm_xargs``.

It wraps vLLM's own FastAPI application and touches only POST requests to the
generation routes (:data:`~em_inf.server.requests.GENERATION_PATHS`) whose body
mentions ``em_inf`` (and refuses ``"em_inf"`` on routes that cannot carry it,
rather than let vLLM drop it silently); every other request, and every response,
passes through untouched, streaming included. Invalid settings are answered with
HTTP 400 in the OpenAI error format and never reach vLLM's handlers or the engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .requests import (
    GENERATION_PATHS,
    UNSUPPORTED_PATHS,
    EMInfRequestError,
    error_body,
    refuse_unsupported,
    translate_body,
)
from .settings import ServerSettings

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_MARKER = b"em_inf"


class EMInfRequestMiddleware:
    """Rewrite generation requests' ``"em_inf"`` field; refuse invalid settings.

    Args:
        app: the wrapped ASGI application.
        settings: the server's EM-INF settings, which requests are validated
            against, as the processor resolves them.
    """

    def __init__(self, app: ASGIApp, *, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not scope["path"].endswith(GENERATION_PATHS + UNSUPPORTED_PATHS)
        ):
            await self.app(scope, receive, send)
            return
        body, disconnected = await _read_body(receive)
        if disconnected:  # nobody to answer
            return
        if _MARKER not in body:
            await self.app(scope, _replay(body, receive), send)
            return
        try:
            decoded = json.loads(body)
        except ValueError:  # not JSON: vLLM answers that itself
            await self.app(scope, _replay(body, receive), send)
            return
        if not isinstance(decoded, dict):
            await self.app(scope, _replay(body, receive), send)
            return
        try:
            if scope["path"].endswith(UNSUPPORTED_PATHS):
                refuse_unsupported(scope["path"], decoded)
                rewritten = decoded
            else:
                rewritten, _ = translate_body(decoded, self.settings)
        except EMInfRequestError as error:
            logger.info("EM-INF: refused a request: %s", error.message)
            await _send_json(send, 400, error_body(error))
            return
        if rewritten is not decoded:
            body = json.dumps(rewritten).encode()
            scope = dict(scope)
            scope["headers"] = [
                (name, value)
                for name, value in scope["headers"]
                if name.lower() != b"content-length"
            ] + [(b"content-length", str(len(body)).encode())]
        await self.app(scope, _replay(body, receive), send)


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole request body, and whether the client disconnected while sending it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` once, then defers to the client's own
    (so vLLM still notices a client that disconnects mid-stream)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    content = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(content)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})
