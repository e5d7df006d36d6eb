"""Response cache: complete answers to deterministic requests, keyed by a canonical hash that includes the
tenant (so tenants never share an entry), in Redis or an in-process LRU. A cache failure is only ever a
miss: it never fails or stalls the request it was asked about."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from seekserve.backends.base import Chunk, GenerationRequest, LogprobEntry
from seekserve.engine.params import SamplingParams

log = logging.getLogger(__name__)

CACHE_STATUS_HEADER = "x-seekserve-cache"        # "hit" on a replayed answer
FORMAT_VERSION = 1                                # of CachedResponse.to_bytes; part of every key
# Bumped with the stored format, so servers of two versions sharing one Redis never read each other's entries.
KEY_VERSION = f"seekserve-response-cache/{FORMAT_VERSION}"
# Every SamplingParams field is keyed (dataclasses.fields, so a new field is keyed automatically): even
# logprobs, n, skip_special_tokens and `extra` change the payload, so no field can cause a wrong hit.

# Only answers that ended by themselves are stored: "abort" (client gone), None (cut short) or an upstream
# error reason never are; "content_filter" neither, because an upstream's moderation changes over time.
STORABLE_FINISH_REASONS = frozenset({"stop", "length", "tool_calls"})


def _canon_param(value: Any) -> Any:
    # 0 and 0.0 (or 1 and 1.0) decode the same way, so they must give the same key
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def cache_key(tenant: str, request: GenerationRequest) -> str:
    """sha256 hex of a canonical JSON of everything that shapes the answer. request_id, priority and
    cache_salt are left out: none of them changes the text. Raises ValueError when the request holds a value
    with no JSON form (the caller then treats the request as uncacheable)."""
    params = {f.name: _canon_param(getattr(request.params, f.name))
              for f in dataclasses.fields(request.params)}
    doc = {"v": KEY_VERSION, "tenant": tenant, "model": request.model, "kind": request.kind,
           # whole message dicts (role/content/name today), so a key the template reads is never ignored
           "messages": request.messages, "prompt": request.prompt,
           "chat_template_kwargs": request.chat_template_kwargs, "params": params}
    try:
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"request has no canonical form for the response cache: {e}") from e
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def is_deterministic(params: SamplingParams) -> bool:
    """Greedy, or sampled from a per-request seeded generator (the same seed gives the same text)."""
    return params.temperature == 0 or params.seed is not None


@dataclass(frozen=True)
class CacheDirectives:
    read: bool = True     # may answer from the cache
    write: bool = True    # may store the fresh answer


def _directive_names(header: str) -> Iterable[str]:
    """Directive names of a Cache-Control value; commas inside quoted values do not split."""
    part: list[str] = []
    quoted = escaped = False
    for ch in header + ",":
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            yield "".join(part).split("=", 1)[0].strip().lower()
            part = []
            continue
        part.append(ch)


def parse_cache_control(header: str | None) -> CacheDirectives:
    """no-store: neither read nor write; no-cache: skip the lookup but store the fresh answer. Other
    directives (max-age, private, ...) are ignored; a malformed value means no directive."""
    if not header:
        return CacheDirectives()
    names = set(_directive_names(header))
    if "no-store" in names:
        return CacheDirectives(read=False, write=False)
    return CacheDirectives(read="no-cache" not in names, write=True)


@dataclass(frozen=True)
class CachePolicy:
    enabled: bool = True
    ttl: float = 3600.0                                      # seconds an entry lives
    cache_sensitive_tenants: frozenset[str] = frozenset()    # tenants whose sensitive answers may be cached

    def __post_init__(self) -> None:
        if not self.ttl > 0:
            raise ValueError(f"response cache ttl must be positive, got {self.ttl!r}")


def should_cache(policy: CachePolicy, params: SamplingParams, directives: CacheDirectives, sensitive: bool,
                 tenant: str, stream_features: bool) -> tuple[bool, bool]:
    """(read, write) for one request. Non-deterministic requests (temperature > 0 without a seed, whatever
    n is) and requests using streaming-only features are never cached; a sensitive request only when its
    tenant's policy allows."""
    if not policy.enabled or stream_features or not is_deterministic(params):
        return False, False
    if sensitive and tenant not in policy.cache_sensitive_tenants:
        return False, False
    return directives.read, directives.write


@dataclass(frozen=True)
class CachedChoice:
    text: str
    reasoning_text: str
    finish_reason: str
    logprobs: list[LogprobEntry] | None        # None when the request asked for none
    num_output_tokens: int
    num_reasoning_tokens: int


def _expect(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"corrupt cache entry: {what} is not {kind.__name__}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"corrupt cache entry: {what} is negative")
    return value


def _bytes(value: Any, what: str) -> list[int]:
    items: list[int] = _expect(value, list, what)
    if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in items):
        raise ValueError(f"corrupt cache entry: {what} is not a byte list")
    return items


def _logprob(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"corrupt cache entry: {what} is not a number")
    return float(value)


def _entry_from_data(row: Any) -> LogprobEntry:
    token, logprob, raw, top = _expect(row, list, "logprob entry")
    top_entries = [(_expect(t, str, "top token"), _logprob(v, "top logprob"), _bytes(b, "top bytes"))
                   for t, v, b in _expect(top, list, "top logprobs")]
    return LogprobEntry(token=_expect(token, str, "token"), logprob=_logprob(logprob, "logprob"),
                        bytes=_bytes(raw, "bytes"), top=top_entries)


def _choice_from_data(d: Any) -> CachedChoice:
    _expect(d, dict, "choice")
    lps = d["logprobs"]
    finish = _expect(d["finish"], str, "finish_reason")
    if finish not in STORABLE_FINISH_REASONS:
        raise ValueError(f"corrupt cache entry: finish_reason {finish!r} is never stored")
    return CachedChoice(text=_expect(d["text"], str, "text"),
                        reasoning_text=_expect(d["reasoning"], str, "reasoning"), finish_reason=finish,
                        logprobs=None if lps is None else [_entry_from_data(e)
                                                           for e in _expect(lps, list, "logprobs")],
                        num_output_tokens=_expect(d["out"], int, "output tokens"),
                        num_reasoning_tokens=_expect(d["rsn"], int, "reasoning tokens"))


@dataclass
class CachedResponse:
    """A complete answer as data: enough to replay it as chunks with the original usage numbers."""
    model: str
    created: int                               # unix time the original answer was made
    choices: list[CachedChoice]
    num_prompt_tokens: int
    num_cached_tokens: int                     # prefix-cache hits of the original (reported again as-is)

    @property
    def num_output_tokens(self) -> int:
        return sum(c.num_output_tokens for c in self.choices)

    @property
    def num_reasoning_tokens(self) -> int:
        return sum(c.num_reasoning_tokens for c in self.choices)

    @classmethod
    def from_chunks(cls, chunks: list[Chunk], model: str, *, n: int | None = None,
                    created: int | None = None) -> CachedResponse:
        """Accumulate one request's full stream. Raises ValueError unless every choice (0..n-1 when n is
        given) finished by itself: an errored, aborted or cut-short answer must never be stored."""
        if not chunks:
            raise ValueError("no chunks: nothing to cache")
        count = n if n is not None else max(c.index for c in chunks) + 1
        acc: list[dict[str, Any]] = [{"text": [], "reasoning": [], "logprobs": None, "last": None}
                                     for _ in range(count)]
        for chunk in chunks:
            if not 0 <= chunk.index < count:
                raise ValueError(f"chunk index {chunk.index} outside 0..{count - 1}")
            a = acc[chunk.index]
            a["text"].append(chunk.text)
            a["reasoning"].append(chunk.reasoning_text)
            if chunk.logprobs is not None:
                a["logprobs"] = (a["logprobs"] or []) + list(chunk.logprobs)
            a["last"] = chunk
        choices = []
        for i, a in enumerate(acc):
            last: Chunk | None = a["last"]
            if last is None or last.finish_reason not in STORABLE_FINISH_REASONS:
                raise ValueError(f"choice {i} did not finish (finish_reason "
                                 f"{None if last is None else last.finish_reason!r}): not cacheable")
            choices.append(CachedChoice("".join(a["text"]), "".join(a["reasoning"]), last.finish_reason,
                                        a["logprobs"], last.num_output_tokens, last.num_reasoning_tokens))
        # the usage tracker keeps the prompt counts of the last chunk it saw; so does the cache
        last = chunks[-1]
        return cls(model=model, created=int(time.time()) if created is None else created, choices=choices,
                   num_prompt_tokens=last.num_prompt_tokens, num_cached_tokens=last.num_cached_tokens)

    def chunks(self) -> list[Chunk]:
        """One final chunk per choice with its full text. token_ids stay empty: no token was generated, so
        engine metrics (TTFT, generation tokens) do not count a hit."""
        return [Chunk(index=i, text=c.text, reasoning_text=c.reasoning_text,
                      logprobs=None if c.logprobs is None else list(c.logprobs),
                      finish_reason=c.finish_reason,
                      num_prompt_tokens=self.num_prompt_tokens, num_cached_tokens=self.num_cached_tokens,
                      num_output_tokens=c.num_output_tokens, num_reasoning_tokens=c.num_reasoning_tokens)
                for i, c in enumerate(self.choices)]

    def to_bytes(self) -> bytes:
        doc = {"v": FORMAT_VERSION, "model": self.model, "created": self.created,
               "prompt": self.num_prompt_tokens, "cached": self.num_cached_tokens,
               "choices": [{"text": c.text, "reasoning": c.reasoning_text, "finish": c.finish_reason,
                            "out": c.num_output_tokens, "rsn": c.num_reasoning_tokens,
                            "logprobs": None if c.logprobs is None else
                            [[e.token, e.logprob, e.bytes, [list(t) for t in e.top]] for e in c.logprobs]}
                           for c in self.choices]}
        # surrogatepass: a lone surrogate in a detokenized text must not make the answer unstorable
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")

    @classmethod
    def from_bytes(cls, data: bytes | str) -> CachedResponse:
        """Raises ValueError for a corrupt entry or one of another format version (callers: a miss)."""
        try:
            text = data if isinstance(data, str) else data.decode("utf-8", "surrogatepass")
            doc = _expect(json.loads(text), dict, "entry")
            if doc.get("v") != FORMAT_VERSION:
                raise ValueError(f"cache entry format {doc.get('v')!r}, expected {FORMAT_VERSION}")
            choices = [_choice_from_data(c) for c in _expect(doc["choices"], list, "choices")]
            if not choices:
                raise ValueError("corrupt cache entry: no choices")
            return cls(model=_expect(doc["model"], str, "model"),
                       created=_expect(doc["created"], int, "created"), choices=choices,
                       num_prompt_tokens=_expect(doc["prompt"], int, "prompt tokens"),
                       num_cached_tokens=_expect(doc["cached"], int, "cached tokens"))
        except (KeyError, TypeError, IndexError, RecursionError) as e:
            raise ValueError(f"corrupt cache entry: {type(e).__name__}: {e}") from e


class CacheMetrics(Collector):
    """Lookups, stores and errors of one cache; the hit ratio is computed at scrape time from the same
    counts, so it can never disagree with them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._lock = threading.Lock()
        self.hits = self.misses = self.stores = self.errors = 0
        if registry is not None:
            registry.register(self)

    def count(self, what: Literal["hits", "misses", "stores", "errors"]) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            hits, misses, stores, errors = self.hits, self.misses, self.stores, self.errors
        yield CounterMetricFamily("seekserve:response_cache_hits", "Lookups answered from the response cache",
                                  value=hits)
        yield CounterMetricFamily("seekserve:response_cache_misses", "Lookups the response cache could not "
                                  "answer (absent, expired, corrupt or cache unavailable)", value=misses)
        yield CounterMetricFamily("seekserve:response_cache_stores", "Responses stored in the response cache",
                                  value=stores)
        yield CounterMetricFamily("seekserve:response_cache_errors", "Response cache backend errors "
                                  "(each one served as a miss or a skipped store)", value=errors)
        ratio = hits / (hits + misses) if hits + misses else 0.0
        yield GaugeMetricFamily("seekserve:response_cache_hit_ratio", "hits / (hits + misses) since start; "
                                "0 before the first lookup", value=ratio)


class ResponseCache(Protocol):
    metrics: CacheMetrics

    async def get(self, key: str) -> CachedResponse | None: ...

    async def put(self, key: str, value: CachedResponse, ttl: float) -> None: ...

    async def close(self) -> None: ...


class LRUResponseCache:
    """In-process cache for a single replica: per-entry TTL, least recently used evicted first once either
    the entry count or the stored bytes exceed their limit. Entries are kept serialized, so sizes are real
    and a caller mutating a returned response cannot change the cache."""

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 256 * 2**20,
                 clock: Callable[[], float] = time.monotonic,
                 registry: CollectorRegistry | None = None) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be positive")
        self.max_entries, self.max_bytes, self.clock = max_entries, max_bytes, clock
        self.metrics = CacheMetrics(registry)
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()   # key -> (expires at, data)
        self._num_bytes = 0
        # a plain lock, never held across an await: both threads and coroutines may share one cache
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_bytes(self) -> int:
        return self._num_bytes

    def _drop(self, key: str) -> None:
        _, data = self._entries.pop(key)
        self._num_bytes -= len(key) + len(data)

    async def get(self, key: str) -> CachedResponse | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self.clock() >= entry[0]:
                self._drop(key)
                entry = None
            if entry is not None:
                self._entries.move_to_end(key)
        if entry is None:
            self.metrics.count("misses")
            return None
        try:
            value = CachedResponse.from_bytes(entry[1])
        except ValueError as e:   # only if the format changed under a running process; still just a miss
            log.debug("response cache: dropping unreadable entry: %s", e)
            self.metrics.count("misses")
            return None
        self.metrics.count("hits")
        return value

    async def put(self, key: str, value: CachedResponse, ttl: float) -> None:
        data = value.to_bytes()
        size = len(key) + len(data)
        if ttl <= 0 or size > self.max_bytes:
            return   # an entry larger than the whole cache would only evict everything else
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (self.clock() + ttl, data)
            self._num_bytes += size
            while len(self._entries) > self.max_entries or self._num_bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
        self.metrics.count("stores")

    async def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._num_bytes = 0


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisResponseCache:
    """Shared by all replicas. Every Redis failure is a miss (get) or a skipped store (put), counted, and
    logged once per outage rather than once per request; short timeouts and no retries keep a dead or slow
    Redis from stalling the request that asked."""

    def __init__(self, url: str, prefix: str = "seekserve:cache:", registry: CollectorRegistry | None = None,
                 timeout: float = 0.25) -> None:
        self.prefix, self.timeout = prefix, timeout
        self.metrics = CacheMetrics(registry)
        self._where = mask_url(url)
        self._healthy = True
        # retries would multiply the stall; a miss is cheap, the next request tries again
        self._redis = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                     retry=Retry(NoBackoff(), 0), retry_on_timeout=False)

    def _failed(self, error: BaseException) -> None:
        self.metrics.count("errors")
        if self._healthy:
            self._healthy = False
            log.warning("response cache: Redis at %s is unavailable (%s: %s); serving without the cache "
                        "until it is back", self._where, type(error).__name__, error)

    def _succeeded(self) -> None:
        if not self._healthy:
            self._healthy = True
            log.warning("response cache: Redis at %s is reachable again", self._where)

    async def get(self, key: str) -> CachedResponse | None:
        try:
            # the outer bound also covers time spent waiting for a pooled connection
            async with asyncio.timeout(self.timeout * 2):
                data = await self._redis.get(self.prefix + key)
        except (RedisError, OSError, TimeoutError) as e:
            self._failed(e)
            self.metrics.count("misses")
            return None
        self._succeeded()
        if data is None:
            self.metrics.count("misses")
            return None
        try:
            value = CachedResponse.from_bytes(data)
        except ValueError as e:   # corrupt or foreign data under our key: a miss; the next store replaces it
            log.debug("response cache: unreadable entry %s: %s", key, e)
            self.metrics.count("misses")
            return None
        self.metrics.count("hits")
        return value

    async def put(self, key: str, value: CachedResponse, ttl: float) -> None:
        if ttl <= 0:
            return
        data = value.to_bytes()
        try:
            async with asyncio.timeout(self.timeout * 2):
                await self._redis.set(self.prefix + key, data, px=max(1, round(ttl * 1000)))
        except (RedisError, OSError, TimeoutError) as e:
            self._failed(e)
            return
        self._succeeded()
        self.metrics.count("stores")

    async def close(self) -> None:
        await self._redis.aclose()


def open_response_cache(redis_url: str | None, registry: CollectorRegistry | None = None, *,
                        prefix: str = "seekserve:cache:", max_entries: int = 10_000,
                        max_bytes: int = 256 * 2**20) -> ResponseCache:
    """Redis when a URL is configured (shared by replicas), the in-process LRU otherwise."""
    if redis_url:
        return RedisResponseCache(redis_url, prefix=prefix, registry=registry)
    return LRUResponseCache(max_entries=max_entries, max_bytes=max_bytes, registry=registry)
