"""Rate limits per API key and per tenant (rps, rpm, tpm, concurrency): shared types, GCRA maths, headers and
the in-process limiter. Invariant: `acquire` checks every scope and commits all of them or none, and a lease is
reconciled and released at most once.

Algorithm: GCRA per (scope, kind), emission interval T = period / limit, burst tolerance = one whole period
(at least T). A fresh rpm=600 bucket admits 600 requests at once, then one every 100 ms; in any window of W
seconds it admits at most limit + limit * W / period. We allow a full period of burst so that `remaining` reads
as the configured limit at rest and a client that spends its minute at once is not punished; the price is that
a bursty client can get up to twice the limit inside one sliding minute. For tpm the cost is the request's
tokens (prompt + max_tokens reserved on admission; `finish` refunds or charges the difference)."""

from __future__ import annotations

import functools
import itertools
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter

from seekserve.gateway.errors import GatewayError
from seekserve.gateway.principal import Limits, Principal

RATE_KINDS: tuple[str, ...] = ("rps", "rpm", "tpm")
PERIOD_S: dict[str, float] = {"rps": 1.0, "rpm": 60.0, "tpm": 60.0}
# a conforming request may land this far past its slot through float rounding: 3 × (1/3 s) can exceed 1 s
SLACK_S = 1e-6
# nothing says when a concurrency slot frees, so a refused client is told to try again soon
CONCURRENCY_RETRY_S = 1.0
REASON_TOO_LARGE = "tpm_exceeds_limit"      # one request wants more tokens than a whole minute allows
REASON_UNAVAILABLE = "limiter_unavailable"  # the shared backend is down and failure_mode is "closed"


class Rate(NamedTuple):
    """One limited rate of a scope and its GCRA constants (the algorithm: this module's docstring)."""
    kind: str                    # rps | rpm | tpm
    limit: float
    interval: float              # seconds per request (or token)
    tolerance: float             # burst tolerance: one period, at least one interval
    capacity: int                # what a full bucket holds (x-ratelimit-remaining at rest)

    @classmethod
    def of(cls, kind: str, limit: float) -> Rate:
        interval = PERIOD_S[kind] / limit
        tolerance = max(PERIOD_S[kind], interval)
        return cls(kind, limit, interval, tolerance, math.floor(tolerance / interval + 1e-9))


@dataclass(frozen=True)
class Scope:
    key: str        # "key:key_ab12" or "tenant:acme": names the shared state, so it must be stable
    limits: Limits
    # each rate this scope limits, in RATE_KINDS order, with its GCRA constants; derived once from `limits`
    rates: tuple[Rate, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in (*RATE_KINDS, "max_concurrency"):
            value = getattr(self.limits, name)
            if value is not None and value <= 0:
                raise ValueError(f"scope {self.key}: {name} must be positive or None, not {value}")
        object.__setattr__(self, "rates", tuple(Rate.of(kind, limit) for kind in RATE_KINDS
                                                if (limit := getattr(self.limits, kind)) is not None))

    @property
    def is_limited(self) -> bool:
        return not self.limits.is_unlimited()


@dataclass
class Lease:
    """What `finish` needs: which scopes to reconcile and release, and how many tokens were reserved."""
    lease_id: str
    scopes: tuple[Scope, ...]
    tokens: int                  # reserved on admission
    acquired_at: float           # wall clock (time.time()), for logs and audit
    counted: bool = True         # False: the limiter holds nothing for it (fail-open, no tpm/concurrency)


class Decision(NamedTuple):
    allowed: bool
    retry_after: float           # seconds; 0 when allowed or when retrying cannot help
    headers: dict[str, str]      # x-ratelimit-* (and retry-after, retry-after-ms on refusal)
    reason: str | None           # rps | rpm | tpm | concurrency | tpm_exceeds_limit | limiter_unavailable
    lease: Lease | None          # set exactly when allowed; hand it to finish()


class Check(NamedTuple):
    """One bucket's verdict: wait > SLACK_S means it refused; remaining/reset as they stand afterwards."""
    kind: str                    # rps | rpm | tpm | concurrency
    limit: float
    wait: float                  # seconds until this request would conform
    remaining: int               # requests (or tokens) that could pass right now
    reset: float                 # seconds until the bucket is back to full


# a Check made without NamedTuple's Python-level __new__ (several per request)
_check = functools.partial(tuple.__new__, Check)


@runtime_checkable
class RateLimiter(Protocol):
    async def acquire(self, scopes: list[Scope], tokens: int) -> Decision: ...

    async def finish(self, lease: Lease, actual_tokens: int) -> None: ...

    async def close(self) -> None: ...

    @property
    def healthy(self) -> bool: ...


def scopes_for(principal: Principal, tenant_limits: Limits | None = None) -> list[Scope]:
    """The scopes a request is charged to: its key and, when the tenant has limits, its tenant."""
    return list(_scopes(principal.subject, principal.limits, principal.tenant, tenant_limits))


@functools.lru_cache(maxsize=65536)     # the same few keys ask again and again; Scope checks its limits
def _scopes(subject: str, limits: Limits, tenant: str, tenant_limits: Limits | None) -> tuple[Scope, ...]:
    scopes = [Scope(f"key:{subject}", limits)]
    if tenant_limits is not None:
        scopes.append(Scope(f"tenant:{tenant}", tenant_limits))
    return tuple(s for s in scopes if s.is_limited)


def check_request(scopes: list[Scope], tokens: int) -> None:
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, not {tokens}")
    if len(scopes) > 1:
        keys = [s.key for s in scopes]
        if len(set(keys)) != len(keys):
            raise ValueError(f"a scope appears twice in {keys}: it would be charged twice")


def too_large(scopes: list[Scope] | tuple[Scope, ...], tokens: int) -> bool:
    return any(s.limits.tpm is not None and tokens > s.limits.tpm for s in scopes)


# lease ids: a random prefix per process (leases of several replicas meet in Redis) and a counter
_LEASE_PREFIX = secrets.token_hex(6)
_lease_numbers = itertools.count(1)


def new_lease(scopes: list[Scope], tokens: int, counted: bool | None = None) -> Lease:
    """A fresh lease; counted unless nothing in it needs finishing (no tpm, no concurrency limit)."""
    if counted is None:
        counted = any(s.limits.tpm is not None or s.limits.max_concurrency is not None for s in scopes)
    return Lease(f"{_LEASE_PREFIX}{next(_lease_numbers):x}", tuple(scopes), tokens, time.time(), counted)


def format_duration(seconds: float) -> str:
    """OpenAI's reset format (Go durations, ms resolution): "120ms", "1s", "1.5s", "6m0s", "1h0m0s".
    Rounded up, so a client that waits this long finds the bucket reset."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest // 1000}" + (f".{rest % 1000:03d}".rstrip("0") if rest % 1000 else "") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    return f"{minutes}m{secs}" if minutes else secs


@functools.lru_cache(maxsize=1024)      # a handful of configured limits, formatted on every request
def _format_limit(limit: float) -> str:
    return str(int(limit)) if float(limit).is_integer() else f"{limit:.6g}"


_TRIO_NAMES = {what: tuple(f"x-ratelimit-{part}-{what}" for part in ("limit", "remaining", "reset"))
               for what in ("requests", "tokens")}


def _trio(what: str, check: Check) -> dict[str, str]:
    limit, remaining, reset = _TRIO_NAMES[what]
    return {limit: _format_limit(check.limit), remaining: str(check.remaining), reset: format_duration(check.reset)}


def rate_headers(checks: list[Check]) -> dict[str, str]:
    """x-ratelimit-* from the tightest request bucket (fewest remaining; rpm wins a tie) and the tightest tpm
    bucket; a trio is left out when nothing limits it. Of equally tight buckets the first listed wins."""
    requests = tokens = None
    for c in checks:
        if c.kind == "tpm":
            if tokens is None or (c.remaining, -c.reset) < (tokens.remaining, -tokens.reset):
                tokens = c
        elif c.kind != "concurrency" and (requests is None or (c.remaining, c.kind != "rpm", -c.reset)
                                          < (requests.remaining, requests.kind != "rpm", -requests.reset)):
            requests = c
    headers = _trio("requests", requests) if requests is not None else {}
    if tokens is not None:
        headers |= _trio("tokens", tokens)
    return headers


def retry_headers(retry_after: float) -> dict[str, str]:
    return {"retry-after": str(max(1, math.ceil(retry_after - 1e-9))),
            "retry-after-ms": str(max(1, math.ceil(retry_after * 1000 - 1e-6)))}


def decide(allowed: bool, checks: list[Check], scopes: list[Scope], tokens: int,
           lease: Lease | None) -> Decision:
    """The Decision for a verdict the backend has already committed (or not)."""
    headers = rate_headers(checks)
    if allowed:
        return Decision(True, 0.0, headers, None, lease)
    if too_large(scopes, tokens):
        # waiting never helps, so no retry-after: the client must ask for fewer tokens
        return Decision(False, 0.0, headers, REASON_TOO_LARGE, None)
    worst = max(checks, key=lambda c: c.wait)
    return Decision(False, worst.wait, headers | retry_headers(worst.wait), worst.kind, None)


_WHAT = {"rps": "requests per second", "rpm": "requests per minute", "tpm": "tokens per minute",
         "concurrency": "concurrent requests",
         REASON_TOO_LARGE: "tokens per minute (this request alone reserves more than the limit)"}


def refusal_error(decision: Decision) -> GatewayError:
    """The HTTP answer to a refusal: 503 when the limiter is down (fail-closed), 429 otherwise."""
    if decision.reason == REASON_UNAVAILABLE:
        return GatewayError(503, "Rate limiting is unavailable and this server refuses requests until it is "
                                 "back; retry shortly.", code="rate_limiter_unavailable",
                            headers=decision.headers)
    what = _WHAT.get(decision.reason or "", decision.reason or "rate")
    return GatewayError(429, f"Rate limit reached for {what}. Retry after {math.ceil(decision.retry_after)}s.",
                        code="rate_limit_exceeded", error_type="rate_limit_error", headers=decision.headers)


def rejections_counter(registry: CollectorRegistry | None) -> Counter:
    # a private registry when none is given: no metric is registered globally at import or construction
    return Counter("seekserve:ratelimit_rejections", "Requests refused by the rate limiter", ["reason"],
                   registry=registry if registry is not None else CollectorRegistry())


class InProcessRateLimiter:
    """The embedded-mode limiter: the same semantics as RedisRateLimiter for one process, under a lock."""

    SWEEP_EVERY = 1024  # acquires between sweeps of idle buckets and expired leases

    def __init__(self, *, lease_ttl: float = 600.0, clock: Callable[[], float] = time.monotonic,
                 registry: CollectorRegistry | None = None) -> None:
        self._lease_ttl, self._clock = lease_ttl, clock
        self._lock = threading.Lock()                    # acquire may be called from several threads
        self._tats: dict[str, dict[str, float]] = {}     # scope key → kind → theoretical arrival time
        self._slots: dict[str, dict[str, float]] = {}    # scope key → lease id → expiry
        self._leases: dict[str, float] = {}              # unfinished counted lease id → expiry
        self._num_acquires = 0
        self._rejections = rejections_counter(registry)

    @property
    def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        return None

    async def acquire(self, scopes: list[Scope], tokens: int) -> Decision:
        check_request(scopes, tokens)
        with self._lock:
            decision = self._acquire_locked(scopes, tokens, self._clock())
        if not decision.allowed:
            self._rejections.labels(decision.reason).inc()
        return decision

    def _acquire_locked(self, scopes: list[Scope], tokens: int, now: float) -> Decision:
        # GCRA (the module docstring), mirrored in Lua in ratelimit_redis.py: for each bucket, the theoretical
        # arrival time `tat`, and how long this request must wait to conform (<= SLACK_S: it conforms)
        self._num_acquires += 1
        if self._num_acquires % self.SWEEP_EVERY == 0:
            self._sweep(now)
        steps: list[tuple[dict[str, float] | None, Scope, Rate, float, float]] = []  # (tats, scope, rate, tat, wait)
        slots: list[tuple[int, int]] = []      # (max concurrency, slots in use) of each scope that has one
        conforming = True
        for scope in scopes:
            tats = self._tats.get(scope.key)
            for rate in scope.rates:
                stored = tats.get(rate.kind) if tats else None
                tat = now if stored is None or stored < now else stored
                wait = tat + (tokens if rate.kind == "tpm" else 1) * rate.interval - rate.tolerance - now
                if wait > SLACK_S:
                    conforming = False
                steps.append((tats, scope, rate, tat, wait))
            most = scope.limits.max_concurrency
            if most is not None:
                used = self._live_slots(scope.key, now)
                conforming = conforming and used < most
                slots.append((most, used))
        allowed = conforming and not too_large(scopes, tokens)
        checks: list[Check] = []
        for tats, scope, rate, tat, wait in steps:
            if allowed:
                tat += (tokens if rate.kind == "tpm" else 1) * rate.interval
                if tats is None:    # a scope's first request (or the first after a sweep): one dict per scope
                    tats = self._tats.setdefault(scope.key, {})
                tats[rate.kind] = tat
            # never more than a full bucket: with 10^10 tpm, SLACK_S alone spans 166 tokens
            remaining = math.floor((now + rate.tolerance - tat + SLACK_S) / rate.interval)
            remaining = max(0, min(remaining, rate.capacity))
            checks.append(_check((rate.kind, rate.limit, wait, remaining, tat - now if tat > now else 0.0)))
        lease = self._lease(scopes, tokens, now) if allowed else None
        checks += [Check("concurrency", m, 0.0 if n < m else CONCURRENCY_RETRY_S, m - n - int(allowed), 0.0)
                   for m, n in slots]
        return decide(allowed, checks, scopes, tokens, lease)

    def _live_slots(self, key: str, now: float) -> int:
        slots = self._slots.get(key, {})
        for lease_id in [i for i, expiry in slots.items() if expiry <= now]:
            del slots[lease_id]  # a lease never finished (its holder died) frees its slot at expiry
        return len(slots)

    def _lease(self, scopes: list[Scope], tokens: int, now: float) -> Lease:
        lease = new_lease(scopes, tokens)
        if lease.counted:
            expiry = now + self._lease_ttl
            self._leases[lease.lease_id] = expiry
            for scope in scopes:
                if scope.limits.max_concurrency is not None:
                    self._slots.setdefault(scope.key, {})[lease.lease_id] = expiry
        return lease

    async def finish(self, lease: Lease, actual_tokens: int) -> None:
        if actual_tokens < 0:
            raise ValueError(f"actual_tokens must be >= 0, not {actual_tokens}")
        if not lease.counted:
            return
        with self._lock:
            now = self._clock()
            expiry = self._leases.pop(lease.lease_id, None)
            if expiry is None or expiry <= now:
                return  # finished already, or expired: its slot was reclaimed and its reservation stands
            delta = actual_tokens - lease.tokens
            for scope in lease.scopes:
                self._slots.get(scope.key, {}).pop(lease.lease_id, None)
                if scope.limits.tpm is not None and delta:
                    tats = self._tats.setdefault(scope.key, {})
                    # refund (delta < 0) or charge: never below now, a full bucket holds no extra credit
                    tat = max(tats.get("tpm", now), now) + delta * PERIOD_S["tpm"] / scope.limits.tpm
                    tats["tpm"] = max(tat, now)

    def _sweep(self, now: float) -> None:
        """Forget buckets back at full (a missing bucket reads the same) and expired leases."""
        self._tats = {k: tats for k, tats in self._tats.items() if max(tats.values(), default=now) > now}
        self._slots = {k: slots for k, slots in self._slots.items() if self._live_slots(k, now)}
        self._leases = {i: expiry for i, expiry in self._leases.items() if expiry > now}
