"""The remote backend against a real HTTP upstream on loopback (tests/backends/upstream.py): streaming
maps to Chunks as it arrives, request bodies map our parameters, upstream failures map to clear errors,
a client disconnect closes the upstream connection, and the API key never shows."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from seekserve.api.generation import UsageTracker
from seekserve.backends.base import BackendError, Chunk, GenerationRequest
from seekserve.backends.remote import RemoteBackend, RemoteBackendConfig, RemoteModel, status_error
from seekserve.backends.sse import EventStreamDecoder, SSEParser
from seekserve.engine.params import SamplingParams
from tests.backends.upstream import (
    BLANK_LINE,
    KEEPALIVE,
    Drop,
    FakeUpstream,
    Reply,
    Sleep,
    WaitFor,
    chat_chunk,
    completion_chunk,
    deepseek_usage,
    usage_chunk,
)
from tests.services import free_port

KEY = "sk-remote-5f3a9c0d1e2b"
KEY_ENV = "SEEKSERVE_TEST_REMOTE_KEY"
T = TypeVar("T")


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


def config(base_url: str, **kw: Any) -> RemoteBackendConfig:
    models = (RemoteModel("ds-chat", "deepseek-chat"), RemoteModel("ds-r1", "deepseek-reasoner", reasoning=True))
    return RemoteBackendConfig(name="deepseek-cloud", base_url=base_url, models=models, **kw)


def chat(model: str = "ds-chat", **params: Any) -> GenerationRequest:
    return GenerationRequest(request_id="chatcmpl-1", model=model, kind="chat",
                             params=SamplingParams(**{"max_tokens": None, **params}),
                             messages=[{"role": "user", "content": "2+2?"}])


def completion(prompt: str | list[int], **params: Any) -> GenerationRequest:
    return GenerationRequest(request_id="cmpl-1", model="ds-chat", kind="completion",
                             params=SamplingParams(**params), prompt=prompt)


def run(cfg: RemoteBackendConfig, fn: Callable[[RemoteBackend], Awaitable[T]]) -> T:
    async def main() -> T:
        backend = RemoteBackend(cfg)
        try:
            return await fn(backend)
        finally:
            await backend.close()
    return asyncio.run(main())


def collect(request: GenerationRequest) -> Callable[[RemoteBackend], Awaitable[list[Chunk]]]:
    async def go(backend: RemoteBackend) -> list[Chunk]:
        return [chunk async for chunk in await backend.start(request)]
    return go


def failure(cfg: RemoteBackendConfig, request: GenerationRequest) -> tuple[BackendError, list[Chunk]]:
    """The error a request ends with, and the chunks that came before it."""
    got: list[Chunk] = []

    async def go(backend: RemoteBackend) -> BackendError:
        try:
            async for chunk in await backend.start(request):
                got.append(chunk)
        except BackendError as e:
            return e
        raise AssertionError("the request did not fail")
    return run(cfg, go), got


def usage_of(chunks: list[Chunk], reasoning: bool = False) -> dict[str, Any]:
    tracker = UsageTracker()   # the API's own accounting, fed as the routes feed it
    for chunk in chunks:
        tracker.add(0, chunk.index, chunk)
    return tracker.usage(reasoning)


# -- streaming ----------------------------------------------------------------------------------------------
def test_chat_stream_maps_reasoning_text_finish_and_usage(upstream: FakeUpstream) -> None:
    upstream.push(Reply.sse(chat_chunk("", role="assistant"), chat_chunk(reasoning="Let me "),
                            chat_chunk(reasoning="think."), chat_chunk("The answer"), chat_chunk(" is 4."),
                            chat_chunk("", finish="stop"),
                            usage_chunk(deepseek_usage(20, 9, cache_hit=16, reasoning=3))))
    chunks = run(config(upstream.url), collect(chat("ds-r1")))
    assert [(c.reasoning_text, c.text, c.finish_reason) for c in chunks] == [
        ("Let me ", "", None), ("think.", "", None), ("", "The answer", None), ("", " is 4.", None),
        ("", "", "stop")]
    last = chunks[-1]
    assert (last.num_prompt_tokens, last.num_cached_tokens, last.num_output_tokens,
            last.num_reasoning_tokens) == (20, 16, 9, 3)
    assert all(c.token_ids == [] and c.num_prompt_tokens == 0 for c in chunks[:-1])
    assert usage_of(chunks, reasoning=True) == {
        "prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29, "prompt_cache_hit_tokens": 16,
        "prompt_cache_miss_tokens": 4, "prompt_tokens_details": {"cached_tokens": 16},
        "completion_tokens_details": {"reasoning_tokens": 3}}


def test_vllm_shapes_usage_on_the_finishing_chunk(upstream: FakeUpstream) -> None:
    """vLLM's `reasoning` delta field, OpenAI's cached_tokens, usage riding on the last choice chunk."""
    usage = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
             "prompt_tokens_details": {"cached_tokens": 8}, "completion_tokens_details": {"reasoning_tokens": 2}}
    finishing = chat_chunk("!", finish="length", usage=usage)
    upstream.push(Reply.sse({"choices": [{"index": 0, "delta": {"reasoning": "hm"}}]}, chat_chunk("ok"),
                            finishing, done=False))
    chunks = run(config(upstream.url), collect(chat()))
    assert [(c.reasoning_text, c.text, c.finish_reason) for c in chunks] == [
        ("hm", "", None), ("", "ok", None), ("", "!", "length")]
    assert usage_of(chunks, True)["prompt_cache_hit_tokens"] == 8
    assert usage_of(chunks, True)["completion_tokens_details"] == {"reasoning_tokens": 2}


def test_without_usage_the_finish_still_arrives(upstream: FakeUpstream) -> None:
    """Older Ollama and some proxies ignore stream_options: the counts stay 0, nothing waits forever."""
    upstream.push(Reply.sse(chat_chunk("hi"), chat_chunk("", finish="stop")))
    chunks = run(config(upstream.url), collect(chat()))
    assert [(c.text, c.finish_reason, c.num_output_tokens) for c in chunks] == [("hi", None, 0), ("", "stop", 0)]


def test_completion_n2_logprobs_and_usage_split_over_choices(upstream: FakeUpstream) -> None:
    lp = {"tokens": ["4"], "token_logprobs": [-0.1], "top_logprobs": [{"5": -3.0, "4": -0.1}],
          "text_offset": [0]}
    upstream.push(Reply.sse(completion_chunk("4", index=0, logprobs=lp), completion_chunk("4", index=1, logprobs=lp),
                            completion_chunk("", index=1, finish="stop"), completion_chunk("", index=0, finish="stop"),
                            usage_chunk(deepseek_usage(7, 2, cache_hit=0))))
    chunks = run(config(upstream.url), collect(completion("2+2=", n=2, logprobs=1)))
    assert [(c.index, c.text, c.finish_reason) for c in chunks] == [
        (0, "4", None), (1, "4", None), (0, "", "stop"), (1, "", "stop")]
    assert chunks[0].logprobs is not None
    entry = chunks[0].logprobs[0]
    assert (entry.token, entry.logprob, entry.bytes, entry.top) == ("4", -0.1, [52], [("4", -0.1, [52]),
                                                                                     ("5", -3.0, [53])])
    assert [(c.num_prompt_tokens, c.num_output_tokens) for c in chunks[2:]] == [(7, 2), (7, 0)]
    assert usage_of(chunks)["completion_tokens"] == 2


def test_chat_logprobs_map_to_entries(upstream: FakeUpstream) -> None:
    lp = {"content": [{"token": "é", "logprob": -0.5, "bytes": [195, 169],
                       "top_logprobs": [{"token": "é", "logprob": -0.5, "bytes": [195, 169]},
                                        {"token": "e", "logprob": -1.5, "bytes": None}]}]}
    upstream.push(Reply.sse(chat_chunk("é", logprobs=lp), chat_chunk("", finish="stop")))
    chunks = run(config(upstream.url), collect(chat(logprobs=2)))
    assert chunks[0].logprobs is not None
    entry = chunks[0].logprobs[0]
    assert (entry.token, entry.bytes, entry.top) == ("é", [195, 169], [("é", -0.5, [195, 169]), ("e", -1.5, [101])])


def test_keepalive_blank_lines_comments_crlf_and_multiline_data(upstream: FakeUpstream) -> None:
    upstream.push(Reply.sse(KEEPALIVE, BLANK_LINE, "\r\n", ": keep-alive\r\n\r\n",
                            'data: {"choices": [{"index": 0,\r\ndata: "delta": {"content": "a"}}]}\r\n\r\n',
                            KEEPALIVE, chat_chunk("b"), "\n\n", chat_chunk("", finish="stop"), KEEPALIVE))
    chunks = run(config(upstream.url), collect(chat()))
    assert [(c.text, c.finish_reason) for c in chunks] == [("a", None), ("b", None), ("", "stop")]


def test_events_split_byte_by_byte(upstream: FakeUpstream) -> None:
    upstream.push(Reply.sse(KEEPALIVE, chat_chunk("你好"), chat_chunk(" world"), chat_chunk("", finish="stop"),
                            usage_chunk(deepseek_usage(3, 2)), split=1))
    chunks = run(config(upstream.url), collect(chat()))
    assert [c.text for c in chunks] == ["你好", " world", ""]
    assert chunks[-1].num_output_tokens == 2


line_text = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), max_size=6)


@given(events=st.lists(st.lists(line_text, min_size=1, max_size=3), max_size=4),
       eol=st.sampled_from(["\n", "\r\n", "\r"]), cuts=st.lists(st.integers(0, 10_000), max_size=12),
       keepalive=st.lists(st.booleans(), min_size=4, max_size=4))
def test_sse_parser_gives_the_same_events_for_any_split(events: list[list[str]], eol: str, cuts: list[int],
                                                        keepalive: list[bool]) -> None:
    """Any split, line ending, comment and multi-line data; without them (one `data: ` line per event, LF)
    the parser splits whole reads at once, which must give the same events."""
    raw = "".join((f": keep-alive{eol}{eol}" if ka else "") + "".join(f"data: {line}{eol}" for line in lines) + eol
                  for lines, ka in zip(events, keepalive, strict=False)).encode()
    parser, got, prev = SSEParser(), [], 0
    for cut in sorted({c % (len(raw) + 1) for c in cuts}) + [len(raw)]:
        got += parser.feed(raw[prev:cut])
        prev = cut
    got += parser.close()
    assert [e.data for e in got] == ["\n".join(lines) for lines in events]


def _per_choice(chunks: list[Chunk]) -> dict[int, tuple[str, str, list[str], str | None, tuple[int, ...]]]:
    """What a whole (non-streamed) answer is made of, per choice."""
    out: dict[int, tuple[str, str, list[str], str | None, tuple[int, ...]]] = {}
    for c in chunks:
        text, reasoning, lps, finish, _ = out.get(c.index, ("", "", [], None, ()))
        out[c.index] = (text + c.text, reasoning + c.reasoning_text, lps + [e.token for e in c.logprobs or []],
                        c.finish_reason or finish, (c.num_prompt_tokens, c.num_cached_tokens, c.num_output_tokens,
                                                    c.num_reasoning_tokens))
    return out


piece = st.tuples(st.integers(0, 1), st.text(max_size=4), st.text(max_size=3), st.booleans())


@given(pieces=st.lists(piece, max_size=10), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_coalesced_reads_make_the_same_whole_answer(pieces: list[tuple[int, str, str, bool]],
                                                    cuts: list[int]) -> None:
    """A non-streamed request's decoder hands over one chunk per choice from each read; the whole answer
    (texts, reasoning, logprobs, finish reasons, token counts) is that of decoding chunk by chunk."""
    events = []
    for index, text, reasoning, with_lp in pieces:
        lp = {"content": [{"token": text or "x", "logprob": -0.5, "bytes": None, "top_logprobs": []}]} \
            if with_lp else None
        events.append(chat_chunk(text, reasoning=reasoning or None, index=index, logprobs=lp))
    events += [chat_chunk("", index=1, finish="length"), chat_chunk("", index=0, finish="stop"),
               usage_chunk(deepseek_usage(9, 4, cache_hit=2, reasoning=1))]
    raw = "".join(f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"
    decoded: dict[bool, list[Chunk]] = {}
    for coalesce in (False, True):
        decoder, got, prev = EventStreamDecoder("up", 2, coalesce), [], 0
        for cut in sorted({c % (len(raw) + 1) for c in cuts}) + [len(raw)]:
            ready = decoder.feed(raw[prev:cut])
            if coalesce:
                assert len({c.index for c in ready}) == len(ready)      # one chunk per choice and read
            assert all(c.more_ready for c in ready[:-1]) and not (ready and ready[-1].more_ready)
            got += ready
            prev = cut
        got += decoder.end()
        assert decoder.done and decoder.failure is None
        decoded[coalesce] = got
    assert _per_choice(decoded[True]) == _per_choice(decoded[False])
    assert len(decoded[True]) <= len(decoded[False])


def test_chunks_pass_through_before_the_upstream_sends_the_rest(upstream: FakeUpstream) -> None:
    gate = threading.Event()
    upstream.push(Reply.sse(chat_chunk("first"), WaitFor(gate), chat_chunk(" second"),
                            chat_chunk("", finish="stop"), usage_chunk(deepseek_usage(4, 2))))

    async def go(backend: RemoteBackend) -> list[Chunk]:
        stream = await backend.start(chat())
        first = await anext(stream)
        assert first.text == "first" and not gate.is_set()   # arrived while the upstream still waits
        gate.set()
        return [first] + [chunk async for chunk in stream]
    chunks = run(config(upstream.url), go)
    assert [c.text for c in chunks] == ["first", " second", ""] and chunks[-1].num_output_tokens == 2


# -- requests -----------------------------------------------------------------------------------------------
def test_chat_body_maps_alias_params_and_stream_options(upstream: FakeUpstream) -> None:
    run(config(upstream.url), collect(chat("ds-r1", temperature=0.3, top_p=0.9, max_tokens=50, stop=("END",),
                                           seed=7, presence_penalty=0.5, frequency_penalty=0.25, n=2,
                                           logprobs=3)))
    rec = upstream.requests[-1]
    assert (rec.method, rec.path) == ("POST", "/v1/chat/completions")
    assert rec.json == {"model": "deepseek-reasoner", "messages": [{"role": "user", "content": "2+2?"}],
                        "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.3,
                        "top_p": 0.9, "max_tokens": 50, "stop": ["END"], "seed": 7, "presence_penalty": 0.5,
                        "frequency_penalty": 0.25, "n": 2, "logprobs": True, "top_logprobs": 3}
    assert rec.headers["x-request-id"] == "chatcmpl-1" and "authorization" not in rec.headers


def test_completion_body_sends_engine_extras_only_when_set(upstream: FakeUpstream) -> None:
    run(config(upstream.base), collect(completion([1, 2, 3], top_k=5, min_p=0.1, repetition_penalty=1.1,
                                                  logprobs=2)))
    run(config(upstream.base + "/"), collect(completion("hi")))
    extras, plain = (r.json for r in upstream.wait_for_requests(2))
    assert upstream.requests[0].path == "/completions"    # base_url without /v1 is used as given
    assert (extras["prompt"], extras["top_k"], extras["min_p"], extras["repetition_penalty"], extras["logprobs"]) \
        == ([1, 2, 3], 5, 0.1, 1.1, 2)
    assert plain["prompt"] == "hi" and plain["max_tokens"] == 16
    assert not {"top_k", "min_p", "repetition_penalty", "logprobs", "n", "seed", "stop"} & set(plain)


def test_authorization_from_env_or_file(upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Any) -> None:
    monkeypatch.setenv(KEY_ENV, f"  {KEY}\n")
    key_file = tmp_path / "key"
    key_file.write_text(f"{KEY}-file\n")
    run(config(upstream.url, api_key_env=KEY_ENV), collect(chat()))
    run(config(upstream.url, api_key_file=str(key_file)), collect(chat()))
    assert [r.headers["authorization"] for r in upstream.requests] == [f"Bearer {KEY}", f"Bearer {KEY}-file"]


def test_missing_key_sources_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=KEY_ENV):
        RemoteBackend(config("https://api.deepseek.com", api_key_env=KEY_ENV))
    with pytest.raises(ValueError, match="nope.key"):
        RemoteBackend(config("https://api.deepseek.com", api_key_file=str(tmp_path / "nope.key")))
    (tmp_path / "empty.key").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        RemoteBackend(config("https://api.deepseek.com", api_key_file=str(tmp_path / "empty.key")))
    with pytest.raises(ValueError, match="credentials"):
        config(f"https://user:{KEY}@api.deepseek.com")


def test_connections_are_pooled(upstream: FakeUpstream) -> None:
    async def three(backend: RemoteBackend) -> None:
        for _ in range(3):
            await collect(chat())(backend)
    run(config(upstream.url), three)
    assert len(upstream.requests) == 3 and upstream.num_connections == 1


def test_upstream_cookies_are_never_kept(upstream: FakeUpstream) -> None:
    """One client serves every tenant: a cookie set on one tenant's response must not ride on the next."""
    upstream.push(Reply.sse(chat_chunk("hi"), chat_chunk("", finish="stop"),
                            headers={"set-cookie": "session=tenant-a-secret; Path=/"}))

    async def two(backend: RemoteBackend) -> None:
        for _ in range(2):
            await collect(chat())(backend)
    run(config(upstream.url), two)
    assert len(upstream.requests) == 2
    assert all("cookie" not in r.headers for r in upstream.requests)


def test_models_readiness_and_refusals(upstream: FakeUpstream) -> None:
    backend = RemoteBackend(config(upstream.url, remote=False))
    assert [(m.id, m.owned_by, m.reasoning) for m in backend.models()] == [
        ("ds-chat", "deepseek-cloud", False), ("ds-r1", "deepseek-cloud", True)]
    assert backend.is_ready() and backend.config.remote is False
    with pytest.raises(BackendError) as e:
        backend.detokenize([1, 2])
    assert e.value.status == 400
    e2, _ = failure(config(upstream.url), chat("unknown"))
    assert e2.status == 404 and e2.code == "model_not_found"


# -- failures -----------------------------------------------------------------------------------------------
ERRORS = [  # upstream reply -> (our status, code, retryable, words of the message)
    (Reply.error(400, "Invalid max_tokens value", param="max_tokens", code="invalid_value"),
     400, "invalid_value", False, "deepseek-cloud: Invalid max_tokens value"),
    (Reply.error(422, "Failed to deserialize the JSON body"), 400, "upstream_rejected", False, "deserialize"),
    (Reply.json({"object": "error", "message": "The model `x` does not exist.", "code": 404}, status=404),
     400, "upstream_rejected", False, "does not exist"),
    (Reply.json({"error": "model 'x' not found"}, status=404), 400, "upstream_rejected", False, "not found"),
    (Reply.error(401, "Authentication Fails"), 502, "upstream_auth_failed", False, "credentials"),
    (Reply.error(402, "Insufficient Balance"), 402, "insufficient_balance", False, "insufficient balance"),
    (Reply.error(429, "Rate limit reached", headers={"retry-after": "7"}), 429, "rate_limit_exceeded", True,
     "Rate limit reached"),
    (Reply.error(500, "boom", type="server_error"), 502, "upstream_error", True, "HTTP 500"),
    (Reply(status=502, body=b"<html>bad gateway</html>"), 502, "upstream_error", True, "bad gateway"),
    (Reply.error(503, "Server overloaded", headers={"retry-after": "2"}), 503, "upstream_unavailable", True,
     "overloaded"),
    (Reply.error(504, "gateway timeout"), 502, "upstream_error", True, "HTTP 504"),
]


@pytest.mark.parametrize("reply,status,code,retryable,words", ERRORS)
def test_upstream_errors_map_to_client_errors(upstream: FakeUpstream, reply: Reply, status: int, code: str,
                                              retryable: bool, words: str) -> None:
    upstream.push(reply)
    e, _ = failure(config(upstream.url), chat())
    assert (e.status, e.code, e.retryable) == (status, code, retryable)
    assert words in e.message and "deepseek-cloud" in e.message
    retry_after = reply.headers.get("retry-after")
    assert e.headers == ({"Retry-After": retry_after} if retry_after else {})
    assert e.retry_after == (float(retry_after) if retry_after else None)


def test_retry_after_as_an_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    e = status_error("deepseek-cloud", 429, b"slow down", httpx.Headers({"Retry-After": when}), None)
    assert e.headers == {"Retry-After": when} and e.retry_after is not None and 25 < e.retry_after <= 30


def test_connect_refused_is_503_naming_the_upstream() -> None:
    e, _ = failure(config(f"http://127.0.0.1:{free_port()}/v1"), chat())
    assert (e.status, e.code, e.retryable) == (503, "upstream_unavailable", True)
    assert "deepseek-cloud" in e.message


def test_stall_before_headers_times_out_retryable(upstream: FakeUpstream) -> None:
    upstream.push(Reply.stall(10))
    began = time.monotonic()
    e, _ = failure(config(upstream.url, read_timeout=0.3), chat())
    assert (e.status, e.code, e.retryable) == (504, "upstream_timeout", True)
    assert time.monotonic() - began < 3


def test_stall_mid_stream_ends_the_stream_with_504(upstream: FakeUpstream) -> None:
    upstream.push(Reply.sse(chat_chunk("a"), Sleep(10), chat_chunk("b")))
    e, got = failure(config(upstream.url, read_timeout=0.3), chat())
    assert [c.text for c in got] == ["a"]
    assert (e.status, e.code, e.retryable) == (504, "upstream_timeout", False)


@pytest.mark.parametrize("reply,status,retryable,num_chunks", [
    (Reply.sse(chat_chunk("a"), Drop()), 502, False, 1),          # after a chunk went out: cannot retry
    (Reply.sse(KEEPALIVE, Drop()), 502, True, 0),                  # nothing delivered yet
    (Reply.disconnect(), 502, True, 0),                            # no answer at all
    (Reply.sse(chat_chunk("a"), done=False), 502, False, 1),       # clean end, but the choice never finished
    (Reply.sse(chat_chunk("a"), {"error": {"message": "CUDA out of memory"}}), 502, False, 1),
    (Reply.json({"error": {"message": "weird"}}), 502, False, 0),  # JSON where a stream was asked for
])
def test_broken_streams_fail_clearly(upstream: FakeUpstream, reply: Reply, status: int, retryable: bool,
                                     num_chunks: int) -> None:
    upstream.push(reply)
    e, got = failure(config(upstream.url), chat())
    assert (e.status, e.retryable, len(got)) == (status, retryable, num_chunks)
    assert "deepseek-cloud" in e.message


@pytest.mark.parametrize("read_first", [True, False])
def test_client_disconnect_closes_the_upstream_connection(upstream: FakeUpstream, read_first: bool) -> None:
    gate = threading.Event()   # never set: the upstream would wait 30 s
    upstream.push(Reply.sse(chat_chunk("a"), WaitFor(gate, timeout=30), chat_chunk("", finish="stop")))

    async def go(backend: RemoteBackend) -> bool:
        stream = await backend.start(chat())
        if read_first:
            assert (await anext(stream)).text == "a"
        await stream.aclose()
        return await asyncio.to_thread(upstream.requests[-1].closed_early.wait, 1.0)
    assert run(config(upstream.url), go)


def test_api_key_never_in_repr_errors_or_logs(upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)    # everything anything logs
    monkeypatch.setenv(KEY_ENV, KEY)
    cfg = config(upstream.url, api_key_env=KEY_ENV, extra_headers={"X-Org": "org-1"})
    upstream.push(Reply.error(401, f"Incorrect API key provided: {KEY}"),
                  Reply.error(400, f"key {KEY} cannot use this model"))

    async def go(backend: RemoteBackend) -> list[str]:
        texts = [repr(backend), repr(cfg)]
        for _ in range(2):
            try:
                await backend.start(chat())
            except BackendError as e:
                texts += [str(e), e.message, repr(e.headers)]
        await collect(chat())(backend)
        return texts
    texts = run(cfg, go)
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in upstream.requests)   # it was sent
    assert "[redacted] cannot use this model" in texts[-2]
    assert "answered HTTP 401" in caplog.text and "refused this server's credentials" in caplog.text  # captured
    for text in texts + [caplog.text]:
        assert KEY not in text


def test_fake_upstream_answers_by_itself(upstream: FakeUpstream) -> None:
    """Other suites (routing, the gateway benchmark) rely on the automatic answer."""
    chunks = run(config(upstream.url), collect(chat("ds-r1")))
    assert "".join(c.reasoning_text for c in chunks) == "Thinking it over."
    assert "".join(c.text for c in chunks) == upstream.text and chunks[-1].num_reasoning_tokens == 2
    with httpx.Client(base_url=upstream.url) as client:
        assert [m["id"] for m in client.get("/models").json()["data"]] == list(upstream.models)
        body = client.post("/completions", json={"model": "m", "prompt": "x", "n": 2}).json()
        assert [c["text"] for c in body["choices"]] == [upstream.text] * 2
        assert client.post("/nowhere", json={}).status_code == 404
