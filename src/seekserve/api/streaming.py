"""What a generation route answers (`Reply`: a JSON body, or server-sent events) and the SSE wire format:
`data: {json}\n\n` frames ending with `data: [DONE]`, `: keep-alive` comments while a request waits, and
a failure after the first byte reported as a last error event (the status line is gone by then)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic_core import to_json

T = TypeVar("T")
KEEPALIVE = b": keep-alive\n\n"
DONE_FRAME = b"data: [DONE]\n\n"


@dataclass
class Reply:
    """A route's answer: `payload` (JSON) or `events` (SSE frames), with the gateway's response headers."""
    headers: dict[str, str]
    payload: dict[str, Any] | None = None
    events: AsyncIterator[bytes] | None = None


def frame(payload: dict[str, Any]) -> bytes:
    """Payloads are serialized by pydantic's to_json: compact UTF-8 (non-ASCII kept, as DeepSeek sends it) in
    about a fifth of json.dumps' time; a non-finite float, which JSON cannot spell, becomes null."""
    return b"data: " + to_json(payload) + b"\n\n"


class ChunkFrames:
    """The frames of one stream's chunk objects, which share every field but `choices`:
    frames(choices) == frame({**head, "choices": choices, **tail}), with head and tail serialized once."""

    def __init__(self, head: dict[str, Any], tail: dict[str, Any] | None = None) -> None:
        self._prefix = b"data: " + to_json(head)[:-1] + (b',"choices":' if head else b'"choices":')
        self._suffix = (b"," + to_json(tail)[1:] if tail else b"}") + b"\n\n"

    def __call__(self, choices: list[Any]) -> bytes:
        return self._prefix + to_json(choices) + self._suffix


def error_frames(e: Exception) -> bytes:
    """A failure mid-stream: an OpenAI-style error event, then [DONE]."""
    message = getattr(e, "message", None) or str(e) or type(e).__name__
    return frame({"error": {"message": message, "type": "server_error", "param": None,
                            "code": getattr(e, "code", None)}}) + DONE_FRAME


async def sse_events(items: AsyncIterator[T], encode: Callable[[T], bytes | None], more_ready: Callable[[T], bool],
                     last: Callable[[], list[bytes]]) -> AsyncIterator[bytes]:
    """A route's SSE body: `encode` turns each item into a frame (None: nothing to send); frames of items
    that arrived together (`more_ready`) go out in one write; then `last()` and [DONE]. Closing this closes
    `items`, which stops the backend work (a client that left)."""
    pending: list[bytes] = []
    async with contextlib.aclosing(items) as source:
        try:
            async for item in source:
                data = encode(item)
                if data is not None:
                    pending.append(data)
                if pending and not more_ready(item):
                    out, pending = b"".join(pending), []
                    yield out
        except Exception:
            if pending:     # what arrived before the failure still goes out, then the error event
                yield b"".join(pending)
            raise
    yield b"".join([*pending, *last(), DONE_FRAME])
