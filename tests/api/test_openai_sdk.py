"""The official `openai` SDK against a real server: models, completions, chat, streaming, error classes."""

from __future__ import annotations

import openai
import pytest

from tests.api.conftest import API_KEY

MSG = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 37 + 45?"}]


def test_models(client) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-chat", "tiny-alias"]
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"


def test_completion_variants(client) -> None:
    one = client.completions.create(model="tiny-chat", prompt="Hello world", max_tokens=5, temperature=0)
    assert one.object == "text_completion" and len(one.choices) == 1
    assert one.usage.completion_tokens == 5 and one.choices[0].finish_reason == "length"
    many = client.completions.create(model="tiny-chat", prompt=["Hello world", "深度求索"], max_tokens=4, n=2,
                                     temperature=0.8, seed=3)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.usage.completion_tokens == 16
    ids = client.completions.create(model="tiny-chat", prompt=[0, 40, 41, 42], max_tokens=3, temperature=0,
                                    echo=True)
    assert ids.usage.prompt_tokens == 4
    greedy = client.completions.create(model="tiny-chat", prompt="Hello world", max_tokens=5, temperature=0,
                                       echo=True, stop=None)
    assert greedy.choices[0].text == "Hello world" + one.choices[0].text


def test_prompt_tokens_counted_once_per_prompt(client) -> None:
    a = client.completions.create(model="tiny-chat", prompt="Hello world", max_tokens=1)
    b = client.completions.create(model="tiny-chat", prompt="深度求索", max_tokens=1)
    both = client.completions.create(model="tiny-chat", prompt=["Hello world", "深度求索"], max_tokens=1, n=3)
    assert both.usage.prompt_tokens == a.usage.prompt_tokens + b.usage.prompt_tokens
    assert both.usage.completion_tokens == 6


def test_completion_logprobs_and_seed(client) -> None:
    r = client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=4, logprobs=3, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4 and all(len(t) <= 3 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == r.choices[0].text
    s1 = client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=8, temperature=1.0, seed=42)
    s2 = client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=8, temperature=1.0, seed=42)
    assert s1.choices[0].text == s2.choices[0].text


def test_chat_non_stream(client) -> None:
    r = client.chat.completions.create(model="tiny-alias", messages=MSG, max_tokens=6, temperature=0, n=2,
                                       logprobs=True, top_logprobs=2)
    assert r.object == "chat.completion" and r.model == "tiny-alias"
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == r.choices[1].message.content   # greedy
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 2 for t in content)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens == 12


def test_chat_roles_including_tool(client) -> None:
    messages = [{"role": "user", "content": "call it"}, {"role": "assistant", "content": "ok"},
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
                {"role": "user", "content": [{"type": "text", "text": "and now?"}]}]
    r = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_stream_matches_non_stream(client) -> None:
    full = client.chat.completions.create(model="tiny-chat", messages=MSG, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model="tiny-chat", messages=MSG, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_completion_stream(client) -> None:
    full = client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=7, temperature=0)
    parts = list(client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=7, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text


def test_error_classes(client, server) -> None:
    base, _, _ = server
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=MSG)
    assert nf.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny-chat", messages=MSG, temperature=3)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as ctx:
        client.chat.completions.create(model="tiny-chat", messages=MSG, max_tokens=1000)
    assert "256" in ctx.value.message and "1000" in ctx.value.message
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="tiny-chat", prompt="a", suffix="b")
    with pytest.raises(openai.BadRequestError, match="json_object"):
        client.chat.completions.create(model="tiny-chat", messages=MSG, response_format={"type": "json_object"})
    with pytest.raises(openai.NotFoundError):
        client.get("/does-not-exist", cast_to=object)


def test_no_v1_prefix(server) -> None:
    from openai import OpenAI

    base, _, _ = server
    c = OpenAI(base_url=base, api_key=API_KEY, max_retries=0)
    assert c.chat.completions.create(model="tiny-chat", messages=MSG, max_tokens=2).choices
    assert [m.id for m in c.models.list().data][0] == "tiny-chat"


def test_queue_full_is_rate_limit_error(chat_model) -> None:
    import threading
    import time

    from openai import OpenAI

    from tests.api.conftest import running_server

    with running_server(chat_model, batch_size=1, max_queued_requests=1) as (base, backend, _):
        c = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
        long = c.completions.create(model=chat_model.name, prompt="a", max_tokens=200, stream=True,
                                    extra_body={"ignore_eos": True})
        next(iter(long))                                   # A is running
        waiting = threading.Thread(target=lambda: c.completions.create(model=chat_model.name, prompt="b",
                                                                       max_tokens=2))
        waiting.start()                                    # B waits for the only slot
        deadline = time.time() + 5
        while backend.num_queued < 1 and time.time() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as err:
            c.completions.create(model=chat_model.name, prompt="c", max_tokens=2)
        assert err.value.response.headers["retry-after"] == "1"
        long.close()
        waiting.join(30)
