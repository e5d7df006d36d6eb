"""The OpenAPI document: FastAPI's, plus the generation routes, which the plain ASGI endpoint in
api/inference.py serves and FastAPI therefore does not see. Their request bodies are the same pydantic
models the endpoint validates with."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from seekserve.api.schemas import ChatCompletionRequest, CompletionRequest

REF = "#/components/schemas/{model}"
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_ERRORS = {"400": "The body is not JSON, or a parameter is not supported", "401": "No valid credential",
           "402": "The cloud upstream reports insufficient balance",
           "403": "The key's role or model list does not allow this", "404": "Unknown model",
           "413": "The body is over the size limit", "422": "A field has the wrong type or value",
           "429": "A rate limit was reached (Retry-After says when to retry)",
           "502": "The upstream failed", "503": "No backend can serve the request now",
           "504": "The upstream timed out"}
OPERATIONS: list[tuple[str, type[BaseModel], str, str]] = [
    ("/v1/chat/completions", ChatCompletionRequest, "Create a chat completion", "create_chat_completion"),
    ("/v1/completions", CompletionRequest, "Create a completion", "create_completion"),
    ("/chat/completions", ChatCompletionRequest, "Create a chat completion (DeepSeek's path without /v1)",
     "create_chat_completion_no_prefix"),
    ("/completions", CompletionRequest, "Create a completion (DeepSeek's path without /v1)",
     "create_completion_no_prefix"),
]


def _operation(model: type[BaseModel], summary: str, operation_id: str) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {
        "description": "The completion: a JSON object, or server-sent events when `stream` is true",
        "content": {"application/json": {"schema": {"type": "object"}},
                    "text/event-stream": {"schema": {"type": "string"}}}}}
    for status, description in _ERRORS.items():
        responses[status] = {"description": description,
                             "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}}}
    return {"summary": summary, "operationId": operation_id, "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": REF.format(model=model.__name__)}}}},
            "responses": responses}


def generation_openapi(app: FastAPI) -> dict[str, Any]:
    """app.openapi: built once, then cached on the app as FastAPI does."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
        schemas["Error"] = _ERROR
        for path, model, summary, operation_id in OPERATIONS:
            body = model.model_json_schema(ref_template=REF)
            schemas.update(body.pop("$defs", {}))
            schemas[model.__name__] = body
            schema["paths"][path] = {"post": _operation(model, summary, operation_id)}
        app.openapi_schema = schema
    return app.openapi_schema
