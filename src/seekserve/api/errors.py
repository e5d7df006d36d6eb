"""OpenAI-style errors: every failure answers `{"error": {"message", "type", "param", "code"}}` with the
right status. A client mistake is never a 500: bad JSON -> 400, wrong types -> 422, unknown route -> 404."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from seekserve.backends.base import BackendError
from seekserve.engine.errors import EngineDeadError, InvalidRequestError
from seekserve.gateway.errors import GatewayError

log = logging.getLogger("seekserve.api")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          409: "invalid_request_error", 422: "invalid_request_error", 402: "insufficient_quota", 429: "rate_limit_error", 500: "server_error", 502: "server_error", 504: "server_error",
          503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.error_type = error_type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    @classmethod
    def from_backend(cls, e: BackendError) -> APIError:
        return cls(e.status, e.message, e.param, e.code, e.error_type, e.headers)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_response(status: int, message: str, **kw: Any) -> JSONResponse:
    return APIError(status, message, **kw).response()


def validation_error(errors: Sequence[Any]) -> APIError:
    """pydantic's errors for a request body -> 400 (not JSON) or 422 (naming the first bad field)."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(400, "We could not parse the JSON body of your request: it is not valid JSON.",
                        code="invalid_json")
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return APIError(422, f"Invalid value for '{param}': {msg}{more}" if param else f"{msg}{more}", param=param,
                    code="invalid_value")


def as_api_error(exc: Exception, where: str) -> APIError:
    """Any failure of a request -> the error its client sees; an unexpected one is logged and is a 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BackendError):
        return APIError.from_backend(exc)
    if isinstance(exc, GatewayError):
        return APIError(exc.status, exc.message, exc.param, exc.code, exc.error_type, exc.headers)
    if isinstance(exc, InvalidRequestError):
        return APIError(400, exc.message, param=exc.param, code="invalid_value")
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the model engine is not running: {exc}", code="engine_unavailable")
    if isinstance(exc, RequestValidationError | ValidationError):
        return validation_error(exc.errors())
    log.error("unexpected error on %s", where, exc_info=exc)
    return APIError(500, "The server had an error while processing your request.", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(404, f"Unknown route: {request.method} {request.url.path}", code="unknown_url")
        if exc.status_code == 405:   # keeps the Allow header (RFC 9110: a 405 must list the allowed methods)
            return error_response(405, f"Method {request.method} is not allowed on {request.url.path}",
                                  code="method_not_allowed", headers=dict(exc.headers or {}))
        return error_response(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))

    async def _any(request: Request, exc: Exception) -> JSONResponse:
        return as_api_error(exc, f"{request.method} {request.url.path}").response()

    for kind in (APIError, BackendError, GatewayError, InvalidRequestError, EngineDeadError, RequestValidationError,
                 Exception):
        app.add_exception_handler(kind, _any)
