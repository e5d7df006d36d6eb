"""Routing rules and the Router, against scripted upstreams that fail, stall, break mid-stream and recover.
The sensitivity invariant is checked by counting calls on remote backends, including under hypothesis."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from seekserve.backends.base import BackendError, Chunk, GenerationRequest, ModelInfo
from seekserve.engine.params import SamplingParams
from seekserve.gateway.errors import GatewayError
from seekserve.gateway.principal import Tier
from seekserve.gateway.resilience import BreakerConfig, BreakerState, RetryPolicy
from seekserve.gateway.routing import (
    BackendEntry,
    Overflow,
    RouteContext,
    RouteMatch,
    RoutePlan,
    Router,
    RouteRule,
    default_rules,
)

REQUEST = GenerationRequest(request_id="r", model="m", kind="completion", params=SamplingParams(), prompt="x")
FAST = RetryPolicy(max_attempts=2, base_backoff=0.01, max_backoff=0.02, max_retry_after=2.0,
                   first_chunk_timeout=0.2)


class Scripted:
    """A Backend whose start() follows a script, one step per call ("ok" once the script runs out):
    retry (retryable 503), slow (retryable, Retry-After 1.5), later (Retry-After 60), bad (400),
    refused (ConnectionError), stall_start, stall (no first chunk), break (fails after one chunk), empty."""

    def __init__(self, script: list[str] | None = None, models: tuple[str, ...] = ("m",), chunks: int = 3) -> None:
        self.script, self.served, self.chunks = list(script or []), models, chunks
        self.calls, self.closed, self.ready = 0, 0, True

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=m, owned_by="test", max_model_len=64, reasoning=False) for m in self.served]

    def is_ready(self) -> bool:
        return self.ready

    def detokenize(self, token_ids: list[int]) -> str:
        return ""

    async def start(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        self.calls += 1
        step = self.script.pop(0) if self.script else "ok"
        errors = {"retry": BackendError("busy", 503, retryable=True),
                  "slow": BackendError("busy", 503, retryable=True, retry_after=1.5),
                  "later": BackendError("busy", 503, retryable=True, retry_after=60.0),
                  "bad": BackendError("bad request", 400, param="x"),
                  "full": BackendError("queue full", 429, code="queue_full", error_type="rate_limit_error",
                                       headers={"Retry-After": "1"}),
                  "broke": BackendError("insufficient balance", 402, code="insufficient_balance")}
        if step in errors:
            raise errors[step]
        if step == "refused":
            raise ConnectionError("refused")
        if step == "stall_start":
            await asyncio.sleep(3600)
        return self._stream(step)

    async def _stream(self, step: str) -> AsyncIterator[Chunk]:
        try:
            if step == "stall":
                await asyncio.sleep(3600)
            for i in range(0 if step == "empty" else self.chunks):
                if step == "break" and i == 1:
                    raise BackendError("upstream reset", 502, retryable=True)
                yield Chunk(index=0, text=f"{i}")
        finally:
            self.closed += 1

    async def close(self) -> None:
        return None


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ctx(**kw: Any) -> RouteContext:
    base: dict[str, Any] = {"model": "m", "tenant": "acme", "tier": "standard", "level": 0, "sensitive": False,
                            "prompt_chars": 100}
    return RouteContext(**(base | kw))


def rule(name: str, backends: list[str], **match: Any) -> RouteRule:
    return RouteRule(name=name, match=RouteMatch(**match), backends=backends)


def make_router(backends: dict[str, Scripted], rules: list[RouteRule], remote: tuple[str, ...] = ("cloud",),
                queues: dict[str, Callable[[], int]] | None = None, **kw: Any) -> tuple[Router, list[float]]:
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    entries = [BackendEntry(n, b, remote=n in remote, queue_depth=(queues or {}).get(n)) for n, b in backends.items()]
    kw.setdefault("retry", FAST)
    router = Router(entries, rules, registry=CollectorRegistry(), sleep=sleep, rng=random.Random(1), **kw)
    return router, sleeps


def serve(router: Router, context: RouteContext) -> tuple[str, str, list[str]]:
    async def main() -> tuple[str, str, list[str]]:
        name, rule_name, stream = await router.start(context, REQUEST)
        return name, rule_name, [c.text async for c in stream]

    return asyncio.run(main())


def fails(router: Router, context: RouteContext, error: type[Exception]) -> Any:
    with pytest.raises(error) as info:
        serve(router, context)
    return info.value


def sample(router: Router, name: str, **labels: str) -> float | None:
    return router.registry.get_sample_value(name, labels)


# -- rules ----------------------------------------------------------------------------------------
def test_first_matching_rule_wins() -> None:
    backends = {"local": Scripted(), "local2": Scripted()}
    rules = [rule("vip", ["local2"], tiers=["vip"]), rule("any", ["local"]), rule("never", ["local2"])]
    router, _ = make_router(backends, rules)
    assert router.plan(ctx(tier="vip")) == RoutePlan("vip", ["local2"])
    assert router.plan(ctx(tier=Tier.vip)).rule == "vip"       # the principal's enum works too
    assert serve(router, ctx()) == ("local", "any", ["0", "1", "2"])


@pytest.mark.parametrize(("match", "hit", "miss"), [
    ({"models": ["deepseek-*"]}, {"model": "deepseek-r1"}, {"model": "m"}),
    ({"tenants": ["acme", "beta"]}, {"tenant": "beta"}, {"tenant": "gamma"}),
    ({"sensitivity": ["internal"]}, {"level": 1}, {"level": 2}),
    ({"tiers": ["batch"]}, {"tier": "batch"}, {"tier": "vip"}),
    ({"min_prompt_chars": 1000}, {"prompt_chars": 1000}, {"prompt_chars": 999}),
    ({"max_prompt_chars": 1000}, {"prompt_chars": 1000}, {"prompt_chars": 1001}),
    ({"tenants": ["acme"], "tiers": ["vip"]}, {"tier": "vip"}, {"tier": "vip", "tenant": "other"}),
])
def test_each_match_field(match: dict[str, Any], hit: dict[str, Any], miss: dict[str, Any]) -> None:
    assert RouteMatch(**match).matches(ctx(**hit))
    assert not RouteMatch(**match).matches(ctx(**miss))
    assert RouteMatch().matches(ctx(**miss))


def test_rules_load_from_yaml_and_refuse_typos() -> None:
    text = """
    - name: sensitive-local
      match: {sensitivity: [internal, confidential]}
      backends: [local]
    - name: public-overflow
      match: {sensitivity: [public], max_prompt_chars: 20000}
      backends: [local, cloud]
      overflow: {when_queue_above: 8, to: [cloud]}
    """
    rules = [RouteRule.model_validate(r) for r in yaml.safe_load(text)]
    assert rules[1].overflow == Overflow(when_queue_above=8, to=["cloud"])
    for bad in [{"name": "x", "backends": ["a"], "mach": {}},             # unknown key
                {"name": "x", "backends": []},                              # nothing to route to
                {"name": "x", "backends": ["a"], "match": {"sensitivity": ["secret"]}},
                {"name": "x", "backends": ["a"], "match": {"min_prompt_chars": 5, "max_prompt_chars": 4}}]:
        with pytest.raises(ValidationError):
            RouteRule.model_validate(bad)


def test_router_refuses_rules_naming_unknown_backends() -> None:
    backends = {"local": Scripted()}
    with pytest.raises(ValueError, match="'nowhere'"):
        make_router(backends, [rule("r", ["local", "nowhere"])])
    overflow = RouteRule(name="r", backends=["local"], overflow=Overflow(when_queue_above=1, to=["gone"]))
    with pytest.raises(ValueError, match="'gone'"):
        make_router(backends, [overflow])
    no_queue = RouteRule(name="r", backends=["local"], overflow=Overflow(when_queue_above=1, to=["local"]))
    with pytest.raises(ValueError, match="reports none"):
        make_router(backends, [no_queue])
    with pytest.raises(ValueError, match="unique"):
        make_router(backends, [rule("r", ["local"]), rule("r", ["local"])])


def test_overflow_sends_public_traffic_to_the_cloud_only_above_the_threshold() -> None:
    backends = {"local": Scripted(), "cloud": Scripted()}
    depth = {"now": 4}
    rules = [RouteRule(name="public", match=RouteMatch(sensitivity=["public"]), backends=["local"],
                       overflow=Overflow(when_queue_above=4, to=["cloud"])),
             RouteRule(name="rest", backends=["local"], overflow=Overflow(when_queue_above=4, to=["cloud"]))]
    router, _ = make_router(backends, rules, queues={"local": lambda: depth["now"]})
    assert router.plan(ctx()) == RoutePlan("public", ["local"])
    depth["now"] = 5
    assert router.plan(ctx()) == RoutePlan("public", ["cloud", "local"], overflowed=True)
    assert serve(router, ctx())[0] == "cloud"
    # a saturated local queue never pushes sensitive traffic out: it waits locally
    assert router.plan(ctx(level=1)) == RoutePlan("rest", ["local"], overflowed=True)
    assert serve(router, ctx(sensitive=True))[0] == "local"
    assert backends["cloud"].calls == 1


def test_model_must_be_served_by_the_backend() -> None:
    backends = {"local": Scripted(models=("m",)), "local2": Scripted(models=("m", "big"))}
    router, _ = make_router(backends, [rule("r", ["local", "local2"]), rule("only1", ["local"])])
    assert router.plan(ctx(model="big")).candidates == ["local2"]
    assert fails(router, ctx(model="nope"), GatewayError).status == 404
    router, _ = make_router(backends, [rule("only1", ["local"])])
    err = fails(router, ctx(model="big"), GatewayError)
    assert (err.status, err.code) == (503, "model_unavailable")


def test_default_rules_keep_non_public_traffic_local() -> None:
    backends = {"local": Scripted(), "cloud": Scripted()}
    router, _ = make_router(backends, default_rules("local", ["cloud"]))
    assert router.plan(ctx()).candidates == ["local", "cloud"]
    assert router.plan(ctx(level=1)).candidates == ["local"]
    assert router.plan(ctx(level=0, sensitive=True)).candidates == ["local"]
    router, _ = make_router(backends, default_rules("local"))
    assert router.plan(ctx()).candidates == ["local"]


# -- the sensitivity invariant --------------------------------------------------------------------
def test_sensitive_request_never_reaches_a_remote_backend_even_when_local_fails() -> None:
    backends = {"local": Scripted(["retry"] * 10), "cloud": Scripted()}
    leaky = [rule("leaky", ["cloud", "local"])]    # a misconfigured rule: cloud first for everything
    router, _ = make_router(backends, leaky, breaker_config=BreakerConfig(failure_threshold=100))
    for context in (ctx(sensitive=True), ctx(level=1), ctx(level=2)):
        err = fails(router, context, BackendError)
        assert err.status == 503
    assert backends["cloud"].calls == 0 and backends["local"].calls == 6
    assert serve(router, ctx())[0] == "cloud"      # public traffic may still use it


def test_sensitive_request_gets_503_when_local_breaker_is_open_or_only_remotes_match() -> None:
    backends = {"local": Scripted(["refused"] * 4), "cloud": Scripted()}
    router, _ = make_router(backends, [rule("leaky", ["local", "cloud"])],
                            breaker_config=BreakerConfig(failure_threshold=2, reset_timeout=60.0))
    fails(router, ctx(sensitive=True), BackendError)
    assert router.breakers["local"].state is BreakerState.open
    err = fails(router, ctx(sensitive=True), GatewayError)
    assert (err.status, err.code) == (503, "backends_unavailable")
    router, _ = make_router(backends, [rule("cloud-only", ["cloud"])])
    err = fails(router, ctx(level=2), GatewayError)
    assert (err.status, err.code) == (503, "no_local_backend")
    assert backends["cloud"].calls == 0


def test_guard_right_before_start_refuses_a_remote_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    backends = {"local": Scripted(), "cloud": Scripted()}
    router, _ = make_router(backends, [rule("r", ["local"])])
    # simulate a planning bug: the guard at the call site must still hold
    monkeypatch.setattr(router, "plan", lambda context: RoutePlan("r", ["cloud", "local"]))
    err = fails(router, ctx(sensitive=True), GatewayError)
    assert err.code == "no_local_backend" and backends["cloud"].calls == 0


STEPS = st.sampled_from(["ok", "retry", "slow", "later", "bad", "refused", "stall", "break", "empty"])
NAMES = ["local", "local2", "cloud", "cloud2"]
LISTS = {"sensitivity": ["public", "internal", "confidential"], "tiers": ["vip", "standard", "batch"]}
# mostly match-anything fields, so that rules naming remote backends often apply to sensitive requests
MATCHES = st.builds(RouteMatch, **{field: st.none() | st.none() | st.lists(st.sampled_from(values), min_size=1,
                                                                          max_size=2)
                                   for field, values in LISTS.items()})
OVERFLOWS = st.none() | st.builds(Overflow, when_queue_above=st.integers(0, 2),
                                  backend=st.sampled_from(["local", "local2"]),
                                  to=st.lists(st.sampled_from(NAMES), min_size=1, max_size=2))
RULES = st.lists(st.builds(RouteRule, name=st.uuids().map(str), match=MATCHES, overflow=OVERFLOWS,
                           backends=st.lists(st.sampled_from(NAMES), min_size=1, max_size=4)),
                 min_size=1, max_size=3, unique_by=lambda r: r.name)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=RULES, scripts=st.lists(st.lists(STEPS, max_size=4), min_size=4, max_size=4),
       level=st.integers(0, 2), sensitive=st.booleans(), tier=st.sampled_from(["vip", "standard", "batch"]),
       requests=st.integers(1, 3), threshold=st.integers(1, 3), depth=st.integers(0, 3))
def test_property_local_only_traffic_never_calls_a_remote_backend(
        rules: list[RouteRule], scripts: list[list[str]], level: int, sensitive: bool, tier: str,
        requests: int, threshold: int, depth: int) -> None:
    backends = {n: Scripted(s) for n, s in zip(NAMES, scripts, strict=True)}
    policy = RetryPolicy(max_attempts=2, base_backoff=0.0, max_backoff=0.0, first_chunk_timeout=0.01)
    router, _ = make_router(backends, rules, remote=("cloud", "cloud2"), retry=policy,
                            queues={"local": lambda: depth, "local2": lambda: depth}, breaker_config=BreakerConfig(failure_threshold=threshold, reset_timeout=0.0))
    context = ctx(level=level, sensitive=sensitive, tier=tier)

    async def main() -> None:
        for _ in range(requests):
            try:
                _, _, stream = await router.start(context, REQUEST)
                async for _chunk in stream:
                    pass
            except (BackendError, GatewayError):
                continue    # refusals are fine; leaks are not

    asyncio.run(main())
    remote_calls = backends["cloud"].calls + backends["cloud2"].calls
    matched = next((r for r in rules if r.match.matches(context)), None)
    named = [*matched.backends, *(matched.overflow.to if matched.overflow else [])] if matched else []
    names_remote = bool({"cloud", "cloud2"} & set(named))
    event(f"local-only={level > 0 or sensitive}, rule names a remote={names_remote}, remote called={remote_calls > 0}")
    if level > 0 or sensitive:
        assert remote_calls == 0


# -- retries, fallback, stalls --------------------------------------------------------------------
def test_retryable_failures_are_retried_with_jittered_backoff_then_succeed() -> None:
    backends = {"local": Scripted(["retry", "refused"])}
    router, sleeps = make_router(backends, [rule("r", ["local"])], retry=RetryPolicy(
        max_attempts=3, base_backoff=0.01, max_backoff=0.02))
    assert serve(router, ctx()) == ("local", "r", ["0", "1", "2"])
    assert backends["local"].calls == 3
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.01 and 0 <= sleeps[1] <= 0.02
    assert sample(router, "seekserve:backend_retries_total", backend="local") == 2
    assert sample(router, "seekserve:backend_requests_total", backend="local", rule="r", outcome="retry") == 2
    assert sample(router, "seekserve:backend_requests_total", backend="local", rule="r", outcome="ok") == 1
    assert sample(router, "seekserve:route_decisions_total", rule="r", backend="local") == 1


def test_retry_after_is_honoured_and_a_too_long_one_falls_back_at_once() -> None:
    backends = {"local": Scripted(["slow", "ok", "later"]), "cloud": Scripted()}
    router, sleeps = make_router(backends, [rule("r", ["local", "cloud"])])
    assert serve(router, ctx())[0] == "local"
    assert sleeps == [1.5]
    assert serve(router, ctx())[0] == "cloud"       # Retry-After 60 > cap 2: no wait, next backend
    assert sleeps == [1.5] and backends["local"].calls == 3
    assert sample(router, "seekserve:backend_requests_total", backend="local", rule="r", outcome="fallback") == 1


def test_client_error_is_raised_at_once_without_retry_or_fallback() -> None:
    backends = {"local": Scripted(["bad"]), "cloud": Scripted()}
    router, sleeps = make_router(backends, [rule("r", ["local", "cloud"])],
                                 breaker_config=BreakerConfig(failure_threshold=1))
    err = fails(router, ctx(), BackendError)
    assert (err.status, err.param) == (400, "x")
    assert backends["local"].calls == 1 and backends["cloud"].calls == 0 and sleeps == []
    assert router.breakers["local"].state is BreakerState.closed   # the request was wrong, not the backend
    assert sample(router, "seekserve:backend_requests_total", backend="local", rule="r", outcome="error") == 1


@pytest.mark.parametrize("stall", ["stall", "stall_start"])
def test_a_stalled_upstream_times_out_and_falls_back(stall: str) -> None:
    backends = {"local": Scripted([stall, stall]), "cloud": Scripted()}
    router, _ = make_router(backends, [rule("r", ["local", "cloud"])])

    async def main() -> str:
        name, _, stream = await asyncio.wait_for(router.start(ctx(), REQUEST), timeout=5.0)
        await stream.aclose()   # type: ignore[attr-defined]
        return name

    assert asyncio.run(main()) == "cloud"
    assert backends["local"].calls == 2
    assert backends["local"].closed == (2 if stall == "stall" else 0)   # stalled streams were closed


def test_last_failure_is_raised_when_every_candidate_fails() -> None:
    backends = {"local": Scripted(["retry"] * 2), "local2": Scripted(["stall"] * 2)}
    router, _ = make_router(backends, [rule("r", ["local", "local2"])])
    err = fails(router, ctx(), BackendError)
    assert (err.status, err.code) == (504, "backend_timeout")
    assert sample(router, "seekserve:route_decisions_total", rule="r", backend="none") == 1
    assert sample(router, "seekserve:backend_requests_total", backend="local2", rule="r", outcome="error") == 1


def test_failure_after_the_first_chunk_propagates_without_retry() -> None:
    backends = {"local": Scripted(["break"]), "cloud": Scripted()}
    router, _ = make_router(backends, [rule("r", ["local", "cloud"])])

    async def main() -> list[str]:
        got: list[str] = []
        _, _, stream = await router.start(ctx(), REQUEST)
        with pytest.raises(BackendError, match="upstream reset"):
            async for chunk in stream:
                got.append(chunk.text)
        return got

    assert asyncio.run(main()) == ["0"]
    assert backends["local"].calls == 1 and backends["cloud"].calls == 0
    assert router.breakers["local"].consecutive_failures == 1
    assert sample(router, "seekserve:backend_requests_total", backend="local", rule="r", outcome="error") == 1


def test_early_close_closes_the_upstream_stream() -> None:
    backends = {"local": Scripted(chunks=100)}
    router, _ = make_router(backends, [rule("r", ["local"])])

    async def main() -> str:
        _, _, stream = await router.start(ctx(), REQUEST)
        first = await anext(stream)
        await stream.aclose()   # type: ignore[attr-defined]
        return first.text

    assert asyncio.run(main()) == "0"
    assert backends["local"].closed == 1
    assert sample(router, "seekserve:backend_requests_total", backend="local", rule="r", outcome="ok") == 1


def test_a_committed_stream_read_by_its_parts_reports_once() -> None:
    """The gateway pipeline reads `first` and `stream` itself and reports through failed() and aclose(): a
    fault reaches the breaker once and is counted once as an error, never also as ok; closing twice is one
    close."""
    backends = {"local": Scripted(["break"]), "cloud": Scripted(chunks=3)}
    router, _ = make_router(backends, [rule("r", ["local"]), rule("c", ["cloud"])])

    async def main() -> None:
        _, _, committed = await router.start(ctx(), REQUEST)
        assert committed.first is not None and committed.first.text == "0"
        error = BackendError("upstream reset", status=502, retryable=True)
        committed.failed(error)
        committed.failed(error)
        await committed.aclose()
        await committed.aclose()
    asyncio.run(main())
    assert router.breakers["local"].consecutive_failures == 1 and backends["local"].closed == 1
    assert sample(router, "seekserve:backend_requests_total", backend="local", rule="r", outcome="error") == 1
    assert not sample(router, "seekserve:backend_requests_total", backend="local", rule="r", outcome="ok")


def test_empty_stream_and_not_ready_backend() -> None:
    backends = {"local": Scripted(["empty"]), "local2": Scripted()}
    router, _ = make_router(backends, [rule("r", ["local", "local2"])])
    assert serve(router, ctx()) == ("local", "r", [])
    backends["local"].ready = False
    assert serve(router, ctx())[0] == "local2" and backends["local"].calls == 1


# -- circuit breaker through the router ----------------------------------------------------------------
def breaker_state(router: Router, name: str) -> float | None:
    return sample(router, "seekserve:circuit_breaker_state", backend=name)


def test_breaker_opens_skips_the_backend_probes_and_recovers() -> None:
    clock = FakeClock()
    backends = {"local": Scripted(["retry"] * 4), "cloud": Scripted()}
    router, _ = make_router(backends, [rule("r", ["local", "cloud"])], clock=clock,
                            breaker_config=BreakerConfig(failure_threshold=3, reset_timeout=10.0))
    assert breaker_state(router, "local") == 0
    assert serve(router, ctx())[0] == "cloud" and breaker_state(router, "local") == 0   # 2 failures
    assert serve(router, ctx())[0] == "cloud" and breaker_state(router, "local") == 2   # 3rd opens it
    assert backends["local"].calls == 3
    assert serve(router, ctx())[0] == "cloud" and backends["local"].calls == 3          # skipped while open
    clock.now += 10.0
    assert breaker_state(router, "local") == 1          # half-open shows at scrape, before any request
    assert serve(router, ctx())[0] == "cloud"           # the probe fails ("retry"): open again at once
    assert backends["local"].calls == 4 and breaker_state(router, "local") == 2
    clock.now += 10.0
    assert serve(router, ctx())[0] == "local"           # the upstream recovered: probe succeeds
    assert breaker_state(router, "local") == 0


def test_all_breakers_open_gives_503_with_retry_after_until_first_half_open() -> None:
    clock = FakeClock()
    backends = {"local": Scripted(["refused"] * 2), "local2": Scripted(["refused"] * 2)}
    router, _ = make_router(backends, [rule("r", ["local", "local2"])], clock=clock,
                            retry=RetryPolicy(max_attempts=1, first_chunk_timeout=0.2),
                            breaker_config=BreakerConfig(failure_threshold=1, reset_timeout=30.0))
    err = fails(router, ctx(), BackendError)
    assert (err.status, err.code) == (503, "backend_unavailable")
    clock.now += 12.5
    err = fails(router, ctx(), GatewayError)
    assert err.status == 503 and "local, local2" in err.message
    assert err.headers == {"Retry-After": str(math.ceil(30.0 - 12.5))}


def test_cancelled_probe_is_released() -> None:
    clock = FakeClock()
    backends = {"local": Scripted(["refused", "stall"])}
    router, _ = make_router(backends, [rule("r", ["local"])], clock=clock,
                            retry=RetryPolicy(max_attempts=1, first_chunk_timeout=30.0),
                            breaker_config=BreakerConfig(failure_threshold=1, reset_timeout=1.0))
    fails(router, ctx(), BackendError)
    clock.now += 1.0

    async def cancel_probe() -> None:
        task = asyncio.create_task(router.start(ctx(), REQUEST))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_probe())
    assert backends["local"].closed == 1
    assert serve(router, ctx())[0] == "local"    # the next caller may probe (and succeeds)



def test_a_full_local_queue_falls_back_without_opening_the_breaker():
    local, cloud = Scripted(["full"] * 10), Scripted()
    router, _ = make_router({"local": local, "cloud": cloud}, [rule("public", ["local", "cloud"])],
                            breaker_config=BreakerConfig(failure_threshold=2, reset_timeout=60))
    for _ in range(4):
        assert serve(router, ctx())[0] == "cloud"
    assert router.breakers["local"].state is BreakerState.closed     # load is not failure
    alone, _ = make_router({"local": Scripted(["full"] * 10)}, [rule("all", ["local"])], remote=(),
                           breaker_config=BreakerConfig(failure_threshold=2, reset_timeout=60))
    for _ in range(4):                                                 # no fallback: the client gets the 429
        err = fails(alone, ctx(), BackendError)
        assert err.status == 429 and err.headers["Retry-After"] == "1"


def test_an_upstream_out_of_credit_falls_back():
    router, _ = make_router({"cloud": Scripted(["broke"]), "local": Scripted()},
                            [rule("public", ["cloud", "local"])])
    assert serve(router, ctx())[0] == "local"
