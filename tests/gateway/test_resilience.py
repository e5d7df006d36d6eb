"""Retry policy, jittered backoff, circuit breaker and first-chunk opening, without a router."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seekserve.backends.base import BackendError, Chunk, GenerationRequest, ModelInfo
from seekserve.engine.params import SamplingParams
from seekserve.gateway.resilience import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    RetryPolicy,
    as_backend_error,
    backoff,
    is_backend_fault,
    open_stream,
    retry_after_header,
    retry_delay,
)

REQUEST = GenerationRequest(request_id="r", model="m", kind="completion", params=SamplingParams(), prompt="x")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class OneShotBackend:
    """Yields `chunks` chunks after `stall` seconds; counts how often its stream was closed."""

    def __init__(self, chunks: int = 2, stall: float = 0.0) -> None:
        self.chunks, self.stall, self.closed = chunks, stall, 0

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id="m", owned_by="test", max_model_len=64, reasoning=False)]

    def is_ready(self) -> bool:
        return True

    def detokenize(self, token_ids: list[int]) -> str:
        return ""

    async def start(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[Chunk]:
        try:
            await asyncio.sleep(self.stall)
            for i in range(self.chunks):
                yield Chunk(index=0, text=str(i))
        finally:
            self.closed += 1

    async def close(self) -> None:
        return None


# -- backoff and retry decisions ------------------------------------------------------------------
@given(attempt=st.integers(1, 200), base=st.floats(0, 10), cap=st.floats(0, 60), seed=st.integers(0, 2**32))
def test_backoff_stays_within_the_full_jitter_window(attempt: int, base: float, cap: float, seed: int) -> None:
    policy = RetryPolicy(base_backoff=base, max_backoff=cap)
    delay = backoff(attempt, policy, random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2.0 ** min(attempt - 1, 62))


def test_backoff_window_doubles_then_caps_and_is_spread() -> None:
    policy = RetryPolicy(base_backoff=0.1, max_backoff=0.4)
    rng = random.Random(7)
    for attempt, window in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.4), (30, 0.4)]:
        draws = [backoff(attempt, policy, rng) for _ in range(300)]
        assert max(draws) <= window
        # full jitter: draws cover the window, not a fixed point (300 uniform draws reach its top 20%)
        assert min(draws) < 0.2 * window and max(draws) > 0.8 * window


def test_retry_delay_honours_retry_after_up_to_the_cap() -> None:
    policy, rng = RetryPolicy(max_attempts=3, max_retry_after=2.0), random.Random(0)
    assert retry_delay(BackendError("busy", 503, retryable=True, retry_after=1.5), 1, policy, rng) == 1.5
    assert retry_delay(BackendError("busy", 503, retryable=True, retry_after=2.0), 2, policy, rng) == 2.0
    # longer than the cap: move on instead of waiting
    assert retry_delay(BackendError("busy", 503, retryable=True, retry_after=2.5), 1, policy, rng) is None
    # the last attempt is never followed by a wait, and non-retryable errors never wait
    assert retry_delay(BackendError("busy", 503, retryable=True, retry_after=0.1), 3, policy, rng) is None
    assert retry_delay(BackendError("bad", 400), 1, policy, rng) is None
    jittered = retry_delay(BackendError("busy", 503, retryable=True), 2, policy, rng)
    assert jittered is not None and 0.0 <= jittered <= 0.2


def test_policy_and_breaker_config_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(first_chunk_timeout=0)
    with pytest.raises(ValueError):
        RetryPolicy(base_backoff=-1)
    with pytest.raises(ValueError):
        BreakerConfig(failure_threshold=0)


@pytest.mark.parametrize(("err", "fault"), [
    (BackendError("bad request", 400), False),
    (BackendError("not found", 404), False),
    (BackendError("queue full", 429), True),
    (BackendError("down", 500), True),
    (BackendError("busy", 400, retryable=True), True),
    (ConnectionError("refused"), True),
    (TimeoutError(), True),
])
def test_only_backend_failures_are_faults(err: BaseException, fault: bool) -> None:
    assert is_backend_fault(err) is fault


def test_plain_exceptions_become_retryable_backend_errors_without_details() -> None:
    policy = RetryPolicy(first_chunk_timeout=0.5)
    timeout = as_backend_error("cloud", TimeoutError(), policy)
    assert (timeout.status, timeout.code, timeout.retryable) == (504, "backend_timeout", True)
    refused = as_backend_error("cloud", ConnectionError("https://user:secret@host"), policy)
    assert (refused.status, refused.code, refused.retryable) == (503, "backend_unavailable", True)
    assert "secret" not in refused.message and "cloud" in refused.message
    same = BackendError("x", 502)
    assert as_backend_error("cloud", same, policy) is same


def test_retry_after_header_is_whole_seconds_never_zero() -> None:
    assert retry_after_header(0.0) == {"Retry-After": "1"}
    assert retry_after_header(2.1) == {"Retry-After": "3"}


# -- circuit breaker ------------------------------------------------------------------------------
def test_breaker_opens_after_n_consecutive_failures_only() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("local", failure_threshold=3, reset_timeout=10.0, clock=clock)
    for _ in range(2):
        breaker.record_failure()
    breaker.record_success()   # the streak is broken: counting starts again
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is BreakerState.closed and breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.open and not breaker.allow()
    clock.now += 4.0
    assert breaker.retry_in() == pytest.approx(6.0)


def test_half_open_lets_exactly_one_probe_through_and_success_closes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("local", failure_threshold=1, reset_timeout=10.0, clock=clock)
    breaker.record_failure()
    clock.now += 10.0
    assert breaker.state is BreakerState.half_open and breaker.retry_in() == 0.0
    assert breaker.allow()
    assert not breaker.allow() and not breaker.allow()   # the probe is still out
    breaker.record_success()
    assert breaker.state is BreakerState.closed
    assert all(breaker.allow() for _ in range(5))


def test_failed_probe_reopens_for_a_full_reset_timeout() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("local", failure_threshold=1, reset_timeout=10.0, clock=clock)
    breaker.record_failure()
    clock.now += 15.0
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.open and not breaker.allow()
    assert breaker.retry_in() == pytest.approx(10.0)
    clock.now += 10.0
    assert breaker.allow()


def test_released_probe_lets_the_next_caller_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("local", failure_threshold=1, reset_timeout=1.0, clock=clock)
    breaker.record_failure()
    clock.now += 1.0
    assert breaker.allow() and not breaker.allow()
    breaker.release()   # e.g. the client went away: no verdict on the backend
    assert breaker.state is BreakerState.half_open and breaker.allow()


@settings(max_examples=200)
@given(ops=st.lists(st.sampled_from(["allow", "ok", "fail", "release", "tick"]), max_size=60))
def test_breaker_never_has_two_probes_out_and_opens_only_on_a_streak(ops: list[str]) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("b", failure_threshold=3, reset_timeout=5.0, clock=clock)
    probes_out, streak = 0, 0
    for op in ops:
        half_open_before = breaker.state is BreakerState.half_open
        if op == "allow":
            allowed = breaker.allow()
            probes_out += allowed and half_open_before
            assert probes_out <= 1
        elif op == "tick":
            clock.now += 3.0
        else:
            probes_out = 0
            streak = 0 if op == "ok" else streak + (op == "fail")
            getattr(breaker, {"ok": "record_success", "fail": "record_failure", "release": "release"}[op])()
        if streak < 3:
            assert breaker.state is BreakerState.closed


# -- opening a stream up to its first chunk --------------------------------------------------------
def test_open_stream_peeks_the_first_chunk() -> None:
    backend = OneShotBackend(chunks=2)

    async def main() -> list[str]:
        stream, first = await open_stream(backend, REQUEST, timeout=1.0)
        assert first is not None
        return [first.text] + [c.text async for c in stream]

    assert asyncio.run(main()) == ["0", "1"]


def test_open_stream_of_an_empty_stream_returns_no_chunk() -> None:
    async def main() -> Chunk | None:
        _, first = await open_stream(OneShotBackend(chunks=0), REQUEST, timeout=1.0)
        return first

    assert asyncio.run(main()) is None


def test_open_stream_times_out_a_stall_and_closes_the_upstream() -> None:
    backend = OneShotBackend(stall=3600.0)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await open_stream(backend, REQUEST, timeout=0.05)

    asyncio.run(main())
    assert backend.closed == 1
