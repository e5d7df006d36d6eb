"""Redis outages on a private server: fail-open admits uncounted, fail-closed refuses with limiter_unavailable;
each outage logs one WARNING and one INFO, flips the up gauge, counts errors, and limits return with Redis."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from seekserve.gateway.principal import Limits
from seekserve.gateway.ratelimit import Scope
from seekserve.gateway.ratelimit_redis import RedisRateLimiter
from tests.services import RedisServer, free_port

LOGGER = "seekserve.gateway.ratelimit_redis"
SCOPE = [Scope("key:a", Limits(rpm=2))]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)   # in case a test stopped it mid-way
    server.stop()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == level]


async def admitted(limiter: RedisRateLimiter, n: int) -> list[bool]:
    return [(await limiter.acquire(SCOPE, 0)).allowed for _ in range(n)]


def test_fail_open_then_recover(server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    registry = CollectorRegistry()

    async def main() -> None:
        limiter = RedisRateLimiter(server.url, "open", registry=registry, retry_interval=0.05)
        assert await admitted(limiter, 3) == [True, True, False]
        server.stop()
        for _ in range(5):
            decision = await limiter.acquire(SCOPE, 0)
            assert decision.allowed and decision.headers == {} and not decision.lease.counted
            await limiter.finish(decision.lease, 0)
            await asyncio.sleep(0.02)
        assert not limiter.healthy and sample(registry, "seekserve:ratelimit_backend_up") == 0
        assert sample(registry, "seekserve:ratelimit_backend_errors_total") >= 2    # one per probe
        assert sample(registry, "seekserve:ratelimit_unchecked_total") == 5
        assert len(records(caplog, logging.WARNING)) == 1
        server.start()                      # a fresh, empty Redis on the same port
        await asyncio.sleep(0.06)
        assert await admitted(limiter, 3) == [True, True, False]
        assert limiter.healthy and sample(registry, "seekserve:ratelimit_backend_up") == 1
        assert len(records(caplog, logging.INFO)) == 1 and len(records(caplog, logging.WARNING)) == 1
        await limiter.close()
    asyncio.run(main())


def test_fail_closed_refuses_then_recovers(server: RedisServer) -> None:
    registry = CollectorRegistry()

    async def main() -> None:
        limiter = RedisRateLimiter(server.url, "closed", registry=registry, retry_interval=0.05)
        assert await admitted(limiter, 1) == [True]
        server.stop()
        refused = await limiter.acquire(SCOPE, 0)
        assert (refused.allowed, refused.reason, refused.retry_after) == (False, "limiter_unavailable", 1.0)
        assert refused.headers == {"retry-after": "1", "retry-after-ms": "1000"}
        assert sample(registry, "seekserve:ratelimit_rejections_total", reason="limiter_unavailable") == 1
        server.start()
        await asyncio.sleep(0.06)
        assert await admitted(limiter, 3) == [True, True, False]
        assert sample(registry, "seekserve:ratelimit_rejections_total", reason="rpm") == 1
        await limiter.close()
    asyncio.run(main())


def test_a_hung_redis_times_out_and_held_finishes_replay(server: RedisServer,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """SIGSTOP keeps Redis's data but stops its answers: calls time out instead of being refused."""
    scope = [Scope("key:a", Limits(max_concurrency=1))]

    async def main() -> None:
        limiter = RedisRateLimiter(server.url, "closed", timeout=0.1, retry_interval=0.05)
        held = await limiter.acquire(scope, 0)
        server.proc.send_signal(signal.SIGSTOP)
        started = asyncio.get_running_loop().time()
        await limiter.finish(held.lease, 0)           # cannot reach Redis: kept for later
        assert asyncio.get_running_loop().time() - started < 1.0 and not limiter.healthy
        assert (await limiter.acquire(scope, 0)).reason == "limiter_unavailable"
        server.proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.06)
        # Redis may run the finish still in its socket buffer, or the limiter replays it after the first
        # answer; either way the held slot is free again and exactly one of the two gets it
        decisions = [await limiter.acquire(scope, 0) for _ in range(2)]
        assert limiter.healthy and [d.allowed for d in decisions].count(True) == 1
        await limiter.close()
    asyncio.run(main())


def test_logs_never_show_the_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        limiter = RedisRateLimiter(f"redis://admin:hunter2@127.0.0.1:{free_port()}/0", "open")
        assert (await limiter.acquire(SCOPE, 0)).allowed
        await limiter.close()
    asyncio.run(main())
    (warning,) = records(caplog, logging.WARNING)
    assert "hunter2" not in warning.getMessage() and "admin:***@127.0.0.1" in warning.getMessage()
