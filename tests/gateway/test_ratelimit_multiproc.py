"""Two OS processes, each with its own RedisRateLimiter on one Redis and 16 asyncio clients hammering one scope,
admit together within 5 % of capacity + rate × elapsed, elapsed measured on Redis's clock."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import redis

# Runs in each process: learns Redis's clock offset, waits for the agreed start (Redis time), then lets
# `clients` tasks call acquire until the agreed end and prints how many it admitted.
WORKER = r"""
import asyncio, json, sys, time
import redis.asyncio as aioredis
from seekserve.gateway.principal import Limits
from seekserve.gateway.ratelimit import Scope
from seekserve.gateway.ratelimit_redis import RedisRateLimiter

url, prefix = sys.argv[1], sys.argv[2]
start, end, clients, rps = float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])

async def redis_offset(url):
    # Redis time minus local time, from the quickest of a few round trips
    client, best = aioredis.Redis.from_url(url), None
    for _ in range(5):
        t0 = time.time(); sec, usec = await client.time(); t1 = time.time()
        if best is None or t1 - t0 < best[0]:
            best = (t1 - t0, sec + usec / 1e6 - (t0 + t1) / 2)
    await client.aclose()
    return best[1]

async def main():
    offset = await redis_offset(url)
    # fail closed with generous timeouts: an error must never inflate the count it reports
    limiter = RedisRateLimiter(url, failure_mode="closed", prefix=prefix, timeout=5.0)
    scopes = [Scope("key:shared", Limits(rps=rps)), Scope("tenant:shared", Limits(rpm=1_000_000))]
    # open one connection per client and load the script before the start, so the start is sharp
    warmup = [Scope("key:warmup", Limits(rps=1000))]
    await asyncio.gather(*(limiter.acquire(warmup, 0) for _ in range(clients)))
    await asyncio.sleep(max(0.0, start - (time.time() + offset)))

    began = time.time() + offset

    async def client():
        admitted, attempts = 0, 0
        while time.time() + offset < end:
            admitted += (await limiter.acquire(scopes, 1)).allowed
            attempts += 1
        return admitted, attempts
    counts = await asyncio.gather(*(client() for _ in range(clients)))
    # began: when this process really started asking (Redis clock; a starved CPU wakes it late)
    print(json.dumps({"admitted": sum(c[0] for c in counts), "attempts": sum(c[1] for c in counts),
                      "healthy": limiter.healthy, "began": began, "overrun": time.time() + offset - end}))
    await limiter.close()

asyncio.run(main())
"""


def test_two_processes_share_one_limit(redis_url: str) -> None:
    rps, window, clients = 100.0, 2.0, 16
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    with redis.Redis.from_url(redis_url) as client:
        sec, usec = client.time()
    start = sec + usec / 1e6 + 2.0          # leaves both interpreters time to start and import
    args = [redis_url, prefix, repr(start), repr(start + window), str(clients), repr(rps)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert all(r["healthy"] for r in results)
    admitted = sum(r["admitted"] for r in results)
    # GCRA with a one-second burst: a fresh bucket admits rps at once, then rps per second, from the moment
    # the first process asked (normally `start`; later when the machine is busy) until the agreed end
    elapsed = start + window - min(r["began"] for r in results)
    expected = rps + rps * min(window, elapsed)
    assert all(r["admitted"] > 0 for r in results), results    # both replicas really took part
    assert sum(r["attempts"] for r in results) > 3 * expected, results   # demand kept the limit saturated
    assert abs(admitted - expected) <= 0.05 * expected, (admitted, expected, results)
