"""The shared rate limiter: every replica runs the same Lua script on one Redis, so N replicas enforce one limit,
not N. Invariant: one acquire is one script, timed by Redis's own clock, that commits all scopes or none.

Keys (all with PEXPIRE, so idle state vanishes): `<prefix>b:<scope>` hash of GCRA theoretical arrival times
(fields rps, rpm, tpm), `<prefix>c:<scope>` zset of concurrency leases scored by expiry, `<prefix>l:<id>` the
lease itself (its deletion makes finish idempotent). All keys of one acquire must live on one Redis node: a
Redis Cluster would need the scopes hash-tagged together, which we do not do."""

from __future__ import annotations

import logging
import time
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from seekserve.gateway.ratelimit import (
    CONCURRENCY_RETRY_S,
    RATE_KINDS,
    REASON_UNAVAILABLE,
    SLACK_S,
    Check,
    Decision,
    Lease,
    Scope,
    check_request,
    decide,
    new_lease,
    rejections_counter,
    retry_headers,
)

log = logging.getLogger(__name__)

# ReadOnlyError: a replica answering after a failover; the built-in errors cover asyncio timeouts and sockets
BACKEND_ERRORS = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, ConnectionError, TimeoutError)

# Shared by both scripts: Redis TIME in µs counted from 2023-11-14 (1.7e9 s), which keeps the doubles Lua
# computes with exact to ~0.02 µs; counted from 1970 they would round to 0.25 µs.
_NOW_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = (tonumber(t[1]) - 1700000000) * 1000000 + tonumber(t[2])
local n = (#KEYS - 1) / 2
"""

# KEYS: per scope i, [2i-1] bucket hash and [2i] concurrency zset; last, the lease key.
# ARGV: lease id ('' = none), tokens, lease ttl µs, slack µs, then per scope rps, rpm, tpm, max concurrency
# ('' = unlimited). Returns {ok, then per scope: (wait µs, remaining, reset µs) × rps/rpm/tpm, slots in use}.
# The GCRA lines mirror InProcessRateLimiter._acquire_locked in ratelimit.py.
ACQUIRE_LUA = _NOW_LUA + """
local lease_id, tokens, ttl, slack = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local PERIOD = {1000000, 60000000, 60000000}
local FIELD = {'rps', 'rpm', 'tpm'}
local plan, counts, ok = {}, {}, true
for i = 1, n do
  local base = 4 + (i - 1) * 4
  local stored = redis.call('HMGET', KEYS[2 * i - 1], 'rps', 'rpm', 'tpm')
  plan[i] = {}
  for k = 1, 3 do
    local limit = tonumber(ARGV[base + k])
    if limit then
      local interval = PERIOD[k] / limit
      local tolerance = math.max(PERIOD[k], interval)
      local cost = 1
      if k == 3 then cost = tokens; if tokens > limit then ok = false end end
      local tat = math.max(tonumber(stored[k]) or now, now)
      local new_tat = tat + cost * interval
      local wait = new_tat - tolerance - now
      if wait > slack then ok = false end
      plan[i][k] = {interval, tolerance, tat, new_tat, wait}
    end
  end
  local max_conc = tonumber(ARGV[base + 4])
  if max_conc then
    redis.call('ZREMRANGEBYSCORE', KEYS[2 * i], '-inf', string.format('%.17g', now))
    counts[i] = redis.call('ZCARD', KEYS[2 * i])
    if counts[i] >= max_conc then ok = false end
  end
end
local out = {ok and 1 or 0}
for i = 1, n do
  local hkey, far, any = KEYS[2 * i - 1], now, false
  for k = 1, 3 do
    local p = plan[i][k]
    if p then
      local tat = p[3]
      if ok then tat = p[4]; redis.call('HSET', hkey, FIELD[k], string.format('%.17g', tat)); any = true end
      if tat > far then far = tat end
      out[#out + 1] = math.ceil(p[5])
      out[#out + 1] = math.max(0, math.min(math.floor(p[2] / p[1] + 1e-9), math.floor((now + p[2] - tat + slack) / p[1])))
      out[#out + 1] = math.ceil(tat - now)
    else
      out[#out + 1] = 0; out[#out + 1] = 0; out[#out + 1] = 0
    end
  end
  if any then redis.call('PEXPIRE', hkey, math.ceil((far - now) / 1000) + 1000) end
  if counts[i] and ok then
    redis.call('ZADD', KEYS[2 * i], string.format('%.17g', now + ttl), lease_id)
    redis.call('PEXPIRE', KEYS[2 * i], math.ceil(ttl / 1000) + 1000)
    counts[i] = counts[i] + 1
  end
  out[#out + 1] = counts[i] or 0
end
if ok and lease_id ~= '' then redis.call('SET', KEYS[#KEYS], tokens, 'PX', math.ceil(ttl / 1000)) end
return out
"""

# KEYS: the lease key, then per scope i [2i] bucket hash and [2i+1] concurrency zset.
# ARGV: lease id, token delta (actual - reserved), then per scope tpm ('' = none) and '1' if it holds a slot.
FINISH_LUA = _NOW_LUA + """
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
local lease_id, delta = ARGV[1], tonumber(ARGV[2])
for i = 1, n do
  local hkey = KEYS[2 * i]
  local tpm = tonumber(ARGV[1 + 2 * i])
  if tpm and delta ~= 0 then
    local stored = tonumber(redis.call('HGET', hkey, 'tpm')) or now
    local tat = math.max(math.max(stored, now) + delta * 60000000 / tpm, now)
    redis.call('HSET', hkey, 'tpm', string.format('%.17g', tat))
    local keep = math.max(redis.call('PTTL', hkey), math.ceil((tat - now) / 1000) + 1000)
    redis.call('PEXPIRE', hkey, keep)
  end
  if ARGV[2 + 2 * i] == '1' then redis.call('ZREM', KEYS[2 * i + 1], lease_id) end
end
return 1
"""


def mask_url(url: str) -> str:
    """The URL without its password (and without a query, where redis-py also accepts one)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc, query=""))


class BackendHealth:
    """Whether Redis answers. Logs one WARNING when it goes down and one INFO when it returns (not one per
    request); while down, lets one call per `retry_interval` probe it, so a dead Redis costs at most one
    timeout per interval instead of one per request."""

    def __init__(self, where: str, failure_mode: str, registry: CollectorRegistry,
                 retry_interval: float) -> None:
        self.where, self.failure_mode, self.retry_interval = where, failure_mode, retry_interval
        self.is_up, self._next_probe = True, 0.0
        self.errors = Counter("seekserve:ratelimit_backend_errors", "Rate-limiter backend calls that failed",
                              registry=registry)
        self.up_gauge = Gauge("seekserve:ratelimit_backend_up", "1 while the rate-limiter backend answers",
                              registry=registry)
        self.up_gauge.set(1)

    def should_try(self) -> bool:
        return self.is_up or time.monotonic() >= self._next_probe

    def failed(self, exc: BaseException, secret: str | None) -> None:
        self.errors.inc()
        self._next_probe = time.monotonic() + self.retry_interval
        if self.is_up:
            self.is_up = False
            self.up_gauge.set(0)
            detail = f"{type(exc).__name__}: {exc}"
            if secret:
                detail = detail.replace(secret, "***")
            log.warning("rate limiter backend %s unreachable (%s); failing %s until it returns",
                        self.where, detail, self.failure_mode)

    def succeeded(self) -> bool:
        """Record an answer; True when this answer ends an outage."""
        if self.is_up:
            return False
        self.is_up = True
        self.up_gauge.set(1)
        log.info("rate limiter backend %s is back; limits enforced again", self.where)
        return True


class RedisRateLimiter:
    """GCRA limits shared by every replica through one Redis (see ratelimit.py for the algorithm)."""

    MAX_PENDING_FINISHES = 10_000  # finishes kept through an outage, replayed when Redis returns

    def __init__(self, url: str, failure_mode: Literal["open", "closed"] = "open", prefix: str = "seekserve:rl:",
                 lease_ttl: float = 600.0, registry: CollectorRegistry | None = None, *,
                 timeout: float = 0.25, retry_interval: float = 0.5) -> None:
        if failure_mode not in ("open", "closed"):
            raise ValueError(f"failure_mode must be 'open' or 'closed', not {failure_mode!r}")
        self.failure_mode, self.prefix, self.lease_ttl = failure_mode, prefix, lease_ttl
        # short timeouts and a single retry (it reconnects a pooled socket that a Redis restart closed):
        # redis-py's default of 10 retries with backoff would stall every request while Redis is away
        self._redis = aioredis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                              retry=Retry(NoBackoff(), 1), decode_responses=True)
        self._acquire_script = self._redis.register_script(ACQUIRE_LUA)  # EVALSHA, reloaded on NOSCRIPT
        self._finish_script = self._redis.register_script(FINISH_LUA)
        self._secret = urlsplit(url).password
        registry = registry if registry is not None else CollectorRegistry()
        self._health = BackendHealth(mask_url(url), failure_mode, registry, retry_interval)
        self._rejections = rejections_counter(registry)
        self._unchecked = Counter("seekserve:ratelimit_unchecked", "Requests admitted unchecked (fail-open)",
                                  registry=registry)
        self._pending: list[tuple[Lease, int]] = []

    @property
    def healthy(self) -> bool:
        return self._health.is_up

    async def close(self) -> None:
        await self._redis.aclose()

    async def acquire(self, scopes: list[Scope], tokens: int) -> Decision:
        check_request(scopes, tokens)
        scopes = [s for s in scopes if s.is_limited]    # an unlimited scope has no state to read or write
        if not scopes:
            return Decision(True, 0.0, {}, None, new_lease(scopes, tokens, counted=False))
        if not self._health.should_try():
            return self._degraded(scopes, tokens)
        lease = new_lease(scopes, tokens)
        keys = [k for s in scopes for k in self._scope_keys(s)] + [self._lease_key(lease.lease_id)]
        args: list[str | int | float] = [lease.lease_id if lease.counted else "", tokens,
                                         round(self.lease_ttl * 1e6), SLACK_S * 1e6]
        for scope in scopes:
            args += [_arg(getattr(scope.limits, kind)) for kind in (*RATE_KINDS, "max_concurrency")]
        try:
            reply = await self._acquire_script(keys=keys, args=args)
        except BACKEND_ERRORS as exc:
            self._health.failed(exc, self._secret)
            return self._degraded(scopes, tokens)
        await self._answered()
        decision = self._decision(reply, scopes, tokens, lease)
        if not decision.allowed:
            self._rejections.labels(decision.reason).inc()
        return decision

    def _decision(self, reply: list[int], scopes: list[Scope], tokens: int, lease: Lease) -> Decision:
        allowed, checks = bool(reply[0]), []
        for i, scope in enumerate(scopes):
            base = 1 + i * 10
            for k, kind in enumerate(RATE_KINDS):
                limit = getattr(scope.limits, kind)
                if limit is not None:
                    wait_us, remaining, reset_us = reply[base + 3 * k: base + 3 * k + 3]
                    checks.append(Check(kind, limit, wait_us / 1e6, remaining, reset_us / 1e6))
            limit = scope.limits.max_concurrency
            if limit is not None:
                in_use = reply[base + 9]
                is_full = not allowed and in_use >= limit
                checks.append(Check("concurrency", limit, CONCURRENCY_RETRY_S if is_full else 0.0,
                                    limit - in_use, 0.0))
        return decide(allowed, checks, scopes, tokens, lease if allowed else None)

    def _degraded(self, scopes: list[Scope], tokens: int) -> Decision:
        """The answer while Redis is unreachable: admit uncounted (open) or refuse (closed)."""
        if self.failure_mode == "open":
            self._unchecked.inc()
            return Decision(True, 0.0, {}, None, new_lease(scopes, tokens, counted=False))
        self._rejections.labels(REASON_UNAVAILABLE).inc()
        return Decision(False, 1.0, retry_headers(1.0), REASON_UNAVAILABLE, None)

    async def finish(self, lease: Lease, actual_tokens: int) -> None:
        if actual_tokens < 0:
            raise ValueError(f"actual_tokens must be >= 0, not {actual_tokens}")
        if not lease.counted:
            return
        if not self._health.should_try() or not await self._finish_once(lease, actual_tokens):
            # kept for when Redis returns; if it never does, the lease key and slots expire by their TTL
            if len(self._pending) < self.MAX_PENDING_FINISHES:
                self._pending.append((lease, actual_tokens))
            return
        await self._answered()

    async def _finish_once(self, lease: Lease, actual_tokens: int) -> bool:
        keys = [self._lease_key(lease.lease_id)] + [k for s in lease.scopes for k in self._scope_keys(s)]
        args: list[str | int] = [lease.lease_id, actual_tokens - lease.tokens]
        for scope in lease.scopes:
            args += [_arg(scope.limits.tpm), "1" if scope.limits.max_concurrency is not None else ""]
        try:
            await self._finish_script(keys=keys, args=args)
        except BACKEND_ERRORS as exc:
            self._health.failed(exc, self._secret)
            return False
        return True

    async def _answered(self) -> None:
        """After any call Redis answered: end an outage, then replay the finishes it held back."""
        self._health.succeeded()
        while self._pending:
            lease, actual_tokens = self._pending.pop()
            if not await self._finish_once(lease, actual_tokens):
                self._pending.append((lease, actual_tokens))
                return

    def _scope_keys(self, scope: Scope) -> tuple[str, str]:
        return f"{self.prefix}b:{scope.key}", f"{self.prefix}c:{scope.key}"

    def _lease_key(self, lease_id: str) -> str:
        return f"{self.prefix}l:{lease_id}"


def _arg(limit: float | None) -> str:
    return "" if limit is None else repr(limit)
