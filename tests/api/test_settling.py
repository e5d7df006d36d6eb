"""A call is settled (limiter reconciled, usage and audit recorded) after its answer went out, not before:
none of it is the client's business. Still inside the request, so nothing is lost: the records exist by the
time the app's call returns, for answers, streams and a client that leaves mid-stream."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from seekserve.gateway.pipeline import Deferred, Gateway
from tests.api.conftest import API_KEY, make_app


def _scope(body: bytes) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
            "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {API_KEY}".encode()),
                        (b"content-length", str(len(body)).encode())]}


async def _call(app: Any, body: bytes, log: list[str], leave_after: int | None = None) -> None:
    """One request through the ASGI app; `log` gets "body" per body message (and "usage" from the writer).
    With `leave_after`, the client disconnects after that many body messages."""
    gone = asyncio.Event()
    sent = 0
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal sent
        if message["type"] == "http.response.body":
            log.append("body" if message.get("more_body") else "last body")
            sent += 1
            if leave_after is not None and sent >= leave_after:
                gone.set()
                await asyncio.sleep(0.5)    # the client is gone: the server notices while we wait here
        if not message.get("more_body", False) and message["type"] == "http.response.body":
            gone.set()
    await app(_scope(body), receive, send)


@pytest.mark.parametrize("stream", [False, True])
def test_usage_is_recorded_after_the_answer_is_sent(chat_model: Path, stream: bool) -> None:
    _, _, app = make_app(chat_model, served_model_name=["tiny-chat"], api_key=[API_KEY])
    log: list[str] = []

    async def main() -> None:
        async with app.router.lifespan_context(app):
            writer = app.state.context.writer
            add_usage = writer.add_usage
            writer.add_usage = lambda record: (log.append(f"usage {record.status}"), add_usage(record))[1]
            body = json.dumps({"model": "tiny-chat", "stream": stream, "max_tokens": 8,
                               "messages": [{"role": "user", "content": "hello"}]}).encode()
            await _call(app, body, log)
            assert log[-2:] == ["last body", "usage 200"], log    # recorded, and only after the answer
            log.clear()
            if stream:      # a client that leaves mid-stream: its call is still recorded, as a 499
                body = json.dumps({"model": "tiny-chat", "stream": True, "max_tokens": 200, "ignore_eos": True,
                                   "messages": [{"role": "user", "content": "hello"}]}).encode()
                await _call(app, body, log, leave_after=2)
                assert log[-1] == "usage 499", log
            assert writer.flush(10)
    asyncio.run(main())


def test_a_call_that_fails_to_settle_is_logged_and_the_others_still_settle(caplog: pytest.LogCaptureFixture
                                                                            ) -> None:
    gateway = Gateway.__new__(Gateway)     # only settle_deferred's own logic is under test
    settled: list[str] = []

    async def settle(call: Any) -> None:
        if call.requests[0].request_id == "bad":
            raise RuntimeError("the store refused")
        settled.append(call.requests[0].request_id)
    gateway.settle = settle  # type: ignore[method-assign]
    deferred = Deferred()
    deferred.calls += [SimpleNamespace(requests=[SimpleNamespace(request_id=rid)]) for rid in ("a", "bad", "b")]
    asyncio.run(gateway.settle_deferred(deferred))
    assert settled == ["a", "b"] and not deferred.open and not deferred.calls
    assert "settling bad failed" in caplog.text
