"""SSE on the wire: frames, [DONE], keep-alive comments while queued, disconnect aborts the engine
request, and Chinese text streamed without U+FFFD."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import pytest

from seekserve.api.streaming import sse_events
from seekserve.backends.base import BackendError, Chunk
from tests.api.conftest import CHINESE_SCRIPT, running_server


def _events(lines) -> list[str]:
    return [line for line in lines if line]


def test_sse_frames_and_done(chat_model) -> None:
    with running_server(chat_model) as (base, _, _):
        body = {"model": chat_model.name, "prompt": "Hello", "max_tokens": 4, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            raw = r.read().decode()
    frames = raw.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    payloads = [json.loads(f[len("data: "):]) for f in frames[:-2]]
    assert all(f.startswith("data: ") for f in frames[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 4
    assert all(p["usage"] is None for p in payloads[:-1])


def test_keepalive_while_queued(chat_model) -> None:
    with running_server(chat_model, batch_size=1, keepalive_interval=0.1) as (base, backend, _):
        hold = {"model": chat_model.name, "prompt": "a", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=hold, timeout=60) as first:
            lines = first.iter_lines()
            next(line for line in lines if line.startswith("data:"))      # the only slot is taken
            queued = {"model": chat_model.name, "prompt": "b", "max_tokens": 2, "stream": True}
            seen: list[str] = []

            def read_second() -> None:
                with httpx.stream("POST", f"{base}/v1/completions", json=queued, timeout=60) as second:
                    seen.extend(second.iter_lines())

            t = threading.Thread(target=read_second)
            t.start()
            for _ in lines:        # let the first finish
                pass
            t.join(60)
    first_data = next(i for i, line in enumerate(seen) if line.startswith("data:"))
    assert ": keep-alive" in seen[:first_data], seen[:5]
    assert seen[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in seen


def _running(base: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    return float(re.search(r"^seekserve:num_requests_running (\S+)$", text, re.M).group(1))


def test_client_disconnect_aborts_engine_request(chat_model) -> None:
    with running_server(chat_model) as (base, backend, _):
        body = {"model": chat_model.name, "prompt": "a", "max_tokens": 240, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            assert _running(base) == 1
        closed = time.monotonic()                       # connection closed mid-generation
        while _running(base) != 0:
            assert time.monotonic() - closed < 1.0, "running gauge did not return to 0 within a second"
            time.sleep(0.02)
        engine = backend.engine
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_non_stream_disconnect_aborts(chat_model) -> None:
    with running_server(chat_model) as (base, backend, _):
        body = {"model": chat_model.name, "prompt": "a", "max_tokens": 240, "ignore_eos": True}
        try:
            httpx.post(f"{base}/v1/completions", json=body, timeout=0.3)
        except httpx.TimeoutException:
            pass
        deadline = time.monotonic() + 2.0
        while backend.num_active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert backend.num_active == 0


def test_chinese_stream_has_no_replacement_chars(chinese_model) -> None:
    with running_server(chinese_model) as (base, _, _):
        body = {"model": chinese_model.name, "messages": [{"role": "user", "content": "你好"}], "stream": True,
                "temperature": 0, "max_tokens": 40}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as r:
            payloads = [json.loads(line[6:]) for line in r.iter_lines()
                        if line.startswith("data: {")]
    deltas = [p["choices"][0]["delta"].get("content") or "" for p in payloads if p["choices"]]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == CHINESE_SCRIPT
    assert len([d for d in deltas if d]) > 3
    assert payloads[-1]["choices"][0]["finish_reason"] == "stop"


# -- frames that arrive together are written together -------------------------------------------------------
def _frames(items: list[tuple[str, bool]], fail_after: int | None = None) -> tuple[list[bytes], BaseException | None]:
    """What sse_events writes for (text, more_ready) items; the error it raised, if any."""
    async def source():
        for i, (text, more) in enumerate(items):
            if i == fail_after:
                raise BackendError("the upstream u failed mid-stream: boom", status=502)
            yield Chunk(index=0, text=text, more_ready=more)

    async def run() -> tuple[list[bytes], BaseException | None]:
        out: list[bytes] = []
        try:
            async for data in sse_events(source(), lambda c: f"<{c.text}>".encode(), lambda c: c.more_ready,
                                         lambda: [b"<usage>"]):
                out.append(data)
        except BackendError as e:
            return out, e
        return out, None
    return asyncio.run(run())


def test_frames_of_one_network_read_go_out_in_one_write() -> None:
    writes, error = _frames([("a", True), ("b", True), ("c", False), ("d", False), ("e", True)])
    assert error is None
    assert writes == [b"<a><b><c>", b"<d>", b"<e><usage>data: [DONE]\n\n"]


def test_a_failure_mid_burst_still_delivers_what_came_before_it() -> None:
    writes, error = _frames([("a", False), ("b", True), ("c", True), ("never", False)], fail_after=3)
    assert writes == [b"<a>", b"<b><c>"] and isinstance(error, BackendError)


def test_remote_chunks_of_one_read_are_marked() -> None:
    """The remote decoder marks every chunk of one network read but the last; a bad event after good ones
    leaves its error in `failure`, and the chunks before it are still handed out."""
    from seekserve.backends.sse import EventStreamDecoder

    def event(content: str) -> bytes:
        return b'data: {"choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n' % content.encode()
    decoder = EventStreamDecoder("u", 1)
    chunks = decoder.feed(b"".join(event(w) for w in ("one", "two", "three")))
    assert [(c.text, c.more_ready) for c in chunks] == [("one", True), ("two", True), ("three", False)]
    assert decoder.failure is None
    decoder = EventStreamDecoder("u", 1)
    chunks = decoder.feed(event("ok") + b"data: {oops\n\n" + event("never"))
    assert [(c.text, c.more_ready) for c in chunks] == [("ok", False)]
    assert isinstance(decoder.failure, BackendError) and "not JSON" in decoder.failure.message


@pytest.mark.parametrize("tail", [None, {"usage": None}])
@pytest.mark.parametrize("head", [{}, {"id": "c-1", "created": 7, "model": "m", "object": "chat.completion.chunk",
                                        "system_fingerprint": None}])
def test_chunk_frames_match_whole_object_frames(head: dict, tail: dict | None) -> None:
    """The frame template's bytes are those of serializing the whole chunk object."""
    from seekserve.api.streaming import ChunkFrames, frame
    choices = [{"index": 0, "delta": {"content": "é\n\"x\""}, "logprobs": None, "finish_reason": None}]
    assert ChunkFrames(head, tail)(choices) == frame({**head, "choices": choices, **(tail or {})})
