"""Server-sent events: `data: {json}\n\n` frames ending with `data: [DONE]`, and `: keep-alive` comments
while a request waits. The source is read by a pump task, so a keep-alive timeout never cancels it; closing
the stream (a client disconnect) cancels the pump, which aborts the engine request."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse

T = TypeVar("T")
_DONE = object()
KEEPALIVE = ": keep-alive\n\n"
DONE_FRAME = "data: [DONE]\n\n"


def frame(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def with_keepalive(source: AsyncIterator[T], interval: float) -> AsyncIterator[T | None]:
    """Items of source, with None whenever `interval` seconds pass without one."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in source:
                await queue.put(item)
            await queue.put(_DONE)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # delivered to the consumer, raised there
            await queue.put(e)

    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), interval)
            except TimeoutError:
                yield None
                continue
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def guard(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once headers are sent a failure cannot change the status: report it as a final error event."""
    try:
        async for event in events:
            yield event
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - reported to the client, logged by the caller's logger
        message = getattr(e, "message", None) or str(e) or type(e).__name__
        yield frame({"error": {"message": message, "type": "server_error", "param": None,
                               "code": getattr(e, "code", None)}})
        yield DONE_FRAME


def sse_response(events: AsyncIterator[str], headers: dict[str, str] | None = None) -> StreamingResponse:
    """The HTTP response of a stream: errors after the first byte become a final event (`guard`)."""
    return StreamingResponse(guard(events), media_type="text/event-stream",
                             headers={**(headers or {}), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
