"""Response cache: canonical keys, determinism and Cache-Control rules, lossless replay of a stored answer
(text, logprobs, usage), the LRU's TTL and limits, and Redis (real server) including an outage."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from seekserve.api.generation import UsageTracker
from seekserve.backends.base import Chunk, GenerationRequest, LogprobEntry
from seekserve.engine.params import SamplingParams
from seekserve.gateway.cache import (
    CacheDirectives,
    CachedResponse,
    CacheMetrics,
    CachePolicy,
    LRUResponseCache,
    RedisResponseCache,
    cache_key,
    is_deterministic,
    mask_url,
    open_response_cache,
    parse_cache_control,
    should_cache,
)
from tests.services import RedisServer


def chat(**kw: Any) -> GenerationRequest:
    base: dict[str, Any] = dict(request_id="r1", model="m", kind="chat", params=SamplingParams(temperature=0),
                                messages=[{"role": "user", "content": "hi", "name": "a"}])
    return GenerationRequest(**{**base, **kw})


# a value different from the default for every SamplingParams field; a new field fails here until it is
# given one here, and so proven to change the key
OTHER_VALUE: dict[str, Any] = {
    "n": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "presence_penalty": 0.5,
    "frequency_penalty": 0.5, "repetition_penalty": 1.1, "seed": 7, "stop": ("x",), "stop_token_ids": (3,),
    "max_tokens": 17, "min_tokens": 1, "ignore_eos": True, "logprobs": 2, "skip_special_tokens": False,
    "extra": {"processor": "x"},
}


def test_key_is_stable_across_dict_ordering_and_number_spelling() -> None:
    a = chat(messages=[{"role": "user", "content": "hi", "name": "a"}], chat_template_kwargs={"x": 1, "y": 2})
    b = chat(messages=[{"name": "a", "content": "hi", "role": "user"}], chat_template_kwargs={"y": 2, "x": 1})
    assert cache_key("t", a) == cache_key("t", b)
    assert len(cache_key("t", a)) == 64 and set(cache_key("t", a)) <= set("0123456789abcdef")
    # 0 and 0.0 sample the same way
    assert cache_key("t", chat(params=SamplingParams(temperature=0))) == \
        cache_key("t", chat(params=SamplingParams(temperature=0.0)))
    # what cannot change the text is not keyed
    other = dataclasses.replace(a, request_id="r2", priority=5, cache_salt="s")
    assert cache_key("t", a) == cache_key("t", other)


def test_key_differs_by_tenant_model_kind_and_input() -> None:
    base = chat()
    keys = {cache_key("t", base), cache_key("u", base), cache_key("t", chat(model="m2")),
            cache_key("t", chat(messages=[{"role": "user", "content": "hi!", "name": "a"}])),
            cache_key("t", chat(messages=[{"role": "user", "content": "hi"}])),
            cache_key("t", chat(messages=[{"role": "system", "content": "hi", "name": "a"}])),
            cache_key("t", chat(chat_template_kwargs={"thinking": True})),
            cache_key("t", chat(kind="completion", messages=None, prompt="hi")),
            cache_key("t", chat(kind="completion", messages=None, prompt=[1, 2])),
            cache_key("t", chat(kind="completion", messages=None, prompt="[1,2]"))}
    assert len(keys) == 10


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(SamplingParams)])
def test_key_differs_by_every_sampling_field(name: str) -> None:
    assert name in OTHER_VALUE, f"new SamplingParams field {name}: give it a value in OTHER_VALUE"
    params = SamplingParams(temperature=0)
    changed = dataclasses.replace(params, **{name: OTHER_VALUE[name]})
    assert cache_key("t", chat(params=params)) != cache_key("t", chat(params=changed))


def test_key_refuses_values_without_a_json_form() -> None:
    with pytest.raises(ValueError, match="canonical"):
        cache_key("t", chat(chat_template_kwargs={"x": object()}))


def test_determinism_rules() -> None:
    assert is_deterministic(SamplingParams(temperature=0))
    assert is_deterministic(SamplingParams(temperature=0.8, seed=1))
    assert is_deterministic(SamplingParams(temperature=0, n=3))
    assert not is_deterministic(SamplingParams(temperature=0.8))
    assert not is_deterministic(SamplingParams(temperature=0.8, n=4))


def test_should_cache_combines_policy_determinism_directives_and_sensitivity() -> None:
    greedy, sampled = SamplingParams(temperature=0), SamplingParams(temperature=1.0, n=2)
    both, policy = CacheDirectives(), CachePolicy(cache_sensitive_tenants=frozenset({"trusted"}))
    assert should_cache(policy, greedy, both, False, "t", False) == (True, True)
    assert should_cache(policy, sampled, both, False, "t", False) == (False, False)
    assert should_cache(policy, greedy, both, False, "t", True) == (False, False)
    assert should_cache(CachePolicy(enabled=False), greedy, both, False, "t", False) == (False, False)
    assert should_cache(policy, greedy, parse_cache_control("no-cache"), False, "t", False) == (False, True)
    assert should_cache(policy, greedy, parse_cache_control("no-store"), False, "t", False) == (False, False)
    assert should_cache(policy, greedy, both, True, "t", False) == (False, False)
    assert should_cache(policy, greedy, both, True, "trusted", False) == (True, True)
    with pytest.raises(ValueError):
        CachePolicy(ttl=0)


@pytest.mark.parametrize("header, read, write", [
    (None, True, True), ("", True, True), ("max-age=60", True, True), ("No-Cache", False, True),
    (" max-age=0 ,  no-cache ", False, True), ("NO-STORE", False, False),
    ("no-cache, no-store", False, False),
    ('private="a, no-store", max-age=5', True, True), ("no-cache=\"set-cookie\"", False, True),
    ("no-storex, xno-cache", True, True), (",,,", True, True), ('"unterminated, no-store', True, True),
])
def test_cache_control(header: str | None, read: bool, write: bool) -> None:
    assert parse_cache_control(header) == CacheDirectives(read=read, write=write)


@given(st.text())
def test_cache_control_never_raises(header: str) -> None:
    d = parse_cache_control(header)
    assert isinstance(d, CacheDirectives)
    assert d.write or not d.read         # no directive allows reading without writing
    if "no-store" not in header.lower():
        assert d.write


def lp(token: str, value: float) -> LogprobEntry:
    raw = list(token.encode())
    return LogprobEntry(token=token, logprob=value, bytes=raw, top=[(token, value, raw), ("z", -9.5, [122])])


def stream() -> list[Chunk]:
    """Two choices interleaved as a backend streams them: reasoning first, cumulative output counts."""
    return [
        Chunk(0, reasoning_text="think", token_ids=[1], logprobs=[lp("think", -0.1)], num_prompt_tokens=9,
              num_cached_tokens=4, num_output_tokens=1, num_reasoning_tokens=1),
        Chunk(1, text="Hé", token_ids=[2], logprobs=[lp("Hé", -0.2)], num_prompt_tokens=9,
              num_cached_tokens=4, num_output_tokens=1),
        Chunk(0, text="4", token_ids=[3], logprobs=[lp("4", -0.0)], num_prompt_tokens=9, num_cached_tokens=4,
              num_output_tokens=2, num_reasoning_tokens=1),
        Chunk(1, text=" 🙂", token_ids=[4], logprobs=[lp(" 🙂", -1.5)], finish_reason="length",
              num_prompt_tokens=9, num_cached_tokens=4, num_output_tokens=2),
        Chunk(0, text="", token_ids=[], logprobs=[], finish_reason="stop", num_prompt_tokens=9,
              num_cached_tokens=4, num_output_tokens=2, num_reasoning_tokens=1),
    ]


def usage_of(chunks: list[Chunk]) -> dict[str, Any]:
    tracker = UsageTracker()
    for c in chunks:
        tracker.add(0, c.index, c)
    return tracker.usage(with_reasoning=True)


def test_round_trip_preserves_text_logprobs_finish_and_usage() -> None:
    original = stream()
    cached = CachedResponse.from_chunks(original, "m", n=2, created=123)
    replayed = CachedResponse.from_bytes(cached.to_bytes()).chunks()
    assert CachedResponse.from_bytes(cached.to_bytes()) == cached
    assert [(c.index, c.text, c.reasoning_text, c.finish_reason) for c in replayed] == \
        [(0, "4", "think", "stop"), (1, "Hé 🙂", "", "length")]
    assert replayed[0].logprobs == [lp("think", -0.1), lp("4", -0.0)]
    assert replayed[1].logprobs == [lp("Hé", -0.2), lp(" 🙂", -1.5)]
    assert usage_of(replayed) == usage_of(original)
    assert usage_of(replayed)["completion_tokens_details"] == {"reasoning_tokens": 1}
    assert all(c.token_ids == [] for c in replayed)          # nothing was generated
    assert (cached.model, cached.created, cached.num_output_tokens) == ("m", 123, 4)


def test_logprobs_off_stays_none() -> None:
    chunks = [Chunk(0, text="a", num_prompt_tokens=1),
              Chunk(0, text="b", finish_reason="stop", num_output_tokens=2)]
    replayed = CachedResponse.from_bytes(CachedResponse.from_chunks(chunks, "m").to_bytes()).chunks()
    assert replayed[0].logprobs is None and replayed[0].text == "ab"


@pytest.mark.parametrize("chunks, n", [
    ([], None),
    ([Chunk(0, text="a")], None),                                        # cut short
    ([Chunk(0, text="a", finish_reason="abort")], None),                 # client went away
    ([Chunk(0, text="a", finish_reason="stop")], 2),                     # choice 1 never answered
    ([Chunk(0, finish_reason="stop"), Chunk(1, text="b")], None),
    ([Chunk(0, finish_reason="stop"), Chunk(3, finish_reason="stop")], 2),
])
def test_incomplete_streams_are_refused(chunks: list[Chunk], n: int | None) -> None:
    with pytest.raises(ValueError):
        CachedResponse.from_chunks(chunks, "m", n=n)


def valid_doc() -> dict[str, Any]:
    return json.loads(CachedResponse.from_chunks(stream(), "m", n=2).to_bytes())


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(v=999), lambda d: d.pop("choices"), lambda d: d.update(choices=[]),
    lambda d: d.update(prompt="9"), lambda d: d.update(cached=-1), lambda d: d.update(created=True),
    lambda d: d["choices"][0].update(finish=None), lambda d: d["choices"][0].update(finish="abort"),
    lambda d: d["choices"][0].update(text=5), lambda d: d["choices"][0]["logprobs"][0].pop(),
    lambda d: d["choices"][0]["logprobs"][0][2].append(300), lambda d: d["choices"][0]["logprobs"].append(1),
    lambda d: d["choices"][1]["logprobs"][0][3].append(["t", "x", []]),
])
def test_corrupt_or_foreign_entries_are_refused(mutate: Any) -> None:
    doc = valid_doc()
    mutate(doc)
    with pytest.raises(ValueError):
        CachedResponse.from_bytes(json.dumps(doc).encode())


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes_are_a_value_error_or_an_entry(data: bytes) -> None:
    try:
        value = CachedResponse.from_bytes(data)
    except ValueError:
        return
    assert value.choices


def test_deeply_nested_json_is_refused() -> None:
    with pytest.raises(ValueError):
        CachedResponse.from_bytes(b"[" * 100_000 + b"]" * 100_000)


def answer(text: str = "ok") -> CachedResponse:
    return CachedResponse.from_chunks([Chunk(0, text=text, finish_reason="stop", num_output_tokens=1)], "m")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lru_ttl_expiry() -> None:
    async def main() -> None:
        clock = FakeClock()
        cache = LRUResponseCache(clock=clock)
        await cache.put("k", answer("a"), ttl=10)
        await cache.put("z", answer("z"), ttl=0)                    # never stored
        clock.now += 9.9
        assert (await cache.get("k")).chunks()[0].text == "a"
        assert await cache.get("z") is None
        clock.now += 0.1
        assert await cache.get("k") is None
        assert len(cache) == 0 and cache.num_bytes == 0
    asyncio.run(main())


def test_lru_evicts_least_recently_used_by_count() -> None:
    async def main() -> None:
        cache = LRUResponseCache(max_entries=2)
        await cache.put("a", answer("a"), ttl=60)
        await cache.put("b", answer("b"), ttl=60)
        assert await cache.get("a") is not None                    # a is now the most recently used
        await cache.put("c", answer("c"), ttl=60)
        assert await cache.get("b") is None
        assert {(await cache.get(k)).chunks()[0].text for k in "ac"} == {"a", "c"}
        await cache.put("c", answer("c2"), ttl=60)                 # replacing does not double count
        assert len(cache) == 2 and (await cache.get("c")).chunks()[0].text == "c2"
    asyncio.run(main())


def test_lru_evicts_by_bytes_and_skips_oversized_entries() -> None:
    async def main() -> None:
        size = len("k1") + len(answer("x" * 100).to_bytes())
        cache = LRUResponseCache(max_bytes=2 * size + 10)
        for k in ("k1", "k2", "k3"):
            await cache.put(k, answer("x" * 100), ttl=60)
        assert len(cache) == 2 and cache.num_bytes == 2 * size
        assert await cache.get("k1") is None and await cache.get("k3") is not None
        await cache.put("big", answer("y" * 10_000), ttl=60)
        assert await cache.get("big") is None and len(cache) == 2    # too big: others kept
    asyncio.run(main())


def test_metrics_counters_and_hit_ratio() -> None:
    async def main() -> None:
        registry = CollectorRegistry()
        cache = LRUResponseCache(registry=registry)
        assert registry.get_sample_value("seekserve:response_cache_hit_ratio") == 0.0
        await cache.put("a", answer(), ttl=60)
        for key in ("a", "a", "a", "b"):
            await cache.get(key)
        value = registry.get_sample_value
        assert value("seekserve:response_cache_hits_total") == 3
        assert value("seekserve:response_cache_misses_total") == 1
        assert value("seekserve:response_cache_stores_total") == 1
        assert value("seekserve:response_cache_errors_total") == 0
        assert value("seekserve:response_cache_hit_ratio") == 0.75
        assert isinstance(cache.metrics, CacheMetrics)
    asyncio.run(main())


def test_mask_url() -> None:
    assert mask_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert mask_url("rediss://user:s3cret@[::1]/1") == "rediss://user:***@[::1]/1"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"


def test_open_response_cache_picks_redis_only_when_configured(redis_url: str) -> None:
    assert isinstance(open_response_cache(None), LRUResponseCache)
    cache = open_response_cache(redis_url)
    assert isinstance(cache, RedisResponseCache)
    asyncio.run(cache.close())


def test_redis_ttl_isolation_and_corrupt_entries(redis_url: str) -> None:
    prefix = f"test:cache:{uuid.uuid4().hex}:"
    raw = redis.Redis.from_url(redis_url)

    async def main() -> None:
        registry = CollectorRegistry()
        cache = RedisResponseCache(redis_url, prefix=prefix, registry=registry)
        try:
            request = chat()
            mine, theirs = cache_key("tenant-a", request), cache_key("tenant-b", request)
            await cache.put(mine, CachedResponse.from_chunks(stream(), "m", n=2), ttl=30)
            assert 29_000 < raw.pttl(prefix + mine) <= 30_000
            hit = await cache.get(mine)
            assert hit is not None and usage_of(hit.chunks()) == usage_of(stream())
            assert await cache.get(theirs) is None                 # same request, other tenant
            raw.set(prefix + "bad", b"{not json")
            assert await cache.get("bad") is None
            assert registry.get_sample_value("seekserve:response_cache_hits_total") == 1
            assert registry.get_sample_value("seekserve:response_cache_misses_total") == 2
        finally:
            await cache.close()
    try:
        asyncio.run(main())
    finally:
        for key in raw.scan_iter(match=prefix + "*"):
            raw.delete(key)
        raw.close()


def test_redis_outage_is_a_quick_miss_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer(tmp_path)

    def start() -> None:   # with a password, to check that it never reaches the log
        server.start()
        with redis.Redis(port=server.port) as admin:
            admin.config_set("requirepass", "s3cret")

    async def main() -> None:
        registry = CollectorRegistry()
        cache = RedisResponseCache(f"redis://:s3cret@127.0.0.1:{server.port}/0", registry=registry)
        try:
            await cache.put("k", answer(), ttl=60)
            assert await cache.get("k") is not None
            server.stop()
            for _ in range(3):
                started = time.monotonic()
                assert await cache.get("k") is None
                assert time.monotonic() - started < 1.0
                await cache.put("k", answer(), ttl=60)          # does not raise
            outage = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
            assert len(outage) == 1 and "s3cret" not in outage[0] and "***" in outage[0]
            assert registry.get_sample_value("seekserve:response_cache_errors_total") == 6
            assert registry.get_sample_value("seekserve:response_cache_misses_total") == 3
            start()
            await cache.put("k", answer("back"), ttl=60)
            assert (await cache.get("k")).chunks()[0].text == "back"
            assert sum("reachable again" in r.getMessage() for r in caplog.records) == 1
        finally:
            await cache.close()

    start()
    try:
        with caplog.at_level(logging.WARNING, logger="seekserve.gateway.cache"):
            asyncio.run(main())
    finally:
        server.stop()


def test_hung_redis_times_out_instead_of_stalling(tmp_path: Path) -> None:
    """A Redis that accepts connections but never answers (SIGSTOP) costs a lookup at most the timeouts."""
    server = RedisServer(tmp_path)
    server.start()

    async def main() -> None:
        registry = CollectorRegistry()
        cache = RedisResponseCache(server.url, registry=registry)
        try:
            await cache.put("k", answer(), ttl=60)
            server.proc.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                assert await cache.get("k") is None
                await cache.put("k", answer(), ttl=60)
                assert time.monotonic() - started < 1.5
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert registry.get_sample_value("seekserve:response_cache_errors_total") == 2
            assert await cache.get("k") is not None
        finally:
            await cache.close()
    try:
        asyncio.run(main())
    finally:
        server.stop()
