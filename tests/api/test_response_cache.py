"""Response cache end to end on a real server: a deterministic request asked twice is answered from the cache
(plain or streamed, same text and usage, x-seekserve-cache: hit) without engine work; sampling without a seed
is never cached; Cache-Control no-store / no-cache; tenants never share entries; sensitive answers only for
tenants whose policy allows it; hit metrics; and Redis mode shared by two servers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from seekserve.backends.local import LocalBackend
from seekserve.gateway.principal import Role, Tier
from tests.api.conftest import metric_value, running_server

MODEL = "tiny-chat"
PII_TEXT = "请把发票寄到 13812345678，联系人张先生"      # a mainland mobile number: confidential


@dataclass
class Server:
    base: str
    backend: LocalBackend
    app: Any
    keys: dict[str, str]         # tenant -> API key secret

    def metrics(self) -> str:
        return httpx.get(f"{self.base}/metrics", timeout=30).text

    def engine_work(self) -> int:
        """Prompt tokens the engine's scheduler has admitted so far: any generation, even one answered
        wholly from the prefix cache, adds to it; a response-cache hit adds nothing. The engine thread takes
        the snapshot after each step, before handing the step's outputs over, so it is current once a
        response has arrived."""
        return self.backend.async_engine.stats().num_prefix_queries


def with_keys(base: str, backend: LocalBackend, app: Any, tenants: list[str]) -> Server:
    parts = app.state.gateway_parts
    keys = {t: parts.keys.create(f"key-{t}", Role.developer, t, Tier.standard)[1] for t in tenants}
    parts.auth.keys_changed()
    return Server(base, backend, app, keys)


@pytest.fixture(scope="module")
def srv(chat_model: Path) -> Iterator[Server]:
    settings = {"response_cache": {"enabled": True, "sensitive_tenants": ["vault"]}}
    with running_server(chat_model, served_model_name=[MODEL], **settings) as (base, backend, app):
        s = with_keys(base, backend, app, ["acme", "globex", "vault"])
        # one stored entry first: the shared server's header checks start from a non-empty cache
        ask(s, "acme", "Warm-up: the cache holds one entry.")
        yield s


def body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 6,
            "temperature": 0, **extra}


def ask(s: Server, tenant: str, text: str, headers: dict[str, str] | None = None,
        **extra: Any) -> httpx.Response:
    r = httpx.post(f"{s.base}/v1/chat/completions", json=body(text, **extra), timeout=60,
                   headers={"Authorization": f"Bearer {s.keys[tenant]}", **(headers or {})})
    assert r.status_code == 200, r.text
    return r


def ask_streamed(s: Server, tenant: str, text: str,
                 **extra: Any) -> tuple[httpx.Headers, str, dict[str, Any]]:
    """(headers, text, usage) of a streamed request."""
    payload = body(text, stream=True, stream_options={"include_usage": True}, **extra)
    with httpx.stream("POST", f"{s.base}/v1/chat/completions", json=payload, timeout=60,
                      headers={"Authorization": f"Bearer {s.keys[tenant]}"}) as r:
        assert r.status_code == 200
        frames = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    events = [json.loads(f) for f in frames[:-1]]
    assert not any("error" in e for e in events), events
    content = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert any(c["finish_reason"] for e in events for c in e["choices"])
    return r.headers, content, events[-1]["usage"]


def answer(r: httpx.Response) -> tuple[Any, Any]:
    """What must be identical between a fresh answer and its replay: the choices and the usage."""
    data = r.json()
    return data["choices"], data["usage"]


def test_deterministic_request_twice_is_a_hit_that_costs_no_engine_work(srv: Server) -> None:
    text = "The cache test: say something twice."
    first = ask(srv, "acme", text)
    assert (first.headers["x-seekserve-cache"], first.headers["x-seekserve-backend"]) == ("miss", "local")
    work, m = srv.engine_work(), srv.metrics()
    second = ask(srv, "acme", text)
    assert (second.headers["x-seekserve-cache"], second.headers["x-seekserve-backend"]) == ("hit", "cache")
    assert "x-seekserve-route" not in second.headers          # no backend was routed to
    assert answer(second) == answer(first)
    assert first.json()["usage"]["completion_tokens"] > 0
    assert srv.engine_work() == work                           # the engine admitted nothing
    after = srv.metrics()
    for name in ("seekserve:generation_tokens_total", "seekserve:prefix_cache_queries_total"):
        assert metric_value(after, name, **({"model": MODEL} if "generation" in name else {})) == \
            metric_value(m, name, **({"model": MODEL} if "generation" in name else {})), name
    parts = srv.app.state.gateway_parts
    assert parts.writer.flush(20)
    latest = parts.usage.query(tenant="acme", limit=1)[0]      # the hit is metered as served by the cache
    assert (latest.backend, latest.completion_tokens) == ("cache", first.json()["usage"]["completion_tokens"])


def test_streamed_hit_has_the_same_text_and_usage(srv: Server) -> None:
    text = "The streamed cache test."
    plain = ask(srv, "acme", text)
    work = srv.engine_work()
    headers, content, usage = ask_streamed(srv, "acme", text)
    assert (headers["x-seekserve-cache"], headers["x-seekserve-backend"]) == ("hit", "cache")
    assert content == plain.json()["choices"][0]["message"]["content"]
    assert usage == plain.json()["usage"]
    assert srv.engine_work() == work
    # and the other way round: a streamed answer is stored, then replayed as a plain response
    headers, content, usage = ask_streamed(srv, "acme", text + " (streamed first)")
    assert headers["x-seekserve-cache"] == "miss"
    work = srv.engine_work()
    replay = ask(srv, "acme", text + " (streamed first)")
    assert replay.headers["x-seekserve-cache"] == "hit" and srv.engine_work() == work
    assert (replay.json()["choices"][0]["message"]["content"], replay.json()["usage"]) == (content, usage)


def test_sampling_without_a_seed_is_never_cached_with_a_seed_it_is(srv: Server) -> None:
    text = "The sampling cache test."
    stores = metric_value(srv.metrics(), "seekserve:response_cache_stores_total")
    for _ in range(2):
        work = srv.engine_work()
        r = ask(srv, "acme", text, temperature=0.7)
        assert (r.headers["x-seekserve-cache"], r.headers["x-seekserve-backend"]) == ("miss", "local")
        assert srv.engine_work() > work
    assert metric_value(srv.metrics(), "seekserve:response_cache_stores_total") == stores
    first = ask(srv, "acme", text, temperature=0.7, seed=1234)
    assert first.headers["x-seekserve-cache"] == "miss"
    work = srv.engine_work()
    second = ask(srv, "acme", text, temperature=0.7, seed=1234)
    assert second.headers["x-seekserve-cache"] == "hit" and srv.engine_work() == work
    assert answer(second) == answer(first)
    other_seed = ask(srv, "acme", text, temperature=0.7, seed=4321)    # the seed is part of the key
    assert other_seed.headers["x-seekserve-cache"] == "miss"


def test_cache_control_no_store_and_no_cache(srv: Server) -> None:
    text = "The cache-control test."
    stores = metric_value(srv.metrics(), "seekserve:response_cache_stores_total")
    r = ask(srv, "acme", text, headers={"Cache-Control": "no-store"})
    assert r.headers["x-seekserve-cache"] == "miss"
    assert metric_value(srv.metrics(), "seekserve:response_cache_stores_total") == stores     # not stored
    r = ask(srv, "acme", text)
    assert r.headers["x-seekserve-cache"] == "miss"                                     # so not found
    assert ask(srv, "acme", text).headers["x-seekserve-cache"] == "hit"
    # no-store also skips the lookup of an entry that exists
    work = srv.engine_work()
    r = ask(srv, "acme", text, headers={"Cache-Control": "no-store"})
    assert r.headers["x-seekserve-cache"] == "miss" and srv.engine_work() > work
    # no-cache: not read (the engine answers again), but the fresh answer replaces the entry
    stores = metric_value(srv.metrics(), "seekserve:response_cache_stores_total")
    work = srv.engine_work()
    r = ask(srv, "acme", text, headers={"Cache-Control": "no-cache"})
    assert (r.headers["x-seekserve-cache"], r.headers["x-seekserve-backend"]) == ("miss", "local")
    assert srv.engine_work() > work
    assert metric_value(srv.metrics(), "seekserve:response_cache_stores_total") == stores + 1
    work = srv.engine_work()
    assert ask(srv, "acme", text).headers["x-seekserve-cache"] == "hit" and srv.engine_work() == work


def test_tenants_never_share_entries(srv: Server) -> None:
    text = "The tenant isolation test."
    a = ask(srv, "acme", text)
    assert a.headers["x-seekserve-cache"] == "miss"
    work = srv.engine_work()
    b = ask(srv, "globex", text)                 # the same request, another tenant: the engine answers
    assert (b.headers["x-seekserve-cache"], b.headers["x-seekserve-backend"]) == ("miss", "local")
    assert srv.engine_work() > work
    assert ask(srv, "globex", text).headers["x-seekserve-cache"] == "hit"
    assert ask(srv, "acme", text).headers["x-seekserve-cache"] == "hit"


def test_sensitive_answers_are_cached_only_for_tenants_that_allow_it(srv: Server) -> None:
    for _ in range(2):
        work = srv.engine_work()
        r = ask(srv, "acme", PII_TEXT)
        assert r.headers["x-seekserve-data-classification"] == "confidential"
        assert (r.headers["x-seekserve-cache"], r.headers["x-seekserve-backend"]) == ("miss", "local")
        assert srv.engine_work() > work
    # the explicit header makes a harmless text confidential too
    for _ in range(2):
        r = ask(srv, "acme", "The header cache test.", headers={"X-Data-Classification": "confidential"})
        assert r.headers["x-seekserve-cache"] == "miss"
    first = ask(srv, "vault", PII_TEXT)         # response_cache.sensitive_tenants: [vault]
    assert first.headers["x-seekserve-cache"] == "miss"
    work = srv.engine_work()
    second = ask(srv, "vault", PII_TEXT)
    assert (second.headers["x-seekserve-cache"], second.headers["x-seekserve-data-classification"]) == \
        ("hit", "confidential")
    assert srv.engine_work() == work and answer(second) == answer(first)


def test_header_says_miss_while_the_cache_is_empty(chat_model: Path) -> None:
    settings = {"response_cache": {"enabled": True}}
    with running_server(chat_model, served_model_name=[MODEL], **settings) as (base, _, _):
        r = httpx.post(f"{base}/v1/chat/completions", json=body("The empty cache test."), timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["x-seekserve-cache"] == "miss"


def test_hit_rate_metrics(srv: Server) -> None:
    text = "The metrics test."
    before = srv.metrics()
    ask(srv, "acme", text)
    ask(srv, "acme", text)
    after = srv.metrics()
    for what in ("hits", "misses", "stores"):
        name = f"seekserve:response_cache_{what}_total"
        assert metric_value(after, name) - metric_value(before, name) == 1, name
    hits = metric_value(after, "seekserve:response_cache_hits_total")
    misses = metric_value(after, "seekserve:response_cache_misses_total")
    assert metric_value(after, "seekserve:response_cache_hit_ratio") == pytest.approx(hits / (hits + misses))
    assert "seekserve:response_cache_hit_ratio " in after


def test_redis_cache_is_shared_by_two_servers(chat_model: Path, redis_url: str) -> None:
    # a fresh tenant and text: a shared Redis may hold entries of earlier runs
    run = uuid.uuid4().hex[:12]
    tenant, text = f"tenant-{run}", f"The Redis cache test {run}."
    settings = {"response_cache": {"enabled": True}, "redis_url": redis_url}
    client = redis.Redis.from_url(redis_url)
    try:
        entries = sum(1 for _ in client.scan_iter(match="seekserve:cache:*", count=1000))
        with running_server(chat_model, served_model_name=[MODEL], **settings) as one, \
                running_server(chat_model, served_model_name=[MODEL], **settings) as two:
            first, second = with_keys(*one, [tenant]), with_keys(*two, [tenant])
            fresh = ask(first, tenant, text)
            assert fresh.headers["x-seekserve-cache"] == "miss"
            assert sum(1 for _ in client.scan_iter(match="seekserve:cache:*", count=1000)) >= entries + 1
            work = second.engine_work()
            hit = ask(second, tenant, text)          # another server, its own engine: the entry is in Redis
            assert (hit.headers["x-seekserve-cache"], hit.headers["x-seekserve-backend"]) == ("hit", "cache")
            assert answer(hit) == answer(fresh) and second.engine_work() == work
            _, content, _ = ask_streamed(second, tenant, text)
            assert content == fresh.json()["choices"][0]["message"]["content"]
            assert metric_value(second.metrics(), "seekserve:response_cache_hits_total") == 2
    finally:
        client.close()
