"""create_app: builds the FastAPI application around its backends and the gateway. No globals: tests
build their own. Every route must declare its permission (`requires`); one that does not is refused here.
The generation routes are served by a plain ASGI endpoint in front of FastAPI (api/inference.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from seekserve import __version__
from seekserve.api import inference
from seekserve.api.context import AppContext, route_permission
from seekserve.api.errors import install_error_handlers
from seekserve.api.lifecycle import LifecycleMiddleware, ServerState, as_json
from seekserve.api.metrics import ServerMetrics
from seekserve.api.openapi import generation_openapi
from seekserve.api.routes import health, keys, models, records
from seekserve.backends.base import Backend
from seekserve.config import Settings
from seekserve.gateway.rbac import Permission
from seekserve.gateway.setup import GatewayParts, build_gateway


def create_app(settings: Settings, backend: Backend | dict[str, Backend], state: ServerState | None = None,
               parts: GatewayParts | None = None) -> FastAPI:
    backends = backend if isinstance(backend, dict) else {"local": backend}
    local = backends.get("local")
    metrics = ServerMetrics(getattr(local, "stats", lambda: None))
    owned = parts is None
    parts = parts or build_gateway(settings, backends, metrics.registry)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if owned:
            await parts.start()     # the Kafka relay runs in the server's loop
        yield
        if owned:   # in the server's own loop: flushes usage/audit records, closes Redis and HTTP clients
            await parts.close()

    app = SeekserveApp(title="seekserve", version=__version__, lifespan=lifespan,
                       description="OpenAI/DeepSeek-compatible API of a self-hosted model server")
    app.state.context = AppContext(settings=settings, backends=parts.backends, metrics=metrics,
                                   state=state or ServerState(), auth=parts.auth, gateway=parts.gateway,
                                   keys=parts.keys, usage=parts.usage, audit=parts.audit, writer=parts.writer)
    app.state.gateway_parts = parts
    install_error_handlers(app)
    table = [("POST", path, inference.PERMISSION) for path in inference.ROUTES]
    mounts = [(models.router, "/v1", True), (models.router, "", False)]   # DeepSeek: also without /v1
    mounts += [(r, "", True) for r in (health.router, keys.router, records.router)]
    for router, prefix, in_schema in mounts:
        table += _permissions(router, prefix)
        app.include_router(router, prefix=prefix, include_in_schema=in_schema)
    app.state.route_table = sorted(set(table))
    app.openapi = lambda: generation_openapi(app)   # type: ignore[method-assign]
    app.front = LifecycleMiddleware(inference.InferenceEndpoint(app.fastapi, app.state.context),
                                    state=app.state.context.state, metrics=metrics,
                                    max_body_bytes=settings.max_request_body_bytes)
    return app


class SeekserveApp(FastAPI):
    """FastAPI behind two plain ASGI layers: the lifecycle checks (drain, body size, in-flight count) for
    every request, then the generation endpoint, which answers its routes before FastAPI's own middleware
    stack (error pages, telemetry hooks, body limits: about 0.04 ms a request) is entered."""

    front: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.front(scope, receive, send)

    async def fastapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            scope = as_json(scope)
        await super().__call__(scope, receive, send)


def _permissions(router: APIRouter, prefix: str) -> list[tuple[str, str, Permission]]:
    """(method, path, permission) of each route; a route that declares no permission is an error."""
    out = []
    for route in router.routes:
        if not isinstance(route, APIRoute):
            continue
        permission = route_permission(route)
        if permission is None:
            raise RuntimeError(f"route {prefix}{route.path} declares no permission (use requires(...))")
        out += [(method, prefix + route.path, permission) for method in route.methods - {"HEAD"}]
    return out
