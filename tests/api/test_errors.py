"""Every failure is an OpenAI-style `{"error": {"message", "type", "param", "code"}}` with the right status,
checked with httpx against a real server: 400, 401, 404, 405, 413, 422 and 503 (draining). After each kind of
bad input the server still answers /health and serves a normal request. Then a schemathesis run over the
app's OpenAPI schema: no generated request may get a 5xx, and huge inputs get a clear 4xx quickly."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.api.conftest import API_KEY, running_server

MODEL = "tiny-chat"
MAX_LEN = 64          # max_sequence_length of the servers here: every generation is short
BODY_LIMIT = 4096     # max_request_body_bytes of the `small` server
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def main(chat_model: Path) -> Iterator[tuple[str, Any, Any]]:
    """Default body limit (8 MiB), so large prompts reach the tokenizer."""
    with running_server(chat_model, served_model_name=[MODEL], api_key=[API_KEY], max_sequence_length=MAX_LEN) as s:
        yield s


@pytest.fixture(scope="module")
def small(chat_model: Path) -> Iterator[tuple[str, Any, Any]]:
    """A small body limit (413 tests) and a state the draining test may flip."""
    with running_server(chat_model, served_model_name=[MODEL], api_key=[API_KEY], max_sequence_length=MAX_LEN,
                        max_request_body_bytes=BODY_LIMIT, batch_size=4) as s:
        yield s


@pytest.fixture()
def http(main) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=main[0], headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture()
def small_http(small) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=small[0], headers=AUTH, timeout=60) as c:
        yield c


def assert_error(r: httpx.Response, status: int, error_type: str, code: str | None, param: str | None = None,
                 message: str | None = None) -> str:
    """The exact OpenAI error shape; returns the message for further checks."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["error"], body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert (err["type"], err["code"], err["param"]) == (error_type, code, param), err
    if message is not None:
        assert err["message"] == message
    return err["message"]


def assert_serving(client: httpx.Client) -> None:
    """The server survived: liveness, readiness and a real generation."""
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    r = client.post(COMPLETIONS, json={"model": MODEL, "prompt": "Hello world", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    r = client.post(CHAT, json={"model": MODEL, "messages": HELLO, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text


# -- 400 ------------------------------------------------------------------------------------------------

INVALID_JSON = "We could not parse the JSON body of your request: it is not valid JSON ("   # + where


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("raw", [b'{"model": ', b"not json", b'{"model": "tiny-chat",}', b"\xff\xfe{}",
                                 b"{'model': 'tiny-chat'}"])
def test_malformed_json_is_400(http: httpx.Client, path: str, raw: bytes) -> None:
    r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    message = assert_error(r, 400, "invalid_request_error", "invalid_json")
    assert message.startswith(INVALID_JSON) and " at line 1 column " in message


def test_malformed_json_whatever_the_content_type(http: httpx.Client) -> None:
    # curl -d sends application/x-www-form-urlencoded: the body is still parsed as JSON
    r = http.post(CHAT, content=b"model=tiny-chat", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert assert_error(r, 400, "invalid_request_error", "invalid_json").startswith(INVALID_JSON)
    ok = http.post(CHAT, content=json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 1}),
                   headers={"Content-Type": "text/plain"})
    assert ok.status_code == 200, ok.text
    assert_serving(http)


@pytest.mark.parametrize(("path", "field", "value", "message"), [
    (CHAT, "temperature", 5, "temperature must be in [0, 2], got 5.0"),
    (COMPLETIONS, "temperature", -1, "temperature must be in [0, 2], got -1.0"),
    (CHAT, "top_p", 0, "top_p must be in (0, 1], got 0.0"),
    (CHAT, "n", 0, "n must be an integer in [1, 128], got 0"),
    (COMPLETIONS, "n", 129, "n must be an integer in [1, 128], got 129"),
    (CHAT, "presence_penalty", 3, "presence_penalty must be in [-2, 2], got 3.0"),
    (COMPLETIONS, "frequency_penalty", -2.5, "frequency_penalty must be in [-2, 2], got -2.5"),
    (CHAT, "max_tokens", 0, "max_tokens must be a positive integer, got 0"),
    (COMPLETIONS, "max_tokens", -5, "max_tokens must be a positive integer, got -5"),
    (COMPLETIONS, "top_k", -2, "top_k must be -1, 0 (disabled) or a positive integer below 2^31, got -2"),
    (COMPLETIONS, "top_k", 2**63, f"top_k must be -1, 0 (disabled) or a positive integer below 2^31, got {2**63}"),
    (CHAT, "stop_token_ids", [5, 2**64], f"stop_token_ids must be non-negative integers below 2^31, got (5, {2**64})"),
    (CHAT, "stop_token_ids", [-1], "stop_token_ids must be non-negative integers below 2^31, got (-1,)"),
    (CHAT, "seed", 2**64, f"seed must be a 64-bit integer, got {2**64}"),
    (COMPLETIONS, "logprobs", 6, "logprobs must be in [0, 5], got 6"),
    (CHAT, "top_logprobs", 2, "top_logprobs requires logprobs to be true"),
    (CHAT, "chat_template_kwargs", {"add_generation_prompt": False},
     "chat_template_kwargs must not set add_generation_prompt: the server sets it"),
    (CHAT, "chat_template_kwargs", {"messages": [], "bos_token": "x"},
     "chat_template_kwargs must not set bos_token, messages: the server sets them"),
])
def test_out_of_range_parameter_is_400_naming_it(http: httpx.Client, path: str, field: str, value: Any,
                                                 message: str) -> None:
    body: dict[str, Any] = {"model": MODEL, field: value}
    body.update({"messages": HELLO} if path == CHAT else {"prompt": "Hello"})
    r = http.post(path, json=body)
    assert_error(r, 400, "invalid_request_error", "invalid_value", param=field, message=message)


def test_unsupported_parameters_are_400(http: httpx.Client) -> None:
    r = http.post(CHAT, json={"model": MODEL, "messages": HELLO, "logit_bias": {"5": 10}})
    assert_error(r, 400, "invalid_request_error", "unsupported_parameter", "logit_bias",
                 "logit_bias is not supported by this server")
    r = http.post(CHAT, json={"model": MODEL, "messages": HELLO, "tools": [{"type": "function"}]})
    assert_error(r, 400, "invalid_request_error", "unsupported_parameter", "tools")
    r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": "a", "suffix": "b"})
    assert_error(r, 400, "invalid_request_error", "unsupported_parameter", "suffix")
    r = http.post(CHAT, json={"model": MODEL, "messages": [{"role": "assistant", "content": "x",
                                                            "reasoning_content": "thought"}]})
    assert_error(r, 400, "invalid_request_error", None, "messages",
                 "reasoning_content must not be included in input messages")
    assert_serving(http)


def test_prompt_plus_max_tokens_over_the_context(http: httpx.Client) -> None:
    r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": [5] * 10, "max_tokens": 60})
    assert_error(r, 400, "invalid_request_error", "context_length_exceeded", "max_tokens",
                 f"This model's maximum context length is {MAX_LEN} tokens. However, you requested 70 tokens "
                 "(10 in the prompt, 60 in the completion). Please reduce the length of the messages or completion.")
    # exactly at the limit is fine
    ok = http.post(COMPLETIONS, json={"model": MODEL, "prompt": [5] * 10, "max_tokens": 54, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["total_tokens"] == MAX_LEN, ok.text
    # chat: the rendered template's token count, then max_tokens; both numbers stated and adding up
    r = http.post(CHAT, json={"model": MODEL, "messages": HELLO, "max_tokens": MAX_LEN})
    msg = assert_error(r, 400, "invalid_request_error", "context_length_exceeded", "max_tokens")
    m = re.fullmatch(rf"This model's maximum context length is {MAX_LEN} tokens\. However, you requested (\d+) "
                     rf"tokens \((\d+) in the messages, {MAX_LEN} in the completion\)\. Please reduce the length "
                     r"of the messages or completion\.", msg)
    assert m is not None, msg
    assert int(m[1]) == int(m[2]) + MAX_LEN and int(m[2]) > 0
    # max_completion_tokens counts the same way
    r = http.post(CHAT, json={"model": MODEL, "messages": HELLO, "max_completion_tokens": MAX_LEN})
    assert_error(r, 400, "invalid_request_error", "context_length_exceeded", "max_tokens", msg)
    # a prompt that alone fills the context
    r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": [5] * MAX_LEN})
    assert_error(r, 400, "invalid_request_error", "context_length_exceeded", "prompt",
                 f"This model's maximum context length is {MAX_LEN} tokens. However, your prompt resulted in "
                 f"{MAX_LEN} tokens, leaving no room for the completion.")
    assert_serving(http)


def test_bad_prompts_are_400(http: httpx.Client) -> None:
    r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": []})
    assert_error(r, 400, "invalid_request_error", "invalid_value", "prompt", "prompt must not be empty")
    r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": [[1, 2], []]})
    assert_error(r, 400, "invalid_request_error", "invalid_value", "prompt", "prompt is empty")
    for ids in ([512], [-1], [10**30]):
        r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": ids})
        assert_error(r, 400, "invalid_request_error", "invalid_value", "prompt", "prompt token ids must be in [0, 512)")
    r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": ["a"] * 65})
    assert_error(r, 400, "invalid_request_error", "invalid_value", "prompt", "at most 64 prompts per request")
    assert_serving(http)


# -- 401 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", CHAT, {"model": MODEL, "messages": HELLO}),
    ("POST", COMPLETIONS, {"model": MODEL, "prompt": "Hello"}),
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{MODEL}", None),
    ("POST", "/chat/completions", {"model": MODEL, "messages": HELLO}),   # the base URL without /v1
])
def test_api_key_required(main, method: str, path: str, body: dict | None) -> None:
    missing = "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
    with httpx.Client(base_url=main[0], timeout=30) as c:
        def call(headers: dict[str, str] | None = None, params: dict[str, str] | None = None) -> httpx.Response:
            return c.request(method, path, json=body, headers=headers, params=params)

        assert_error(call(), 401, "authentication_error", "missing_api_key", message=missing)
        assert_error(call({"Authorization": "Bearer sk-wrong"}), 401, "authentication_error", "invalid_api_key",
                     message="Incorrect API key provided.")
        assert_error(call({"Authorization": f"Bearer {API_KEY}x"}), 401, "authentication_error",
                     "invalid_api_key")
        assert_error(call({"Authorization": f"Bearer {API_KEY[:-1]}"}), 401, "authentication_error",
                     "invalid_api_key")
        assert_error(call({"Authorization": "Bearer"}), 401, "authentication_error", "missing_api_key")
        assert_error(call({"Authorization": ""}), 401, "authentication_error", "missing_api_key")
        assert_error(call({"Authorization": API_KEY}), 401, "authentication_error", "missing_api_key")
        assert_error(call({"Authorization": f"Basic {API_KEY}"}), 401, "authentication_error", "missing_api_key")
        # the key in the query string is not accepted (it would end up in access logs)
        for name in ("api_key", "key", "access_token"):
            assert_error(call(params={name: API_KEY}), 401, "authentication_error", "missing_api_key")
        # the right key works (the scheme is case-insensitive)
        assert call({"Authorization": f"bearer {API_KEY}"}).status_code == 200
        assert c.get("/health").status_code == 200          # probes need no key
        assert c.get("/ready").status_code == 200
    with httpx.Client(base_url=main[0], headers=AUTH, timeout=30) as c:
        assert_serving(c)


# -- 404, 405 -------------------------------------------------------------------------------------------

def test_unknown_model_is_404(http: httpx.Client) -> None:
    msg = "The model `gpt-4o` does not exist or you do not have access to it."
    r = http.post(CHAT, json={"model": "gpt-4o", "messages": HELLO})
    assert_error(r, 404, "not_found_error", "model_not_found", "model", msg)
    r = http.post(COMPLETIONS, json={"model": "gpt-4o", "prompt": "Hello", "stream": True})
    assert_error(r, 404, "not_found_error", "model_not_found", "model", msg)
    r = http.get("/v1/models/gpt-4o")
    assert_error(r, 404, "not_found_error", "model_not_found", "model", msg)
    assert_serving(http)


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/nope"), ("POST", "/v2/chat/completions"),
                                              ("GET", "/"), ("POST", "/v1/embeddings"), ("GET", "/v1/models/a/b")])
def test_unknown_route_is_404(http: httpx.Client, method: str, path: str) -> None:
    r = http.request(method, path, json={"model": MODEL})
    assert_error(r, 404, "not_found_error", "unknown_url", message=f"Unknown route: {method} {path}")
    r = httpx.request(method, http.base_url.join(path), timeout=30)      # no key: still a 404, not a 401
    assert_error(r, 404, "not_found_error", "unknown_url")


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", CHAT, "POST"), ("GET", COMPLETIONS, "POST"), ("PUT", CHAT, "POST"), ("DELETE", "/v1/models", "GET"),
    ("POST", "/health", "GET"), ("POST", "/ready", "GET"), ("DELETE", f"/v1/models/{MODEL}", "GET"),
])
def test_wrong_method_is_405(http: httpx.Client, method: str, path: str, allow: str) -> None:
    r = http.request(method, path)
    assert_error(r, 405, "invalid_request_error", "method_not_allowed",
                 message=f"Method {method} is not allowed on {path}")
    assert r.headers["allow"] == allow


# -- 413 ------------------------------------------------------------------------------------------------

TOO_LARGE = f"The request body is larger than the limit of {BODY_LIMIT} bytes."


def padded(size: int) -> bytes:
    """A valid completion request of exactly `size` bytes (JSON whitespace as padding)."""
    raw = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 1}).encode()
    assert len(raw) <= size
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def chunked(raw: bytes, piece: int = 1000) -> Iterator[bytes]:
    """httpx sends a generator with Transfer-Encoding: chunked and no Content-Length."""
    for i in range(0, len(raw), piece):
        yield raw[i:i + piece]


def test_body_over_the_limit_is_413(small_http: httpx.Client) -> None:
    big = json.dumps({"model": MODEL, "prompt": "x" * 3 * BODY_LIMIT}).encode()
    r = small_http.post(COMPLETIONS, content=big)
    assert_error(r, 413, "invalid_request_error", "request_too_large", message=TOO_LARGE)
    r = small_http.post(CHAT, content=big)
    assert_error(r, 413, "invalid_request_error", "request_too_large", message=TOO_LARGE)
    # the boundary: exactly the limit is served, one byte more is not
    assert small_http.post(COMPLETIONS, content=padded(BODY_LIMIT)).status_code == 200
    r = small_http.post(COMPLETIONS, content=padded(BODY_LIMIT + 1))
    assert_error(r, 413, "invalid_request_error", "request_too_large", message=TOO_LARGE)
    # a body whose declared length is huge is refused before it is read
    r = small_http.post(COMPLETIONS, content=b"x" * 100_000)
    assert_error(r, 413, "invalid_request_error", "request_too_large", message=TOO_LARGE)
    assert_serving(small_http)


def test_chunked_body_over_the_limit_is_413(small_http: httpx.Client) -> None:
    """Without Content-Length the limit is enforced while reading."""
    req = small_http.build_request("POST", COMPLETIONS, content=chunked(padded(BODY_LIMIT + 1)))
    assert "content-length" not in req.headers and req.headers["transfer-encoding"] == "chunked"
    r = small_http.send(req)
    assert_error(r, 413, "invalid_request_error", "request_too_large", message=TOO_LARGE)
    big = json.dumps({"model": MODEL, "prompt": "x" * 10 * BODY_LIMIT}).encode()
    r = small_http.post(CHAT, content=chunked(big, 4000))
    assert_error(r, 413, "invalid_request_error", "request_too_large", message=TOO_LARGE)
    # chunked bodies within the limit work, including a streamed response and bad JSON (still 400)
    r = small_http.post(COMPLETIONS, content=chunked(padded(BODY_LIMIT), 100))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1, r.text
    stream = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True}).encode()
    r = small_http.post(CHAT, content=chunked(stream, 7))
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
    r = small_http.post(CHAT, content=chunked(b'{"model": "tiny', 5))
    assert assert_error(r, 400, "invalid_request_error", "invalid_json").startswith(INVALID_JSON)
    assert_serving(small_http)


# -- 422 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body", "param", "message"), [
    (CHAT, {"model": MODEL, "messages": "hi"}, "messages", "Invalid value for 'messages': Input should be a valid list"),
    (CHAT, {"model": MODEL, "messages": HELLO, "n": "two"}, "n",
     "Invalid value for 'n': Input should be a valid integer, unable to parse string as an integer"),
    (CHAT, {"messages": HELLO}, "model", "Invalid value for 'model': Field required"),
    (COMPLETIONS, {"prompt": "Hello"}, "model", "Invalid value for 'model': Field required"),
    (CHAT, {"model": MODEL, "messages": []}, "messages",
     "Invalid value for 'messages': List should have at least 1 item after validation, not 0"),
    (CHAT, {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", None),
    (CHAT, {"model": MODEL, "messages": HELLO, "stream": "maybe"}, "stream", None),
    (CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": 1.5}, "max_tokens", None),
    (CHAT, {"model": 7, "messages": HELLO}, "model", "Invalid value for 'model': Input should be a valid string"),
    (COMPLETIONS, {"model": MODEL, "prompt": "Hello", "temperature": "hot"}, "temperature", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "Hello", "stream_options": {"include_usage": "sure"}},
     "stream_options.include_usage", None),
])
def test_wrong_types_are_422(http: httpx.Client, path: str, body: dict, param: str, message: str | None) -> None:
    r = http.post(path, json=body)
    msg = assert_error(r, 422, "invalid_request_error", "invalid_value", param, message)
    assert msg.startswith(f"Invalid value for '{param}': ")


def test_body_that_is_not_an_object_is_422(http: httpx.Client) -> None:
    for raw in (b"[]", b'"hi"', b"42", b"null"):
        r = http.post(CHAT, content=raw)
        assert r.status_code == 422, (raw, r.text)
        assert_error(r, 422, "invalid_request_error", "invalid_value")
    assert_error(http.post(CHAT, content=b""), 422, "invalid_request_error", "invalid_value",
                 message="The request body is empty: send a JSON object.")
    assert_serving(http)


# -- 503 while draining --------------------------------------------------------------------------------

def test_draining_refuses_new_work_but_keeps_probes(small, small_http: httpx.Client) -> None:
    _, _, app = small
    state = app.state.context.state
    state.draining = True
    try:
        r = small_http.get("/ready")
        assert (r.status_code, r.json()) == (503, {"status": "draining"})
        assert small_http.get("/health").status_code == 200
        assert small_http.get("/metrics").status_code == 200
        for method, path, body in [("POST", CHAT, {"model": MODEL, "messages": HELLO}),
                                   ("POST", COMPLETIONS, {"model": MODEL, "prompt": "Hello", "stream": True}),
                                   ("GET", "/v1/models", None)]:
            r = small_http.request(method, path, json=body)
            assert_error(r, 503, "service_unavailable_error", "draining",
                         message="The server is shutting down; retry on another replica.")
            assert r.headers["retry-after"] == "1"
            assert r.headers["connection"] == "close"
        assert state.in_flight == 0      # refused requests are not counted as in flight
    finally:
        state.draining = False
    assert_serving(small_http)


# -- huge inputs: a clear 4xx, quickly -----------------------------------------------------------------

def test_huge_inputs_get_a_clear_4xx(http: httpx.Client) -> None:
    def timed(path: str, **kw: Any) -> httpx.Response:
        t0 = time.perf_counter()
        r = http.post(path, **kw)
        assert time.perf_counter() - t0 < 60, "a huge input must not hang the server"
        return r

    text = "The quick brown fox jumps over the lazy dog. " * (5_000_000 // 45)       # 5 MB
    r = timed(COMPLETIONS, json={"model": MODEL, "prompt": text})
    msg = assert_error(r, 400, "invalid_request_error", "context_length_exceeded", "prompt")
    assert re.fullmatch(rf"This model's maximum context length is {MAX_LEN} tokens\. However, your prompt "
                        r"resulted in \d{6,} tokens, leaving no room for the completion\.", msg), msg
    r = timed(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": text[:1_000_000]}]})
    assert_error(r, 400, "invalid_request_error", "context_length_exceeded", "messages")
    r = timed(COMPLETIONS, json={"model": MODEL, "prompt": [5] * 100_000})
    assert_error(r, 400, "invalid_request_error", "context_length_exceeded", "prompt",
                 f"This model's maximum context length is {MAX_LEN} tokens. However, your prompt resulted in "
                 "100000 tokens, leaving no room for the completion.")
    r = timed(COMPLETIONS, json={"model": MODEL, "prompt": [[5] * 2000] * 64})
    assert_error(r, 400, "invalid_request_error", "context_length_exceeded", "prompt")
    r = timed(COMPLETIONS, json={"model": MODEL, "prompt": "Hello", "max_tokens": 10**30})
    assert_error(r, 400, "invalid_request_error", "context_length_exceeded", "max_tokens")
    r = timed(COMPLETIONS, json={"model": MODEL, "prompt": "Hello", "n": 10**30})
    assert_error(r, 400, "invalid_request_error", "invalid_value", "n")
    r = timed(CHAT, json={"model": MODEL, "messages": HELLO, "stop": ["x"] * 10_000})
    assert_error(r, 400, "invalid_request_error", "invalid_value", "stop")
    r = timed(CHAT, json={"model": MODEL, "messages": HELLO * 50_000})
    assert_error(r, 400, "invalid_request_error", "context_length_exceeded", "messages")
    # nesting deeper than the JSON parser's recursion limit
    r = timed(CHAT, content=b'{"model": "tiny-chat", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    message = assert_error(r, 400, "invalid_request_error", "invalid_json")
    assert "recursion limit exceeded" in message
    assert_serving(http)


# -- the engine must survive any request -----------------------------------------------------------------

def test_min_tokens_beyond_the_context_left_is_a_400(chat_model: Path) -> None:
    """Found by the fuzz test: without max_tokens the engine fills it in from the context left, and a
    min_tokens above that must be the client's 400, not a backend failure (503) that routing would retry."""
    with running_server(chat_model, served_model_name=[MODEL], max_sequence_length=MAX_LEN) as (base, _, _), \
            httpx.Client(base_url=base, timeout=30) as c:
        r = c.post(CHAT, json={"model": MODEL, "messages": HELLO, "min_tokens": 100_000})   # no max_tokens
        assert_error(r, 400, "invalid_request_error", "invalid_value", "min_tokens")
        assert_serving(c)


@pytest.mark.parametrize("ids", [[-220], [384181], [5, -1, 7]])
def test_echo_of_out_of_vocab_token_ids_is_a_400(chat_model: Path, ids: list[int]) -> None:
    """Found by the fuzz test: `echo` decoded a token-id prompt before the engine checked its ids, and the
    tokenizer's OverflowError on a negative id was a 500."""
    with running_server(chat_model, served_model_name=[MODEL], max_sequence_length=MAX_LEN) as (base, _, _), \
            httpx.Client(base_url=base, timeout=30) as c:
        r = c.post(COMPLETIONS, json={"model": MODEL, "prompt": ids, "max_tokens": 2, "echo": True})
        assert_error(r, 400, "invalid_request_error", "invalid_value", "prompt")
        assert_serving(c)


def test_out_of_vocab_stop_token_ids_with_min_tokens(chat_model: Path) -> None:
    with running_server(chat_model, served_model_name=[MODEL], max_sequence_length=MAX_LEN) as (base, _, _), \
            httpx.Client(base_url=base, timeout=30) as c:
        r = c.post(COMPLETIONS, json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "min_tokens": 2,
                                      "stop_token_ids": [100_000]})
        assert_error(r, 400, "invalid_request_error", "invalid_value", "stop_token_ids")
        assert_serving(c)


# -- schemathesis over the OpenAPI schema ---------------------------------------------------------------

def test_openapi_documents_the_generation_routes(http: httpx.Client) -> None:
    """The plain ASGI endpoint's routes are in the schema, with their request models and error shape."""
    schema = http.get("/openapi.json").json()
    for path, model in (("/v1/chat/completions", "ChatCompletionRequest"), ("/chat/completions",
                        "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest"),
                        ("/completions", "CompletionRequest")):
        op = schema["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
        assert {"400", "401", "403", "404", "413", "422", "429", "503"} <= set(op["responses"])
        assert op["responses"]["429"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    components = schema["components"]["schemas"]
    assert "messages" in components["ChatCompletionRequest"]["properties"]
    assert "prompt" in components["CompletionRequest"]["properties"]
    assert set(schema["paths"]["/v1/chat/completions"]) == {"post"}
    r = http.get(CHAT)          # the route exists, for POST only
    assert_error(r, 405, "invalid_request_error", "method_not_allowed")
    assert r.headers["allow"] == "POST"


@pytest.fixture(scope="module")
def api_schema(main):
    return schemathesis.openapi.from_url(f"{main[0]}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")
FUZZ_STATUSES: list[tuple[str, int]] = []


def _call(case, main) -> None:
    body = case.body
    if isinstance(body, dict):
        if isinstance(body.get("model"), str):
            body["model"] = MODEL          # the served name, so generated requests reach generation
    response = case.call(headers=AUTH, timeout=60)
    FUZZ_STATUSES.append((case.operation.label, response.status_code))
    case.validate_response(response, checks=[not_a_server_error])


@schema.include(method="POST").parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzz_generation_endpoints(case, main) -> None:
    _call(case, main)


@schema.include(method="GET").parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzz_other_endpoints(case, main) -> None:
    _call(case, main)


def test_fuzz_covered_generation_and_server_survived(http: httpx.Client) -> None:
    """Runs after the fuzz tests (file order): they sent >= 200 requests, at least 150 to the two
    generation endpoints, some of which generated text; and the server still works."""
    if not FUZZ_STATUSES:
        pytest.skip("run together with the fuzz tests")
    posts = [(label, status) for label, status in FUZZ_STATUSES if label in (f"POST {CHAT}", f"POST {COMPLETIONS}")]
    assert len(FUZZ_STATUSES) >= 200 and len(posts) >= 150
    for label in (f"POST {CHAT}", f"POST {COMPLETIONS}"):
        statuses = {status for lab, status in posts if lab == label}
        assert 200 in statuses and 422 in statuses, (label, statuses)
    assert all(status < 500 for _, status in FUZZ_STATUSES)
    assert_serving(http)
