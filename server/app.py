"""vLLM's OpenAI-compatible FastAPI application with EM-INF attached.

The application is vLLM's own (``build_app`` + ``init_app_state``): every route,
middleware, error handler and metric is vLLM's. EM-INF adds two things:

* :class:`~em_inf.server.middleware.EMInfRequestMiddleware`, innermost of the user
  middleware (inside vLLM's CORS, API-key and request-id middleware, so a request
  without a valid key is refused before its settings are looked at);
* ``GET /v1/em-inf``: the server's EM-INF defaults, the presets and the version.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.middleware import Middleware

from . import vllm_compat
from .middleware import EMInfRequestMiddleware
from .settings import ServerSettings

INFO_PATH = "/v1/em-inf"

router = APIRouter()


@router.get(INFO_PATH, summary="EM-INF defaults, presets and version")
async def show_em_inf(raw_request: Request) -> dict[str, Any]:
    """The server's EM-INF defaults, the presets with their values and sources."""
    settings: ServerSettings = raw_request.app.state.em_inf_settings
    return settings.describe()


def attach_em_inf(app: FastAPI, settings: ServerSettings) -> FastAPI:
    """Add EM-INF's route and request middleware to vLLM's ``app``.

    Call it before the app serves: Starlette builds the middleware stack then.
    """
    app.state.em_inf_settings = settings
    app.include_router(router)
    # Starlette builds the middleware stack on the first call; the last entry of
    # ``user_middleware`` is the innermost.
    app.user_middleware.append(Middleware(EMInfRequestMiddleware, settings=settings))
    # vLLM's SageMaker bootstrap already built the stack once; drop it so Starlette
    # rebuilds it, with this middleware, on the first call.
    app.middleware_stack = None
    return app


async def build_em_inf_app(
    engine_client: Any, args: Namespace, settings: ServerSettings
) -> FastAPI:
    """vLLM's app for ``engine_client`` and ``args``, with EM-INF attached and its
    state initialised (what ``vllm serve`` builds, plus :func:`attach_em_inf`)."""
    supported_tasks = await engine_client.get_supported_tasks()
    app = vllm_compat.get("build_app")(
        args, supported_tasks, engine_client.model_config
    )
    attach_em_inf(app, settings)
    await vllm_compat.get("init_app_state")(
        engine_client, app.state, args, supported_tasks
    )
    return app
