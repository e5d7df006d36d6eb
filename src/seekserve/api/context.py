"""What every route needs, built once by `create_app` and reached through typed dependencies."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from seekserve.api.errors import APIError
from seekserve.api.lifecycle import ServerState
from seekserve.api.metrics import ServerMetrics
from seekserve.backends.base import Backend, ModelInfo
from seekserve.config import Settings


@dataclass
class AppContext:
    settings: Settings
    backend: Backend
    metrics: ServerMetrics
    state: ServerState

    def model(self, name: str) -> ModelInfo:
        for info in self.backend.models():
            if info.id == name:
                return info
        raise APIError(404, f"The model `{name}` does not exist or you do not have access to it.", param="model",
                       code="model_not_found")


def get_context(request: Request) -> AppContext:
    return request.app.state.context


Context = Annotated[AppContext, Depends(get_context)]


def require_api_key(request: Request, ctx: Context) -> None:
    """With --api-key set, `Authorization: Bearer <key>` must carry one of them (the header only, never
    the query string). Compared in constant time."""
    keys = ctx.settings.api_key
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                       code="missing_api_key", error_type="authentication_error")
    matched = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        matched |= hmac.compare_digest(token.encode(), key.encode())
    if not matched:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key", error_type="authentication_error")


Authenticated = Depends(require_api_key)
