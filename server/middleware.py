"""``EMInfMiddleware``: EM-INF's part of vLLM's HTTP server, as an ASGI middleware.

``em-inf serve`` hands it to ``vllm serve --middleware`` (the path is
:data:`MIDDLEWARE`), which wraps vLLM's own FastAPI application in it. It

* moves a generation request's ``"em_inf"`` field into ``vllm_xargs`` after checking
  it, and refuses invalid settings with HTTP 400 in the OpenAI error format, naming
  the setting, before vLLM's handlers or the engine see them; ``"em_inf"`` on routes
  that cannot carry it is refused rather than dropped silently;
* answers ``GET /v1/em-inf``: the server's EM-INF defaults, the presets and versions.

Everything else, and every response, passes through untouched, streaming included.
vLLM installs ``--middleware`` classes outside its own (CORS, ``--api-key``), so this
one checks the server's API keys itself before it answers anything: a request without
a valid key passes through untouched, and vLLM refuses it (401) as it refuses any
other. ``em-inf serve`` hands the keys' SHA-256 digests over in
:data:`API_KEYS_ENV`; under a plain ``vllm serve --middleware`` the middleware reads
``VLLM_API_KEY``. The server's EM-INF settings come from the environment too (see
:mod:`.settings`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
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

_REFUSED_PATHS = tuple(UNSUPPORTED_PATHS)
#: POST routes whose body the middleware reads (rewrites or refuses).
_READ_PATHS = GENERATION_PATHS + _REFUSED_PATHS

#: The import path ``vllm serve --middleware`` takes.
MIDDLEWARE = f"{__name__}.EMInfMiddleware"
#: The route that describes the server's EM-INF settings.
INFO_PATH = "/v1/em-inf"

_MARKER = b"em_inf"

#: Environment variable with the SHA-256 hex digests of the server's API keys,
#: comma-separated (the keys themselves never leave the command line).
API_KEYS_ENV = "EM_INF_API_KEY_SHA256"


def api_key_environment(keys: Iterable[str | None]) -> dict[str, str]:
    """The environment that tells the middleware which API keys the server takes
    (``--api-key`` values, or ``VLLM_API_KEY``): empty when there are none."""
    digests = [_digest(key) for key in keys if key]
    return {API_KEYS_ENV: ",".join(digests)} if digests else {}


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _api_key_digests() -> tuple[bytes, ...]:
    """The digests ``em-inf serve`` set, else those of ``VLLM_API_KEY``."""
    text = os.environ.get(API_KEYS_ENV)
    if text is None:
        key = os.environ.get("VLLM_API_KEY")
        text = _digest(key) if key else ""
    return tuple(bytes.fromhex(digest) for digest in text.split(",") if digest)


class EMInfMiddleware:
    """Check and translate requests' ``"em_inf"`` field; answer ``GET /v1/em-inf``.

    Args:
        app: the wrapped ASGI application (vLLM's).
        settings: the server's EM-INF settings, which requests are validated
            against as the processor resolves them; by default those ``em-inf
            serve`` put in the environment (:meth:`ServerSettings.from_environment`).

    Raises:
        ValueError: when the environment holds invalid settings.
    """

    def __init__(self, app: ASGIApp, settings: ServerSettings | None = None) -> None:
        self.app = app
        if settings is None:
            settings = ServerSettings.from_environment()
        self.settings = settings
        self._api_key_digests = _api_key_digests()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if not self._authorized(scope):  # vLLM answers 401
            await self.app(scope, receive, send)
            return
        if path == INFO_PATH:
            await self._describe(scope, receive, send)
            return
        if scope["method"] != "POST" or not path.endswith(_READ_PATHS):
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
            if path.endswith(_REFUSED_PATHS):
                refuse_unsupported(path, decoded)
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

    def _authorized(self, scope: Scope) -> bool:
        """Whether the request carries one of the server's API keys (always true
        on a server without keys), checked as vLLM checks them."""
        if not self._api_key_digests:
            return True
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        presented = hashlib.sha256(token.encode()).digest()
        matched = False
        for digest in self._api_key_digests:
            matched |= secrets.compare_digest(presented, digest)
        return matched

    async def _describe(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "GET":
            await _send_json(send, 200, self.settings.describe())
        else:
            await _send_json(
                send, 405, {"detail": "Method Not Allowed"}, [(b"allow", b"GET")]
            )


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


async def _send_json(
    send: Send,
    status: int,
    payload: dict[str, Any],
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    content = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(content)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})
