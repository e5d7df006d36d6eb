"""Routing policy: declarative rules pick an ordered list of backends per request; the Router walks it
with retries, circuit breakers and fallback. Invariant: a request above `public` sensitivity (or flagged
sensitive) never reaches a backend marked remote, whatever the rules say and whatever fails."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from seekserve.backends.base import Backend, BackendError, Chunk, GenerationRequest
from seekserve.gateway.errors import GatewayError
from seekserve.gateway.resilience import (
    BreakerConfig,
    CircuitBreaker,
    RetryPolicy,
    aclose_stream,
    as_backend_error,
    is_backend_fault,
    is_busy,
    open_stream,
    retry_after_header,
    retry_delay,
)
from seekserve.metric_children import child

ROUTE_HEADER = "x-seekserve-backend"
# the sensitivity levels by name, as gateway.sensitivity.Level numbers them (compared by value)
LEVELS: dict[str, int] = {"public": 0, "internal": 1, "confidential": 2}
SensitivityName = Literal["public", "internal", "confidential"]
TierName = Literal["vip", "standard", "batch"]


@dataclass(frozen=True)
class BackendEntry:
    name: str
    backend: Backend
    remote: bool                                   # data leaves our domain: never for sensitive requests
    queue_depth: Callable[[], int] | None = None   # local engines: requests waiting, for overflow rules
    # an in-process engine queues requests on purpose (a batch-tier request may wait minutes for a slot):
    # first_chunk_timeout is a stall detector for HTTP upstreams only. Nor is its first chunk awaited before
    # committing: its start() already refuses what it cannot serve, and a streamed response must begin
    # (headers, then SSE keep-alives) while the request waits in the queue
    in_process: bool = False


@dataclass(frozen=True)
class RouteContext:
    model: str
    tenant: str
    tier: str
    level: int            # sensitivity level (gateway.sensitivity.Level or its int value)
    sensitive: bool       # flagged by the classifier (PII found, tenant policy, header)
    prompt_chars: int

    @property
    def is_local_only(self) -> bool:
        return self.sensitive or int(self.level) > LEVELS["public"]


@dataclass(frozen=True)
class RoutePlan:
    rule: str
    candidates: list[str]          # in the order they will be tried; never a remote one if local-only
    overflowed: bool = False       # the rule's overflow targets were put first


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouteMatch(_Strict):
    """Every field set must match (AND); None matches anything. Models and tenants take glob patterns."""
    models: list[str] | None = Field(None, min_length=1)
    tenants: list[str] | None = Field(None, min_length=1)
    sensitivity: list[SensitivityName] | None = Field(None, min_length=1)
    tiers: list[TierName] | None = Field(None, min_length=1)
    min_prompt_chars: int | None = Field(None, ge=0)
    max_prompt_chars: int | None = Field(None, ge=0)

    _levels: frozenset[int] = PrivateAttr(frozenset())     # `sensitivity` as level numbers, for matches()

    def model_post_init(self, context: Any, /) -> None:
        self._levels = frozenset(LEVELS[n] for n in self.sensitivity or ())

    @model_validator(mode="after")
    def _bounds(self) -> RouteMatch:
        lo, hi = self.min_prompt_chars, self.max_prompt_chars
        if lo is not None and hi is not None and lo > hi:
            raise ValueError("min_prompt_chars is above max_prompt_chars")
        return self

    def matches(self, ctx: RouteContext) -> bool:
        tier = getattr(ctx.tier, "value", ctx.tier)   # a principal.Tier or its name
        return ((self.models is None or any(fnmatchcase(ctx.model, p) for p in self.models))
                and (self.tenants is None or any(fnmatchcase(ctx.tenant, p) for p in self.tenants))
                and (self.sensitivity is None or int(ctx.level) in self._levels)
                and (self.tiers is None or tier in self.tiers)
                and (self.min_prompt_chars is None or ctx.prompt_chars >= self.min_prompt_chars)
                and (self.max_prompt_chars is None or ctx.prompt_chars <= self.max_prompt_chars))


class Overflow(_Strict):
    """When `backend`'s queue holds more than `when_queue_above` waiting requests, try `to` first."""
    when_queue_above: int = Field(ge=0)
    backend: str | None = None       # the watched local backend; default: the rule's first backend
    to: list[str] = Field(min_length=1)


class RouteRule(_Strict):
    name: str = Field(min_length=1)
    match: RouteMatch = Field(default_factory=RouteMatch)
    backends: list[str] = Field(min_length=1)     # first preferred, the rest are fallbacks in order
    overflow: Overflow | None = None


def default_rules(local_name: str, remote_names: list[str] | tuple[str, ...] = ()) -> list[RouteRule]:
    """Everything local unless remotes are named: then public traffic may fall back to them (local still
    preferred). Cloud overflow and cloud-first routing are never defaults; configure them explicitly."""
    return [
        RouteRule(name="sensitive-local", match=RouteMatch(sensitivity=["internal", "confidential"]),
                  backends=[local_name]),
        RouteRule(name="public", match=RouteMatch(sensitivity=["public"]),
                  backends=[local_name, *remote_names]),
        RouteRule(name="default", backends=[local_name]),
    ]


class RouterMetrics:
    """The router's series on a registry; breaker states are read at scrape time, so an open breaker
    that has become half-open by the passing of time shows so without a request."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("seekserve:backend_requests", "Backend attempts by outcome "
                                "(ok, error, retry, fallback)", ["backend", "rule", "outcome"], registry=registry)
        self.retries = Counter("seekserve:backend_retries", "Retries on the same backend", ["backend"],
                               registry=registry)
        self.decisions = Counter("seekserve:route_decisions", "Requests committed to a backend by rule "
                                 "(backend=none: every candidate failed)", ["rule", "backend"], registry=registry)
        self.breaker_state = Gauge("seekserve:circuit_breaker_state", "Circuit breaker state "
                                   "(0 closed, 1 half-open, 2 open)", ["backend"], registry=registry)

    def watch(self, breaker: CircuitBreaker) -> None:
        self.breaker_state.labels(backend=breaker.name).set_function(lambda: float(breaker.state))


class _Skipped:
    """A backend not tried at all (breaker open, not ready)."""


_SKIPPED = _Skipped()
_Opened = tuple[AsyncIterator[Chunk], Chunk | None]


class Router:
    def __init__(self, entries: list[BackendEntry], rules: list[RouteRule], retry: RetryPolicy | None = None,
                 breaker_config: BreakerConfig | None = None, registry: CollectorRegistry | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: random.Random | None = None) -> None:
        self.entries = {e.name: e for e in entries}
        if len(self.entries) != len(entries):
            raise ValueError("backend names must be unique")
        self.rules, self.retry = list(rules), retry or RetryPolicy()
        breaker_config = breaker_config or BreakerConfig()
        self._validate_rules()
        self.breakers = {e.name: CircuitBreaker(e.name, breaker_config.failure_threshold,
                                                breaker_config.reset_timeout, clock) for e in entries}
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = RouterMetrics(self.registry)
        for breaker in self.breakers.values():
            self.metrics.watch(breaker)
        self._sleep, self._rng = sleep, rng or random.Random()

    def _validate_rules(self) -> None:
        if len({r.name for r in self.rules}) != len(self.rules):
            raise ValueError("route rule names must be unique (they label metrics and headers)")
        for rule in self.rules:
            overflow = rule.overflow
            named = [*rule.backends, *(overflow.to if overflow else [])]
            if overflow and overflow.backend:
                named.append(overflow.backend)
            for name in named:
                if name not in self.entries:
                    raise ValueError(f"route rule {rule.name!r} names unknown backend {name!r}")
            if overflow and self.entries[overflow.backend or rule.backends[0]].queue_depth is None:
                raise ValueError(f"route rule {rule.name!r} watches the queue of "
                                 f"{overflow.backend or rule.backends[0]!r}, which reports none")

    # -- planning -----------------------------------------------------------------------------
    def plan(self, ctx: RouteContext) -> RoutePlan:
        rule = next((r for r in self.rules if r.match.matches(ctx)), None)
        if rule is None:
            raise GatewayError(503, "no routing rule matches this request", code="no_route",
                               error_type="service_unavailable_error")
        names, overflowed = self._ordered(rule)
        serving = {name for name, entry in self.entries.items() if self._serves(entry, ctx.model)}
        if not serving:
            raise GatewayError(404, f"The model `{ctx.model}` does not exist or you do not have access to it.",
                               code="model_not_found", error_type="invalid_request_error", param="model")
        if ctx.is_local_only:
            # enforced here, not trusted to the rules: a misconfigured rule must not leak data
            names = [n for n in names if not self.entries[n].remote]
            if not names:
                raise GatewayError(503, "no local backend is available for this sensitive request",
                                   code="no_local_backend", error_type="service_unavailable_error")
        names = [n for n in names if n in serving]
        if not names:
            raise GatewayError(503, f"no backend of route {rule.name!r} that may take this request serves "
                               f"model `{ctx.model}`", code="model_unavailable",
                               error_type="service_unavailable_error")
        return RoutePlan(rule.name, names, overflowed)

    def _ordered(self, rule: RouteRule) -> tuple[list[str], bool]:
        names, overflow = list(rule.backends), rule.overflow
        overflowed = False
        if overflow is not None:
            depth = self.entries[overflow.backend or rule.backends[0]].queue_depth
            overflowed = depth is not None and depth() > overflow.when_queue_above
            if overflowed:
                names = [*overflow.to, *names]
        return list(dict.fromkeys(names)), overflowed   # de-duplicated, first mention wins

    @staticmethod
    def _serves(entry: BackendEntry, model: str) -> bool:
        return any(m.id == model for m in entry.backend.models())

    # -- serving ------------------------------------------------------------------------------
    async def start(self, ctx: RouteContext, request: GenerationRequest) -> tuple[str, str, Committed]:
        """Open the request on the first candidate that answers; returns (backend, rule, stream). Nothing
        has reached the client before this returns, which is why retry and fallback end here."""
        plan = self.plan(ctx)
        last_error: BackendError | None = None
        for i, name in enumerate(plan.candidates):
            result = await self._try_backend(self.entries[name], plan.rule, request, ctx.is_local_only)
            if isinstance(result, tuple):
                child(self.metrics.decisions, plan.rule, name).inc()
                return name, plan.rule, Committed(self, name, plan.rule, *result)
            if isinstance(result, BackendError):
                last_error = result
                outcome = "fallback" if i < len(plan.candidates) - 1 else "error"
                child(self.metrics.requests, name, plan.rule, outcome).inc()
        child(self.metrics.decisions, plan.rule, "none").inc()
        if last_error is not None:
            raise last_error
        raise self._all_skipped(plan)

    def _all_skipped(self, plan: RoutePlan) -> GatewayError:
        waits = [self.breakers[n].retry_in() for n in plan.candidates]
        return GatewayError(503, f"no backend can take this request now (tried: {', '.join(plan.candidates)}; "
                            "circuit open or not ready)", code="backends_unavailable",
                            error_type="service_unavailable_error", headers=retry_after_header(min(waits)))

    def _guard(self, entry: BackendEntry, local_only: bool) -> None:
        # the last line of defence, right before data leaves: plan() already removed remote entries
        if local_only and entry.remote:
            raise GatewayError(503, "no local backend is available for this sensitive request",
                               code="no_local_backend", error_type="service_unavailable_error")

    async def _try_backend(self, entry: BackendEntry, rule: str, request: GenerationRequest,
                           local_only: bool) -> _Opened | BackendError | _Skipped:
        """Up to `max_attempts` tries on one backend: the opened stream, the error to fall back on, or
        _SKIPPED. A client error (the request itself is wrong) is raised: no other backend would take it."""
        breaker, error = self.breakers[entry.name], None
        for attempt in range(1, self.retry.max_attempts + 1):
            self._guard(entry, local_only)
            if not entry.backend.is_ready() or not breaker.allow():
                return error or _SKIPPED
            try:
                opened = await open_stream(entry.backend, request,
                                           None if entry.in_process else self.retry.first_chunk_timeout,
                                           peek=not entry.in_process)
            except Exception as e:
                if not is_backend_fault(e):
                    breaker.release()
                    child(self.metrics.requests, entry.name, rule, "error").inc()
                    raise
                if is_busy(e):
                    breaker.release()    # a full queue is load, not failure: fall back, keep the circuit closed
                else:
                    breaker.record_failure()
                error = as_backend_error(entry.name, e, self.retry)
            except BaseException:
                breaker.release()     # cancelled: says nothing about the backend
                raise
            else:
                breaker.record_success()
                return opened
            delay = retry_delay(error, attempt, self.retry, self._rng)
            if delay is None:
                return error
            child(self.metrics.requests, entry.name, rule, "retry").inc()
            child(self.metrics.retries, entry.name).inc()
            await self._sleep(delay)
        return error or _SKIPPED


class Committed:
    """The stream a request was committed to: the peeked first chunk, then the rest. A failure from here on
    reaches the client as is: bytes may have been sent, so replaying elsewhere could duplicate output.

    Read it as an async iterator, or (the gateway pipeline, which saves a layer per chunk) take `first` and
    `stream` and report through `failed()` and `aclose()` itself: the breaker learns of backend faults, and
    the outcome is counted once, "ok" unless it failed (a client closing it early is no fault)."""

    __slots__ = ("_closed", "_failed", "_router", "first", "name", "rule", "stream")

    def __init__(self, router: Router, name: str, rule: str, stream: AsyncIterator[Chunk],
                 first: Chunk | None) -> None:
        self._router, self.name, self.rule, self.stream, self.first = router, name, rule, stream, first
        self._failed = self._closed = False

    def failed(self, e: BaseException) -> None:
        if self._failed:
            return
        self._failed = True
        if is_backend_fault(e):
            self._router.breakers[self.name].record_failure()
        child(self._router.metrics.requests, self.name, self.rule, "error").inc()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await aclose_stream(self.stream)
        finally:
            if not self._failed:
                child(self._router.metrics.requests, self.name, self.rule, "ok").inc()

    def __aiter__(self) -> Committed:
        return self

    async def __anext__(self) -> Chunk:
        first = self.first
        if first is not None:
            self.first = None
            return first
        try:
            return await self.stream.__anext__()
        except StopAsyncIteration:
            await self.aclose()
            raise
        except Exception as e:
            self.failed(e)
            await self.aclose()
            raise
