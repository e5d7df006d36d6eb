"""OpenAI-style errors: every failure answers `{"error": {"message", "type", "param", "code"}}` with the
right status. A client mistake is never a 500: bad JSON -> 400, wrong types -> 422, unknown route -> 404."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(BackendError)
    async def _backend(_: Request, exc: BackendError) -> JSONResponse:
        return APIError.from_backend(exc).response()

    @app.exception_handler(GatewayError)
    async def _gateway(_: Request, exc: GatewayError) -> JSONResponse:
        return APIError(exc.status, exc.message, exc.param, exc.code, exc.error_type, exc.headers).response()

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(400, exc.message, param=exc.param, code="invalid_value")

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(503, f"the model engine is not running: {exc}", code="engine_unavailable")

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(404, f"Unknown route: {request.method} {request.url.path}", code="unknown_url")
        if exc.status_code == 405:   # keeps the Allow header (RFC 9110: a 405 must list the allowed methods)
            return error_response(405, f"Method {request.method} is not allowed on {request.url.path}",
                                  code="method_not_allowed", headers=dict(exc.headers or {}))
        return error_response(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "The server had an error while processing your request.", code="internal_error")
