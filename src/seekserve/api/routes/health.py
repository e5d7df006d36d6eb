"""Probes and metrics: /health (the process answers), /ready (model loaded, engine loop alive, not
draining), /metrics (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from seekserve.api.context import Context, requires
from seekserve.gateway.rbac import Permission

# probes and metrics answer without credentials: kubelets and Prometheus scrape them
router = APIRouter(dependencies=[requires(Permission.public)])


@router.get("/health", summary="Liveness")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness", responses={503: {"description": "not ready or draining"}})
async def ready(ctx: Context) -> JSONResponse:
    if ctx.state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not all(b.is_ready() for b in ctx.backends.values()):
        return JSONResponse({"status": "not ready"}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(ctx: Context) -> Response:
    return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
