"""What every route needs, built once by `create_app` and reached through typed dependencies:
`Context` (the app's components) and `requires(permission)` (the caller's Principal, authenticated and
authorized — every route declares one, `create_app` refuses a route that does not)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.routing import APIRoute

from seekserve.api.errors import APIError
from seekserve.api.lifecycle import ServerState
from seekserve.api.metrics import ServerMetrics
from seekserve.backends.base import Backend, ModelInfo
from seekserve.config import Settings
from seekserve.gateway.auth import Authenticator
from seekserve.gateway.pipeline import Gateway
from seekserve.gateway.principal import Principal
from seekserve.gateway.rbac import Permission, check
from seekserve.gateway.usage import RecordWriter
from seekserve.store.audit import AuditLog
from seekserve.store.keys import KeyStore
from seekserve.store.usage import UsageStore


@dataclass
class AppContext:
    settings: Settings
    backends: dict[str, Backend]       # by name; "local" is the native engine when there is one
    metrics: ServerMetrics
    state: ServerState
    auth: Authenticator
    gateway: Gateway
    keys: KeyStore
    usage: UsageStore
    audit: AuditLog
    writer: RecordWriter

    def models(self, principal: Principal | None = None) -> list[ModelInfo]:
        seen: dict[str, ModelInfo] = {}
        for backend in self.backends.values():
            for info in backend.models():
                if info.id not in seen and (principal is None or principal.may_use_model(info.id)):
                    seen[info.id] = info
        return list(seen.values())

    def model(self, name: str, principal: Principal | None = None) -> ModelInfo:
        for info in self.models(principal):
            if info.id == name:
                return info
        raise APIError(404, f"The model `{name}` does not exist or you do not have access to it.", param="model",
                       code="model_not_found")

    def detokenize(self, model: str, token_ids: list[int]) -> str:
        for backend in self.backends.values():
            if any(m.id == model for m in backend.models()):
                return backend.detokenize(token_ids)
        raise APIError(404, f"The model `{model}` does not exist", param="model", code="model_not_found")


async def get_context(request: Request) -> AppContext:
    # async: FastAPI runs a sync dependency in its thread pool, a hop per request for a field read
    return request.app.state.context


Context = Annotated[AppContext, Depends(get_context)]


async def authenticate(request: Request, ctx: Context) -> Principal:
    """`Authorization: Bearer …` (the header only: never the query string, which ends up in access logs)."""
    principal = await ctx.auth.authenticate(request.headers.get("authorization"))
    request.state.principal = principal
    return principal


def requires(permission: Permission) -> Any:
    """The route's permission, as a dependency that yields the authorized Principal (None for public)."""
    if permission is Permission.public:
        async def public() -> None:
            return None
        public.permission = permission  # type: ignore[attr-defined]
        return Depends(public)

    async def authorized(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        check(principal, permission)
        return principal
    authorized.permission = permission  # type: ignore[attr-defined]
    return Depends(authorized)


def route_permission(route: APIRoute) -> Permission | None:
    """The permission a route declared through `requires` (None: it declared none)."""
    pending: list[Any] = [route.dependant]
    while pending:
        dep = pending.pop()
        call: Callable[..., Any] | None = getattr(dep, "call", None)
        if call is not None and hasattr(call, "permission"):
            return call.permission
        pending.extend(dep.dependencies)
    return None
