"""GatewayError: a pipeline step's refusal (401, 403, 404, 429, 503 …), answered as an OpenAI-style error
body with `status` and `headers` (Retry-After, x-ratelimit-*). Messages never contain a secret."""

from __future__ import annotations


class GatewayError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, error_type: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.error_type = error_type
        self.headers = headers or {}


def unauthenticated(message: str, code: str = "invalid_api_key") -> GatewayError:
    return GatewayError(401, message, code=code, error_type="authentication_error",
                        headers={"WWW-Authenticate": "Bearer"})
