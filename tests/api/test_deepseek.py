"""DeepSeek's extra fields: prompt cache usage from the engine's prefix cache, and reasoning_content
split from content for R1-style models (stream and non-stream)."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from openai import OpenAI

from tests.api.conftest import running_server

LONG_SYSTEM = "You are a helpful assistant for a bank. " * 6


def test_prompt_cache_usage(chat_model) -> None:
    with running_server(chat_model) as (base, _, _):
        c = OpenAI(base_url=base, api_key="x", max_retries=0)
        msgs = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "first question"}]
        cold = c.chat.completions.create(model=chat_model.name, messages=msgs, max_tokens=2).usage
        msgs[1]["content"] = "second question"
        warm = c.chat.completions.create(model=chat_model.name, messages=msgs, max_tokens=2).usage
    for u in (cold, warm):
        extra = u.model_extra
        assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == u.prompt_tokens
        assert u.prompt_tokens_details.cached_tokens == extra["prompt_cache_hit_tokens"]
    assert cold.model_extra["prompt_cache_hit_tokens"] == 0
    hit = warm.model_extra["prompt_cache_hit_tokens"]
    assert hit > 0 and hit % 16 == 0           # whole 16-token blocks of the shared system prompt
    assert "completion_tokens_details" not in cold.model_dump(exclude_none=True)  # not a reasoning model


def test_reasoning_content_non_stream_and_stream(scripted_reasoning_model) -> None:
    with running_server(scripted_reasoning_model) as (base, backend, _):
        assert backend.reasoning                                 # auto-detected from the template
        c = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "What is 37 + 45?"}]
        r = c.chat.completions.create(model=scripted_reasoning_model.name, messages=msgs, temperature=0)
        msg = r.choices[0].message
        assert msg.model_extra["reasoning_content"] == "Sum: 37+45."
        assert msg.content == "Answer 82"
        assert r.choices[0].finish_reason == "stop"
        details = r.usage.completion_tokens_details
        assert 0 < details.reasoning_tokens < r.usage.completion_tokens
        chunks = list(c.chat.completions.create(model=scripted_reasoning_model.name, messages=msgs, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        reasoning = "".join(ch.choices[0].delta.model_extra.get("reasoning_content") or ""
                            for ch in chunks if ch.choices)
        content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert (reasoning, content) == ("Sum: 37+45.", "Answer 82")
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == details.reasoning_tokens
        # completions are raw text: no split
        raw = c.completions.create(model=scripted_reasoning_model.name, prompt="x", max_tokens=3)
        assert "reasoning_content" not in raw.choices[0].model_dump()


def test_reasoning_parser_can_be_switched_off(scripted_reasoning_model) -> None:
    with running_server(scripted_reasoning_model, reasoning_parser="none") as (base, backend, _):
        assert not backend.reasoning
        c = OpenAI(base_url=base, api_key="x", max_retries=0)
        r = c.chat.completions.create(model=scripted_reasoning_model.name, temperature=0,
                                      messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "Sum: 37+45.</think>Answer 82"


def test_reasoning_content_in_input_is_refused(scripted_reasoning_model) -> None:
    import openai

    with running_server(scripted_reasoning_model) as (base, _, _):
        c = OpenAI(base_url=base, api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="reasoning_content"):
            c.chat.completions.create(model=scripted_reasoning_model.name, messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Answer 82", "reasoning_content": "Sum"},
                {"role": "user", "content": "again"}])


def test_metrics_names(chat_model) -> None:
    with running_server(chat_model) as (base, _, _):
        c = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        c.completions.create(model=chat_model.name, prompt="Hello", max_tokens=3)
        # a stream the client leaves early is no success (long enough to outlive the disconnect watch)
        stream = c.completions.create(model=chat_model.name, prompt="Hello", max_tokens=250, stream=True,
                                      extra_body={"ignore_eos": True})
        next(iter(stream))
        stream.close()
        # the server notices the client left within inference.WATCH_AFTER (50 ms) and stops the request
        deadline = time.monotonic() + 5
        while True:
            text = httpx.get(f"{base}/metrics").text
            if 'route="/v1/completions",status="200"} 2.0' in text or time.monotonic() > deadline:
                break
            time.sleep(0.02)
    for name in ("seekserve:time_to_first_token_seconds_bucket", "seekserve:e2e_request_latency_seconds_count",
                 "seekserve:inter_token_latency_seconds_count", "seekserve:num_requests_running",
                 "seekserve:num_requests_waiting", "seekserve:kv_cache_usage_perc",
                 "seekserve:prefix_cache_hits_total", "seekserve:prefix_cache_queries_total",
                 "seekserve:prompt_tokens_total", "seekserve:generation_tokens_total"):
        assert re.search(rf"^{re.escape(name)}", text, re.M), name
    assert re.search(r'^seekserve:request_success_total\{finished_reason="length",model="[^"]+"\} 1\.0', text, re.M)
    assert re.search(r'^seekserve:http_requests_total\{method="POST",route="/completions",status="200"\}', text, re.M) \
        is None
    assert re.search(r'^seekserve:http_requests_total\{method="POST",route="/v1/completions",status="200"\} 2\.0',
                     text, re.M)
