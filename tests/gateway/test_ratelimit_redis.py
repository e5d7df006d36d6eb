"""The same behaviour from both limiters (in-process and Redis, real clock), plus what only Redis has: key expiry,
script reloading, one limit shared by several limiter instances, and URLs masked in what it logs."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis

from seekserve.gateway.principal import Limits
from seekserve.gateway.ratelimit import InProcessRateLimiter, RateLimiter, Scope
from seekserve.gateway.ratelimit_redis import RedisRateLimiter, mask_url

Make = Callable[..., RateLimiter]


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture(params=["inprocess", "redis"])
def make(request: pytest.FixtureRequest, prefix: str) -> Make:
    if request.param == "inprocess":
        return lambda **kw: InProcessRateLimiter(**kw)
    url = request.getfixturevalue("redis_url")
    return lambda **kw: RedisRateLimiter(url, prefix=prefix, **kw)


def run(make: Make, body: Callable[[RateLimiter], Awaitable[Any]], **kw: Any) -> Any:
    """Build the limiter inside the event loop that uses it (redis.asyncio binds to it) and close it there."""
    async def main() -> Any:
        limiter = make(**kw)
        try:
            return await body(limiter)
        finally:
            await limiter.close()
    return asyncio.run(main())


def test_burst_then_refusal(make: Make) -> None:
    scope = [Scope("key:a", Limits(rpm=60))]

    async def body(limiter: RateLimiter) -> None:
        assert all([(await limiter.acquire(scope, 0)).allowed for _ in range(60)])
        refused = await limiter.acquire(scope, 0)
        assert (refused.allowed, refused.reason, refused.lease) == (False, "rpm", None)
        assert 0.5 < refused.retry_after <= 1.0     # one slot every second; the burst took a moment
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["retry-after"] == "1" and 500 < int(refused.headers["retry-after-ms"]) <= 1000
    run(make, body)


@pytest.mark.parametrize("limits", [Limits(rpm=100_000_000, tpm=10_000_000_000), Limits(rps=4, tpm=7)])
def test_remaining_never_exceeds_the_limit(make: Make, limits: Limits) -> None:
    """A limit so high that the conformance slack spans many intervals (10^10 tpm: one token every 6 ns) must
    not report more room than the bucket holds, even after refunds into a full bucket."""
    scope = [Scope("key:big", limits)]

    async def body(limiter: RateLimiter) -> None:
        for _ in range(3):
            decision = await limiter.acquire(scope, 5)
            assert decision.allowed and decision.lease is not None
            await limiter.finish(decision.lease, 0)     # the whole reservation refunded
        headers = (await limiter.acquire(scope, 0)).headers
        for what, limit in (("requests", limits.rpm or limits.rps), ("tokens", limits.tpm)):
            assert int(headers[f"x-ratelimit-remaining-{what}"]) <= max(1, int(limit)), headers
    run(make, body)


def test_headers_after_admission(make: Make) -> None:
    scopes = [Scope("key:a", Limits(rpm=600, rps=5)), Scope("tenant:t", Limits(tpm=1000))]

    async def body(limiter: RateLimiter) -> None:
        decision = await limiter.acquire(scopes, 100)
        assert decision.headers == {
            "x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "4",
            "x-ratelimit-reset-requests": "200ms", "x-ratelimit-limit-tokens": "1000",
            "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "6s"}
    run(make, body)


@pytest.mark.parametrize("tenant_first", [False, True])
def test_all_or_nothing(make: Make, tenant_first: bool) -> None:
    key, tenant = Scope("key:a", Limits(rpm=100, tpm=600)), Scope("tenant:t", Limits(rpm=2))
    scopes = [tenant, key] if tenant_first else [key, tenant]

    async def body(limiter: RateLimiter) -> None:
        for _ in range(2):
            assert (await limiter.acquire(scopes, 10)).allowed
        assert (await limiter.acquire(scopes, 10)).reason == "rpm"
        alone = (await limiter.acquire([key], 10)).headers
        assert alone["x-ratelimit-remaining-requests"] == "97"
        assert alone["x-ratelimit-remaining-tokens"] == "570"
    run(make, body)


def test_tpm_reserve_reconcile_and_idempotent_finish(make: Make) -> None:
    scope = [Scope("key:a", Limits(tpm=600))]   # refills 10 tokens/s: negligible during the test

    async def body(limiter: RateLimiter) -> None:
        first = await limiter.acquire(scope, 400)
        refused = await limiter.acquire(scope, 400)
        assert refused.reason == "tpm" and 19.5 < refused.retry_after <= 20.0
        await limiter.finish(first.lease, 100)
        assert (await limiter.acquire(scope, 400)).allowed
        await limiter.finish(first.lease, 100)   # no second refund
        assert (await limiter.acquire(scope, 200)).reason == "tpm"
        too_big = await limiter.acquire(scope, 601)
        assert (too_big.reason, too_big.retry_after) == ("tpm_exceeds_limit", 0.0)
    run(make, body)


def test_concurrency_slots(make: Make) -> None:
    scope = [Scope("key:a", Limits(max_concurrency=2)), Scope("tenant:t", Limits(rpm=100))]

    async def body(limiter: RateLimiter) -> None:
        first, second = await limiter.acquire(scope, 0), await limiter.acquire(scope, 0)
        refused = await limiter.acquire(scope, 0)
        assert first.allowed and second.allowed and (refused.reason, refused.retry_after) == ("concurrency", 1.0)
        await limiter.finish(first.lease, 0)
        third = await limiter.acquire(scope, 0)
        assert third.allowed
        await limiter.finish(first.lease, 0)
        assert (await limiter.acquire(scope, 0)).reason == "concurrency"
        for decision in (second, third):
            await limiter.finish(decision.lease, 0)
        assert (await limiter.acquire(scope, 0)).allowed
    run(make, body)


def test_unfinished_leases_expire(make: Make) -> None:
    scope = [Scope("key:a", Limits(max_concurrency=1))]

    async def body(limiter: RateLimiter) -> None:
        stale = await limiter.acquire(scope, 0)
        assert stale.allowed and (await limiter.acquire(scope, 0)).reason == "concurrency"
        await asyncio.sleep(0.35)
        fresh = await limiter.acquire(scope, 0)
        assert fresh.allowed
        await limiter.finish(stale.lease, 0)     # expired: must not free the fresh lease's slot
        assert (await limiter.acquire(scope, 0)).reason == "concurrency"
    run(make, body, lease_ttl=0.3)


def test_keys_expire_and_finish_cleans_up(redis_url: str, prefix: str) -> None:
    scope = [Scope("key:a", Limits(rps=1, rpm=60, tpm=600, max_concurrency=2))]
    inspect = redis.Redis.from_url(redis_url, decode_responses=True)

    async def body(limiter: RateLimiter) -> None:
        decision = await limiter.acquire(scope, 100)
        assert 10_000 < inspect.pttl(f"{prefix}b:key:a") <= 11_000        # tpm bucket: 10 s to refill
        assert 600_000 < inspect.pttl(f"{prefix}c:key:a") <= 601_000      # lease ttl + 1 s
        assert 599_000 < inspect.pttl(f"{prefix}l:{decision.lease.lease_id}") <= 600_000
        await limiter.finish(decision.lease, 100)
        assert inspect.keys(f"{prefix}*") == [f"{prefix}b:key:a"]
        assert (await limiter.acquire([Scope("key:free", Limits())], 5)).allowed
        assert inspect.keys(f"{prefix}*") == [f"{prefix}b:key:a"]         # unlimited: Redis untouched
    try:
        run(lambda **kw: RedisRateLimiter(redis_url, prefix=prefix), body)
    finally:
        inspect.close()


def test_scripts_reload_after_script_flush(redis_url: str, prefix: str) -> None:
    scope = [Scope("key:a", Limits(rpm=2, max_concurrency=5))]

    async def body(limiter: RateLimiter) -> None:
        first = await limiter.acquire(scope, 0)
        with redis.Redis.from_url(redis_url) as admin:
            admin.script_flush()
        await limiter.finish(first.lease, 0)
        assert (await limiter.acquire(scope, 0)).allowed
        assert (await limiter.acquire(scope, 0)).reason == "rpm"
    run(lambda **kw: RedisRateLimiter(redis_url, prefix=prefix), body)


def test_instances_share_one_limit(redis_url: str, prefix: str) -> None:
    scope = [Scope("key:a", Limits(rpm=10))]

    async def main() -> list[bool]:
        limiters = [RedisRateLimiter(redis_url, prefix=prefix) for _ in range(3)]
        try:
            return [(await limiters[i % 3].acquire(scope, 0)).allowed for i in range(15)]
        finally:
            for limiter in limiters:
                await limiter.close()
    assert asyncio.run(main()) == [True] * 10 + [False] * 5


def test_password_is_masked() -> None:
    assert mask_url("redis://user:s3cret@cache:6379/0") == "redis://user:***@cache:6379/0"
    assert mask_url("rediss://:s3cret@cache/1?password=s3cret") == "rediss://:***@cache/1"
    assert mask_url("redis://cache:6379/0") == "redis://cache:6379/0"
