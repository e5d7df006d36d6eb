"""Hybrid serving end to end: one alias ("tiny-chat") served by the local engine and by a cloud upstream (the
real HTTP FakeUpstream on loopback, recording every request), routed by declarative rules. The labelled
sensitivity corpus runs under normal operation, local overload and local failure, and not one PII item may
reach the upstream; then retries, Retry-After, stalls, the circuit breaker and a mid-stream failure against
an upstream that fails, stalls and recovers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from seekserve.backends.local import LocalBackend
from seekserve.gateway.principal import Role, Tier
from tests.api.conftest import metric_value, running_server
from tests.backends.upstream import Drop, FakeUpstream, Reply, Sleep, chat_chunk

MODEL = "tiny-chat"
CORPUS: list[dict[str, Any]] = [json.loads(line) for line in
                                (Path(__file__).resolve().parents[1] / "data" / "sensitivity_corpus.jsonl")
                                .read_text(encoding="utf-8").splitlines() if line.strip()]
PII = [item for item in CORPUS if item["pii"]]
PUBLIC = [item for item in CORPUS if not item["pii"]]
PUBLIC_TEXT = "What is the boiling point of water at sea level?"
PII_TEXT = "请把合同寄给 13812345678 的张先生"          # a mainland mobile number: confidential
# Small and quick, but with margins for a loaded 2-core machine: reset_timeout is long enough that a request
# sent right after the breaker opened still finds it open.
RETRY = {"max_attempts": 2, "base_backoff": 0.01, "max_backoff": 0.05, "max_retry_after": 5.0,
         "failure_threshold": 3, "reset_timeout": 2.0, "first_chunk_timeout": 2.0}
SENSITIVE_LOCAL = {"name": "sensitive-local", "match": {"sensitivity": ["internal", "confidential"]},
                   "backends": ["local"]}
# public traffic to the cloud first, falling back to local
CLOUD_FIRST = [SENSITIVE_LOCAL, {"name": "public", "match": {"sensitivity": ["public"]},
                                 "backends": ["cloud", "local"]}]
# public traffic local first; while anything waits in the local queue, it overflows to the cloud
OVERFLOW = [SENSITIVE_LOCAL, {"name": "public-overflow", "match": {"sensitivity": ["public"]},
                              "backends": ["local", "cloud"],
                              "overflow": {"when_queue_above": 0, "to": ["cloud"]}}]
# a careless rule set: one rule naming the cloud for everything. The router must still keep sensitive
# requests local ("whatever the rules say").
CARELESS = [{"name": "everything", "backends": ["cloud", "local"]}]
HOG_TOKENS = 200        # the tiny checkpoint's context is 256 tokens


@dataclass
class Hybrid:
    base: str
    backend: LocalBackend
    app: Any
    upstream: FakeUpstream

    def metrics(self) -> str:
        return httpx.get(f"{self.base}/metrics", timeout=30).text

    def chat_bodies(self, since: int = 0) -> list[dict[str, Any]]:
        """JSON bodies of the chat requests the upstream received (from index `since` of its record)."""
        return [r.json for r in list(self.upstream.requests)[since:] if r.path.endswith("/chat/completions")]


@contextlib.contextmanager
def hybrid_server(model: Path, routes: list[dict[str, Any]], **settings: Any) -> Iterator[Hybrid]:
    with FakeUpstream(models=("deepseek-chat",)) as upstream:
        cloud = {"name": "cloud", "base_url": upstream.url, "remote": True, "read_timeout": 10.0,
                 "models": [{"alias": MODEL, "upstream": "deepseek-chat"}]}
        with running_server(model, served_model_name=[MODEL], upstreams=[cloud], routes=routes, retry=RETRY,
                            **settings) as (base, backend, app):
            yield Hybrid(base, backend, app, upstream)


@pytest.fixture(scope="module")
def split(chat_model: Path) -> Iterator[Hybrid]:
    """Cloud-first for public traffic; its upstream only ever gives the default answer."""
    with hybrid_server(chat_model, CLOUD_FIRST) as h:
        yield h


@pytest.fixture()
def fresh(chat_model: Path) -> Iterator[Hybrid]:
    """A server of its own (fresh breakers and counters), cloud-first for public traffic."""
    with hybrid_server(chat_model, CLOUD_FIRST) as h:
        yield h


# -- helpers ---------------------------------------------------------------------------------------------
def cloud_attempts(metrics: str, outcome: str) -> float:
    """Attempts on the cloud backend under the cloud-first rule "public", by outcome."""
    return metric_value(metrics, "seekserve:backend_requests_total", backend="cloud", rule="public",
                  outcome=outcome)


def body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 2,
            "temperature": 0, **extra}


def chat(h: Hybrid, text: str, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    return httpx.post(f"{h.base}/v1/chat/completions", json=body(text, **extra), headers=headers, timeout=60)


def wait_until(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@dataclass(frozen=True)
class Outcome:
    status: int
    backend: str | None
    route: str | None
    classification: str | None
    code: str | None


async def _run_corpus(base: str, headers: dict[str, str] | None, concurrency: int = 16) -> list[Outcome]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits, headers=headers) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(item: dict[str, Any]) -> Outcome:
            async with gate:
                r = await client.post("/v1/chat/completions", json=body(item["text"], max_tokens=1))
            code = r.json()["error"]["code"] if r.status_code >= 400 else None
            h = r.headers
            return Outcome(r.status_code, h.get("x-seekserve-backend"), h.get("x-seekserve-route"),
                           h.get("x-seekserve-data-classification"), code)

        return list(await asyncio.gather(*(one(item) for item in CORPUS)))


def run_corpus(h: Hybrid, headers: dict[str, str] | None = None) -> list[Outcome]:
    return asyncio.run(_run_corpus(h.base, headers))


def assert_no_pii_reached_upstream(h: Hybrid) -> None:
    """Searches everything the upstream ever received: raw bytes (UTF-8 and JSON-escaped forms of each PII
    text) and every message content of the parsed bodies."""
    records = list(h.upstream.requests)
    raw = b"\x00".join(r.body for r in records)
    contents = [str(m.get("content")) for b in h.chat_bodies() for m in b.get("messages", [])]
    leaked = [item["text"] for item in PII
              if item["text"].encode() in raw or json.dumps(item["text"])[1:-1].encode() in raw
              or any(item["text"] in c for c in contents)]
    assert not leaked, f"{len(leaked)} PII items reached the cloud upstream, e.g. {leaked[:3]}"


def assert_no_sensitive_usage_on_cloud(h: Hybrid) -> None:
    """The usage records (written by the gateway) agree: nothing above public was served by the cloud."""
    parts = h.app.state.gateway_parts
    assert parts.writer.flush(20)
    records = parts.usage.query(limit=100_000)
    assert records
    assert not [r for r in records if r.backend == "cloud" and r.sensitivity != "public"]


def check_corpus_phase(h: Hybrid, outcomes: list[Outcome], since: int, *, public_to: str,
                       pii_rule: str = "sensitive-local", local_up: bool = True) -> None:
    for item, o in zip(CORPUS, outcomes, strict=True):
        if item["pii"]:
            assert o.backend != "cloud", (item, o)
            if local_up:
                expected = (200, "local", pii_rule, "confidential")
                assert (o.status, o.backend, o.route, o.classification) == expected, (item, o)
            else:   # local is down: a clear 503, never the cloud
                assert (o.status, o.code) == (503, "backends_unavailable"), (item, o)
        else:
            assert (o.status, o.backend, o.classification) == (200, public_to, "public"), (item, o)
    assert_no_pii_reached_upstream(h)
    # the test can fail: in phases routing public items to the cloud, the upstream got exactly those
    received = Counter(m["content"] for b in h.chat_bodies(since) for m in b["messages"])
    expected = Counter(item["text"] for item in PUBLIC) if public_to == "cloud" else Counter()
    assert received == expected


# -- the labelled corpus: zero sensitive items reach the upstream ---------------------------------------
def test_corpus_under_normal_operation(split: Hybrid) -> None:
    before, since = split.metrics(), len(split.upstream.requests)
    outcomes = run_corpus(split)
    check_corpus_phase(split, outcomes, since, public_to="cloud")
    assert {o.route for o in outcomes} == {"sensitive-local", "public"}
    after = split.metrics()

    def delta(**labels: str) -> float:
        return (metric_value(after, "seekserve:route_decisions_total", **labels)
                - metric_value(before, "seekserve:route_decisions_total", **labels))

    assert delta(rule="public", backend="cloud") == len(PUBLIC)
    assert delta(rule="sensitive-local", backend="local") == len(PII)
    assert delta(rule="public", backend="local") == delta(rule="sensitive-local", backend="cloud") == 0
    assert metric_value(after, "seekserve:backend_requests_total", backend="cloud", rule="sensitive-local",
                  outcome="ok") == 0
    assert 'seekserve:route_decisions_total{backend="local",rule="sensitive-local"}' in after
    assert_no_sensitive_usage_on_cloud(split)


async def _keep_local_queue_deep(base: str, hog_key: str, stop: asyncio.Event, in_flight: int = 3) -> None:
    """Keeps `in_flight` long local generations going (batch tier, so corpus requests overtake them in the
    engine queue). With batch_size=1 one runs and the others wait, so the local queue is never empty."""
    headers = {"Authorization": f"Bearer {hog_key}", "X-Data-Classification": "confidential"}
    async with httpx.AsyncClient(base_url=base, timeout=120, headers=headers) as client:
        async def hog() -> None:
            r = await client.post("/v1/chat/completions",
                                  json=body("hog", max_tokens=HOG_TOKENS, ignore_eos=True))
            assert (r.status_code, r.headers["x-seekserve-backend"]) == (200, "local"), r.text

        tasks: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                while len(tasks) < in_flight:
                    tasks.add(asyncio.create_task(hog()))
                done, tasks = await asyncio.wait(tasks, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
        finally:
            for task in tasks:
                task.cancel()     # closes the connection: the server aborts the engine request
            await asyncio.gather(*tasks, return_exceptions=True)


async def _overloaded_corpus(h: Hybrid, corpus_key: str, hog_key: str) -> tuple[list[Outcome], list[int]]:
    stop = asyncio.Event()
    keeper = asyncio.create_task(_keep_local_queue_deep(h.base, hog_key, stop))
    depths: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while h.backend.num_queued < 2:     # one hog running, two waiting
            assert not keeper.done(), keeper
            assert time.monotonic() < deadline, "the local queue never filled"
            await asyncio.sleep(0.01)
        depths.append(h.backend.num_queued)
        outcomes = await _run_corpus(h.base, {"Authorization": f"Bearer {corpus_key}"})
        depths.append(h.backend.num_queued)
    finally:
        stop.set()
        await keeper
    return outcomes, depths


def test_corpus_under_local_overload_then_local_failure(chat_model: Path) -> None:
    with hybrid_server(chat_model, OVERFLOW, batch_size=1) as h:
        parts = h.app.state.gateway_parts
        _, corpus_key = parts.keys.create("corpus", Role.developer, "acme", Tier.standard)
        _, hog_key = parts.keys.create("hog", Role.developer, "acme", Tier.batch)
        parts.auth.keys_changed()
        # sanity: with an empty queue the rule keeps public traffic local
        r = chat(h, PUBLIC_TEXT, headers={"Authorization": f"Bearer {corpus_key}"})
        assert (r.headers["x-seekserve-backend"], r.headers["x-seekserve-route"]) == \
            ("local", "public-overflow")

        # (b) local overload: public items overflow to the cloud, PII items wait for the local engine
        since = len(h.upstream.requests)
        outcomes, depths = asyncio.run(_overloaded_corpus(h, corpus_key, hog_key))
        assert min(depths) >= 1, depths
        check_corpus_phase(h, outcomes, since, public_to="cloud")
        assert {o.route for o in outcomes} == {"sensitive-local", "public-overflow"}
        metrics = h.metrics()
        assert metric_value(metrics, "seekserve:route_decisions_total", rule="public-overflow", backend="cloud") \
            == len(PUBLIC)
        assert metric_value(metrics, "seekserve:route_decisions_total", rule="sensitive-local", backend="local") \
            >= len(PII)
        wait_until(lambda: h.backend.num_active == 0, what="the cancelled hogs to be aborted")

        # (c) local failure: the engine is gone; PII items get 503, public ones fall back to the cloud
        h.backend.async_engine.shutdown()
        assert httpx.get(f"{h.base}/ready", timeout=30).status_code == 503
        since = len(h.upstream.requests)
        outcomes = run_corpus(h, headers={"Authorization": f"Bearer {corpus_key}"})
        check_corpus_phase(h, outcomes, since, public_to="cloud", local_up=False)
        metrics = h.metrics()
        assert metric_value(metrics, "seekserve:route_decisions_total", rule="sensitive-local", backend="none") \
            == len(PII)
        assert_no_sensitive_usage_on_cloud(h)


def test_corpus_with_a_careless_rule_and_local_failure(chat_model: Path) -> None:
    """A single rule naming the cloud first for everything: the router still keeps PII local, and gives
    503 rather than the cloud when local is down."""
    with hybrid_server(chat_model, CARELESS) as h:
        since = len(h.upstream.requests)
        check_corpus_phase(h, run_corpus(h), since, public_to="cloud", pii_rule="everything")
        h.backend.async_engine.shutdown()
        since = len(h.upstream.requests)
        check_corpus_phase(h, run_corpus(h), since, public_to="cloud", local_up=False)
        assert metric_value(h.metrics(), "seekserve:backend_requests_total", backend="cloud", rule="everything",
                      outcome="ok") == 2 * len(PUBLIC)
        assert_no_sensitive_usage_on_cloud(h)


# -- X-Data-Classification: raises, never lowers -------------------------------------------------------
@pytest.mark.parametrize(("text", "header", "level"), [
    (PUBLIC_TEXT, "confidential", "confidential"),
    (PUBLIC_TEXT, "internal", "internal"),
    (PII_TEXT, "public", "confidential"),
    (PII_TEXT, None, "confidential"),
])
def test_classification_header_can_only_raise_the_level(split: Hybrid, text: str, header: str | None,
                                                         level: str) -> None:
    since = len(split.upstream.requests)
    r = chat(split, text, headers={"X-Data-Classification": header} if header else None)
    assert r.status_code == 200, r.text
    assert r.headers["x-seekserve-data-classification"] == level
    assert (r.headers["x-seekserve-backend"], r.headers["x-seekserve-route"]) == ("local", "sensitive-local")
    assert len(split.upstream.requests) == since


def test_public_request_goes_to_the_cloud_and_a_bad_header_is_refused(split: Hybrid) -> None:
    since = len(split.upstream.requests)
    r = chat(split, PUBLIC_TEXT, headers={"X-Data-Classification": "public"})
    assert (r.status_code, r.headers["x-seekserve-backend"], r.headers["x-seekserve-route"]) == \
        (200, "cloud", "public")
    assert r.json()["choices"][0]["message"]["content"] == split.upstream.text
    assert [b["messages"][0]["content"] for b in split.chat_bodies(since)] == [PUBLIC_TEXT]
    bad = chat(split, PUBLIC_TEXT, headers={"X-Data-Classification": "secret"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_classification"
    assert len(split.upstream.requests) == since + 1


# -- resilience: an upstream that fails, stalls and recovers -------------------------------------------
def test_failing_upstream_is_retried_falls_back_and_its_breaker_opens_and_recovers(fresh: Hybrid) -> None:
    up = fresh.upstream
    up.push(Reply.error(500, "boom", type="server_error"), Reply.error(500, "boom", type="server_error"))
    r = chat(fresh, PUBLIC_TEXT)
    assert r.status_code == 200, r.text
    assert (r.headers["x-seekserve-backend"], r.headers["x-seekserve-route"]) == ("local", "public")
    assert len(up.requests) == 2      # tried, retried once (max_attempts 2), then local
    m = fresh.metrics()
    assert metric_value(m, "seekserve:backend_retries_total", backend="cloud") == 1
    assert cloud_attempts(m, "retry") == 1
    assert cloud_attempts(m, "fallback") == 1
    assert metric_value(m, "seekserve:route_decisions_total", rule="public", backend="local") == 1
    assert metric_value(m, "seekserve:circuit_breaker_state", backend="cloud") == 0   # 2 failures < threshold 3

    up.push(Reply.error(502, "bad gateway", type="server_error"))   # the third consecutive failure
    r = chat(fresh, PUBLIC_TEXT)
    opened_at = time.monotonic()
    assert r.headers["x-seekserve-backend"] == "local"
    assert len(up.requests) == 3      # the retry found the breaker open and fell back at once
    assert 'seekserve:circuit_breaker_state{backend="cloud"} 2.0' in fresh.metrics()

    r = chat(fresh, PUBLIC_TEXT)      # open: the cloud is not even tried
    assert time.monotonic() - opened_at < RETRY["reset_timeout"], "too slow to observe the open breaker"
    assert r.headers["x-seekserve-backend"] == "local" and len(up.requests) == 3

    # after reset_timeout the breaker is half-open (seen at scrape time, no request needed) ...
    wait_until(lambda: metric_value(fresh.metrics(), "seekserve:circuit_breaker_state", backend="cloud") == 1,
               timeout=RETRY["reset_timeout"] + 10, what="half-open")
    assert time.monotonic() - opened_at >= RETRY["reset_timeout"] * 0.9
    # ... and the upstream has recovered: the probe succeeds and closes it
    r = chat(fresh, PUBLIC_TEXT)
    assert (r.status_code, r.headers["x-seekserve-backend"]) == (200, "cloud")
    assert len(up.requests) == 4
    m = fresh.metrics()
    assert metric_value(m, "seekserve:circuit_breaker_state", backend="cloud") == 0
    assert metric_value(m, "seekserve:route_decisions_total", rule="public", backend="local") == 3
    assert metric_value(m, "seekserve:route_decisions_total", rule="public", backend="cloud") == 1


def test_retry_after_is_honoured_and_a_too_long_one_moves_on(fresh: Hybrid) -> None:
    up = fresh.upstream
    up.push(Reply.error(429, "Rate limit reached", type="rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": "1"}))
    r = chat(fresh, PUBLIC_TEXT)
    assert (r.status_code, r.headers["x-seekserve-backend"]) == (200, "cloud"), r.text
    first, second = up.requests
    assert second.received_at - first.received_at >= 0.95   # waited as told, not the 10 ms backoff
    assert metric_value(fresh.metrics(), "seekserve:backend_retries_total", backend="cloud") == 1

    up.push(Reply.error(429, "Rate limit reached", type="rate_limit_error", headers={"Retry-After": "30"}))
    started = time.monotonic()
    r = chat(fresh, PUBLIC_TEXT)
    assert (r.status_code, r.headers["x-seekserve-backend"]) == (200, "local")
    assert time.monotonic() - started < 10      # above max_retry_after: the next backend, not a 30 s wait
    assert len(up.requests) == 3
    m = fresh.metrics()
    assert metric_value(m, "seekserve:backend_retries_total", backend="cloud") == 1
    assert cloud_attempts(m, "fallback") == 1


def test_stalled_upstream_times_out_before_the_first_chunk_and_falls_back(fresh: Hybrid) -> None:
    up = fresh.upstream
    up.push(Reply.stall(20), Reply.stall(20))
    started = time.monotonic()
    r = chat(fresh, PUBLIC_TEXT)
    elapsed = time.monotonic() - started
    assert (r.status_code, r.headers["x-seekserve-backend"]) == (200, "local"), r.text
    timeout = RETRY["first_chunk_timeout"]
    assert 2 * timeout * 0.9 <= elapsed < 2 * timeout + 10, elapsed   # two attempts, each cut at the deadline
    assert len(up.requests) == 2
    for rec in up.requests:           # each stalled upstream request was closed, not left hanging
        assert rec.closed_early.wait(10)
    m = fresh.metrics()
    assert cloud_attempts(m, "retry") == 1
    assert cloud_attempts(m, "fallback") == 1


def test_failure_after_the_first_chunk_ends_the_stream_with_an_error_event(fresh: Hybrid) -> None:
    up = fresh.upstream
    up.push(Reply.sse(chat_chunk("", role="assistant"), chat_chunk("Hello"), chat_chunk(" there"),
                      Sleep(0.2), Drop(), done=False))
    with httpx.stream("POST", f"{fresh.base}/v1/chat/completions", json=body(PUBLIC_TEXT, stream=True),
                      timeout=60) as r:
        assert r.status_code == 200
        assert (r.headers["x-seekserve-backend"], r.headers["x-seekserve-route"]) == ("cloud", "public")
        frames = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    payloads = [json.loads(f) for f in frames[:-1]]
    text = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads if p.get("choices"))
    assert text == "Hello there"
    assert payloads[-1]["error"]["code"] == "upstream_error", payloads[-1]
    assert not any(c.get("finish_reason") for p in payloads for c in p.get("choices", []))
    assert len(up.requests) == 1      # bytes were sent: never retried, never replayed on local
    m = fresh.metrics()
    assert cloud_attempts(m, "error") == 1 and cloud_attempts(m, "ok") == 0    # counted once, as a failure
    assert metric_value(m, "seekserve:backend_retries_total", backend="cloud") == 0
    assert metric_value(m, "seekserve:route_decisions_total", rule="public", backend="local") == 0
