"""GET /v1/models and /v1/models/{model}."""

from __future__ import annotations

import time

from fastapi import APIRouter

from seekserve.api.context import Authenticated, Context
from seekserve.backends.base import ModelInfo

router = APIRouter(dependencies=[Authenticated])
_CREATED = int(time.time())


def _model(info: ModelInfo) -> dict:
    return {"id": info.id, "object": "model", "created": _CREATED, "owned_by": info.owned_by,
            "max_model_len": info.max_model_len}


@router.get("/models", summary="List models")
async def list_models(ctx: Context) -> dict:
    return {"object": "list", "data": [_model(m) for m in ctx.backend.models()]}


@router.get("/models/{model}", summary="Retrieve a model")
async def get_model(model: str, ctx: Context) -> dict:
    return _model(ctx.model(model))
