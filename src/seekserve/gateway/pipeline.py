"""The gateway pipeline of one inference call, after authentication and RBAC (route dependencies):
rate-limit → classify sensitivity → response cache → route → meter/audit. Each step is one small method;
`admit` returns the chunk streams and the response headers, and the wrapped streams settle the call
(limits reconciled, usage and audit written, the cache filled) however they end."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field

from seekserve.backends.base import BackendError, Chunk, GenerationRequest
from seekserve.gateway.cache import (
    CachedResponse,
    CachePolicy,
    ResponseCache,
    cache_key,
    parse_cache_control,
    should_cache,
)
from seekserve.gateway.errors import GatewayError
from seekserve.gateway.principal import Limits, Principal
from seekserve.gateway.ratelimit import Decision, Lease, RateLimiter, refusal_error, scopes_for
from seekserve.gateway.routing import Committed, RouteContext, Router
from seekserve.gateway.sensitivity import Classification, Level, SensitivityClassifier
from seekserve.gateway.usage import DEFAULT_PRICES, Price, RecordWriter, cost_usd
from seekserve.store.audit import AuditEvent
from seekserve.store.usage import UsageRecord

log = logging.getLogger("seekserve.gateway")
PUBLIC = Classification(level=Level.public, findings=(), reasons=())


class Deferred:
    """Calls whose settling waits until their response is sent: usage, audit and the limiter's reconciling
    are not the client's business, so the API's endpoint settles them after the last byte went out (still
    inside the request, so drain waits for them and a test client sees them done). A call whose streams end
    after `settle_deferred` (a stream dropped unclosed, finalised later) settles on the spot."""

    __slots__ = ("calls", "open")

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.open = True


_deferred: ContextVar[Deferred | None] = ContextVar("seekserve_deferred_settling", default=None)


@dataclass
class Admission:
    streams: list[AsyncIterator[Chunk]]
    headers: dict[str, str]


@dataclass
class _Call:
    """What one call has used so far; settled once, when the last of its streams ends."""
    principal: Principal
    requests: list[GenerationRequest]
    endpoint: str
    lease: Lease | None
    classification: Classification
    started: float = field(default_factory=time.perf_counter)
    backend: str = ""
    rule: str = ""
    cache_hit: bool = False
    open_streams: int = 0
    inner: list[AsyncIterator[Chunk]] = field(default_factory=list)   # backend streams, for cleanup
    status: int = 200
    prompt: dict[int, tuple[int, int]] = field(default_factory=dict)     # source -> (prompt, cached)
    output: dict[tuple[int, int], int] = field(default_factory=dict)     # (source, choice) -> tokens
    settled: bool = False

    def count(self, source: int, chunk: Chunk) -> None:
        """The chunk's running token counts (a stream cut short still has its latest)."""
        self.prompt[source] = (chunk.num_prompt_tokens, chunk.num_cached_tokens)
        self.output[(source, chunk.index)] = chunk.num_output_tokens

    def tokens(self) -> tuple[int, int, int]:
        prompt = sum(p for p, _ in self.prompt.values())
        return prompt, sum(c for _, c in self.prompt.values()), sum(self.output.values())


class Gateway:
    def __init__(self, limiter: RateLimiter, writer: RecordWriter, router: Router,
                 classifier: SensitivityClassifier | None = None,
                 cache: ResponseCache | None = None, cache_policy: CachePolicy | None = None,
                 tenant_limits: Mapping[str, Limits] | None = None, prices: Mapping[str, Price] | None = None,
                 default_max_tokens: int = 1024, site: str = "local") -> None:
        self.limiter, self.writer, self.router = limiter, writer, router
        self.classifier, self.cache = classifier, cache
        self.cache_policy = cache_policy or CachePolicy(enabled=cache is not None)
        self.tenant_limits = dict(tenant_limits or {})
        self.prices = {**DEFAULT_PRICES, **(prices or {})}
        self.default_max_tokens, self.site = default_max_tokens, site

    # -- settling after the response ----------------------------------------------------------------
    @staticmethod
    def defer_settling() -> Deferred:
        """From here on in this task (and tasks it starts), calls settle at `settle_deferred`."""
        deferred = Deferred()
        _deferred.set(deferred)
        return deferred

    async def settle_deferred(self, deferred: Deferred) -> None:
        """Settle the calls held back. The answer is out: a call that fails to settle is logged, and the
        others still settle."""
        deferred.open = False
        for call in deferred.calls:
            try:
                await self.settle(call)
            except Exception:   # after the response there is no one else to tell
                log.exception("settling %s failed", call.requests[0].request_id)
        deferred.calls.clear()

    # -- the pipeline ------------------------------------------------------------------------------
    async def admit(self, principal: Principal, requests: list[GenerationRequest], headers: Mapping[str, str],
                    endpoint: str) -> Admission:
        classification = self.classify(principal, requests, headers)
        decision = await self.rate_limit(principal, requests)
        call = _Call(principal, requests, endpoint, decision.lease, classification)
        out_headers = dict(decision.headers)
        try:
            streams = [await self.start_one(call, i, r, headers) for i, r in enumerate(requests)]
        except (BackendError, GatewayError) as e:
            call.status = e.status
            for inner in call.inner:     # prompts already started (a later one failed): stop them
                aclose = getattr(inner, "aclose", None)
                if aclose is not None:
                    await aclose()
            await self.settle(call)
            raise
        out_headers["x-seekserve-backend"] = call.backend
        if call.rule:
            out_headers["x-seekserve-route"] = call.rule
        out_headers["x-seekserve-cache"] = "hit" if call.cache_hit else ("miss" if self.cache is not None else "off")
        out_headers["x-seekserve-data-classification"] = classification.level.name
        return Admission(streams, out_headers)

    def classify(self, principal: Principal, requests: list[GenerationRequest],
                 headers: Mapping[str, str]) -> Classification:
        if self.classifier is None:
            return PUBLIC
        texts = [t for r in requests for t in _texts(r)]
        return self.classifier.classify(texts, principal.tenant, headers.get("x-data-classification"))

    async def rate_limit(self, principal: Principal, requests: list[GenerationRequest]) -> Decision:
        scopes = scopes_for(principal, self.tenant_limits.get(principal.tenant))
        if not scopes:
            return Decision(allowed=True, retry_after=0.0, headers={}, reason=None, lease=None)
        decision = await self.limiter.acquire(scopes, sum(_reservation(r, self.default_max_tokens) for r in requests))
        if not decision.allowed:
            raise refusal_error(decision)
        return decision

    async def start_one(self, call: _Call, source: int, request: GenerationRequest,
                        headers: Mapping[str, str]) -> AsyncIterator[Chunk]:
        read, write, key = self._cache_plan(call, request, headers)
        if read and key is not None and self.cache is not None:
            hit = await self.cache.get(key)
            if hit is not None:
                call.cache_hit, call.backend = True, "cache"
                call.open_streams += 1
                return self._settling(call, source, _replay(hit), None)
        ctx = RouteContext(model=request.model, tenant=call.principal.tenant, tier=call.principal.tier.value,
                           level=int(call.classification.level), sensitive=call.classification.sensitive,
                           prompt_chars=sum(len(t) for t in _texts(request)))
        call.backend, call.rule, stream = await self.router.start(ctx, request)
        call.open_streams += 1
        call.inner.append(stream)
        return self._settling(call, source, stream, key if write else None)

    def _cache_plan(self, call: _Call, request: GenerationRequest,
                    headers: Mapping[str, str]) -> tuple[bool, bool, str | None]:
        if self.cache is None:
            return False, False, None
        directives = parse_cache_control(headers.get("cache-control"))
        read, write = should_cache(self.cache_policy, request.params, directives, call.classification.sensitive,
                                   call.principal.tenant, stream_features=False)
        if not (read or write):
            return False, False, None
        try:
            return read, write, cache_key(call.principal.tenant, request)
        except ValueError:      # a value with no canonical JSON form: simply not cacheable
            return False, False, None

    async def _settling(self, call: _Call, source: int, stream: AsyncIterator[Chunk] | Committed,
                        cache_key_: str | None) -> AsyncIterator[Chunk]:
        """The chunks, counted (and kept for the cache); the call settles when its last stream ends. A routed
        stream is read through its parts (the router's own reader would be one more step per chunk)."""
        seen: list[Chunk] = []
        committed = stream if type(stream) is Committed else None
        try:
            if committed is not None:
                first, committed.first = committed.first, None
                if first is not None:
                    call.count(source, first)
                    if cache_key_ is not None:
                        seen.append(first)
                    yield first
                chunks: AsyncIterator[Chunk] = committed.stream
            else:
                chunks = stream
            async for chunk in chunks:
                call.count(source, chunk)
                if cache_key_ is not None:
                    seen.append(chunk)
                yield chunk
        except Exception as e:
            if committed is not None:
                committed.failed(e)
            # the backend's or the gateway's own answer; anything else is a bug: the server failed
            call.status = e.status if isinstance(e, (BackendError, GatewayError)) else 500
            raise
        except BaseException:
            call.status = 499 if call.status == 200 else call.status   # cancelled: the client went away
            raise
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
            call.open_streams -= 1
            if cache_key_ is not None and call.status == 200:
                await self._store(cache_key_, seen, call.requests[source])
            if call.open_streams == 0:
                deferred = _deferred.get()
                if deferred is not None and deferred.open:
                    deferred.calls.append(call)
                else:
                    await self.settle(call)

    async def _store(self, key: str, chunks: list[Chunk], request: GenerationRequest) -> None:
        assert self.cache is not None
        try:
            value = CachedResponse.from_chunks(chunks, request.model, n=request.params.n)
        except ValueError:
            return   # cut short (no finish reason on some choice): never cached
        await self.cache.put(key, value, self.cache_policy.ttl)

    async def settle(self, call: _Call) -> None:
        """Reconcile the token reservation and write usage + audit; exactly once per call."""
        if call.settled:
            return
        call.settled = True
        prompt, cached, completion = call.tokens()
        if call.lease is not None:
            await self.limiter.finish(call.lease, 0 if call.cache_hit else prompt + completion)
        p = call.principal
        model = call.requests[0].model
        latency_ms = (time.perf_counter() - call.started) * 1000
        price = None if call.cache_hit or call.backend == "local" else self.prices.get(model)
        self.writer.add_usage(UsageRecord(
            site=self.site, request_id=call.requests[0].request_id, key_id=p.subject,
            tenant=p.tenant, model=model, backend=call.backend or "none", prompt_tokens=prompt,
            cached_tokens=cached, completion_tokens=completion, cost_usd=cost_usd(price, prompt, cached, completion),
            status=call.status, latency_ms=latency_ms, sensitivity=call.classification.level.name))
        self.writer.add_audit(AuditEvent(
            actor=p.subject, tenant=p.tenant, action=call.endpoint, target=model,
            status="ok" if call.status == 200 else str(call.status),
            detail={"request_id": call.requests[0].request_id, "backend": call.backend, "rule": call.rule,
                    "cache": call.cache_hit, "classification": call.classification.level.name,
                    "reasons": list(call.classification.reasons), "prompt_tokens": prompt,
                    "completion_tokens": completion}))


def _texts(request: GenerationRequest) -> list[str]:
    if request.messages is not None:
        return [str(m.get("content") or "") for m in request.messages]
    return [request.prompt] if isinstance(request.prompt, str) else []


def _reservation(request: GenerationRequest, default_max_tokens: int) -> int:
    """Tokens held against tokens-per-minute until the call ends: an estimate of the prompt (UTF-8 bytes / 3,
    generous for English and exact-ish for Chinese, where a character is about one token) plus max_tokens."""
    if request.prompt is not None and not isinstance(request.prompt, str):
        prompt = len(request.prompt)
    else:
        prompt = sum(len(t.encode()) for t in _texts(request)) // 3 + 1
    n = request.params.n
    return prompt + n * (request.params.max_tokens or default_max_tokens)


async def _replay(hit: CachedResponse) -> AsyncIterator[Chunk]:
    for chunk in hit.chunks():
        yield chunk
