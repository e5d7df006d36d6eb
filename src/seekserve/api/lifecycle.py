"""Plain ASGI middleware (it must not buffer streams): refuses bodies over the size limit (413), answers
503 while the server drains, counts in-flight requests so shutdown can wait for them, and counts HTTP
statuses for /metrics."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from seekserve.api.metrics import ServerMetrics
from seekserve.metric_children import child

# routes answered even while draining (probes and scrapes)
ALWAYS_OPEN = ("/health", "/ready", "/metrics")


class ServerState:
    """Shared by the middleware, the routes and the drain logic."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


def _error(status: int, message: str, code: str, headers: list[tuple[bytes, bytes]] | None = None
           ) -> tuple[Message, Message]:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                 else "service_unavailable_error", "param": None, "code": code}}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *(headers or [])]}
    return start, {"type": "http.response.body", "body": body}


class _BodyTooLarge(Exception):
    pass


class LifecycleMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState, metrics: ServerMetrics, max_body_bytes: int) -> None:
        self.app, self.state, self.metrics, self.max_body_bytes = app, state, metrics, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        status: dict[str, Any] = {"code": 500}

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.state.draining and not path.startswith(ALWAYS_OPEN):
                for m in _error(503, "The server is shutting down; retry on another replica.", "draining",
                                [(b"retry-after", b"1"), (b"connection", b"close")]):
                    await send_counted(m)
                return
            declared = next((v for k, v in scope.get("headers") or () if k == b"content-length"), None)
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                await self._too_large(send_counted)
                return
            tracked = not path.startswith(ALWAYS_OPEN)
            if tracked:
                self.state.enter()
            try:
                if declared is None or not declared.isdigit():
                    # no length announced (chunked): read the body here, up to the limit. Raising from inside
                    # the app's receive() is not enough: FastAPI turns any error while it reads the body
                    # into a 400.
                    body = await self._read_limited(receive)
                    if body is None:
                        await self._too_large(send_counted)
                        return
                    receive = _replay(body, receive)
                await self.app(scope, self._limited(receive), send_counted)
            except _BodyTooLarge:
                await self._too_large(send_counted)
            finally:
                if tracked:
                    self.state.leave()
        finally:
            child(self.metrics.http_requests, method, _route_label(path), str(status["code"])).inc()

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise _BodyTooLarge
            return message
        return wrapped

    async def _read_limited(self, receive: Receive) -> bytes | None:
        """The whole request body, or None once it grows past the limit (the rest is left unread)."""
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":     # the client went away: let the app see an empty body
                return b"".join(chunks)
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Send) -> None:
        for m in _error(413, f"The request body is larger than the limit of {self.max_body_bytes} bytes.",
                        "request_too_large"):
            await send(m)


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the already-read body to the app once, then pass through (so disconnects are still seen)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


def as_json(scope: Scope) -> Scope:
    """Bodies are JSON whatever the Content-Type says (`curl -d` sends form-urlencoded)."""
    headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


_KNOWN = ("/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions", "/v1/models", "/models",
          "/health", "/ready", "/metrics")


def _route_label(path: str) -> str:
    """Bounded label values: unknown paths are one label, not one each."""
    return path if path in _KNOWN else ("/v1/models/{model}" if path.startswith("/v1/models/") else "other")
