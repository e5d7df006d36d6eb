"""Resilience for backend calls: retry policy with full-jitter backoff, a per-backend circuit breaker, and
opening a stream up to its first chunk under a deadline. Retries are only ever possible before that first
chunk: once a byte could have reached the client, a failure is reported, never replayed."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import IntEnum

from seekserve.backends.base import Backend, BackendError, Chunk, GenerationRequest


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 2              # tries per backend (1 = no retry), before falling back to the next
    base_backoff: float = 0.1          # seconds; the jitter window doubles per attempt from here
    max_backoff: float = 2.0           # cap of the jitter window
    max_retry_after: float = 5.0       # a longer Retry-After moves on to the next backend instead of waiting
    first_chunk_timeout: float = 30.0  # start() plus the first chunk; a stalled upstream must not hang us

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if min(self.base_backoff, self.max_backoff, self.max_retry_after) < 0 or self.first_chunk_timeout <= 0:
            raise ValueError("backoff and retry-after limits must be >= 0 and first_chunk_timeout > 0")


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 5         # consecutive backend failures that open the breaker
    reset_timeout: float = 30.0        # seconds open before one half-open probe is let through

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.reset_timeout < 0:
            raise ValueError("failure_threshold must be >= 1 and reset_timeout >= 0")


def backoff(attempt: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Delay after failed attempt `attempt` (1-based): uniform in [0, min(max, base * 2**(attempt-1))].
    Full jitter (AWS architecture blog, "Exponential Backoff and Jitter") spreads a thundering herd best."""
    exponent = min(max(attempt - 1, 0), 62)   # bounded: 2**62 already exceeds any sane max_backoff
    window = min(policy.max_backoff, policy.base_backoff * 2.0 ** exponent)
    return rng.uniform(0.0, window)


def retry_delay(err: BackendError, attempt: int, policy: RetryPolicy, rng: random.Random) -> float | None:
    """Seconds to wait before retrying the same backend, or None to move on to the next one."""
    if not err.retryable or attempt >= policy.max_attempts:
        return None
    if err.retry_after is not None:
        # the backend said when it can take us again; waiting longer than the cap costs the client more
        # than trying the next backend now
        return None if err.retry_after > policy.max_retry_after else max(err.retry_after, 0.0)
    return backoff(attempt, policy, rng)


def is_backend_fault(err: BaseException) -> bool:
    """A failure of the backend (counts against its breaker, may fall back) rather than of the request.
    Anything that is not a BackendError (connection reset, timeout, a bug) is the backend's."""
    if not isinstance(err, BackendError):
        return True
    # 402: our account with the upstream is out of credit: not the client's fault, another backend may answer
    return err.retryable or err.status >= 500 or err.status in (402, 408, 429)


def is_busy(err: BaseException) -> bool:
    """The backend refused for load (its queue is full): worth a fallback, not a breaker failure."""
    return isinstance(err, BackendError) and err.code == "queue_full"


def as_backend_error(name: str, err: Exception, policy: RetryPolicy) -> BackendError:
    """A BackendError for an exception that is not one; the message names no URL or secret."""
    if isinstance(err, BackendError):
        return err
    if isinstance(err, TimeoutError):
        return BackendError(f"backend {name!r} sent nothing within {policy.first_chunk_timeout:g} s",
                            status=504, code="backend_timeout", error_type="server_error", retryable=True)
    return BackendError(f"backend {name!r} is unavailable ({type(err).__name__})", status=503,
                        code="backend_unavailable", error_type="service_unavailable_error", retryable=True)


class BreakerState(IntEnum):
    """Values are the `seekserve:circuit_breaker_state` gauge's."""
    closed = 0
    half_open = 1
    open = 2


class CircuitBreaker:
    """Closed → open after `failure_threshold` consecutive failures; open → half-open after
    `reset_timeout`, where exactly one probe at a time is let through; the probe's success closes the
    breaker, its failure opens it again for another `reset_timeout`."""

    def __init__(self, name: str, failure_threshold: int = 5, reset_timeout: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.failure_threshold, self.reset_timeout = failure_threshold, reset_timeout
        self._clock = clock
        self._state = BreakerState.closed
        self._opened_at = 0.0
        self._probing = False         # a half-open probe is in flight
        self.consecutive_failures = 0

    @property
    def state(self) -> BreakerState:
        # open turns half-open by the passing of time alone, so it is computed when asked
        if self._state is BreakerState.open and self._clock() - self._opened_at >= self.reset_timeout:
            return BreakerState.half_open
        return self._state

    def allow(self) -> bool:
        """May a request go to this backend now? In half-open, True for exactly one caller until that
        caller reports with record_success, record_failure or release."""
        state = self.state
        if state is BreakerState.closed:
            return True
        if state is BreakerState.open or self._probing:
            return False
        self._state, self._probing = BreakerState.half_open, True
        return True

    def record_success(self) -> None:
        self._state, self._probing, self.consecutive_failures = BreakerState.closed, False, 0

    def record_failure(self) -> None:
        self._probing = False
        self.consecutive_failures += 1
        if self.state is not BreakerState.closed or self.consecutive_failures >= self.failure_threshold:
            self._state, self._opened_at = BreakerState.open, self._clock()

    def release(self) -> None:
        """Give back an allowed call that ended with no verdict (a client error, a cancelled request)."""
        self._probing = False

    def retry_in(self) -> float:
        """Seconds until a call may be let through again (0 when one may be now or soon)."""
        if self.state is not BreakerState.open:
            return 0.0
        return max(self.reset_timeout - (self._clock() - self._opened_at), 0.0)


def retry_after_header(seconds: float) -> dict[str, str]:
    # Retry-After is whole seconds; never 0, which clients read as "hammer now"
    return {"Retry-After": str(max(math.ceil(seconds), 1))}


async def aclose_stream(stream: AsyncIterator[Chunk]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def open_stream(backend: Backend, request: GenerationRequest, timeout: float | None,
                      peek: bool = True) -> tuple[AsyncIterator[Chunk], Chunk | None]:
    """Start the request and wait for its first chunk (None: the stream ended empty), all within
    `timeout` seconds (None: no limit). Until this returns nothing has reached the client, so a failure may be retried."""
    async with asyncio.timeout(timeout):
        stream = await backend.start(request)
        if not peek:
            return stream, None
        try:
            return stream, await anext(stream)
        except StopAsyncIteration:
            return stream, None
        except BaseException:
            # includes the timeout's cancellation: the upstream request must not be left running
            await aclose_stream(stream)
            raise
