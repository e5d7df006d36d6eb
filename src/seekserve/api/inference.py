"""The generation routes — POST /v1/chat/completions and /v1/completions, and both without /v1 as DeepSeek
allows — as one plain ASGI endpoint in front of FastAPI. FastAPI's request handling (dependency injection,
request objects, StreamingResponse's task group) cost about 1 ms of CPU per request, the gateway's whole
budget (benchmarks/gateway_overhead.py); every other route stays with FastAPI.

A request is read, authenticated and authorized (the `inference` permission), validated with the same
pydantic models, handed to the route (api/routes/chat.py, completions.py), and answered: a JSON body, or
SSE frames with `: keep-alive` comments while nothing else was sent for `keepalive_interval` seconds. A
client that goes away cancels the work (the engine request is aborted, the upstream connection closed).
Errors have the OpenAI shape and the same statuses as everywhere else (api/errors.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel
from pydantic_core import from_json, to_json
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from seekserve.api.context import AppContext
from seekserve.api.errors import APIError, as_api_error
from seekserve.api.routes.chat import create_chat_completion
from seekserve.api.routes.completions import create_completion
from seekserve.api.schemas import ChatCompletionRequest, CompletionRequest
from seekserve.api.streaming import KEEPALIVE, Reply, error_frames
from seekserve.gateway.rbac import Permission, check

log = logging.getLogger("seekserve.api")
Handler = Callable[[AppContext, Any, Any, dict[str, str]], Awaitable[Reply]]
ROUTES: dict[str, tuple[type[BaseModel], Handler]] = {
    "/v1/chat/completions": (ChatCompletionRequest, create_chat_completion),
    "/chat/completions": (ChatCompletionRequest, create_chat_completion),
    "/v1/completions": (CompletionRequest, create_completion),
    "/completions": (CompletionRequest, create_completion),
}
PERMISSION = Permission.inference
WATCH_AFTER = 0.05      # seconds before a request watches for its client's disconnect
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]


class InferenceEndpoint:
    """ASGI middleware: answers the generation routes itself, passes everything else on."""

    def __init__(self, app: ASGIApp, context: AppContext) -> None:
        self.app, self.ctx = app, context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        where = f"{scope['method']} {scope['path']}"
        exchange = _Exchange(send, self.ctx.settings.keepalive_interval)
        if scope["method"] != "POST":
            await exchange.error(APIError(405, f"Method {scope['method']} is not allowed on {scope['path']}",
                                          code="method_not_allowed", headers={"Allow": "POST"}))
            return
        body = await _read_body(receive)
        if body is None:
            return      # the client went away before sending its request
        task = asyncio.current_task()
        assert task is not None
        # the disconnect watcher is a task of its own, started only once a request runs past WATCH_AFTER:
        # most answers are done before that, and a task per request costs more than the timer. A client that
        # leaves stops its request's work within WATCH_AFTER at most.
        watcher: list[asyncio.Future[None]] = []
        timer = asyncio.get_running_loop().call_later(
            WATCH_AFTER, lambda: watcher.append(asyncio.ensure_future(_watch(receive, task, exchange))))
        deferred = self.ctx.gateway.defer_settling()     # usage and audit once the answer is out
        try:
            await self._handle(scope, route, body, exchange, where)
        except asyncio.CancelledError:
            if not exchange.disconnected:
                raise
            task.uncancel()     # our own cancellation (the client left): the work is stopped, nothing to send
        finally:
            timer.cancel()
            for w in watcher:
                w.cancel()
            await self.ctx.gateway.settle_deferred(deferred)

    async def _handle(self, scope: Scope, route: tuple[type[BaseModel], Handler], body: bytes,
                      exchange: _Exchange, where: str) -> None:
        model, handler = route
        try:
            headers = _headers(scope)
            principal = await self.ctx.auth.authenticate(headers.get("authorization"))
            check(principal, PERMISSION)
            request = model.model_validate(_json(body))
            reply = await handler(self.ctx, principal, request, headers)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI-style error
            await exchange.error(as_api_error(e, where))
            return
        if reply.events is None:
            await exchange.json(200, reply.payload, reply.headers)
        else:
            await exchange.stream(reply, where)


class _Exchange:
    """The response side of one request: sends at most one response, tracks whether the client is gone."""

    def __init__(self, send: Send, keepalive: float) -> None:
        self._send, self.keepalive = send, keepalive
        self.started = self.finished = self.disconnected = False
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    async def json(self, status: int, payload: Any, headers: dict[str, str]) -> None:
        body = to_json(payload)    # as streaming.frame: pydantic's serializer
        self.started = self.finished = True
        await self._send({"type": "http.response.start", "status": status,
                          "headers": [(b"content-type", b"application/json"),
                                      (b"content-length", str(len(body)).encode()), *_encode(headers)]})
        await self._send({"type": "http.response.body", "body": body})

    async def error(self, e: APIError) -> None:
        await self.json(e.status, e.body(), e.headers)

    async def stream(self, reply: Reply, where: str) -> None:
        assert reply.events is not None
        loop = asyncio.get_running_loop()
        self.started = True
        await self._send({"type": "http.response.start", "status": 200,
                          "headers": [*_SSE_HEADERS, *_encode(reply.headers)]})
        self._last = loop.time()
        self._timer = loop.call_later(self.keepalive, self._tick)
        try:
            async with contextlib.aclosing(reply.events) as events:
                async for event in events:
                    self._last = loop.time()
                    await self._send({"type": "http.response.body", "body": event, "more_body": True})
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the status line is gone: report it as a last event
            log.warning("%s failed mid-stream: %s", where, getattr(e, "message", None) or repr(e))
            tail = error_frames(e)
        else:
            tail = b""
        finally:
            self._timer.cancel()
        self.finished = True
        await self._send({"type": "http.response.body", "body": tail})

    def _tick(self) -> None:
        """Every keep-alive interval: a comment if nothing was sent during it."""
        if self.finished or self.disconnected:
            return
        loop = asyncio.get_running_loop()
        idle = loop.time() - self._last
        if idle >= self.keepalive * 0.99:
            self._last = loop.time()
            asyncio.ensure_future(self._keepalive())
            idle = 0.0
        self._timer = loop.call_later(self.keepalive - idle, self._tick)

    async def _keepalive(self) -> None:
        if not (self.finished or self.disconnected):   # checked and sent in one step: no await in between
            with contextlib.suppress(OSError, RuntimeError):    # the connection closed meanwhile
                await self._send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})


def _json(body: bytes) -> Any:
    """The decoded body. Validated as Python objects afterwards, so messages say "list", as FastAPI's do."""
    if not body.strip():
        raise APIError(422, "The request body is empty: send a JSON object.", code="invalid_value")
    try:
        return from_json(body)   # pydantic's parser: bounded nesting depth, unlike json.loads' recursion
    except ValueError as e:     # also a body that is not UTF-8, or nested too deeply
        raise APIError(400, f"We could not parse the JSON body of your request: it is not valid JSON ({e}).",
                       code="invalid_json") from None


async def _read_body(receive: Receive) -> bytes | None:
    """The request body (size limits are the lifecycle middleware's); None if the client disconnected."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


async def _watch(receive: Receive, task: asyncio.Task[Any], exchange: _Exchange) -> None:
    """After the body, receive() only answers when the client disconnects (or the response is complete)."""
    message: Message = await receive()
    while message["type"] != "http.disconnect":
        message = await receive()
    if not exchange.finished:
        exchange.disconnected = True
        task.cancel()


def _headers(scope: Scope) -> dict[str, str]:
    """Request headers by lowercase name; the first of repeated ones, as Starlette's Headers.get."""
    out: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1")
        if key not in out:
            out[key] = value.decode("latin-1")
    return out


_NAMES: dict[str, bytes] = {}     # header name -> its wire form: the same dozen names on every answer


def _encode(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in headers.items():
        raw = _NAMES.get(name)
        if raw is None:
            raw = name.lower().encode("latin-1")
            if len(_NAMES) < 256:
                _NAMES[name] = raw
        out.append((raw, value.encode("latin-1") if type(value) is str else str(value).encode("latin-1")))
    return out
