"""In-process limiter on an injected clock: exact GCRA admissions and retry times, header formats, all-or-nothing
across scopes, tpm reservation and reconciliation, concurrency leases; a hypothesis property bounds admissions."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seekserve.gateway.principal import Limits, Principal, Role
from seekserve.gateway.ratelimit import (
    Decision,
    InProcessRateLimiter,
    RateLimiter,
    Scope,
    format_duration,
    refusal_error,
    retry_headers,
    scopes_for,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def acquire(limiter: InProcessRateLimiter, scopes: list[Scope], tokens: int = 0) -> Decision:
    return asyncio.run(limiter.acquire(scopes, tokens))


def finish(limiter: InProcessRateLimiter, decision: Decision, actual_tokens: int) -> None:
    assert decision.lease is not None
    asyncio.run(limiter.finish(decision.lease, actual_tokens))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> InProcessRateLimiter:
    return InProcessRateLimiter(clock=clock, lease_ttl=10.0)


def test_is_a_rate_limiter(limiter: InProcessRateLimiter) -> None:
    assert isinstance(limiter, RateLimiter) and limiter.healthy


def test_rpm_bursts_one_period_then_refills_at_rate(limiter: InProcessRateLimiter, clock: FakeClock) -> None:
    scope = [Scope("key:a", Limits(rpm=600))]
    assert all(acquire(limiter, scope).allowed for _ in range(600))
    refused = acquire(limiter, scope)
    assert (refused.allowed, refused.reason, refused.lease) == (False, "rpm", None)
    assert refused.retry_after == pytest.approx(0.1)
    assert refused.headers == {
        "x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s", "retry-after": "1", "retry-after-ms": "100"}
    clock.advance(0.1)
    assert acquire(limiter, scope).allowed
    assert not acquire(limiter, scope).allowed
    clock.advance(60)
    assert acquire(limiter, scope).headers["x-ratelimit-remaining-requests"] == "599"


def test_rps_exact_sequence_and_retry_after(limiter: InProcessRateLimiter, clock: FakeClock) -> None:
    scope = [Scope("key:a", Limits(rps=2))]
    assert [acquire(limiter, scope).allowed for _ in range(3)] == [True, True, False]
    clock.advance(0.25)
    refused = acquire(limiter, scope)
    assert refused.retry_after == pytest.approx(0.25)
    assert refused.headers["retry-after-ms"] == "250" and refused.headers["retry-after"] == "1"
    clock.advance(0.25)
    assert acquire(limiter, scope).allowed


def test_fractional_rates_allow_one_at_a_time(limiter: InProcessRateLimiter, clock: FakeClock) -> None:
    scope = [Scope("key:a", Limits(rps=0.5))]   # one every 2 s; the burst can never be below one request
    assert acquire(limiter, scope).allowed
    refused = acquire(limiter, scope)
    assert refused.retry_after == pytest.approx(2.0) and refused.headers["retry-after"] == "2"
    assert refused.headers["x-ratelimit-limit-requests"] == "0.5"
    clock.advance(2.0)
    assert acquire(limiter, scope).allowed


def test_thirds_of_a_second_do_not_lose_a_request_to_rounding(limiter: InProcessRateLimiter) -> None:
    scope = [Scope("key:a", Limits(rps=3))]
    assert [acquire(limiter, scope).allowed for _ in range(4)] == [True, True, True, False]


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.0004, "1ms"), (0.12, "120ms"), (0.1, "100ms"), (1, "1s"), (1.5, "1.5s"), (59.999, "59.999s"),
    (60, "1m0s"), (360, "6m0s"), (61.25, "1m1.25s"), (3661, "1h1m1s"), (3600, "1h0m0s")])
def test_duration_format_is_openais(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_retry_headers_round_up_and_never_say_zero() -> None:
    assert retry_headers(0.0001) == {"retry-after": "1", "retry-after-ms": "1"}
    assert retry_headers(2.3) == {"retry-after": "3", "retry-after-ms": "2300"}
    assert retry_headers(5.0) == {"retry-after": "5", "retry-after-ms": "5000"}


def test_headers_show_the_tightest_request_limit(limiter: InProcessRateLimiter) -> None:
    scopes = [Scope("key:a", Limits(rpm=600, rps=5)), Scope("tenant:t", Limits(tpm=1000))]
    headers = acquire(limiter, scopes, tokens=100).headers
    assert headers == {
        "x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-reset-requests": "200ms", "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "6s"}


def test_headers_prefer_rpm_on_a_tie_and_are_omitted_when_unlimited(limiter: InProcessRateLimiter) -> None:
    headers = acquire(limiter, [Scope("key:a", Limits(rps=10, rpm=10))]).headers
    assert headers == {"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "9",
                       "x-ratelimit-reset-requests": "6s"}
    assert acquire(limiter, [Scope("key:b", Limits(max_concurrency=3))]).headers == {}
    unlimited = acquire(limiter, [Scope("key:c", Limits())])
    assert unlimited.allowed and unlimited.headers == {}


@pytest.mark.parametrize("tenant_first", [False, True])
def test_refusal_by_one_scope_consumes_no_other(limiter: InProcessRateLimiter, tenant_first: bool) -> None:
    key, tenant = Scope("key:a", Limits(rpm=10, tpm=1000)), Scope("tenant:t", Limits(rpm=2))
    scopes = [tenant, key] if tenant_first else [key, tenant]
    assert acquire(limiter, scopes, 10).allowed and acquire(limiter, scopes, 10).allowed
    refused = acquire(limiter, scopes, 10)
    assert refused.reason == "rpm" and refused.headers["x-ratelimit-limit-requests"] == "2"
    alone = acquire(limiter, [key], 10).headers
    assert alone["x-ratelimit-remaining-requests"] == "7" and alone["x-ratelimit-remaining-tokens"] == "970"


def test_concurrency_refusal_consumes_no_rate(limiter: InProcessRateLimiter) -> None:
    key, tenant = Scope("key:a", Limits(rpm=10)), Scope("tenant:t", Limits(max_concurrency=1))
    assert acquire(limiter, [key, tenant]).allowed
    refused = acquire(limiter, [key, tenant])
    assert (refused.reason, refused.retry_after) == ("concurrency", 1.0)
    assert refused.headers["x-ratelimit-remaining-requests"] == "9"


def test_request_larger_than_tpm_is_refused_for_good(limiter: InProcessRateLimiter) -> None:
    scope = [Scope("key:a", Limits(tpm=100))]
    refused = acquire(limiter, scope, 101)
    assert (refused.allowed, refused.reason, refused.retry_after) == (False, "tpm_exceeds_limit", 0.0)
    assert "retry-after" not in refused.headers and refused.headers["x-ratelimit-remaining-tokens"] == "100"
    assert acquire(limiter, scope, 100).allowed   # the refusal consumed nothing


def test_tpm_reservation_refund_lets_more_through(limiter: InProcessRateLimiter) -> None:
    scope = [Scope("key:a", Limits(tpm=1000))]
    first = acquire(limiter, scope, 600)
    refused = acquire(limiter, scope, 600)
    assert refused.reason == "tpm" and refused.retry_after == pytest.approx(12.0)
    finish(limiter, first, 100)      # used 100 of the 600 reserved: 500 come back
    assert acquire(limiter, scope, 600).allowed
    finish(limiter, first, 100)      # a second finish refunds nothing more
    refused = acquire(limiter, scope, 400)
    assert refused.reason == "tpm" and refused.headers["x-ratelimit-remaining-tokens"] == "300"


def test_tpm_usage_beyond_reservation_is_charged(limiter: InProcessRateLimiter, clock: FakeClock) -> None:
    scope = [Scope("key:a", Limits(tpm=600))]
    first = acquire(limiter, scope, 100)
    finish(limiter, first, 700)       # 600 more than reserved: the bucket goes 100 tokens into debt
    refused = acquire(limiter, scope, 1)
    assert refused.reason == "tpm" and refused.retry_after == pytest.approx(10.1)
    clock.advance(10.1)
    assert acquire(limiter, scope, 1).allowed


def test_concurrency_slots_and_idempotent_finish(limiter: InProcessRateLimiter) -> None:
    scope = [Scope("key:a", Limits(max_concurrency=2))]
    first, second = acquire(limiter, scope), acquire(limiter, scope)
    assert first.allowed and second.allowed and not acquire(limiter, scope).allowed
    finish(limiter, first, 0)
    third = acquire(limiter, scope)
    assert third.allowed
    finish(limiter, first, 0)         # harmless: it must not free the slot `third` holds
    assert not acquire(limiter, scope).allowed
    finish(limiter, second, 0)
    finish(limiter, third, 0)
    assert acquire(limiter, scope).allowed and acquire(limiter, scope).allowed


def test_unfinished_leases_expire(limiter: InProcessRateLimiter, clock: FakeClock) -> None:
    scope = [Scope("key:a", Limits(max_concurrency=1, tpm=600))]
    stale = acquire(limiter, scope, 100)
    assert acquire(limiter, scope).reason == "concurrency"
    clock.advance(10.0)               # lease_ttl: a holder that died frees its slot
    fresh = acquire(limiter, scope, 0)
    assert fresh.allowed
    finish(limiter, stale, 0)         # expired: neither refunds nor frees the fresh lease's slot
    assert acquire(limiter, scope).reason == "concurrency"


def test_bad_input_is_rejected(limiter: InProcessRateLimiter) -> None:
    with pytest.raises(ValueError):
        Scope("key:a", Limits(rpm=0))
    with pytest.raises(ValueError):
        acquire(limiter, [Scope("key:a", Limits(rpm=1)), Scope("key:a", Limits(rps=1))])
    with pytest.raises(ValueError):
        acquire(limiter, [Scope("key:a", Limits(rpm=1))], -1)


def test_scopes_for_principal_and_error_mapping(limiter: InProcessRateLimiter) -> None:
    principal = Principal("key_ab12", "ci", "api_key", Role.developer, "acme", limits=Limits(rpm=1))
    scopes = scopes_for(principal, Limits(tpm=50))
    assert [s.key for s in scopes] == ["key:key_ab12", "tenant:acme"]
    assert scopes_for(Principal("key_x", "x", "api_key", Role.developer, "acme")) == []
    acquire(limiter, scopes, 10)
    error = refusal_error(acquire(limiter, scopes, 10))
    assert error.status == 429 and error.headers["retry-after"] == "60"
    assert refusal_error(acquire(limiter, scopes, 51)).status == 429


def test_idle_state_is_swept(clock: FakeClock) -> None:
    limiter = InProcessRateLimiter(clock=clock, lease_ttl=1.0)
    for i in range(limiter.SWEEP_EVERY - 1):
        acquire(limiter, [Scope(f"key:{i}", Limits(rps=1, max_concurrency=1))])
    clock.advance(5.0)
    acquire(limiter, [Scope("key:last", Limits(rps=1))])
    assert list(limiter._tats) == ["key:last"] and not limiter._slots and not limiter._leases


limits_strategy = st.one_of(
    st.builds(lambda r: ("rps", Limits(rps=r)), st.sampled_from([0.5, 1, 2.5, 3, 7, 50])),
    st.builds(lambda r: ("rpm", Limits(rpm=r)), st.sampled_from([1, 7, 60, 600])),
    st.builds(lambda r: ("tpm", Limits(tpm=r)), st.sampled_from([100, 1000])))


@settings(max_examples=150, deadline=None)
@given(limits=limits_strategy, arrivals=st.lists(
    st.tuples(st.floats(0, 3, allow_nan=False), st.integers(0, 100)), min_size=1, max_size=150))
def test_no_window_admits_more_than_burst_plus_rate(limits: tuple[str, Limits],
                                                    arrivals: list[tuple[float, int]]) -> None:
    """For any arrivals, admitted cost in any window [t_i, t_j] ≤ capacity + rate × (t_j - t_i)."""
    kind, lim = limits
    limit = getattr(lim, kind)
    period = 1.0 if kind == "rps" else 60.0
    capacity, rate = max(limit, 1), limit / period
    clock = FakeClock()
    limiter = InProcessRateLimiter(clock=clock)
    admitted: list[tuple[float, int]] = []
    for gap, tokens in arrivals:
        clock.advance(gap * period / 10)
        cost = tokens if kind == "tpm" else 1
        if acquire(limiter, [Scope("key:p", lim)], tokens).allowed:
            admitted.append((clock.now, cost))
    for i in range(len(admitted)):
        total = 0
        for j in range(i, len(admitted)):
            total += admitted[j][1]
            assert total <= capacity + rate * (admitted[j][0] - admitted[i][0]) + 1e-6 * rate + 1e-9


@settings(max_examples=50, deadline=None)
@given(rpm=st.integers(1, 1000), gaps=st.lists(st.floats(0, 1), max_size=60))
def test_clients_that_keep_to_the_rate_are_never_refused(rpm: int, gaps: list[float]) -> None:
    clock = FakeClock()
    limiter = InProcessRateLimiter(clock=clock)
    for gap in gaps:
        assert acquire(limiter, [Scope("key:p", Limits(rpm=rpm))]).allowed
        clock.advance(60 / rpm * (1 + gap))
