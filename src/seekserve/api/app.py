"""create_app: builds the FastAPI application around a backend. No globals: tests build their own."""

from __future__ import annotations

from fastapi import FastAPI

from seekserve import __version__
from seekserve.api.context import AppContext
from seekserve.api.errors import install_error_handlers
from seekserve.api.lifecycle import LifecycleMiddleware, ServerState
from seekserve.api.metrics import ServerMetrics
from seekserve.api.routes import chat, completions, health, models
from seekserve.backends.base import Backend
from seekserve.config import Settings


def create_app(settings: Settings, backend: Backend, state: ServerState | None = None) -> FastAPI:
    app = FastAPI(title="seekserve", version=__version__,
                  description="OpenAI/DeepSeek-compatible API of a self-hosted model server")
    stats = getattr(backend, "stats", lambda: None)
    metrics = ServerMetrics(stats)
    app.state.context = AppContext(settings=settings, backend=backend, metrics=metrics,
                                   state=state or ServerState())
    install_error_handlers(app)
    for router in (chat.router, completions.router, models.router):
        app.include_router(router, prefix="/v1")
        app.include_router(router, include_in_schema=False)   # DeepSeek's base URL works without /v1
    app.include_router(health.router)
    app.add_middleware(LifecycleMiddleware, state=app.state.context.state, metrics=metrics,
                       max_body_bytes=settings.max_request_body_bytes)
    return app
