"""GET /v1/models and /v1/models/{model}."""

from __future__ import annotations

import time

from fastapi import APIRouter

from seekserve.api.context import Context, requires
from seekserve.backends.base import ModelInfo
from seekserve.gateway.principal import Principal
from seekserve.gateway.rbac import Permission

router = APIRouter()
_CREATED = int(time.time())


def _model(info: ModelInfo) -> dict:
    return {"id": info.id, "object": "model", "created": _CREATED, "owned_by": info.owned_by,
            "max_model_len": info.max_model_len}


@router.get("/models", summary="List models")
async def list_models(ctx: Context, principal: Principal = requires(Permission.models_read)) -> dict:
    """The models this caller may use (a key restricted to some models sees only those)."""
    return {"object": "list", "data": [_model(m) for m in ctx.models(principal)]}


@router.get("/models/{model}", summary="Retrieve a model")
async def get_model(model: str, ctx: Context, principal: Principal = requires(Permission.models_read)) -> dict:
    return _model(ctx.model(model, principal))
